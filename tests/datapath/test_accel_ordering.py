"""Acceleration never reorders a byte stream, and a half-close still comes after the bytes.

sk_msg hands redirected bytes to the peer's psock queue, and a reader drains that queue before its TCP
receive queue. So if some bytes of a connection took the TCP path (the peer was not in the sockhash
yet) and later ones were redirected, the later ones would be read first. Two real ways to get there:

- the listener uses TCP_DEFER_ACCEPT (HAProxy `bind ... defer-accept`): the server's socket only exists,
  and only reaches PASSIVE_ESTABLISHED, once the first data segment arrives, so the client's first send
  finds no peer in the map;
- TCP Fast Open: the data in the SYN is on the wire before either end is established.

Each test writes three chunks with pauses before the "proxy" reads anything, and the proxy must read
them in order. A control connection in the same pod shows acceleration was really on (its bytes never
touch the pod's loopback).
"""
from __future__ import annotations

import sys

import pytest

from initagent import counters
from tests.datapath import agentrun
from tests.podenv import Cluster, bpffs_mount

pytestmark = pytest.mark.kernel
PY = sys.executable
ACCEL = agentrun.TEMPLATE_ARGS + ["--accelerate", "--accelerate-skip-splice-check",
                                  "--accelerate-skip-waitall-check"]
CHUNKS = ["first-", "second-", "third"]

# argv[1]: "plain" | "defer-accept" | "fastopen". A listener on the proxy's 127.0.0.1:15001 and a client
# in the same pod (sockops puts both ends in the sockhash); the client's first chunk goes with connect
# (fastopen) or after it, each chunk 50 ms apart, and only then does the proxy accept and read.
STREAM = r"""
import socket, sys, time
mode, chunks = sys.argv[1], [c.encode() for c in sys.argv[2:]]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if mode == "defer-accept":
    srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 2)
if mode == "fastopen":
    srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
srv.bind(("127.0.0.1", 15001)); srv.listen(8)
cli = socket.socket()
if mode == "fastopen":
    cli.sendto(chunks.pop(0), socket.MSG_FASTOPEN, ("127.0.0.1", 15001))
else:
    cli.connect(("127.0.0.1", 15001))
for chunk in chunks:
    time.sleep(0.05)
    cli.sendall(chunk)
acc, _ = srv.accept()
acc.settimeout(2.0)
want, got = sum(len(c.encode()) for c in sys.argv[2:]), b""
while len(got) < want:
    data = acc.recv(4096)
    if not data:
        break
    got += data
print(got.decode(), flush=True)
"""


def _stream(pod, mode: str) -> str:
    res = pod.run([PY, "-c", STREAM, mode, *CHUNKS], uid=1337, gid=1337, timeout=20)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture(scope="module")
def accelerated_pod():
    with bpffs_mount() as bpffs, Cluster() as cluster:
        pod = cluster.add_pod("accord")
        # Fast Open without cookies, client and server (0x1 | 0x2 | 0x4 | 0x200), in this netns only
        pod.run(["sysctl", "-qw", "net.ipv4.tcp_fastopen=519"], check=True)
        res = agentrun.setup(pod, bpffs, ACCEL)
        assert res.returncode == 0 and "acceleration on" in res.stdout, res.stdout + res.stderr
        yield pod, bpffs


def tcp_path_count(bpffs) -> int:
    """REDIRECTED/accel_tcp_path: connections of the (only) pod that left acceleration for TCP. A pod shows
    up in the counters with its first counted decision."""
    pods = counters.pod_counters(bpffs)
    assert len(pods) <= 1, pods
    return sum(r["count"] for pod in pods for r in pod["counters"]
               if (r["verdict"], r["reason"]) == ("REDIRECTED", "accel_tcp_path"))


def test_control_connection_is_accelerated(accelerated_pod):
    pod, bpffs = accelerated_pod
    before, left_before = pod.lo_tx_bytes(), tcp_path_count(bpffs)
    assert _stream(pod, "plain") == "".join(CHUNKS)
    # the handshake and teardown still cross lo (~10 packets); the 18 payload bytes would add 3 more
    # packets, 66+ bytes each, so the bound tells a redirected stream from a TCP one
    assert pod.lo_tx_bytes() - before < 10 * 80
    assert tcp_path_count(bpffs) == left_before


@pytest.mark.parametrize("mode", ["defer-accept", "fastopen"])
def test_bytes_that_took_tcp_first_are_never_overtaken(accelerated_pod, mode):
    pod, bpffs = accelerated_pod
    left_before = tcp_path_count(bpffs)
    assert _stream(pod, mode) == "".join(CHUNKS)
    # and the kernel-level counters say so, once per socket that left (sockops: it had moved data by
    # ESTABLISHED; sk_msg: its write found no peer). Here defer-accept counts 2 (the proxy's socket is born
    # with the data, and the client's first write misses), Fast Open 1 (the client's SYN carried data).
    assert tcp_path_count(bpffs) - left_before == (2 if mode == "defer-accept" else 1)


# Half-close: 3 MiB then shutdown(SHUT_WR). The FIN takes TCP while the bytes are redirected; the reader must
# still get all of them before EOF, and can answer afterwards.
HALF_CLOSE = r"""
import os, socket, threading, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 15001)); srv.listen(1)
cli = socket.create_connection(("127.0.0.1", 15001)); peer, _ = srv.accept()
data = os.urandom(3 << 20)
writer = threading.Thread(target=lambda: (cli.sendall(data), cli.shutdown(socket.SHUT_WR)))
writer.start()
time.sleep(0.2)          # the FIN is queued behind the redirected bytes before anyone reads
got = b""
while True:
    chunk = peer.recv(1 << 20)
    if not chunk:
        break
    got += chunk
writer.join()
peer.sendall(b"answer"); peer.close()
back = b""
while True:
    chunk = cli.recv(100)
    if not chunk:
        break
    back += chunk
print(got == data, back.decode(), flush=True)
"""


def test_half_close_delivers_every_redirected_byte_before_eof(accelerated_pod):
    pod, _ = accelerated_pod
    before = pod.lo_tx_bytes()
    res = pod.run([PY, "-c", HALF_CLOSE], uid=1337, gid=1337, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "answer"], res.stdout
    assert pod.lo_tx_bytes() - before < (3 << 20) // 4          # the 3 MiB were redirected, not sent by TCP
