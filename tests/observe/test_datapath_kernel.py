"""Observability through the REAL datapath: `bpfinit-agent setup` on a pod, HAProxy (uid 1337) as the
sidecar, traffic only between the pod and its cluster netns. Asserts exact counters and events for one
redirected request, one excluded-CIDR bypass, one egress-guard denial, one refused-before-the-proxy-
listens and one DNS capture, plus identity fields and filters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from initagent import counters
from tests.observe.conftest import connect_many
from tests.podenv import Pod, bpffs_mount, require_kernel
from tests.sidecar import HAProxy, sidecar_config

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]
PROBE = str(REPO / "tests" / "probe.py")
SERVICE = "10.96.0.10"          # lives in the cluster netns
EXCLUDED = "10.250.0.1"         # the gateway: excluded from capture, allowed by the egress guard
FORBIDDEN = "198.51.100.7"      # excluded from capture, NOT in the egress allow-list -> EPERM

def setup_agent(pod: Pod, bpffs: Path, extra: list[str]) -> str:
    env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "BCC_KERNEL_SOURCE")},
           "POD_NAME": "client-7f9c", "POD_NAMESPACE": "shop", "POD_UID": "unused"}
    labels = bpffs.parent / f"{bpffs.name}.labels"
    labels.write_text('app="client"\nversion="v1"\n')
    env["BPFINIT_POD_LABELS_FILE"] = str(labels)
    res = subprocess.run([sys.executable, "-m", "initagent.cli", "setup", "-p", "15001", "-z", "15006",
                          "-u", "1337", "-m", "REDIRECT", "-i", "*", *extra, "--bpffs", str(bpffs),
                          "--cgroup", str(pod.cgroup), "--netns", pod.netns_path],
                         capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    labels.unlink()
    assert res.returncode == 0, res.stderr
    return res.stdout


def drain(bpffs: Path, *args: str) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "initagent.cli", "observe", "--bpffs", str(bpffs), *args],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return [json.loads(line)["flow"] for line in res.stdout.splitlines()]


def rows(bpffs: Path) -> dict:
    pods = counters.pod_counters(bpffs)
    assert [(p["namespace"], p["pod"]) for p in pods] == [("shop", "client-7f9c")]
    return {(r["direction"], r["verdict"], r["reason"]): r["count"] for r in pods[0]["counters"]}


@pytest.fixture
def env():
    require_kernel()
    with bpffs_mount() as bpffs, Pod("obsdp") as pod:
        pod.cluster.add_address(SERVICE)
        yield bpffs, pod


def test_outbound_redirect_bypass_and_denial_through_haproxy(env):
    bpffs, pod = env
    setup_agent(pod, bpffs, ["-x", f"{EXCLUDED}/32,198.51.100.0/24", "--egress-allow", f"{EXCLUDED}/32"])
    haproxy = HAProxy(pod, sidecar_config()).start()   # uid 1337; ready when listening (no probe connection)
    server = pod.peer_popen([sys.executable, PROBE, "serve", "--name", "svc", "--bind", SERVICE,
                             "--port", "8080", "--count", "1", "--timeout", "30"])
    gw_server = pod.peer_popen([sys.executable, PROBE, "serve", "--name", "gw", "--bind", EXCLUDED,
                                "--port", "9090", "--count", "1", "--timeout", "30"])
    try:
        assert server.stdout.readline().strip() == "READY"
        assert gw_server.stdout.readline().strip() == "READY"
        # 1. redirected request: app -> 10.96.0.10:8080 -> HAProxy -> original destination
        reply = pod.run([sys.executable, PROBE, "connect", SERVICE, "8080"], uid=1000, gid=1000)
        got = json.loads(reply.stdout)
        assert got["outcome"] == "ok" and got["reply"]["server"] == "svc", reply.stdout + reply.stderr
        # 2. excluded-CIDR bypass (allowed by the guard), straight to the gateway's server
        direct = json.loads(pod.run([sys.executable, PROBE, "connect", EXCLUDED, "9090"], uid=1000, gid=1000).stdout)
        assert direct["outcome"] == "ok" and direct["reply"]["server"] == "gw"
        # 3. egress-guard denial: excluded from capture but outside the allow-list
        assert connect_many(pod, FORBIDDEN, 443, 1, uid=1000, gid=1000)["outcomes"] == {"EPERM": 1}
    finally:
        haproxy.stop()
        for p in (server, gw_server):
            p.terminate()
            p.wait(timeout=10)

    assert rows(bpffs) == {
        ("OUTBOUND", "REDIRECTED", "none"): 1,          # the app's request
        ("OUTBOUND", "BYPASSED", "proxy_uid"): 1,       # HAProxy's upstream connection
        ("OUTBOUND", "BYPASSED", "excluded_cidr"): 1,
        ("OUTBOUND", "DENIED", "egress_policy"): 1,
    }
    flows = drain(bpffs)
    assert [(f["verdict"], f["bpfinit"]["reason"], f["IP"]["destination"], f["l4"]["TCP"]["destination_port"])
            for f in flows] == [("REDIRECTED", "none", SERVICE, 8080), ("BYPASSED", "proxy_uid", SERVICE, 8080),
                                ("BYPASSED", "excluded_cidr", EXCLUDED, 9090),
                                ("DENIED", "egress_policy", FORBIDDEN, 443)]
    for f in flows:
        assert f["source"] == {"namespace": "shop", "pod_name": "client-7f9c",
                               "labels": ["k8s:app=client", "k8s:version=v1"]}
        assert f["Type"] == "L3_L4" and f["traffic_direction"] == "EGRESS"
        # connect() runs before bind: observe fills in the pod's own address from the inbound address map
        assert f["IP"]["source"] == pod.addr4 and f["bpfinit"]["source_unbound"] is True
    redirected, proxied, _, denied = flows
    assert redirected["bpfinit"]["redirected_to"] == {"ip": "127.0.0.1", "port": 15001}
    assert redirected["bpfinit"]["uid"] == 1000 and proxied["bpfinit"]["uid"] == 1337
    assert denied["drop_reason_desc"] == "POLICY_DENIED"


def test_inbound_refused_before_the_proxy_listens(env):
    bpffs, pod = env
    setup_agent(pod, bpffs, ["-b", "*"])
    out = pod.peer_run([sys.executable, PROBE, "connect", pod.addr4, "8080", "--timeout", "3"])
    assert json.loads(out.stdout)["outcome"] == "refused", out.stdout + out.stderr
    assert rows(bpffs) == {("INBOUND", "REFUSED", "proxy_not_listening"): 1}
    flows = drain(bpffs, "--verdict", "REFUSED")
    assert len(flows) == 1
    f = flows[0]
    assert f["traffic_direction"] == "INGRESS" and f["drop_reason_desc"] == "PROXY_NOT_LISTENING"
    assert f["destination"]["pod_name"] == "client-7f9c" and f["IP"]["destination"] == pod.addr4
    assert f["IP"]["source"] == pod.peer_addr4 and f["l4"]["TCP"]["destination_port"] == 8080


def test_dns_capture_is_counted_and_reported(env):
    bpffs, pod = env
    setup_agent(pod, bpffs, ["--redirect-dns", "--capture-all-dns"])
    send = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.sendto(b'\\x00\\x01not-really-dns', ('{pod.peer_addr4}', 53)); print('sent')")
    res = pod.run([sys.executable, "-c", send], uid=1000, gid=1000)
    assert res.stdout.strip() == "sent", res.stderr
    assert rows(bpffs) == {("DNS", "REDIRECTED", "dns"): 1}
    flows = drain(bpffs, "--reason", "dns")
    assert len(flows) == 1
    f = flows[0]
    assert f["l4"] == {"UDP": {"source_port": f["l4"]["UDP"]["source_port"], "destination_port": 53}}
    assert f["bpfinit"]["redirected_to"]["port"] == 15053 and f["IP"]["destination"] == pod.peer_addr4
    assert f["source"]["pod_name"] == "client-7f9c"


def test_status_shows_counters_and_cleanup_forgets_them(env):
    bpffs, pod = env
    setup_agent(pod, bpffs, ["-x", f"{EXCLUDED}/32"])
    assert connect_many(pod, EXCLUDED, 9, 2)["outcomes"] == {"ECONNREFUSED": 2}
    cli = [sys.executable, "-m", "initagent.cli"]
    res = subprocess.run(cli + ["status", "--all", "--json", "--bpffs", str(bpffs)], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [(p["namespace"], p["pod"], p["totals"]["bypassed"]) for p in report["pods"]] == [("shop", "client-7f9c", 2)]
    assert report["events"]["emitted"] == 2
    res = subprocess.run(cli + ["status", "--bpffs", str(bpffs), "--netns", pod.netns_path], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert "decisions: redirected=0 captured=0 bypassed=2 denied=0 refused=0 dns=0" in res.stdout, res.stdout
    assert "OUTBOUND  BYPASSED    excluded_cidr        2" in res.stdout
    res = subprocess.run(cli + ["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert counters.pod_counters(bpffs) == []
