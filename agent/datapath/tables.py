"""Typed tables on pinned maps, their types built from the maps' own BTF.

The kernel keeps, for every map bcc created, the BTF of its key and value
(agent/datapath/btf.py reads it). This module turns those types into ctypes
classes and offers the table interface the map modules use (`Key`, `Leaf`,
item get/set/delete, `items()`, `clear()`, `items_update_batch`), on a map
held only as an fd: the agent works on its pinned maps without bcc, so a
restart needs no compiler and the agent process never loads LLVM.

Reads of whole maps go through agent/datapath/mapio's batched walk (one
syscall per 16k entries); maps without batch operations (LPM tries, program
arrays) are walked key by key.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os

from agent.datapath import btf as btfmod
from agent.datapath import libbpf, mapio

_INTS = {(1, False): ct.c_uint8, (2, False): ct.c_uint16, (4, False): ct.c_uint32,
         (8, False): ct.c_uint64, (1, True): ct.c_int8, (2, True): ct.c_int16,
         (4, True): ct.c_int32, (8, True): ct.c_int64}


class TableError(OSError):
    pass


def ctype_of(b: btfmod.Btf, tid: int, cache: dict | None = None):
    """The ctypes type of BTF type `tid`: structs and unions with every
    member at its BTF offset (explicit padding, packed, tail padded to the
    BTF size), arrays, integers of their width and sign, enums as integers."""
    cache = {} if cache is None else cache
    if tid in cache:
        return cache[tid]
    kind, name, st, vlen, _kflag, extra = b._t[tid]
    if kind in btfmod._MODIFIERS or kind == btfmod.TYPEDEF:
        out = ctype_of(b, st, cache)
    elif kind == btfmod.INT:
        enc = int.from_bytes(b._types[extra:extra + 4], "little")
        signed = bool((enc >> 24) & 0x1)
        out = _INTS.get((st, signed)) or (ct.c_uint8 * st)
    elif kind in (btfmod.ENUM, btfmod.ENUM64):
        out = _INTS[(st, False)]
    elif kind == btfmod.PTR:
        out = ct.c_uint64
    elif kind == btfmod.ARRAY:
        elem, _, n = int.from_bytes(b._types[extra:extra + 4], "little"), 0, \
            int.from_bytes(b._types[extra + 8:extra + 12], "little")
        out = ctype_of(b, elem, cache) * n
    elif kind in (btfmod.STRUCT, btfmod.UNION):
        out = _record(b, tid, kind, name, st, cache)
    else:
        raise btfmod.BtfError(f"BTF type {tid} (kind {kind}) has no C layout")
    cache[tid] = out
    return out


def _record(b, tid, kind, name, size, cache):
    base = ct.Structure if kind == btfmod.STRUCT else ct.Union
    cls = type(name or f"anon_{tid}", (base,), {"_pack_": 1})
    cache[tid] = cls            # a member may point back to it (not in our maps)
    fields, anonymous = [], []
    at = 0
    for i, (mname, mtype, bitoff, bits) in enumerate(b.members(tid)):
        if bits or bitoff % 8:
            raise btfmod.BtfError(f"{name}.{mname}: bitfields are not supported")
        off = bitoff // 8
        mt = ctype_of(b, mtype, cache)
        if not mname:
            mname = f"_anon{i}"
            anonymous.append(mname)
        if kind == btfmod.STRUCT:
            if off > at:
                fields.append((f"_pad{i}", ct.c_uint8 * (off - at)))
            at = off + ct.sizeof(mt)
        fields.append((mname, mt))
    if kind == btfmod.STRUCT and size > at:
        fields.append(("_pad_tail", ct.c_uint8 * (size - at)))
    if anonymous:
        cls._anonymous_ = anonymous
    cls._fields_ = fields
    if kind == btfmod.UNION and ct.sizeof(cls) < size:
        raise btfmod.BtfError(f"union {name}: {ct.sizeof(cls)} B, BTF says {size} B")
    if ct.sizeof(cls) != size:
        raise btfmod.BtfError(f"{name}: built {ct.sizeof(cls)} B, BTF says {size} B")
    return cls


def _percpu(value_type, ncpu: int):
    """A per-CPU value as the kernel hands it over: one 8-byte aligned slot
    per possible CPU."""
    size = ct.sizeof(value_type)
    slot = (size + 7) // 8 * 8
    if slot != size:
        value_type = type(value_type.__name__ + "_slot", (ct.Structure,),
                          {"_pack_": 1, "_fields_": [("v", value_type),
                                                     ("_pad", ct.c_uint8 * (slot - size))]})
    return value_type * ncpu


class Table:
    """One map by fd, typed from its BTF (or from the given ctypes types)."""

    def __init__(self, name: str, fd: int, key_type=None, value_type=None):
        info = libbpf.map_info(fd)
        self.name = name
        self.map_fd = fd
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.map_id = info.id
        if key_type is None:
            key_type, value_type = _types_from_btf(name, fd, info)
        self.Key = key_type
        self.percpu = info.type in libbpf.PERCPU_MAP_TYPES
        self.Leaf = _percpu(value_type, libbpf.possible_cpus()) if self.percpu else value_type
        if ct.sizeof(self.Key) != info.key_size:
            raise TableError(errno.EINVAL, f"map {name}: key type is {ct.sizeof(self.Key)} B, "
                                           f"the map's keys are {info.key_size} B")
        self._vbuf = libbpf.value_buffer_size(info.type, info.value_size)
        if ct.sizeof(self.Leaf) != self._vbuf:
            raise TableError(errno.EINVAL, f"map {name}: value type is {ct.sizeof(self.Leaf)} B, "
                                           f"the map's values are {self._vbuf} B")

    # -- single entries ------------------------------------------------------
    def _key(self, key) -> bytes:
        raw = bytes(key) if not isinstance(key, int) else bytes(self.Key(key))
        if len(raw) != self.key_size:
            raise TypeError(f"map {self.name}: key of {len(raw)} B, expected {self.key_size} B")
        return raw

    def __getitem__(self, key):
        raw = mapio.lookup(self.map_fd, self._key(key), self._vbuf)
        if raw is None:
            raise KeyError(key)
        return self.Leaf.from_buffer_copy(raw)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key, value) -> None:
        raw = bytes(value)
        if len(raw) != self._vbuf:
            # a scalar ctypes value given for a one-slot per-CPU array etc.
            raise TypeError(f"map {self.name}: value of {len(raw)} B, expected {self._vbuf} B")
        err = mapio.update(self.map_fd, self._key(key), raw)
        if err:
            raise TableError(err, f"map {self.name}: update: {os.strerror(err)}")

    def __delitem__(self, key) -> None:
        try:
            found = mapio.delete(self.map_fd, self._key(key))
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.type in (libbpf.BPF_MAP_TYPE_ARRAY,
                                                           libbpf.BPF_MAP_TYPE_PERCPU_ARRAY):
                self[key] = self.Leaf()        # arrays cannot delete: zero it (as bcc does)
                return
            raise
        if not found:
            raise KeyError(key)

    def __contains__(self, key) -> bool:
        return mapio.lookup(self.map_fd, self._key(key), self._vbuf) is not None

    # -- whole map -----------------------------------------------------------
    def raw_items(self):
        """(key bytes, value bytes) of every entry."""
        try:
            return mapio.items(self.map_fd, self.key_size, self._vbuf)
        except OSError as exc:
            if exc.errno not in mapio.NO_BATCH:
                raise
        return list(libbpf.map_items_raw(self.map_fd, self.key_size, self._vbuf))

    def items(self):
        K, L = self.Key, self.Leaf
        return [(K.from_buffer_copy(k), L.from_buffer_copy(v)) for k, v in self.raw_items()]

    def keys(self):
        return [k for k, _ in self.items()]

    def values(self):
        return [v for _, v in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.raw_items())

    def clear(self) -> None:
        keys = [k for k, _ in self.raw_items()]
        if self.type in (libbpf.BPF_MAP_TYPE_ARRAY, libbpf.BPF_MAP_TYPE_PERCPU_ARRAY):
            zero = bytes(self._vbuf)
            for k in keys:
                mapio.update(self.map_fd, k, zero)
            return
        try:
            mapio.delete_batch(self.map_fd, keys)
        except OSError as exc:
            if exc.errno not in mapio.NO_BATCH:
                raise
            for k in keys:
                mapio.delete(self.map_fd, k)

    def items_update_batch(self, keys, values) -> None:
        """Write ctypes arrays of keys and values (bcc's signature)."""
        mapio.update_batch_packed(self.map_fd, bytes(keys), bytes(values), len(keys))


def _types_from_btf(name: str, fd: int, info):
    if info.type in (libbpf.BPF_MAP_TYPE_PROG_ARRAY,):
        return ct.c_int, ct.c_int
    if info.type == libbpf.BPF_MAP_TYPE_RINGBUF:
        return ct.c_uint8 * 0, ct.c_uint8 * 0     # no entries: records are read as a stream
    bi = btfmod.map_info(fd)
    if not bi.btf_id or not bi.btf_value_type_id:
        raise TableError(errno.ENODATA, f"map {name} carries no BTF: its layout cannot be "
                                        "known (it was not created by fastpath's loader)")
    b = btfmod.btf_by_id(bi.btf_id)
    cache = getattr(b, "_ctypes", None)
    if cache is None:
        cache = b._ctypes = {}
    return ctype_of(b, bi.btf_key_type_id, cache), ctype_of(b, bi.btf_value_type_id, cache)


def open_table(pin_root: str, name: str) -> Table:
    fd = libbpf.obj_get(os.path.join(pin_root, name))
    try:
        return Table(name, fd)
    except Exception:
        os.close(fd)
        raise


class SchemaField:
    """One member of a struct as BTF records it (the header's field names
    and type names; BTF keeps no comments)."""
    __slots__ = ("name", "ctype", "count", "comment")

    def __init__(self, name: str, ctype: str, count: int = 0):
        self.name, self.ctype, self.count, self.comment = name, ctype, count, ""


class Schema:
    """Named types of one BTF object, for decoding (agent/inspect/decode.py
    takes any object with `fields(type)` and `ctype(type)`): what a pinned
    map holds, read from the kernel's record of it rather than the header."""

    def __init__(self, b: btfmod.Btf):
        self.btf = b
        self._ct: dict = getattr(b, "_ctypes", None) or {}
        b._ctypes = self._ct
        self._fields: dict[str, tuple] = {}

    def type_name(self, tid: int) -> str:
        return self.btf._tag(tid)[0]

    def _tid(self, type_name: str) -> int:
        t = type_name.strip()
        if t.startswith("struct "):
            return self.btf.find(btfmod.STRUCT, t[len("struct "):].strip())
        if t.startswith("union "):
            return self.btf.find(btfmod.UNION, t[len("union "):].strip())
        # a bare name: a typedef ("__be32"), a struct named without its
        # keyword (as decoding recurses), or a base type ("unsigned int")
        for kind in (btfmod.TYPEDEF, btfmod.STRUCT, btfmod.INT):
            try:
                return self.btf.find(kind, t)
            except btfmod.BtfError:
                continue
        raise btfmod.BtfError(f"no type {t!r} in this BTF")

    def fields(self, type_name: str) -> tuple:
        got = self._fields.get(type_name)
        if got is None:
            b = self.btf
            out = []
            for name, mtype, _, _ in b.members(b._resolve(self._tid(type_name))):
                inner = b._skip_modifiers(mtype)
                kind, _, _, _, _, extra = b._t[inner]
                if kind == btfmod.ARRAY:
                    elem = int.from_bytes(b._types[extra:extra + 4], "little")
                    n = int.from_bytes(b._types[extra + 8:extra + 12], "little")
                    out.append(SchemaField(name, b._tag(elem)[0], n))
                else:
                    out.append(SchemaField(name, b._tag(mtype)[0]))
            got = self._fields[type_name] = tuple(out)
        return got

    def ctype(self, type_name: str):
        return ctype_of(self.btf, self._tid(type_name), self._ct)

    def map_types(self, map_name: str) -> tuple[str, str]:
        """(key type name, value type name) the compile recorded for table
        `map_name` (a program's BTF; a map's own BTF names them by id)."""
        k, v = self.btf.map_types(map_name)
        return self.type_name(k), self.type_name(v)


def map_schema(fd: int) -> tuple[Schema, str, str] | None:
    """(schema, key type name, value type name) of a map from its own BTF;
    None when it carries none. Reading BTF needs CAP_SYS_ADMIN
    (NotPrivileged otherwise)."""
    bi = btfmod.map_info(fd)
    if not bi.btf_id or not bi.btf_value_type_id:
        return None
    sch = Schema(btfmod.btf_by_id(bi.btf_id))
    return sch, sch.type_name(bi.btf_key_type_id), sch.type_name(bi.btf_value_type_id)


def program_schema(prog_fd: int) -> Schema:
    """Every type of the compile a loaded program came from (its BTF): the
    records it writes that are no map's key or value (ring-buffer events)
    are read with these. Needs CAP_SYS_ADMIN (NotPrivileged otherwise)."""
    return Schema(btfmod.program_btf(prog_fd))
