"""Field offsets of the running kernel's structs, from its BTF (/sys/kernel/btf/vmlinux).

bcc compiles against whatever headers the node has (often older than the kernel), so a program that must
read a kernel struct field gets the field's offset from here as a -D flag instead: the few lines of CO-RE
we need. Only what that takes is parsed: the type section's records and struct/union members.
"""
from __future__ import annotations

import struct
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
KIND_INT, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 13, 14, 15, 17, 18, 19
# bytes that follow the 12-byte record, per kind: (fixed, per member)
EXTRA = {KIND_INT: (4, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12), KIND_UNION: (0, 12), KIND_ENUM: (0, 8),
         KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12), KIND_DECL_TAG: (4, 0),
         KIND_ENUM64: (0, 12)}
MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class BtfError(Exception):
    pass


class Btf:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        self.data = data
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        # one (name_off, kind, kind_flag, size_or_type, vlen, members_pos) per type id - 1; names and members
        # are decoded only for the few types a lookup touches (the kernel has ~130k types)
        self.types: list[tuple[int, int, bool, int, int, int]] = []
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.Struct("<III").unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack(data, pos)
            pos += 12
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self.types.append((name_off, kind, bool(info >> 31), size_or_type, vlen, pos))
            fixed, per = EXTRA.get(kind, (0, 0))
            pos += fixed + per * vlen

    def _str(self, off: int) -> str:
        return self.strings[off: self.strings.index(b"\0", off)].decode()

    def _type(self, type_id: int):
        return self.types[type_id - 1]

    def _members(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of a struct/union's members."""
        _, _, kind_flag, _, vlen, pos = self._type(type_id)
        members = []
        for i in range(vlen):
            m_name, m_type, m_off = struct.unpack_from("<III", self.data, pos + 12 * i)
            members.append((self._str(m_name), m_type, m_off & 0xFFFFFF if kind_flag else m_off))
        return members

    def _resolve(self, type_id: int) -> int:
        """Through typedefs and qualifiers to the underlying type."""
        for _ in range(32):
            _, kind, _, ref, _, _ = self._type(type_id)
            if kind not in MODIFIERS:
                return type_id
            type_id = ref
        raise BtfError("type chain too long")

    def struct_id(self, name: str) -> int:
        wanted = name.encode()
        for i, (name_off, kind, _, size, _, _) in enumerate(self.types, start=1):
            if kind == KIND_STRUCT and size > 0 and self.strings.startswith(wanted + b"\0", name_off):
                return i
        raise BtfError(f"struct {name} not in the kernel's BTF")

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of a (dotted) member path in struct_name, e.g. offset("sock", "sk_backlog.rmem_alloc").
        Anonymous struct/union members are searched through, as C does."""
        type_id, total_bits = self.struct_id(struct_name), 0
        for part in path.split("."):
            found = self._find_member(self._resolve(type_id), part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            type_id, bits = found
            total_bits += bits
        if total_bits % 8:
            raise BtfError(f"{struct_name}.{path} is a bitfield")
        return total_bits // 8

    def _find_member(self, type_id: int, name: str, depth: int = 0):
        kind = self._type(type_id)[1]
        if kind not in (KIND_STRUCT, KIND_UNION) or depth > 8:
            return None
        members = self._members(type_id)
        for m_name, m_type, bit_offset in members:
            if m_name == name:
                return m_type, bit_offset
        for m_name, m_type, bit_offset in members:
            if not m_name:   # anonymous struct/union: its members belong to the parent
                inner = self._find_member(self._resolve(m_type), name, depth + 1)
                if inner is not None:
                    return inner[0], bit_offset + inner[1]
        return None


_parsed: dict[tuple[str, int, int], Btf] = {}


def load(path: Path | None = None) -> Btf:
    """The parsed BTF at `path` (the kernel's by default), parsed once per file version: a compile asks for
    several offsets."""
    path = path or VMLINUX_BTF
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _parsed:
            _parsed.clear()
            _parsed[key] = Btf(path.read_bytes())
        return _parsed[key]
    except OSError as err:
        raise BtfError(f"cannot read {path}: {err.strerror}") from None
