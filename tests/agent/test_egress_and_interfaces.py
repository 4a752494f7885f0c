"""Egress guard (--egress-allow) and -c excluded interfaces on the real kernel."""
from __future__ import annotations

import json

import pytest

from tests.agent.conftest import PYTHON, REPO, run_agent
from tests.podenv import Pod

pytestmark = pytest.mark.kernel
PROBE = REPO / "tests" / "probe.py"


def connect(pod, host, port, uid=1000, gid=1000):
    r = pod.run([PYTHON, PROBE, "connect", host, str(port)], uid=uid, gid=gid)
    return json.loads(r.stdout)


def where(outcome) -> str:
    if outcome["outcome"] != "ok":
        return outcome["outcome"]
    return outcome["reply"]["server"]


def serve(proc_start, name, bind, port):
    proc = proc_start([PYTHON, PROBE, "serve", "--name", name, "--bind", bind, "--port", str(port)])
    assert proc.stdout.readline().strip() == "READY"


def test_egress_guard_allows_only_listed_bypass(build, bpffs):
    with Pod("egress") as pod:
        for addr in ("10.20.0.5", "10.30.0.5", "10.40.0.5", "10.50.0.5"):
            pod.cluster.add_address(addr)
        for port in (9092, 9093, 5432):
            serve(pod.peer_popen, "peer", "0.0.0.0", port)
        proxy = pod.popen([PYTHON, PROBE, "serve", "--name", "proxy", "--bind", "0.0.0.0", "--port", "15001"],
                          uid=1337, gid=1337)
        assert proxy.stdout.readline().strip() == "READY"
        r = run_agent(["setup", "-i", "*", "-x", "10.20.0.0/16,10.40.0.0/16", "-o", "5432",
                       "--egress-allow", "10.20.0.0/16:9092", "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs),
                       "--netns", pod.netns_path])
        assert r.returncode == 0, r.stderr
        assert where(connect(pod, "10.20.0.5", 9092)) == "peer"       # allowed bypass goes direct
        assert where(connect(pod, "10.20.0.5", 9093)) == "eperm"      # excluded CIDR, port not allowed
        assert where(connect(pod, "10.40.0.5", 9092)) == "eperm"      # excluded CIDR not in the list
        assert where(connect(pod, "10.50.0.5", 5432)) == "eperm"      # -o port bypass not in the list
        assert where(connect(pod, "10.30.0.5", 9093)) == "proxy"      # proxied traffic is unaffected
        assert where(connect(pod, "10.40.0.5", 9092, 1337, 1337)) == "peer"   # the proxy's own traffic
        run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


def test_excluded_interface_routes_bypass(build, bpffs):
    """-c eth1: `OUTPUT -o eth1 -j RETURN` ahead of everything; routes via eth0 stay captured."""
    with Pod("iface") as pod:
        pod.add_interface("eth1", addr4="10.60.0.2/24", peer_addr4="10.60.0.1/24", routes=["10.61.0.0/16"])
        pod.cluster.add_address("10.61.0.5")
        pod.cluster.add_address("10.62.0.5")
        serve(pod.peer_popen, "peer", "0.0.0.0", 8080)
        proxy = pod.popen([PYTHON, PROBE, "serve", "--name", "proxy", "--bind", "0.0.0.0", "--port", "15001"],
                          uid=1337, gid=1337)
        assert proxy.stdout.readline().strip() == "READY"
        r = run_agent(["setup", "-i", "*", "-c", "eth1", "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs),
                       "--netns", pod.netns_path])
        assert r.returncode == 0, r.stderr
        assert where(connect(pod, "10.60.0.1", 8080)) == "peer"    # connected route on eth1
        assert where(connect(pod, "10.61.0.5", 8080)) == "peer"    # static route via eth1
        assert where(connect(pod, "10.62.0.5", 8080)) == "proxy"   # default route via eth0
        run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


def test_empty_uid_list_adds_no_owner_rules(build, bpffs):
    """`-u ,` (an empty list after Istio's split) means no uid/gid rules: the app's connection to the
    pod's own address is then captured (no `-o lo ! --uid-owner` RETURN), as istio-iptables would do."""
    with Pod("nouid") as pod:
        serve(pod.popen, "app", "0.0.0.0", 8080)
        proxy = pod.popen([PYTHON, PROBE, "serve", "--name", "proxy", "--bind", "0.0.0.0", "--port", "15001"],
                          uid=1337, gid=1337)
        assert proxy.stdout.readline().strip() == "READY"
        r = run_agent(["setup", "-i", "*", "-u", ",", "-g", ",", "--cgroup", str(pod.cgroup), "--bpffs",
                       str(bpffs), "--netns", pod.netns_path])
        assert r.returncode == 0, r.stderr
        assert where(connect(pod, pod.addr4, 8080)) == "proxy"
        assert where(connect(pod, "127.0.0.1", 8080)) == "app"    # the loopback CIDR still returns
        run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])
