"""Raw map I/O by fd: batched reads, writes and deletes of key/value bytes,
and unpacking by a layout.

One layer for every caller that walks or rewrites a whole map (conntrack
GC, backend purge, migration, metrics): entries are read with
BPF_MAP_LOOKUP_BATCH into one buffer per batch and unpacked with
struct.iter_unpack, never one ctypes object or one syscall per entry.
A layout is a list of (field name, offset, size) for a struct: from BTF
(agent/datapath/btf.py) or a compiled ctypes class (`fields_of`).
Uses libbpf.so.1 through agent/datapath/libbpf.py; no bcc.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
from collections.abc import Iterable, Iterator, Sequence

from agent.datapath import libbpf

BATCH = 16384
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
# what a batch operation fails with on a map type that has none (524: ENOTSUPP)
NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, 524)


class BatchError(OSError):
    """A batched write or delete refused an entry: `done` entries before it
    were applied, none after it."""

    def __init__(self, err: int, message: str, done: int):
        super().__init__(err, message)
        self.done = done


def _lib():
    lib = libbpf.lib()
    if getattr(lib, "_fp_mapio", False):
        return lib
    lib.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                         ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
    lib.bpf_map_delete_batch.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32),
                                         ct.c_void_p]
    lib.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p,
                                         ct.POINTER(ct.c_uint32), ct.c_void_p]
    lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    lib._fp_mapio = True
    return lib


# Buffer types by size, made once. `ct.create_string_buffer` makes an array
# type per call unless one of that size is alive (ctypes caches them
# weakly), and a type is a reference cycle: every single-entry write left
# garbage only the cyclic collector frees. Inputs the kernel only reads
# (keys, values to write) are passed as the bytes objects themselves: the
# functions take void pointers.
_BUFFER_TYPES: dict[int, type] = {}


def buffer(size: int):
    """A zeroed, writable buffer of `size` bytes (for the kernel to fill)."""
    t = _BUFFER_TYPES.get(size)
    if t is None:
        t = _BUFFER_TYPES[size] = ct.c_char * size
    return t()


class _BatchOpts(ct.Structure):
    # struct bpf_map_batch_opts (libbpf's bpf.h)
    _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


def _opts(elem_flags: int = 0) -> _BatchOpts:
    o = _BatchOpts()
    o.sz = ct.sizeof(_BatchOpts)
    o.elem_flags = elem_flags
    return o


def batches(fd: int, key_size: int, value_size: int,
            batch: int = BATCH) -> Iterator[tuple[memoryview, memoryview, int]]:
    """(keys, values, count) per batch of the whole map: `count` entries,
    packed back to back. `value_size` is the buffer size of one value
    (libbpf.value_buffer_size for per-CPU maps). Entries added or removed
    during the walk may or may not be seen; none is seen twice."""
    lib = _lib()
    keys = buffer(key_size * batch)
    vals = buffer(value_size * batch)
    # The batch cursor is a bucket number for hash maps but a whole key for
    # the kernel's generic walk (arrays, LPM tries): an IPv6 trie's 20-byte
    # key written into an 8-byte cursor overran the heap.
    cursor = max(8, key_size)
    in_b = buffer(cursor)
    out_b = buffer(cursor)
    first = True
    while True:
        cnt = ct.c_uint32(batch)
        res = lib.bpf_map_lookup_batch(fd, None if first else in_b, out_b, keys, vals,
                                       ct.byref(cnt), None)
        err = ct.get_errno() if res else 0
        if res and err != errno.ENOENT:
            raise OSError(err, f"map {fd}: batch lookup: {os.strerror(err)}")
        if cnt.value:
            yield (memoryview(keys)[:key_size * cnt.value],
                   memoryview(vals)[:value_size * cnt.value], cnt.value)
        if res:                 # ENOENT: that was the last batch
            return
        ct.memmove(in_b, out_b, cursor)
        first = False


def items(fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the map as bytes."""
    out = []
    for kb, vb, n in batches(fd, key_size, value_size):
        kraw, vraw = bytes(kb), bytes(vb)
        out.extend((kraw[i * key_size:(i + 1) * key_size],
                    vraw[i * value_size:(i + 1) * value_size]) for i in range(n))
    return out


def delete_batch(fd: int, keys: Sequence[bytes]) -> int:
    """Delete these keys (all of one size); keys already gone (the LRU, the
    datapath, a concurrent GC) are skipped. Returns how many were deleted."""
    if not keys:
        return 0
    lib = _lib()
    size = len(keys[0])
    deleted = 0
    i = 0
    while i < len(keys):
        part = keys[i:i + BATCH]
        buf = b"".join(part)
        if len(buf) != len(part) * size:
            raise ValueError(f"map {fd}: batch delete: keys of unequal sizes")
        cnt = ct.c_uint32(len(part))
        res = lib.bpf_map_delete_batch(fd, buf, ct.byref(cnt), None)
        deleted += cnt.value
        i += cnt.value
        if res:
            err = ct.get_errno()
            if err != errno.ENOENT:
                raise BatchError(err, f"map {fd}: batch delete: {os.strerror(err)}", deleted)
            i += 1              # that key went meanwhile
    return deleted


def update_batch(fd: int, pairs: Sequence[tuple[bytes, bytes]], flags: int = BPF_ANY) -> int:
    """Write (key, value) pairs in order, in batches. With BPF_NOEXIST, keys
    that exist are left as they are and skipped. Returns how many were
    written; raises on any other error (E2BIG: the map is full)."""
    if not pairs:
        return 0
    ks, vs = len(pairs[0][0]), len(pairs[0][1])
    kbuf = b"".join([k for k, _ in pairs])
    vbuf = b"".join([v for _, v in pairs])
    if len(kbuf) != len(pairs) * ks or len(vbuf) != len(pairs) * vs:
        raise ValueError(f"map {fd}: batch update: keys or values of unequal sizes")
    return update_batch_packed(fd, kbuf, vbuf, len(pairs), flags)


def update_batch_packed(fd: int, keys: bytes, values: bytes, count: int,
                        flags: int = BPF_ANY) -> int:
    """update_batch of `count` keys and values packed back to back (each
    buffer `count` times one key's, one value's size)."""
    if not count:
        return 0
    if len(keys) % count or len(values) % count:
        raise ValueError(f"map {fd}: batch update: {len(keys)} B of keys, {len(values)} B of "
                         f"values for {count} entries")
    lib = _lib()
    ks, vs = len(keys) // count, len(values) // count
    written = 0
    i = 0
    while i < count:
        n = min(BATCH, count - i)
        kbuf = keys[i * ks:(i + n) * ks] if (i or n < count) else keys
        vbuf = values[i * vs:(i + n) * vs] if (i or n < count) else values
        cnt = ct.c_uint32(n)
        opts = _opts(flags)
        res = lib.bpf_map_update_batch(fd, kbuf, vbuf, ct.byref(cnt), ct.byref(opts))
        written += cnt.value
        i += cnt.value
        if res:
            err = ct.get_errno()
            if err == errno.EEXIST and flags == BPF_NOEXIST:
                i += 1          # that key is there already: keep it
                continue
            raise BatchError(err, f"map {fd}: batch update: {os.strerror(err)}", written)
    return written


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    vb = buffer(value_size)
    if _lib().bpf_map_lookup_elem(fd, bytes(key), vb) != 0:
        return None
    return vb.raw


def delete(fd: int, key: bytes) -> bool:
    if _lib().bpf_map_delete_elem(fd, bytes(key)) == 0:
        return True
    err = ct.get_errno()
    if err == errno.ENOENT:
        return False
    raise OSError(err, f"map {fd}: delete: {os.strerror(err)}")


def update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> int:
    """0, or the errno of a refused write (EEXIST with BPF_NOEXIST, E2BIG
    when full)."""
    if _lib().bpf_map_update_elem(fd, bytes(key), bytes(value), flags) == 0:
        return 0
    return ct.get_errno()


# -- unpacking by layout ---------------------------------------------------------

Field = tuple[str, int, int]        # (name, byte offset, byte size)
# 16 bytes: an IPv6 address, packed and unpacked as bytes (network order)
_CODES = {1: "B", 2: "H", 4: "I", 8: "Q", 16: "16s"}


def fields_of(ctype) -> list[Field]:
    """The top-level scalar fields of a compiled ctypes struct (bcc's
    table.Key / table.Leaf), as a layout."""
    out = []
    for name, _ in ctype._fields_:
        d = getattr(ctype, name)
        out.append((name, d.offset, d.size))
    return out


def _fields_struct(layout: Iterable[Field], size: int,
                   names: Sequence[str]) -> tuple[struct.Struct, list[str]]:
    """A struct.Struct over `size` bytes holding the named scalar fields at
    their offsets (native byte order, every other byte padding), and the
    field names in the order it packs them (by offset)."""
    by_name = {n: (off, sz) for n, off, sz in layout}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"layout has no field {', '.join(missing)}")
    spec = sorted((by_name[n][0], by_name[n][1], n) for n in names)
    fmt, at = "=", 0
    for off, sz, n in spec:
        if sz not in _CODES:
            raise ValueError(f"field {n} is {sz} bytes: not a scalar")
        if off < at:
            raise ValueError(f"field {n} overlaps the one before it")
        fmt += "x" * (off - at) + _CODES[sz]
        at = off + sz
    fmt += "x" * (size - at)
    return struct.Struct(fmt), [n for _, _, n in spec]


class Unpacker:
    """Unpacks the named scalar fields of packed structs of one layout, in
    the order asked for. A 16-byte field (an IPv6 address) comes as bytes;
    other fields wider than 8 bytes cannot be asked for."""

    def __init__(self, layout: Iterable[Field], size: int, names: Sequence[str]):
        self.size = size
        self._struct, order = _fields_struct(layout, size, names)
        self._idx = [order.index(n) for n in names]

    def one(self, raw) -> tuple:
        v = self._struct.unpack_from(raw)
        return tuple(v[i] for i in self._idx)

    def many(self, raw) -> Iterator[tuple]:
        idx = self._idx
        if idx == list(range(len(idx))):
            yield from self._struct.iter_unpack(raw)
            return
        for v in self._struct.iter_unpack(raw):
            yield tuple(v[i] for i in idx)


class Packer:
    """Packs the named scalar fields of structs of one layout, given in the
    order asked for (native byte order, as a ctypes assignment writes them);
    every other byte is zero."""

    def __init__(self, layout: Iterable[Field], size: int, names: Sequence[str]):
        self.size = size
        self._struct, order = _fields_struct(layout, size, names)
        self._pos = [list(names).index(n) for n in order]
        if order == list(names):
            self.pack = self._struct.pack       # one C call per entry

    def pack(self, *values: int) -> bytes:
        return self._struct.pack(*(values[i] for i in self._pos))


def pack(layout: Iterable[Field], size: int, values: dict[str, int]) -> bytes:
    """Bytes of a struct of this layout with the given scalar fields set
    (native byte order: a raw __be field's integer is written as read)."""
    buf = bytearray(size)
    by_name = {n: (off, sz) for n, off, sz in layout}
    for n, v in values.items():
        off, sz = by_name[n]
        struct.pack_into("=" + _CODES[sz], buf, off, v)
    return bytes(buf)
