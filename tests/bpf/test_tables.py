"""Maps typed from their own BTF (agent/datapath/tables.py): the types the
agent writes with and the layouts the CLI decodes with come from the kernel's
record of each pinned map, and agree with the header field for field."""
from __future__ import annotations

import ctypes as ct
import os
import random
import re

import pytest

from agent.datapath import libbpf, loader, tables
from agent.datapath.maps import MAP
from agent.inspect import decode
from agent.model import bpfdefs


def _pinned(dp):
    for name in loader.pinned_map_names():
        if name == MAP["FP_MAP_EVENTS"]:
            continue
        yield name, dp.module.table(name)


def test_every_map_is_typed_from_btf_at_the_sizes_the_kernel_reports(dp):
    # every pinned map, the ring buffer too (the metrics walk them all)
    assert set(dp.module.tables) == set(loader.pinned_map_names())
    for name, t in _pinned(dp):
        info = libbpf.map_info(t.map_fd)
        assert ct.sizeof(t.Key) == info.key_size, name
        assert ct.sizeof(t.Leaf) == libbpf.value_buffer_size(info.type, info.value_size), name


def test_btf_decoding_equals_the_header_on_every_map_field_for_field(dp):
    """Random bytes through both schemas: the kernel's BTF of each pinned map
    and the header's declaration decode to the same fields and values (so
    the CLI's decoding from BTF shows what it showed from the header)."""
    rnd = random.Random(7)
    ncpu = libbpf.possible_cpus()
    checked = 0
    for name, t in _pinned(dp):
        header = decode.Layout.of(name)
        if header is None or t.type == libbpf.BPF_MAP_TYPE_PROG_ARRAY:
            continue
        schema, key, value = tables.map_schema(t.map_fd)
        btf = decode.Layout.of_schema(name, key, value, schema)
        assert (btf.key_size, btf.value_size) == (header.key_size, header.value_size), name
        for _ in range(20):
            k = bytes(rnd.getrandbits(8) for _ in range(header.key_size))
            vlen = libbpf.value_buffer_size(t.type, t.value_size)
            v = bytes(rnd.getrandbits(8) for _ in range(vlen))
            percpu = t.type in libbpf.PERCPU_MAP_TYPES
            assert decode.decode_entry(btf, k, v, percpu, ncpu) == \
                decode.decode_entry(header, k, v, percpu, ncpu), name
        checked += 1
    assert checked >= 20


def test_the_header_keeps_the_conventions_decoding_relies_on():
    """BTF keeps no comments: decoding recognises identities, per-direction
    arrays and IPv6 addresses by name and shape; the header must keep to it."""
    for sdef in bpfdefs.structs().values():
        for f in sdef.fields:
            if f.count == 2:
                assert "FP_POL_INGRESS" in f.comment or "direction" in f.comment, \
                    f"{sdef.name}.{f.name}: two-element arrays are per policy direction"
            if f.ctype == "__u8" and f.count == 16:
                assert "IPv6" in f.comment, f"{sdef.name}.{f.name}: __u8[16] is an IPv6 address"
            if f.ctype == "__be32" and "identity" in f.comment:
                assert "identity" in f.name, f"{sdef.name}.{f.name}: name identities as such"


def test_a_table_reads_writes_and_walks_like_the_maps_modules_expect(dp):
    t = dp.module.table(MAP["FP_MAP_BYPASS"])        # an LPM trie: no batch operations
    before = {(k.prefixlen, k.addr) for k, _ in t.items()}
    k = t.Key(prefixlen=32, addr=0x0A0B0C0D)
    t[k] = t.Leaf(1)
    assert t[k].value == 1 and k in t
    assert (32, 0x0A0B0C0D) in {(k.prefixlen, k.addr) for k, _ in t.items()}
    del t[k]
    with pytest.raises(KeyError):
        t[k]
    with pytest.raises(KeyError):
        del t[k]
    assert {(k.prefixlen, k.addr) for k, _ in t.items()} == before
    cnt = dp.module.table(MAP["FP_MAP_COUNTERS"])      # per-CPU hash
    key = cnt.Key(ifindex=4242, reason=0, dir=0)
    vals = cnt.Leaf()
    assert len(vals) == libbpf.possible_cpus()
    for i in range(len(vals)):
        vals[i].packets = i + 1
    cnt[key] = vals
    assert [k for k, _ in cnt.items() if bytes(k) == bytes(key)], "the entry is walked"
    assert sum(c.packets for c in cnt[key]) == sum(range(1, len(vals) + 1))
    del cnt[key]


def test_the_same_sources_and_options_reuse_the_pinned_programs(dp):
    """A second open of the same build key compiles nothing and finds the
    very programs the first attached (same kernel program ids)."""
    from agent.datapath import Datapath
    again = Datapath(dp.config, netns=dp.netns, test_build=True).load()
    try:
        assert not again.built and again.build_key == dp.build_key
        for name in loader.PROGRAMS:
            assert libbpf.prog_info(again.prog_fd(name)).id == \
                libbpf.prog_info(dp.prog_fd(name)).id, name
        sets = os.listdir(os.path.join(dp.options.pin_root, loader.PROG_DIR))
        assert sets == [dp.build_key]
        assert sorted(os.listdir(loader.prog_set_dir(dp.options, dp.build_key))) == \
            sorted(loader.PROGRAMS)
    finally:
        again.close()
    assert re.fullmatch(r"[0-9a-f]{16}", dp.build_key)
