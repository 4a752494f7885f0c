"""`bpfinit-agent doctor`: can this node run bpfinit? Each check says precisely what is missing.

Besides the host checks (kernel version, caps, cgroup v2, bpffs, BTF, headers, bcc, kconfig), the kernel is
asked directly, with raw bpf(2), the way libbpf's feature probes do it: a minimal program per program type
and expected attach type (`r0 = 1; exit`), one per helper the programs call (`call HELPER; r0 = 1; exit`:
the helper is missing only when the verifier says "invalid func", "unknown func" or "program of this type
cannot use helper"; any other verifier complaint means it exists), one map per map type the datapath
declares, two loads that use a helper the way bpf/ does (sockhash lookup + sk_assign in sk_lookup,
sk_storage_get at connect), and real links: a cgroup link on a scratch cgroup and an sk_lookup link in a
scratch netns. Every probe object is closed at once; nothing stays attached or pinned.

Check dict: {"check", "group", "required", "status": ok|missing|warning, "ok", "detail"}. `ok` is false
only for a missing REQUIRED feature, so `doctor` exits non-zero exactly then; an optional feature that is
missing (sockmap acceleration, ring buffer with the perf fallback) or a probe that could not run is a
warning.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import secrets
import select
import struct
from pathlib import Path
from typing import NamedTuple

from initagent import bpfsys, cgroup, headers

MIN_KERNEL = (5, 15)  # bpf_get_netns_cookie in sock_ops/sockopt 5.15; sk_lookup 5.9, getsockopt 5.3

# What each bpf/ part gives the pod; a missing feature it needs "breaks" this.
PART_PURPOSE = {
    "connect.c": "outbound capture",
    "sockops.c": "SO_ORIGINAL_DST for the proxy",
    "getsockopt.c": "SO_ORIGINAL_DST for the proxy",
    "dns.c": "DNS capture and the UDP egress guard",
    "sk_lookup.c": "inbound capture",
    "accel.c": "sockmap acceleration (--accelerate)",
    "sock_create.c": "the egress guard's socket-type check",
    "getpeername.c": "getpeername() showing the original destination",
}
OPTIONAL_PARTS = {"accel.c"}   # off by default; the pod works without it

# First kernel with the program type + attach type (ebpf-landscape.md, bcc's kernel-versions.md).
PROG_MIN_KERNEL = {
    "inet4_connect": "4.17", "inet6_connect": "4.17", "udp4_sendmsg": "4.18", "udp6_sendmsg": "4.18",
    "udp4_recvmsg": "5.2", "udp6_recvmsg": "5.2", "sock_ops": "4.13", "getsockopt": "5.3",
    "sk_lookup": "5.9", "sk_msg_verdict": "4.17", "inet_sock_create": "4.10",
    "inet4_getpeername": "5.8", "inet6_getpeername": "5.8",
}
HELPER_MIN_KERNEL = {
    ("get_netns_cookie", "cgroup_sock_addr"): "5.7", ("get_netns_cookie", "cgroup_sock"): "5.7",
    ("get_netns_cookie", "sock_ops"): "5.15", ("get_netns_cookie", "cgroup_sockopt"): "5.15",
    ("get_netns_cookie", "sk_msg"): "5.15",
    ("sk_assign", "sk_lookup"): "5.9", ("ringbuf_reserve", None): "5.8", ("ringbuf_submit", None): "5.8",
}

# Helpers each part calls, per program type (read from bpf/*.c; "EVENTS" = events.h record()).
EVENTS = "EVENTS"
HELPER_NEEDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("connect.c", "cgroup_sock_addr", ("get_netns_cookie", "get_current_uid_gid", "sk_storage_get",
                                       "map_lookup_elem", EVENTS)),
    ("dns.c", "cgroup_sock_addr", ("get_netns_cookie", "get_current_uid_gid", "get_socket_cookie",
                                   "map_lookup_elem", "map_update_elem", EVENTS)),
    ("sockops.c", "sock_ops", ("get_netns_cookie", "sk_storage_get", "map_lookup_elem", "map_update_elem",
                               "map_delete_elem")),
    ("getsockopt.c", "cgroup_sockopt", ("get_netns_cookie", "map_lookup_elem")),
    ("sk_lookup.c", "sk_lookup", ("sk_assign", "sk_release", "map_lookup_elem", EVENTS)),
    ("sk_lookup.c", "sock_ops", ("sock_hash_update", "map_lookup_elem", EVENTS)),   # registers listeners
    ("accel.c", "sock_ops", ("get_netns_cookie", "sock_hash_update", "map_lookup_elem", "map_update_elem",
                           EVENTS)),
    ("accel.c", "sk_msg", ("get_netns_cookie", "msg_redirect_hash", "sk_storage_get", "map_lookup_elem",
                         "probe_read_kernel", EVENTS)),
    ("sock_create.c", "cgroup_sock", ("get_netns_cookie", "get_current_uid_gid", "map_lookup_elem", EVENTS)),
    ("getpeername.c", "cgroup_sock_addr", ("get_netns_cookie", "sk_storage_get", "map_lookup_elem")),
)

# Map types bpf/maps.h declares (one compile unit: every one of them must exist). The event buffer
# (ring buffer, perf event array as the fallback) and SK_STORAGE (needs BTF) are probed apart.
MAP_NEEDS: tuple[tuple[str, int, int, int, str, str], ...] = (
    # type, key size, value size, flags, what needs it, kernel
    ("hash", 8, 8, bpfsys.BPF_F_NO_PREALLOC, "per-pod config (pod_by_netns, id lists, registry)", "4.6"),
    ("lpm_trie", 8, 4, bpfsys.BPF_F_NO_PREALLOC, "CIDR lists (-i/-x, egress allow-list)", "4.11"),
    ("lru_hash", 8, 8, 0, "SO_ORIGINAL_DST by 4-tuple and DNS replies", "4.10"),
    ("percpu_hash", 8, 8, bpfsys.BPF_F_NO_PREALLOC, "decision counters", "4.6"),
    ("lru_percpu_hash", 8, 8, 0, "the per-pod event rate limit", "4.10"),
    ("array", 4, 8, 0, "observability config", "4.6"),
    ("percpu_array", 4, 8, 0, "observability stats", "4.6"),
    ("sockhash", 8, 4, 0, "inbound capture (proxy listeners) and acceleration", "4.18"),
)

VERIFIER_HELPER_MISSING = ("invalid func ", "unknown func ", "program of this type cannot use helper")
CLONE_NEWNET = 0x40000000
LINK_PROBE_TIMEOUT_S = 5.0

# instructions
MOV64_IMM, MOV64_REG, ADD64_IMM, CALL, EXIT = 0xb7, 0xbf, 0x07, 0x85, 0x95
STDW_IMM, LDXDW, JEQ_IMM = 0x7a, 0x79, 0x15
RETURN_ONE = bpfsys.insn(MOV64_IMM, 0, imm=1) + bpfsys.insn(EXIT)
SOCK_ADDR_SK_OFFSET = 64   # struct bpf_sock_addr: __bpf_md_ptr(struct bpf_sock *, sk)


class Probe(NamedTuple):
    available: bool | None   # None: the probe could not tell (not permitted, setup failed)
    detail: str


# ---------------------------------------------------------------- probes (raw bpf(2); each closes what it makes)
def _close(*fds: int) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            os.close(fd)


def _last_log_line(log: str) -> str:
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _not_permitted(err: OSError) -> bool:
    """Lacking privilege, not a feature: EPERM, or EACCES without a verifier log (the verifier also fails
    loads with EACCES, but then it says why)."""
    if err.errno == errno.EPERM:
        return True
    return err.errno == errno.EACCES and not getattr(err, "log", "").strip()


def _load(prog_type: int, attach_type: int, insns: bytes) -> int:
    return bpfsys.prog_load(prog_type, insns, expected_attach_type=attach_type)


def probe_prog_type(prog_type: int, attach_type: int = 0) -> Probe:
    """Can the kernel load a program of this type with this expected attach type?"""
    try:
        fd = _load(prog_type, attach_type, RETURN_ONE)
    except bpfsys.ProgLoadError as err:
        if _not_permitted(err):
            return Probe(None, f"not permitted to load programs ({os.strerror(err.errno)})")
        if err.errno == errno.ENOSYS:
            return Probe(None, "bpf(2) unavailable (ENOSYS: CONFIG_BPF_SYSCALL off or blocked by seccomp)")
        why = _last_log_line(err.log)
        if not why:   # refused before the verifier ran: unknown type or attach type
            return Probe(False, f"program type {prog_type} with attach type {attach_type} rejected "
                                f"({os.strerror(err.errno)})")
        return Probe(False, f"program type {prog_type} rejected by the verifier: {why}")
    _close(fd)
    return Probe(True, "loads")


def probe_helper(prog_type: int, attach_type: int, helper_id: int) -> Probe:
    """Is helper `helper_id` callable from this program type? Decided from the verifier's log, as libbpf does."""
    insns = bpfsys.insn(CALL, imm=helper_id) + RETURN_ONE
    try:
        fd = _load(prog_type, attach_type, insns)
    except bpfsys.ProgLoadError as err:
        if _not_permitted(err):
            return Probe(None, f"not permitted to load programs ({os.strerror(err.errno)})")
        line = next((ln.strip() for ln in err.log.splitlines()
                     if any(marker in ln for marker in VERIFIER_HELPER_MISSING)), "")
        if line:
            return Probe(False, f"helper #{helper_id} unavailable (verifier: {line})")
        if not err.log.strip():
            return Probe(None, f"program type {prog_type} did not load ({os.strerror(err.errno)}); "
                               "helper not probed")
        # The verifier knew the helper and complained about our dummy arguments: it exists.
        return Probe(True, "available (known to the verifier)")
    _close(fd)
    return Probe(True, "available")


def probe_map_type(map_type: int, key_size: int, value_size: int, max_entries: int = 1, flags: int = 0,
                   btf: bytes | None = None, btf_key_type_id: int = 0, btf_value_type_id: int = 0) -> Probe:
    btf_fd = map_fd = -1
    try:
        if btf is not None:
            btf_fd = bpfsys.btf_load(btf)
        map_fd = bpfsys.map_create(map_type, key_size, value_size, max_entries, flags,
                                   max(btf_fd, 0), btf_key_type_id, btf_value_type_id)
    except bpfsys.BpfError as err:
        if _not_permitted(err):
            return Probe(None, f"not permitted to create maps ({os.strerror(err.errno)})")
        what = "BTF for the map value" if btf_fd < 0 and btf is not None else f"map type {map_type}"
        return Probe(False, f"{what} rejected ({os.strerror(err.errno)})")
    finally:
        _close(map_fd, btf_fd)
    return Probe(True, "created")


def local_storage_btf() -> bytes:
    """A minimal BTF blob: [1] int, [2] struct bpfinit_probe_val { int a; int b; } (8 bytes).
    SK_STORAGE maps need BTF for key (int) and value; the real build gets it from bcc."""
    names = b"\0int\0bpfinit_probe_val\0a\0b\0"
    off_int, off_val = 1, 5
    off_a = names.index(b"\0a\0") + 1
    off_b = off_a + 2
    kind_int, kind_struct = 1, 4
    types = struct.pack("=IIII", off_int, kind_int << 24, 4, (1 << 24) | 32)         # signed, 32 bits
    types += struct.pack("=III", off_val, (kind_struct << 24) | 2, 8)
    types += struct.pack("=III", off_a, 1, 0) + struct.pack("=III", off_b, 1, 32)  # member offsets in bits
    header = struct.pack("=HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(names))
    return header + types + names


def probe_sk_storage_map() -> Probe:
    return probe_map_type(bpfsys.MAP_TYPE["sk_storage"], 4, 8, 0, bpfsys.BPF_F_NO_PREALLOC,
                          btf=local_storage_btf(), btf_key_type_id=1, btf_value_type_id=2)


def _load_with_map(map_args: tuple, prog_type: int, attach_type: int, body) -> Probe:
    """Create a map, load body(map_fd) against it, close both."""
    btf_fd = map_fd = prog_fd = -1
    try:
        map_type, key_size, value_size, max_entries, flags, btf, key_id, value_id = map_args
        if btf is not None:
            btf_fd = bpfsys.btf_load(btf)
        map_fd = bpfsys.map_create(map_type, key_size, value_size, max_entries, flags, max(btf_fd, 0),
                                   key_id, value_id)
        prog_fd = _load(prog_type, attach_type, body(map_fd))
    except bpfsys.ProgLoadError as err:
        if _not_permitted(err):
            return Probe(None, f"not permitted ({os.strerror(err.errno)})")
        return Probe(False, f"verifier: {_last_log_line(err.log) or os.strerror(err.errno)}")
    except bpfsys.BpfError as err:
        return Probe(None, f"could not create the map for the probe: {err}")
    finally:
        _close(prog_fd, map_fd, btf_fd)
    return Probe(True, "loads")


def probe_sk_lookup_assign() -> Probe:
    """sk_lookup.c's pattern: look a listener up in a SOCKHASH, bpf_sk_assign it, bpf_sk_release it."""
    def body(map_fd: int) -> bytes:
        i = bpfsys.insn
        return b"".join([
            i(MOV64_REG, 6, 1),                              # r6 = ctx
            i(STDW_IMM, 10, off=-8, imm=0),                  # key = 0 on the stack
            i(MOV64_REG, 2, 10), i(ADD64_IMM, 2, imm=-8),    # r2 = &key
            bpfsys.ld_map_fd(1, map_fd),                     # r1 = sockhash
            i(CALL, imm=bpfsys.HELPER["map_lookup_elem"]),
            i(JEQ_IMM, 0, off=7, imm=0),                     # no socket: return
            i(MOV64_REG, 7, 0),
            i(MOV64_REG, 1, 6), i(MOV64_REG, 2, 7), i(MOV64_IMM, 3, imm=0),
            i(CALL, imm=bpfsys.HELPER["sk_assign"]),
            i(MOV64_REG, 1, 7),
            i(CALL, imm=bpfsys.HELPER["sk_release"]),
            RETURN_ONE,
        ])
    return _load_with_map((bpfsys.MAP_TYPE["sockhash"], 8, 4, 1, 0, None, 0, 0),
                          bpfsys.PROG_TYPE["sk_lookup"], bpfsys.ATTACH["sk_lookup"], body)


def probe_sk_storage_at_connect() -> Probe:
    """connect.c's pattern: bpf_sk_storage_get(map, ctx->sk, NULL, F_CREATE) in cgroup/connect4."""
    def body(map_fd: int) -> bytes:
        i = bpfsys.insn
        return b"".join([
            i(LDXDW, 2, 1, off=SOCK_ADDR_SK_OFFSET),         # r2 = ctx->sk
            bpfsys.ld_map_fd(1, map_fd),
            i(MOV64_IMM, 3, imm=0), i(MOV64_IMM, 4, imm=1),  # value NULL, BPF_SK_STORAGE_GET_F_CREATE
            i(CALL, imm=bpfsys.HELPER["sk_storage_get"]),
            RETURN_ONE,
        ])
    return _load_with_map((bpfsys.MAP_TYPE["sk_storage"], 4, 8, 0, bpfsys.BPF_F_NO_PREALLOC,
                           local_storage_btf(), 1, 2),
                          bpfsys.PROG_TYPE["cgroup_sock_addr"], bpfsys.ATTACH["inet4_connect"], body)


def probe_cgroup_link(cgroup_root: Path) -> Probe:
    """BPF_LINK_CREATE of a connect4 program on a scratch sub-cgroup (made and removed here)."""
    scratch = cgroup_root / f"bpfinit-doctor-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        scratch.mkdir()
    except OSError as err:
        return Probe(None, f"cannot create a scratch cgroup under {cgroup_root}: {err.strerror}")
    cg_fd = prog_fd = link_fd = -1
    try:
        cg_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        prog_fd = _load(bpfsys.PROG_TYPE["cgroup_sock_addr"], bpfsys.ATTACH["inet4_connect"], RETURN_ONE)
        link_fd = bpfsys.link_create(prog_fd, cg_fd, bpfsys.ATTACH["inet4_connect"])
    except bpfsys.BpfError as err:
        if _not_permitted(err):
            return Probe(None, f"not permitted ({os.strerror(err.errno)})")
        return Probe(False, f"{err}")
    finally:
        _close(link_fd, prog_fd, cg_fd)   # closing the unpinned link detaches it
        try:
            scratch.rmdir()
        except OSError:
            pass
    return Probe(True, "created on a scratch cgroup")


def probe_sk_lookup_link() -> Probe:
    """BPF_LINK_CREATE of an sk_lookup program on a fresh netns: a forked child unshares one, so ours is
    untouched and the netns (and link) vanish with the child."""
    try:
        prog_fd = _load(bpfsys.PROG_TYPE["sk_lookup"], bpfsys.ATTACH["sk_lookup"], RETURN_ONE)
    except bpfsys.ProgLoadError as err:
        if _not_permitted(err):
            return Probe(None, f"not permitted ({os.strerror(err.errno)})")
        return Probe(False, f"sk_lookup program does not load: {_last_log_line(err.log) or os.strerror(err.errno)}")
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:   # child: never returns into the caller's code
            message = b"E internal error"
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.unshare(CLONE_NEWNET) != 0:
                    message = f"N unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}".encode()
                else:
                    ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
                    bpfsys.link_create(prog_fd, ns_fd, bpfsys.ATTACH["sk_lookup"])
                    message = b"Y"
            except OSError as err:
                message = f"{'N' if _not_permitted(err) else 'E'} {err}".encode()
            finally:
                os.write(write_end, message)
                os._exit(0)
        os.close(write_end)
        write_end = -1
        ready, _, _ = select.select([read_end], [], [], LINK_PROBE_TIMEOUT_S)
        answer = os.read(read_end, 4096).decode(errors="replace") if ready else ""
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    finally:
        _close(read_end, write_end, prog_fd)
    if answer.startswith("Y"):
        return Probe(True, "created in a scratch netns")
    if answer.startswith("N"):
        return Probe(None, answer[2:])
    return Probe(False, answer[2:] or f"no answer from the probe within {LINK_PROBE_TIMEOUT_S:.0f}s")


# ---------------------------------------------------------------- checks
def accel_bound_check() -> dict:
    """Kernel BTF gives sk_msg the offset of sk_rmem_alloc, which bounds what an accelerated peer holds."""
    from initagent import kbtf
    try:
        offset = kbtf.load().offset("sock", "sk_backlog.rmem_alloc")
    except kbtf.BtfError as err:
        return _check("accel queue bound", None, f"{err}: sk_msg cannot bound what a peer holds unread; the "
                      "acceleration self-test's backpressure part will decide", False, "maps")
    return _check("accel queue bound", True, f"struct sock sk_rmem_alloc at offset {offset} (kernel BTF)",
                  False, "maps")


def owner_match_check() -> dict:
    """Kernel BTF lets the hooks match the socket file's owner, as iptables does (initagent/owner.py)."""
    from initagent import owner
    flags, mode = owner.owner_cflags()
    return _check("owner match", True if flags else None, mode + ("" if flags else ": differs from iptables "
                  "only for a socket created under another identity, or in a setuid binary"), False, "maps")


def _check(name: str, ok: bool | None, detail: str, required: bool = True, group: str = "host") -> dict:
    status = "ok" if ok else ("missing" if required and ok is False else "warning")
    return {"check": name, "group": group, "required": required, "status": status,
            "ok": status != "missing", "detail": detail}


def _from_probe(name: str, probe: Probe, group: str, subject: str, breaks: str, required: bool,
                kernel: str | None, ok_detail: str | None = None) -> dict:
    """One check from one probe; a missing feature's detail names it, what it breaks and the kernel it needs."""
    if probe.available:
        return _check(name, True, ok_detail or probe.detail, required, group)
    if probe.available is None:
        return _check(name, None, f"{subject}: not verified ({probe.detail}); {breaks} may be impossible",
                      required, group)
    effect = "impossible" if required else "unavailable"
    need = f"kernel >= {kernel}; " if kernel else ""
    return _check(name, False, f"{subject} missing: {breaks} {effect} ({need}{probe.detail})", required, group)


def _programs() -> list:
    """The loader's program list (only parts present in bpf/, when the sources are here)."""
    from initagent import loader
    present = [p for p in loader.PROGRAMS if (loader.BPF_DIR / p.part).exists()]
    return present or list(loader.PROGRAMS)


def _join_purposes(parts: list[str]) -> str:
    seen: list[str] = []
    for part in parts:
        purpose = PART_PURPOSE.get(part, f"the programs of bpf/{part}")
        if purpose not in seen:
            seen.append(purpose)
    return " and ".join(seen)


def kernel_feature_checks(cgroup_root: Path | None) -> list[dict]:
    programs = _programs()
    gate = probe_prog_type(bpfsys.PROG_TYPE["cgroup_sock_addr"], bpfsys.ATTACH["inet4_connect"])
    if gate.available is None:
        return [_check("bpf(2) probes", False, f"{gate.detail}: program types, maps and helpers were not "
                       "probed (needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, and bpf(2) allowed by "
                       "seccomp)", True, "program types")]
    checks: list[dict] = []

    # program types, one per (type, attach type) the loader uses
    loadable: dict[str, int] = {}   # prog type name -> an attach type it loaded with
    by_type_attach: dict[tuple[str, str], list[str]] = {}
    for spec in programs:
        by_type_attach.setdefault((spec.prog_type, spec.attach_type), []).append(spec.part)
    for (ptype, attach), parts in by_type_attach.items():
        required = any(part not in OPTIONAL_PARTS for part in parts)
        if ptype not in bpfsys.PROG_TYPE or attach not in bpfsys.ATTACH:   # a new ProgSpec ahead of bpfsys
            checks.append(_check(f"program {ptype}/{attach}", None, "not probed: bpfsys.PROG_TYPE/ATTACH has "
                                 "no number for it", required, "program types"))
            continue
        probe = probe_prog_type(bpfsys.PROG_TYPE[ptype], bpfsys.ATTACH[attach])
        if probe.available:
            loadable.setdefault(ptype, bpfsys.ATTACH[attach])
        subject = ptype if ptype == attach else f"{ptype}/{attach}"
        checks.append(_from_probe(f"program {subject}", probe, "program types", subject,
                                  _join_purposes(parts), required, PROG_MIN_KERNEL.get(attach)))

    # maps
    ring = probe_map_type(bpfsys.MAP_TYPE["ringbuf"], 0, 0, 4096)
    for mtype, key_size, value_size, flags, purpose, kernel in MAP_NEEDS:
        probe = probe_map_type(bpfsys.MAP_TYPE[mtype], key_size, value_size, 1, flags)
        checks.append(_from_probe(f"map {mtype}", probe, "maps", f"{mtype} maps", purpose, True, kernel))
    storage = probe_sk_storage_map()
    checks.append(_from_probe("map sk_storage", storage, "maps", "sk_storage maps (with BTF)",
                              "the original destination per socket at connect (SO_ORIGINAL_DST)", True, "5.2",
                              "created (BTF-typed value, as the build declares it)"))
    checks.append(owner_match_check())   # optional: without BTF the calling task's ids stand in
    checks.append(accel_bound_check())   # optional: only --accelerate needs it
    if ring.available:
        checks.append(_check("event buffer", True, "BPF ring buffer (node-wide, ordered)", False, "maps"))
    else:
        perf = probe_map_type(bpfsys.MAP_TYPE["perf_event_array"], 4, 4, os.cpu_count() or 1)
        if perf.available:
            checks.append(_check("event buffer", None, f"ringbuf maps missing ({ring.detail}; kernel >= 5.8): "
                                 "using the perf buffer fallback (per-CPU buffers, events unordered across "
                                 "CPUs)", False, "maps"))
        else:
            checks.append(_check("event buffer", False, f"neither ringbuf ({ring.detail}) nor perf event array "
                                 f"({perf.detail}) maps: decision events and the build impossible", True, "maps"))
    event_helpers = (("ktime_get_ns", "map_update_elem", "ringbuf_reserve", "ringbuf_submit") if ring.available
                     else ("ktime_get_ns", "map_update_elem", "perf_event_output"))

    # helpers, per program type, for the parts present
    present_parts = {spec.part for spec in programs}
    wanted: dict[tuple[str, str], list[str]] = {}
    for part, ptype, helpers in HELPER_NEEDS:
        if part not in present_parts:
            continue
        for helper in helpers:
            for name in (event_helpers if helper == EVENTS else (helper,)):
                wanted.setdefault((ptype, name), []).append(part)
    for (ptype, helper), parts in wanted.items():
        if ptype not in loadable:
            continue   # the program type itself is reported missing above
        required = any(part not in OPTIONAL_PARTS for part in parts)
        probe = probe_helper(bpfsys.PROG_TYPE[ptype], loadable[ptype], bpfsys.HELPER[helper])
        kernel = HELPER_MIN_KERNEL.get((helper, ptype)) or HELPER_MIN_KERNEL.get((helper, None))
        checks.append(_from_probe(f"helper bpf_{helper} in {ptype}", probe, "helpers",
                                  f"bpf_{helper} in {ptype} programs", _join_purposes(parts), required, kernel))

    # helpers used on real maps, the way bpf/ uses them
    if "sk_lookup.c" in present_parts and "sk_lookup" in loadable:
        checks.append(_from_probe("sk_lookup listener steering", probe_sk_lookup_assign(), "helpers",
                                  "sockhash lookup + bpf_sk_assign in sk_lookup programs", "inbound capture",
                                  True, "5.9"))
    if "connect.c" in present_parts and "cgroup_sock_addr" in loadable and storage.available:
        checks.append(_from_probe("sk_storage at connect", probe_sk_storage_at_connect(), "helpers",
                                  "bpf_sk_storage_get on ctx->sk in connect programs",
                                  "SO_ORIGINAL_DST for the proxy", True, None))

    # links
    if cgroup_root is not None and "cgroup_sock_addr" in loadable:
        checks.append(_from_probe("cgroup link", probe_cgroup_link(cgroup_root), "links",
                                  "cgroup bpf links (BPF_LINK_CREATE)", "attaching to the pod cgroup", True, "5.7"))
    if "sk_lookup.c" in present_parts and "sk_lookup" in loadable:
        checks.append(_from_probe("sk_lookup link", probe_sk_lookup_link(), "links",
                                  "sk_lookup netns links", "inbound capture", True, "5.9"))
    return checks


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _kconfig() -> dict[str, str]:
    for path in (f"/boot/config-{platform.release()}", "/proc/config.gz"):
        try:
            if path.endswith(".gz"):
                import gzip
                text = gzip.open(path, "rt").read()
            else:
                text = Path(path).read_text()
        except OSError:
            continue
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {}


def run_checks(bpffs: str = "/sys/fs/bpf") -> list[dict]:
    checks = []
    version = _kernel_version()
    checks.append(_check("kernel", version >= MIN_KERNEL,
                         f"{platform.release()} (need >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]})"))
    checks.append(_check("root or CAP_BPF", os.geteuid() == 0 or _has_caps({39, 12}),
                         "needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"))
    cgroup_root = None
    try:
        cgroup_root = cgroup.v2_root()
        checks.append(_check("cgroup v2", True, str(cgroup_root)))
    except cgroup.CgroupError as err:
        checks.append(_check("cgroup v2", False, str(err)))
    is_bpffs = False
    try:
        with open("/proc/self/mounts") as f:
            is_bpffs = any(line.split()[1] == bpffs and line.split()[2] == "bpf" for line in f)
    except OSError:
        pass
    checks.append(_check("bpffs", is_bpffs, f"{bpffs} {'is' if is_bpffs else 'is not'} a bpf mount"
                         + ("" if is_bpffs else f" (mount -t bpf bpf {bpffs})")))
    # bcc compiles against kernel headers; vmlinux BTF only gives a few field offsets (map BTF is probed with
    # sk_storage): see the "owner match" and "accel queue bound" checks.
    has_btf = Path("/sys/kernel/btf/vmlinux").exists()
    checks.append(_check("BTF", True if has_btf else None, "/sys/kernel/btf/vmlinux present" if has_btf else
                         "/sys/kernel/btf/vmlinux absent: programs still compile (against kernel headers); the "
                         "owner match and the acceleration's queue bound lose their exact forms",
                         required=False))
    try:
        found = headers.find()
        checks.append(_check("kernel headers", True, f"{found.origin} -> {found.source}"))
    except headers.HeadersError as err:
        checks.append(_check("kernel headers", False, str(err)))
    try:
        import importlib.util
        ok = importlib.util.find_spec("bcc") is not None
    except ImportError:
        ok = False
    checks.append(_check("bcc", ok, "python3-bpfcc importable" if ok else "install Debian's python3-bpfcc"))
    kconfig = _kconfig()
    for option in ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF", "CONFIG_BPF_JIT", "CONFIG_NET_SOCK_MSG"):
        if kconfig:
            checks.append(_check(option, kconfig.get(option) == "y", kconfig.get(option, "not set")))
    if not kconfig:
        checks.append(_check("kernel config", True, "not readable (/boot/config-*, /proc/config.gz); "
                             "the bpf(2) probes below decide instead"))
    try:
        from initagent import netns
        netns.cookie()
        checks.append(_check("SO_NETNS_COOKIE", True, "supported"))
    except Exception as err:  # noqa: BLE001 - reported, not raised
        checks.append(_check("SO_NETNS_COOKIE", False, str(err)))
    checks.extend(kernel_feature_checks(cgroup_root))
    return checks


def _has_caps(needed: set[int]) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return all(eff & (1 << c) for c in needed)
    except OSError:
        pass
    return False


LABEL = {"ok": "ok", "missing": "MISSING", "warning": "WARN"}


def render(checks: list[dict]) -> str:
    lines = [f"[{LABEL[c['status']]}] {c['check']}: {c['detail']}" for c in checks]
    missing = [c["check"] for c in checks if c["status"] == "missing"]
    warnings = sum(c["status"] == "warning" for c in checks)
    if missing:
        lines.append(f"bpfinit cannot run here: {len(missing)} required feature(s) missing "
                     f"({', '.join(missing)})")
    else:
        lines.append(f"no required feature missing ({len(checks) - warnings} ok"
                     + (f", {warnings} warning(s))" if warnings else ")"))
    return "\n".join(lines)
