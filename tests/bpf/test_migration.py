"""Upgrades keep conntrack: pinned maps of another layout are carried over
field by field by name, driven by the layouts the kernel holds (BTF), and
conntrack entries routed to their maps by agent.conntrack.migrate (the
agent's rules, given to the Datapath as the agent gives them).

The old maps are made the way an older release made them: bcc compiles the
older header's structs and pins the table, BTF included. Then a Datapath of
this release opens the same pin root.
"""
from __future__ import annotations

import os
import time

import pytest

from agent.config import Config
from agent.conntrack.migrate import RULES
from agent.datapath import Datapath, btf, mapio
from agent.model import conntrack as M
from agent.datapath.maps import MAP, be16, be32, ip_from_be32

CT = MAP["FP_MAP_CT"]          # the established-flows map of this release

# fastpath.h's conntrack structs of the release before this one: one LRU map
# for NAT and policy entries, `flags` a __u16 and no state. The value is 24
# bytes (the current one is larger: a changed layout under either name migrates).
V1 = r"""
struct fp_ct4_key { __be32 saddr; __be32 daddr; __be16 sport; __be16 dport; __u8 proto;
                    __u8 dir; __u16 pad; };
struct fp_ct4 { __u64 last_seen; __be32 nat_addr; __be16 nat_port; __u16 flags;
                __u32 backend_id; __u32 svc_id; };
BPF_TABLE_PINNED("lru_hash", struct fp_ct4_key, struct fp_ct4, @NAME@, 65536, "@PATH@");
int fp_old(struct __sk_buff *skb) { return 0; }
"""
CLIENT, VIP, BACKEND = "10.0.5.1", "192.168.90.1", "10.0.6.1"
HAIRPIN = 1


def old_map(path: str, name: str, entries):
    """Pin a map of the old layout at `path` holding `entries`:
    [(saddr, daddr, sport, dport, proto, dir, last_seen, nat_addr, nat_port,
    flags, backend_id, svc_id)]."""
    from bcc import BPF
    b = BPF(text=V1.replace("@NAME@", name).replace("@PATH@", path))
    t = b[name]
    for (sa, da, sp, dp, proto, d, last, na, np, fl, bid, sid) in entries:
        k = t.Key(saddr=be32(sa), daddr=be32(da), sport=be16(sp), dport=be16(dp), proto=proto,
                  dir=d)
        t[k] = t.Leaf(last_seen=last, nat_addr=be32(na), nat_port=be16(np), flags=fl,
                      backend_id=bid, svc_id=sid)
    b.cleanup()


def flow(i: int, now: int, proto: int = 6, flags: int = 0):
    cport = 40000 + i
    return [(CLIENT, VIP, cport, 80, proto, M.FORWARD, now, BACKEND, 8080, flags, 7, 3),
            (BACKEND, CLIENT, 8080, cport, proto, M.REPLY, now, VIP, 80, flags, 7, 3)]


def cfg(root: str, **kw) -> Config:
    return Config.defaults().replace(bpffs_root=root, **kw)


def by_key(rows):
    return {(r.direction, r.saddr, r.sport, r.daddr, r.dport, r.proto): r for r in rows}


def test_the_old_layout_is_told_apart_by_its_fingerprint_not_its_size(bpffs):
    root = f"{bpffs}/mig-fp"
    os.makedirs(root)
    old_map(f"{root}/{CT}", CT, flow(0, time.monotonic_ns()))
    fd = mapio_fd(f"{root}/{CT}")
    try:
        k, v = btf.map_layouts(fd)
        assert v.size == 24 and v.by_path["flags"].type == "__u16" and "state" not in v.by_path
    finally:
        os.close(fd)
    d = Datapath(cfg(root), migration_rules=RULES).load()
    try:
        note = [n for n in d.migration_notes if f"{CT}_old" in n]
        assert note and "layout struct fp_ct4" in note[0] and "migrated 2 entries" in note[0], \
            d.migration_notes
        rows = d.lb.conntrack()
        assert {(r.table, r.state) for r in rows} == {("established", "established")}
        assert not os.path.exists(f"{root}/{CT}_old")
    finally:
        d.close()


def mapio_fd(path: str) -> int:
    from agent.datapath import libbpf
    return libbpf.obj_get(path)


def test_an_upgrade_from_the_single_conntrack_map_routes_every_entry(bpffs):
    """The release before kept NAT and policy entries in fp_ct4_v1. Its
    translated flows go to the established map (taken as established, the
    hairpin flag kept), its admitted flows to the policy map; the old pin
    is removed."""
    root = f"{bpffs}/mig-v1"
    os.makedirs(root)
    now = time.monotonic_ns()
    entries = flow(0, now) + flow(1, now - 5 * 10**9, proto=17) + flow(2, now, flags=HAIRPIN)
    entries.append((CLIENT, BACKEND, 40009, 8080, 6, M.POLICY, now, "0.0.0.0", 0, 0, 0, 0))
    old_map(f"{root}/fp_ct4_v1", "fp_ct4_v1", entries)
    d = Datapath(cfg(root), migration_rules=RULES).load()
    try:
        rows = by_key(d.lb.conntrack())
        assert len(rows) == 7
        fwd = rows[("forward", CLIENT, 40000, VIP, 80, "TCP")]
        assert (fwd.table, fwd.state, fwd.nat_addr, fwd.nat_port, fwd.backend_id, fwd.svc_id) == (
            "established", "established", BACKEND, 8080, 7, 3)
        assert fwd.last_seen_ns == now, "every field copied by name"
        udp = rows[("reply", BACKEND, 8080, CLIENT, 40001, "UDP")]
        assert (udp.table, udp.nat_addr, udp.last_seen_ns) == ("established", VIP,
                                                               now - 5 * 10**9)
        assert rows[("forward", CLIENT, 40002, VIP, 80, "TCP")].flags & HAIRPIN
        pol = rows[("policy", CLIENT, 40009, BACKEND, 8080, "TCP")]
        assert (pol.table, pol.state) == ("policy", "established")
        assert not os.path.exists(f"{root}/fp_ct4_v1")
        assert any(f"fp_ct4_v1: superseded by {CT}: migrated 7 entries" in n
                   for n in d.migration_notes), d.migration_notes
    finally:
        d.close()


def test_a_full_established_map_takes_what_fits_and_the_rest_goes_to_the_lru(bpffs):
    root = f"{bpffs}/mig-full"
    os.makedirs(root)
    now = time.monotonic_ns()
    old_map(f"{root}/fp_ct4_v1", "fp_ct4_v1", [e for i in range(800) for e in flow(i, now)])
    d = Datapath(cfg(root, conntrack_map_size=1024, conntrack_new_map_size=1024),
                 migration_rules=RULES).load()
    try:
        tables = [r.table for r in d.lb.conntrack()]
        assert len(tables) == 1600
        assert tables.count("established") == 1024 and tables.count("new") == 576
    finally:
        d.close()


def test_entries_the_old_programs_make_after_the_first_copy_are_carried_by_the_second(bpffs):
    """Between the first copy and the new programs' attach, the old programs
    keep writing to the old map: the second copy takes what is new there,
    and leaves out what the new maps deliberately dropped meanwhile."""
    root = f"{bpffs}/mig-twice"
    os.makedirs(root)
    now = time.monotonic_ns()
    old_map(f"{root}/fp_ct4_v1", "fp_ct4_v1", flow(0, now) + flow(1, now))
    d = Datapath(cfg(root), migration_rules=RULES).load(defer_migration=True)
    try:
        assert len(d.lb.conntrack()) == 4
        src = next(s for s in d.migration.sources if s.pin == "fp_ct4_v1")
        # an old program creates a flow ...
        k = mapio.pack(src.layouts[0].fields(), src.key_size, dict(
            saddr=be32(CLIENT), daddr=be32(VIP), sport=be16(41000), dport=be16(80), proto=6,
            dir=M.FORWARD))
        v = mapio.pack(src.layouts[1].fields(), src.value_size, dict(
            last_seen=now, nat_addr=be32(BACKEND), nat_port=be16(8080), backend_id=7, svc_id=3))
        assert mapio.update(src.fd, k, v) == 0
        # ... and a new one ends a copied flow (its entries go)
        gone = [r for r in d.lb.conntrack() if 40001 in (r.sport, r.dport)]
        d.lb.ct.delete("established", [M.CtKey(be32(r.saddr), be32(r.daddr), be16(r.sport),
                                               be16(r.dport), 6, {"forward": 0, "reply": 1}[
                                                   r.direction]) for r in gone])
        d.finish_migration()
        ports = sorted((r.direction, r.sport if r.direction == "forward" else r.dport)
                       for r in d.lb.conntrack())
        assert ports == [("forward", 40000), ("forward", 41000), ("reply", 40000)]
        assert not os.path.exists(f"{root}/fp_ct4_v1")
    finally:
        d.close()


def test_convert_copies_by_name_converts_widths_and_refuses_what_does_not_fit():
    L = btf.Layout
    old = L("struct o", 8, (btf.Leaf("a", 0, 2, "__u16"), btf.Leaf("b", 2, 2, "__be16"),
                           btf.Leaf("gone", 4, 4, "__u32")))
    new = L("struct n", 8, (btf.Leaf("b", 0, 4, "__be32"), btf.Leaf("a", 4, 1, "__u8"),
                           btf.Leaf("added", 5, 1, "__u8"), btf.Leaf("pad", 6, 2, "__u16")))
    raw = (300).to_bytes(2, "little") + (0x1234).to_bytes(2, "big") + bytes(4)
    with pytest.raises(btf.MigrationError, match="300 does not fit __u8"):
        btf.convert(old, new, raw)
    raw = (200).to_bytes(2, "little") + (0x1234).to_bytes(2, "big") + bytes(4)
    out = btf.convert(old, new, raw, {"added": 9})
    assert out == (0x1234).to_bytes(4, "big") + bytes([200, 9]) + bytes(2)
    assert old.fingerprint() != L("struct o", 8, old.leaves[:2] + (
        btf.Leaf("gone", 4, 4, "__be32"),)).fingerprint(), "byte order is part of a layout"


# The verdict counters of the release before the family split: the key's
# last byte was padding (always 0), the map fp_cnt_v1.
CNT_V1 = r"""
struct fp_counter_key { __u32 ifindex; __u16 reason; __u8 dir; __u8 pad; };
struct fp_counter { __u64 packets; __u64 bytes; };
BPF_TABLE_PINNED("percpu_hash", struct fp_counter_key, struct fp_counter, fp_cnt_v1, 1024,
                 "@PATH@");
int fp_old(struct __sk_buff *skb) { return 0; }
"""


def test_counters_from_before_the_family_split_carry_over_as_ipv4(bpffs):
    """fp_cnt_v1 -> fp_cnt_v2: every (interface, direction, reason) keeps
    its per-CPU packets and bytes, with family ipv4 (the byte that was
    padding); the old pin is removed."""
    from bcc import BPF
    root = f"{bpffs}/mig-cnt"
    os.makedirs(root)
    b = BPF(text=CNT_V1.replace("@PATH@", f"{root}/fp_cnt_v1"))
    t = b["fp_cnt_v1"]
    fwd, drop = DEFS_REASON("redirected-local"), DEFS_REASON("dropped-source-spoofed")
    for ifindex, reason, d, per_cpu in ((7, fwd, 0, (3, 4)), (9, drop, 2, (5, 0))):
        vals = t.Leaf()                  # one struct per possible CPU
        for i in range(len(vals)):
            p = per_cpu[i] if i < len(per_cpu) else 0
            vals[i] = t.sLeaf(packets=p, bytes=100 * p)
        t[t.Key(ifindex=ifindex, reason=reason, dir=d)] = vals
    b.cleanup()
    d = Datapath(cfg(root), migration_rules=RULES).load()
    try:
        rows = {(r.ifindex, r.direction, r.reason, r.family): (r.packets, r.bytes)
                for r in d.maps.counters(by_family=True)}
        want7 = sum((3, 4)[:len(t.Leaf())])
        want9 = 5
        assert rows == {(7, "from-pod", "redirected-local", "ipv4"): (want7, 100 * want7),
                        (9, "from-vpc", "dropped-source-spoofed", "ipv4"): (want9, 100 * want9)}
        assert not os.path.exists(f"{root}/fp_cnt_v1")
        assert any("fp_cnt_v1: superseded by fp_cnt_v2: migrated 2 entries" in n
                   for n in d.migration_notes), d.migration_notes
    finally:
        d.close()


def DEFS_REASON(label: str) -> int:
    from agent.datapath.maps import DEFS
    return DEFS.reason_value(label)
