"""agent/conntrack's decisions, pure over entries (no kernel): which entries
are past their lifetime, which flows a removed backend loses, where an
entry of a superseded map goes; and the lifetime table both sides apply."""
from __future__ import annotations

from agent.conntrack import gc, migrate, purge
from agent.model import conntrack as M

L = M.Lifetimes(tcp_syn=60, tcp_established=21600, tcp_fin=60, tcp_close=10, other=120)
S = M.NSEC


def key(sport: int, proto: int = 6, d: int = M.FORWARD) -> M.CtKey:
    return M.CtKey(1, 2, sport, 80, proto, d)


def val(last: int, state: int, backend: int = 7) -> M.CtValue:
    return M.CtValue(last, 3, 8080, 0, state, backend, 1)


def test_each_state_has_its_own_lifetime_and_other_protocols_one():
    assert [L.seconds(6, s) for s in (M.NEW, M.SYN_RECV, M.ESTABLISHED, M.FIN_WAIT,
                                      M.CLOSED)] == [60, 60, 21600, 60, 10]
    assert {L.seconds(p, s) for p in (17, 132, 1) for s in M.STATES} == {120}
    assert not L.expired(6, M.CLOSED, 0, 10 * S)
    assert L.expired(6, M.CLOSED, 0, 10 * S + 1)


def test_gc_plans_exactly_the_expired_entries_of_every_table():
    now = 100_000 * S
    nat = {"established": [(key(1), val(now - 21601 * S, M.ESTABLISHED)),
                           (key(2), val(now - 21599 * S, M.ESTABLISHED))],
           "new": [(key(3), val(now - 11 * S, M.CLOSED)), (key(4), val(now - 9 * S, M.CLOSED)),
                   (key(5, 17), val(now - 121 * S, M.NEW)), (key(6, 17), val(now - 61 * S, M.NEW))]}
    pol = [(key(7, d=M.POLICY), M.PolicyValue(now - 61 * S, 0, M.FIN_WAIT)),
           (key(8, d=M.POLICY), M.PolicyValue(now - 59 * S, 0, M.NEW))]
    # IPv6 policy flows: the same lifetimes, keys kept as bytes
    pol6 = [(M.Ct6Key(b"tcp-old", 6), M.PolicyValue(now - 61 * S, 0, M.FIN_WAIT)),
            (M.Ct6Key(b"tcp-live", 6), M.PolicyValue(now - 59 * S, 0, M.FIN_WAIT)),
            (M.Ct6Key(b"udp-old", 17), M.PolicyValue(now - 121 * S, 0, M.NEW))]
    plan = gc.plan(nat, pol, now, L, pol6)
    six = plan.pop("policy6")
    assert [k.raw for k, _ in six] == [b"tcp-old", b"udp-old"]
    assert {t: [k.sport for k, _ in e] for t, e in plan.items()} == {
        "established": [1], "new": [3, 5], "policy": [7]}
    assert gc.plan(nat, pol, now, L)["policy6"] == []


def test_a_removed_backend_loses_its_datagram_flows_and_keeps_its_connections():
    nat = {"established": [(key(1, 6), val(0, M.ESTABLISHED, 7)),
                           (key(1, 6, M.REPLY), val(0, M.ESTABLISHED, 7)),
                           (key(2, 17), val(0, M.ESTABLISHED, 7)),
                           (key(2, 17, M.REPLY), val(0, M.ESTABLISHED, 7)),
                           (key(3, 132), val(0, M.ESTABLISHED, 7)),
                           (key(4, 17), val(0, M.ESTABLISHED, 8))],
           "new": [(key(5, 17), val(0, M.NEW, 7))]}
    plan = purge.plan(nat, {7})
    assert {t: sorted((k.sport, k.dir) for k in ks) for t, ks in plan.items()} == {
        "established": [(2, M.FORWARD), (2, M.REPLY)], "new": [(5, M.FORWARD)]}


def test_entries_of_the_single_map_of_the_release_before_are_routed_by_direction():
    maps = migrate.MAPS
    r = migrate.RULES
    assert r.targets("fp_ct4_v1", {"dir": M.FORWARD}) == [maps["FP_MAP_CT"], maps["FP_MAP_CT_NEW"]]
    assert r.targets("fp_ct4_v1", {"dir": M.REPLY}) == [maps["FP_MAP_CT"], maps["FP_MAP_CT_NEW"]]
    assert r.targets("fp_ct4_v1", {"dir": M.POLICY}) == [maps["FP_MAP_CT_POLICY"]]
    assert r.targets("fp_ct4_v2_old", {"dir": M.FORWARD})[0] == maps["FP_MAP_CT"]
    assert r.targets("fp_ctnew4_v0", {"dir": M.REPLY}) == [maps["FP_MAP_CT_NEW"]]
    assert r.targets("fp_ctpol4_v1_old2", {"dir": M.POLICY}) == [maps["FP_MAP_CT_POLICY"]]
    assert r.targets("fp_ep4_v0", {}) is None, "not conntrack: the map of its lineage"
    assert r.defaults(maps["FP_MAP_CT"]) == {"state": M.ESTABLISHED}
    assert r.defaults(maps["FP_MAP_ENDPOINTS"]) == {}


def test_a_flows_two_entries_name_each_other():
    fwd = M.CtKey(10, 20, 1000, 80, 6, M.FORWARD)
    v = M.CtValue(0, 30, 8080, 0, M.NEW, 1, 1)
    rep = M.partner(fwd, v, hairpin_ip=99)
    assert rep == M.CtKey(30, 10, 8080, 1000, 6, M.REPLY)
    assert M.partner(rep, M.CtValue(0, 20, 80, 0, M.NEW, 1, 1), 99) == fwd
    hp = M.CtValue(0, 10, 8080, M.F_HAIRPIN, M.NEW, 1, 1)     # the client is the backend
    rep = M.partner(fwd._replace(daddr=20), hp, hairpin_ip=99)
    assert rep == M.CtKey(10, 99, 8080, 1000, 6, M.REPLY)
    assert M.partner(rep, M.CtValue(0, 20, 80, M.F_HAIRPIN, M.NEW, 1, 1), 99) == fwd
