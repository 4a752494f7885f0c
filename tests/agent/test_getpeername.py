"""getpeername() of a redirected connection shows the original destination, as with istio-iptables' NAT.

A pod set up by the real agent; a plain accept loop as the proxy (uid 1337) on <-p> and <-z>; the app
(uid 1000) connects to cluster addresses over IPv4, IPv6 and v4-mapped IPv6. Each server answers with
its name, so every check also proves where the connection really went.
"""
from __future__ import annotations

import json

import pytest

from tests.agent.conftest import PYTHON, run_agent
from tests.podenv import Pod

pytestmark = pytest.mark.kernel

SERVICE4 = "10.96.0.10"
SERVICE6 = "fd00:96::10"
EXCLUDED4 = "10.20.0.5"
PORT = 8080

# Names itself to every client; dual-stack socket so 127.0.0.1 and ::1 both reach it. Bounded: exits
# after 60 s even if the test dies without killing it.
SERVER = r"""
import select, socket, sys, time
name, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
listeners = []
for port in ports:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(64)
    listeners.append(s)
print("READY", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    ready, _, _ = select.select(listeners, [], [], 1)
    for s in ready:
        conn, _ = s.accept()
        conn.sendall(name.encode() + b"\n")
        conn.close()
"""

# Connects, reads the server's name, reports getpeername()/getsockname(). argv: family host port.
CLIENT = r"""
import json, socket, sys
family = {"4": socket.AF_INET, "6": socket.AF_INET6}[sys.argv[1]]
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(5)
s.connect((sys.argv[2], int(sys.argv[3])))
name = s.makefile().readline().strip()
print(json.dumps({"server": name, "peer": list(s.getpeername()[:2]), "local": list(s.getsockname()[:2])}))
s.close()
"""


def connect(pod, family: str, host: str, port: int, uid: int = 1000, gid: int = 1000) -> dict:
    r = pod.run([PYTHON, "-c", CLIENT, family, host, str(port)], uid=uid, gid=gid, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def start_server(popen, name: str, *ports: int, **ids):
    proc = popen([PYTHON, "-c", SERVER, name, *map(str, ports)], **ids)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read() if proc.poll() is not None else ""
    return proc


def test_getpeername_shows_original_destination(build, bpffs):
    with Pod("gpeer") as pod:
        for addr in (SERVICE4, SERVICE6, EXCLUDED4):
            pod.cluster.add_address(addr)
        start_server(pod.peer_popen, "server", PORT)
        start_server(pod.popen, "proxy", 15001, uid=1337, gid=1337)
        start_server(pod.popen, "inbound", 15006, uid=1337, gid=1337)
        r = run_agent(["setup", "-i", "*", "-x", "10.20.0.0/16", "--dual-stack", "--cgroup", str(pod.cgroup),
                       "--bpffs", str(bpffs), "--netns", pod.netns_path])
        assert r.returncode == 0, r.stderr
        try:
            # redirected: the app sees the address it dialled, not 127.0.0.1:15001
            v4 = connect(pod, "4", SERVICE4, PORT)
            assert v4["server"] == "proxy"
            assert v4["peer"] == [SERVICE4, PORT]
            v6 = connect(pod, "6", SERVICE6, PORT)
            assert v6["server"] == "proxy"
            assert v6["peer"] == [SERVICE6, PORT]
            mapped = connect(pod, "6", f"::ffff:{SERVICE4}", PORT)
            assert mapped["server"] == "proxy"
            assert mapped["peer"] == [f"::ffff:{SERVICE4}", PORT]
            # the local side is untouched: still the loopback end the proxy accepted
            assert v4["local"][0] == "127.0.0.1"
            assert v6["local"][0] == "::1"

            # not redirected (-x): the real peer, which is also the address dialled
            excluded = connect(pod, "4", EXCLUDED4, PORT)
            assert excluded["server"] == "server"
            assert excluded["peer"] == [EXCLUDED4, PORT]

            # the proxy's own outbound socket bypasses capture: its peer is the real server
            own = connect(pod, "4", SERVICE4, PORT, uid=1337, gid=1337)
            assert own["server"] == "server"
            assert own["peer"] == [SERVICE4, PORT]
            # the proxy talking to the proxy port directly: a plain loopback peer
            direct = connect(pod, "4", "127.0.0.1", 15001, uid=1337, gid=1337)
            assert direct["server"] == "proxy"
            assert direct["peer"] == ["127.0.0.1", 15001]
            # the app dialling the proxy port itself (loopback, not redirected) sees it as it is
            app_direct = connect(pod, "6", "::1", 15001)
            assert app_direct["server"] == "proxy"
            assert app_direct["peer"] == ["::1", 15001]

            # hairpin (act 2): the proxy to the pod's own address goes to <-z>; its peer stays the pod IP
            hairpin = connect(pod, "4", pod.addr4, PORT, uid=1337, gid=1337)
            assert hairpin["server"] == "inbound"
            assert hairpin["peer"] == [pod.addr4, PORT]
        finally:
            run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


# A socket whose redirected connect failed may connect again elsewhere; its stale original destination
# must not be shown then. argv: first host, second host, port.
RECONNECT = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:   # blocking (refused at once on loopback): a timed-out Python connect leaves the socket half-reset
    s.connect((sys.argv[1], int(sys.argv[3])))
    first = "connected"
except ConnectionRefusedError:
    first = "refused"
s.settimeout(5)
s.connect((sys.argv[2], int(sys.argv[3])))
name = s.makefile().readline().strip()
print(json.dumps({"first": first, "server": name, "peer": list(s.getpeername())}))
s.close()
"""


def test_getpeername_after_failed_redirect_shows_real_peer(build, bpffs):
    with Pod("gpre") as pod:
        for addr in (SERVICE4, EXCLUDED4):
            pod.cluster.add_address(addr)
        start_server(pod.peer_popen, "server", PORT)   # no proxy: the redirected connect is refused
        r = run_agent(["setup", "-i", "*", "-x", "10.20.0.0/16", "--cgroup", str(pod.cgroup),
                       "--bpffs", str(bpffs), "--netns", pod.netns_path])
        assert r.returncode == 0, r.stderr
        try:
            r = pod.run([PYTHON, "-c", RECONNECT, SERVICE4, EXCLUDED4, str(PORT)], uid=1000, gid=1000,
                        timeout=20)
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            assert out == {"first": "refused", "server": "server", "peer": [EXCLUDED4, PORT]}
        finally:
            run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])
