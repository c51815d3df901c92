"""Maps typed from their own BTF (agent/datapath/tables.py): the types the
agent writes with and the layouts the CLI decodes with come from the kernel's
record of each pinned map, and agree with the programs' BTF field for field."""
from __future__ import annotations

import ctypes as ct
import os
import random
import re

import pytest

from agent.datapath import btf as btfmod
from agent.datapath import libbpf, loader, tables
from agent.datapath.maps import MAP
from agent.inspect import decode


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


def test_a_maps_own_btf_and_the_programs_btf_decode_every_map_alike(dp, compiled):
    """Random bytes through both layout sources: the kernel's BTF of each
    pinned map (what the CLI reads a map with) and the programs' BTF (what
    records and the tests read with) decode to the same fields and values."""
    rnd = random.Random(7)
    ncpu = libbpf.possible_cpus()
    checked = 0
    for name, t in _pinned(dp):
        if t.type == libbpf.BPF_MAP_TYPE_PROG_ARRAY:
            continue
        schema, key, value = tables.map_schema(t.map_fd)
        own = decode.Layout.of_schema(name, key, value, schema)
        progs = decode.Layout.compiled(name, compiled)
        assert (own.key, own.value) == (progs.key, progs.value), name
        assert (own.key_size, own.value_size) == (progs.key_size, progs.value_size), name
        for _ in range(20):
            k = bytes(rnd.getrandbits(8) for _ in range(own.key_size))
            vlen = libbpf.value_buffer_size(t.type, t.value_size)
            v = bytes(rnd.getrandbits(8) for _ in range(vlen))
            percpu = t.type in libbpf.PERCPU_MAP_TYPES
            assert decode.decode_entry(own, k, v, percpu, ncpu) == \
                decode.decode_entry(progs, k, v, percpu, ncpu), name
        checked += 1
    assert checked >= 20


# Fields decoding recognises by name and shape alone (BTF keeps no
# comments): every two-element array is indexed by policy direction, every
# __u8[16] is an IPv6 address, a __be32 named *identity* is a number. A new
# field of one of these shapes fails here until it is looked at and listed.
PER_DIRECTION = {"fp_decision.pv", "fp_decision.policy_id", "fp_decision.peer_id",
                 "fp_pol_ep.dir"}
IPV6 = {"fp_endpoint6_key.ip6", "fp_ep_if.ip6", "fp_lpm6_key.addr",
        # IPv6 Services (v6svc)
        "fp_svc6_key.vip", "fp_backend6.ip", "fp_sockrev6_key.addr", "fp_sockrev6.vip",
        # IPv6 bandwidth (v6bw)
        "fp_bw_flow6_key.saddr", "fp_bw_flow6_key.daddr",
        # IPv6 monitor events (v6cli)
        "fp_event6.saddr6", "fp_event6.daddr6", "fp_event6.nat_daddr6",
        # IPv6 NetworkPolicy
        "fp_ctpol6_key.saddr", "fp_ctpol6_key.daddr", "fp_frag6_key.saddr", "fp_frag6_key.daddr",
        # IPv6 conntrack
        "fp_ct6_key.saddr", "fp_ct6_key.daddr", "fp_ct6.nat_addr", "fp_ct6.peer_addr",
        "fp_frag6_key.saddr", "fp_frag6_key.daddr", "fp_frag6.saddr", "fp_frag6.daddr",
        # IPv6 node-facing Services
        "fp_srcrange6_key.addr", "fp_config.node_ip6"}
IDENTITY = {"fp_pol_key.identity"}


def _fp_structs(schema):
    b = schema.btf
    return sorted({name for kind, name, *_ in b._t if kind == btfmod.STRUCT
                   and name.startswith("fp_")})


def test_every_field_decoded_by_its_shape_is_one_known_to_have_that_meaning(compiled):
    directional, ip6, identity = set(), set(), set()
    for sname in _fp_structs(compiled):
        for f in compiled.fields(f"struct {sname}"):
            if f.count == 2:
                directional.add(f"{sname}.{f.name}")
            if f.ctype == "__u8" and f.count == 16:
                ip6.add(f"{sname}.{f.name}")
            if f.ctype == "__be32" and "identity" in f.name:
                identity.add(f"{sname}.{f.name}")
    assert directional == PER_DIRECTION
    assert ip6 == IPV6
    assert identity == IDENTITY


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
