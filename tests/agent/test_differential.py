"""Differential test: Istio's golden iptables rules vs `bpfinit-agent setup` with the same flags/env.

For each outbound-relevant golden config (tests/data/istio/iptables-golden/CONFIGS.tsv), one pod gets the
golden rules via iptables-restore, its twin gets bpfinit, and the same probe matrix runs in both: every
destination (inside/outside the configured ranges, loopback, the pod's own address, v4 and v6) x port
(in/out of -q/-o lists, the tunnel port) x identity (app, proxy uid/gid, -u/-g lists, owner groups) x
source (unbound, 127.0.0.6). Outcomes must be identical: reached the proxy on 15001/15006 with original
destination X, reached the destination directly, or failed the same way.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from initagent import flags
from tests.agent.conftest import PYTHON, REPO, run_agent
from tests.podenv import Cluster

pytestmark = pytest.mark.kernel

GOLDEN = REPO / "tests" / "data" / "istio" / "iptables-golden"
PROBE = REPO / "tests" / "probe.py"
BATCH = REPO / "tests" / "agent" / "probe_batch.py"
# Group names used by the goldens that this host's /etc/group lacks: the same numeric id is put in the
# env AND the golden rules, which keeps the comparison exact.
GROUP_IDS = {"ftp": "2021", "java": "2022"}

CLUSTER_V4 = ["10.1.2.3", "9.9.1.1", "1.1.5.5", "172.31.0.9"]
CLUSTER_V6 = ["2001:db8::5", "fd00:99::5"]
PORTS = [8080, 32000, 15008]
# (uid, gid, supplementary groups). iptables' `--gid-owner` (no --suppl-groups, as istio writes it) looks
# at the socket's fsgid only, and bpfinit at the task's primary gid only: the supplementary-group
# identities show both ignore them the same way.
IDENTITIES = [(1000, 1000, None), (1337, 1337, None), (3, 1000, None), (4, 1000, None), (1000, 1, None),
              (1000, 2, None), (1000, 888, None), (1000, 202, None), (1000, 2021, None), (1000, 2022, None),
              (1000, 1000, [1337, 888, 202, 2021])]


def load_configs():
    rows = []
    for line in (GOLDEN / "CONFIGS.tsv").read_text().splitlines()[1:]:
        name, flag_text, env_text, _notes = line.split("\t")
        env = dict(kv.split("=", 1) for kv in env_text.split()) if env_text != "-" else {}
        for key in ("ISTIO_OUTBOUND_OWNER_GROUPS", "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"):
            if key in env:
                env[key] = ",".join(GROUP_IDS.get(g, g) for g in env[key].split(","))
        argv = shlex.split(flag_text)
        cfg = flags.parse(argv, env)
        rows.append(pytest.param(name, argv, env, bool(cfg.unsupported), id=name))
    return rows


def golden_tables(name: str) -> tuple[str, str]:
    """(v4 restore input, v6 restore input) from a golden file's `* table .. COMMIT` blocks."""
    text = (GOLDEN / f"{name}.golden").read_text()
    for group, gid in GROUP_IDS.items():
        text = re.sub(rf"--gid-owner {group}\b", f"--gid-owner {gid}", text)
    blocks = re.findall(r"^\*.*?^COMMIT$", text, flags=re.S | re.M)
    assert text.splitlines()[0] == "iptables-save"
    # IPv4 tables come first; the IPv6 ones start when a table name repeats (dual-stack goldens only)
    v4, v6, seen = [], [], set()
    for block in blocks:
        table = block.splitlines()[0]
        target = v6 if (v6 or table in seen) else v4
        seen.add(table)
        target.append(block)
    return "\n".join(v4) + "\n", ("\n".join(v6) + "\n") if v6 else ""


def start_listeners(pod) -> None:
    procs = [
        pod.popen([PYTHON, PROBE, "serve", "--name", "proxy15001", "--bind", "::", "--port", "15001"], uid=1337, gid=1337),
        pod.popen([PYTHON, PROBE, "serve", "--name", "proxy15006", "--bind", "::", "--port", "15006"], uid=1337, gid=1337),
    ]
    procs += [pod.popen([PYTHON, PROBE, "serve", "--name", "app", "--bind", "::", "--port", str(p)], uid=1000, gid=1000)
              for p in PORTS]
    for proc in procs:
        assert proc.stdout.readline().strip() == "READY"


def probe_matrix(pod, v6: bool) -> list:
    dsts = CLUSTER_V4 + ["127.0.0.1", "127.0.0.5", pod.addr4]
    if v6:
        dsts += CLUSTER_V6 + ["::1", pod.addr6]
    probes = [[d, p, None] for d in dsts for p in PORTS]
    probes += [["127.0.0.5", 8080, "127.0.0.6"], [pod.addr4, 8080, "127.0.0.6"], ["127.0.0.1", 8080, "127.0.0.6"]]
    if v6:
        probes += [[pod.addr6, 8080, "::6"], ["::1", 8080, "::6"]]
    return probes


def normalise(outcome: dict, pod) -> object:
    def n(addr):
        return {pod.addr4: "SELF4", pod.addr6: "SELF6"}.get(addr, addr)
    if outcome["outcome"] != "ok":
        return outcome["outcome"]
    reply = outcome["reply"]
    if reply["server"].startswith("proxy"):
        return (reply["server"], n(reply["orig_dst"][0]), reply["orig_dst"][1]) if reply["orig_dst"] else \
            (reply["server"], "NO-ORIGINAL-DST")
    return (reply["server"], n(reply["local"][0]), reply["local"][1])


def run_probes(pod, v6: bool) -> dict:
    probes = probe_matrix(pod, v6)
    results = {}
    for uid, gid, groups in IDENTITIES:
        r = pod.run([PYTHON, BATCH, json.dumps(probes)], uid=uid, gid=gid, groups=groups, timeout=120)
        assert r.returncode == 0, r.stderr
        for (dst, port, src), outcome in zip(probes, json.loads(r.stdout)):
            key = ({pod.addr4: "SELF4", pod.addr6: "SELF6"}.get(dst, dst), port, src, uid, gid, str(groups))
            results[key] = normalise(outcome, pod)
    return results


@pytest.fixture(scope="module")
def cluster():
    with Cluster() as c:
        for addr in CLUSTER_V4 + CLUSTER_V6:
            c.add_address(addr)
        for port in PORTS:
            proc = c.popen([PYTHON, PROBE, "serve", "--name", "peer", "--bind", "::", "--port", str(port)])
            assert proc.stdout.readline().strip() == "READY"
        yield c


@pytest.mark.parametrize("name,argv,env,unsupported", load_configs())
def test_same_outcomes_as_istio_iptables(cluster, build, bpffs, name, argv, env, unsupported):
    if unsupported:
        # configs the agent cannot reproduce exactly must be refused (the pod then never starts
        # unprotected; the webhook leaves such pods to istio-init): one line, exit 2, nothing attached
        pod = cluster.add_pod(f"uns{name[:4]}")
        try:
            r = run_agent(["setup", *argv, "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs), "--netns",
                           pod.netns_path], env_extra=env)
            assert r.returncode == 2 and "unsupported" in r.stderr and r.stderr.count("\n") == 1, r.stderr
            from initagent.attach import attached_ids
            assert not any(attached_ids(pod.cgroup).values())
        finally:
            pod._destroy()
            cluster.pods.remove(pod)
        return
    v4_rules, v6_rules = golden_tables(name)
    ipt = cluster.add_pod(f"ipt{name[:4]}")
    ebpf = cluster.add_pod(f"bpf{name[:4]}")
    try:
        r = subprocess.run(["ip", "netns", "exec", ipt.name, "iptables-restore", "--noflush"], input=v4_rules,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        if v6_rules:
            r = subprocess.run(["ip", "netns", "exec", ipt.name, "ip6tables-restore", "--noflush"], input=v6_rules,
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            # istio-iptables also adds ::6/128 to lo for IPv6 pods (outside the rule set)
            ipt.ip("addr", "add", "::6/128", "dev", "lo")
        r = run_agent(["setup", *argv, "--cgroup", str(ebpf.cgroup), "--bpffs", str(bpffs), "--netns",
                       ebpf.netns_path], env_extra=env)
        assert r.returncode == 0, r.stderr
        start_listeners(ipt)
        start_listeners(ebpf)
        v6 = bool(v6_rules)
        expected = run_probes(ipt, v6)
        got = run_probes(ebpf, v6)
        diff = {k: (expected[k], got.get(k)) for k in expected if expected[k] != got.get(k)}
        assert not diff, f"{len(diff)} of {len(expected)} probes differ (key: dst, port, src, uid, gid, groups -> " \
                         f"(iptables, bpfinit)):\n" + "\n".join(f"{k}: {v}" for k, v in list(diff.items())[:40])
        # the matrix must actually exercise every kind of outcome somewhere
        kinds = {v[0] if isinstance(v, tuple) else v for v in expected.values()}
        assert {"peer", "app"} <= kinds, kinds
    finally:
        run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", ebpf.netns_path])
        for pod in (ipt, ebpf):
            pod._destroy()
            cluster.pods.remove(pod)
