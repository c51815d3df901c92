"""Capacity: a state that would overflow a map is refused before any write,
with the map, the numbers and the policy that tipped it over."""
from __future__ import annotations

from agent.policy import Capacities, apply_ops, check_capacity, compile_policy, diff, usage
from agent.policy.capacity import MAP_ENDPOINTS, MAP_IPCACHE, MAP_IPCACHE6, MAP_RULES, peak_usage
from tests.policy.kube import netpol, pod, snapshot
from tests.policy.test_semantics import HOST1, cluster

NODE = "n1"
ROOMY = Capacities(ipcache=10_000, endpoints=1_000, rules=100_000)


def compile_objs(objs, previous=None):
    return compile_policy(snapshot(objs), NODE, [HOST1], "default", previous=previous)


SMALL = netpol("x", "a-small", {"podSelector": {"matchLabels": {"app": "a"}},
                                "ingress": [{"ports": [{"port": 80}]}]})
# Every port but one, from every pod: 30 port prefixes for each of four identities.
BIG = netpol("x", "b-big", {"podSelector": {"matchLabels": {"app": "a"}},
                            "ingress": [{"from": [{"namespaceSelector": {}}],
                                         "ports": [{"port": 1, "endPort": 65534}]}]})


def test_a_state_that_fits_is_accepted():
    s = compile_objs(cluster() + [SMALL, BIG])
    assert check_capacity(s, ROOMY) == []
    assert check_capacity(s, ROOMY, old=compile_objs(cluster())) == []


def test_the_policy_that_tips_the_rules_map_over_is_named():
    old = compile_objs(cluster() + [SMALL])
    new = compile_objs(cluster() + [SMALL, BIG], previous=old)
    cap = usage(old)[MAP_RULES] + 10
    problems = check_capacity(new, Capacities(10_000, 1_000, cap))
    assert [p.map for p in problems] == [MAP_RULES]
    p = problems[0]
    assert p.policy == "x/b-big" and p.needed == usage(new)[MAP_RULES] and p.capacity == cap
    assert "x/b-big" in p.reason and str(cap) in p.reason


def test_the_newest_policy_is_refused_whatever_its_name():
    # Ids follow arrival when compiled with `previous`, so blame does too.
    old = compile_objs(cluster() + [BIG])
    late_small = netpol("x", "0-late", {"podSelector": {"matchLabels": {"app": "a"}},
                                        "ingress": [{"ports": [{"port": 80, "endPort": 95}]}]})
    new = compile_objs(cluster() + [BIG, late_small], previous=old)
    cap = usage(old)[MAP_RULES]
    assert usage(new)[MAP_RULES] > cap
    problems = check_capacity(new, Capacities(10_000, 1_000, cap))
    assert problems and problems[0].policy == "x/0-late"


def test_ipcache_overflow_is_blamed_on_the_policy_whose_blocks_need_the_entries():
    many = netpol("x", "blocks", {"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "172.16.0.0/12", "except": [f"172.16.{i}.0/24" for i in range(40)]}}]}]})
    s = compile_objs(cluster() + [many])
    pods_and_node = 6
    problems = check_capacity(s, Capacities(pods_and_node + 20, 1_000, 100_000))
    assert [p.map for p in problems] == [MAP_IPCACHE]
    assert problems[0].policy == "x/blocks" and problems[0].needed == pods_and_node + 41


def test_too_many_pods_for_the_endpoints_map_blames_no_policy():
    s = compile_objs(cluster())
    problems = check_capacity(s, Capacities(10_000, 2, 100_000))
    assert [(p.map, p.policy, p.needed) for p in problems] == [(MAP_ENDPOINTS, None, 4)]


def test_the_peak_of_the_transition_counts_not_just_the_end():
    # Widening port 80 to 80-81: the new /15 keys are written before the old
    # /16 keys go (they are what both states allow), so for a moment the map
    # holds both although the end state fits exactly.
    def web(ports):
        return netpol("x", "p", {"podSelector": {"matchLabels": {"app": "a"}},
                                 "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [ports]}]})
    old = compile_objs(cluster() + [web({"port": 80})])
    new = compile_objs(cluster() + [web({"port": 80, "endPort": 81})], previous=old)
    cap = Capacities(10_000, 1_000, usage(new)[MAP_RULES])
    assert check_capacity(new, cap) == []
    problems = check_capacity(new, cap, old=old)
    assert [p.map for p in problems] == [MAP_RULES]
    assert problems[0].needed > usage(new)[MAP_RULES]
    assert problems[0].policy == "x/p"


def test_peak_usage_is_the_largest_size_seen_while_applying():
    old = compile_objs(cluster() + [SMALL, pod("x", "gone", "10.0.1.40", labels={"app": "a"})])
    new = compile_objs(cluster() + [BIG], previous=old)
    ops = diff(old, new)
    img = old.image()
    seen = {MAP_IPCACHE: len(img.ipcache), MAP_IPCACHE6: 0, MAP_ENDPOINTS: len(img.endpoints),
            MAP_RULES: len(img.rules)}
    for op in ops:
        apply_ops(img, [op])
        seen = {MAP_IPCACHE: max(seen[MAP_IPCACHE], len(img.ipcache)), MAP_IPCACHE6: 0,
                MAP_ENDPOINTS: max(seen[MAP_ENDPOINTS], len(img.endpoints)),
                MAP_RULES: max(seen[MAP_RULES], len(img.rules))}
    assert peak_usage(old, ops) == seen


# ---------------------------------------------------------------- fit

from agent.policy import evaluate, fit, refusal_order  # noqa: E402
from tests.policy.kube import namespace  # noqa: E402

HOST = "192.168.0.1"
XA, XB, XC, XD = "10.1.0.10", "10.1.0.11", "10.1.0.12", "10.1.0.13"
# app=web admits everyone on many ports: 30+ rule keys per identity
WEB = netpol("x", "web", {"podSelector": {"matchLabels": {"app": "web"}},
                          "ingress": [{"from": [{"namespaceSelector": {}}],
                                       "ports": [{"port": 1, "endPort": 65534}]}]})
DB = netpol("x", "db", {"podSelector": {"matchLabels": {"app": "db"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                     "ports": [{"port": 5432}]}]})


def world(labels: dict[str, str], policies=(WEB, DB)):
    pods = [pod("x", n, ip, labels={"app": labels[n]})
            for n, ip in (("a", XA), ("b", XB), ("c", XC), ("d", XD))]
    return [namespace("x", ns="x")] + pods + list(policies)


def compiler(objs, previous=None):
    snap = snapshot(objs)
    return lambda refused: compile_policy(snap, NODE, [HOST], "default", previous=previous,
                                          refused=refused)


def rules_needed(objs) -> int:
    return usage(compiler(objs)(frozenset()))[MAP_RULES]


def test_a_relabel_into_an_enforced_policy_that_does_not_fit_refuses_that_pair_only():
    before = world({"a": "web", "b": "db", "c": "db", "d": "other"})
    old = compiler(before)(frozenset())
    after = world({"a": "web", "b": "db", "c": "db", "d": "web"})
    # Room for the old rules plus d's move to web's identity (the transition
    # gives it a transitional identity that a's web rules admit for a
    # moment: 30 more), not for d's own web rules as well.
    cap = Capacities(10_000, 1_000, usage(old)[MAP_RULES] + 35)
    f = fit(compiler(after, old), cap, old, changed=(), applied=old_pairs(old))
    assert f.state is not None and f.overflows and f.overflows[0].map == MAP_RULES
    assert f.refused_policies() == {"x/web": [XD]}
    st = f.state
    # d is isolated by web without web's rules: only the node reaches it
    assert st.endpoints[XD].ingress.enforced
    assert not evaluate(st, XB, XD, "TCP", 80).allowed
    assert evaluate(st, HOST, XD, "TCP", 80).allowed
    # everything else is applied: web still admits everyone at a, and db's
    # rules learn d's new identity (it is app=web now)
    assert evaluate(st, XB, XA, "TCP", 80).allowed
    assert evaluate(st, XD, XB, "TCP", 5432).allowed
    assert usage(st)[MAP_RULES] <= cap.rules
    assert check_capacity(st, cap, old, f.ops) == []


def old_pairs(state):
    from agent.policy import pairs_of
    return pairs_of(state) - state.refused


def test_a_changed_policy_that_does_not_fit_is_refused_whole_by_name():
    before = world({"a": "web", "b": "db", "c": "db", "d": "db"}, policies=(DB,))
    old = compiler(before)(frozenset())
    after = world({"a": "web", "b": "db", "c": "db", "d": "db"}, policies=(DB, WEB))
    cap = Capacities(10_000, 1_000, usage(old)[MAP_RULES] + 10)
    f = fit(compiler(after, old), cap, old, changed={"x/web"}, applied=old_pairs(old))
    assert f.refused_policies() == {"x/web": [XA]}
    # the old policy keeps working, the new one isolates a without admitting
    assert evaluate(f.state, XA, XB, "TCP", 5432).allowed
    assert not evaluate(f.state, XC, XA, "TCP", 80).allowed
    assert f.state.endpoints[XA].ingress.enforced


def test_changed_policies_are_refused_before_older_ones_whatever_the_ids():
    # db is newer (higher id) than web, but web is the one that changed
    old = compiler(world({"a": "web", "b": "db", "c": "db", "d": "web"}, policies=(WEB,)))(
        frozenset())
    after = world({"a": "web", "b": "db", "c": "db", "d": "web"}, policies=(WEB, DB))
    new = compiler(after, old)(frozenset())
    assert new.policy_ids["x/db"] > new.policy_ids["x/web"]
    units = refusal_order(new, changed={"x/web"}, applied=old_pairs(old))
    assert units[0] == {("x/web", XA), ("x/web", XD)}
    units = refusal_order(new, changed={"x/db"}, applied=old_pairs(old))
    assert units[0] == {("x/db", XB), ("x/db", XC)}
    # without a changed policy, new pairs go before the applied ones
    units = refusal_order(new, changed=(), applied=old_pairs(old))
    assert [set(u) for u in units[:2]] == [{("x/db", XB)}, {("x/db", XC)}]


BIGDB = netpol("x", "bigdb", {"podSelector": {"matchLabels": {"app": "db"}},
                              "ingress": [{"from": [{"namespaceSelector": {}}],
                                           "ports": [{"port": 1, "endPort": 65534}]}]})


def test_the_fewest_pairs_are_refused_and_room_lets_them_in_again():
    objs = world({"a": "web", "b": "web", "c": "db", "d": "db"}, policies=(WEB, BIGDB))
    full = rules_needed(objs)
    cap = Capacities(10_000, 1_000, full - 30)
    f = fit(compiler(objs), cap, None)
    order = refusal_order(compiler(objs)(frozenset()))
    # web is the newest policy: its pairs go first, one of them is enough
    assert order[0] == {("x/web", XA)}
    assert f.refused == {("x/web", XA)}
    assert check_capacity(compiler(objs)(frozenset()), cap) != []
    # a later change frees room (bigdb is deleted): a gets web's rules again.
    # Relaxations are written last, so the change's own peak holds bigdb's
    # rules and the readmitted ones at once; the plan after it (nothing
    # else changed) has the room.
    roomy = world({"a": "web", "b": "web", "c": "db", "d": "db"}, policies=(WEB,))
    state, plans = f.state, 0
    while True:
        g = fit(compiler(roomy, state), cap, state, applied=old_pairs(state))
        plans += 1
        assert g.state is not None
        state = g.state
        if not g.ops or plans == 3:
            break
    assert g.refused == frozenset() and plans <= 3
    assert evaluate(state, XC, XA, "TCP", 80).allowed


def test_an_ipcache_overflow_refuses_the_policy_whose_blocks_need_the_entries():
    blocks = netpol("x", "blocks", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "172.16.0.0/12",
                               "except": [f"172.16.{i}.0/24" for i in range(40)]}}]}]})
    objs = world({"a": "web", "b": "db", "c": "db", "d": "db"}, policies=(WEB, DB, blocks))
    f = fit(compiler(objs), Capacities(20, 1_000, 100_000), None, changed={"x/blocks"})
    assert f.refused_policies() == {"x/blocks": [XB, XC, XD]}
    assert usage(f.state)[MAP_IPCACHE] <= 20
    assert f.state.endpoints[XB].ingress.enforced


def test_too_many_pods_for_the_endpoints_map_fits_nothing():
    f = fit(compiler(world({"a": "web", "b": "db", "c": "db", "d": "db"})),
            Capacities(10_000, 2, 100_000), None)
    assert f.state is None and [o.map for o in f.overflows] == [MAP_ENDPOINTS]


def test_a_state_that_fits_is_taken_as_it_is():
    objs = world({"a": "web", "b": "db", "c": "db", "d": "db"})
    f = fit(compiler(objs), ROOMY, None)
    assert f.overflows == [] and f.refused == frozenset() and f.compiles == 1


def test_when_nothing_fits_newly_isolated_pods_are_isolated_without_rules():
    from agent.policy import EndpointPut, apply_ops
    before = world({"a": "web", "b": "db", "c": "db", "d": "other"})
    old = compiler(before)(frozenset())
    after = world({"a": "web", "b": "db", "c": "db", "d": "web"})
    # the maps already hold more than the capacity (a smaller rules map
    # after a restart): no refusal can make the way from them fit
    cap = Capacities(10_000, 1_000, usage(old)[MAP_RULES] // 2)
    f = fit(compiler(after, old), cap, old, applied=old_pairs(old))
    assert f.state is None and f.overflows
    assert ("x/web", XD) in f.refused
    assert all(isinstance(op, EndpointPut) for op in f.ops)
    assert [op.endpoint for op in f.ops] == [XD]
    img = apply_ops(old.image(), f.ops)
    assert len(img.rules) == usage(old)[MAP_RULES] and len(img.ipcache) == len(old.ipcache)
    assert img.endpoints[XD].ingress.enforced
    # d admits nothing but what old already admitted (nothing: it had no rules)
    assert not evaluate(img, XA, XD, "TCP", 80).allowed
    assert evaluate(old, XA, XD, "TCP", 80).allowed
    # the others are exactly as before
    for ip in (XA, XB, XC):
        assert img.endpoints[ip] == old.image().endpoints[ip]


def test_a_transition_that_may_pass_the_capacity_is_judged_step_by_step():
    """When the old entries plus every write could exceed a map, the peak is
    worked out op by op: a change that deletes about as much as it adds
    fits a map the bound alone would call too small."""
    shifted = netpol("x", "b-big", {"podSelector": {"matchLabels": {"app": "a"}},
                                    "ingress": [{"from": [{"namespaceSelector": {}}],
                                                 "ports": [{"port": 2, "endPort": 65535}]}]})
    old = compile_objs(cluster() + [SMALL, BIG])
    new = compile_objs(cluster() + [SMALL, shifted], previous=old)
    ops = diff(old, new)
    need = max(peak_usage(old, ops)[MAP_RULES], usage(new)[MAP_RULES])
    assert usage(old)[MAP_RULES] + len(ops) > need     # the coarse bound would not do
    assert check_capacity(new, Capacities(10_000, 1_000, need), old, ops) == []
    short = check_capacity(new, Capacities(10_000, 1_000, need - 1), old, ops)
    assert [o.map for o in short] == [MAP_RULES]
