"""Map capacity: refuse a policy state before it overflows a map.

A BPF map that is full fails the update in the middle of a diff, which would
leave the node enforcing a mix of two states. So the reconciler asks first:
the new state, and the peak the diff passes through on the way there (old
and new rules coexist for a moment, plus the transitional identities), must
fit. If not, the old state stays in the maps and the answer names the map,
the numbers and the policy that tipped it over.

Which policy "tipped it over": entries that no policy asked for (pod and node
addresses in the ipcache, the node's allow rules, the transition's extra)
come first; then each policy's entries in policy-id order (ids are kept
stable, so that is roughly age order: the newest policies are the ones
refused). An entry shared by several policies is charged to the lowest id.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

from agent.policy.diff import (
    EndpointDelete, EndpointPut, IpcacheDelete, IpcachePut, Op, RulePut, diff,
)
from agent.policy.state import POLICY_DYNAMIC_MIN, MapImage, PolicyState

MAP_IPCACHE = "ipcache"
MAP_ENDPOINTS = "endpoints"
MAP_RULES = "rules"


@dataclass(frozen=True, slots=True)
class Capacities:
    """max_entries of each policy map."""

    ipcache: int
    endpoints: int
    rules: int


@dataclass(frozen=True, slots=True)
class Overflow:
    map: str                 # ipcache, endpoints or rules
    needed: int              # entries at the peak of the transition
    capacity: int
    policy: Optional[str]    # "namespace/name" that crosses the limit; None if none does
    reason: str


def usage(state: PolicyState) -> dict[str, int]:
    return {MAP_IPCACHE: len(state.ipcache), MAP_ENDPOINTS: len(state.endpoints),
            MAP_RULES: state.rule_count()}


def peak_usage(old: Union[PolicyState, MapImage, None], ops: list[Op]) -> dict[str, int]:
    """The largest size each map reaches while `ops` are applied to `old`."""
    if old is None:
        old = MapImage()
    if isinstance(old, PolicyState):
        # Asked of the state itself: building its image would cost more than
        # the change being checked.
        eps = old.endpoints

        def has_rule(k: tuple) -> bool:
            ep = eps.get(k[0])
            return ep is not None and k[1] in ep.rules

        size = {MAP_IPCACHE: len(old.ipcache), MAP_ENDPOINTS: len(eps),
                MAP_RULES: old.rule_count()}
        initially = {MAP_IPCACHE: old.ipcache.__contains__, MAP_ENDPOINTS: eps.__contains__,
                     MAP_RULES: has_rule}
    else:
        img = old
        size = {MAP_IPCACHE: len(img.ipcache), MAP_ENDPOINTS: len(img.endpoints),
                MAP_RULES: len(img.rules)}
        initially = {MAP_IPCACHE: img.ipcache.__contains__, MAP_ENDPOINTS: img.endpoints.__contains__,
                     MAP_RULES: img.rules.__contains__}
    present: dict[str, dict] = {MAP_IPCACHE: {}, MAP_ENDPOINTS: {}, MAP_RULES: {}}
    peak = dict(size)
    for op in ops:
        if isinstance(op, (IpcachePut, IpcacheDelete)):
            m, key = MAP_IPCACHE, op.prefix
        elif isinstance(op, (EndpointPut, EndpointDelete)):
            m, key = MAP_ENDPOINTS, op.endpoint
        else:
            m, key = MAP_RULES, (op.endpoint, op.key)
        was = present[m].get(key)
        if was is None:
            was = initially[m](key)
        now = isinstance(op, (IpcachePut, EndpointPut, RulePut))
        present[m][key] = now
        size[m] += int(now) - int(was)
        peak[m] = max(peak[m], size[m])
    return peak


def check_capacity(new: PolicyState, capacities: Capacities,
                   old: Union[PolicyState, MapImage, None] = None,
                   ops: Optional[list[Op]] = None) -> list[Overflow]:
    """Every map `new` (or the way to it from `old`) would overflow; empty if it fits.

    Pass the `ops` of diff(old, new) if already computed.
    """
    steady = usage(new)
    if old is not None:
        peak = peak_usage(old, ops if ops is not None else diff(old, new))
    else:
        peak = steady
    out = []
    caps = {MAP_IPCACHE: capacities.ipcache, MAP_ENDPOINTS: capacities.endpoints,
            MAP_RULES: capacities.rules}
    for m in (MAP_IPCACHE, MAP_ENDPOINTS, MAP_RULES):
        needed = max(peak[m], steady[m])
        if needed <= caps[m]:
            continue
        out.append(_blame(new, m, needed, needed - steady[m], caps[m]))
    return out


def _blame(state: PolicyState, m: str, needed: int, transient: int, cap: int) -> Overflow:
    per_policy: Counter[int] = Counter()
    if m == MAP_RULES:
        for ep in state.endpoints.values():
            for v in ep.rules.values():
                owners = [p for p in v.policies if p >= POLICY_DYNAMIC_MIN]
                per_policy[min(owners) if owners else 0] += 1
        what = "rules"
    elif m == MAP_IPCACHE:
        for prefix in state.ipcache:
            owners = [p for p in state.ipcache_policies.get(prefix, ()) if p >= POLICY_DYNAMIC_MIN]
            per_policy[min(owners) if owners else 0] += 1
        what = "ipcache entries"
    else:
        return Overflow(m, needed, cap, None,
                        f"{needed} pods on this node need endpoint entries "
                        f"(capacity {cap}); no policy can be refused to make room")
    running = per_policy.pop(0, 0) + transient
    base = running
    if running > cap:
        return Overflow(m, needed, cap, None,
                        f"{what}: {needed} needed (capacity {cap}); {base} of them are not "
                        f"owned by any policy (pod and node addresses, node allows, transition)")
    for pid in sorted(per_policy):
        running += per_policy[pid]
        if running > cap:
            name = state.policy_name(pid)
            return Overflow(m, needed, cap, name,
                            f"{what}: {needed} needed (capacity {cap}); policy {name} adds "
                            f"{per_policy[pid]} and brings the total to {running}")
    return Overflow(m, needed, cap, None, f"{what}: {needed} needed (capacity {cap})")
