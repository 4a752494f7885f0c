"""End to end with two pods, each with HAProxy as its sidecar on <-p>/<-z>, set up by the real agent:
client app -> client sidecar -> server sidecar -> server app; then the same with acceleration on."""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import pytest

from tests.datapath import agentrun
from tests.podenv import Cluster, bpffs_mount
from tests.sidecar import HAProxy, sidecar_config

pytestmark = pytest.mark.kernel
HERE = Path(__file__).resolve().parent
PY = sys.executable

CLIENT = r"""
import http.client, json, sys, hashlib
host, n = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection(host, 8080, timeout=10)
out = {}
c.request("GET", "/echo"); r = c.getresponse(); out["echo"] = json.loads(r.read())
for i in range(3):                                   # keep-alive on one client connection
    c.request("GET", f"/big?n={n}"); r = c.getresponse(); body = r.read()
    out[f"big{i}"] = [len(body), hashlib.sha256(body).hexdigest()]
c.request("GET", "/echo"); r = c.getresponse(); out["echo2"] = json.loads(r.read())
print(json.dumps(out))
"""


def expected_digest(n: int) -> str:
    block = bytes(range(251))
    return hashlib.sha256((block * (n // 251 + 1))[:n]).hexdigest()


def wait_ready(proc):
    line = proc.stdout.readline().strip()
    assert line == "READY", proc.stderr.read()


def lo_tx_bytes(pod) -> int:
    """Bytes sent over the pod's loopback: the app<->sidecar hops travel there unless accelerated."""
    return int(pod.run(["cat", "/sys/class/net/lo/statistics/tx_bytes"], check=True).stdout)


def run_two_pods(accelerate: bool, size: int):
    with bpffs_mount() as bpffs, Cluster() as cluster:
        client, server = cluster.add_pod("cli"), cluster.add_pod("srv")
        extra = ["--accelerate"] if accelerate else []
        env = {"BPFINIT_ACCEL_SKIP_SPLICE_CHECK": "1"} if accelerate else {}
        logs = []
        for pod in (client, server):
            res = agentrun.setup(pod, bpffs, agentrun.TEMPLATE_ARGS + extra, env)
            assert res.returncode == 0, res.stderr
            logs.append(res.stdout + res.stderr)
        app = server.popen([PY, str(HERE / "httpapp.py"), "--port", "8080"], uid=1000, gid=1000)
        wait_ready(app)
        # each hop stamps the original destination it saw into a header (X-Out-/X-In-Orig-Dst)
        config = sidecar_config(inbound_port=15006, http=True, stamp_headers=True)
        with contextlib.ExitStack() as sidecars:
            for pod in (client, server):
                sidecars.enter_context(HAProxy(pod, config))
            lo_before = [lo_tx_bytes(pod) for pod in (client, server)]
            res = client.run([PY, "-c", CLIENT, server.addr4, str(size)], uid=1000, gid=1000, timeout=60)
            assert res.returncode == 0, res.stderr
            lo_sent = [lo_tx_bytes(pod) - before for pod, before in zip((client, server), lo_before)]
            return json.loads(res.stdout), server, logs, lo_sent


@pytest.mark.parametrize("accelerate", [False, True], ids=["plain", "accelerated"])
def test_client_app_to_server_app_through_both_sidecars(accelerate):
    size = 5 * 1024 * 1024
    out, server, logs, lo_sent = run_two_pods(accelerate, size)
    if accelerate:
        assert all("acceleration on" in log for log in logs), logs
        # both app<->sidecar hops skip TCP: the 3 x 5 MiB responses never cross either pod's loopback
        # (the server app listens dual-stack, so this also covers an IPv4 peer on an AF_INET6 socket)
        assert max(lo_sent) < size // 4, lo_sent
    else:
        assert min(lo_sent) > 3 * size, lo_sent
    for key in ("echo", "echo2"):
        echo = out[key]
        headers = {k.lower(): v for k, v in echo["headers"].items()}
        # the server app saw the request, through both sidecars, original destination kept at each hop
        assert headers["x-out-orig-dst"] == f"{server.addr4}:8080"   # client sidecar (SO_ORIGINAL_DST)
        assert headers["x-in-orig-dst"] == f"{server.addr4}:8080"    # server sidecar (sk_lookup)
        assert echo["peer"][0] in ("127.0.0.6", "::ffff:127.0.0.6")        # from the inbound passthrough source
        assert echo["local"][1] == 8080
    for i in range(3):
        assert out[f"big{i}"] == [size, expected_digest(size)]
