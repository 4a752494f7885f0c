"""End to end: app -> VIP-like address -> HAProxy as the sidecar (uid 1337, `server orig 0.0.0.0`, which
relies on SO_ORIGINAL_DST) -> the original destination in the cluster netns, which sees the request."""
from __future__ import annotations

import json

import pytest

from tests.agent.conftest import PYTHON, REPO, run_agent
from tests.podenv import Pod
from tests.sidecar import HAProxy, sidecar_config

pytestmark = pytest.mark.kernel

PROBE = REPO / "tests" / "probe.py"
VIP = "10.96.0.10"


def test_app_to_vip_through_haproxy(build, bpffs):
    with Pod("e2e") as pod:
        pod.cluster.add_address(VIP)
        server = pod.peer_popen([PYTHON, PROBE, "serve", "--name", "backend", "--bind", VIP, "--port", "8080"])
        assert server.stdout.readline().strip() == "READY"
        r = run_agent(["setup", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
                       "-b", "*", "-d", "15090,15021,15020", "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs),
                       "--netns", pod.netns_path])
        assert r.returncode == 0, r.stderr
        # fail closed before the proxy is up
        before = json.loads(pod.run([PYTHON, PROBE, "connect", VIP, "8080"], uid=1000, gid=1000).stdout)
        assert before["outcome"] == "refused", before
        try:
            with HAProxy(pod, sidecar_config()) as haproxy:   # runs as uid 1337, like the sidecar
                for _ in range(5):
                    got = json.loads(pod.run([PYTHON, PROBE, "connect", VIP, "8080"], uid=1000, gid=1000).stdout)
                    assert got["outcome"] == "ok", got
                    reply = got["reply"]
                    assert reply["server"] == "backend" and reply["local"] == [VIP, 8080]
                    assert reply["remote"][0] == pod.addr4      # haproxy's own connection, from the pod
                # HAProxy's upstream connect ran as uid 1337 and was not looped back into itself
                assert haproxy.running()
        finally:
            run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])
