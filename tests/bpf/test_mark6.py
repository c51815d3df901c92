"""IPv6 address marks (fastpath.h FP_MAP_MARK6, docs/ipv6.md "IPv6
per-packet cost: lookups only where they can hit").

Once the map is armed, fp_from_pod6's one-program walk looks a mid-stream
segment up as the reply of a translated flow only when its source's reply
slot is marked, and as a segment to a frontend only when its destination's
frontend slot is. Exact as long as every IPv6 reply entry's source and
every IPv6 frontend's address is marked before the entry exists: the
datapath marks the reply entries it writes, the agent the frontends it
writes and, before it arms the map, whatever it did not see written
(entries of an older generation, entries carried over by a migration).
"""
from __future__ import annotations

import ipaddress
import itertools
from contextlib import contextmanager

import pytest
from scapy.layers.inet6 import IPv6, TCP
from scapy.layers.l2 import Ether

from agent.datapath.maps import DEFS, MAP, mark6_slot, mark6_slots
from tests.bpf.conftest import POD_A6, POD_B6, TC_ACT_REDIRECT
from tests.bpf.test_ipv6 import dual  # noqa: F401  (the dual-stack pods fixture)
from tests.bpf.test_pod6_local_walk import (NO_TAIL, VIP6, VIP6_OUT, VIP6_SELF, b_to_a,  # noqa: F401
                                            from_a, route6_slot_empty, run, svc6)

_sport = itertools.count(48100)


ARMED = DEFS.defines["FP_MARK6_ARMED"]
REPLY = DEFS.defines["FP_MARK6_REPLY_SRC"]
FRONT = DEFS.defines["FP_MARK6_FRONTEND"]


def slot6(ip: str) -> int:
    return mark6_slot(ipaddress.IPv6Address(ip).packed)


@contextmanager
def marks(dp, armed: bool, keep_frontends: bool = True):
    """No conntrack, the map as a test wants it: no reply marks (the
    frontends' marks kept unless told), armed or not; disarmed after (the
    session's other tests write entries of their own, which nothing
    marks), the frontends' marks left as they were."""
    t = dp.module.table(MAP["FP_MAP_MARK6"])
    dp.lb.conntrack_flush()
    front = {i for i in range(FRONT, FRONT + mark6_slots()) if t[t.Key(i)].value}

    def clear(keep):
        for i in range(ARMED + 1):
            if t[t.Key(i)].value and i not in keep:
                t[t.Key(i)] = t.Leaf(0)
    clear(front if keep_frontends else set())
    if armed:
        t[t.Key(ARMED)] = t.Leaf(1)
    try:
        yield t
    finally:
        clear(set())
        for i in front:
            t[t.Key(i)] = t.Leaf(1)


def reply_entries6(dp) -> list:
    return [r for r in dp.lb.conntrack() if r.direction == "reply" and ":" in r.saddr]


def test_the_python_slot_is_the_datapaths(dp, svc6, bpfnet):
    """A flow the datapath translates marks its backend's slot, the one the
    agent computes for that address (and nothing else of this flow's)."""
    n = bpfnet
    with marks(dp, armed=True):
        sport = next(_sport)
        syn = run(dp, n, from_a(n, VIP6, 80, "S", sport), "cali_a")
        assert syn.verdict == TC_ACT_REDIRECT
        assert dp.maps.mark6_marked("REPLY_SRC") == {slot6(POD_B6)}


def test_every_reply_entry_the_datapath_writes_has_its_source_marked(dp, svc6, bpfnet):
    """Flows to a local backend (opened, answered, promoted to the
    established tier by the handshake's last ACK), to a remote one, and
    hairpinned: each reply entry's source slot is marked."""
    n = bpfnet
    with marks(dp, armed=True):
        for vip in (VIP6, VIP6_OUT, VIP6_SELF):
            sport = next(_sport)
            assert run(dp, n, from_a(n, vip, 80, "S", sport), "cali_a").verdict == \
                TC_ACT_REDIRECT
            if vip == VIP6:
                assert run(dp, n, b_to_a(n, 8080, sport, "SA"), "cali_b").verdict == \
                    TC_ACT_REDIRECT
                assert run(dp, n, from_a(n, vip, 80, "A", sport), "cali_a").verdict == \
                    TC_ACT_REDIRECT
        rows = reply_entries6(dp)
        assert {r.saddr for r in rows} >= {POD_B6, POD_A6}, rows
        assert {slot6(r.saddr) for r in rows} <= dp.maps.mark6_marked("REPLY_SRC")
        assert any(r.table.startswith("established") for r in rows if r.saddr == POD_B6), rows


@pytest.mark.parametrize("state", ["unarmed", "armed-marked", "armed-unmarked",
                                   "armed-by-the-agent"])
def test_a_reply_is_looked_up_unless_its_source_is_unmarked_under_an_armed_map(
        dp, svc6, bpfnet, state):
    """The same reply of a translated flow, taking the one-program walk:
    it gets its VIP back unless its source's slot is unmarked under an
    armed map (an entry nothing marked: the case the agent's arm() exists
    for; it marks the entry's source, and the reply is restored again)."""
    n = bpfnet
    with marks(dp, armed=False) as t:
        sport = next(_sport)
        assert run(dp, n, from_a(n, VIP6, 80, "S", sport), "cali_a").verdict == TC_ACT_REDIRECT
        assert t[t.Key(REPLY + slot6(POD_B6))].value == 1
        if state != "armed-marked":
            t[t.Key(REPLY + slot6(POD_B6))] = t.Leaf(0)      # as if written unmarked
        if state.startswith("armed"):
            t[t.Key(ARMED)] = t.Leaf(1)
        if state == "armed-by-the-agent":
            t[t.Key(ARMED)] = t.Leaf(0)
            assert not dp.maps.mark6_armed()
            assert dp.maps.mark6_arm() >= 1
            assert dp.maps.mark6_armed()
        with route6_slot_empty(dp):
            r = run(dp, n, b_to_a(n, 8080, sport, "SA"), "cali_b")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    out = Ether(r.out)
    if state == "armed-unmarked":
        assert (out[IPv6].src, out[TCP].sport) == (POD_B6, 8080), "skipped: left as sent"
    else:
        assert (out[IPv6].src, out[TCP].sport) == (VIP6, 80), "the VIP back"


def test_an_unmarked_source_still_reaches_its_peer_unchanged(dp, svc6, bpfnet):
    """Armed, nothing marked: plain pod-to-pod segments (no translated flow
    anywhere) are delivered as before, in one program."""
    n = bpfnet
    with marks(dp, armed=True):
        with route6_slot_empty(dp):
            r = run(dp, n, from_a(n, POD_B6, 5000, "A", next(_sport)), "cali_a")
    assert (r.verdict, r.reason, r.redirect_ifindex) == \
        (TC_ACT_REDIRECT, "redirected-local", n.cali_b.ifindex)
    assert Ether(r.out)[IPv6].dst == POD_B6 and r.reason != NO_TAIL


def test_every_ipv6_frontend_the_agent_writes_is_marked_first(dp, svc6):
    """One at a time and batched, an IPv6 frontend's slot is marked (and an
    IPv4 frontend marks nothing)."""
    with marks(dp, armed=False, keep_frontends=False) as t:
        assert dp.maps.mark6_marked("FRONTEND") == set()
        one, batched = "fd00:16::77", "fd00:16::78"
        try:
            dp.lb.put_service(one, 80, "TCP", 80, 1)
            dp.lb.put_services([(batched, 80, "TCP", 80, 1, 0, 0),
                                ("172.16.0.77", 80, "TCP", 80, 1, 0, 0)])
            assert dp.maps.mark6_marked("FRONTEND") == {slot6(one), slot6(batched)}
            assert dp.maps.mark6_marked("REPLY_SRC") == set()
            # arming marks every frontend already there (those written by
            # the fixture before the marks were cleared)
            dp.maps.mark6_arm()
            assert dp.maps.mark6_marked("FRONTEND") >= {slot6(v) for v in
                                                        (VIP6, VIP6_OUT, VIP6_SELF, one, batched)}
            assert t[t.Key(ARMED)].value == 1
        finally:
            for vip in (one, batched, "172.16.0.77"):
                dp.lb.delete_service(vip, 80, "TCP")


@pytest.mark.parametrize("state", ["unarmed", "armed-marked", "armed-unmarked",
                                   "armed-by-the-agent"])
def test_a_segment_to_a_frontend_is_translated_unless_its_slot_is_unmarked(
        dp, svc6, bpfnet, state):
    """A mid-stream segment of a translated flow, in one program: it goes
    to the backend unless the frontend's slot is unmarked under an armed
    map (a frontend nothing marked: what arming marks first)."""
    n = bpfnet
    with marks(dp, armed=False) as t:
        sport = next(_sport)
        assert run(dp, n, from_a(n, VIP6, 80, "S", sport), "cali_a").verdict == TC_ACT_REDIRECT
        assert t[t.Key(FRONT + slot6(VIP6))].value == 1
        if state != "armed-marked":
            t[t.Key(FRONT + slot6(VIP6))] = t.Leaf(0)
        if state.startswith("armed"):
            t[t.Key(ARMED)] = t.Leaf(1)
        if state == "armed-by-the-agent":
            t[t.Key(ARMED)] = t.Leaf(0)
            dp.maps.mark6_arm()
            assert t[t.Key(FRONT + slot6(VIP6))].value == 1
        with route6_slot_empty(dp):
            r = run(dp, n, from_a(n, VIP6, 80, "A", sport), "cali_a")
    out = Ether(r.out)
    if state == "armed-unmarked":
        assert out[IPv6].dst == VIP6, "not taken for a frontend's: left as sent"
    else:
        assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
        assert (out[IPv6].dst, out[TCP].dport) == (POD_B6, 8080)




def test_a_start_that_carries_maps_over_disarms_until_everything_is_marked(bpffs):
    """A start that migrates superseded pinned maps carries their entries
    over unmarked: the map is disarmed when the datapath loads (the
    programs still attached then skip nothing) and armed again only by
    mark6_arm, after the carrying over."""
    import os
    import time

    from agent.conntrack.migrate import RULES
    from agent.datapath import Datapath
    from tests.bpf.test_migration import cfg, flow, old_map

    root = f"{bpffs}/mark6-mig"
    os.makedirs(root)
    d = Datapath(cfg(root)).load()
    try:
        d.maps.mark6_arm()
        assert d.maps.mark6_armed()
    finally:
        d.close()
    # the next start finds an older release's conntrack map beside them
    old_map(f"{root}/fp_ct4_v1", "fp_ct4_v1", flow(0, time.monotonic_ns()))
    d = Datapath(cfg(root), migration_rules=RULES).load(defer_migration=True)
    try:
        assert d.migration.sources
        assert not d.maps.mark6_armed()
        d.finish_migration()
        d.maps.mark6_arm()
        assert d.maps.mark6_armed()
    finally:
        d.close()
    # a start without anything to carry over leaves it armed
    d = Datapath(cfg(root)).load()
    try:
        assert not d.migration.sources and d.maps.mark6_armed()
    finally:
        d.close()
