"""Compiling with `previous=` redoes only what a change reaches; the result
must be exactly what a full compile gives (same ids, same maps), after any
history of changes, and its diffs must keep the no-window guarantee.

Histories are seeded and random (tests/policy/gen.py: policies added,
replaced, deleted, audited; pods and namespaces relabelled, added, deleted;
modes switched), plus the awkward pod cases (an address claimed by two pods,
pods finishing, moving node, switching to host network) and the larger
workload of tests/policy/scale.py.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from agent.k8s.model import FrozenMap
from agent.policy import PolicyState, apply_ops, compile_policy, diff
from tests.policy.gen import NODES, World, base_world, mutate, random_policies
from tests.policy.kube import namespace, pod, snapshot
from tests.policy.test_diff import probes_for, same_maps, violations

NODE = "n1"


def assert_same(inc: PolicyState, full: PolicyState, what: str) -> None:
    assert inc.mode == full.mode and inc.node_ips == full.node_ips, what
    assert dict(inc.policies) == dict(full.policies), what
    assert inc.audited == full.audited, what
    assert dict(inc.identities) == dict(full.identities), what
    assert dict(inc.identity_info) == dict(full.identity_info), what
    assert dict(inc.ipcache) == dict(full.ipcache), what
    assert dict(inc.ipcache_policies) == dict(full.ipcache_policies), what
    assert set(inc.endpoints) == set(full.endpoints), what
    for ip, ep in full.endpoints.items():
        got = inc.endpoints[ip]
        assert got == ep, f"{what}: endpoint {ip}"
        # The grouped view the diff reads says the same as the flat rules.
        regrouped: dict = {}
        for k, v in got.rules.items():
            regrouped.setdefault((k.direction, k.identity), {})[k.port_key] = v
        assert {k: dict(b) for k, b in got.peer_buckets().items()} == regrouped, f"{what}: {ip}"
    assert inc.enforced_identities() == full.enforced_identities(), what
    assert inc.enforces_anything() == full.enforces_anything(), what


def assert_derived_honestly(new: PolicyState, old: PolicyState, what: str) -> None:
    """An endpoint patched from the previous state names the groups it
    rewrote; every other group must be the very object the previous state
    had (what the diff relies on to skip them), and a group that went away
    counts as rewritten."""
    for ip, ep in new.endpoints.items():
        if ep.derived is None or ep is old.endpoints.get(ip):
            continue       # untouched: the previous state's own object
        base, rewritten = ep.derived[0](), ep.derived[1]
        assert base is old.endpoints.get(ip), f"{what}: {ip} derived from another state"
        before, after = base.peer_buckets(), ep.peer_buckets()
        for key, b in after.items():
            if key not in rewritten:
                assert before.get(key) is b, f"{what}: {ip} {key} changed unannounced"
        for key in before.keys() - after.keys():
            assert key in rewritten, f"{what}: {ip} {key} removed unannounced"


def compile_world(world: World, mode: str, previous=None, incremental=True) -> PolicyState:
    return compile_policy(snapshot(world.objects()), NODE, NODES[NODE], mode, world.audited,
                          previous=previous, incremental=incremental)


def odd_change(rng: random.Random, world: World, serial: list[int]) -> str:
    """Pod changes the generic histories rarely make."""
    keys = sorted(world.pods)
    k = rng.choice(keys)
    p = world.pods[k]
    r = rng.random()
    serial[0] += 1
    if r < 0.25 and p.ips:
        # A stale or starting pod claiming an address another pod has.
        name = f"twin{serial[0]}"
        world.pods[(p.namespace, name)] = replace(
            p, name=name, phase=rng.choice(["Pending", "Running", "Unknown"]),
            deleting=rng.random() < 0.5, labels=FrozenMap({"pod": rng.choice("abc"), "twin": "1"}),
            node_name=rng.choice(["n1", "n2"]))
        return f"twin of {k}"
    if r < 0.45:
        world.pods[k] = replace(p, phase=rng.choice(["Succeeded", "Failed", "Running"]))
        return f"phase of {k}"
    if r < 0.6:
        world.pods[k] = replace(p, node_name="n2" if p.node_name == "n1" else "n1")
        return f"move {k}"
    if r < 0.7:
        world.pods[k] = replace(p, host_network=not p.host_network)
        return f"host network {k}"
    if r < 0.8:
        world.pods[k] = replace(p, ips=(NODES["n1"][0],))
        return f"{k} takes the node address"
    if r < 0.9:
        world.pods[k] = replace(p, ports=tuple(replace(cp, container_port=cp.container_port + 1)
                                               for cp in p.ports))
        return f"ports of {k}"
    n = f"extra{serial[0]}"
    world.namespaces[n] = namespace(n, team=rng.choice(["red", "blue"]))
    return f"add namespace {n}"


@pytest.mark.parametrize("seed", range(12))
def test_incremental_compiles_equal_full_ones_over_random_histories(seed):
    rng = random.Random(1000 + seed)
    world = base_world(rng, spread=True)
    random_policies(rng, world, rng.randint(2, 8))
    mode = "default"
    state = compile_world(world, mode)
    serial = [0]
    for step in range(40):
        whats = []
        for _ in range(rng.choice([1, 1, 1, 2, 4])):
            whats.append(odd_change(rng, world, serial) if rng.random() < 0.25
                         else mutate(rng, world, serial))
        if rng.random() < 0.05:
            mode = rng.choice(["default", "always", "never"])
            whats.append(f"mode {mode}")
        what = f"step {step}: " + "; ".join(whats)
        inc = compile_world(world, mode, previous=state)
        full = compile_world(world, mode, previous=state, incremental=False)
        assert_same(inc, full, what)
        assert_derived_honestly(inc, state, what)
        # the diff reads what the compile says it rewrote; knowing nothing
        # (a full compile) it compares every group, and must write the same
        assert same_maps(apply_ops(state.image(), diff(state, inc)), inc.image()), what
        assert sorted(map(repr, diff(state, inc))) == sorted(map(repr, diff(state, full))), what
        state = inc


@pytest.mark.parametrize("seed", range(4))
def test_diffs_between_incremental_states_never_open_a_window(seed):
    rng = random.Random(2000 + seed)
    world = base_world(rng, spread=True)
    random_policies(rng, world, 4)
    state = compile_world(world, "default")
    serial = [0]
    for _ in range(10):
        what = odd_change(rng, world, serial) if rng.random() < 0.3 else mutate(rng, world, serial)
        new = compile_world(world, "default", previous=state)
        ops = diff(state, new)
        bad = violations(state, new, ops, probes_for(world, state, new))
        assert not bad, f"{what}: {bad[:3]}"
        assert same_maps(apply_ops(state.image(), ops), new.image()), what
        state = new


def test_a_previous_state_stays_a_valid_base_after_its_successor():
    """A refused state is dropped and the next change compiled from the one
    still in the maps: compiling from a state must not disturb it."""
    rng = random.Random(7)
    world = base_world(rng, spread=True)
    random_policies(rng, world, 5)
    base = compile_world(world, "default")
    serial = [0]
    for _ in range(8):
        first = world.copy()
        mutate(rng, first, serial)
        compile_world(first, "default", previous=base)          # "refused"
        second = first.copy()
        mutate(rng, second, serial)
        again = compile_world(second, "default", previous=base)
        assert_same(again, compile_world(second, "default", previous=base, incremental=False),
                    "second change from the same base")
        base_full = compile_world(world, "default", previous=base, incremental=False)
        assert diff(base, base_full) == [], "the base was modified"


def test_an_unrelated_change_leaves_endpoints_untouched():
    """The incremental path is really taken: endpoints a change does not reach
    are the very same objects, and so are their rules."""
    rng = random.Random(3)
    world = base_world(rng, spread=False)
    random_policies(rng, world, 6)
    old = compile_world(world, "default")
    k = ("y", "b")
    world.pods[k] = replace(world.pods[k], annotations=FrozenMap({"note": "changed"}))
    new = compile_world(world, "default", previous=old)
    ip = world.pods[k].ips[0]
    others = [a for a in old.endpoints if a != ip]
    assert others and all(new.endpoints[a] is old.endpoints[a] for a in others)
    assert diff(old, new) == []


def test_the_larger_workload_compiles_incrementally_to_the_full_result():
    from tests.policy.scale import NODE as SNODE, NODE_IPS, Scale
    sc = Scale(seed=5, pods=160, local=40, policies=120, namespaces=8)
    state = compile_policy(sc.store.snapshot(), SNODE, NODE_IPS, "default")
    for i in range(42):
        kind = Scale.CHANGES[i % len(Scale.CHANGES)]
        sc.change(kind)
        snap = sc.store.snapshot()
        inc = compile_policy(snap, SNODE, NODE_IPS, "default", previous=state)
        full = compile_policy(snap, SNODE, NODE_IPS, "default", previous=state, incremental=False)
        assert_same(inc, full, f"change {i}: {kind}")
        state = inc
