"""The running kernel's struct layouts, read from its BTF (/sys/kernel/btf/vmlinux).

bcc compiles against whatever kernel headers are installed, which need not match the
running kernel, so a probe never dereferences a kernel struct through them. It asks
this module for the offset instead and passes it as a `-D` cflag:

    btf.load(config.paths.sys).offsetof("sock_common", "skc_cookie")   # -> bytes

A member path walks nested members ("__sk_common.skc_cookie") and looks through
anonymous structs and unions as C does. Bitfields have no byte offset and are refused.
Parsing the whole of vmlinux's BTF takes ~0.15 s; the result is cached per file.

The format is the kernel's UAPI (include/uapi/linux/btf.h): a header, a type section
of variable-length records (type id 0 is void, the first record is id 1), and a string
section of NUL-terminated names.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from sonde.ingest.errors import SondeError

MAGIC = 0xEB9F
POINTER_SIZE = 8  # BTF does not record it; every kernel Sonde supports is 64-bit

# kinds
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
# bytes that follow the 12-byte common record: fixed, and per vlen entry
_EXTRA = {INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
          FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12)}
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_U32 = struct.Struct("<I")


class BTFError(SondeError):
    """The kernel's BTF is missing or unreadable, or lacks a type or member a probe needs."""


@dataclass(frozen=True)
class Member:
    offset: int   # bytes from the start of the outer struct
    size: int     # bytes
    type_id: int  # BTF type id of the member's type (modifiers kept)


class BTF:
    """One parsed BTF blob. `BTF.parse(data)` is pure; `load(sys_root)` reads and caches."""

    def __init__(self, data: bytes, source: str = "BTF"):
        self.source = source
        if len(data) < _HEADER.size:
            raise BTFError(f"{source}: {len(data)} bytes is too short for a BTF header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BTFError(f"{source}: not BTF (magic {magic:#06x}, want {MAGIC:#06x}); "
                           f"is this a little-endian kernel with CONFIG_DEBUG_INFO_BTF?")
        if version != 1:
            raise BTFError(f"{source}: BTF version {version} is not supported (only 1)")
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data):
            raise BTFError(f"{source}: truncated (sections end past {len(data)} bytes)")
        self._data = data
        self._strs = data[s0:s0 + str_len]
        # record start of each type id; id 0 (void) has none
        offsets = [0]
        by_name: dict[int, list[int]] = {}
        unpack, end, pos = _TYPE.unpack_from, t0 + type_len, t0
        extra = _EXTRA
        while pos < end:
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            offsets.append(pos)
            if name_off and kind in (STRUCT, UNION, TYPEDEF, INT, ENUM, ENUM64, FLOAT):
                by_name.setdefault(name_off, []).append(len(offsets) - 1)
            fixed, per = extra.get(kind, (0, 0))
            pos += 12 + fixed + per * (info & 0xFFFF)
        if pos != end:
            raise BTFError(f"{source}: type section does not end on a record boundary")
        self._offsets = offsets
        self._by_name = by_name
        self._enumerators: dict[str, set[int]] | None = None

    @classmethod
    def parse(cls, data: bytes, source: str = "BTF") -> "BTF":
        return cls(data, source)

    # --- raw records ------------------------------------------------------------------

    def _type(self, tid: int) -> tuple[int, int, int, int, int]:
        """(kind, vlen, kind_flag, name_off, size_or_type) of a type id."""
        if not 0 < tid < len(self._offsets):
            raise BTFError(f"{self.source}: type id {tid} out of range")
        name_off, info, st = _TYPE.unpack_from(self._data, self._offsets[tid])
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, name_off, st

    def _name(self, off: int) -> str:
        end = self._strs.index(b"\0", off)
        return self._strs[off:end].decode()

    def _ids(self, name: str, kinds: tuple[int, ...]) -> list[int]:
        """Type ids called `name` of the given kinds (a name can occur more than once)."""
        needle, found, start = b"\0" + name.encode() + b"\0", [], 0
        if self._strs.startswith(needle[1:]):  # offset 0 is "" in real BTF, but be exact
            found.append(0)
        while (i := self._strs.find(needle, start)) >= 0:
            found.append(i + 1)
            start = i + 1
        return [tid for off in found for tid in self._by_name.get(off, ()) if self._type(tid)[0] in kinds]

    def _resolve(self, tid: int) -> int:
        """Strip typedefs and qualifiers."""
        for _ in range(64):
            if tid == 0:
                return 0
            kind, *_, st = self._type(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = st
        raise BTFError(f"{self.source}: type id {tid}: modifier chain too long")

    def _size(self, tid: int) -> int:
        tid = self._resolve(tid)
        if tid == 0:
            raise BTFError(f"{self.source}: void has no size")
        kind, vlen, _, _, st = self._type(tid)
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return st
        if kind == PTR:
            return POINTER_SIZE
        if kind == ARRAY:
            elem, _index, n = struct.unpack_from("<III", self._data, self._offsets[tid] + 12)
            return n * self._size(elem)
        raise BTFError(f"{self.source}: type id {tid} (kind {kind}) has no size")

    def _members(self, tid: int):
        """(name, type id, bit offset, bitfield size or 0) of a struct or union."""
        kind, vlen, kflag, _, _ = self._type(tid)
        base = self._offsets[tid] + 12
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._data, base + 12 * i)
            bits = off >> 24 if kflag else 0
            yield (self._name(name_off) if name_off else ""), mtype, (off & 0xFFFFFF) if kflag else off, bits

    def _find(self, tid: int, name: str) -> tuple[int, int, int] | None:
        """(type id, bit offset, bitfield size) of member `name`, looking through
        anonymous struct/union members as C does."""
        for mname, mtype, bitoff, bits in self._members(tid):
            if mname == name:
                return mtype, bitoff, bits
            if not mname:
                inner = self._resolve(mtype)
                if inner and self._type(inner)[0] in (STRUCT, UNION):
                    hit = self._find(inner, name)
                    if hit:
                        return hit[0], bitoff + hit[1], hit[2]
        return None

    def _struct_ids(self, struct_name: str) -> list[int]:
        ids = self._ids(struct_name, (STRUCT, UNION))
        if not ids:
            raise BTFError(f"{self.source}: this kernel has no struct {struct_name}")
        return ids

    def _locate(self, tid: int, struct_name: str, path: str) -> tuple[int, int, int] | None:
        """(member type id, bit offset, bitfield size or 0) of `path` in struct `tid`."""
        offset_bits = 0
        parts = path.split(".")
        for depth, part in enumerate(parts):
            hit = self._find(tid, part)
            if hit is None:
                return None
            mtype, bitoff, bits = hit
            offset_bits += bitoff
            if depth == len(parts) - 1:
                r = self._resolve(mtype)
                if bits == 0 and r and self._type(r)[0] == INT:
                    enc = _U32.unpack_from(self._data, self._offsets[r] + 12)[0]
                    if (enc & 0xFF) != 8 * self._type(r)[4] or (enc >> 16) & 0xFF:
                        bits = enc & 0xFF  # old-style bitfield, described by the int itself
                return mtype, offset_bits, bits
            tid = self._resolve(mtype)
            if not tid or self._type(tid)[0] not in (STRUCT, UNION):
                raise BTFError(f"{self.source}: {struct_name}.{'.'.join(parts[:depth + 1])} is not a "
                               f"struct or union, so it has no member {parts[depth + 1]}")
        return None

    # --- public API -------------------------------------------------------------------

    def member(self, struct_name: str, path: str) -> Member:
        """Offset and size of `struct_name`'s member `path` ("a.b.c"). When the kernel
        has several structs of that name they must agree, or this refuses."""
        found = {self._locate(tid, struct_name, path) for tid in self._struct_ids(struct_name)}
        found.discard(None)
        if not found:
            raise BTFError(f"{self.source}: struct {struct_name} has no member {path} in this kernel")
        if any(bits or bitoff % 8 for _, bitoff, bits in found):
            raise BTFError(f"{self.source}: {struct_name}.{path} is a bitfield; it has no byte offset "
                           f"(read the word that holds it and mask)")
        members = {Member(bitoff // 8, self._size(mtype), mtype) for mtype, bitoff, _ in found}
        if len({(m.offset, m.size) for m in members}) > 1:
            raise BTFError(f"{self.source}: struct {struct_name} is defined more than once with "
                           f"different layouts of {path}")
        return min(members, key=lambda m: m.type_id)

    def offsetof(self, struct_name: str, path: str) -> int:
        return self.member(struct_name, path).offset

    def has_member(self, struct_name: str, path: str) -> bool:
        """Whether the kernel has the struct with that member (a bitfield counts)."""
        ids = self._ids(struct_name, (STRUCT, UNION))
        try:
            return any(self._locate(tid, struct_name, path) for tid in ids)
        except BTFError:  # a path through a non-struct member
            return False

    def enum_value(self, name: str) -> int:
        """The value of enumerator `name` (in any enum, named or not)."""
        if self._enumerators is None:
            self._enumerators = {}
            for tid in range(1, len(self._offsets)):
                kind, vlen, kflag, _, _ = self._type(tid)
                if kind not in (ENUM, ENUM64):
                    continue
                base = self._offsets[tid] + 12
                for i in range(vlen):
                    if kind == ENUM:
                        name_off, val = struct.unpack_from("<Ii" if kflag else "<II", self._data, base + 8 * i)
                    else:
                        name_off, lo, hi = struct.unpack_from("<III", self._data, base + 12 * i)
                        val = hi << 32 | lo
                        if kflag and val >> 63:
                            val -= 1 << 64
                    self._enumerators.setdefault(self._name(name_off), set()).add(val)
        values = self._enumerators.get(name)
        if not values:
            raise BTFError(f"{self.source}: this kernel has no enumerator {name}")
        if len(values) > 1:
            raise BTFError(f"{self.source}: enumerator {name} has several values {sorted(values)}")
        return next(iter(values))

    def has_enum_value(self, name: str) -> bool:
        try:
            self.enum_value(name)
        except BTFError:
            return False
        return True

    def spell(self, tid: int) -> str:
        """A type as C spells it, enough to recognise it: `struct request *`, `unsigned int`."""
        if tid == 0:
            return "void"
        kind, _, _, name_off, st = self._type(tid)
        name = self._name(name_off) if name_off else "(anon)"
        if kind == PTR:
            return self.spell(st) + " *"
        if kind in (CONST, VOLATILE, RESTRICT):
            return {CONST: "const ", VOLATILE: "volatile ", RESTRICT: "restrict "}[kind] + self.spell(st)
        if kind == TYPE_TAG:
            return self.spell(st)
        if kind in (STRUCT, UNION, ENUM, ENUM64, FWD):
            word = {STRUCT: "struct", UNION: "union"}.get(kind, "enum")
            if kind == FWD:
                word = "union" if self._type(tid)[2] else "struct"
            return f"{word} {name}"
        return name

    def raw_tracepoint_args(self, tracepoint: str) -> list[str]:
        """The arguments a raw tracepoint program gets in ctx->args[], as C types, from
        the kernel's `btf_trace_<tracepoint>` typedef (its first parameter, the
        tracepoint's private data, is not passed and is left out)."""
        ids = self._ids(f"btf_trace_{tracepoint}", (TYPEDEF,))
        if not ids:
            raise BTFError(f"{self.source}: this kernel has no raw tracepoint {tracepoint}")
        ptr = self._type(ids[0])[4]
        kind, _, _, _, proto = self._type(ptr)
        if kind != PTR or self._type(proto)[0] != FUNC_PROTO:
            raise BTFError(f"{self.source}: btf_trace_{tracepoint} is not a function pointer")
        vlen = self._type(proto)[1]
        base = self._offsets[proto] + 12
        params = [struct.unpack_from("<II", self._data, base + 8 * i)[1] for i in range(vlen)]
        return [self.spell(t) for t in params[1:]]

    def raw_tracepoint_type_id(self, tracepoint: str) -> int | None:
        """The type id of the `btf_trace_<tracepoint>` typedef (what a BTF-typed raw
        tracepoint program is loaded against), None if this kernel has none."""
        ids = self._ids(f"btf_trace_{tracepoint}", (TYPEDEF,))
        return ids[0] if ids else None

    def sizeof(self, type_name: str) -> int:
        """Size in bytes of a struct, union, typedef, int, enum or float named `type_name`."""
        ids = self._ids(type_name, (STRUCT, UNION, TYPEDEF, INT, ENUM, ENUM64, FLOAT))
        if not ids:
            raise BTFError(f"{self.source}: this kernel has no type {type_name}")
        sizes = {self._size(t) for t in ids}
        if len(sizes) > 1:
            raise BTFError(f"{self.source}: type {type_name} is defined more than once with sizes {sorted(sizes)}")
        return sizes.pop()


_CACHE: dict[Path, BTF] = {}


def load(sys_root: Path | str = "/sys") -> BTF:
    """The kernel's BTF under `sys_root` (kernel/btf/vmlinux), parsed once per path."""
    path = Path(sys_root) / "kernel/btf/vmlinux"
    if path not in _CACHE:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BTFError(f"cannot read the kernel's BTF at {path} ({e.strerror}); it needs Linux 5.2+ "
                           f"built with CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu and RHEL kernels are)")
        _CACHE[path] = BTF(data, str(path))
    return _CACHE[path]


def offsetof(struct_name: str, path: str, sys_root: Path | str = "/sys") -> int:
    return load(sys_root).offsetof(struct_name, path)


def sizeof(type_name: str, sys_root: Path | str = "/sys") -> int:
    return load(sys_root).sizeof(type_name)


def has_member(struct_name: str, path: str, sys_root: Path | str = "/sys") -> bool:
    return load(sys_root).has_member(struct_name, path)
