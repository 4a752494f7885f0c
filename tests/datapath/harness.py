"""Stand-alone loader for the inbound/DNS/accel programs, used until (and besides) the agent core.

It compiles bpf/maps.h + events.h + sk_lookup.c + dns.c + accel.c with a minimal stand-in for the core
(pod_by_netns + bi_pod_of, a sockops and a connect4 that only call our functions) and attaches them to
a tests.podenv Pod. This exercises the kernel side of inbound capture, DNS and acceleration on the real
kernel before the shared unit exists.
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from initagent import bpfsys, headers, inbound

REPO = Path(__file__).resolve().parents[2]
BPF_DIR = REPO / "bpf"

def expand(path: Path) -> str:
    """Inline local #include "x" textually (bcc rewrites map calls only in the main text), resolving
    `#if __has_include("x")` against bpf/ first."""
    out = []
    for line in path.read_text().splitlines():
        inc = re.match(r'\s*#include\s+"([^"]+)"', line)
        has = re.match(r'\s*#if\s+__has_include\("([^"]+)"\)', line)
        if inc:
            out.append(expand(path.parent / inc.group(1)))
        elif has:
            out.append("#if " + ("1" if (path.parent / has.group(1)).exists() else "0"))
        else:
            out.append(line)
    return "\n".join(out)


def source() -> str:
    return expand(BPF_DIR / "bpfinit.c")


def map_update(fd: int, key: bytes, value: bytes) -> None:
    bpfsys.map_update(fd, key, value)


def netns_cookie(netns_path: str) -> int:
    """SO_NETNS_COOKIE of a socket opened inside the netns (setns via a short-lived child)."""
    import subprocess
    import sys
    code = ("import socket,struct;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "print(struct.unpack('Q',s.getsockopt(socket.SOL_SOCKET,71,8))[0])")
    out = subprocess.run(["nsenter", f"--net={netns_path}", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=20, check=True)
    return int(out.stdout.strip())


class Datapath:
    """Compiled programs + helpers to wire a Pod."""

    def __init__(self) -> None:
        from bcc import BPF, lib
        found = headers.find()          # the same header search as the agent
        os.environ.update(found.environ())
        self.BPF = BPF
        self.lib = lib
        self.b = BPF(text=source().encode(), cflags=list(found.cflags))
        self.sockops = self.b.load_func(b"bpfinit_sockops", BPF.SOCK_OPS)
        self.sk_lookup = self.b.load_func(b"bpfinit_sk_lookup", 30, attach_type=36)
        sa = BPF.CGROUP_SOCK_ADDR
        # (attach type, function): connect4/6 of the core, ours for UDP DNS, sendmsg/recvmsg, getsockopt, getpeername
        self.progs = [
            (10, self.b.load_func(b"bpfinit_connect4", sa, attach_type=10)),
            (11, self.b.load_func(b"bpfinit_connect6", sa, attach_type=11)),
            (14, self.b.load_func(b"bpfinit_sendmsg4", sa, attach_type=14)),
            (15, self.b.load_func(b"bpfinit_sendmsg6", sa, attach_type=15)),
            (19, self.b.load_func(b"bpfinit_recvmsg4", sa, attach_type=19)),
            (20, self.b.load_func(b"bpfinit_recvmsg6", sa, attach_type=20)),
            (21, self.b.load_func(b"bpfinit_getsockopt", 25, attach_type=21)),
            (29, self.b.load_func(b"bpfinit_getpeername4", sa, attach_type=29)),
            (30, self.b.load_func(b"bpfinit_getpeername6", sa, attach_type=30)),
        ]
        self.sk_msg = self.b.load_func(b"bpfinit_sk_msg", BPF.SK_MSG)
        self._sk_msg_attached = False

    def map_fd(self, name: str) -> int:
        if name in ("bi_listeners", "bi_accel_socks"):
            return self.lib.bpf_table_fd(self.b.module, name.encode())
        return self.b[name.encode()].map_fd

    def write_rows(self, rows) -> None:
        for name, key, value in rows:
            map_update(self.map_fd(name), key, value)

    def attach_pod(self, pod, cfg, pod_idx: int, bpffs: Path, dns_plan=None, accelerate: bool = False) -> None:
        """Write the pod's config (a stand-in for the core's podconfig) and attach everything."""
        from bcc import BPFAttachType
        from initagent import dns
        cookie = netns_cookie(pod.netns_path)
        flags = inbound.inbound_flags(cfg)
        if dns_plan is not None:
            flags |= dns.dns_flags(dns_plan)
            self.write_rows(dns.dns_rows(dns_plan, pod_idx))
        if accelerate:
            flags |= inbound.CFG_ACCELERATE
        if cfg.dual_stack:
            flags |= 1 << 3    # CFG_IPV6: istio programs ip6tables rules only for "IPv6" pods
        pod_cfg = struct.pack("<IIHHHHIIII8I", pod_idx, flags, cfg.proxy_port, cfg.inbound_capture_port,
                              cfg.inbound_tunnel_port, 15053, cfg.proxy_uids[0], cfg.proxy_gids[0],
                              0x0100007F, 0xFFFFFFFF, *([0] * 8))
        map_update(self.map_fd("pod_by_netns"), struct.pack("Q", cookie), pod_cfg)
        ids = [("pod_ids", inbound.id_key(pod_idx, 1, u), inbound.ONE) for u in cfg.proxy_uids]
        ids += [("pod_ids", inbound.id_key(pod_idx, 2, g), inbound.ONE) for g in cfg.proxy_gids]
        self.write_rows(ids)
        ifindex = interface_indexes(pod)
        addrs = [pod.addr4, pod.addr6] + list(getattr(pod, "extra_addrs", []))
        self.write_rows(inbound.inbound_entries(cfg, pod_idx, cookie, addrs, ifindex))
        if accelerate and not self._sk_msg_attached:
            self.BPF.attach_func(self.sk_msg, self.map_fd("bi_accel_socks"), BPFAttachType.SK_MSG_VERDICT)
            self._sk_msg_attached = True
        cg = os.open(str(pod.cgroup), os.O_RDONLY)
        try:
            self.BPF.attach_func(self.sockops, cg, BPFAttachType.CGROUP_SOCK_OPS, 2)
            for atype, fn in self.progs:
                self.BPF.attach_func(fn, cg, atype, 2)
        finally:
            os.close(cg)
        inbound.link_netns(self.sk_lookup.fd, pod.netns_path, str(bpffs / f"sk_lookup-{pod.name}"))

    def counters(self) -> dict:
        out: dict = {}
        for key, values in self.b[b"obs_counters"].items():
            k = (key.pod_idx, key.dir, key.verdict, key.reason)
            out[k] = out.get(k, 0) + sum(v.value for v in values)
        return out

    def close(self) -> None:
        self.b.cleanup()


def interface_indexes(pod) -> dict[str, int]:
    import json
    res = pod.ip("-j", "link", "show")
    return {link["ifname"]: link["ifindex"] for link in json.loads(res.stdout)}
