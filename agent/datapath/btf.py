"""Map layouts from BTF: the kernel's own record of what a map's key and
value are.

The kernel keeps the BTF of every map bcc created (map info: btf_id,
btf_key_type_id, btf_value_type_id), so the layout of a pinned map can be
read from the map itself, whatever release created it; the layout the
programs were just compiled with is read the same way, from a loaded
program's BTF (bcc describes each table there as `struct ____btf_map_<name>
{ key; value; }`). This module is the layout source for:

- the layout check at start: a `Layout.fingerprint()` of every field's
  name, offset, size and type (recursively; the type keeps its typedef, so
  `__be32` and `__u32` differ), never just the total size;
- migration: `convert()` copies an entry from one layout to another field
  by field by name (agent/conntrack/migrate.py plans which map an entry
  goes to and which default a new field gets).

Parsing is pure (raw BTF bytes in, layouts out); reading a blob from the
kernel goes through libbpf.so.1 (agent/datapath/libbpf.py).
"""
from __future__ import annotations

import ctypes as ct
import hashlib
import os
import struct
import sys
from dataclasses import dataclass
from functools import cached_property

BTF_MAGIC = 0xEB9F
# enum btf_kind (uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = (VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BtfError(ValueError):
    pass


@dataclass(frozen=True)
class Leaf:
    """One scalar (or array of scalars) of a flattened struct."""
    path: str         # "saddr", "dir[1].flags", "pod_mac"; "" for a scalar key/value
    offset: int       # bytes from the start of the struct
    size: int         # bytes
    type: str         # "__be32", "__u8[6]", "enum fp_dir"

    @property
    def is_int(self) -> bool:
        return "[" not in self.type and self.type != "ptr"

    @property
    def big_endian(self) -> bool:
        return self.type.startswith("__be")


@dataclass(frozen=True)
class Layout:
    name: str                   # "struct fp_ct4", "__u32"
    size: int
    leaves: tuple[Leaf, ...]

    def fingerprint(self) -> str:
        """Names, offsets, sizes and types of every field, and the size."""
        text = ";".join(f"{l.path}@{l.offset}:{l.size}:{l.type}" for l in self.leaves)
        return hashlib.sha256(f"{text}#{self.size}".encode()).hexdigest()[:16]

    @cached_property
    def by_path(self) -> dict[str, Leaf]:
        return {l.path: l for l in self.leaves}

    def fields(self) -> list[tuple[str, int, int]]:
        """(name, offset, size) of the scalar leaves (agent/datapath/mapio)."""
        return [(l.path, l.offset, l.size) for l in self.leaves if l.is_int]

    def describe(self) -> str:
        return f"{self.name} ({self.size} B: " + ", ".join(
            f"{l.path or '.'} {l.type}@{l.offset}" for l in self.leaves) + ")"


class Btf:
    """A parsed BTF blob: types by id, and layouts of the ones asked for."""

    def __init__(self, raw: bytes):
        if len(raw) < 24:
            raise BtfError("BTF blob too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", raw, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", raw, 8)
        self._types = raw[hdr_len + type_off:hdr_len + type_off + type_len]
        self._strs = raw[hdr_len + str_off:hdr_len + str_off + str_len]
        # id -> (kind, name, size_or_type, vlen, kind_flag, extra bytes offset)
        self._t: list[tuple] = [(0, "void", 0, 0, 0, 0)]
        self._parse()

    def _str(self, off: int) -> str:
        end = self._strs.index(b"\0", off)
        return self._strs[off:end].decode()

    def _parse(self) -> None:
        b = self._types
        i = 0
        while i < len(b):
            name_off, info, size_type = struct.unpack_from("<III", b, i)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = info >> 31
            extra = i + 12
            self._t.append((kind, self._str(name_off), size_type, vlen, kflag, extra))
            if kind == INT or kind == VAR or kind == DECL_TAG:
                i = extra + 4
            elif kind == ARRAY:
                i = extra + 12
            elif kind in (STRUCT, UNION, DATASEC, ENUM64):
                i = extra + 12 * vlen
            elif kind in (ENUM, FUNC_PROTO):
                i = extra + 8 * vlen
            else:
                i = extra
        self._names: dict[tuple[int, str], int] = {}
        for tid, t in enumerate(self._t):
            if t[1]:
                self._names.setdefault((t[0], t[1]), tid)

    def find(self, kind: int, name: str) -> int:
        tid = self._names.get((kind, name))
        if tid is None:
            raise BtfError(f"no type {name!r} of kind {kind} in this BTF")
        return tid

    def members(self, tid: int) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of a struct or union."""
        kind, _, _, vlen, kflag, extra = self._t[tid]
        out = []
        for j in range(vlen):
            name_off, mtype, moff = struct.unpack_from("<III", self._types, extra + 12 * j)
            bits = moff >> 24 if kflag else 0
            out.append((self._str(name_off), mtype, moff & 0xFFFFFF if kflag else moff, bits))
        return out

    def _skip_modifiers(self, tid: int) -> int:
        while self._t[tid][0] in _MODIFIERS:
            tid = self._t[tid][2]
        return tid

    def size_of(self, tid: int) -> int:
        tid = self._skip_modifiers(tid)
        kind, _, st, _, _, extra = self._t[tid]
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return st
        if kind == PTR:
            return 8
        if kind == TYPEDEF:
            return self.size_of(st)
        if kind == ARRAY:
            elem, _, n = struct.unpack_from("<III", self._types, extra)
            return self.size_of(elem) * n
        raise BtfError(f"type {tid} (kind {kind}) has no size")

    def _tag(self, tid: int) -> tuple[str, int]:
        """(type tag, the id behind typedefs) of a type: the outermost
        typedef's name is kept, so byte order stays visible."""
        tid = self._skip_modifiers(tid)
        kind, name, st, _, _, _ = self._t[tid]
        if kind == TYPEDEF:
            inner = self._resolve(st)
            return name, inner
        if kind in (STRUCT, UNION):
            return f"{'struct' if kind == STRUCT else 'union'} {name}".strip(), tid
        if kind in (ENUM, ENUM64):
            return f"enum {name}".strip(), tid
        if kind == PTR:
            return "ptr", tid
        return name, tid

    def _resolve(self, tid: int) -> int:
        tid = self._skip_modifiers(tid)
        while self._t[tid][0] == TYPEDEF:
            tid = self._skip_modifiers(self._t[tid][2])
        return tid

    def layout(self, tid: int) -> Layout:
        tag, _ = self._tag(tid)
        leaves: list[Leaf] = []
        self._flatten(tid, "", 0, leaves)
        return Layout(tag, self.size_of(tid), tuple(leaves))

    def _flatten(self, tid: int, path: str, base: int, out: list[Leaf]) -> None:
        tag, inner = self._tag(tid)
        kind, _, _, _, _, extra = self._t[inner]
        if kind == STRUCT or kind == UNION:
            for mname, mtype, bitoff, bits in self.members(inner):
                if bits or bitoff % 8:
                    raise BtfError(f"{tag}.{mname}: bitfields are not supported")
                sub = f"{path}.{mname}" if path else mname
                self._flatten(mtype, sub, base + bitoff // 8, out)
            return
        if kind == ARRAY:
            elem, _, n = struct.unpack_from("<III", self._types, extra)
            etag, einner = self._tag(elem)
            if self._t[einner][0] in (STRUCT, UNION):
                esize = self.size_of(elem)
                for k in range(n):
                    self._flatten(elem, f"{path}[{k}]", base + k * esize, out)
                return
            out.append(Leaf(path, base, self.size_of(tid), f"{etag}[{n}]"))
            return
        out.append(Leaf(path, base, self.size_of(tid), tag))

    def map_types(self, map_name: str) -> tuple[int, int]:
        """(key type id, value type id) bcc recorded for table `map_name`."""
        tid = self.find(STRUCT, f"____btf_map_{map_name}")
        m = {n: t for n, t, _, _ in self.members(tid)}
        return m["key"], m["value"]


# -- from the kernel -----------------------------------------------------------

class MapInfoBtf(ct.Structure):
    # struct bpf_map_info (uapi), up to the BTF ids
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32), ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64), ("btf_id", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
    ]


class _BtfInfo(ct.Structure):
    # struct bpf_btf_info (uapi)
    _fields_ = [("btf", ct.c_uint64), ("btf_size", ct.c_uint32), ("id", ct.c_uint32),
                ("name", ct.c_uint64), ("name_len", ct.c_uint32), ("kernel_btf", ct.c_uint32)]


def _lib():
    from agent.datapath import libbpf
    lib = libbpf.lib()
    lib.bpf_btf_get_fd_by_id.argtypes = [ct.c_uint32]
    return lib


def map_info(fd: int) -> MapInfoBtf:
    info = MapInfoBtf()
    n = ct.c_uint32(ct.sizeof(info))
    if _lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)) != 0:
        err = ct.get_errno()
        raise OSError(err, f"map info: {os.strerror(err)}")
    return info


_BLOBS: dict[int, Btf] = {}


def btf_by_id(btf_id: int) -> Btf:
    """The parsed BTF object `btf_id` (cached: a BTF object never changes)."""
    if btf_id in _BLOBS:
        return _BLOBS[btf_id]
    lib = _lib()
    fd = lib.bpf_btf_get_fd_by_id(btf_id)
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, f"BTF {btf_id}: {os.strerror(err)}")
    try:
        info = _BtfInfo()
        n = ct.c_uint32(ct.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)) != 0:
            err = ct.get_errno()
            raise OSError(err, f"BTF {btf_id} info: {os.strerror(err)}")
        buf = ct.create_string_buffer(info.btf_size)
        info2 = _BtfInfo()
        info2.btf = ct.addressof(buf)
        info2.btf_size = info.btf_size
        n = ct.c_uint32(ct.sizeof(info2))
        if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info2), ct.byref(n)) != 0:
            err = ct.get_errno()
            raise OSError(err, f"BTF {btf_id} blob: {os.strerror(err)}")
        parsed = Btf(buf.raw[:info.btf_size])
    finally:
        os.close(fd)
    _BLOBS[btf_id] = parsed
    return parsed


def map_layouts(fd: int) -> tuple[Layout, Layout] | None:
    """(key, value) layouts of a map from its own BTF; None when the map was
    created without BTF (its layout cannot be known)."""
    info = map_info(fd)
    if not info.btf_id or not info.btf_value_type_id:
        return None
    b = btf_by_id(info.btf_id)
    return b.layout(info.btf_key_type_id), b.layout(info.btf_value_type_id)


def program_btf(prog_fd: int) -> Btf:
    from agent.datapath import pinned
    info = pinned.ProgInfoStats()
    n = ct.c_uint32(ct.sizeof(info))
    if _lib().bpf_obj_get_info_by_fd(prog_fd, ct.byref(info), ct.byref(n)) != 0:
        err = ct.get_errno()
        raise OSError(err, f"program info: {os.strerror(err)}")
    if not info.btf_id:
        raise BtfError("the compiled programs carry no BTF: fastpath needs a kernel and "
                       "toolchain with BTF (CONFIG_DEBUG_INFO_BTF)")
    return btf_by_id(info.btf_id)


# -- copying between layouts -------------------------------------------------------

class MigrationError(ValueError):
    pass


def _int(raw: bytes, leaf: Leaf) -> int:
    return int.from_bytes(raw[leaf.offset:leaf.offset + leaf.size],
                          "big" if leaf.big_endian else sys.byteorder)


def convert(old: Layout, new: Layout, raw: bytes, defaults: dict[str, int] | None = None) -> bytes:
    """An entry of layout `old` as layout `new`: every field of `new` takes
    the value of the field of the same name in `old` (an integer of another
    width or byte order is converted; it must fit), or its default (0 when
    none is stated)."""
    defaults = defaults or {}
    out = bytearray(new.size)
    src_by = old.by_path
    for leaf in new.leaves:
        src = src_by.get(leaf.path)
        if src is None:
            v = defaults.get(leaf.path, 0)
            if not leaf.is_int:
                if v:
                    raise MigrationError(f"{new.name}.{leaf.path}: a default for an array")
                continue
            out[leaf.offset:leaf.offset + leaf.size] = v.to_bytes(
                leaf.size, "big" if leaf.big_endian else sys.byteorder)
            continue
        if src.size == leaf.size and src.type == leaf.type:
            out[leaf.offset:leaf.offset + leaf.size] = raw[src.offset:src.offset + src.size]
        elif src.is_int and leaf.is_int:
            v = _int(raw, src)
            if v >> (8 * leaf.size):
                raise MigrationError(f"{new.name}.{leaf.path}: {v} does not fit {leaf.type}")
            out[leaf.offset:leaf.offset + leaf.size] = v.to_bytes(
                leaf.size, "big" if leaf.big_endian else sys.byteorder)
        else:
            raise MigrationError(f"{new.name}.{leaf.path}: {src.type} cannot become {leaf.type}")
    return bytes(out)


def read_fields(layout: Layout, raw: bytes) -> dict[str, int]:
    """The integer fields of an entry, by name (host-order numbers; __be
    fields as their raw integers, as the maps module reads them)."""
    return {l.path: int.from_bytes(raw[l.offset:l.offset + l.size], sys.byteorder)
            for l in layout.leaves if l.is_int}
