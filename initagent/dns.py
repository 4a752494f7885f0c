"""DNS capture for one pod: when it is on, which nameservers, and the map rows that say so.

istio-iptables programs its DNS rules only when --redirect-dns (or ISTIO_META_DNS_CAPTURE) is on AND
(--capture-all-dns, or at least one nameserver was found in the pod's /etc/resolv.conf); otherwise DNS
capture is skipped with a warning (contract §1.4 step 11). bpfinit follows the same rule. The -o list
comes first in istio (`ISTIO_OUTPUT -p udp --dport 53 -j RETURN` before everything): 53 in -o means
DNS is never captured.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from initagent.podconfig import CFG_CAPTURE_ALL_DNS, CFG_DNS_CAPTURE, CIDR_DNS_SERVER

DNS_PORT = 53


@dataclass(frozen=True)
class DnsPlan:
    enabled: bool
    capture_all: bool
    servers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    note: str  # one line for the agent's log (why on/off)


def parse_resolv_conf(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The `nameserver` addresses of a resolv.conf, in order (invalid entries are skipped, as libc does)."""
    servers = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
            if addr not in servers:
                servers.append(addr)
    return tuple(servers)


def read_resolv_conf(path: str = "/etc/resolv.conf") -> str:
    """The pod's resolv.conf ("" when absent: istio then finds no nameserver either)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def plan(cfg, resolv_conf_text: str | None, ipv6: bool = True) -> DnsPlan:
    """Decide DNS capture like istio-iptables' SetupDNSRedir. IPv6 servers count only for IPv6 pods."""
    if not cfg.redirect_dns:
        return DnsPlan(False, False, (), "DNS capture off")
    if DNS_PORT in cfg.outbound_exclude_ports:
        return DnsPlan(False, False, (), "DNS capture off: port 53 is in -o (excluded before every rule)")
    servers = parse_resolv_conf(resolv_conf_text or "")
    servers = tuple(s for s in servers if s.version == 4 or ipv6)
    if cfg.capture_all_dns:
        return DnsPlan(True, True, servers, "DNS capture on: all port-53 traffic")
    if not servers:
        return DnsPlan(False, False, (), "DNS capture skipped: no nameserver in resolv.conf "
                                         "and --capture-all-dns is off (as istio-iptables)")
    listed = ", ".join(str(s) for s in servers)
    return DnsPlan(True, False, servers, f"DNS capture on: nameservers {listed}")


def dns_flags(p: DnsPlan) -> int:
    flags = 0
    if p.enabled:
        flags |= CFG_DNS_CAPTURE
        if p.capture_all:
            flags |= CFG_CAPTURE_ALL_DNS
    return flags


def dns_rows(p: DnsPlan, pod_idx: int) -> list[tuple[str, bytes, bytes]]:
    """cidr4/cidr6 rows {prefixlen, pod_idx_be, kind_be, addr} for the nameservers."""
    if not p.enabled or p.capture_all:
        return []
    rows = []
    one = struct.pack("<I", 1)
    for addr in p.servers:
        if addr.version == 4:
            key = struct.pack("<I", 64 + 32) + struct.pack("!II", pod_idx, CIDR_DNS_SERVER) + addr.packed
            rows.append(("cidr4", key, one))
        else:
            key = struct.pack("<I", 64 + 128) + struct.pack("!II", pod_idx, CIDR_DNS_SERVER) + addr.packed
            rows.append(("cidr6", key, one))
    return rows
