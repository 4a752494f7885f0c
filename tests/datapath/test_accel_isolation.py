"""Acceleration keeps pods apart: the sockhash is node-wide, and two pods' loopback connections can have
the same 4-tuple (each netns has its own port space). A socket must only ever be redirected to its peer
in its own pod, never to a socket of another pod with the same addresses and ports."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.datapath import agentrun
from tests.podenv import Cluster, bpffs_mount

pytestmark = pytest.mark.kernel
PY = sys.executable

# A "proxy" listener on 127.0.0.1:15001 and one client connection from the fixed port 40000, both in
# this pod (sockops puts both ends in the sockhash), driven one command per stdin line.
PAIR = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 15001)); srv.listen(8)
cli = acc = None
print("READY", flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "connect":
        cli = socket.socket(); cli.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        cli.bind(("127.0.0.1", 40000)); cli.connect(("127.0.0.1", 15001)); acc, _ = srv.accept()
        out = "connected"
    elif cmd == "close-client":
        cli.close(); out = "closed"
    elif cmd == "send":
        cli.sendall(arg[0].encode()); out = "sent"
    elif cmd == "recv":
        acc.settimeout(1.0)
        try:
            out = acc.recv(100).decode() or "EOF"
        except socket.timeout:
            out = "TIMEOUT"
    print(out, flush=True)
"""


class Pair:
    def __init__(self, pod):
        self.proc = pod.popen([PY, "-c", PAIR], uid=1337, gid=1337, stdin=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "READY", self.proc.stderr.read()

    def __call__(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=5)


def test_accelerated_bytes_never_reach_another_pod_with_the_same_4_tuple():
    with bpffs_mount() as bpffs, Cluster() as cluster:
        pod_a, pod_b = cluster.add_pod("acca"), cluster.add_pod("accb")
        for pod in (pod_a, pod_b):
            res = agentrun.setup(pod, bpffs, agentrun.TEMPLATE_ARGS + ["--accelerate", "--accelerate-skip-splice-check",
                                                                       "--accelerate-skip-waitall-check"])
            assert res.returncode == 0 and "acceleration on" in res.stdout, res.stdout + res.stderr
        a, b = Pair(pod_a), Pair(pod_b)
        try:
            # pod A: 127.0.0.1:40000 <-> 127.0.0.1:15001, then its client end closes while the proxy end
            # (the accepted socket) is still open, as between a client's close and its proxy's
            assert a("connect") == "connected"
            assert a("close-client") == "closed"
            # pod B: the very same 4-tuple in its own netns
            assert b("connect") == "connected"
            assert b("send from-pod-b") == "sent"
            assert b("recv") == "from-pod-b"           # B's own proxy end gets B's bytes ...
            assert a("recv") == "EOF"                  # ... and A's sees only its client's close
        finally:
            a.stop()
            b.stop()
