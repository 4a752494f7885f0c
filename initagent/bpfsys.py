"""Raw bpf(2) through ctypes: pins, cgroup attach/query, links and map operations on plain fds.

Warm pod setup uses only this module (no bcc import, no compile). Every failure raises BpfError with
the command name and errno text.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)  # the already-loaded libc (find_library would spawn ldconfig)
_libc.syscall.restype = ctypes.c_long
_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}[os.uname().machine]

# commands
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
MAP_LOOKUP_BATCH = 24
OBJ_PIN, OBJ_GET, PROG_ATTACH, PROG_DETACH = 6, 7, 8, 9
OBJ_GET_INFO_BY_FD, PROG_QUERY, PROG_GET_FD_BY_ID = 15, 16, 13
LINK_CREATE, LINK_DETACH = 28, 34

# update flags
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_F_ALLOW_MULTI = 2

# program types and attach types used by bpfinit
PROG_TYPE = {"cgroup_sock": 9, "sock_ops": 13, "sk_msg": 16, "cgroup_sock_addr": 18, "cgroup_sockopt": 25,
             "sk_lookup": 30}
ATTACH = {"inet_sock_create": 2, "sock_ops": 3, "sk_msg_verdict": 7, "inet4_connect": 10, "inet6_connect": 11,
          "udp4_sendmsg": 14, "udp6_sendmsg": 15, "udp4_recvmsg": 19, "udp6_recvmsg": 20,
          "getsockopt": 21, "setsockopt": 22, "sk_lookup": 36,
          "inet4_getpeername": 29, "inet6_getpeername": 30}   # getpeername: checked against vmlinux BTF

# Feature probes (doctor) and anything else that loads or creates objects itself.
MAP_CREATE, PROG_LOAD, BTF_LOAD = 0, 5, 18
BPF_F_NO_PREALLOC = 1
MAP_TYPE = {"hash": 1, "array": 2, "perf_event_array": 4, "percpu_hash": 5, "percpu_array": 6,
            "lru_hash": 9, "lru_percpu_hash": 10, "lpm_trie": 11, "sockhash": 18, "sk_storage": 24,
            "ringbuf": 27}
HELPER = {"map_lookup_elem": 1, "map_update_elem": 2, "map_delete_elem": 3, "ktime_get_ns": 5,
          "get_current_uid_gid": 15, "perf_event_output": 25, "get_current_task": 35, "get_socket_cookie": 46,
          "sock_hash_update": 70, "msg_redirect_hash": 71, "sk_release": 86, "sk_storage_get": 107,
          "probe_read_kernel": 113, "get_netns_cookie": 122, "sk_assign": 124, "ringbuf_reserve": 131, "ringbuf_submit": 132}

_ATTR_SIZE = 128


class BpfError(OSError):
    pass


def _call(cmd: int, attr: ctypes.Array, what: str) -> int:
    ret = _libc.syscall(_NR_BPF, cmd, attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what}): {os.strerror(err)}")
    return ret


def _attr(fmt: str, *values) -> ctypes.Array:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


# ---------------------------------------------------------------- pins
def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _call(OBJ_PIN, _attr("=QI", ctypes.addressof(p), fd), f"OBJ_PIN {path}")


def obj_get(path: str, flags: int = 0) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _call(OBJ_GET, _attr("=QII", ctypes.addressof(p), 0, flags), f"OBJ_GET {path}")


# ---------------------------------------------------------------- cgroup attach (legacy, multi)
def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = BPF_F_ALLOW_MULTI) -> None:
    _call(PROG_ATTACH, _attr("=IIII", target_fd, prog_fd, attach_type, flags), "PROG_ATTACH")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    _call(PROG_DETACH, _attr("=III", target_fd, prog_fd, attach_type), "PROG_DETACH")


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Program ids attached to target (cgroup fd / netns fd) for attach_type."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = _attr("=IIIIQI", target_fd, attach_type, 0, 0, ctypes.addressof(ids), max_progs)
    _call(PROG_QUERY, attr, "PROG_QUERY")
    count = struct.unpack_from("=I", attr, 24)[0]
    return list(ids[:min(count, max_progs)])


# ---------------------------------------------------------------- links
def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    return _call(LINK_CREATE, _attr("=IIII", prog_fd, target_fd, attach_type, flags), "LINK_CREATE")


def link_detach(link_fd: int) -> None:
    _call(LINK_DETACH, _attr("=I", link_fd), "LINK_DETACH")


# ---------------------------------------------------------------- info
def obj_info(fd: int, size: int = 256) -> bytes:
    info = ctypes.create_string_buffer(size)
    _call(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, size, ctypes.addressof(info)), "OBJ_GET_INFO_BY_FD")
    return info.raw


def prog_id(fd: int) -> int:
    """bpf_prog_info: type u32 at 0, id u32 at 4."""
    return struct.unpack_from("=I", obj_info(fd), 4)[0]


def link_info(fd: int) -> dict:
    """bpf_link_info: type, id, prog_id; for cgroup links cgroup_id (u64) + attach_type follow."""
    raw = obj_info(fd, 64)
    link_type, link_id, prog = struct.unpack_from("=III", raw, 0)
    out = {"type": link_type, "id": link_id, "prog_id": prog}
    if link_type == 3:  # BPF_LINK_TYPE_CGROUP
        out["cgroup_id"], out["attach_type"] = struct.unpack_from("=QI", raw, 16)
    return out


# ---------------------------------------------------------------- maps
def map_info(fd: int) -> dict:
    """bpf_map_info: type, id, key_size, value_size, max_entries, map_flags."""
    t, i, ks, vs, me, fl = struct.unpack_from("=IIIIII", obj_info(fd, 128), 0)
    return {"type": t, "id": i, "key_size": ks, "value_size": vs, "max_entries": me, "flags": fl}


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _call(MAP_UPDATE_ELEM, _attr("=IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), flags),
          "MAP_UPDATE_ELEM")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _call(MAP_LOOKUP_ELEM, _attr("=IIQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v)), "MAP_LOOKUP_ELEM")
    except BpfError as err:
        if err.errno == _errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _call(MAP_DELETE_ELEM, _attr("=IIQ", fd, 0, ctypes.addressof(k)), "MAP_DELETE_ELEM")
    except BpfError as err:
        if err.errno == _errno.ENOENT:
            return False
        raise
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    nk = ctypes.create_string_buffer(key_size)
    kaddr = 0
    if key is not None:
        k = ctypes.create_string_buffer(key, len(key))
        kaddr = ctypes.addressof(k)
    try:
        _call(MAP_GET_NEXT_KEY, _attr("=IIQQ", fd, 0, kaddr, ctypes.addressof(nk)), "MAP_GET_NEXT_KEY")
    except BpfError as err:
        if err.errno == _errno.ENOENT:
            return None
        raise
    return nk.raw


def map_keys(fd: int, key_size: int, limit: int = 10_000_000) -> list[bytes]:
    """All keys (bounded). Deleting while iterating is fine: collect first, then act."""
    keys: list[bytes] = []
    key = None
    while len(keys) < limit:
        key = map_next_key(fd, key, key_size)
        if key is None:
            break
        keys.append(key)
    return keys


def map_items_batch(fd: int, key_size: int, value_size: int, limit: int = 10_000_000,
                    batch: int = 256) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs with BPF_MAP_LOOKUP_BATCH: one syscall per `batch` entries instead of two
    per entry. `value_size` is the whole value per entry (per-CPU maps: 8-byte slot x CPUs). Raises
    BpfError for map types without the batch op (EINVAL/ENOTSUPP) or a hash bucket larger than `batch`
    (ENOSPC): callers fall back to map_keys + map_lookup."""
    token_size = max(8, key_size)           # hash maps use a u32 bucket token, arrays a key
    tokens = [ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size)]
    keys = ctypes.create_string_buffer(key_size * batch)
    values = ctypes.create_string_buffer(value_size * batch)
    items: list[tuple[bytes, bytes]] = []
    first = True
    while len(items) < limit:
        token_in, token_out = tokens
        attr = _attr("=QQQQIIQQ", 0 if first else ctypes.addressof(token_in), ctypes.addressof(token_out),
                     ctypes.addressof(keys), ctypes.addressof(values), batch, fd, 0, 0)
        try:
            _call(MAP_LOOKUP_BATCH, attr, "MAP_LOOKUP_BATCH")
            done = False
        except BpfError as err:
            if err.errno != _errno.ENOENT:   # ENOENT: no more entries (count says how many came with it)
                raise
            done = True
        count = struct.unpack_from("=I", attr, 32)[0]
        raw_keys, raw_values = keys.raw, values.raw
        items += [(raw_keys[i * key_size:(i + 1) * key_size], raw_values[i * value_size:(i + 1) * value_size])
                  for i in range(count)]
        if done:
            break
        tokens.reverse()                    # this call's out token is the next call's in token
        first = False
    return items[:limit]


class Fd:
    """An owned fd usable as a context manager."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __int__(self):
        return self.fd


ENABLE_STATS = 32


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): per-program run_time_ns/run_cnt while the returned fd is open."""
    return _call(ENABLE_STATS, _attr("=I", 0), "ENABLE_STATS")


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) from bpf_prog_info."""
    return struct.unpack_from("=QQ", obj_info(fd, 256), 192)


# ---------------------------------------------------------------- loading (feature probes)
class ProgLoadError(BpfError):
    """PROG_LOAD failed; `log` is the verifier's log ("" when the kernel refused before verifying)."""

    def __init__(self, err: int, message: str, log: str):
        super().__init__(err, message)
        self.log = log


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction (struct bpf_insn, host byte order)."""
    return struct.pack("=BBhi", code, (src << 4) | dst, off, imm)


def ld_map_fd(dst: int, map_fd: int) -> bytes:
    """`dst = map` (BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD): two instruction slots."""
    return insn(0x18, dst, 1, 0, map_fd) + insn(0, 0, 0, 0, 0)


def prog_load(prog_type: int, insns: bytes, expected_attach_type: int = 0, license: str = "GPL",
              log_size: int = 1 << 16) -> int:
    """Load a program; returns its fd. The verifier log is kept for the error (doctor reads it)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(log_size)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIQQIIQ", attr, 0, prog_type, len(insns) // 8, ctypes.addressof(code),
                     ctypes.addressof(lic), 1, log_size, ctypes.addressof(log))
    struct.pack_into("=I", attr, 68, expected_attach_type)
    ret = _libc.syscall(_NR_BPF, PROG_LOAD, attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        text = log.value.decode(errors="replace")
        raise ProgLoadError(err, f"bpf(PROG_LOAD type {prog_type}): {os.strerror(err)}", text)
    return ret


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               btf_fd: int = 0, btf_key_type_id: int = 0, btf_value_type_id: int = 0) -> int:
    attr = _attr("=IIIII", map_type, key_size, value_size, max_entries, flags)
    struct.pack_into("=III", attr, 48, btf_fd, btf_key_type_id, btf_value_type_id)
    return _call(MAP_CREATE, attr, f"MAP_CREATE type {map_type}")


def btf_load(blob: bytes) -> int:
    data = ctypes.create_string_buffer(blob, len(blob))
    return _call(BTF_LOAD, _attr("=QQI", ctypes.addressof(data), 0, len(blob)), "BTF_LOAD")
