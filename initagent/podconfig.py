"""A pod's CaptureConfig + facts about its netns -> the map entries bpf/maps.h describes (pure).

`PodFacts` is gathered in the pod (netns.py); `build_entries` is a pure function of (cfg, pod_idx,
facts) and returns {map name: [(key bytes, value bytes), ...]} plus the packed pod_cfg. Struct layouts
mirror bpf/maps.h; change both together.
"""
from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import dataclass, field
from typing import Callable

from initagent.digest import sha256
from initagent.flags import CaptureConfig

# pod_cfg.flags (maps.h)
CFG_INCLUDE_ALL = 1 << 0
CFG_INCLUDE_HAS_LOOPBACK = 1 << 1
CFG_OWNER_INCLUDE = 1 << 2
CFG_IPV6 = 1 << 3
CFG_EGRESS_GUARD = 1 << 4
CFG_DNS_CAPTURE = 1 << 5
CFG_CAPTURE_ALL_DNS = 1 << 6
CFG_ACCELERATE = 1 << 7
CFG_INBOUND_ALL = 1 << 8
CFG_INBOUND_LIST = 1 << 9
CFG_ACCEL_POD_TO_POD = 1 << 10
CFG_VIRT_IFACES = 1 << 16

# LPM kinds (maps.h)
CIDR_LOCAL, CIDR_EXCLUDE, CIDR_INCLUDE, CIDR_ROUTE, CIDR_EGRESS = 1, 2, 3, 4, 5
# id kinds (maps.h)
ID_PROXY_UID, ID_PROXY_GID, ID_OWNER_GROUP, PORT_OUT_EXCLUDE, PORT_OUT_INCLUDE = 1, 2, 3, 4, 5
PORT_IN_INCLUDE, PORT_IN_EXCLUDE, IFACE_EXCLUDE, IFACE_VIRT = 16, 17, 18, 19   # inbound section
CIDR_DNS_SERVER = 16                                                        # DNS section (LPM kind)

POD_CFG = struct.Struct("=IIHHHHIIII8I")          # struct pod_cfg: 64 bytes
POD_INFO = struct.Struct("=QQQQII16s")             # struct pod_info: 56 bytes
CIDR4_KEY = struct.Struct("=I4s4s4s")              # prefixlen host order, rest network order
CIDR6_KEY = struct.Struct("=I4s4s16s")
ID_KEY = struct.Struct("=III")
PORT_KEY = struct.Struct("=I4s4s2sH")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
DNS_PROXY_PORT = 15053

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """The config cannot be applied to this pod (e.g. unmapped uid, unknown group); one line."""


@dataclass(frozen=True)
class PodFacts:
    local_networks: tuple[IPNetwork, ...]          # destinations routed via lo (127/8, ::1, own addresses)
    ipv6_enabled: bool                              # istio's EnableIPv6 for this pod
    routes: tuple[tuple[IPNetwork, bool], ...] = () # main-table routes: (dst, via an excluded interface)
    uid_map: tuple[tuple[int, int, int], ...] = ((0, 0, 4294967295),)
    gid_map: tuple[tuple[int, int, int], ...] = ((0, 0, 4294967295),)
    group_ids: tuple[tuple[str, int], ...] = ()     # owner-group names resolved in the pod's /etc/group
    dns_effective: bool = False                     # DNS capture in effect (owner: DNS)


def map_id(ident: int, mapping: tuple[tuple[int, int, int], ...], what: str) -> int:
    """Id inside the pod's user namespace -> init_user_ns id (what bpf_get_current_uid_gid reports)."""
    for inside, outside, count in mapping:
        if inside <= ident < inside + count:
            return outside + (ident - inside)
    raise ConfigError(f"{what} {ident} is not mapped in the pod's user namespace")


def _be32(n: int) -> bytes:
    return struct.pack("!I", n)


def cidr_key(net: IPNetwork, pod_idx: int, kind: int) -> tuple[str, bytes]:
    if net.version == 4:
        return "cidr4", CIDR4_KEY.pack(64 + net.prefixlen, _be32(pod_idx), _be32(kind), net.network_address.packed)
    return "cidr6", CIDR6_KEY.pack(64 + net.prefixlen, _be32(pod_idx), _be32(kind), net.network_address.packed)


def id_key(pod_idx: int, kind: int, value: int) -> bytes:
    return ID_KEY.pack(pod_idx, kind, value)


def port_blocks(low: int, high: int) -> list[tuple[int, int]]:
    """Split [low, high] into aligned (start, prefix bits) blocks for an LPM over 16-bit ports."""
    blocks = []
    start = low
    while start <= high:
        size = start & -start if start else 1 << 16
        while start + size - 1 > high:
            size >>= 1
        blocks.append((start, 16 - (size.bit_length() - 1)))
        start += size
    return blocks


def egress_sets(rules) -> list[tuple[IPNetwork, list[tuple[int, int]]]]:
    """Per distinct CIDR, the union of port ranges of every rule whose CIDR contains it: the LPM returns
    only the most specific CIDR, so its set must already include what its ancestors allow."""
    nets = sorted({r.network for r in rules}, key=lambda n: (n.version, n.prefixlen, int(n.network_address)))
    out = []
    for net in nets:
        ranges = sorted({(r.port_low, r.port_high) for r in rules
                         if r.network.version == net.version and net.subnet_of(r.network)})
        out.append((net, ranges))
    return out


def pod_flags(cfg: CaptureConfig, facts: PodFacts) -> int:
    flags = 0
    if cfg.outbound_include_all:
        flags |= CFG_INCLUDE_ALL
    if cfg.include_has_loopback:
        flags |= CFG_INCLUDE_HAS_LOOPBACK
    if cfg.owner_groups_include is not None:
        flags |= CFG_OWNER_INCLUDE
    if facts.ipv6_enabled:
        flags |= CFG_IPV6
    if cfg.egress_allow is not None:
        flags |= CFG_EGRESS_GUARD
    if facts.dns_effective:
        flags |= CFG_DNS_CAPTURE
        if cfg.capture_all_dns:
            flags |= CFG_CAPTURE_ALL_DNS
    if cfg.accelerate:
        flags |= CFG_ACCELERATE
        if cfg.accelerate_pod_to_pod:
            flags |= CFG_ACCEL_POD_TO_POD
    return flags | inbound_flags(cfg)


def inbound_flags(cfg: CaptureConfig) -> int:
    """pod_cfg.flags bits for inbound capture (sk_lookup)."""
    flags = 0
    if cfg.inbound_all:
        flags |= CFG_INBOUND_ALL
    elif cfg.inbound_ports:
        flags |= CFG_INBOUND_LIST
    if cfg.kube_virt_interfaces:
        flags |= CFG_VIRT_IFACES
    return flags


def pod_cfg_value(cfg: CaptureConfig, facts: PodFacts, pod_idx: int) -> bytes:
    uids = [map_id(u, facts.uid_map, "proxy uid") for u in cfg.proxy_uids]
    gids = [map_id(g, facts.gid_map, "proxy gid") for g in cfg.proxy_gids]
    # an empty -u/-g list adds no rules: use an id no task has, so "first id" never matches
    first_uid = uids[0] if uids else 0xFFFFFFFF
    first_gid = gids[0] if gids else 0xFFFFFFFF
    loop = cfg.loopback_cidr
    return POD_CFG.pack(pod_idx, pod_flags(cfg, facts), cfg.proxy_port, cfg.inbound_capture_port,
                        cfg.inbound_tunnel_port, DNS_PROXY_PORT, first_uid, first_gid,
                        struct.unpack("=I", loop.network_address.packed)[0],
                        struct.unpack("=I", loop.netmask.packed)[0], *([0] * 8))


# Other parts register extra entries here: fn(cfg, pod_idx, facts) -> {map: [(key, value)]}
ENTRY_PROVIDERS: list[Callable[[CaptureConfig, int, PodFacts], dict[str, list[tuple[bytes, bytes]]]]] = []


def build_entries(cfg: CaptureConfig, pod_idx: int, facts: PodFacts) -> dict[str, list[tuple[bytes, bytes]]]:
    out: dict[str, list[tuple[bytes, bytes]]] = {"cidr4": [], "cidr6": [], "pod_ids": [], "egress_ports": []}
    one = U32.pack(1)

    def cidr(net: IPNetwork, kind: int, value: int = 1):
        name, key = cidr_key(net, pod_idx, kind)
        out[name].append((key, U32.pack(value)))

    for net in facts.local_networks:
        cidr(net, CIDR_LOCAL)
    for net in cfg.outbound_exclude_cidrs:
        cidr(net, CIDR_EXCLUDE)
    for net in cfg.outbound_include_cidrs:
        cidr(net, CIDR_INCLUDE)
    if cfg.exclude_interfaces:
        for net, excluded in facts.routes:
            cidr(net, CIDR_ROUTE, 1 if excluded else 0)
    for uid in cfg.proxy_uids:
        out["pod_ids"].append((id_key(pod_idx, ID_PROXY_UID, map_id(uid, facts.uid_map, "proxy uid")), one))
    for gid in cfg.proxy_gids:
        out["pod_ids"].append((id_key(pod_idx, ID_PROXY_GID, map_id(gid, facts.gid_map, "proxy gid")), one))
    resolved = dict(facts.group_ids)
    groups = cfg.owner_groups_include if cfg.owner_groups_include is not None else cfg.owner_groups_exclude
    for group in groups:
        if group not in resolved:
            raise ConfigError(f"owner group {group!r} is unknown in this pod")
        out["pod_ids"].append((id_key(pod_idx, ID_OWNER_GROUP, map_id(resolved[group], facts.gid_map,
                                                                     f"owner group {group}")), one))
    for port in cfg.outbound_exclude_ports:
        out["pod_ids"].append((id_key(pod_idx, PORT_OUT_EXCLUDE, port), one))
    for port in cfg.outbound_include_ports:
        out["pod_ids"].append((id_key(pod_idx, PORT_OUT_INCLUDE, port), one))
    if cfg.egress_allow:
        for set_id, (net, ranges) in enumerate(egress_sets(cfg.egress_allow), start=1):
            cidr(net, CIDR_EGRESS, set_id)
            for low, high in ranges:
                for start, bits in port_blocks(low, high):
                    out["egress_ports"].append(
                        (PORT_KEY.pack(64 + bits, _be32(pod_idx), _be32(set_id), struct.pack("!H", start), 0), one))
    for provider in ENTRY_PROVIDERS:
        for name, rows in provider(cfg, pod_idx, facts).items():
            out.setdefault(name, []).extend(rows)
    # duplicates (e.g. the same CIDR twice) are harmless but make counts confusing
    return {name: list(dict.fromkeys(rows)) for name, rows in out.items()}


def config_digest(cfg: CaptureConfig, facts: PodFacts) -> bytes:
    """What setup applies, independent of pod_idx: equal digests => a re-run is a no-op."""
    payload = json.dumps({"cfg": cfg.to_dict(), "facts": [str(n) for n in facts.local_networks],
                          "routes": [(str(n), e) for n, e in facts.routes], "v6": facts.ipv6_enabled,
                          "uid_map": facts.uid_map, "gid_map": facts.gid_map, "groups": facts.group_ids,
                          "dns": facts.dns_effective}, sort_keys=True, default=str)
    return sha256(payload.encode()).digest()[:16]


def pod_info_value(cookie: int, cgroup_id: int, netns_ino: int, created_ns: int, pid: int, committed: int,
                   digest: bytes) -> bytes:
    return POD_INFO.pack(cookie, cgroup_id, netns_ino, created_ns, pid, committed, digest)


def unpack_pod_info(raw: bytes) -> dict:
    cookie, cgroup_id, netns_ino, created_ns, pid, committed, digest = POD_INFO.unpack_from(raw)
    return {"netns_cookie": cookie, "cgroup_id": cgroup_id, "netns_ino": netns_ino, "created_ns": created_ns,
            "setup_pid": pid, "committed": committed, "config_hash": digest.hex()}


def unpack_pod_cfg(raw: bytes) -> dict:
    v = POD_CFG.unpack_from(raw)
    return {"pod_idx": v[0], "flags": v[1], "proxy_port": v[2], "inbound_capture_port": v[3],
            "inbound_tunnel_port": v[4], "dns_port": v[5], "first_uid": v[6], "first_gid": v[7]}


def key_pod_idx(map_name: str, key: bytes) -> int | None:
    """Which pod an entry of a shared list map belongs to (for cleanup and gc)."""
    if map_name in ("cidr4", "cidr6", "egress_ports"):
        return struct.unpack_from("!I", key, 4)[0]
    if map_name == "pod_ids":
        return struct.unpack_from("=I", key, 0)[0]
    return None


LIST_MAPS = {"cidr4": CIDR4_KEY.size, "cidr6": CIDR6_KEY.size, "pod_ids": ID_KEY.size,
             "egress_ports": PORT_KEY.size}
