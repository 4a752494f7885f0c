"""Differential test: Istio's golden iptables rules vs `bpfinit-agent setup` with the same flags/env.

For every golden config (tests/data/istio/iptables-golden/CONFIGS.tsv) one pod gets the golden rules via
iptables-restore, its twin gets bpfinit, and the same probes run against both. Outcomes must be identical:
reached the proxy on 15001/15006 with original destination X, reached the destination (or the app)
directly, or failed the same way ("refused" = RST, "timeout" = silently dropped: kept apart on purpose).

- Outbound: every destination (inside/outside the configured ranges, loopback, the pod's own addresses,
  v4 and v6) x port (in/out of -q/-o/-b/-d lists, the tunnel port) x identity (app, proxy uid/gid, -u/-g
  lists, owner groups) x source (unbound, 127.0.0.6 / ::6).
- Inbound: TCP to the pod's addresses on every port of the -b/-d lists (and others), from the node (the
  cluster netns), from another pod on the bridge, and through a second NIC `eth1` (the -k lists name
  eth0/eth1), v4 and v6, source address compared too; then again with nothing listening on <-z>.
- Owner: sockets created under one identity and connected (or sent from) under another, and setuid/setgid
  programs (ruid != euid): iptables matches the socket file's fsuid/fsgid, and so must bpfinit.
- DNS: A queries over UDP (sendto and connected) and TCP to the resolv.conf nameservers (one in the pod
  at the goldens' 127.0.0.53, one in the peer netns) and to another server, from every identity, with a
  stand-in DNS proxy on 15053. The agent reads the same resolv.conf the golden rules were made from.
- Configs the agent refuses (TPROXY, --drop-invalid, -k with -i): a clear one-line refusal, nothing attached.
"""
from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import tempfile

import pytest

from initagent import flags
from tests.agent.conftest import PYTHON, REPO, run_agent
from tests.podenv import Cluster

pytestmark = pytest.mark.kernel

GOLDEN = REPO / "tests" / "data" / "istio" / "iptables-golden"
PROBE = REPO / "tests" / "probe.py"
BATCH = REPO / "tests" / "agent" / "probe_batch.py"
DNSSERVER = REPO / "tests" / "datapath" / "dnsserver.py"
# Group names used by the goldens that this host's /etc/group lacks: the same numeric id is put in the
# env AND the golden rules, which keeps the comparison exact.
GROUP_IDS = {"ftp": "2021", "java": "2022"}

CLUSTER_V4 = ["10.1.2.3", "9.9.1.1", "1.1.5.5", "172.31.0.9"]
CLUSTER_V6 = ["2001:db8::5", "fd00:99::5"]
PORTS = [8080, 32000, 15008]
# Every port of the goldens' -b/-d/-q lists, plus an unlisted one, the tunnel port and the status port.
INBOUND_PORTS = [4000, 5000, 6000, 7000, 31000, 32000, 8080, 15008, 15020]
APP_PORTS = sorted(set(PORTS + INBOUND_PORTS))
# (uid, gid, supplementary groups). iptables' `--gid-owner` (no --suppl-groups, as istio writes it) looks
# at the socket's fsgid only, and bpfinit at the task's primary gid only: the supplementary-group
# identities show both ignore them the same way.
IDENTITIES = [(1000, 1000, None), (1337, 1337, None), (3, 1000, None), (4, 1000, None), (1000, 1, None),
              (1000, 2, None), (1000, 888, None), (1000, 202, None), (1000, 2021, None), (1000, 2022, None),
              (1000, 1000, [1337, 888, 202, 2021])]

# A socket created under one identity and used (connect/sendto) under another, and setuid/setgid programs
# (ruid != euid): iptables' -m owner sees the fsuid/fsgid the socket's file was opened with, so must bpfinit.
# Each side is [ruid, euid, rgid, egid].
APP_IDS, PROXY_IDS, ROOT_IDS = [1000, 1000, 1000, 1000], [1337, 1337, 1337, 1337], [0, 0, 0, 0]
OWNED = [(PROXY_IDS, APP_IDS),                                  # the proxy's socket, used by the app
         (APP_IDS, PROXY_IDS),                                  # the app's socket, used by the proxy
         (ROOT_IDS, PROXY_IDS),                                 # setuid to the proxy after socket()
         ([3, 3, 1000, 1000], APP_IDS),                         # a -u list member's socket (some goldens)
         ([1000, 1337, 1000, 1000], [1000, 1337, 1000, 1000]),  # setuid-1337 program run by the app
         ([1337, 1000, 1337, 1000], [1337, 1000, 1337, 1000]),  # ... and the other way round
         ([1000, 1000, 1000, 1337], [1000, 1000, 1000, 1337])]  # setgid-1337 program
OWNED_DSTS = [("10.1.2.3", 8080), ("127.0.0.5", 8080), ("SELF4", 8080), ("127.0.0.1", 15008)]
OWNED_DSTS_V6 = [("2001:db8::5", 8080), ("SELF6", 8080)]

# DNS: the goldens were made with resolv.conf `nameserver 127.0.0.53`. The test adds a second nameserver
# in the peer netns; istio emits the same rules once per nameserver, so duplicating each 127.0.0.53 rule
# for it is exactly what istio-iptables would have written for the two-server resolv.conf.
NS_GOLDEN = "127.0.0.53"
NS_PEER = "10.96.0.10"
DNS_OTHER4, DNS_OTHER6 = "9.9.1.1", "fd00:99::5"
# Each DNS responder answers with its own address, so the answer says who answered.
DNS_ANSWERS = {"10.0.0.53": "ns-in-pod", "10.0.0.10": "ns-peer", "10.0.0.9": "dns-other", "10.0.0.99": "dns-proxy"}
DNS_KINDS = ["dns-udp", "dns-udpc", "dns-tcp"]


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


def golden_text(name: str) -> str:
    text = (GOLDEN / f"{name}.golden").read_text()
    for group, gid in GROUP_IDS.items():
        text = re.sub(rf"--gid-owner {group}\b", f"--gid-owner {gid}", text)
    lines = []
    for line in text.splitlines():
        lines.append(line)
        if NS_GOLDEN in line:
            lines.append(line.replace(NS_GOLDEN, NS_PEER))
    return "\n".join(lines) + "\n"


def golden_tables(name: str) -> tuple[str, str]:
    """(v4 restore input, v6 restore input) from a golden file's `* table .. COMMIT` blocks."""
    text = golden_text(name)
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


def resolv_conf_for(name: str) -> str:
    """The resolv.conf the golden was made from (plus the peer nameserver); none when istio found none."""
    if NS_GOLDEN in (GOLDEN / f"{name}.golden").read_text():
        return f"nameserver {NS_GOLDEN}\nnameserver {NS_PEER}\n"
    return "search svc.cluster.local\n"


def in_private_resolv_conf(path: str) -> list[str]:
    """Command prefix: run in a private mount namespace whose /etc/resolv.conf is `path` (what the pod's
    init container sees), so the agent reads the pod's resolv.conf, not the host's."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', path]


class Eth1:
    """A second NIC: veth `eth1` in the pod (10.251.<h>.2, fd00:251:<h>::2), its peer end in the cluster
    netns (.1 / ::1), not bridged: traffic from the cluster netns to the eth1 addresses arrives on eth1."""

    def __init__(self, cluster, pod):
        h = pod.host
        self.addr4, self.peer4 = f"10.251.{h}.2", f"10.251.{h}.1"
        self.addr6, self.peer6 = f"fd00:251:{h:x}::2", f"fd00:251:{h:x}::1"
        peer = f"h7x{secrets.token_hex(5)}"
        subprocess.run(["ip", "link", "add", peer, "netns", cluster.name, "type", "veth", "peer", "name",
                        "eth1", "netns", pod.name], check=True, capture_output=True)
        pod.ip("addr", "add", f"{self.addr4}/24", "dev", "eth1")
        pod.ip("addr", "add", f"{self.addr6}/64", "dev", "eth1", "nodad")
        pod.ip("link", "set", "eth1", "up")
        cluster.ip("addr", "add", f"{self.peer4}/24", "dev", peer)
        cluster.ip("addr", "add", f"{self.peer6}/64", "dev", peer, "nodad")
        cluster.ip("link", "set", peer, "up")


def wait_ready(proc) -> None:
    line = proc.stdout.readline().strip()
    assert line == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")


def start_listeners(pod, proxy_uid: int, proxy_gid: int) -> dict:
    """The proxy's listeners run as the first -u/-g (istio's raw-table DNS conntrack zones key on it)."""
    procs = {
        "proxy15001": pod.popen([PYTHON, PROBE, "serve", "--name", "proxy15001", "--bind", "::", "--port", "15001"],
                                uid=proxy_uid, gid=proxy_gid),
        "proxy15006": pod.popen([PYTHON, PROBE, "serve", "--name", "proxy15006", "--bind", "::", "--port", "15006"],
                                uid=proxy_uid, gid=proxy_gid),
        # the DNS proxy stand-in (istio-agent's 15053) and a resolver in the pod at the goldens' 127.0.0.53
        "dns-proxy4": pod.popen([PYTHON, DNSSERVER, "--bind", "127.0.0.1", "--port", "15053", "--answer", "10.0.0.99",
                                 "--timeout", "600"], uid=proxy_uid, gid=proxy_gid),
        "dns-proxy6": pod.popen([PYTHON, DNSSERVER, "--bind", "::1", "--port", "15053", "--answer", "10.0.0.99",
                                 "--timeout", "600"], uid=proxy_uid, gid=proxy_gid),
        "ns-in-pod": pod.popen([PYTHON, DNSSERVER, "--bind", NS_GOLDEN, "--port", "53", "--answer", "10.0.0.53",
                                "--timeout", "600"]),
    }
    procs.update({f"app{p}": pod.popen([PYTHON, PROBE, "serve", "--name", "app", "--bind", "::", "--port", str(p)],
                                       uid=1000, gid=1000) for p in APP_PORTS})
    for proc in procs.values():
        wait_ready(proc)
    return procs


class Names:
    """Replace the addresses that differ between the twins (and the peers') with role names."""

    def __init__(self, cluster, client, pod, eth1):
        self.map = {pod.addr4: "SELF4", pod.addr6: "SELF6", eth1.addr4: "ETH1_4", eth1.addr6: "ETH1_6",
                    eth1.peer4: "ETH1PEER4", eth1.peer6: "ETH1PEER6", cluster.gateway4: "NODE4",
                    cluster.gateway6: "NODE6", client.addr4: "CLIENT4", client.addr6: "CLIENT6"}
        self.real = {v: k for k, v in self.map.items()}

    def __call__(self, addr):
        return self.map.get(addr, addr)

    def addr(self, role: str) -> str:
        if role.startswith("::ffff:"):
            return "::ffff:" + self.real.get(role[7:], role[7:])
        return self.real.get(role, role)


def normalise(outcome: dict, n: Names, with_remote: bool = False) -> object:
    """One comparable value per probe. The client's source is compared only for inbound probes: for an
    outbound redirect iptables keeps the pod IP as source while bpfinit connects from loopback."""
    if outcome["outcome"] != "ok":
        return outcome["outcome"]
    if "answer" in outcome:
        src = n(outcome["from"][0]) if outcome.get("from") else None
        return ("dns", DNS_ANSWERS.get(outcome["answer"], outcome["answer"]), src)
    reply = outcome["reply"]
    remote = (n(reply["remote"][0]),) if with_remote else ()
    if reply["server"].startswith("proxy"):
        if not reply["orig_dst"]:
            return (reply["server"], "NO-ORIGINAL-DST") + remote
        return (reply["server"], n(reply["orig_dst"][0]), reply["orig_dst"][1]) + remote
    return (reply["server"], n(reply["local"][0]), reply["local"][1]) + remote


def run_batch(runner, probes: list, **kw) -> list:
    r = runner([PYTHON, BATCH, json.dumps(probes)], timeout=600, **kw)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out) == len(probes)
    return out


def outbound_probes(v6: bool) -> list:
    """[host-role, port, src] probes from inside the pod."""
    dsts = CLUSTER_V4 + ["127.0.0.1", "127.0.0.5", "SELF4"] + (CLUSTER_V6 + ["::1", "SELF6"] if v6 else [])
    # IPv4 through AF_INET6 sockets (v4-mapped): the iptables rules apply to them, so ours must too
    dsts += ["::ffff:" + d for d in CLUSTER_V4[:2] + ["127.0.0.1", "127.0.0.5", "SELF4"]]
    probes = [[d, p, None] for d in dsts for p in PORTS]
    # the pod talking to itself on the inbound ports (over lo and to its own addresses), both families
    # whatever the config: without ip6tables rules nothing v6 may be captured either
    self_dsts = ["127.0.0.1", "SELF4", "ETH1_4", "::1", "SELF6", "ETH1_6"]
    probes += [[d, p, None] for d in self_dsts for p in INBOUND_PORTS if [d, p, None] not in probes]
    probes += [["127.0.0.5", 8080, "127.0.0.6"], ["SELF4", 8080, "127.0.0.6"], ["127.0.0.1", 8080, "127.0.0.6"],
               ["SELF6", 8080, "::6"], ["::1", 8080, "::6"]]
    return probes


def dns_probes() -> list:
    servers = (NS_GOLDEN, NS_PEER, DNS_OTHER4, DNS_OTHER6, "::ffff:" + NS_GOLDEN, "::ffff:" + NS_PEER)
    return [[k, d, 53, None] for k in DNS_KINDS for d in servers]


def run_pod_probes(pod, n: Names, v6: bool) -> dict:
    results = {}
    # ::6 exists on lo only in IPv6 pods (istio adds it), so binding it elsewhere just fails on both sides
    probes = [p for p in outbound_probes(v6) if v6 or p[2] != "::6"]
    concrete = [[n.addr(d), p, s] for d, p, s in probes]
    dprobes = dns_probes()
    for uid, gid, groups in IDENTITIES:
        for (dst, port, src), outcome in zip(probes, run_batch(pod.run, concrete, uid=uid, gid=gid, groups=groups)):
            results[("out", dst, port, src, uid, gid, str(groups))] = normalise(outcome, n)
        for (kind, dst, port, _src), outcome in zip(dprobes, run_batch(pod.run, dprobes, uid=uid, gid=gid,
                                                                          groups=groups)):
            results[(kind, dst, port, uid, gid, str(groups))] = normalise(outcome, n)
    return results


def run_owned_probes(pod, n: Names, v6: bool) -> dict:
    """OWNED x a few destinations, TCP and DNS (one root batch that switches ids per probe)."""
    dsts = OWNED_DSTS + (OWNED_DSTS_V6 if v6 else [])
    inner = [["tcp", d, p, None] for d, p in dsts] + [[k, NS_PEER, 53, None] for k in ("dns-udp", "dns-tcp")]
    probes = [(creator, user, probe) for creator, user in OWNED for probe in inner]
    concrete = [["owned", c, u, [k, n.addr(d), p, s]] for c, u, (k, d, p, s) in probes]
    return {("owned", str(c), str(u), k, d, p): normalise(o, n)
            for (c, u, (k, d, p, _s)), o in zip(probes, run_batch(pod.run, concrete))}


def inbound_probes() -> list:
    dsts = ["SELF4", "SELF6"]
    return [["tcp", d, p, None] for d in dsts for p in INBOUND_PORTS + [15001, 15006]]


def run_inbound(cluster, client, n: Names, phase: str) -> dict:
    results = {}
    origins = {"node": (cluster.run, inbound_probes()),
               "pod": (client.run, inbound_probes()),
               "eth1": (cluster.run, [["tcp", d, p, None] for d in ("ETH1_4", "ETH1_6") for p in INBOUND_PORTS])}
    for origin, (runner, probes) in origins.items():
        concrete = [[k, n.addr(d), p, s] for k, d, p, s in probes]
        for (_k, dst, port, _s), outcome in zip(probes, run_batch(runner, concrete)):
            results[("in", phase, origin, dst, port)] = normalise(outcome, n, with_remote=True)
    return results


def run_hairpin(pod, n: Names, proxy_ids: tuple[int, int]) -> dict:
    """The proxy connecting to its own pod addresses (istio's hairpin to <-z>), v4 and v6."""
    probes = [[d, p, None] for d in ("SELF4", "SELF6", "ETH1_4") for p in (8080, 4000)]
    concrete = [[n.addr(d), p, s] for d, p, s in probes]
    outcomes = run_batch(pod.run, concrete, uid=proxy_ids[0], gid=proxy_ids[1])
    return {("hairpin", "proxy-down", d, p): normalise(o, n) for (d, p, _s), o in zip(probes, outcomes)}


def stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster():
    with Cluster() as c:
        for addr in CLUSTER_V4 + CLUSTER_V6 + [NS_PEER]:
            c.add_address(addr)
        for port in PORTS:
            wait_ready(c.popen([PYTHON, PROBE, "serve", "--name", "peer", "--bind", "::", "--port", str(port),
                                "--timeout", "3600"]))   # lives as long as the module, not probe.py's 120 s
        for bind, answer in ((NS_PEER, "10.0.0.10"), (DNS_OTHER4, "10.0.0.9"), (DNS_OTHER6, "10.0.0.9")):
            wait_ready(c.popen([PYTHON, DNSSERVER, "--bind", bind, "--port", "53", "--answer", answer,
                                "--timeout", "3600"]))
        c.client = c.add_pod("client")   # "another pod on the same node": plain, no capture
        yield c


def diff_message(expected: dict, got: dict, what: str) -> str:
    diff = {k: (expected[k], got.get(k)) for k in expected if expected[k] != got.get(k)}
    if not diff:
        return ""
    return f"{what}: {len(diff)} of {len(expected)} probes differ (key -> (iptables, bpfinit)):\n" + \
        "\n".join(f"{k}: {v}" for k, v in list(diff.items())[:60])


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
        # eth1 exists before the rules and the agent run, as a pod's NICs do before istio-init
        ipt_eth1, ebpf_eth1 = Eth1(cluster, ipt), Eth1(cluster, ebpf)
        r = subprocess.run(["ip", "netns", "exec", ipt.name, "iptables-restore", "--noflush"], input=v4_rules,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        if v6_rules:
            r = subprocess.run(["ip", "netns", "exec", ipt.name, "ip6tables-restore", "--noflush"], input=v6_rules,
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            # istio-iptables also adds ::6/128 to lo for IPv6 pods (outside the rule set)
            ipt.ip("addr", "add", "::6/128", "dev", "lo")
        with tempfile.NamedTemporaryFile("w", prefix="bpfinit-resolv-", suffix=".conf") as resolv:
            resolv.write(resolv_conf_for(name))
            resolv.flush()
            r = run_agent(["setup", *argv, "--cgroup", str(ebpf.cgroup), "--bpffs", str(bpffs), "--netns",
                           ebpf.netns_path], env_extra=env, prefix=in_private_resolv_conf(resolv.name))
        assert r.returncode == 0, r.stderr
        cfg = flags.parse(argv, env)
        proxy_ids = (cfg.proxy_uids[0], cfg.proxy_gids[0])
        listeners = {"ipt": start_listeners(ipt, *proxy_ids), "ebpf": start_listeners(ebpf, *proxy_ids)}
        names = {"ipt": Names(cluster, cluster.client, ipt, ipt_eth1),
                 "ebpf": Names(cluster, cluster.client, ebpf, ebpf_eth1)}
        v6 = bool(v6_rules)
        expected = run_pod_probes(ipt, names["ipt"], v6)
        got = run_pod_probes(ebpf, names["ebpf"], v6)
        msg = diff_message(expected, got, "from inside the pod")
        assert not msg, msg
        owned_expected = run_owned_probes(ipt, names["ipt"], v6)
        owned_got = run_owned_probes(ebpf, names["ebpf"], v6)
        msg = diff_message(owned_expected, owned_got, "sockets used under another identity than their creator's")
        assert not msg, msg
        if 1337 in cfg.proxy_uids and expected[("out", "10.1.2.3", 8080, None, 1000, 1000, "None")][0] == "proxy15001":
            # the owner decides, not the user: the proxy's socket used by the app bypasses, and the reverse
            # is captured
            tcp = {(str(c), str(u)): owned_expected[("owned", str(c), str(u), "tcp", "10.1.2.3", 8080)]
                   for c, u in OWNED}
            setuid = str([1000, 1337, 1000, 1000])
            assert tcp[(str(PROXY_IDS), str(APP_IDS))][0] == "peer", tcp
            assert tcp[(str(APP_IDS), str(PROXY_IDS))][0] == "proxy15001", tcp
            assert tcp[(setuid, setuid)][0] == "peer", tcp
        expected_in = run_inbound(cluster, cluster.client, names["ipt"], "proxy-up")
        got_in = run_inbound(cluster, cluster.client, names["ebpf"], "proxy-up")
        msg = diff_message(expected_in, got_in, "inbound")
        assert not msg, msg

        # Nothing on <-z>: iptables REDIRECTs to a closed port and the pod's kernel answers RST
        # ("refused"); bpfinit's sk_lookup drops the lookup and the kernel answers RST too. A silent drop
        # would show as "timeout" and differ. Either way the app must never get a captured connection.
        for side in ("ipt", "ebpf"):
            stop(listeners[side]["proxy15006"])
        down_expected = run_inbound(cluster, cluster.client, names["ipt"], "proxy-down")
        down_got = run_inbound(cluster, cluster.client, names["ebpf"], "proxy-down")
        down_expected.update(run_hairpin(ipt, names["ipt"], proxy_ids))
        down_got.update(run_hairpin(ebpf, names["ebpf"], proxy_ids))
        msg = diff_message(down_expected, down_got, "inbound with nothing on <-z>")
        assert not msg, msg
        for key, outcome in expected_in.items():
            down_key = key[:1] + ("proxy-down",) + key[2:]
            if isinstance(outcome, tuple) and outcome[0] == "proxy15006":
                assert down_expected[down_key] == "refused" == down_got[down_key], (key, down_expected[down_key])
        assert not any(isinstance(v, tuple) and v[0] == "app" and k[0] == "hairpin" and k[2] == "SELF4"
                       for k, v in down_got.items()), down_got

        # the matrix must actually exercise every kind of outcome somewhere
        kinds = {v[0] if isinstance(v, tuple) else v for v in expected.values()}
        assert {"peer", "app", "dns"} <= kinds, kinds
        in_kinds = {v[0] if isinstance(v, tuple) else v for v in expected_in.values()}
        assert "app" in in_kinds, in_kinds
        if cfg.inbound_capture and not cfg.kube_virt_interfaces:
            assert "proxy15006" in in_kinds, in_kinds
        if cfg.redirect_dns and NS_GOLDEN in v4_rules:
            assert any(v == ("dns", "dns-proxy", NS_PEER) for v in expected.values()), "DNS capture not exercised"
    finally:
        run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", ebpf.netns_path])
        for pod in (ipt, ebpf):
            pod._destroy()
            cluster.pods.remove(pod)
