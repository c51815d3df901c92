"""Capacity: a state that would overflow a map is refused before any write,
with the map, the numbers and the policy that tipped it over."""
from __future__ import annotations

from agent.policy import Capacities, apply_ops, check_capacity, compile_policy, diff, usage
from agent.policy.capacity import MAP_ENDPOINTS, MAP_IPCACHE, MAP_RULES, peak_usage
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
    seen = {MAP_IPCACHE: len(img.ipcache), MAP_ENDPOINTS: len(img.endpoints), MAP_RULES: len(img.rules)}
    for op in ops:
        apply_ops(img, [op])
        seen = {MAP_IPCACHE: max(seen[MAP_IPCACHE], len(img.ipcache)),
                MAP_ENDPOINTS: max(seen[MAP_ENDPOINTS], len(img.endpoints)),
                MAP_RULES: max(seen[MAP_RULES], len(img.rules))}
    assert peak_usage(old, ops) == seen
