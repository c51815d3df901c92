"""Reply sources (fastpath.h FP_MAP_REVSRC, docs/ipv6.md "IPv6 per-packet
cost: the reverse lookup only where a reply can come from").

fp_from_pod6's one-program walk looks a mid-stream segment up as the reply
of a translated flow only when its source's slot is marked, once the map
is armed. Exact as long as every IPv6 reply entry's source is marked
before the entry exists: the datapath marks what it writes, the agent
marks what it did not see written (entries of an older generation of
programs, entries carried over by a migration) before it arms the map.
"""
from __future__ import annotations

import ipaddress
import itertools
from contextlib import contextmanager

import pytest
from scapy.layers.inet6 import IPv6, TCP
from scapy.layers.l2 import Ether

from agent.datapath.maps import MAP, revsrc_slot, revsrc_slots
from tests.bpf.conftest import POD_A6, POD_B6, TC_ACT_REDIRECT
from tests.bpf.test_ipv6 import dual  # noqa: F401  (the dual-stack pods fixture)
from tests.bpf.test_pod6_local_walk import (NO_TAIL, VIP6, VIP6_OUT, VIP6_SELF, b_to_a,  # noqa: F401
                                            from_a, route6_slot_empty, run, svc6)

_sport = itertools.count(48100)


def slot6(ip: str) -> int:
    return revsrc_slot(ipaddress.IPv6Address(ip).packed)


@contextmanager
def revsrc(dp, armed: bool):
    """No conntrack, the map as a test wants it: no marks, armed or not;
    left disarmed and unmarked after (the session's other tests write
    conntrack entries of their own, which nothing marks)."""
    t = dp.module.table(MAP["FP_MAP_REVSRC"])
    dp.lb.conntrack_flush()

    def clear():
        for i in range(revsrc_slots() + 1):
            if t[t.Key(i)].value:
                t[t.Key(i)] = t.Leaf(0)
    clear()
    if armed:
        t[t.Key(revsrc_slots())] = t.Leaf(1)
    try:
        yield t
    finally:
        clear()


def reply_entries6(dp) -> list:
    return [r for r in dp.lb.conntrack() if r.direction == "reply" and ":" in r.saddr]


def test_the_python_slot_is_the_datapaths(dp, svc6, bpfnet):
    """A flow the datapath translates marks its backend's slot, the one the
    agent computes for that address (and nothing else of this flow's)."""
    n = bpfnet
    with revsrc(dp, armed=True):
        sport = next(_sport)
        syn = run(dp, n, from_a(n, VIP6, 80, "S", sport), "cali_a")
        assert syn.verdict == TC_ACT_REDIRECT
        assert dp.maps.revsrc_marked() == {slot6(POD_B6)}


def test_every_reply_entry_the_datapath_writes_has_its_source_marked(dp, svc6, bpfnet):
    """Flows to a local backend (opened, answered, promoted to the
    established tier by the handshake's last ACK), to a remote one, and
    hairpinned: each reply entry's source slot is marked."""
    n = bpfnet
    with revsrc(dp, armed=True):
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
        assert {slot6(r.saddr) for r in rows} <= dp.maps.revsrc_marked()
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
    with revsrc(dp, armed=False) as t:
        sport = next(_sport)
        assert run(dp, n, from_a(n, VIP6, 80, "S", sport), "cali_a").verdict == TC_ACT_REDIRECT
        assert t[t.Key(slot6(POD_B6))].value == 1
        if state != "armed-marked":
            t[t.Key(slot6(POD_B6))] = t.Leaf(0)      # as if written unmarked
        if state.startswith("armed"):
            t[t.Key(revsrc_slots())] = t.Leaf(1)
        if state == "armed-by-the-agent":
            t[t.Key(revsrc_slots())] = t.Leaf(0)
            assert not dp.maps.revsrc_armed()
            assert dp.maps.revsrc_arm() >= 1
            assert dp.maps.revsrc_armed()
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
    with revsrc(dp, armed=True):
        with route6_slot_empty(dp):
            r = run(dp, n, from_a(n, POD_B6, 5000, "A", next(_sport)), "cali_a")
    assert (r.verdict, r.reason, r.redirect_ifindex) == \
        (TC_ACT_REDIRECT, "redirected-local", n.cali_b.ifindex)
    assert Ether(r.out)[IPv6].dst == POD_B6 and r.reason != NO_TAIL
