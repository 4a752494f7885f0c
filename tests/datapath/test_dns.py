"""DNS capture on the real kernel: dig in the pod, a real DNS server in the peer netns, a stand-in
DNS proxy on 127.0.0.1:15053 / [::1]:15053. No NAT rule anywhere."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from initagent import dns
from initagent.flags import parse
from tests.podenv import Pod, bpffs_mount

pytestmark = pytest.mark.kernel
DNSSERVER = str(Path(__file__).resolve().parent / "dnsserver.py")
PY = sys.executable
REAL, PROXY = "10.53.0.1", "10.53.0.2"


# getpeername() of a TCP and a connected UDP socket to the server: the server, as with iptables' NAT
PEERS = r"""
import socket, sys
host = sys.argv[1]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
seen = []
for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
    with socket.socket(fam, kind) as s:
        s.settimeout(5)
        s.connect((host, 53))
        seen.append("%s:%d" % s.getpeername()[:2])
print(" ".join(seen))
"""


def start(popen, bind, port, ans):
    proc = popen([PY, DNSSERVER, "--bind", bind, "--port", str(port), "--answer", ans, "--timeout", "60"])
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    return proc


def dig(pod, server, *extra, uid=None):
    assert shutil.which("dig"), "dig is missing (dnsutils)"
    res = pod.run(["dig", "+time=2", "+tries=1", f"@{server}", "svc.test", "A", *extra], uid=uid, gid=uid)
    return res.stdout + res.stderr


def answer_of(out: str) -> str:
    lines = [l for l in out.splitlines() if "\tIN\tA\t" in l or " IN A " in l]
    return lines[0].split()[-1] if lines else ""


def stop(*procs):
    for p in procs:
        p.terminate()
        p.wait(timeout=5)


@pytest.mark.parametrize("capture_all", [False, True])
def test_dns_to_nameserver_goes_to_dns_proxy_and_looks_like_the_server(datapath, capture_all):
    args = ["-b", "*", "--redirect-dns"] + (["--capture-all-dns"] if capture_all else [])
    with bpffs_mount() as bpffs, Pod("dns") as pod:
        cfg = parse(args, {"ISTIO_DUAL_STACK": "true"})
        resolv = f"nameserver {pod.peer_addr4}\nnameserver {pod.peer_addr6}\n"
        p = dns.plan(cfg, resolv)
        assert p.enabled
        datapath.attach_pod(pod, cfg, 21 + capture_all, bpffs, dns_plan=p)
        real4 = start(pod.peer_popen, pod.peer_addr4, 53, REAL)
        real6 = start(pod.peer_popen, pod.peer_addr6, 53, REAL)
        other = start(pod.peer_popen, "10.250.0.1", 5353, REAL)
        proxy4 = start(lambda c: pod.popen(c, uid=1337, gid=1337), "127.0.0.1", 15053, PROXY)
        proxy6 = start(lambda c: pod.popen(c, uid=1337, gid=1337), "::1", 15053, PROXY)
        try:
            for server in (pod.peer_addr4, pod.peer_addr6):
                for mode in ((), ("+tcp",)):
                    out = dig(pod, server, *mode)
                    assert answer_of(out) == PROXY, out
                    assert "unexpected source" not in out, out     # recvmsg shows the original server
                    assert f"SERVER: {server}#53" in out, out
                res = pod.run([PY, "-c", PEERS, server], uid=1000, gid=1000)
                assert res.stdout.split() == [f"{server}:53"] * 2, res.stdout + res.stderr
            # the proxy's own upstream query is not captured
            out = dig(pod, pod.peer_addr4, uid=1337)
            assert answer_of(out) == REAL, out
            # port 53 elsewhere: captured only with --capture-all-dns
            pod.cluster.add_address("10.99.0.53")
            extra = start(pod.peer_popen, "10.99.0.53", 53, REAL)
            out = dig(pod, "10.99.0.53")
            assert answer_of(out) == (PROXY if capture_all else REAL), out
            stop(extra)
            # conntrack stays off in the pod: no nat table, no conntrack entries
            nft = pod.run(["nft", "list", "ruleset"]) if shutil.which("nft") else None
            if nft is not None:
                assert "nat" not in nft.stdout
        finally:
            stop(real4, real6, other, proxy4, proxy6)


def test_dns_capture_off_without_nameserver_like_istio():
    cfg = parse(["--redirect-dns"], {})
    p = dns.plan(cfg, "search x\n")
    assert not p.enabled and "no nameserver" in p.note
    assert dns.plan(parse(["--redirect-dns", "--capture-all-dns"], {}), "").enabled
    assert not dns.plan(parse(["--redirect-dns", "-o", "53"], {}), "nameserver 10.0.0.10\n").enabled
    assert dns.plan(parse([], {"ISTIO_META_DNS_CAPTURE": "true"}), "nameserver 10.0.0.10\n").enabled
    assert dns.parse_resolv_conf("nameserver 10.0.0.10 # c\nnameserver fe80::1%eth0\nnameserver bogus\n") == (
        __import__("ipaddress").ip_address("10.0.0.10"), __import__("ipaddress").ip_address("fe80::1"))
