"""Inbound capture (sk_lookup) for one pod: the map entries it needs and the pinned netns link.

Pure part: `inbound_entries(...)` turns a CaptureConfig plus the pod's addresses and interface indexes
into (map name, key bytes, value bytes) rows for bpf/maps.h's inbound section; the layouts here mirror
the C structs there. Kernel part: `link_netns(...)` attaches the sk_lookup program to the pod netns with
BPF_LINK_CREATE (bcc has no API for it) and pins the link so it outlives the agent.

sk_lookup has no netns-cookie helper, so the pod is identified by the destination address (pod IPs are
unique on a node). Link-local addresses are left out (not unique); TCP to them is not captured.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping

AF_INET = 2
AF_INET6 = 10

# bpf/maps.h: core pod_cfg.flags bits this part owns, and the inbound section
CFG_DNS_CAPTURE = 1 << 5
CFG_CAPTURE_ALL_DNS = 1 << 6
CFG_ACCELERATE = 1 << 7
CFG_INBOUND_ALL = 1 << 8
CFG_INBOUND_LIST = 1 << 9
CFG_VIRT_IFACES = 1 << 16
PORT_IN_INCLUDE = 16
PORT_IN_EXCLUDE = 17
IFACE_EXCLUDE = 18
IFACE_VIRT = 19
CIDR_DNS_SERVER = 16
BI_ADDR_VIRT_TO_PROXY = 1

Row = tuple[str, bytes, bytes]
ONE = struct.pack("<I", 1)


class InboundError(RuntimeError):
    """One-line reason why inbound capture could not be set up."""


def addr_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """struct bi_addr_key: u32 family + 16 address bytes (network order, IPv4 in the first 4)."""
    family = AF_INET if addr.version == 4 else AF_INET6
    return struct.pack("<I", family) + addr.packed.ljust(16, b"\0")


def id_key(pod_idx: int, kind: int, value: int) -> bytes:
    """struct id_key {pod_idx, kind, value} of the core's pod_ids map."""
    return struct.pack("<III", pod_idx, kind, value)


def capturable_addresses(addresses: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The pod's addresses that identify it on the node (no loopback, no link-local)."""
    out = []
    for text in addresses:
        addr = ipaddress.ip_address(text.split("/")[0])
        if addr.is_loopback or addr.is_link_local:
            continue
        out.append(addr)
    return out


def virt_to_proxy(cfg, addr) -> bool:
    """istio: `-I PREROUTING 1 -i <-k nic> [-d <-i cidr>] -j ISTIO_REDIRECT` (to <-p>)."""
    if cfg.outbound_include_all:
        return True
    return any(addr.version == net.version and addr in net for net in cfg.outbound_include_cidrs)


def inbound_flags(cfg) -> int:
    """pod_cfg.flags bits for inbound capture."""
    flags = 0
    if cfg.inbound_all:
        flags |= CFG_INBOUND_ALL
    elif cfg.inbound_ports:
        flags |= CFG_INBOUND_LIST
    if cfg.kube_virt_interfaces:
        flags |= CFG_VIRT_IFACES
    return flags


def inbound_entries(cfg, pod_idx: int, netns_cookie: int, addresses: Iterable[str],
                    ifindex: Mapping[str, int]) -> list[Row]:
    """Map rows for sk_lookup and listener registration of one pod.

    `ifindex` maps the pod's interface names to indexes. A -c/-k name absent from the pod matches
    nothing, as istio's `-i <nic>` rule for a missing NIC matches nothing."""
    rows: list[Row] = []
    if cfg.inbound_all:
        rows += [("pod_ids", id_key(pod_idx, PORT_IN_EXCLUDE, p), ONE) for p in cfg.inbound_exclude_ports]
    else:
        rows += [("pod_ids", id_key(pod_idx, PORT_IN_INCLUDE, p), ONE) for p in cfg.inbound_ports or ()]
    for names, kind in ((cfg.exclude_interfaces, IFACE_EXCLUDE), (cfg.kube_virt_interfaces, IFACE_VIRT)):
        rows += [("pod_ids", id_key(pod_idx, kind, ifindex[n]), ONE) for n in names if n in ifindex]
    for addr in capturable_addresses(addresses):
        addr_flags = BI_ADDR_VIRT_TO_PROXY if virt_to_proxy(cfg, addr) else 0
        rows.append(("bi_pod_addrs", addr_key(addr), struct.pack("<QII", netns_cookie, pod_idx, addr_flags)))
    return rows


def entry_provider(cfg, pod_idx: int, facts) -> dict[str, list[tuple[bytes, bytes]]]:
    """podconfig.ENTRY_PROVIDERS hook: inbound + DNS rows for the pod whose netns the agent is in."""
    import socket

    from initagent import dns, netns
    addresses = [str(net.network_address) for net in facts.local_networks
                 if net.prefixlen == net.max_prefixlen]
    ifindex = {name: idx for idx, name in socket.if_nameindex()}
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, key, value in inbound_entries(cfg, pod_idx, netns.cookie(), addresses, ifindex):
        out.setdefault(name, []).append((key, value))
    if facts.dns_effective:
        p = dns.plan(cfg, dns.read_resolv_conf(), facts.ipv6_enabled)
        for name, key, value in dns.dns_rows(p, pod_idx):
            out.setdefault(name, []).append((key, value))
    return out


def register() -> None:
    from initagent import podconfig
    if entry_provider not in podconfig.ENTRY_PROVIDERS:
        podconfig.ENTRY_PROVIDERS.append(entry_provider)


# ---------------------------------------------------------------- kernel side (raw bpf(2), netns link)
_SYS_BPF = 321
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_LINK_CREATE = 28
BPF_SK_LOOKUP = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    ret = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, struct.pack("QII", ctypes.addressof(name), fd, 0))


def obj_get(path: str) -> int:
    name = ctypes.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, struct.pack("QII", ctypes.addressof(name), 0, 0))


def link_netns(prog_fd: int, netns_path: str, pin_path: str) -> None:
    """Attach sk_lookup to the netns and pin the link (idempotent: an existing pin is kept)."""
    if os.path.exists(pin_path):
        return
    os.makedirs(os.path.dirname(pin_path), exist_ok=True)
    try:
        ns_fd = os.open(netns_path, os.O_RDONLY)
    except OSError as exc:
        raise InboundError(f"cannot open netns {netns_path}: {exc.strerror}") from None
    try:
        link_fd = _bpf(BPF_LINK_CREATE, struct.pack("IIII", prog_fd, ns_fd, BPF_SK_LOOKUP, 0))
    except OSError as exc:
        raise InboundError(f"sk_lookup link on {netns_path} failed: {exc.strerror} "
                           "(needs Linux >= 5.9 and CAP_BPF+CAP_NET_ADMIN)") from None
    finally:
        os.close(ns_fd)
    try:
        obj_pin(link_fd, pin_path)
    except OSError as exc:
        raise InboundError(f"cannot pin sk_lookup link at {pin_path}: {exc.strerror}") from None
    finally:
        os.close(link_fd)
