"""End to end with two pods, each with HAProxy as its sidecar on <-p>/<-z>, set up by the real agent:
client app -> client sidecar -> server sidecar -> server app; then the same with acceleration on (both
app<->sidecar hops), and with --accelerate-pod-to-pod (the sidecar-to-sidecar hop too)."""
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
# this kernel fails the splice and MSG_WAITALL parts of the self-test (docs/datapath.md); waived here
ACCEL_WAIVED = ["--accelerate", "--accelerate-skip-splice-check", "--accelerate-skip-waitall-check"]

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


def start_sidecars(stack: contextlib.ExitStack, pods, ipv6: bool) -> list:
    """HAProxy sidecars (each hop stamps the original destination it saw into X-Out-/X-In-Orig-Dst), or
    for IPv6, which HAProxy cannot proxy transparently, pyproxy.py (it logs the original destinations)."""
    if not ipv6:
        config = sidecar_config(inbound_port=15006, http=True, stamp_headers=True)
        for pod in pods:
            stack.enter_context(HAProxy(pod, config))
        return []
    procs = []
    for pod in pods:
        proc = pod.popen([PY, str(HERE / "pyproxy.py")], uid=1337, gid=1337)
        stack.callback(proc.kill)
        wait_ready(proc)
        procs.append(proc)
    return procs


def run_two_pods(accelerate: bool, size: int, ipv6: bool = False, pod_to_pod: bool = False):
    with bpffs_mount() as bpffs, Cluster() as cluster:
        client, server = cluster.add_pod("cli"), cluster.add_pod("srv")
        extra = ((ACCEL_WAIVED + (["--accelerate-pod-to-pod"] if pod_to_pod else [])) if accelerate else []) + \
            (["--dual-stack"] if ipv6 else [])
        logs = []
        for pod in (client, server):
            res = agentrun.setup(pod, bpffs, agentrun.TEMPLATE_ARGS + extra)
            assert res.returncode == 0, res.stderr
            logs.append(res.stdout + res.stderr)
        app = server.popen([PY, str(HERE / "httpapp.py"), "--port", "8080"], uid=1000, gid=1000)
        wait_ready(app)
        with contextlib.ExitStack() as stack:
            proxies = start_sidecars(stack, (client, server), ipv6)
            lo_before = [pod.lo_tx_bytes() for pod in (client, server)]
            eth_before = server.tx_bytes("eth0")
            target = server.addr6 if ipv6 else server.addr4
            res = client.run([PY, "-c", CLIENT, target, str(size)], uid=1000, gid=1000, timeout=60)
            assert res.returncode == 0, res.stderr
            lo_sent = [pod.lo_tx_bytes() - before for pod, before in zip((client, server), lo_before)]
            eth_sent = server.tx_bytes("eth0") - eth_before
            seen = []                                 # pyproxy: (listener, orig_dst) per accepted connection
            for proc in proxies:
                proc.kill()
                seen.append([tuple(json.loads(line).values()) for line in proc.communicate()[0].splitlines()])
            return json.loads(res.stdout), server, logs, lo_sent, eth_sent, seen


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("accelerate,pod_to_pod", [(False, False), (True, False), (True, True)],
                         ids=["plain", "accelerated", "accelerated-pod-to-pod"])
def test_client_app_to_server_app_through_both_sidecars(accelerate, pod_to_pod, ipv6):
    size = 5 * 1024 * 1024
    out, server, logs, lo_sent, eth_sent, seen = run_two_pods(accelerate, size, ipv6, pod_to_pod)
    if accelerate:
        assert all("acceleration on" in log for log in logs), logs
        assert all(("pod to pod too" in log) == pod_to_pod for log in logs), logs
        # both app<->sidecar hops skip TCP: the 3 x 5 MiB responses never cross either pod's loopback
        # (the server app listens dual-stack, so this also covers an IPv4 peer on an AF_INET6 socket)
        assert max(lo_sent) < size // 4, lo_sent
    else:
        assert min(lo_sent) > 3 * size, lo_sent
    if pod_to_pod:
        # the sidecar-to-sidecar hop skips both stacks too: the responses never leave the server pod's eth0
        assert eth_sent < size // 4, eth_sent
    else:
        assert eth_sent > 3 * size, eth_sent
    # the server app saw the requests, through both sidecars, original destination kept at each hop
    if ipv6:
        # one keep-alive connection: the client sidecar (IP6T_SO_ORIGINAL_DST) and the server sidecar
        # (sk_lookup) each saw it once, addressed to the server app
        assert seen == [[("outbound", [server.addr6, 8080])], [("inbound", [server.addr6, 8080])]], seen
    for key in ("echo", "echo2"):
        echo = out[key]
        if not ipv6:
            headers = {k.lower(): v for k, v in echo["headers"].items()}
            assert headers["x-out-orig-dst"] == f"{server.addr4}:8080"   # client sidecar (SO_ORIGINAL_DST)
            assert headers["x-in-orig-dst"] == f"{server.addr4}:8080"    # server sidecar (sk_lookup)
        # from the inbound passthrough source
        assert echo["peer"][0] in (("::6",) if ipv6 else ("127.0.0.6", "::ffff:127.0.0.6"))
        local = [server.addr6] if ipv6 else [server.addr4, f"::ffff:{server.addr4}"]   # the app listens dual-stack
        assert echo["local"][0] in local and echo["local"][1] == 8080, echo
    for i in range(3):
        assert out[f"big{i}"] == [size, expected_digest(size)]
