"""Desired frontends -> ordered map operations: order, minimality, ids, restart.

The fake maps apply operations one at a time; after every single one, every
service entry a packet could see must be whole (check_whole). Randomized
sequences of cluster states (fixed seeds) drive the same check at scale.
"""
from __future__ import annotations

import random

import pytest

from collections import Counter

from agent.lb.compile import (
    KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, KIND_NODE_PORT, SCOPE_EXTERNAL,
    Backend, Frontend, FrontendState, LbOptions, compile_services,
)
from agent.lb.maglev import backend_name, build_table
from agent.lb.reconcile import (
    FLAG_AFFINITY, FLAG_DROP, FLAG_EXTERNAL, FLAG_LOCAL, FLAG_MAGLEV, FLAG_NODEPORT,
    FLAG_REJECT, FLAG_SOLE, FLAG_SRC_RANGE, DeleteBackend, DeleteMaglev, DeleteRanges, DeleteService,
    DeleteSlots, FakeMaps, IdAllocator, IdsExhausted, PutBackend, PutMaglev, PutRanges,
    PutService, PutSlots, Reconciler, ServiceEntry, check_whole,
)
from tests.lb.lbdata import NODE, ZONE, ep, eslice, service, snapshot

FE = Frontend("172.16.0.10", 80, "TCP")
FE2 = Frontend("172.16.0.11", 80, "TCP")


def be(last: int, port: int = 8080, proto: str = "TCP", terminating: bool = False) -> Backend:
    return Backend(f"10.0.0.{last}", port, proto, terminating)


def state(*backends: Backend, affinity: int = 0, local: bool = False,
          kind: str = KIND_CLUSTER_IP, svc=("shop", "web"), drop: bool = False,
          maglev: bool = False, ranges: tuple = ()) -> FrontendState:
    return FrontendState(svc, "http", tuple(backends), affinity, not backends and not drop,
                         local, kind, drop=drop, maglev=maglev, source_ranges=ranges)


def apply_checked(maps: FakeMaps, ops) -> None:
    """Apply op by op; the maps must be whole before and after each."""
    assert check_whole(maps) == []
    for op in ops:
        maps.apply(op)
        problems = check_whole(maps)
        assert problems == [], f"after {op}: {problems}"


def assert_converged(maps: FakeMaps, desired: dict, rec: Reconciler) -> None:
    """The maps hold exactly `desired`, nothing else, under the reconciler's ids."""
    assert set(maps.services) == set(desired)
    for fe, st in desired.items():
        got = maps.resolve(fe)
        want = () if st.reject or st.drop else st.backends
        assert sorted(b.key for b in got) == sorted(b.key for b in want), fe
        e = maps.services[fe]
        assert e.service_id == rec.service_id(fe)
        assert e.affinity_timeout == st.affinity_timeout
        assert bool(e.flags & FLAG_REJECT) == st.reject
        assert bool(e.flags & FLAG_DROP) == (st.drop and not st.reject)
        assert bool(e.flags & FLAG_AFFINITY) == bool(st.affinity_timeout)
        assert bool(e.flags & FLAG_SRC_RANGE) == bool(st.source_ranges)
        assert maps.ranges.get(e.service_id, set()) == set(st.source_ranges)
        if e.flags & FLAG_MAGLEV:
            names = [backend_name(*b.key) for b in got]
            ids = [maps.slots[(e.service_id, i)] for i in range(1, e.count + 1)]
            assert maps.maglev[e.service_id] == tuple(ids[i] for i in build_table(names, 1021))
        assert bool(e.flags & FLAG_LOCAL) == st.local_only
        assert bool(e.flags & FLAG_EXTERNAL) == (st.kind != KIND_CLUSTER_IP)
    # Nothing left behind: every slot is reachable from an entry, every
    # backend is named by a slot or kept draining, and ids are unique per
    # meaning.
    reachable = {(e.service_id, i) for e in maps.services.values()
                 for i in range(1, e.count + 1)}
    assert set(maps.slots) == reachable
    in_slots = set(maps.slots.values())
    usable = {b.key for st in desired.values() for b in (() if st.reject or st.drop else st.backends)}
    draining = {b.key for st in desired.values() for b in st.draining} - usable
    assert {maps.backends[b].key for b in in_slots} == usable
    assert {maps.backends[b].key for b in maps.draining} == draining, \
        "draining: exactly the terminating backends no frontend offers new connections"
    assert set(maps.backends) == in_slots | maps.draining
    assert not in_slots & maps.draining
    live = {e.service_id for e in maps.services.values()}
    assert set(maps.maglev) <= live and set(maps.ranges) <= live
    assert set(maps.maglev) == {e.service_id for e in maps.services.values()
                                if e.flags & FLAG_MAGLEV}
    ids = [e.service_id for e in maps.services.values()]
    assert len(ids) == len(set(ids))
    keys = [b.key for b in maps.backends.values()]
    assert len(keys) == len(set(keys))
    for bid, b in maps.backends.items():
        assert rec.backend_id(b) == bid
    # A backend is written terminating only if every frontend using it says so.
    says: dict = {}
    for st in desired.values():
        for b in () if st.reject or st.drop else st.backends:
            says.setdefault(b.key, []).append(b.terminating)
    assert {b.key: b.terminating for bid, b in maps.backends.items()
            if bid not in maps.draining} == {k: all(v) for k, v in says.items()}


def run(rec: Reconciler, maps: FakeMaps, desired: dict) -> list:
    ops = rec.plan(desired)
    apply_checked(maps, ops)
    assert_converged(maps, desired, rec)
    return ops


# --------------------------------------------------------------- ordering

def test_a_new_service_is_written_backends_then_slots_then_entry():
    rec, maps = Reconciler(), FakeMaps()
    ops = run(rec, maps, {FE: state(be(1), be(2))})
    b1, b2 = rec.backend_id(be(1)), rec.backend_id(be(2))
    sid = rec.service_id(FE)
    assert ops == [PutBackend(b1, be(1)), PutBackend(b2, be(2)),
                   PutSlots(sid, (b1, b2), 1),
                   PutService(FE, ServiceEntry(sid, 2, 0, 0))]


def test_a_service_without_backends_is_one_reject_entry():
    rec, maps = Reconciler(), FakeMaps()
    ops = run(rec, maps, {FE: state()})
    assert ops == [PutService(FE, ServiceEntry(rec.service_id(FE), 0, 0, FLAG_REJECT))]


def test_growing_writes_the_new_slot_before_the_larger_count():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1), be(2))})
    ops = run(rec, maps, {FE: state(be(1), be(2), be(3))})
    sid, b3 = rec.service_id(FE), rec.backend_id(be(3))
    assert ops == [PutBackend(b3, be(3)), PutSlots(sid, (b3,), 3),
                   PutService(FE, ServiceEntry(sid, 3, 0, 0))]


def test_shrinking_lowers_the_count_before_deleting_slots_and_the_backend():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1), be(2), be(3))})
    b2, b3 = rec.backend_id(be(2)), rec.backend_id(be(3))
    sid = rec.service_id(FE)
    ops = run(rec, maps, {FE: state(be(1), be(3))})
    # The last backend moves into the freed slot; nothing else is rewritten.
    assert ops == [PutSlots(sid, (b3,), 2), PutService(FE, ServiceEntry(sid, 2, 0, 0)),
                   DeleteSlots(sid, 3, 3), DeleteBackend(b2)]


def test_replacing_a_backend_rewrites_only_its_slot():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(*(be(i) for i in range(1, 101)))})
    sid, old = rec.service_id(FE), rec.backend_id(be(50))
    ops = run(rec, maps, {FE: state(*(be(i) for i in range(1, 101) if i != 50), be(200))})
    new = rec.backend_id(be(200))
    assert ops == [PutBackend(new, be(200)), PutSlots(sid, (new,), 50), DeleteBackend(old)]


def test_removing_a_frontend_deletes_entry_then_slots_then_unshared_backends():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1), be(2)), FE2: state(be(2), be(3), svc=("shop", "api"))})
    sid, b1 = rec.service_id(FE), rec.backend_id(be(1))
    ops = run(rec, maps, {FE2: state(be(2), be(3), svc=("shop", "api"))})
    # 10.0.0.2 is still used by the other frontend and stays.
    assert ops == [DeleteService(FE), DeleteSlots(sid, 1, 2), DeleteBackend(b1)]


def test_going_to_reject_and_back():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1))})
    sid, b1 = rec.service_id(FE), rec.backend_id(be(1))
    ops = run(rec, maps, {FE: state()})
    assert ops == [PutService(FE, ServiceEntry(sid, 0, 0, FLAG_REJECT)), DeleteSlots(sid, 1, 1),
                   DeleteBackend(b1)]
    ops = run(rec, maps, {FE: state(be(1))})
    b1 = rec.backend_id(be(1))
    assert ops == [PutBackend(b1, be(1)), PutSlots(sid, (b1,), 1),
                   PutService(FE, ServiceEntry(sid, 1, 0, 0))]


def test_affinity_and_flags_change_only_the_entry():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1))})
    sid = rec.service_id(FE)
    ops = run(rec, maps, {FE: state(be(1), affinity=600, local=True)})
    assert ops == [PutService(FE, ServiceEntry(sid, 1, 600, FLAG_AFFINITY | FLAG_LOCAL))]
    ops = run(rec, maps, {FE: state(be(1), affinity=600, local=True, kind=KIND_EXTERNAL_IP)})
    assert ops == [PutService(FE, ServiceEntry(sid, 1, 600,
                                              FLAG_AFFINITY | FLAG_LOCAL | FLAG_EXTERNAL))]


def test_a_terminating_flag_rewrites_the_backend_only():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1), be(2))})
    ops = run(rec, maps, {FE: state(be(1), be(2, terminating=True))})
    assert ops == [PutBackend(rec.backend_id(be(2)), be(2, terminating=True))]


def test_what_the_maps_do_not_store_causes_no_write():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1))})
    moved = Backend("10.0.0.1", 8080, "TCP", False, "node-z", "zone-9")
    renamed = FrontendState(("shop", "web"), "web", (moved,), 0, False, False, KIND_CLUSTER_IP)
    assert run(rec, maps, {FE: renamed}) == []


# --------------------------------------------------------------- minimal

def test_an_unchanged_desired_state_plans_nothing():
    rec, maps = Reconciler(), FakeMaps()
    desired = {FE: state(be(1)), FE2: state()}
    run(rec, maps, desired)
    assert rec.plan(dict(desired)) == []


def many_services(n: int, per: int, changed: int = -1) -> dict:
    out = {}
    for s in range(n):
        fe = Frontend(f"172.16.{s // 250}.{s % 250 + 1}", 80, "TCP")
        bs = [Backend(f"10.{s // 250}.{s % 250}.{i}", 8080, "TCP") for i in range(1, per + 1)]
        if s == changed:
            bs[3] = Backend(f"10.{s // 250}.{s % 250}.{per + 10}", 8080, "TCP")
        out[fe] = FrontendState(("shop", f"svc-{s}"), "http", tuple(bs))
    return out


def test_an_endpoint_change_in_one_service_touches_only_that_service():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, many_services(300, 5))
    before = {fe: rec.service_id(fe) for fe in maps.services}
    ops = run(rec, maps, many_services(300, 5, changed=123))
    target = Frontend("172.16.0.124", 80, "TCP")
    sid = rec.service_id(target)
    assert {op.service_id for op in ops if isinstance(op, (PutSlots, DeleteSlots))} == {sid}
    assert [op for op in ops if isinstance(op, (PutService, DeleteService))] == []
    assert len(ops) == 3      # put the new backend, its slot, delete the old backend
    assert {fe: rec.service_id(fe) for fe in maps.services} == before


def test_plan_changes_with_only_the_changed_frontend_matches_a_full_plan():
    full_rec, full_maps = Reconciler(), FakeMaps()
    part_rec, part_maps = Reconciler(), FakeMaps()
    run(full_rec, full_maps, many_services(50, 4))
    run(part_rec, part_maps, many_services(50, 4))
    new = many_services(50, 4, changed=7)
    full_ops = full_rec.plan(new)
    fe = Frontend("172.16.0.8", 80, "TCP")
    # Removing a frontend that was never there is no operation.
    part_ops = part_rec.plan_changes({fe: new[fe], Frontend("192.0.2.1", 80, "TCP"): None})
    assert part_ops == full_ops
    apply_checked(part_maps, part_ops)
    assert_converged(part_maps, new, part_rec)


# ------------------------------------------------------------------- ids

def test_ids_are_stable_and_a_shared_backend_has_one_id():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1), be(2)), FE2: state(be(2), svc=("shop", "api"))})
    ids = (rec.service_id(FE), rec.service_id(FE2), rec.backend_id(be(2)))
    assert maps.slots[(ids[1], 1)] == ids[2] and ids[2] in maps.slots.values()
    run(rec, maps, {FE: state(be(2), be(3)), FE2: state(be(2), be(4), svc=("shop", "api"))})
    assert (rec.service_id(FE), rec.service_id(FE2), rec.backend_id(be(2))) == ids


def test_backend_identity_includes_port_and_protocol():
    rec, maps = Reconciler(), FakeMaps()
    udp = Frontend("172.16.0.10", 53, "UDP")
    run(rec, maps, {FE: state(be(1, 53)), udp: state(be(1, 53, "UDP")),
                    FE2: state(be(1, 54), svc=("shop", "api"))})
    assert len({rec.backend_id(be(1, 53)), rec.backend_id(be(1, 53, "UDP")),
                rec.backend_id(be(1, 54))}) == 3


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_allocator_gives_one_id_per_key_and_prefers_fresh_ids_to_released_ones():
    clock = Clock()
    a = IdAllocator(limit=10, quarantine=60, clock=clock)
    ids = [a.allocate(k) for k in "abcde"]
    assert ids == [1, 2, 3, 4, 5] and a.allocate("c") == 3
    a.release("b")
    a.release("d")
    clock.t += 3600
    # However long ago they were released, fresh ids come first.
    assert [a.allocate(k) for k in "fghij"] == [6, 7, 8, 9, 10]
    # Fresh ids exhausted: the oldest released id whose quarantine is over.
    assert a.allocate("k") == 2 and a.allocate("l") == 4
    held = [a.get(k) for k in "acefghijkl"]
    assert len(set(held)) == len(held) and a.get("b") is None and a.key_of(2) == "k"


def test_a_released_id_waits_out_its_quarantine_whatever_else_happens():
    clock = Clock()
    a = IdAllocator(limit=3, quarantine=100, clock=clock)
    for k in "abc":
        a.allocate(k)
    a.release("b")
    clock.t += 99
    with pytest.raises(IdsExhausted, match="free again in 1s"):
        a.allocate("d")
    clock.t += 1
    assert a.allocate("d") == 2
    with pytest.raises(IdsExhausted):
        a.allocate("e")


def test_allocator_restore_keeps_ids_and_quarantines_every_gap_from_now():
    clock = Clock()
    a = IdAllocator.restore({"x": 4, "y": 9}, limit=12, quarantine=30, clock=clock)
    assert a.get("x") == 4 and a.get("y") == 9 and len(a) == 2
    # Fresh ids continue above the highest one ...
    assert [a.allocate(k) for k in "pqr"] == [10, 11, 12]
    # ... and the holes below it are not free before the quarantine is over:
    # when they were released is not known, so they count as released now.
    assert a.waiting() == 7
    with pytest.raises(IdsExhausted):
        a.allocate("s")
    clock.t += 30
    assert [a.allocate(k) for k in "stuvwz"] == [1, 2, 3, 5, 6, 7]
    with pytest.raises(ValueError, match="held by both"):
        IdAllocator.restore({"x": 4, "y": 4})
    with pytest.raises(ValueError, match="outside"):
        IdAllocator.restore({"x": 0})


def test_ids_other_state_still_names_are_not_fresh_after_a_restore():
    # Backend 20 was released just before a restart; an affinity entry still
    # names it. The restored allocator must not hand 20 out as fresh.
    clock = Clock()
    a = IdAllocator.restore({"x": 4}, limit=100, quarantine=30, clock=clock, named=[20, 7])
    assert a.allocate("new") == 21
    assert a.waiting() == 19          # 1-3, 5-20


def test_released_service_and_backend_ids_are_not_reused_at_once():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1))})
    old_sid, old_bid = rec.service_id(FE), rec.backend_id(be(1))
    run(rec, maps, {})
    run(rec, maps, {FE2: state(be(2), svc=("shop", "api"))})
    assert rec.service_id(FE2) != old_sid and rec.backend_id(be(2)) != old_bid


def test_reused_ids_come_back_only_after_the_quarantine_even_under_exhaustion():
    clock = Clock()
    rec, maps = Reconciler(max_backends=2, quarantine=3600, clock=clock), FakeMaps()
    run(rec, maps, {FE: state(be(1), be(2))})
    run(rec, maps, {FE: state(be(1))})
    # backend 2's id was released a moment ago; no fresh id is left
    with pytest.raises(IdsExhausted):
        rec.plan({FE: state(be(1), be(3))})
    rec, clock.t = maps.restore(max_backends=2, quarantine=3600, clock=clock), clock.t + 3600
    run(rec, maps, {FE: state(be(1), be(3))})
    assert sorted(maps.backends) == [1, 2]


def test_a_plan_reports_the_service_backend_pairs_it_ended_and_the_ids_it_released():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: state(be(1), be(2)), FE2: state(be(2), svc=("shop", "api"))})
    sid, sid2 = rec.service_id(FE), rec.service_id(FE2)
    b1, b2 = rec.backend_id(be(1)), rec.backend_id(be(2))
    run(rec, maps, {FE: state(be(1)), FE2: state(be(2), svc=("shop", "api"))})
    # backend 2 still exists (FE2 uses it): FE's clients must not keep it
    assert rec.ended_pairs == {(sid, b2)} and rec.released_service_ids == set()
    assert b2 in maps.backends
    run(rec, maps, {FE: state(be(1))})
    assert rec.released_service_ids == {sid2} and rec.ended_pairs == set()
    assert b1 in maps.backends


# ---------------------------------------------- drop, Maglev, source ranges

def test_a_dropping_frontend_is_one_entry_with_the_drop_flag_and_no_slots():
    rec, maps = Reconciler(), FakeMaps()
    ops = run(rec, maps, {FE: state(drop=True, local=True)})
    assert ops == [PutService(FE, ServiceEntry(rec.service_id(FE), 0, 0, FLAG_DROP | FLAG_LOCAL))]
    run(rec, maps, {FE: state(be(1), local=True)})
    run(rec, maps, {FE: state(be(2), drop=True, local=True)})
    assert maps.backends == {}


def test_a_maglev_frontend_gets_its_table_before_the_entry_and_loses_it_after():
    rec, maps = Reconciler(), FakeMaps()
    ext = Frontend("203.0.113.7", 80, "TCP", SCOPE_EXTERNAL)
    ops = run(rec, maps, {ext: state(be(1), be(2), be(3), maglev=True, kind=KIND_EXTERNAL_IP)})
    sid = rec.service_id(ext)
    kinds = [type(op).__name__ for op in ops]
    assert kinds == ["PutBackend"] * 3 + ["PutSlots", "PutMaglev", "PutService"]
    assert maps.services[ext].flags & FLAG_MAGLEV
    assert Counter(maps.maglev[sid]) == Counter({rec.backend_id(be(1)): 341,
                                                 rec.backend_id(be(2)): 340,
                                                 rec.backend_id(be(3)): 340}) or \
        sorted(Counter(maps.maglev[sid]).values()) == [340, 340, 341]
    # one backend leaves: the new table is written before the backend goes
    ops = run(rec, maps, {ext: state(be(1), be(3), maglev=True, kind=KIND_EXTERNAL_IP)})
    assert [type(op).__name__ for op in ops].index("PutMaglev") < \
        [type(op).__name__ for op in ops].index("DeleteBackend")
    # Maglev turned off: the entry stops saying so before the table goes
    ops = run(rec, maps, {ext: state(be(1), be(3), kind=KIND_EXTERNAL_IP)})
    assert ops[-1] == DeleteMaglev(sid) and not maps.maglev
    run(rec, maps, {ext: state(be(1), maglev=True, kind=KIND_EXTERNAL_IP)})
    ops = run(rec, maps, {})
    assert ops[:2] == [DeleteService(ext), DeleteSlots(sid, 1, 1)] and DeleteMaglev(sid) in ops


def test_maglev_tables_of_the_same_backends_agree_across_reconcilers_by_address():
    # Two nodes: the same backends, learned in another order, other ids.
    ext = Frontend("203.0.113.7", 80, "TCP", SCOPE_EXTERNAL)
    r1, m1 = Reconciler(), FakeMaps()
    r2, m2 = Reconciler(), FakeMaps()
    run(r2, m2, {FE: state(be(9), be(5))})       # node 2 knew other backends first
    bs = [be(i) for i in (3, 1, 2)]
    run(r1, m1, {ext: state(*bs, maglev=True, kind=KIND_EXTERNAL_IP)})
    run(r2, m2, {FE: state(be(9), be(5)),
                 ext: state(*reversed(bs), maglev=True, kind=KIND_EXTERNAL_IP)})
    addr1 = [m1.backends[b].key for b in m1.maglev[r1.service_id(ext)]]
    addr2 = [m2.backends[b].key for b in m2.maglev[r2.service_id(ext)]]
    assert addr1 == addr2
    assert r1.backend_id(be(1)) != r2.backend_id(be(1))


def test_source_ranges_are_written_before_the_entry_and_replaced_add_first():
    rec, maps = Reconciler(), FakeMaps()
    lb = Frontend("198.51.100.5", 443, "TCP")
    ops = run(rec, maps, {lb: state(be(1), kind=KIND_LOAD_BALANCER,
                                    ranges=("10.0.0.0/8", "192.0.2.0/24"))})
    sid = rec.service_id(lb)
    assert ops[-2:] == [PutRanges(sid, ("10.0.0.0/8", "192.0.2.0/24")),
                        PutService(lb, ServiceEntry(sid, 1, 0, FLAG_EXTERNAL | FLAG_SRC_RANGE))]
    ops = run(rec, maps, {lb: state(be(1), kind=KIND_LOAD_BALANCER,
                                    ranges=("192.0.2.0/24", "203.0.113.0/24"))})
    assert ops == [PutRanges(sid, ("203.0.113.0/24",)), DeleteRanges(sid, ("10.0.0.0/8",))]
    ops = run(rec, maps, {lb: state(be(1), kind=KIND_LOAD_BALANCER)})
    assert ops == [PutService(lb, ServiceEntry(sid, 1, 0, FLAG_EXTERNAL)),
                   DeleteRanges(sid, ("192.0.2.0/24", "203.0.113.0/24"))]


def test_node_facing_frontends_compile_to_entries_of_their_scope():
    snap = snapshot(
        service("web", typ="LoadBalancer", externalTrafficPolicy="Local",
                ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
                        "nodePort": 30080}],
                loadBalancerSourceRanges=["10.0.0.0/8"],
                status={"loadBalancer": {"ingress": [{"ip": "198.51.100.5"}]}}),
        eslice("web-1", "web", [ep("10.0.0.1", node=NODE), ep("10.0.0.2")]))
    desired = compile_services(snap, NODE, ZONE, options=LbOptions(
        nodeport_ips=("10.240.0.11",), maglev=True))
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, desired)
    np_int = maps.services[Frontend("10.240.0.11", 30080, "TCP")]
    np_ext = maps.services[Frontend("10.240.0.11", 30080, "TCP", SCOPE_EXTERNAL)]
    assert np_int.count == 2 and np_int.flags & FLAG_NODEPORT and not np_int.flags & FLAG_MAGLEV
    assert np_ext.count == 1 and np_ext.flags & FLAG_MAGLEV and np_ext.flags & FLAG_LOCAL
    lb_ext = maps.services[Frontend("198.51.100.5", 80, "TCP", SCOPE_EXTERNAL)]
    assert lb_ext.flags & FLAG_SRC_RANGE and maps.ranges[lb_ext.service_id] == {"10.0.0.0/8"}


# --------------------------------------------------------------- restart

def test_restore_from_the_maps_keeps_ids_and_plans_nothing_for_the_same_state():
    rec, maps = Reconciler(), FakeMaps()
    desired = many_services(40, 5)
    desired[FE] = state(be(1), be(2), affinity=300)
    run(rec, maps, desired)
    # A restarted agent knows what the maps store, not nodes or zones.
    for bid, b in list(maps.backends.items()):
        maps.backends[bid] = Backend(b.ip, b.port, b.protocol, b.terminating)
    restored = maps.restore()
    assert restored.plan(desired) == []
    for fe in desired:
        assert restored.service_id(fe) == rec.service_id(fe)
    changed = many_services(40, 5, changed=5)
    changed[FE] = state(be(1), be(2), affinity=300)
    ops = run(restored, maps, changed)
    assert len(ops) == 3


def test_restore_repairs_what_an_interrupted_or_older_agent_left_behind():
    maps = FakeMaps()
    maps.backends = {1: be(1), 2: be(2), 3: be(3), 7: be(1)}   # 7: second id for 10.0.0.1
    maps.slots = {(1, 1): 1, (1, 2): 7,   # FE: slot 2 names the duplicate id
                  (1, 3): 2,              # beyond FE's count: unreachable
                  (5, 1): 3}              # a service id no entry uses
    maps.services = {FE: ServiceEntry(1, 2, 0, 0),
                     FE2: ServiceEntry(1, 2, 0, 0)}   # shares FE's id
    rec = maps.restore()
    desired = {FE: state(be(1), be(2)), FE2: state(be(2), svc=("shop", "api"))}
    ops = rec.plan(desired)
    # FE2 gets its own id and slots before FE's slots change (only deletions
    # of unreachable leftovers may go before).
    puts = [i for i, op in enumerate(ops) if isinstance(op, PutSlots)]
    assert ops[puts[0]].service_id not in (1, 5)
    assert all(isinstance(op, (DeleteSlots, DeleteBackend)) for op in ops[:puts[0]])
    for op in ops:
        maps.apply(op)
    assert check_whole(maps) == []
    assert_converged(maps, desired, rec)
    assert rec.service_id(FE) == 1 and rec.backend_id(be(1)) == 1
    assert 7 not in maps.backends and 3 not in maps.backends


def test_restore_drops_entries_no_longer_wanted_including_id_sharers():
    maps = FakeMaps()
    maps.backends = {1: be(1)}
    maps.slots = {(1, 1): 1}
    maps.services = {FE: ServiceEntry(1, 1, 0, 0), FE2: ServiceEntry(1, 1, 0, 0)}
    rec = maps.restore()
    ops = rec.plan({})
    assert ops[0] == DeleteService(FE2)
    apply_checked(maps, ops)
    assert (maps.services, maps.slots, maps.backends) == ({}, {}, {})


def test_more_backends_than_a_count_holds_are_cut_and_reported():
    rec, maps = Reconciler(max_slots=4), FakeMaps()
    run(rec, maps, {FE: state(*(be(i) for i in range(1, 4)))})
    assert rec.truncated == {}
    ops = rec.plan({FE: state(*(be(i) for i in range(1, 8)))})
    apply_checked(maps, ops)
    assert maps.services[FE].count == 4 and rec.truncated == {FE: 7}
    assert sorted(b.ip for b in maps.resolve(FE)) == [f"10.0.0.{i}" for i in range(1, 5)]


# ----------------------------------------------------- randomized orders

IPS = [f"10.1.0.{i}" for i in range(1, 40)]      # few addresses: much sharing
NODES = ["node-a", "node-b", "node-c"]
ZONES = ["zone-1", "zone-2"]


def random_cluster(rng: random.Random) -> list[dict]:
    objs: list[dict] = []
    for s in range(rng.randrange(0, 9)):
        name = f"svc-{rng.randrange(12)}"
        if any(o["metadata"]["name"] == name for o in objs):
            continue
        ports = [("http", 80, "TCP", "http")]
        if rng.random() < 0.5:
            ports.append(("dns", 53, rng.choice(["UDP", "SCTP"]), 53))
        spec = {}
        if rng.random() < 0.3:
            spec["sessionAffinity"] = "ClientIP"
        if rng.random() < 0.2:
            spec["internalTrafficPolicy"] = "Local"
        if rng.random() < 0.2:
            spec["externalIPs"] = [f"203.0.113.{rng.randrange(1, 4)}"]
        typ, status = "ClusterIP", None
        if rng.random() < 0.3:
            # node-facing: NodePorts, a load-balancer IP, maybe eTP Local
            # and source ranges
            typ = rng.choice(["NodePort", "LoadBalancer"])
            n = int(name.split('-')[1])
            ports = [p + (30000 + 10 * n + i,) for i, p in enumerate(ports)]
            spec["externalTrafficPolicy"] = rng.choice(["Cluster", "Local"])
            if typ == "LoadBalancer":
                status = {"loadBalancer": {"ingress": [{"ip": f"198.51.100.{n + 1}"}]}}
                if rng.random() < 0.5:
                    spec["loadBalancerSourceRanges"] = rng.sample(
                        ["10.0.0.0/8", "192.0.2.0/24", "198.18.0.0/15"], rng.randrange(1, 3))
        ip = f"172.16.0.{int(name.split('-')[1]) + 1}"
        objs.append(service(name, ip=ip, ports=ports, typ=typ, status=status, **spec))
        for k in range(rng.randrange(0, 3)):
            eps = []
            for ip_ in rng.sample(IPS, rng.randrange(0, 12)):
                r = rng.random()
                eps.append(ep(ip_, ready=r > 0.25, serving=r > 0.1, terminating=r <= 0.25,
                              node=rng.choice(NODES), zone=rng.choice(ZONES),
                              for_zones=[rng.choice(ZONES)] if rng.random() < 0.3 else None))
            sports = [("http", rng.choice([8080, 8081]), "TCP")]
            if len(ports) > 1:
                sports.append(("dns", 53, ports[1][2]))
            objs.append(eslice(f"{name}-{k}", name, eps, ports=sports))
    return objs


@pytest.mark.parametrize("seed", range(12))
def test_no_operation_ever_leaves_a_visible_service_half_written(seed):
    rng = random.Random(seed)
    rec = Reconciler(quarantine=rng.choice([0, 4, 1024]))
    maps = FakeMaps()
    old: dict = {}
    opts = LbOptions(nodeport_ips=("10.240.0.11", "10.241.1.1"), maglev=seed % 2 == 0)
    for step in range(40):
        new = compile_services(snapshot(*random_cluster(rng)), NODE, ZONE, options=opts)
        if rng.random() < 0.15:
            # An agent restart between two states: everything from the maps.
            kept = {fe: rec.service_id(fe) for fe in maps.services}
            rec = maps.restore(quarantine=rec.service_ids.quarantine)
            assert {fe: rec.service_id(fe) for fe in maps.services} == kept
        ops = rec.plan(new)
        ids_before = {fe: maps.services[fe].service_id for fe in maps.services if fe in new}
        for op in ops:
            maps.apply(op)
            assert check_whole(maps) == [], f"seed {seed} step {step} after {op}"
            # Ids never change meaning within a plan: whatever a visible
            # entry reaches is one of its old or new backends.
            for fe in maps.services:
                allowed = {b.key for st in (old.get(fe), new.get(fe)) if st
                           for b in st.backends}
                assert {b.key for b in maps.resolve(fe)} <= allowed, (seed, step, op, fe)
        assert_converged(maps, new, rec)
        # A frontend that stays keeps its id.
        assert all(maps.services[fe].service_id == sid for fe, sid in ids_before.items())
        assert rec.plan(new) == []
        old = new


def test_randomized_partial_plans_converge_like_full_ones():
    rng = random.Random(99)
    rec, maps = Reconciler(), FakeMaps()
    current: dict = {}
    for step in range(60):
        new = compile_services(snapshot(*random_cluster(rng)), NODE, ZONE)
        updates = {fe: st for fe, st in new.items() if current.get(fe) != st}
        updates.update({fe: None for fe in current if fe not in new})
        ops = rec.plan_changes(updates)
        apply_checked(maps, ops)
        assert_converged(maps, new, rec)
        current = new


def test_a_backend_is_terminating_only_while_every_service_using_it_says_so():
    rec, maps = Reconciler(), FakeMaps()
    api = ("shop", "api")
    run(rec, maps, {FE: state(be(1, terminating=True)), FE2: state(be(1), svc=api)})
    bid = rec.backend_id(be(1))
    assert maps.backends[bid].terminating is False
    # The Service that still calls it ready lets go: now everyone agrees.
    ops = run(rec, maps, {FE: state(be(1, terminating=True)), FE2: state(be(2), svc=api)})
    assert PutBackend(bid, be(1, terminating=True)) in ops
    assert maps.backends[bid].terminating is True


def test_compiled_services_end_up_in_the_maps_as_compiled():
    snap = snapshot(
        service("web", sessionAffinity="ClientIP", externalIPs=["203.0.113.7"]),
        eslice("web-1", "web", [ep("10.0.0.1"), ep("10.0.0.2", node=NODE)]),
        service("api", ip="172.16.0.11", internalTrafficPolicy="Local",
                ports=[("http", 80, "TCP", 8080), ("dns", 53, "UDP", 53)]),
        eslice("api-1", "api", [ep("10.0.0.2", node=NODE), ep("10.0.0.3")],
               ports=[("http", 8080, "TCP"), ("dns", 53, "UDP")]),
        service("none", ip="172.16.0.12"))
    desired = compile_services(snap, NODE, ZONE)
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, desired)
    web = maps.services[FE]
    assert web.flags == FLAG_AFFINITY and web.affinity_timeout == 10800
    # (an external IP without an external entry: its one entry serves outside too)
    assert maps.services[Frontend("203.0.113.7", 80, "TCP")].flags == \
        FLAG_AFFINITY | FLAG_EXTERNAL | FLAG_SOLE
    assert [b.ip for b in maps.resolve(Frontend("172.16.0.11", 53, "UDP"))] == ["10.0.0.2"]
    assert maps.services[Frontend("172.16.0.11", 53, "UDP")].flags == FLAG_LOCAL
    assert maps.resolve(Frontend("172.16.0.12", 80, "TCP")) == ()
    assert maps.services[Frontend("172.16.0.12", 80, "TCP")].flags == FLAG_REJECT
    # 10.0.0.2:8080/TCP serves three frontends through one backend entry.
    assert sorted(b.key for b in maps.backends.values()) == [
        ("10.0.0.1", 8080, "TCP"), ("10.0.0.2", 53, "UDP"), ("10.0.0.2", 8080, "TCP")]


@pytest.mark.parametrize("seed", range(8))
def test_an_agent_killed_mid_plan_is_repaired_by_the_next_one(seed):
    # The agent dies after an arbitrary prefix of a plan; the next agent only
    # has the maps. Its first plan must keep every visible entry whole and
    # end exactly at the desired state, leaving nothing behind.
    rng = random.Random(1000 + seed)
    rec, maps = Reconciler(quarantine=0), FakeMaps()
    opts = LbOptions(nodeport_ips=("10.240.0.11",), maglev=seed % 2 == 1)
    for step in range(25):
        new = compile_services(snapshot(*random_cluster(rng)), NODE, ZONE, options=opts)
        ops = rec.plan(new)
        cut = rng.randrange(len(ops) + 1) if rng.random() < 0.5 else len(ops)
        apply_checked(maps, ops[:cut])
        if cut < len(ops):
            rec = maps.restore(quarantine=0)
            apply_checked(maps, rec.plan(new))
        assert_converged(maps, new, rec)


@pytest.mark.parametrize("seed", range(8))
def test_restore_converges_from_randomly_damaged_maps(seed):
    # Damage no correct agent leaves (lost slots, stray slots and backends,
    # entries sharing ids): whatever was found, one plan ends at the desired
    # state with nothing left over.
    rng = random.Random(2000 + seed)
    rec, maps = Reconciler(), FakeMaps()
    opts = LbOptions(nodeport_ips=("10.240.0.11",), maglev=True)
    for step in range(15):
        new = compile_services(snapshot(*random_cluster(rng)), NODE, ZONE, options=opts)
        maps.apply_all(rec.plan(new))
        for _ in range(rng.randrange(4)):
            what = rng.randrange(4)
            if what == 0 and maps.slots:
                del maps.slots[rng.choice(sorted(maps.slots))]
            elif what == 1:
                # A stray slot, possibly naming a backend that does not exist.
                maps.slots[(rng.randrange(1, 40), rng.randrange(1, 20))] = \
                    rng.choice(sorted(maps.backends) + [9999])
            elif what == 2:
                maps.backends[rng.randrange(1, 400)] = Backend(
                    rng.choice(IPS), rng.choice([8080, 8081]), "TCP")
            elif maps.services:
                fe = rng.choice(sorted(maps.services, key=Frontend.sort_key))
                e = maps.services[fe]
                other = rng.choice(list(maps.services.values()))
                maps.services[fe] = ServiceEntry(other.service_id, e.count,
                                                 e.affinity_timeout, e.flags)
        rec = maps.restore()
        maps.apply_all(rec.plan(new))
        assert_converged(maps, new, rec)
        assert rec.plan(new) == []


# ------------------------------------------------- graceful termination

def draining(*backends: Backend, usable=()) -> FrontendState:
    return FrontendState(("shop", "web"), "http", tuple(usable), 0, not usable, False,
                         KIND_CLUSTER_IP, "", tuple(backends))


def test_a_rolling_update_keeps_the_old_backend_for_its_flows_until_it_is_gone():
    """ready -> terminating (draining: out of the slots, then flagged, id
    and entry kept) -> removed from the slice (deleted, id released)."""
    rec, maps = Reconciler(quarantine=0), FakeMaps()
    run(rec, maps, {FE: state(be(1), be(2))})
    old = rec.backend_id(be(1))
    ops = run(rec, maps, {FE: draining(be(1, terminating=True), usable=[be(2)])})
    assert maps.resolve(FE) == (be(2),), "new connections: only the ready one"
    assert old in maps.backends and maps.draining == {old}, "the old one kept for its flows"
    assert rec.backend_id(be(1)) == old, "its id unchanged"
    flag = next(i for i, op in enumerate(ops) if isinstance(op, PutBackend) and op.draining)
    assert all(not isinstance(op, PutSlots) and not isinstance(op, PutService)
               for op in ops[flag:]), "flagged only after the slots stopped naming it"
    assert not any(isinstance(op, DeleteBackend) for op in ops)
    # back to ready (the rollout was undone): unflagged before a slot names it
    ops = run(rec, maps, {FE: state(be(1), be(2))})
    unflag = next(i for i, op in enumerate(ops) if isinstance(op, PutBackend))
    assert not ops[unflag].draining and unflag < next(
        i for i, op in enumerate(ops) if isinstance(op, PutSlots))
    assert maps.draining == set()
    run(rec, maps, {FE: draining(be(1, terminating=True), usable=[be(2)])})
    ops = run(rec, maps, {FE: state(be(2))})
    assert DeleteBackend(old) in ops and old not in maps.backends
    assert rec.backend_id(be(1)) is None


def test_a_draining_backend_survives_a_restart_of_the_agent():
    rec, maps = Reconciler(), FakeMaps()
    run(rec, maps, {FE: draining(be(1, terminating=True), usable=[be(2)])})
    bid = rec.backend_id(be(1))
    rec = maps.restore()
    ops = run(rec, maps, {FE: draining(be(1, terminating=True), usable=[be(2)])})
    assert DeleteBackend(bid) not in ops and maps.draining == {bid}
    assert rec.backend_id(be(1)) == bid
