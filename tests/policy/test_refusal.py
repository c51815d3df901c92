"""Refused (policy, endpoint) pairs: the compiler leaves the policy's rules
out at that endpoint and keeps its isolation, so a refusal can only take
allows away, never open anything; incremental compiles with changing
refusals equal full ones, and the diffs between them keep the no-window
property."""
from __future__ import annotations

import random

import pytest

from agent.policy import apply_ops, compile_policy, diff, evaluate
from agent.policy.state import POLICY_HOST
from tests.policy.gen import NODES, base_world, mutate, probe_ips, random_policies, PROBE_PORTS
from tests.policy.kube import namespace, netpol, pod, snapshot
from tests.policy.test_diff import probes_for, same_maps, violations
from tests.policy.test_incremental import assert_same

NODE = "n1"
HOST = "192.168.0.1"
A, B, C, D = "10.1.0.10", "10.1.0.11", "10.1.0.12", "10.1.0.13"


def small():
    return [
        namespace("x", ns="x"),
        pod("x", "a", A, labels={"app": "a"}),
        pod("x", "b", B, labels={"app": "b"}),
        pod("x", "c", C, labels={"app": "c"}),
        pod("x", "d", D, labels={"app": "a"}),
        netpol("x", "from-b", {"podSelector": {"matchLabels": {"app": "a"}},
                               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}],
                                            "ports": [{"port": 80}]}]}),
        netpol("x", "from-c", {"podSelector": {"matchLabels": {"app": "a"}},
                               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}],
                                            "ports": [{"port": 81}]}]}),
    ]


def compile_small(refused=frozenset(), previous=None, incremental=True):
    return compile_policy(snapshot(small()), NODE, [HOST], "default", previous=previous,
                          refused=refused, incremental=incremental)


def test_a_refused_pair_keeps_the_endpoint_isolated_without_the_policys_rules():
    full = compile_small()
    st = compile_small(refused={("x/from-c", A)})
    assert st.refused == {("x/from-c", A)}
    ep = st.endpoints[A]
    # still isolated, and both policies still decide
    assert ep.ingress.enforced
    assert {st.policy_name(p) for p in ep.ingress.deciding} == {"x/from-b", "x/from-c"}
    assert evaluate(st, B, A, "TCP", 80).allowed
    assert not evaluate(st, C, A, "TCP", 81).allowed
    assert evaluate(full, C, A, "TCP", 81).allowed
    v = evaluate(st, C, A, "TCP", 81)
    assert v.reason == "policy-denied"
    # the node still reaches it; the same policy still admits c at d
    assert evaluate(st, HOST, A, "TCP", 81).allowed
    assert evaluate(st, C, D, "TCP", 81).allowed
    assert st.endpoints[D] == full.endpoints[D]


def test_an_endpoint_whose_every_policy_is_refused_admits_only_the_node():
    st = compile_small(refused={("x/from-b", A), ("x/from-c", A)})
    ep = st.endpoints[A]
    assert ep.ingress.enforced
    owners = {p for v in ep.rules.values() for p in v.policies}
    assert owners == {POLICY_HOST}
    assert not evaluate(st, B, A, "TCP", 80).allowed
    assert evaluate(st, HOST, A, "TCP", 80).allowed


def test_pairs_that_do_not_apply_are_not_in_effect():
    st = compile_small(refused={("x/from-b", B), ("x/nope", A), ("x/from-b", "10.9.9.9")})
    assert st.refused == frozenset()
    assert st.endpoints[A] == compile_small().endpoints[A]


def test_refusing_and_admitting_again_incrementally_equals_full_compiles():
    base = compile_small()
    steps = [{("x/from-c", A)}, {("x/from-c", A), ("x/from-b", D)}, {("x/from-b", D)}, set()]
    state = base
    for refused in steps:
        inc = compile_small(refused, previous=state)
        full = compile_small(refused, previous=state, incremental=False)
        assert_same(inc, full, f"refused {sorted(refused)}")
        assert inc.refused == full.refused == frozenset(refused)
        state = inc
    assert diff(state, base) == []


def world_pairs(state) -> list[tuple[str, str]]:
    out = set()
    for ip, ep in state.endpoints.items():
        for d in (0, 1):
            for pid in ep.config.of(d).deciding:
                if pid >= 16:
                    out.add((state.policy_name(pid), ip))
    return sorted(out)


@pytest.mark.parametrize("seed", range(6))
def test_a_refusal_never_admits_what_the_full_state_does_not(seed):
    rng = random.Random(3000 + seed)
    world = base_world(rng, spread=True)
    random_policies(rng, world, 6)
    full = compile_policy(snapshot(world.objects()), NODE, NODES[NODE], "default", world.audited)
    pairs = world_pairs(full)
    refused = frozenset(rng.sample(pairs, min(len(pairs), rng.randint(1, 4)))) if pairs else frozenset()
    st = compile_policy(snapshot(world.objects()), NODE, NODES[NODE], "default", world.audited,
                        refused=refused)
    assert st.refused == refused
    local = set(full.endpoints)
    ips = probe_ips(world)
    for s in ips:
        for d in ips:
            if s not in local and d not in local:
                continue
            for proto, port in PROBE_PORTS:
                if evaluate(st, s, d, proto, port).allowed:
                    assert evaluate(full, s, d, proto, port).allowed, (s, d, proto, port)
    # isolation is the same everywhere
    for ip, ep in full.endpoints.items():
        for d in (0, 1):
            assert st.endpoints[ip].config.of(d).isolated == ep.config.of(d).isolated


@pytest.mark.parametrize("seed", range(4))
def test_histories_with_changing_refusals_compile_incrementally_and_diff_without_windows(seed):
    rng = random.Random(4000 + seed)
    world = base_world(rng, spread=True)
    random_policies(rng, world, 5)
    state = compile_policy(snapshot(world.objects()), NODE, NODES[NODE], "default", world.audited)
    serial = [0]
    for step in range(12):
        what = mutate(rng, world, serial) if rng.random() < 0.6 else "refusals only"
        snap = snapshot(world.objects())
        unrefused = compile_policy(snap, NODE, NODES[NODE], "default", world.audited,
                                   previous=state)
        pairs = world_pairs(unrefused)
        refused = frozenset(p for p in pairs if rng.random() < 0.3)
        inc = compile_policy(snap, NODE, NODES[NODE], "default", world.audited, previous=state,
                             refused=refused)
        full = compile_policy(snap, NODE, NODES[NODE], "default", world.audited, previous=state,
                              refused=refused, incremental=False)
        assert_same(inc, full, f"step {step}: {what}")
        assert inc.refused == full.refused
        ops = diff(state, inc)
        bad = violations(state, inc, ops, probes_for(world, state, inc))
        assert not bad, f"step {step}: {what}: {bad[:3]}"
        assert same_maps(apply_ops(state.image(), ops), inc.image())
        state = inc
