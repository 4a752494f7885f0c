"""`bpfinit-agent observe`: stream the datapath's decision events as Hubble-shaped JSON lines or a table.

Events come from the node-wide `obs_events` ring buffer (perf buffer on kernels < 5.8) pinned under
<bpffs>/bpfinit/<hash>/; pods are named through the `obs_identity` map (initagent/identity.py).
Reading a BPF ring buffer consumes it: one `observe` per node reads at a time, enforced by a lock in bpffs
(sole_reader; the exporter reads only counters, never events). Without --follow, observe drains what is
buffered now and exits.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from initagent import identity, obsmaps
from initagent.cliparse import OneLineParser
from initagent.obsmaps import BpfError, FlowEvent

DEFAULT_BPFFS = "/sys/fs/bpf"
MAP_TYPE_RINGBUF = 27
MAP_TYPE_PERF_EVENT_ARRAY = 4

# Hubble-style drop reasons for the two verdicts that stop traffic.
DROP_REASON_DESC = {"egress_policy": "POLICY_DENIED", "proxy_not_listening": "PROXY_NOT_LISTENING"}


class ObserveError(Exception):
    """Operator-facing error (bad filter, nothing pinned, ...): printed as one line, exit 2."""


# ---------------------------------------------------------------- kernel feature / config
def kernel_has_ringbuf() -> bool:
    """True when this kernel can create a BPF ring buffer (>= 5.8); else build with BPFINIT_EVENTS_PERFBUF."""
    from bcc.libbcc import lib as bcc_lib
    bcc_lib.bcc_create_map.restype = ct.c_int
    bcc_lib.bcc_create_map.argtypes = [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]
    fd = bcc_lib.bcc_create_map(MAP_TYPE_RINGBUF, b"bpfinit_probe", 0, 0, 4096, 0)
    if fd < 0:
        return False
    os.close(fd)
    return True


def event_cflags() -> list[str]:
    """Compile flags for bpf/events.h on this kernel (the loader adds them): perf buffer below 5.8."""
    try:
        return [] if kernel_has_ringbuf() else ["-DBPFINIT_EVENTS_PERFBUF"]
    except (OSError, AttributeError, ImportError):
        return ["-DBPFINIT_EVENTS_PERFBUF"]


def set_event_config(bpffs: Path | str, events: bool | None = None, rate: int | None = None,
                     burst: int | None = None) -> dict:
    """Change the event switch / per-pod rate limit on every program generation; returns the new config."""
    if rate is not None and not (0 < rate <= obsmaps.OBS_RATE_UNLIMITED):
        raise ObserveError("--set-rate must be a positive number of events per second per pod per CPU")
    if burst is not None and not (0 < burst < 2**32):
        raise ObserveError("--set-burst must be a positive number of events")
    result = {}
    for pins in obsmaps.require_generations(bpffs):
        with pins.open("obs_config") as m:
            zero = (0).to_bytes(4, "little")
            cfg = obsmaps.ObsConfig.from_buffer_copy(m.lookup(zero)[0])
            if events is not None:
                cfg.flags = (cfg.flags & ~obsmaps.OBS_F_EVENTS_OFF) | (0 if events else obsmaps.OBS_F_EVENTS_OFF)
            if rate is not None:
                cfg.rate_per_sec = rate
            if burst is not None:
                cfg.burst = burst
            m.update(zero, bytes(cfg))
            result = describe_config(cfg)
    return result


def describe_config(cfg: obsmaps.ObsConfig) -> dict:
    rate = cfg.rate_per_sec or obsmaps.OBS_DEFAULT_RATE
    return {"events": not cfg.flags & obsmaps.OBS_F_EVENTS_OFF,
            "rate_per_sec": "unlimited" if rate == obsmaps.OBS_RATE_UNLIMITED else rate,
            "burst": cfg.burst or obsmaps.OBS_DEFAULT_BURST}


# ---------------------------------------------------------------- event -> flow dict (pure)
def decode_event(raw: bytes) -> FlowEvent:
    if len(raw) < ct.sizeof(FlowEvent):
        raise BpfError(f"short event: {len(raw)} bytes")
    return FlowEvent.from_buffer_copy(raw[:ct.sizeof(FlowEvent)])


def _endpoint(ident: dict | None) -> dict:
    if not ident:
        return {}
    return {"namespace": ident["namespace"], "pod_name": ident["pod"],
            "labels": [f"k8s:{k}={v}" for k, v in sorted(ident["labels"].items())]}


def _rfc3339(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    base = dt.datetime.fromtimestamp(secs, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def event_to_flow(ev: FlowEvent, pod: dict | None, wall_offset_ns: int, node_name: str = "",
                  peer: dict | None = None) -> dict:
    """One event as a Hubble-like flow: `pod` is the identity of the pod that decided, `peer` the
    identity of the other end when it is a registered pod too."""
    direction = obsmaps.DIR_NAMES.get(ev.dir, str(ev.dir))
    verdict = obsmaps.VERDICT_NAMES.get(ev.verdict, str(ev.verdict))
    reason = obsmaps.REASON_NAMES.get(ev.reason, str(ev.reason))
    l4 = obsmaps.L4_NAMES.get(ev.l4_proto, str(ev.l4_proto))
    src = obsmaps.event_address(ev.src_addr, ev.family)
    dst = obsmaps.event_address(ev.dst_addr, ev.family)
    orig = obsmaps.event_address(ev.orig_dst_addr, ev.family)
    inbound = direction == "INBOUND"
    when = ev.ts_ns + wall_offset_ns
    flow = {
        "time": _rfc3339(when),
        "verdict": verdict,
        # Hubble shows what the packet was addressed to; the proxy hop is under bpfinit.redirected_to.
        "IP": {"source": src, "destination": orig, "ipVersion": "IPv6" if ev.family == obsmaps.AF_INET6 else "IPv4"},
        "l4": {l4: {"source_port": ev.src_port, "destination_port": ev.orig_dst_port}},
        "source": _endpoint(peer if inbound else pod),
        "destination": _endpoint(pod if inbound else peer),
        "Type": "L3_L4",
        "node_name": node_name,
        "traffic_direction": "INGRESS" if inbound else "EGRESS",
        "is_reply": False,
        "Summary": f"{l4} {verdict} ({reason})",
        "bpfinit": {
            "direction": direction,
            "reason": reason,
            "pod_idx": ev.pod_idx,
            "netns_cookie": ev.netns_cookie,
            "original_destination": {"ip": orig, "port": ev.orig_dst_port},
        },
    }
    if verdict in ("DENIED", "REFUSED"):
        flow["drop_reason_desc"] = DROP_REASON_DESC.get(reason, reason.upper())
    if (dst, ev.dst_port) != (orig, ev.orig_dst_port):
        flow["bpfinit"]["redirected_to"] = {"ip": dst, "port": ev.dst_port}
    if ev.uid != obsmaps.FLOW_ID_UNKNOWN:
        flow["bpfinit"]["uid"] = ev.uid
    if ev.gid != obsmaps.FLOW_ID_UNKNOWN:
        flow["bpfinit"]["gid"] = ev.gid
    if ev.suppressed:
        flow["bpfinit"]["suppressed_before"] = ev.suppressed
    if ev.version != obsmaps.FLOW_EVENT_VERSION:
        flow["bpfinit"]["event_version"] = ev.version
    return {"flow": flow, "node_name": node_name, "time": flow["time"]}


def format_flow_line(record: dict) -> str:
    """Compact one-line form, Hubble-like: time, source -> destination, verdict, reason."""
    f = record["flow"]
    l4name, ports = next(iter(f["l4"].items()))

    def end(who: dict, ip: str, port: int) -> str:
        addr = f"{ip}:{port}" if port else ip          # port 0: socket not bound yet at connect()
        return f"{who['namespace']}/{who['pod_name']} ({addr})" if who else addr

    src = end(f["source"], f["IP"]["source"], ports["source_port"])
    dst = end(f["destination"], f["IP"]["destination"], ports["destination_port"])
    extra = ""
    if "redirected_to" in f["bpfinit"]:
        r = f["bpfinit"]["redirected_to"]
        extra = f" -> proxy {r['ip']}:{r['port']}"
    if "drop_reason_desc" in f:
        extra += f" {f['drop_reason_desc']}"
    stamp = f["time"][11:26]
    return (f"{stamp} {f['bpfinit']['direction']:<8} {src} -> {dst} {l4name} "
            f"{f['verdict']} ({f['bpfinit']['reason']}){extra}")


# ---------------------------------------------------------------- filters (pure)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now_ns: int | None = None) -> int:
    """`--since`: a duration back from now ("90s", "5m", "1h") or an RFC 3339 time. Returns wall ns."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    m = _DURATION.match(text.strip())
    if m:
        return now_ns - int(float(m.group(1)) * _UNITS[m.group(2)] * 1e9)
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ObserveError(f"--since {text!r}: use a duration like 30s/5m/1h or an RFC 3339 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1e9)


def _names(values: Iterable[str], table: dict[int, str], flag: str, upper: bool) -> frozenset[str]:
    known = set(table.values()) - {"UNKNOWN"}
    out = set()
    for v in values:
        for item in v.split(","):
            item = item.strip().upper() if upper else item.strip().lower()
            if not item:
                continue
            if item not in known:
                raise ObserveError(f"{flag} {item!r}: expected one of {', '.join(sorted(known))}")
            out.add(item)
    return frozenset(out)


@dataclass(frozen=True)
class FlowFilter:
    namespaces: frozenset[str] = frozenset()
    pods: frozenset[str] = frozenset()            # "name" or "namespace/name"
    verdicts: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    to_cidrs: tuple = ()
    ports: frozenset[int] = frozenset()
    since_ns: int | None = None

    @classmethod
    def from_args(cls, namespace=(), pod=(), verdict=(), reason=(), to_cidr=(), port=(), since=None,
                  now_ns: int | None = None) -> "FlowFilter":
        cidrs = []
        for c in to_cidr or ():
            for item in c.split(","):
                if item.strip():
                    try:
                        cidrs.append(ipaddress.ip_network(item.strip(), strict=False))
                    except ValueError:
                        raise ObserveError(f"--to-cidr {item!r} is not a CIDR") from None
        ports = set()
        for p in port or ():
            for item in str(p).split(","):
                if item.strip():
                    if not item.strip().isdigit() or not 0 < int(item) < 65536:
                        raise ObserveError(f"--port {item!r} is not a port number (1-65535)")
                    ports.add(int(item))
        return cls(
            namespaces=frozenset(n for v in namespace or () for n in v.split(",") if n),
            pods=frozenset(n for v in pod or () for n in v.split(",") if n),
            verdicts=_names(verdict or (), obsmaps.VERDICT_NAMES, "--verdict", upper=True),
            reasons=_names(reason or (), obsmaps.REASON_NAMES, "--reason", upper=False),
            to_cidrs=tuple(cidrs),
            ports=frozenset(ports),
            since_ns=parse_since(since, now_ns) if since else None,
        )

    def match(self, record: dict, wall_ns: int | None = None) -> bool:
        f = record["flow"]
        ends = [e for e in (f["source"], f["destination"]) if e]
        if self.since_ns is not None and wall_ns is not None and wall_ns < self.since_ns:
            return False
        if self.namespaces and not any(e["namespace"] in self.namespaces for e in ends):
            return False
        if self.pods and not any(e["pod_name"] in self.pods or f"{e['namespace']}/{e['pod_name']}" in self.pods
                                 for e in ends):
            return False
        if self.verdicts and f["verdict"] not in self.verdicts:
            return False
        if self.reasons and f["bpfinit"]["reason"] not in self.reasons:
            return False
        if self.to_cidrs:
            dst = ipaddress.ip_address(f["IP"]["destination"])
            if not any(dst.version == c.version and dst in c for c in self.to_cidrs):
                return False
        if self.ports:
            ports = next(iter(f["l4"].values()))
            if not {ports["source_port"], ports["destination_port"]} & self.ports:
                return False
        return True


# ---------------------------------------------------------------- readers
class _Identities:
    """pod_idx -> identity per generation, re-read (at most every second) when an unknown pod shows up."""

    def __init__(self, gens: list[obsmaps.ObsPins]):
        self.gens = {g.generation: g for g in gens}
        self.cache: dict[str, dict[int, dict]] = {}
        self.loaded_at: dict[str, float] = {}
        self.addr_maps: dict[str, obsmaps.PinnedMap | None] = {}
        self.pod_addrs: dict[str, dict[tuple[int, int], str]] = {}
        self.addrs_loaded_at: dict[str, float] = {}

    def get(self, gen: str, pod_idx: int) -> dict | None:
        table = self.cache.get(gen)
        if table is None or (pod_idx not in table and time.monotonic() - self.loaded_at[gen] > 1.0):
            table = self.cache[gen] = identity.all_identities(self.gens[gen])
            self.loaded_at[gen] = time.monotonic()
        return table.get(pod_idx)

    def _addr_map(self, gen: str) -> obsmaps.PinnedMap | None:
        """The inbound part's bi_pod_addrs (pod address -> {netns_cookie u64, pod_idx u32, flags u32})."""
        if gen not in self.addr_maps:
            path = self.gens[gen].path("bi_pod_addrs")
            m = obsmaps.PinnedMap(path) if path.exists() else None
            self.addr_maps[gen] = m if m is not None and m.key_size == 20 and m.value_size == 16 else None
        return self.addr_maps[gen]

    def by_address(self, gen: str, family: int, raw_addr) -> dict | None:
        """The pod owning an address (when it is a pod on this node)."""
        m = self._addr_map(gen)
        if m is None:
            return None
        found = m.lookup(family.to_bytes(4, "little") + bytes(raw_addr))
        if found is None:
            return None
        return self.get(gen, int.from_bytes(found[0][8:12], "little"))

    def address_of(self, gen: str, pod_idx: int, family: int) -> str | None:
        """A pod's own address of that family (first non-loopback one), re-read at most every second."""
        cache = self.pod_addrs.setdefault(gen, {})
        if (pod_idx, family) not in cache and time.monotonic() - self.addrs_loaded_at.get(gen, 0) > 1.0:
            self.addrs_loaded_at[gen] = time.monotonic()
            m = self._addr_map(gen)
            if m is not None:
                for key, val in m.items(limit=m.max_entries + 1):
                    fam = int.from_bytes(key[:4], "little")
                    addr = obsmaps.event_address(key[4:], fam)
                    if ipaddress.ip_address(addr).is_loopback:
                        continue
                    cache.setdefault((int.from_bytes(val[0][8:12], "little"), fam), addr)
        return cache.get((pod_idx, family))


READER_LOCK = "observe-lock"   # under <bpffs>/bpfinit (bpffs refuses dots): not a build, not a generation


@contextlib.contextmanager
def sole_reader(bpffs: Path):
    """Hold the node's event-reader lock: an flock on a directory in bpffs, shared by every container that
    mounts the node's bpffs, released when the process exits. Two readers of one ring buffer would each
    get an unpredictable share of the events, with nothing telling either of them."""
    lock = Path(bpffs) / "bpfinit" / READER_LOCK
    try:
        lock.mkdir(exist_ok=True)
        fd = os.open(lock, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise ObserveError(f"cannot create the event-reader lock {lock}: {err.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ObserveError(f"another `bpfinit-agent observe` is reading this node's events (it holds {lock}); "
                               "a ring buffer has one reader, so stop that one or give it the filters") from None
        yield
    finally:
        os.close(fd)


class EventReader:
    """Polls every generation's event buffer; calls on_event(generation, raw_bytes)."""

    def __init__(self, gens: list[obsmaps.ObsPins], on_event: Callable[[str, bytes], None]):
        from bcc.libbcc import lib as bcc_lib, _RINGBUF_CB_TYPE, _RAW_CB_TYPE, _LOST_CB_TYPE, bcc_perf_buffer_opts
        self._lib = bcc_lib
        self._ring = None
        self._perf_readers: list[int] = []
        self._keep = []            # ctypes callbacks must outlive the readers
        self._maps: list[obsmaps.PinnedMap] = []
        self.perf_lost = 0
        for pins in gens:
            m = pins.open("obs_events")
            self._maps.append(m)
            gen = pins.generation
            if m.type == MAP_TYPE_RINGBUF:
                def ring_cb(_ctx, data, size, gen=gen):
                    on_event(gen, ct.string_at(data, size))
                    return 0
                cb = _RINGBUF_CB_TYPE(ring_cb)
                self._keep.append(cb)
                if self._ring is None:
                    self._ring = bcc_lib.bpf_new_ringbuf(m.fd, cb, None)
                    if not self._ring:
                        raise BpfError(f"cannot open ring buffer {m.path}")
                elif bcc_lib.bpf_add_ringbuf(self._ring, m.fd, cb, None) < 0:
                    raise BpfError(f"cannot add ring buffer {m.path}")
            elif m.type == MAP_TYPE_PERF_EVENT_ARRAY:
                self._open_perf(m, gen, on_event, _RAW_CB_TYPE, _LOST_CB_TYPE, bcc_perf_buffer_opts)
            else:
                raise BpfError(f"{m.path} is a map of type {m.type}, not a ring or perf buffer")

    def _open_perf(self, m, gen, on_event, raw_t, lost_t, opts_t):
        def raw_cb(_ctx, data, size, gen=gen):
            on_event(gen, ct.string_at(data, size))

        def lost_cb(_ctx, lost):
            self.perf_lost += lost
        fn, lost_fn = raw_t(raw_cb), lost_t(lost_cb)
        self._keep += [fn, lost_fn]
        ncpu = min(obsmaps.possible_cpus(), m.max_entries)
        for cpu in range(ncpu):
            opts = opts_t(pid=-1, cpu=cpu, wakeup_events=1)
            reader = self._lib.bpf_open_perf_buffer_opts(fn, lost_fn, None, 64, ct.byref(opts))
            if not reader:
                continue          # offline CPU
            fd = self._lib.perf_reader_fd(reader)
            m.update(cpu.to_bytes(4, "little"), fd.to_bytes(4, "little"))
            self._perf_readers.append(reader)

    def poll(self, timeout_ms: int) -> None:
        if self._ring is not None:
            self._lib.bpf_poll_ringbuf(self._ring, timeout_ms)
        if self._perf_readers:
            arr = (ct.c_void_p * len(self._perf_readers))(*self._perf_readers)
            self._lib.perf_reader_poll(len(arr), arr, 0 if self._ring is not None else timeout_ms)

    def drain(self) -> None:
        if self._ring is not None:
            self._lib.bpf_consume_ringbuf(self._ring)
        if self._perf_readers:
            arr = (ct.c_void_p * len(self._perf_readers))(*self._perf_readers)
            self._lib.perf_reader_poll(len(arr), arr, 0)

    def close(self) -> None:
        if self._ring is not None:
            self._lib.bpf_free_ringbuf(self._ring)
            self._ring = None
        for r in self._perf_readers:
            self._lib.perf_reader_free(ct.c_void_p(r))
        self._perf_readers.clear()
        for m in self._maps:
            m.close()
        self._maps.clear()


@dataclass
class Observer:
    """Turns raw events into filtered flow records (identities resolved), one callback per match."""
    bpffs: Path
    flt: FlowFilter = field(default_factory=FlowFilter)
    node_name: str = field(default_factory=socket.gethostname)

    def __post_init__(self):
        self.gens = obsmaps.require_generations(self.bpffs)
        self.idents = _Identities(self.gens)
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()   # bpf_ktime_get_ns is CLOCK_MONOTONIC
        self.seen = 0
        self.matched = 0

    def to_record(self, gen: str, raw: bytes) -> tuple[dict, int]:
        ev = decode_event(raw)
        pod = self.idents.get(gen, ev.pod_idx)
        inbound = ev.dir == 2
        peer_raw = ev.src_addr if inbound else ev.orig_dst_addr
        peer = self.idents.by_address(gen, ev.family, peer_raw)
        if peer is pod:
            peer = None
        record = event_to_flow(ev, pod, self.wall_offset_ns, self.node_name, peer)
        if not inbound:
            # connect() runs before the socket is bound: no source yet. Show the pod's own address.
            ip = record["flow"]["IP"]
            if ipaddress.ip_address(ip["source"]).is_unspecified:
                own = self.idents.address_of(gen, ev.pod_idx, ev.family)
                if own:
                    ip["source"] = own
                    record["flow"]["bpfinit"]["source_unbound"] = True
        return record, ev.ts_ns + self.wall_offset_ns

    def stream(self, emit: Callable[[dict], None], follow: bool, max_events: int | None = None,
               timeout_s: float | None = None, stop: Callable[[], bool] = lambda: False) -> int:
        """Read events; emit matching records. Bounded by max_events/timeout/stop(). Returns matches."""
        done = False

        def on_event(gen: str, raw: bytes):
            nonlocal done
            if done:
                return
            self.seen += 1
            record, wall = self.to_record(gen, raw)
            if self.flt.match(record, wall):
                self.matched += 1
                emit(record)
                if max_events is not None and self.matched >= max_events:
                    done = True

        with sole_reader(self.bpffs):
            return self._read(on_event, follow, timeout_s, stop, lambda: done)

    def _read(self, on_event, follow: bool, timeout_s: float | None, stop: Callable[[], bool],
              done: Callable[[], bool]) -> int:
        reader = EventReader(self.gens, on_event)
        try:
            if not follow:
                reader.drain()
                return self.matched
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not done() and not stop():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                reader.poll(100)
            return self.matched
        finally:
            reader.close()


# ---------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or OneLineParser(prog="bpfinit-agent observe",
                                description="Stream bpfinit's capture decisions on this node.")
    p.add_argument("--bpffs", default=os.environ.get("BPFINIT_BPFFS", DEFAULT_BPFFS))
    p.add_argument("--namespace", action="append", default=[], help="either end in this namespace")
    p.add_argument("--pod", action="append", default=[], help="either end is this pod (NAME or NS/NAME)")
    p.add_argument("--verdict", action="append", default=[],
                   help="REDIRECTED, CAPTURED, BYPASSED, DENIED, REFUSED (repeat or comma-separate)")
    p.add_argument("--reason", action="append", default=[], help="e.g. excluded_cidr, egress_policy")
    p.add_argument("--to-cidr", action="append", default=[], help="(original) destination inside CIDR")
    p.add_argument("--port", action="append", default=[], help="source or destination port")
    p.add_argument("--since", help="drop events older than this (30s, 5m, 1h or RFC 3339)")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming new events")
    p.add_argument("-o", "--output", choices=("json", "table"), default="json")
    p.add_argument("--max-events", type=int, help="stop after this many matching events")
    p.add_argument("--timeout", type=float, help="with --follow: stop after this many seconds")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", socket.gethostname()))
    cfg = p.add_argument_group("event settings (apply to the whole node, then exit unless --follow)")
    cfg.add_argument("--set-rate", type=int, help="events per second per pod per CPU (default 200)")
    cfg.add_argument("--set-burst", type=int, help="rate-limit burst (default 400)")
    onoff = cfg.add_mutually_exclusive_group()
    onoff.add_argument("--events-off", action="store_true", help="counters only, no events")
    onoff.add_argument("--events-on", action="store_true")
    return p


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    try:
        if args.set_rate is not None or args.set_burst is not None or args.events_off or args.events_on:
            events = False if args.events_off else (True if args.events_on else None)
            cfg = set_event_config(args.bpffs, events, args.set_rate, args.set_burst)
            print(json.dumps({"event_config": cfg}), file=sys.stderr)
            if not args.follow:
                return 0
        flt = FlowFilter.from_args(args.namespace, args.pod, args.verdict, args.reason, args.to_cidr,
                                   args.port, args.since)
        if args.max_events is not None and args.max_events <= 0:
            raise ObserveError("--max-events must be positive")
        observer = Observer(Path(args.bpffs), flt, args.node_name)

        def emit(record: dict):
            line = json.dumps(record) if args.output == "json" else format_flow_line(record)
            print(line, file=out, flush=True)

        stopping = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.append(1))
        observer.stream(emit, args.follow, args.max_events, args.timeout, stop=lambda: bool(stopping))
        return 0
    except (ObserveError, BpfError, identity.IdentityError) as e:
        print(f"bpfinit-agent observe: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
