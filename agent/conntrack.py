"""Conntrack garbage collection for translated flows.

The conntrack map is an LRU: when full, the kernel evicts its least recently
used entries, which may be those of a quiet but live TCP connection (a
database session idle for minutes) pushed out by a burst of short UDP
flows (DNS). The agent sweeps the map every `conntrack_gc_interval` seconds
and removes the flows idle for longer than their protocol's timeout
(`conntrack_tcp_idle_timeout`, `conntrack_idle_timeout`), so the LRU only
ever has to evict under real pressure.

Flows admitted by NetworkPolicy have one entry (FP_CT_POLICY, refreshed by
both directions) and go when it is idle. A translated flow is its forward
entry (client -> VIP) and its reply entry (backend -> client); each direction refreshes its own `last_seen` (bpf_ktime_get_ns, the
clock of time.monotonic_ns). A flow is removed only when both are idle, so a
flow where one side sends (a server push acknowledged by the client, a
one-way UDP stream) is kept. Both entries are read again just before they
are deleted and the flow is kept if a packet refreshed either since the
sweep looked (a window of microseconds remains between that read and the
delete).
"""
from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import struct


log = logging.getLogger("fastpath.conntrack")

IPPROTO_TCP = 6


KEY_FIELDS = ("saddr", "daddr", "sport", "dport", "proto", "dir")
VALUE_FIELDS = ("last_seen", "nat_addr", "nat_port", "flags")
BATCH = 16384


def _struct_format(ctype, fields: tuple[str, ...]) -> tuple[str, list[str]]:
    """A struct format that unpacks `fields` of the compiled ctypes layout
    (offsets and sizes from bcc's types for fastpath.h: nothing restated)."""
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    spec = sorted((getattr(ctype, f).offset, getattr(ctype, f).size, f) for f in fields)
    fmt, at = "=", 0
    for off, size, _ in spec:
        fmt += "x" * (off - at) + codes[size]
        at = off + size
    fmt += "x" * (ct.sizeof(ctype) - at)
    return fmt, [f for _, _, f in spec]


def read_entries(table):
    """Every conntrack entry as (key tuple in KEY_FIELDS order, last_seen,
    nat_addr, nat_port, flags), read in batches (BPF_MAP_LOOKUP_BATCH) and
    unpacked without an object per entry."""
    from bcc.libbcc import lib
    kfmt, korder = _struct_format(table.Key, KEY_FIELDS)
    vfmt, vorder = _struct_format(table.Leaf, VALUE_FIELDS)
    kidx = [korder.index(f) for f in KEY_FIELDS]
    vidx = [vorder.index(f) for f in VALUE_FIELDS]
    ks, vs = ct.sizeof(table.Key), ct.sizeof(table.Leaf)
    keys = ct.create_string_buffer(ks * BATCH)
    vals = ct.create_string_buffer(vs * BATCH)
    in_b, out_b = ct.c_uint32(0), ct.c_uint32(0)
    first = True
    out = []
    while True:
        cnt = ct.c_uint32(BATCH)
        res = lib.bpf_lookup_batch(table.map_fd, None if first else ct.byref(in_b),
                                   ct.byref(out_b), keys, vals, ct.byref(cnt))
        err = ct.get_errno() if res else 0
        if res and err != errno.ENOENT:
            raise OSError(err, f"conntrack batch lookup: {os.strerror(err)}")
        got = cnt.value
        if got:
            kraw = struct.iter_unpack(kfmt, memoryview(keys)[:ks * got])
            vraw = struct.iter_unpack(vfmt, memoryview(vals)[:vs * got])
            for k, v in zip(kraw, vraw):
                out.append((tuple(k[i] for i in kidx),) + tuple(v[i] for i in vidx))
        if res:                # ENOENT: that was the last batch
            return out
        in_b.value = out_b.value
        first = False


def sweep(table, now_ns: int, tcp_idle_ns: int, other_idle_ns: int, hairpin_ip: str,
          entries=None) -> int:
    """Remove idle flows from the conntrack map `table` (a bcc table of
    fp_ct4_key -> fp_ct4). `entries` is what read_entries(table) returns
    (read now when not given). Returns the number of entries removed."""
    from agent.datapath.maps import DEFS, be32
    fwd_dir, rep_dir = DEFS.defines["FP_CT_FORWARD"], DEFS.defines["FP_CT_REPLY"]
    pol_dir = DEFS.defines["FP_CT_POLICY"]
    hairpin_flag = DEFS.defines["FP_CT_F_HAIRPIN"]
    hairpin = be32(hairpin_ip)
    seen = {}          # key -> last_seen
    partner = {}       # forward key -> its reply entry's key
    for key, last, nat_addr, nat_port, flags in (read_entries(table) if entries is None
                                                 else entries):
        seen[key] = last
        if key[5] == fwd_dir:
            rdaddr = hairpin if flags & hairpin_flag else key[0]
            partner[key] = (nat_addr, rdaddr, nat_port, key[2], key[4], rep_dir)

    def idle_for(proto: int) -> int:
        return tcp_idle_ns if proto == IPPROTO_TCP else other_idle_ns

    doomed: list[list[tuple]] = []      # flows: [forward, reply] or [orphan]
    paired: set[tuple] = set()
    for key, rkey in partner.items():
        rlast = seen.get(rkey)
        if rlast is not None:
            paired.add(rkey)
        newest = max(seen[key], rlast or 0)
        if now_ns - newest > idle_for(key[4]):
            doomed.append([key] if rlast is None else [key, rkey])
    for key, last in seen.items():
        if key[5] == rep_dir and key not in paired and now_ns - last > idle_for(key[4]):
            doomed.append([key])    # its forward entry is gone (evicted, or a flush)
        elif key[5] == pol_dir and now_ns - last > idle_for(key[4]):
            doomed.append([key])    # an admitted flow (NetworkPolicy), one entry per flow
    removed = 0
    for flow in doomed:
        keys = [table.Key(*key) for key in flow]
        try:
            # a packet in either direction since the walk: the flow lives
            if any(table[k].last_seen != seen[key] for k, key in zip(keys, flow)):
                continue
        except KeyError:
            pass              # one entry already gone: remove the rest
        for k in keys:
            try:
                del table[k]
                removed += 1
            except KeyError:
                pass
    return removed


__all__ = ["read_entries", "sweep"]
