"""TCP Fast Open is captured like connect(): sendto(MSG_FASTOPEN) puts data in the SYN without a
connect() call, and iptables' nat OUTPUT sees that SYN like any other. bpfinit must too, or an app
could leave the mesh with one flag. The kernel runs cgroup/connect4 for it; these tests hold that.
"""
from __future__ import annotations

import json
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
