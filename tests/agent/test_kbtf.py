"""initagent/kbtf.py: struct member offsets from BTF, on a built blob and on the running kernel (checked
against bpftool's own reading of the same BTF)."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from initagent import accel, kbtf


def _blob(types: list[bytes], strings: bytes) -> bytes:
    type_sec = b"".join(types)
    header = struct.pack("<HBBIIIII", kbtf.BTF_MAGIC, 1, 0, 24, 0, len(type_sec), len(type_sec), len(strings))
    return header + type_sec + strings


def _record(name_off: int, kind: int, vlen: int, size_or_type: int, kind_flag: bool = False) -> bytes:
    return struct.pack("<III", name_off, (kind << 24) | vlen | (int(kind_flag) << 31), size_or_type)


def test_offsets_through_typedefs_and_anonymous_members():
    # strings: 0 "", 1 "int", 5 "atomic_t", 14 "counter", 22 "sock", 27 "flags", 33 "backlog", 41 "rmem", 46 "inner"
    strings = b"\0int\0atomic_t\0counter\0sock\0flags\0backlog\0rmem\0inner\0"
    types = [
        _record(1, kbtf.KIND_INT, 0, 4) + struct.pack("<I", 32),                            # 1 int
        _record(0, kbtf.KIND_STRUCT, 1, 4) + struct.pack("<III", 14, 1, 0),                 # 2 {int counter}
        _record(5, kbtf.KIND_TYPEDEF, 0, 2),                                                 # 3 atomic_t
        _record(0, kbtf.KIND_STRUCT, 1, 8) + struct.pack("<III", 41, 3, 32),                # 4 {_; atomic_t rmem}
        _record(0, kbtf.KIND_UNION, 1, 4) + struct.pack("<III", 46, 1, 0),                  # 5 anon {int inner}
        # struct sock {int flags; bitfield-flagged layout; struct backlog; anon union}
        _record(22, kbtf.KIND_STRUCT, 3, 24, kind_flag=True)
        + struct.pack("<III", 27, 1, (3 << 24) | 0)          # flags: 3-bit bitfield at bit 0
        + struct.pack("<III", 33, 4, 64)                     # backlog at byte 8
        + struct.pack("<III", 0, 5, 128),                    # anonymous union at byte 16
    ]
    btf = kbtf.Btf(_blob(types, strings))
    assert btf.offset("sock", "backlog") == 8
    assert btf.offset("sock", "backlog.rmem") == 12
    assert btf.offset("sock", "backlog.rmem.counter") == 12    # through the typedef
    assert btf.offset("sock", "inner") == 16                   # found inside the anonymous union
    with pytest.raises(kbtf.BtfError, match="no member"):
        btf.offset("sock", "missing")
    with pytest.raises(kbtf.BtfError, match="not in the kernel"):
        btf.offset("tcp_sock", "x")


def test_bad_blobs_are_refused():
    with pytest.raises(kbtf.BtfError, match="magic"):
        kbtf.Btf(b"\0" * 32)
    with pytest.raises(kbtf.BtfError, match="too short"):
        kbtf.Btf(b"\x9f\xeb")
    with pytest.raises(kbtf.BtfError, match="cannot read"):
        kbtf.load(Path("/nonexistent/vmlinux"))


def test_running_kernel_matches_bpftool():
    # the agent needs kernel BTF anyway (sk_storage maps); bpftool comes from scripts/install-system-deps.sh
    assert shutil.which("bpftool"), "bpftool missing: run scripts/install-system-deps.sh"
    raw = subprocess.run(["bpftool", "btf", "dump", "file", str(kbtf.VMLINUX_BTF), "format", "raw"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    sock = re.search(r"^\[\d+\] STRUCT 'sock' size=\d+ vlen=\d+\n((?:\t.*\n)+)", raw, re.M).group(1)
    backlog_bits = int(re.search(r"'sk_backlog' type_id=\d+ bits_offset=(\d+)", sock).group(1))
    rcvbuf_bits = int(re.search(r"'sk_rcvbuf' type_id=\d+ bits_offset=(\d+)", sock).group(1))
    btf = kbtf.load()
    # rmem_alloc is the first member of sk_backlog's anonymous struct
    assert btf.offset("sock", "sk_backlog.rmem_alloc") == backlog_bits // 8
    assert btf.offset("sock", "sk_rcvbuf") == rcvbuf_bits // 8
    assert accel.accel_cflags() == [f"-DBI_SK_RMEM_ALLOC_OFF={backlog_bits // 8}"]


def test_no_kernel_btf_means_no_bound_flag(monkeypatch):
    monkeypatch.setattr(kbtf, "VMLINUX_BTF", Path("/nonexistent/vmlinux"))
    assert accel.accel_cflags() == []
