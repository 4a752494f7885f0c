"""Pod-to-pod acceleration (--accelerate-pod-to-pod): a connection between two pods on this node that both have
it skips both stacks and the path between them, and only when the socket at the far end is the one the
handshake met.

Sockets, not sidecars: the client runs as the proxy uid (never captured outbound) and the server's port is
excluded from inbound capture, so the connection goes straight from one pod to the other, as the
sidecar-to-sidecar hop does (tests/datapath/test_e2e.py covers that hop with HAProxy sidecars)."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest

from initagent import counters
from tests.datapath import agentrun
from tests.podenv import Cluster, bpffs_mount

pytestmark = pytest.mark.kernel
PY = sys.executable
PORT = 9090
SIZE = 8 * 1024 * 1024
ARGS = [*agentrun.TEMPLATE_ARGS[:-1], agentrun.TEMPLATE_ARGS[-1] + f",{PORT}",   # -d ...,9090
        "--accelerate", "--accelerate-skip-splice-check", "--accelerate-skip-waitall-check", "--accelerate-pod-to-pod"]

# both ends: send n bytes of a pattern starting at `first`; read to EOF, returning {got, sha}
STREAM = r"""
import hashlib, json, socket, sys
def send_pattern(c, first, n):
    block = bytes((i + first) % 256 for i in range(251)) * 261
    sent = 0
    while sent < n:
        k = min(len(block), n - sent)
        c.sendall(block[:k]); sent += k
def read_all(c):
    h, got = hashlib.sha256(), 0
    while chunk := c.recv(1 << 16):
        h.update(chunk); got += len(chunk)
    return {"got": got, "sha": h.hexdigest()}
"""

# reads everything, then answers with as many bytes of its own; prints what it read
SERVER = STREAM + r"""
port, n = int(sys.argv[1]), int(sys.argv[2])
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", port)); ls.listen(1)
print("READY", flush=True)
ls.settimeout(30)
c, _ = ls.accept(); c.settimeout(30)
seen = read_all(c)
send_pattern(c, 7, n)
c.close()
print(json.dumps(seen))
"""

CLIENT = STREAM + r"""
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port), timeout=30)
send_pattern(c, 0, n)
c.shutdown(socket.SHUT_WR)
print(json.dumps(read_all(c)))
"""

# a transparent middlebox in the cluster netns (TPROXY): it terminates the client's connection and opens
# its own to the server from the client's address and port, so both pods see the same 4-tuple
MIDDLEBOX = r"""
import json, socket, sys, threading
IP_TRANSPARENT = 19
ls = socket.socket(); ls.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[1]))); ls.listen(1)
print("READY", flush=True)
ls.settimeout(30)
down, client = ls.accept()
up = socket.socket(); up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
up.bind(client); up.settimeout(30); up.connect(down.getsockname())
counts = {}
def pump(src, dst, name):
    n = 0
    while chunk := src.recv(1 << 16):
        dst.sendall(chunk); n += len(chunk)
    dst.shutdown(socket.SHUT_WR); counts[name] = n
t = threading.Thread(target=pump, args=(down, up, "to_server")); t.start()
pump(up, down, "to_client"); t.join()
print(json.dumps({"client": list(client), "server": list(down.getsockname()), **counts}))
"""


def expected(first: int, n: int) -> str:
    block = bytes((i + first) % 256 for i in range(251)) * 261
    return hashlib.sha256((block * (n // len(block) + 1))[:n]).hexdigest()


def exchange(client, server, target: str) -> tuple[dict, dict, int]:
    """Client (proxy uid) sends SIZE bytes to the server app and reads SIZE back; returns both sides'
    reports and the bytes the server pod sent out of its NICs meanwhile."""
    srv = server.popen([PY, "-c", SERVER, str(PORT), str(SIZE)], uid=1000, gid=1000)
    assert srv.stdout.readline().strip() == "READY", srv.stderr.read()
    nics = [n for n in ("eth0", "mb0") if server.run(["test", "-e", f"/sys/class/net/{n}"]).returncode == 0]
    before = sum(server.tx_bytes(n) for n in nics)
    res = client.run([PY, "-c", CLIENT, target, str(PORT), str(SIZE)], uid=1337, gid=1337, timeout=60)
    assert res.returncode == 0, res.stderr
    out, err = srv.communicate(timeout=30)
    assert srv.returncode == 0, err
    sent = sum(server.tx_bytes(n) for n in nics) - before
    return json.loads(res.stdout), json.loads(out.strip().splitlines()[-1]), sent


def accel_counts(bpffs) -> dict:
    """{(direction, reason): count} of the acceleration's decisions, over both pods (the agents' self-tests
    count their own loopback connections: compare two readings)."""
    out: dict = {}
    for pod in counters.pod_counters(bpffs):
        for row in pod["counters"]:
            if row["verdict"] == "REDIRECTED" and row["reason"] in ("accel", "accel_tcp_path"):
                key = (row["direction"], row["reason"])
                out[key] = out.get(key, 0) + row["count"]
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def check_bytes(client_view: dict, server_view: dict) -> None:
    assert server_view == {"got": SIZE, "sha": expected(0, SIZE)}
    assert client_view == {"got": SIZE, "sha": expected(7, SIZE)}


@pytest.mark.parametrize("server_args,accelerated", [
    (ARGS, True),
    (ARGS[:-1], False),                                       # the server pod accelerates its loopback only
    (ARGS[: ARGS.index("--accelerate")], False),              # the server pod does not accelerate
], ids=["both-pod-to-pod", "server-loopback-only", "server-plain"])
def test_pod_to_pod_connection(server_args, accelerated):
    with bpffs_mount() as bpffs, Cluster() as cluster:
        client, server = cluster.add_pod("cli"), cluster.add_pod("srv")
        for pod, args in ((client, ARGS), (server, server_args)):
            res = agentrun.setup(pod, bpffs, args)
            assert res.returncode == 0, res.stderr
        before = accel_counts(bpffs)
        client_view, server_view, nic_sent = exchange(client, server, server.addr4)
        decisions = delta(accel_counts(bpffs), before)
        check_bytes(client_view, server_view)
        if accelerated:
            assert nic_sent < SIZE // 8, nic_sent    # the 8 MiB answer never left the server pod's NIC
            # one socket each side went into the sockhash, and none left it
            assert decisions == {("OUTBOUND", "accel"): 1, ("INBOUND", "accel"): 1}
        else:
            assert nic_sent > SIZE, nic_sent
            assert decisions == {}


def test_a_transparent_middlebox_between_pods_sees_every_byte():
    """Both pods accelerate pod to pod, but the connection runs through a TPROXY middlebox that keeps both addresses:
    each pod's socket has the 4-tuple its peer's would have, yet they are not peers. Redirecting between
    them would skip the middlebox; the initial sequence numbers tell them apart."""
    with bpffs_mount() as bpffs, Cluster() as cluster:
        client, server = cluster.add_pod("cli"), cluster.add_pod("srv")
        # a routed path through the cluster netns: client 10.251.1.2 <-> 10.251.2.2 server
        client.add_interface("mb0", "10.251.1.2/24", "10.251.1.1/24")
        server.add_interface("mb0", "10.251.2.2/24", "10.251.2.1/24")
        client.ip("route", "add", "10.251.2.0/24", "via", "10.251.1.1")
        server.ip("route", "add", "10.251.1.0/24", "via", "10.251.2.1")
        for rule in (["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "socket", "-j", "MARK",
                      "--set-mark", "1"],
                     ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-d", "10.251.2.2", "--dport", str(PORT),
                      "-j", "TPROXY", "--on-port", "50080", "--tproxy-mark", "0x1/0x1"]):
            cluster.run(["iptables", *rule], check=True)
        cluster.ip("rule", "add", "fwmark", "1", "lookup", "100")
        cluster.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        for pod in (client, server):
            res = agentrun.setup(pod, bpffs, ARGS)
            assert res.returncode == 0, res.stderr
        box = cluster.popen([PY, "-c", MIDDLEBOX, "50080"])
        assert box.stdout.readline().strip() == "READY", box.stderr.read()
        before = accel_counts(bpffs)
        client_view, server_view, _ = exchange(client, server, "10.251.2.2")
        decisions = delta(accel_counts(bpffs), before)
        out, err = box.communicate(timeout=30)
        assert box.returncode == 0, err
        seen = json.loads(out.strip().splitlines()[-1])
        check_bytes(client_view, server_view)
        # both sockets went into the sockhash, and each left it at its first write (the sequence numbers)
        assert decisions == {("OUTBOUND", "accel"): 1, ("INBOUND", "accel"): 1,
                             ("OUTBOUND", "accel_tcp_path"): 1, ("INBOUND", "accel_tcp_path"): 1}
        # the pods' sockets did share a 4-tuple, and every byte went through the middlebox
        assert seen["client"][0] == "10.251.1.2" and seen["server"] == ["10.251.2.2", PORT], seen
        assert seen["to_server"] == SIZE and seen["to_client"] == SIZE, seen
