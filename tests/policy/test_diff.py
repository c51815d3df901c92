"""diff: the map updates between two states, in an order that never lets a
packet through that neither state allows, nor drops one both allow.

The property is checked the hard way: the operations are applied one at a
time to the old maps, and after every single one the whole probe matrix is
evaluated with the datapath's lookups and compared with the old and the new
verdicts. The changes come from seeded random cluster histories (policies
added, replaced, deleted, audited; pods and namespaces relabelled, added,
deleted; enforcement modes switched).
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterator

import pytest

from agent.k8s.model import FrozenMap
from agent.policy import (
    EndpointDelete, EndpointPut, IpcacheDelete, IpcachePut, MapImage, PolicyState, RuleDelete,
    RulePut, apply_ops, compile_policy, diff, evaluate,
)
from tests.policy.gen import NODES, PROBE_PORTS, World, base_world, mutate, probe_ips, random_policies
from tests.policy.kube import netpol, snapshot
from tests.policy.test_semantics import HOST1, XA, XB, YA, cluster

NODE = "n1"


def history(seed: int, steps: int) -> Iterator[tuple[PolicyState, PolicyState, World, str]]:
    rng = random.Random(seed)
    world = base_world(rng, spread=True)
    random_policies(rng, world, 3)
    old = compile_policy(snapshot(world.objects()), NODE, NODES[NODE], "default", world.audited)
    serial = [0]
    for _ in range(steps):
        what = mutate(rng, world, serial)
        mode = "default"
        if rng.random() < 0.15:
            mode = rng.choice(["always", "never"])
            what += f", mode {mode}"
        new = compile_policy(snapshot(world.objects()), NODE, NODES[NODE], mode, world.audited,
                             previous=old)
        yield old, new, world, what
        old = new


def probes_for(world: World, old: PolicyState, new: PolicyState) -> list[tuple]:
    # Flows with neither end on this node are not checked here at all.
    local = set(old.endpoints) | set(new.endpoints)
    ips = probe_ips(world)
    return [(s, d, proto, port) for s in ips for d in ips if s in local or d in local
            for proto, port in PROBE_PORTS]


def violations(old: PolicyState, new: PolicyState, ops: list, probes: list) -> list[str]:
    before = {p: evaluate(old, *p).allowed for p in probes}
    after = {p: evaluate(new, *p).allowed for p in probes}
    # A write to one endpoint's config or rules can only change the checks
    # made at that endpoint, i.e. flows from or to it; an ipcache write can
    # change anything. Re-evaluating just those keeps this test fast while
    # still covering every probe after every write.
    touching: dict[str, list] = {}
    for p in probes:
        touching.setdefault(p[0], []).append(p)
        if p[1] != p[0]:
            touching.setdefault(p[1], []).append(p)
    img = old.image()
    out = []
    for i, op in enumerate(ops):
        op.apply(img)
        ep = getattr(op, "endpoint", None)
        for p in (probes if ep is None else touching.get(ep, ())):
            allowed = evaluate(img, *p).allowed
            if allowed and not (before[p] or after[p]):
                out.append(f"op {i} {op}: {p} allowed, neither state allows it")
            elif not allowed and before[p] and after[p]:
                out.append(f"op {i} {op}: {p} denied, both states allow it")
    return out


def same_maps(a: MapImage, b: MapImage) -> bool:
    return a.ipcache == b.ipcache and a.endpoints == b.endpoints and a.rules == b.rules


@pytest.mark.parametrize("seed", range(8))
def test_every_single_operation_stays_between_old_and_new(seed):
    for old, new, world, what in history(seed, steps=6):
        ops = diff(old, new)
        bad = violations(old, new, ops, probes_for(world, old, new))
        assert not bad, f"{what}: {bad[:3]}"
        assert same_maps(apply_ops(old.image(), ops), new.image()), what


@pytest.mark.parametrize("seed", range(4))
def test_each_rule_write_says_what_the_map_held_before_it(seed):
    """RulePut.was, which the map writer trusts to skip writes: the value
    the key has when the write comes (None: absent), whether the diff starts
    from a compiled state or from maps read back."""
    for old, new, world, what in history(seed, steps=6):
        for start in (old, old.image()):
            img = old.image()          # what the maps hold
            for op in diff(start, new):
                if isinstance(op, RulePut):
                    assert op.was == img.rules.get((op.endpoint, op.key)), f"{what}: {op}"
                op.apply(img)


def careless(old: PolicyState, new: PolicyState) -> list:
    """The obvious order (configs, addresses, then rules), with no intermediate state."""
    o, n = old.image(), new.image()
    ops: list = [EndpointPut(ip, c) for ip, c in n.endpoints.items() if o.endpoints.get(ip) != c]
    ops += [EndpointDelete(ip) for ip in o.endpoints if ip not in n.endpoints]
    ops += [IpcachePut(p, i) for p, i in n.ipcache.items() if o.ipcache.get(p) != i]
    ops += [IpcacheDelete(p) for p in o.ipcache if p not in n.ipcache]
    ops += [RuleDelete(ip, k) for (ip, k) in o.rules if (ip, k) not in n.rules]
    ops += [RulePut(ip, k, v) for (ip, k), v in n.rules.items() if o.rules.get((ip, k)) != v]
    return ops


def test_the_check_catches_a_careless_order():
    """The property test above has teeth: the same histories, applied in the
    obvious order, do open windows."""
    found = 0
    for seed in range(2):
        for old, new, world, _ in history(seed, steps=2):
            ops = careless(old, new)
            assert same_maps(apply_ops(old.image(), ops), new.image())
            found += len(violations(old, new, ops, probes_for(world, old, new)))
    assert found > 0


def compile_with(policies, previous=None, extra=(), mode="default"):
    objs = cluster() + list(extra) + [netpol(ns, n, spec) for ns, n, spec in policies]
    return compile_policy(snapshot(objs), NODE, [HOST1], mode, previous=previous)


FROM_B = ("x", "from-b", {"podSelector": {"matchLabels": {"app": "a"}},
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]})


def test_an_unchanged_state_needs_no_operation():
    old = compile_with([FROM_B])
    assert diff(old, old) == []
    assert diff(old, compile_with([FROM_B], previous=old)) == []


def test_from_empty_maps_and_from_maps_read_back():
    old = compile_with([])
    new = compile_with([FROM_B], previous=old)
    assert same_maps(apply_ops(MapImage(), diff(None, new)), new.image())
    assert diff(old.image(), new) == diff(old, new)


def test_rules_are_in_place_before_default_deny_is_switched_on():
    old = compile_with([])
    new = compile_with([FROM_B], previous=old)
    ops = diff(old, new)
    flip = next(i for i, op in enumerate(ops)
                if isinstance(op, EndpointPut) and op.endpoint == XA and op.config.ingress.enforced)
    rules = [i for i, op in enumerate(ops) if isinstance(op, RulePut) and op.endpoint == XA]
    assert rules and max(rules) < flip


def test_default_deny_is_switched_off_before_rules_are_deleted():
    old = compile_with([FROM_B])
    new = compile_with([], previous=old)
    ops = diff(old, new)
    unflip = next(i for i, op in enumerate(ops)
                  if isinstance(op, EndpointPut) and op.endpoint == XA and not op.config.ingress.enforced)
    deletes = [i for i, op in enumerate(ops) if isinstance(op, RuleDelete) and op.endpoint == XA]
    assert deletes and min(deletes) > unflip


@pytest.mark.parametrize("direction", ["loses access", "gains access"])
def test_a_relabelled_peer_passes_through_an_identity_no_wider_than_either(direction):
    base = cluster()
    as_b = base + [netpol(*FROM_B)]
    as_c = [replace(o, labels=FrozenMap({"app": "c"})) if getattr(o, "ips", ()) == (XB,) else o
            for o in as_b]
    first, second = (as_b, as_c) if direction == "loses access" else (as_c, as_b)
    old = compile_policy(snapshot(first), NODE, [HOST1], "default")
    new = compile_policy(snapshot(second), NODE, [HOST1], "default", previous=old)
    ops = diff(old, new)
    steps = [op.identity for op in ops if isinstance(op, IpcachePut) and op.prefix == f"{XB}/32"]
    assert len(steps) == 2 and steps[-1] == new.ipcache[f"{XB}/32"]
    transitional = steps[0]
    assert transitional not in old.identity_info and transitional not in new.identity_info
    img = old.image()
    for op in ops:
        op.apply(img)
        if isinstance(op, IpcachePut) and op.identity == transitional:
            # While x/b is transitional it gets only what both states give it:
            # x/a admits it in one state only, y/a in both.
            assert not evaluate(img, XB, XA, "TCP", 8080).allowed
            assert evaluate(img, XB, YA, "TCP", 8080).allowed
    assert evaluate(img, XB, XA, "TCP", 8080).allowed == (direction == "gains access")
    assert all(k.identity != transitional for _, k in img.rules)
