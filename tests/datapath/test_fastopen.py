"""TCP Fast Open is captured like connect(): sendto(MSG_FASTOPEN) puts data in the SYN without a
connect() call, and iptables' nat OUTPUT sees that SYN like any other. bpfinit must too, or an app
could leave the mesh with one flag. The kernel runs cgroup/connect4 for it; these tests hold that.
"""
from __future__ import annotations

import json
import time
import sys
from pathlib import Path

import pytest

from tests.datapath import agentrun
from tests.podenv import Pod, bpffs_mount

pytestmark = pytest.mark.kernel
PY = sys.executable
PROBE = str(Path(__file__).resolve().parents[1] / "probe.py")
APP = {"uid": 1000, "gid": 1000}
PROXY = {"uid": 1337, "gid": 1337}


@pytest.fixture(scope="module")
def pod():
    with bpffs_mount() as bpffs, Pod("tfo") as pod:
        # Fast Open without cookies, client and server (0x1 | 0x2 | 0x4 | 0x200), in this netns only
        pod.run(["sysctl", "-qw", "net.ipv4.tcp_fastopen=519"], check=True)
        res = agentrun.setup(pod, bpffs)
        assert res.returncode == 0, res.stdout + res.stderr
        yield pod


def _serve(popen, name: str, bind: str, port: int, **ids):
    proc = popen([PY, PROBE, "serve", "--name", name, "--bind", bind, "--port", str(port), "--fastopen",
                  "--count", "1", "--timeout", "20"], **ids)
    assert proc.stdout.readline().strip() == "READY"
    return proc


def _fastopen(pod, host: str, port: int, **ids) -> dict:
    res = pod.run([PY, PROBE, "connect", host, str(port), "--fastopen"], **ids)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_fastopen_from_the_app_goes_to_the_proxy_with_its_original_destination(pod):
    proxy = _serve(pod.popen, "proxy", "0.0.0.0", 15001, **PROXY)
    peer = _serve(pod.peer_popen, "peer", pod.peer_addr4, 8080)
    try:
        out = _fastopen(pod, pod.peer_addr4, 8080, **APP)
        assert out["outcome"] == "ok", out
        assert out["reply"]["server"] == "proxy"
        assert out["reply"]["orig_dst"] == [pod.peer_addr4, 8080]
    finally:
        for proc in (proxy, peer):
            proc.kill()
            proc.wait(timeout=5)


def test_fastopen_from_the_proxy_goes_out_directly(pod):
    peer = _serve(pod.peer_popen, "peer", pod.peer_addr4, 8081)
    try:
        out = _fastopen(pod, pod.peer_addr4, 8081, **PROXY)
        assert out["outcome"] == "ok", out
        assert out["reply"]["server"] == "peer"
    finally:
        peer.kill()
        peer.wait(timeout=5)


# A Fast Open proxy that asks SO_ORIGINAL_DST right after accept() and says what it got on stdout, then
# answers the app and waits for it to close (closing first with its data unread would reset the app).
EARLY_PROXY = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from probe import original_dst
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 64)
srv.bind(("0.0.0.0", 15001))
srv.listen(8)
srv.settimeout(20)
print("READY", flush=True)
conn, _ = srv.accept()
conn.settimeout(20)
print(json.dumps({"orig_dst": original_dst(conn), "data": conn.recv(100).decode()}), flush=True)
conn.sendall(json.dumps({"server": "proxy"}).encode() + b"\n")
while conn.recv(4096):
    pass
"""


def test_fastopen_original_destination_is_ready_when_the_proxy_accepts(pod):
    """With Fast Open the proxy's listener queues the child at the SYN, so the proxy can accept() and ask
    SO_ORIGINAL_DST before the app's socket is established. Dropping the proxy's SYN-ACKs holds the app in
    SYN-SENT: the answer must already be there (published at TCP_CONNECT_CB, before the SYN leaves)."""
    hold = ["-o", "lo", "-p", "tcp", "--sport", "15001", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP"]
    proxy = pod.popen([PY, "-c", EARLY_PROXY, str(Path(PROBE).parent)], **PROXY)
    app = None
    try:
        assert proxy.stdout.readline().strip() == "READY", proxy.stderr.read()
        pod.run(["iptables", "-I", "OUTPUT", *hold], check=True)
        app = pod.popen([PY, PROBE, "connect", pod.peer_addr4, "8082", "--fastopen", "--timeout", "20"], **APP)
        seen = json.loads(proxy.stdout.readline())
        app_states = pod.run(["ss", "-Htn", "state", "syn-sent"], check=True).stdout
        assert ":15001" in app_states, f"the app should still wait for the SYN-ACK: {app_states!r}"
        assert seen == {"orig_dst": [pod.peer_addr4, 8082], "data": "hello over fast open\n"}
        pod.run(["iptables", "-D", "OUTPUT", *hold], check=True)
        out, _ = app.communicate(timeout=30)
        assert json.loads(out) == {"outcome": "ok", "reply": {"server": "proxy"}}
    finally:
        pod.run(["iptables", "-D", "OUTPUT", *hold])
        for proc in (proxy, app):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=5)
