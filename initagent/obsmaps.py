"""User-space view of the observability maps declared in bpf/maps.h and bpf/events.h.

One place mirrors the C ABI (enums, struct layouts) and opens the maps through their pins
(<bpffs>/bpfinit/<hash>/<map name>), so observe, status/counters, exporter and identity never compile
anything: reading a pin needs only bpf(2). tests/observe/test_abi.py checks these tables against
events.h so the two cannot drift apart.
"""
from __future__ import annotations

import ctypes as ct
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from initagent import bpfsys
from initagent.bpfsys import BPF_ANY, BPF_NOEXIST, BpfError  # noqa: F401 (re-exported for observers)

# ---------------------------------------------------------------- ABI mirrored from bpf/events.h
DIR_NAMES = {0: "UNKNOWN", 1: "OUTBOUND", 2: "INBOUND", 3: "DNS"}
VERDICT_NAMES = {0: "UNKNOWN", 1: "REDIRECTED", 2: "CAPTURED", 3: "BYPASSED", 4: "DENIED", 5: "REFUSED"}
REASON_NAMES = {
    0: "none", 1: "excluded_interface", 2: "excluded_port", 3: "passthrough_source", 4: "proxy_uid",
    5: "proxy_gid", 6: "loopback", 7: "owner_group", 8: "local_destination", 9: "excluded_cidr",
    10: "included_port", 11: "included_cidr", 12: "not_included", 13: "hairpin", 14: "egress_policy",
    15: "ipv6_disabled", 16: "dns", 17: "proxy_not_listening", 18: "accel", 19: "tunnel_port",
    20: "protocol", 21: "internal_error", 22: "socket_type", 23: "accel_tcp_path",
}
STAT_NAMES = {0: "emitted", 1: "lost", 2: "suppressed", 3: "counter_full"}
# Hubble's spellings; other protocols (raw sockets denied at socket(), reason socket_type) show as numbers.
L4_NAMES = {1: "ICMPv4", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 136: "UDPLite"}
AF_INET, AF_INET6 = 2, 10
FLOW_ID_UNKNOWN = 0xFFFFFFFF
FLOW_EVENT_VERSION = 1
OBS_F_EVENTS_OFF = 1
OBS_RATE_UNLIMITED = 0xFFFFFFFF
OBS_DEFAULT_RATE = 200
OBS_DEFAULT_BURST = 400
OBS_ID_F_LABELS_TRUNCATED = 1

MAP_NAMES = ("obs_counters", "obs_events", "obs_stats", "obs_config", "obs_bucket", "obs_identity")


class FlowEvent(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64), ("netns_cookie", ct.c_uint64), ("pod_idx", ct.c_uint32),
        ("dir", ct.c_uint8), ("verdict", ct.c_uint8), ("reason", ct.c_uint8), ("l4_proto", ct.c_uint8),
        ("family", ct.c_uint8), ("version", ct.c_uint8), ("src_port", ct.c_uint16),
        ("dst_port", ct.c_uint16), ("orig_dst_port", ct.c_uint16), ("suppressed", ct.c_uint32),
        ("uid", ct.c_uint32), ("gid", ct.c_uint32), ("_pad", ct.c_uint32),
        ("src_addr", ct.c_uint8 * 16), ("dst_addr", ct.c_uint8 * 16), ("orig_dst_addr", ct.c_uint8 * 16),
    ]


class CounterKey(ct.Structure):
    _fields_ = [("pod_idx", ct.c_uint32), ("dir", ct.c_uint8), ("verdict", ct.c_uint8),
                ("reason", ct.c_uint8), ("_pad", ct.c_uint8)]


class ObsConfig(ct.Structure):
    _fields_ = [("flags", ct.c_uint32), ("rate_per_sec", ct.c_uint32), ("burst", ct.c_uint32),
                ("_pad", ct.c_uint32)]


class ObsBucket(ct.Structure):
    _fields_ = [("tat_ns", ct.c_uint64), ("suppressed", ct.c_uint32), ("_pad", ct.c_uint32)]


ID_NAMESPACE_LEN, ID_NAME_LEN, ID_LABELS_LEN = 64, 256, 1024


class ObsIdentity(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64), ("flags", ct.c_uint32), ("_pad", ct.c_uint32),
                ("namespace", ct.c_char * ID_NAMESPACE_LEN), ("name", ct.c_char * ID_NAME_LEN),
                ("labels", ct.c_char * ID_LABELS_LEN)]


assert ct.sizeof(FlowEvent) == 96 and ct.sizeof(CounterKey) == 8 and ct.sizeof(ObsIdentity) == 1360


def event_address(raw, family: int) -> str:
    data = bytes(raw)
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(data))
    return str(ipaddress.IPv4Address(data[:4]))


# ---------------------------------------------------------------- pinned maps (raw bpf(2) via bpfsys)
MAP_TYPE_NAMES = {1: "hash", 2: "array", 4: "perf_event_array", 5: "percpu_hash", 6: "percpu_array",
                  27: "ringbuf"}
PERCPU_TYPES = {5, 6, 10}


def obj_get(path: Path | str) -> int:
    try:
        return bpfsys.obj_get(path)
    except OSError as e:
        raise BpfError(f"cannot open pinned BPF object {path}: {e.strerror}") from None


def obj_pin(fd: int, path: Path | str) -> None:
    try:
        bpfsys.obj_pin(fd, path)
    except OSError as e:
        raise BpfError(f"cannot pin BPF object at {path}: {e.strerror}") from None


def possible_cpus() -> int:
    """Per-CPU map values have one slot per *possible* CPU (not online)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class PinnedMap(bpfsys.Fd):
    """A pinned map opened by path, with raw-bytes element access (per-CPU values split per CPU).
    A context manager (from bpfsys.Fd): leaving it closes the fd."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        super().__init__(obj_get(self.path))
        info = bpfsys.map_info(self.fd)
        self.type = info["type"]
        self.key_size = info["key_size"]
        self.value_size = info["value_size"]
        self.max_entries = info["max_entries"]
        self.percpu = self.type in PERCPU_TYPES
        self.ncpu = possible_cpus() if self.percpu else 1
        # the kernel lays per-CPU values out in 8-byte aligned slots
        self._slot = (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size

    def _check(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise BpfError(f"{self.path.name}: key is {len(key)} bytes, map expects {self.key_size}")

    def _failed(self, what: str, err: OSError) -> BpfError:
        return BpfError(f"{self.path.name}: {what} failed: {os.strerror(err.errno)}")

    def lookup(self, key: bytes) -> list[bytes] | None:
        """Value per CPU (a one-item list for normal maps); None when the key is absent."""
        self._check(key)
        try:
            raw = bpfsys.map_lookup(self.fd, key, self._slot * self.ncpu)
        except bpfsys.BpfError as err:
            raise self._failed("lookup", err) from None
        if raw is None:
            return None
        return [raw[i * self._slot:i * self._slot + self.value_size] for i in range(self.ncpu)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Write `value` (for per-CPU maps: the same value on every CPU)."""
        self._check(key)
        if len(value) != self.value_size:
            raise BpfError(f"{self.path.name}: value is {len(value)} bytes, map expects {self.value_size}")
        try:
            bpfsys.map_update(self.fd, key, value.ljust(self._slot, b"\0") * self.ncpu, flags)
        except bpfsys.BpfError as err:
            raise self._failed("update", err) from None

    def delete(self, key: bytes) -> bool:
        self._check(key)
        try:
            return bpfsys.map_delete(self.fd, key)
        except bpfsys.BpfError as err:
            raise self._failed("delete", err) from None

    def items(self, limit: int = 1_000_000) -> list[tuple[bytes, list[bytes]]]:
        """All (key, value per CPU) pairs: batched (a few syscalls for the whole map) where the kernel
        can, else key by key. Entries deleted meanwhile are left out."""
        size = self._slot * self.ncpu
        try:
            pairs = bpfsys.map_items_batch(self.fd, self.key_size, size, limit)
        except bpfsys.BpfError:
            pairs = []
            for key in self.keys(limit):
                found = self.lookup(key)
                if found is not None:
                    pairs.append((key, found))
            return pairs
        return [(key, [raw[i * self._slot:i * self._slot + self.value_size] for i in range(self.ncpu)])
                for key, raw in pairs]

    def keys(self, limit: int = 1_000_000) -> list[bytes]:
        """All keys (bounded); for arrays, 0..max_entries-1."""
        try:
            return bpfsys.map_keys(self.fd, self.key_size, limit)
        except bpfsys.BpfError as err:
            raise self._failed("key iteration", err) from None


# ---------------------------------------------------------------- where the maps are
@dataclass(frozen=True)
class ObsPins:
    """One loaded program generation (<bpffs>/bpfinit/<hash>/) with its observability maps."""
    directory: Path

    def path(self, name: str) -> Path:
        for candidate in (self.directory / name, self.directory / "maps" / name):
            if candidate.exists():
                return candidate
        return self.directory / name

    def open(self, name: str) -> PinnedMap:
        return PinnedMap(self.path(name))

    @property
    def generation(self) -> str:
        return self.directory.name


def find_generations(bpffs: Path | str) -> list[ObsPins]:
    """Every <bpffs>/bpfinit/<hash>/ that carries an obs_events pin (newest hash dirs included)."""
    root = Path(bpffs) / "bpfinit"
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and ((d / "obs_events").exists() or (d / "maps" / "obs_events").exists()):
            found.append(ObsPins(d))
    return found


def require_generations(bpffs: Path | str) -> list[ObsPins]:
    gens = find_generations(bpffs)
    if not gens:
        raise BpfError(f"no bpfinit programs are pinned under {Path(bpffs) / 'bpfinit'} "
                       "(has any pod run `bpfinit-agent setup` on this node? is --bpffs right?)")
    return gens
