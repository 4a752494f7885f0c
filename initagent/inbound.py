"""Inbound capture (sk_lookup) for one pod: the map entries it needs and the pinned netns link.

Pure part: `inbound_entries(...)` turns a CaptureConfig plus the pod's addresses and interface indexes
into (map name, key bytes, value bytes) rows for bpf/maps.h's inbound section; the layouts here mirror
the C structs there. Kernel part: `link_netns(...)` attaches the sk_lookup program to the pod netns with
BPF_LINK_CREATE (bcc has no API for it) and pins the link so it outlives the agent.

sk_lookup has no netns-cookie helper, so the pod is identified by the destination address (pod IPs are
unique on a node). Link-local addresses are left out (not unique); TCP to them is not captured.
"""
from __future__ import annotations

import ipaddress
import os
import struct
from typing import Iterable, Mapping

from initagent import bpfsys
# maps.h mirrors live in podconfig (one place); re-exported here for the inbound/DNS code and its tests
from initagent.podconfig import (CFG_ACCELERATE, CFG_CAPTURE_ALL_DNS, CFG_DNS_CAPTURE,  # noqa: F401
                                 CFG_INBOUND_ALL, CFG_INBOUND_LIST, CFG_VIRT_IFACES, CIDR_DNS_SERVER, IFACE_EXCLUDE,
                                 IFACE_VIRT, PORT_IN_EXCLUDE, PORT_IN_INCLUDE, id_key, inbound_flags)

AF_INET = 2
AF_INET6 = 10
BI_ADDR_VIRT_TO_PROXY = 1

Row = tuple[str, bytes, bytes]
ONE = struct.pack("<I", 1)


class InboundError(RuntimeError):
    """One-line reason why inbound capture could not be set up."""


def addr_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """struct bi_addr_key: u32 family + 16 address bytes (network order, IPv4 in the first 4)."""
    family = AF_INET if addr.version == 4 else AF_INET6
    return struct.pack("<I", family) + addr.packed.ljust(16, b"\0")


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
    from initagent import dns, netns
    addresses = [str(net.network_address) for net in facts.local_networks
                 if net.prefixlen == net.max_prefixlen]
    nics = (*cfg.exclude_interfaces, *cfg.kube_virt_interfaces)
    ifindex = {nic: idx for nic in nics if (idx := netns.interface_index(nic))}
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, key, value in inbound_entries(cfg, pod_idx, netns.cookie(), addresses, ifindex):
        out.setdefault(name, []).append((key, value))
    if facts.dns_effective:
        p = dns.plan(cfg, dns.read_resolv_conf(), facts.ipv6_enabled)
        for name, key, value in dns.dns_rows(p, pod_idx):
            out.setdefault(name, []).append((key, value))
    if cfg.egress_allow is not None:
        # the egress guard lets DNS to the resolv.conf nameservers through, DNS capture or not (bpf/common.h)
        servers = dns.DnsPlan(True, False, dns.parse_resolv_conf(dns.read_resolv_conf()), "")
        for name, key, value in dns.dns_rows(servers, pod_idx):
            out.setdefault(name, []).append((key, value))
    return out


def register() -> None:
    from initagent import podconfig
    if entry_provider not in podconfig.ENTRY_PROVIDERS:
        podconfig.ENTRY_PROVIDERS.append(entry_provider)


# ---------------------------------------------------------------- kernel side (netns link)
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
        link_fd = bpfsys.link_create(prog_fd, ns_fd, bpfsys.ATTACH["sk_lookup"])
    except OSError as exc:
        raise InboundError(f"sk_lookup link on {netns_path} failed: {os.strerror(exc.errno)} "
                           "(needs Linux >= 5.9 and CAP_BPF+CAP_NET_ADMIN)") from None
    finally:
        os.close(ns_fd)
    try:
        bpfsys.obj_pin(link_fd, pin_path)
    except OSError as exc:
        raise InboundError(f"cannot pin sk_lookup link at {pin_path}: {os.strerror(exc.errno)}") from None
    finally:
        os.close(link_fd)
