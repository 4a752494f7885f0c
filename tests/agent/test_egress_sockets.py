"""Egress guard, socket kinds (bpf/sock_create.c), on the real kernel.

The guard's destination checks run in the connect/sendmsg hooks, which the kernel runs only for TCP (and
MPTCP, whose first subflow is TCP), UDP and ping sockets. With --egress-allow every other AF_INET/AF_INET6
socket (SOCK_RAW, UDP-Lite, SCTP...) is refused at socket() with EPERM and one DENIED/socket_type;
connected ping sockets are checked against the allow-list (ICMP matches only items without a port limit).
The proxy's uid/gid is exempt, and without the guard nothing changes. Every address lives in namespaces
the test creates; every server exits on its own after a bound.
"""
from __future__ import annotations

import errno
import json
import secrets
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.agent.conftest import PYTHON, REPO, UDP_SERVER, denied_flows as _denied_flows, pod_rows, run_agent
from tests.podenv import Pod

pytestmark = pytest.mark.kernel
PROBE = REPO / "tests" / "probe.py"
NAMESPACE = "egress-sockets"

ALLOWED4 = "10.20.0.5"       # 10.20.0.0/16:9092 (a port item: ICMP does not match it)
ICMP_OK4 = "10.30.0.5"       # 10.30.0.0/16 (no port: every port, and ICMP)
OTHER4 = "10.40.0.5"         # in no item
ALLOWED6 = "fd00:20::5"
ICMP_OK6 = "fd00:30::5"
OTHER6 = "fd00:40::5"
ALLOW = "10.20.0.0/16:9092,10.30.0.0/16,[fd00:20::/64]:9092,[fd00:30::/64]"
APP = {"uid": 1000, "gid": 1000}
PROXY = {"uid": 1337, "gid": 1337}
# the proxy uid with CAP_NET_RAW (as root it would have it anyway): raw sockets need the capability
PROXY_WITH_NET_RAW = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "--inh-caps=+net_raw",
                      "--ambient-caps=+net_raw", "--"]

IPPROTO_UDPLITE, IPPROTO_SCTP, IPPROTO_MPTCP = 136, 132, 262

# socket() probes: argv[1] = JSON list of [family "4"/"6", type name, protocol]. Prints one outcome each:
# "ok", "eperm", or "errno<N>".
SOCKET_CLIENT = r"""
import errno, json, socket, sys
AF = {"4": socket.AF_INET, "6": socket.AF_INET6, "packet": socket.AF_PACKET}
TYPE = {"stream": 1, "dgram": 2, "raw": 3, "seqpacket": 5}
def probe(fam, kind, proto):
    try:
        socket.socket(AF[fam], TYPE[kind], proto).close()
        return "ok"
    except OSError as exc:
        return "eperm" if exc.errno == errno.EPERM else f"errno{exc.errno}"
print(json.dumps([probe(*p) for p in json.loads(sys.argv[1])[:50]]), flush=True)
"""

# Traffic probes: argv[1] = JSON list of [mode, host, port]. Modes: "tcp"/"mptcp" (connect, read the
# server's line), "udp"/"udplite" (connect, send, recv), "ping-connect"/"ping-sendto" (ICMP echo through a
# ping socket), "raw-icmp" (echo through a raw socket). Prints the answering server's name, "reply" for
# an echo reply, or eperm/timeout/errno<N>. Bounded: 2 s each.
TRAFFIC_CLIENT = r"""
import errno, json, socket, struct, sys, time
def echo(v6):
    return struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, 1) + b"bpfinit!"   # even length: checksum words
def raw_icmp(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(2.0)
    e = bytearray(echo(False))
    csum = sum(struct.unpack("!%dH" % (len(e) // 2), e))
    csum = (csum >> 16) + (csum & 0xffff); csum += csum >> 16
    struct.pack_into("!H", e, 2, ~csum & 0xffff)
    s.sendto(bytes(e), (host, 0))
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:          # the raw socket sees every ICMP packet: find the reply
        pkt, peer = s.recvfrom(2048)
        if peer[0] == host and pkt[(pkt[0] & 15) * 4] == 0:
            return "reply"
    return "timeout"
def probe(mode, host, port):
    v6 = ":" in host
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    try:
        if mode == "raw-icmp":
            return raw_icmp(host)
        if mode in ("tcp", "mptcp"):
            s = socket.socket(fam, socket.SOCK_STREAM, 262 if mode == "mptcp" else 0)
            s.settimeout(2.0)
            s.connect((host, port))
            return json.loads(s.makefile().readline())["server"]
        if mode in ("udp", "udplite"):
            s = socket.socket(fam, socket.SOCK_DGRAM, 136 if mode == "udplite" else 0)
            s.settimeout(2.0)
            s.connect((host, port))
            s.send(b"ping")
            return json.loads(s.recv(2048))["server"]
        s = socket.socket(fam, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        s.settimeout(2.0)
        if mode == "ping-connect":
            s.connect((host, 0))
            s.send(echo(v6))
        else:
            s.sendto(echo(v6), (host, 0))
        return "reply" if s.recv(2048)[0] in (0, 129) else "other"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return "eperm" if exc.errno == errno.EPERM else f"errno{exc.errno}"
print(json.dumps([probe(*p) for p in json.loads(sys.argv[1])[:50]]), flush=True)
"""



def kernel_has_sctp() -> bool:
    protocols = Path("/proc/net/protocols").read_text().split("\n")[1:]
    return any(line.split()[:1] == ["SCTP"] for line in protocols)


def start(proc) -> None:
    line = proc.stdout.readline().strip()
    assert line == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")


def sockets(pod, probes: list, prefix: list[str] | None = None, **ident) -> list[str]:
    res = pod.run([*(prefix or []), PYTHON, "-c", SOCKET_CLIENT, json.dumps(probes)], timeout=60, **ident)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def traffic(pod, probes: list, prefix: list[str] | None = None, **ident) -> list[str]:
    res = pod.run([*(prefix or []), PYTHON, "-c", TRAFFIC_CLIENT, json.dumps(probes)], timeout=120, **ident)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@contextmanager
def sockets_pod(bpffs, extra_args: list[str]):
    """A pod whose cluster serves TCP/MPTCP (9092), UDP and UDP-Lite (9092) and ICMP on the test
    addresses, set up with `-i * -x 10.0.0.0/8` (10/8 bypasses the proxy, so the guard decides it; the
    pod is IPv4 for istio, so its IPv6 is never captured) plus `extra_args`; yields (pod, name)."""
    name = f"sock-{secrets.token_hex(4)}"
    with Pod("sockg") as pod:
        addrs = (ALLOWED4, ICMP_OK4, OTHER4, ALLOWED6, ICMP_OK6, OTHER6)
        for addr in addrs:
            pod.cluster.add_address(addr)
        start(pod.peer_popen([PYTHON, "-c", UDP_SERVER, "peer", "120", json.dumps([[a, 9092] for a in addrs])]))
        start(pod.peer_popen([PYTHON, PROBE, "serve", "--name", "peer", "--bind", "::", "--port", "9092",
                              "--timeout", "120"]))
        # ping sockets for every gid in this netns (the sysctl is per netns); root and the proxy use it too
        pod.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"], check=True)
        r = run_agent(["setup", "-i", "*", "-x", "10.0.0.0/8", *extra_args, "--cgroup", str(pod.cgroup),
                       "--bpffs", str(bpffs), "--netns", pod.netns_path],
                      env_extra={"POD_NAME": name, "POD_NAMESPACE": NAMESPACE, "POD_UID": name})
        assert r.returncode == 0, r.stderr
        # the session's ring buffer may hold earlier tests' events: read them out so ours fit
        assert run_agent(["observe", "--bpffs", str(bpffs), "-o", "json"]).returncode == 0
        try:
            yield pod, name
        finally:
            run_agent(["cleanup", "--bpffs", str(bpffs), "--netns", pod.netns_path])


def denied_flows(bpffs, name: str) -> list[tuple]:
    return _denied_flows(bpffs, f"{NAMESPACE}/{name}", ip_version=True)


# (family, type, protocol) -> what a pod with the guard gets from socket(), as root (CAP_NET_RAW)
REFUSED = [
    ("4", "raw", 1), ("6", "raw", 58), ("4", "raw", 255), ("4", "raw", 6), ("6", "raw", 17),
    ("4", "dgram", IPPROTO_UDPLITE), ("6", "dgram", IPPROTO_UDPLITE),
]
ORDINARY = [
    ("4", "stream", 0), ("4", "stream", 6), ("6", "stream", 0), ("6", "stream", 6),
    ("4", "dgram", 0), ("4", "dgram", 17), ("6", "dgram", 0), ("6", "dgram", 17),
    ("4", "dgram", 1), ("6", "dgram", 58),                                           # ping sockets
    ("4", "stream", IPPROTO_MPTCP), ("6", "stream", IPPROTO_MPTCP),                  # connect4/6 run for it
]
SCTP = [("4", "stream", IPPROTO_SCTP), ("4", "seqpacket", IPPROTO_SCTP), ("6", "stream", IPPROTO_SCTP)]


def test_guard_refuses_socket_kinds_no_connect_hook_sees(build, bpffs):
    """Raw sockets (root has CAP_NET_RAW) and UDP-Lite fail with EPERM at socket(), each counted once as
    DENIED/socket_type with the protocol asked for; TCP, UDP, ping and MPTCP sockets are created as
    before. SCTP: see test_sctp_socket_creation_fails_either_way."""
    with sockets_pod(bpffs, ["--egress-allow", ALLOW]) as (pod, name):
        assert sockets(pod, REFUSED) == ["eperm"] * len(REFUSED)
        assert sockets(pod, REFUSED[-2:], **APP) == ["eperm"] * 2      # UDP-Lite needs no capability
        assert sockets(pod, ORDINARY) == ["ok"] * len(ORDINARY)
        assert sockets(pod, ORDINARY, **APP) == ["ok"] * len(ORDINARY)
        # the documented gap: AF_PACKET runs no inet hook (drop NET_RAW to close it)
        assert sockets(pod, [("packet", "raw", 0), ("packet", "dgram", 0)]) == ["ok", "ok"]
        assert pod_rows(bpffs, name) == {("OUTBOUND", "DENIED", "socket_type"): len(REFUSED) + 2}
        assert sorted(denied_flows(bpffs, name)) == sorted([
            ("socket_type", "ICMPv4", "IPv4", "0.0.0.0", 0), ("socket_type", "ICMPv6", "IPv6", "::", 0),
            ("socket_type", "255", "IPv4", "0.0.0.0", 0), ("socket_type", "TCP", "IPv4", "0.0.0.0", 0),
            ("socket_type", "UDP", "IPv6", "::", 0),
        ] + [("socket_type", "UDPLite", "IPv4", "0.0.0.0", 0), ("socket_type", "UDPLite", "IPv6", "::", 0)] * 2)


def test_sctp_socket_creation_fails_either_way(build, bpffs):
    """This kernel has no SCTP (no module can be loaded here), so socket() fails before any cgroup hook
    with EPROTONOSUPPORT/ESOCKTNOSUPPORT, guard or not. Were SCTP present, the guard would refuse it with
    EPERM (it is neither TCP, UDP nor ping), and that is what this test then expects."""
    for args in (["--egress-allow", ALLOW], []):
        with sockets_pod(bpffs, args) as (pod, name):
            got = sockets(pod, SCTP)
            if kernel_has_sctp():
                assert got == (["eperm"] * len(SCTP) if args else ["ok"] * len(SCTP))
            else:
                assert got == [f"errno{errno.EPROTONOSUPPORT}", f"errno{errno.ESOCKTNOSUPPORT}",
                               f"errno{errno.EPROTONOSUPPORT}"]
                assert pod_rows(bpffs, name) == {}


def test_without_the_guard_raw_and_udplite_work(build, bpffs):
    """No --egress-allow: a raw ICMP socket pings a cluster address, UDP-Lite connects and exchanges a
    datagram, and nothing is counted for them (socket creation or ICMP)."""
    with sockets_pod(bpffs, []) as (pod, name):
        assert sockets(pod, REFUSED) == ["ok"] * len(REFUSED)
        assert traffic(pod, [["raw-icmp", OTHER4, 0], ["udplite", OTHER4, 9092], ["udplite", OTHER6, 9092],
                             ["ping-connect", OTHER4, 0], ["ping-connect", OTHER6, 0]]) == \
            ["reply", "peer", "peer", "reply", "reply"]
        assert pod_rows(bpffs, name) == {}


def test_proxy_identity_is_exempt(build, bpffs):
    """The proxy uid (with CAP_NET_RAW for raw sockets) creates every kind and pings anywhere, as on the
    guard's other paths; the same calls by the app are refused. Only the app's refusals count."""
    with sockets_pod(bpffs, ["--egress-allow", ALLOW]) as (pod, name):
        assert sockets(pod, REFUSED, prefix=PROXY_WITH_NET_RAW) == ["ok"] * len(REFUSED)
        assert traffic(pod, [["raw-icmp", OTHER4, 0], ["udplite", OTHER4, 9092], ["ping-connect", OTHER4, 0],
                             ["ping-connect", OTHER6, 0]], prefix=PROXY_WITH_NET_RAW) == \
            ["reply", "peer", "reply", "reply"]
        assert sockets(pod, [("4", "dgram", IPPROTO_UDPLITE)], **PROXY) == ["ok"]   # by uid alone
        assert traffic(pod, [["udplite", OTHER4, 9092], ["ping-connect", OTHER4, 0]], **APP) == ["eperm"] * 2
        assert pod_rows(bpffs, name) == {("OUTBOUND", "DENIED", "socket_type"): 1,
                                         ("OUTBOUND", "DENIED", "egress_policy"): 1}


def test_connected_ping_sockets_follow_the_allow_list(build, bpffs):
    """ICMP has no port: a ping connect() is allowed by an item without a port limit that contains the
    destination (10.30.0.0/16, [fd00:30::/64]), not by a port item (10.20.0.0/16:9092). Local destinations
    pass. sendto() on a ping socket runs no hook: that stays the documented gap."""
    with sockets_pod(bpffs, ["--egress-allow", ALLOW]) as (pod, name):
        got = traffic(pod, [
            ["ping-connect", ICMP_OK4, 0], ["ping-connect", ICMP_OK6, 0],           # no-port items: allowed
            ["ping-connect", "127.0.0.1", 0], ["ping-connect", "::1", 0],             # in the pod
            ["ping-connect", pod.addr4, 0], ["ping-connect", pod.addr6, 0],
            ["ping-connect", ALLOWED4, 0], ["ping-connect", ALLOWED6, 0],             # port items only
            ["ping-connect", OTHER4, 0], ["ping-connect", OTHER6, 0],                 # in no item
            ["ping-sendto", OTHER4, 0], ["ping-sendto", OTHER6, 0],                   # the gap
        ], **APP)
        assert got == ["reply"] * 6 + ["eperm"] * 4 + ["reply"] * 2
        # TCP and UDP to the port item are unaffected by the ICMP rule
        assert traffic(pod, [["tcp", ALLOWED4, 9092], ["udp", ALLOWED6, 9092]], **APP) == ["peer", "peer"]
        assert pod_rows(bpffs, name) == {("OUTBOUND", "DENIED", "egress_policy"): 4,
                                         ("OUTBOUND", "BYPASSED", "excluded_cidr"): 1}
        assert sorted(denied_flows(bpffs, name)) == sorted([
            ("egress_policy", "ICMPv4", "IPv4", ALLOWED4, 0), ("egress_policy", "ICMPv6", "IPv6", ALLOWED6, 0),
            ("egress_policy", "ICMPv4", "IPv4", OTHER4, 0), ("egress_policy", "ICMPv6", "IPv6", OTHER6, 0),
        ])


def test_mptcp_connects_are_guarded_as_tcp(build, bpffs):
    """MPTCP sockets are allowed because the connect hook demonstrably runs for them (on the first
    subflow, a TCP socket): a bypassing MPTCP connect outside the list is EPERM and counted as TCP, one
    inside it reaches the peer, exactly like plain TCP."""
    with sockets_pod(bpffs, ["--egress-allow", ALLOW]) as (pod, name):
        got = traffic(pod, [["mptcp", ALLOWED4, 9092], ["mptcp", ALLOWED6, 9092], ["mptcp", OTHER4, 9092],
                            ["mptcp", OTHER6, 9092], ["tcp", OTHER4, 9092]], **APP)
        assert got == ["peer", "peer", "eperm", "eperm", "eperm"]
        # the pod is IPv4 for istio: its IPv6 is never captured, and only denials of it are counted
        assert pod_rows(bpffs, name) == {("OUTBOUND", "DENIED", "egress_policy"): 3,
                                         ("OUTBOUND", "BYPASSED", "excluded_cidr"): 1}
        assert sorted(denied_flows(bpffs, name)) == sorted([
            ("egress_policy", "TCP", "IPv4", OTHER4, 9092), ("egress_policy", "TCP", "IPv4", OTHER4, 9092),
            ("egress_policy", "TCP", "IPv6", OTHER6, 9092),
        ])
