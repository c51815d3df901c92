"""The few libbpf calls bcc 0.26 has no Python binding for.

BPF_PROG_TEST_RUN (bpf_prog_test_run_opts), map info by fd, object pin/get,
and raw iteration of a map we hold only as an fd (pinned maps of another
layout, during migration). Uses Debian's libbpf.so.1 through ctypes.
"""
from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass

_lib = None


def lib() -> ct.CDLL:
    global _lib
    if _lib is None:
        _lib = ct.CDLL("libbpf.so.1", use_errno=True)
        _lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.c_void_p]
        _lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
        _lib.bpf_obj_get.argtypes = [ct.c_char_p]
        _lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        _lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        _lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
        _lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
        _lib.bpf_map_get_fd_by_id.argtypes = [ct.c_uint32]
        _lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                        ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
        _lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
        _lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
    return _lib


class _TestRunOpts(ct.Structure):
    # struct bpf_test_run_opts from libbpf's bpf.h (a kernel/libbpf ABI, not ours)
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


class SkBuffCtx(ct.Structure):
    # struct __sk_buff (uapi) as of Linux 5.16+. Test runs take only mark,
    # priority, the ifindexes, cb, tstamp, wire_len, gso_segs, gso_size and
    # hwtstamp from it (the rest must be zero), and give the whole back.
    _fields_ = [
        ("len", ct.c_uint32), ("pkt_type", ct.c_uint32), ("mark", ct.c_uint32),
        ("queue_mapping", ct.c_uint32), ("protocol", ct.c_uint32), ("vlan_present", ct.c_uint32),
        ("vlan_tci", ct.c_uint32), ("vlan_proto", ct.c_uint32), ("priority", ct.c_uint32),
        ("ingress_ifindex", ct.c_uint32), ("ifindex", ct.c_uint32), ("tc_index", ct.c_uint32),
        ("cb", ct.c_uint32 * 5), ("hash", ct.c_uint32), ("tc_classid", ct.c_uint32),
        ("data", ct.c_uint32), ("data_end", ct.c_uint32), ("napi_id", ct.c_uint32),
        ("family", ct.c_uint32), ("remote_ip4", ct.c_uint32), ("local_ip4", ct.c_uint32),
        ("remote_ip6", ct.c_uint32 * 4), ("local_ip6", ct.c_uint32 * 4),
        ("remote_port", ct.c_uint32), ("local_port", ct.c_uint32), ("data_meta", ct.c_uint32),
        ("flow_keys", ct.c_uint64), ("tstamp", ct.c_uint64), ("wire_len", ct.c_uint32),
        ("gso_segs", ct.c_uint32), ("sk", ct.c_uint64), ("gso_size", ct.c_uint32),
        ("tstamp_type", ct.c_uint8), ("pad", ct.c_uint8 * 3), ("hwtstamp", ct.c_uint64),
    ]


@dataclass
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int
    ctx: SkBuffCtx | None = None      # the skb's fields after the run (tstamp, priority, ...)


def prog_test_run(prog_fd: int, packet: bytes, *, ifindex: int = 0, repeat: int = 1,
                  out_size: int | None = None, mark: int = 0, tstamp: int = 0,
                  gso_segs: int = 0, gso_size: int = 0, priority: int = 0) -> TestRunResult:
    out = ct.create_string_buffer(out_size or (len(packet) + 256))
    inp = ct.create_string_buffer(bytes(packet), len(packet))
    ctx = SkBuffCtx()
    ctx.ifindex = ifindex
    ctx.ingress_ifindex = ifindex
    ctx.mark = mark
    ctx.tstamp = tstamp
    ctx.gso_segs = gso_segs
    ctx.gso_size = gso_size
    ctx.priority = priority
    ctx_out = SkBuffCtx()
    opts = _TestRunOpts()
    opts.sz = ct.sizeof(_TestRunOpts)
    opts.data_in = ct.cast(inp, ct.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ct.cast(out, ct.c_void_p)
    opts.data_size_out = len(out)
    with_ctx = bool(ifindex or mark or tstamp or gso_segs or gso_size or priority)
    if with_ctx:
        opts.ctx_in = ct.cast(ct.pointer(ctx), ct.c_void_p)
        opts.ctx_size_in = ct.sizeof(ctx)
        opts.ctx_out = ct.cast(ct.pointer(ctx_out), ct.c_void_p)
        opts.ctx_size_out = ct.sizeof(ctx_out)
    opts.repeat = repeat
    rc = lib().bpf_prog_test_run_opts(prog_fd, ct.byref(opts))
    if rc != 0:
        err = ct.get_errno() or -rc
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    # retval is the tc verdict as an int (TC_ACT_SHOT = 2, UNSPEC = -1)
    retval = ct.c_int32(opts.retval).value
    return TestRunResult(retval, out.raw[: opts.data_size_out], opts.duration,
                         ctx_out if with_ctx else None)


class MapInfo(ct.Structure):
    # Leading part of struct bpf_map_info (uapi).
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
    ]


def probe_helper(prog_type: int, helper_id: int) -> bool:
    """Whether this kernel lets programs of `prog_type` call helper
    `helper_id` (libbpf loads a tiny program to find out)."""
    f = lib().libbpf_probe_bpf_helper
    f.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
    return f(prog_type, helper_id, None) == 1


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    n = ct.c_uint32(ct.sizeof(info))
    if lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)) != 0:
        err = ct.get_errno()
        raise OSError(err, f"bpf_obj_get_info_by_fd: {os.strerror(err)}")
    return info


class ProgInfo(ct.Structure):
    # Leading part of struct bpf_prog_info (uapi).
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * 16)]


def prog_info(fd: int, info: ProgInfo | None = None) -> ProgInfo:
    """Info of a loaded program; pass `info` with nr_map_ids/map_ids set to
    also receive its map ids."""
    info = info if info is not None else ProgInfo()
    n = ct.c_uint32(ct.sizeof(info))
    if lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)) != 0:
        err = ct.get_errno()
        raise OSError(err, f"bpf_obj_get_info_by_fd: {os.strerror(err)}")
    return info


def obj_get(path: str) -> int:
    fd = lib().bpf_obj_get(path.encode())
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, f"bpf_obj_get({path}): {os.strerror(err)}")
    return fd


PERCPU_MAP_TYPES = {5, 6, 10}     # percpu_hash, percpu_array, lru_percpu_hash
BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY = 2, 6
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_PROG_ARRAY = 3


def possible_cpus() -> int:
    """CPUs a per-CPU map value has a slot for (the kernel's "possible" set)."""
    with open("/sys/devices/system/cpu/possible") as f:
        n = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n = max(n, int(hi or lo) + 1)
    return n


def value_buffer_size(map_type: int, value_size: int) -> int:
    """Bytes a lookup writes: per-CPU maps return one 8-byte aligned value
    for every possible CPU."""
    if map_type in PERCPU_MAP_TYPES:
        return ((value_size + 7) // 8 * 8) * possible_cpus()
    return value_size


def map_items_raw(fd: int, key_size: int, value_size: int):
    """Yield (key bytes, value bytes) of a map we only hold as an fd.
    `value_size` is the buffer size (see value_buffer_size)."""
    key = ct.create_string_buffer(key_size)
    nxt = ct.create_string_buffer(key_size)
    val = ct.create_string_buffer(value_size)
    prev = None
    while lib().bpf_map_get_next_key(fd, prev, nxt) == 0:
        ct.memmove(key, nxt, key_size)
        if lib().bpf_map_lookup_elem(fd, key, val) == 0:
            yield key.raw, val.raw
        prev = key


MAP_TYPE_NAMES = {
    1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
    6: "percpu_array", 9: "lru_hash", 10: "lru_percpu_hash", 11: "lpm_trie",
    27: "ringbuf",
}
