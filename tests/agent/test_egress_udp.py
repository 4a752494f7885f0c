"""Egress guard (--egress-allow) for UDP, and the guard's exemptions, on the real kernel.

UDP is never captured by istio (DNS aside), so with the guard on every UDP datagram bypasses the proxy:
connect() (cgroup connect4/6) and sendto()/sendmsg() with an address (cgroup sendmsg4/6) to a destination
outside the allow-list fail with EPERM and count one DENIED (egress_policy, UDP) each. Exempt: the proxy's
uid/gid, destinations local to the pod, DNS to the resolv.conf nameservers on port 53 (DNS capture on or
off). Every address lives in namespaces the test creates; every server exits on its own after a bound.
"""
from __future__ import annotations

import json
import secrets
import tempfile
from contextlib import contextmanager

import pytest

from tests.agent.conftest import PYTHON, REPO, UDP_SERVER, denied_flows as _denied_flows, pod_rows, run_agent
from tests.podenv import Pod

pytestmark = pytest.mark.kernel
PROBE = REPO / "tests" / "probe.py"
PROBE_BATCH = REPO / "tests" / "agent" / "probe_batch.py"
DNSSERVER = REPO / "tests" / "datapath" / "dnsserver.py"

ALLOWED4 = "10.20.0.5"          # inside 10.20.0.0/16: port 9092 allowed
OTHER4 = "10.40.0.5"            # outside every allowed CIDR
ALLOWED6 = "fd00:20::5"         # inside [fd00:20::/64]:9092
OTHER6 = "fd00:40::5"
NAMESERVER = "10.96.0.10"       # the pod's resolv.conf nameserver
OTHER_DNS = "10.97.0.10"        # a DNS server the pod was not configured with
ALLOW = "10.20.0.0/16:9092,[fd00:20::/64]:9092"
APP = {"uid": 1000, "gid": 1000}
PROXY = {"uid": 1337, "gid": 1337}


# UDP client: argv[1] = JSON list of [mode, host, port]. Modes: "sendto" (unconnected socket),
# "connect" (connect + send + recv), "connect3" (connect, then three send/recv rounds); a "lite-" prefix
# uses UDP-Lite. A host "::ffff:a.b.c.d" uses an AF_INET6 socket (v4-mapped). Prints a JSON list of
# outcomes. Bounded: 2 s each.
UDP_CLIENT = r"""
import errno, json, socket, sys
def probe(mode, host, port):
    proto = 136 if mode.startswith("lite-") else socket.IPPROTO_UDP
    mode = mode.removeprefix("lite-")
    try:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM, proto)
    except OSError as exc:   # the guard refuses UDP-Lite sockets at socket() (sock_create.c)
        return {"outcome": "eperm" if exc.errno == errno.EPERM else "error", "errno": exc.errno}
    s.settimeout(2.0)
    try:
        if mode == "sendto":
            s.sendto(b"ping", (host, port))
            return {"outcome": "ok", "reply": json.loads(s.recvfrom(2048)[0])}
        s.connect((host, port))
        replies = []
        for _ in range(3 if mode == "connect3" else 1):
            s.send(b"ping")
            replies.append(json.loads(s.recv(2048)))
        return {"outcome": "ok", "reply": replies[0], "replies": len(replies)}
    except socket.timeout:
        return {"outcome": "timeout"}
    except OSError as exc:
        return {"outcome": "eperm" if exc.errno == errno.EPERM else "error", "errno": exc.errno}
    finally:
        s.close()
print(json.dumps([probe(*p) for p in json.loads(sys.argv[1])[:200]]), flush=True)
"""


def udp(pod, probes: list, ident: dict = APP) -> list[str]:
    """Outcome per probe: the answering server's name, or eperm/timeout/error."""
    res = pod.run([PYTHON, "-c", UDP_CLIENT, json.dumps(probes)], timeout=60, **ident)
    assert res.returncode == 0, res.stderr
    out = []
    for o in json.loads(res.stdout):
        out.append(o["reply"]["server"] if o["outcome"] == "ok" else o["outcome"])
        if o.get("replies") not in (None, 3) and probes[len(out) - 1][0] == "connect3":
            out[-1] += f"/{o['replies']}"
    return out


def dns(pod, probes: list, ident: dict = APP) -> list:
    """probe_batch's DNS probes: the A answer, or the failure outcome."""
    res = pod.run([PYTHON, PROBE_BATCH, json.dumps(probes)], timeout=60, **ident)
    assert res.returncode == 0, res.stderr
    return [o.get("answer") if o["outcome"] == "ok" else o["outcome"] for o in json.loads(res.stdout)]


def start(proc) -> None:
    line = proc.stdout.readline().strip()
    assert line == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")


def in_private_resolv_conf(path: str) -> list[str]:
    """Command prefix: the agent sees `path` as /etc/resolv.conf (a private mount namespace), as the
    pod's init container sees the pod's resolv.conf."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', path]


@contextmanager
def guarded_pod(bpffs, extra_args: list[str], resolv_conf: str = f"nameserver {NAMESERVER}\n"):
    """A pod with servers in its cluster netns and the agent set up with `extra_args`; yields (pod, name,
    setup) where setup(args) re-runs the agent's setup for this pod with other args."""
    name = f"udp-{secrets.token_hex(4)}"
    with Pod("udpg") as pod, tempfile.NamedTemporaryFile("w", prefix="bpfinit-resolv-", suffix=".conf") as rc:
        for addr in (ALLOWED4, OTHER4, ALLOWED6, OTHER6, NAMESERVER, OTHER_DNS):
            pod.cluster.add_address(addr)
        binds = [[a, p] for a in (ALLOWED4, OTHER4, ALLOWED6, OTHER6) for p in (9092, 9093)]
        start(pod.peer_popen([PYTHON, "-c", UDP_SERVER, "peer", "120", json.dumps(binds)]))
        for addr, answer in ((NAMESERVER, "10.0.0.53"), (OTHER_DNS, "10.0.0.97")):
            start(pod.peer_popen([PYTHON, DNSSERVER, "--bind", addr, "--port", "53", "--answer", answer,
                                  "--timeout", "120"]))
        rc.write(resolv_conf)
        rc.flush()

        def setup(args: list[str]) -> None:
            r = run_agent(["setup", "-i", "*", *args, "--cgroup", str(pod.cgroup), "--bpffs", str(bpffs),
                           "--netns", pod.netns_path],
                          env_extra={"POD_NAME": name, "POD_NAMESPACE": "egress-udp", "POD_UID": name},
                          prefix=in_private_resolv_conf(rc.name))
            assert r.returncode == 0, r.stderr
        setup(extra_args)
        # the session's ring buffer may be full of earlier tests' events: read them out so ours fit
        assert run_agent(["observe", "--bpffs", str(bpffs), "-o", "json"]).returncode == 0
        try:
            yield pod, name, setup
        finally:
            run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


def denied_flows(bpffs, name: str) -> list[tuple]:
    return _denied_flows(bpffs, f"egress-udp/{name}")


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-pod", "dual-stack-pod"])
def test_udp_outside_the_allow_list_is_eperm_and_counted(build, bpffs, dual_stack):
    """sendto and connect, IPv4 / IPv6 / v4-mapped: allowed destinations are reached, the rest is EPERM,
    and each denial is counted exactly once (a connected socket's sends are not decided again)."""
    args = ["--egress-allow", ALLOW] + (["--dual-stack"] if dual_stack else [])
    with guarded_pod(bpffs, args) as (pod, name, _):
        got = udp(pod, [
            ["sendto", ALLOWED4, 9092], ["connect3", ALLOWED4, 9092],            # allowed: reach the peer
            ["sendto", ALLOWED6, 9092], ["connect3", ALLOWED6, 9092],
            ["sendto", f"::ffff:{ALLOWED4}", 9092], ["connect3", f"::ffff:{ALLOWED4}", 9092],
            ["sendto", ALLOWED4, 9093], ["connect", ALLOWED4, 9093],              # allowed CIDR, other port
            ["sendto", OTHER4, 9092], ["connect", OTHER4, 9092],                  # other CIDR
            ["sendto", ALLOWED6, 9093], ["connect", OTHER6, 9092],
            ["sendto", f"::ffff:{OTHER4}", 9092], ["connect", f"::ffff:{ALLOWED4}", 9093],
        ])
        assert got == ["peer"] * 6 + ["eperm"] * 8
        # UDP-Lite's connect runs no hook, so the guard refuses its sockets at socket() (sock_create.c)
        assert udp(pod, [["lite-sendto", ALLOWED4, 9092], ["lite-sendto", OTHER6, 9092],
                         ["lite-sendto", f"::ffff:{ALLOWED4}", 9093]]) == ["eperm", "eperm", "eperm"]
        assert pod_rows(bpffs, name) == {("OUTBOUND", "DENIED", "egress_policy"): 8,
                                         ("OUTBOUND", "DENIED", "socket_type"): 3}
        assert sorted(denied_flows(bpffs, name)) == sorted([
            ("socket_type", "UDPLite", "0.0.0.0", 0), ("socket_type", "UDPLite", "::", 0),
            ("socket_type", "UDPLite", "::", 0),
            ("egress_policy", "UDP", ALLOWED4, 9093), ("egress_policy", "UDP", ALLOWED4, 9093),
            ("egress_policy", "UDP", OTHER4, 9092), ("egress_policy", "UDP", OTHER4, 9092),
            ("egress_policy", "UDP", ALLOWED6, 9093), ("egress_policy", "UDP", OTHER6, 9092),
            ("egress_policy", "UDP", OTHER4, 9092), ("egress_policy", "UDP", ALLOWED4, 9093),
        ])


def test_udp_exemptions_proxy_local_and_nameservers(build, bpffs):
    """The proxy's uid sends anywhere; loopback and the pod's own addresses are never checked; DNS to the
    resolv.conf nameserver (UDP sendto, connected UDP, TCP) works with DNS capture off while another DNS
    server is EPERM. Nothing but the denials is counted."""
    with guarded_pod(bpffs, ["-x", "10.96.0.0/16", "--egress-allow", ALLOW]) as (pod, name, _):
        local = [["127.0.0.1", 5353], ["::1", 5353], [pod.addr4, 5354], [pod.addr6, 5354]]
        start(pod.popen([PYTHON, "-c", UDP_SERVER, "local", "120", json.dumps(local)], **APP))
        assert udp(pod, [["sendto", OTHER4, 9093], ["connect", OTHER6, 9093],
                         ["sendto", f"::ffff:{OTHER4}", 9092]], PROXY) == ["peer"] * 3
        assert udp(pod, [["sendto", "127.0.0.1", 5353], ["connect", "::1", 5353],
                         ["sendto", "::ffff:127.0.0.1", 5353], ["sendto", pod.addr4, 5354],
                         ["connect3", pod.addr6, 5354]]) == ["local"] * 5
        assert dns(pod, [["dns-udp", NAMESERVER, 53, None], ["dns-udpc", NAMESERVER, 53, None],
                         ["dns-tcp", NAMESERVER, 53, None],                 # -x: a TCP bypass, exempt too
                         ["dns-udp", OTHER_DNS, 53, None], ["dns-udpc", OTHER_DNS, 53, None]]) == \
            ["10.0.0.53"] * 3 + ["eperm"] * 2
        assert dns(pod, [["dns-udp", OTHER_DNS, 53, None]], PROXY) == ["10.0.0.97"]
        rows = pod_rows(bpffs, name)
        assert rows.pop(("OUTBOUND", "DENIED", "egress_policy")) == 2
        # the local server's four UDP-Lite sockets were refused at socket() (sock_create.c)
        assert rows.pop(("OUTBOUND", "DENIED", "socket_type")) == 4
        # what is left are the TCP decisions of the one TCP query (a counted bypass) and nothing for UDP
        assert rows == {("OUTBOUND", "BYPASSED", "excluded_cidr"): 1}
        assert [f for f in denied_flows(bpffs, name) if f[0] != "socket_type"] == \
            [("egress_policy", "UDP", OTHER_DNS, 53)] * 2


def test_dns_capture_still_redirects_nameserver_queries_under_the_guard(build, bpffs):
    """With --redirect-dns the nameserver's queries go to the DNS proxy on 15053 as before; a port-53
    datagram to a server that is not in resolv.conf is a plain UDP bypass: EPERM."""
    with guarded_pod(bpffs, ["--redirect-dns", "--egress-allow", ALLOW]) as (pod, name, _):
        start(pod.popen([PYTHON, DNSSERVER, "--bind", "127.0.0.1", "--port", "15053", "--answer", "10.0.0.15",
                         "--timeout", "120"], **PROXY))
        assert dns(pod, [["dns-udp", NAMESERVER, 53, None], ["dns-udpc", NAMESERVER, 53, None],
                         ["dns-udp", OTHER_DNS, 53, None]]) == ["10.0.0.15", "10.0.0.15", "eperm"]
        assert pod_rows(bpffs, name) == {("DNS", "REDIRECTED", "dns"): 2,
                                         ("OUTBOUND", "DENIED", "egress_policy"): 1}


def test_udp_without_the_guard_is_untouched(build, bpffs):
    """No --egress-allow: UDP goes wherever the application sends it, and nothing is counted."""
    with guarded_pod(bpffs, ["-x", "10.40.0.0/16"]) as (pod, name, _):
        assert udp(pod, [["sendto", OTHER4, 9093], ["connect", OTHER6, 9092],
                         ["sendto", f"::ffff:{ALLOWED4}", 9093]]) == ["peer"] * 3
        assert dns(pod, [["dns-udp", OTHER_DNS, 53, None]]) == ["10.0.0.97"]
        assert pod_rows(bpffs, name) == {}


def test_tcp_guard_exempts_local_destinations_and_guards_ipv6_of_an_ipv4_pod(build, bpffs):
    """TCP: an -o port to 127.0.0.1 is a local connection, not egress (rule 7 comes before the loopback
    rule, so the guard must not see it as a bypass); an IPv4 pod's IPv6 connects are never captured and
    so checked like every other bypass."""
    with guarded_pod(bpffs, ["-o", "5432", "--egress-allow", ALLOW]) as (pod, name, _):
        start(pod.popen([PYTHON, PROBE, "serve", "--name", "db", "--bind", "127.0.0.1", "--port", "5432"], **APP))
        start(pod.peer_popen([PYTHON, PROBE, "serve", "--name", "peer6", "--bind", "::", "--port", "9092"]))
        outcomes = []
        for host, port, ident in (("127.0.0.1", 5432, APP), (ALLOWED6, 9092, APP), (OTHER6, 9092, APP),
                                  (OTHER6, 9092, PROXY)):
            res = pod.run([PYTHON, PROBE, "connect", host, str(port)], **ident)
            o = json.loads(res.stdout)
            outcomes.append(o["reply"]["server"] if o["outcome"] == "ok" else o["outcome"])
        assert outcomes == ["db", "peer6", "eperm", "peer6"]
        assert denied_flows(bpffs, name) == [("egress_policy", "TCP", OTHER6, 9092)]


# Holds a connected UDP socket across a policy change: argv[1] host, argv[2] port. Sends once, prints
# READY, then sends once more per line on stdin (at most 5) and prints the outcome of each.
CONNECTED_CLIENT = r"""
import errno, json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
def once():
    try:
        s.send(b"ping")
        return json.loads(s.recv(2048))["server"]
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return "eperm" if exc.errno == errno.EPERM else f"errno{exc.errno}"
s.connect((host, port))
print(once(), flush=True)
for _ in range(5):
    if not sys.stdin.readline():
        break
    print(once(), flush=True)
"""


def test_connected_udp_socket_keeps_its_connect_time_decision(build, bpffs):
    """connect() decides a connected socket's datagrams once, for AF_INET and for an AF_INET6 socket with a
    v4-mapped peer alike (the kernel runs sendmsg4 on every send of the latter): a re-run of setup with a
    narrower list leaves such sockets working, counts nothing for them, and denies new sends."""
    with guarded_pod(bpffs, ["--egress-allow", ALLOW]) as (pod, name, setup):
        clients = [pod.popen([PYTHON, "-c", CONNECTED_CLIENT, host, "9092"], stdin=-1, **APP)
                   for host in (ALLOWED4, f"::ffff:{ALLOWED4}")]
        try:
            assert [c.stdout.readline().strip() for c in clients] == ["peer", "peer"]
            setup(["--egress-allow", "10.30.0.0/16"])
            after = []
            for c in clients:
                c.stdin.write("\n")
                c.stdin.flush()
                after.append(c.stdout.readline().strip())
            assert after == ["peer", "peer"]
        finally:
            for c in clients:
                c.stdin.close()
                c.wait(timeout=10)
        assert udp(pod, [["sendto", ALLOWED4, 9092], ["connect", f"::ffff:{ALLOWED4}", 9092]]) == ["eperm"] * 2
        assert pod_rows(bpffs, name) == {("OUTBOUND", "DENIED", "egress_policy"): 2}


# ICMP echo through a ping socket (SOCK_DGRAM, IPPROTO_ICMP): argv[1] = JSON list of [mode, host] with
# mode "sendto" or "connect". Prints the outcome of each (reply / eperm / timeout). Bounded: 2 s each.
PING_CLIENT = r"""
import errno, json, socket, struct, sys
def probe(mode, host):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    s.settimeout(2.0)
    echo = struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"bpfinit"
    try:
        if mode == "connect":
            s.connect((host, 0))
            s.send(echo)
        else:
            s.sendto(echo, (host, 0))
        return "reply" if s.recv(2048)[0] == 0 else "other"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return "eperm" if exc.errno == errno.EPERM else f"errno{exc.errno}"
    finally:
        s.close()
print(json.dumps([probe(*p) for p in json.loads(sys.argv[1])[:20]]), flush=True)
"""


def test_icmp_is_not_covered_by_the_guard(build, bpffs):
    """The documented limit: ping sockets run the connect hook but not the sendmsg hook, so the guard
    checks their connect (sock_create.c; more in test_egress_sockets.py) and not their sendto; UDP to the
    same address is EPERM."""
    with guarded_pod(bpffs, ["--egress-allow", ALLOW]) as (pod, name, _):
        pod.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"], check=True)
        res = pod.run([PYTHON, "-c", PING_CLIENT, json.dumps([["sendto", OTHER4], ["connect", OTHER4]])],
                      **APP)
        assert json.loads(res.stdout) == ["reply", "eperm"], res.stderr
        assert udp(pod, [["sendto", OTHER4, 9092]]) == ["eperm"]
        assert pod_rows(bpffs, name) == {("OUTBOUND", "DENIED", "egress_policy"): 2}
