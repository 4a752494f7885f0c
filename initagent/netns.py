"""Facts about the pod's network namespace, read from inside it (no pyroute2 on the warm path)."""
from __future__ import annotations

import ctypes
import grp
import ipaddress
import os

from initagent.flags import CaptureConfig
from initagent.podconfig import PodFacts

SO_NETNS_COOKIE = 71
AF_INET, SOCK_DGRAM, SOCK_CLOEXEC, SOL_SOCKET = 2, 2, 0o2000000, 1
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    pass


def enter(path: str) -> None:
    """setns(2) this process into the netns at `path` (call before any thread starts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise NetnsError(f"cannot open netns {path}: {err.strerror}") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"cannot enter netns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def cookie() -> int:
    """The current netns cookie, what bpf_get_netns_cookie() returns for sockets in it. Plain libc calls:
    importing the `socket` module would cost ~1.5 ms on the warm path."""
    fd = _libc.socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)
    if fd < 0:
        raise NetnsError(f"cannot open a socket to read the netns cookie: {os.strerror(ctypes.get_errno())}")
    try:
        value, size = ctypes.c_uint64(), ctypes.c_uint32(8)
        if _libc.getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, ctypes.byref(value), ctypes.byref(size)) != 0:
            raise NetnsError(f"SO_NETNS_COOKIE unsupported ({os.strerror(ctypes.get_errno())}); "
                             "kernel >= 5.14 needed")
    finally:
        os.close(fd)
    return value.value


def interface_index(name: str) -> int:
    """ifindex of `name` in the current netns, 0 when there is no such interface."""
    return _libc.if_nametoindex(os.fsencode(name))


def inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def local_v4() -> list[ipaddress.IPv4Address]:
    """Every local IPv4 address of this netns (the LOCAL entries of /proc/net/fib_trie)."""
    found: list[ipaddress.IPv4Address] = []
    last = None
    with open("/proc/net/fib_trie") as f:
        for line in f:
            text = line.strip()
            if text.startswith("|--") or text.startswith("+--"):
                last = text[3:].strip().split("/")[0]
            elif text.startswith("/32 host LOCAL") and last:
                addr = ipaddress.IPv4Address(last)
                if addr not in found:
                    found.append(addr)
    return found


def local_v6() -> list[tuple[ipaddress.IPv6Address, int]]:
    """(address, scope) of every IPv6 address (/proc/net/if_inet6)."""
    out = []
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                out.append((ipaddress.IPv6Address(int(parts[0], 16)), int(parts[3], 16)))
    except FileNotFoundError:
        pass
    return out


def _id_map(path: str) -> tuple[tuple[int, int, int], ...]:
    with open(path) as f:
        return tuple(tuple(int(x) for x in line.split()) for line in f if line.strip())


def routes(exclude_interfaces: tuple[str, ...]) -> tuple[tuple, ...]:
    """Main-table routes with 'goes through an excluded NIC' (pyroute2; only needed with -c)."""
    import socket

    from pyroute2 import IPRoute  # imported lazily: it costs ~150 ms
    out = []
    with IPRoute() as ipr:
        excluded = set()
        for name in exclude_interfaces:
            idx = ipr.link_lookup(ifname=name)
            excluded.update(idx)
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family, table=254):
                dst = route.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                net = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
                oifs = {route.get_attr("RTA_OIF")}
                multipath = route.get_attr("RTA_MULTIPATH") or []
                oifs.update(hop["oif"] for hop in multipath)
                oifs.discard(None)
                out.append((net, bool(oifs) and oifs <= excluded))
    return tuple(out)


def add_ipv6_passthrough_address() -> None:
    """istio-iptables adds ::6/128 to lo for IPv6 pods (Envoy's inbound passthrough source binds it)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if not lo:
            raise NetnsError("no lo interface in the pod netns")
        try:
            ipr.addr("add", index=lo[0], address="::6", prefixlen=128)
        except NetlinkError as err:
            if err.code != 17:  # EEXIST: a re-run
                raise NetnsError(f"cannot add ::6/128 to lo: {err}") from None


def gather(cfg: CaptureConfig) -> PodFacts:
    v4 = local_v4()
    v6 = local_v6()
    local: list = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    local += [ipaddress.ip_network(a) for a in v4 if not a.is_loopback]
    local += [ipaddress.ip_network(a) for a, _scope in v6 if not a.is_loopback]
    global_v4 = [a for a in v4 if not a.is_loopback and not a.is_link_local]
    global_v6 = [a for a, _ in v6 if not a.is_loopback and not a.is_link_local]
    # istio's getLocalIP: addresses are listed IPv4 first; the first usable one decides, unless dual-stack
    ipv6 = bool(global_v6) and (cfg.dual_stack or not global_v4)
    if ipv6 and not any(a == ipaddress.IPv6Address("::6") for a, _ in v6):
        add_ipv6_passthrough_address()
        local.append(ipaddress.ip_network("::6/128"))
    groups = []
    names = cfg.owner_groups_include if cfg.owner_groups_include is not None else cfg.owner_groups_exclude
    for name in names:
        if name.isdigit():
            groups.append((name, int(name)))
        else:
            try:
                groups.append((name, grp.getgrnam(name).gr_gid))
            except KeyError:
                pass  # podconfig reports unknown groups with a one-line error
    return PodFacts(
        local_networks=tuple(dict.fromkeys(local)),
        ipv6_enabled=ipv6,
        routes=routes(cfg.exclude_interfaces) if cfg.exclude_interfaces else (),
        uid_map=_id_map("/proc/self/uid_map"),
        gid_map=_id_map("/proc/self/gid_map"),
        group_ids=tuple(groups),
        dns_effective=_dns_effective(cfg, ipv6),
    )


def _dns_effective(cfg: CaptureConfig, ipv6: bool) -> bool:
    """DNS capture as istio-iptables decides it (inbound+DNS engineer: initagent/dns.py)."""
    from initagent import dns
    return dns.plan(cfg, dns.read_resolv_conf(), ipv6).enabled
