"""Map capacity: never overflow a map, and never fail open for lack of room.

A BPF map that is full fails the update in the middle of a diff, which would
leave the node enforcing a mix of two states. So the reconciler asks first
(`check_capacity`): the new state, and the peak the diff passes through on
the way there (old and new rules coexist for a moment, plus the
transitional identities), must fit.

When it does not, `fit` refuses only what does not fit, and fails closed:
the unit refused is a (policy, endpoint) pair, whose rules are then left
out while the policy keeps isolating the endpoint (compile_policy's
`refused`), so a refusal only ever takes allows away. Pairs are refused in
this order until the state fits:
  1. policies changed by this change (added or edited objects), whole,
     newest (highest id) first: the change that does not fit is the one
     refused, by name;
  2. pairs new in this change (a policy newly selecting an endpoint: a pod
     added or relabelled into it), newest policy first;
  3. the pairs already in the maps, newest policy first.
The number refused is the smallest prefix of that order that fits (an
estimate from rule ownership, then a bisection over real compiles), so a
later change that frees room lets refused pairs in again.

When even refusing every pair does not fit (entries no policy owns beyond a
map's capacity: pod addresses, the node's allows, or the transitional
identities the no-window diff needs while addresses change identity), the
new state is not written, but it is still never left open: `isolate_only`
switches default deny on wherever the new state has it and the maps do not
(writing no rule: such a pod admits only what rules already exist for it),
which needs no room but in the endpoints map. More pods than the endpoints
map holds cannot be isolated at all: nothing is written, the old state
stays, and the refusal says why.

`_blame` names, for messages, the policy whose entries cross the limit:
entries that no policy asked for (pod and node addresses in the ipcache,
the node's allow rules, the transition's extra) come first; then each
policy's entries in policy-id order. An entry shared by several policies is
charged to the lowest id.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Optional, Union

from agent.policy.diff import (
    EndpointDelete, EndpointPut, IpcacheDelete, IpcachePut, Op, RulePut, diff,
)
from agent.policy import ip4
from agent.policy.state import (
    POLICY_DYNAMIC_MIN, Direction, DirectionPolicy, EndpointConfig, MapImage, PolicyState,
)

MAP_IPCACHE = "ipcache"
MAP_IPCACHE6 = "ipcache6"      # IPv6 prefixes: a map of their own, as large as the IPv4 one
MAP_ENDPOINTS = "endpoints"
MAP_RULES = "rules"
MAPS = (MAP_IPCACHE, MAP_IPCACHE6, MAP_ENDPOINTS, MAP_RULES)


def _ipcache_map(prefix: str) -> str:
    return MAP_IPCACHE6 if ":" in prefix else MAP_IPCACHE


def _v6_count(prefixes) -> int:
    return sum(1 for p in prefixes if ":" in p)


@dataclass(frozen=True, slots=True)
class Capacities:
    """max_entries of each policy map."""

    ipcache: int
    endpoints: int
    rules: int


@dataclass(frozen=True, slots=True)
class Overflow:
    map: str                 # ipcache, ipcache6, endpoints or rules
    needed: int              # entries at the peak of the transition
    capacity: int
    policy: Optional[str]    # "namespace/name" that crosses the limit; None if none does
    reason: str


def _state_v6(state: PolicyState) -> int:
    n = state._cache.get("ipcache6_n")
    if n is None:
        n = state._cache["ipcache6_n"] = _v6_count(state.ipcache)
    return n


def usage(state: PolicyState) -> dict[str, int]:
    v6 = _state_v6(state)
    return {MAP_IPCACHE: len(state.ipcache) - v6, MAP_IPCACHE6: v6,
            MAP_ENDPOINTS: len(state.endpoints), MAP_RULES: state.rule_count()}


def _image_usage(img: MapImage) -> dict[str, int]:
    v6 = _v6_count(img.ipcache)
    return {MAP_IPCACHE: len(img.ipcache) - v6, MAP_IPCACHE6: v6,
            MAP_ENDPOINTS: len(img.endpoints), MAP_RULES: len(img.rules)}


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

        size = usage(old)
        initially = {MAP_IPCACHE: old.ipcache.__contains__, MAP_ENDPOINTS: eps.__contains__,
                     MAP_RULES: has_rule}
    else:
        img = old
        size = _image_usage(img)
        initially = {MAP_IPCACHE: img.ipcache.__contains__, MAP_ENDPOINTS: img.endpoints.__contains__,
                     MAP_RULES: img.rules.__contains__}
    initially[MAP_IPCACHE6] = initially[MAP_IPCACHE]
    present: dict[str, dict] = {m: {} for m in MAPS}
    peak = dict(size)
    for op in ops:
        if isinstance(op, (IpcachePut, IpcacheDelete)):
            m, key = _ipcache_map(op.prefix), op.prefix
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
    caps = {MAP_IPCACHE: capacities.ipcache, MAP_IPCACHE6: capacities.ipcache,
            MAP_ENDPOINTS: capacities.endpoints, MAP_RULES: capacities.rules}
    if old is not None:
        if ops is None:
            ops = diff(old, new)
        # No map can grow by more writes than there are: when even that
        # fits everywhere, the step-by-step peak need not be worked out.
        start = usage(old) if isinstance(old, PolicyState) else _image_usage(old)
        if all(max(start[m] + len(ops), steady[m]) <= caps[m] for m in caps):
            return []
        peak = peak_usage(old, ops)
    else:
        peak = steady
    out = []
    for m in MAPS:
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
    elif m in (MAP_IPCACHE, MAP_IPCACHE6):
        for prefix in state.ipcache:
            if _ipcache_map(prefix) != m:
                continue
            owners = [p for p in state.ipcache_policies.get(prefix, ()) if p >= POLICY_DYNAMIC_MIN]
            per_policy[min(owners) if owners else 0] += 1
        what = "ipcache entries" if m == MAP_IPCACHE else "IPv6 ipcache entries"
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


# ------------------------------------------------------------ failing closed

Pair = tuple[str, str]     # (policy "namespace/name", endpoint IPv4)


@dataclass(frozen=True)
class Fit:
    """What to write when a state does not fit (see the module docstring)."""

    state: Optional[PolicyState]   # None: nothing that fits was found (ops: isolate_only's)
    ops: list[Op]
    overflows: list[Overflow]      # what the state with nothing refused overflows ([] if it fit)
    compiles: int = 1
    refused: frozenset[Pair] = field(default=frozenset())

    def refused_policies(self) -> dict[str, list[str]]:
        """policy -> the endpoints (IPv4) it admits nothing at, sorted."""
        out: dict[str, list[str]] = defaultdict(list)
        for name, ip in self.refused:
            out[name].append(ip)
        return {n: sorted(v, key=ip4.to_int) for n, v in sorted(out.items())}


def pairs_of(state: PolicyState) -> set[Pair]:
    """The (policy, endpoint) pairs whose rules the state compiles or refuses:
    every policy isolating an endpoint (enforced or audited) in a direction."""
    out: set[Pair] = set()
    for ip, ep in state.endpoints.items():
        for dp in (ep.config.ingress, ep.config.egress):
            for pid in dp.deciding:
                if pid >= POLICY_DYNAMIC_MIN:
                    out.add((state.policy_name(pid), ip))
    return out


def refusal_order(state: PolicyState, changed: Collection[str] = (),
                  applied: Collection[Pair] = ()) -> list[frozenset[Pair]]:
    """The units `fit` refuses, first to last: each changed policy whole
    (newest first), then single pairs, new ones before those already
    applied, newest policy first, then by address."""
    ids = state.policy_ids
    by_policy: dict[str, list[str]] = defaultdict(list)
    for name, ip in pairs_of(state):
        by_policy[name].append(ip)
    units = [frozenset((name, ip) for ip in by_policy[name])
             for name in sorted((n for n in by_policy if n in changed), key=lambda n: -ids[n])]
    applied = frozenset(applied)
    rest = [(n, ip) for n, ips in by_policy.items() if n not in changed for ip in ips]
    rest.sort(key=lambda p: (p in applied, -ids[p[0]], ip4.to_int(p[1])))
    return units + [frozenset([p]) for p in rest]


def _estimate_prefix(state: PolicyState, units: list[frozenset[Pair]],
                     excess: dict[str, int]) -> int:
    """The shortest prefix of `units` whose refusal removes, by ownership,
    at least `excess` entries of each map: an entry goes when every policy
    owning it is refused at its endpoint (rules), or every policy needing
    an ipBlock prefix is refused everywhere (ipcache). Approximate (a key a
    refused policy shared with another may still be merged away), which
    the real compiles of `fit` settle."""
    ids = state.policy_ids
    owners_left: list[int] = []
    entries: dict[tuple[int, str], list[int]] = defaultdict(list)
    if MAP_RULES in excess:
        for ip, ep in state.endpoints.items():
            for v in ep.rules.values():
                owners = {p for p in v.policies if p >= POLICY_DYNAMIC_MIN}
                if owners:
                    for p in owners:
                        entries[(p, ip)].append(len(owners_left))
                    owners_left.append(len(owners))
    pairs_left = Counter(name for unit in units for name, _ in unit)
    prefix_owners: dict[str, int] = {}
    prefixes: dict[int, list[str]] = defaultdict(list)
    if MAP_IPCACHE in excess or MAP_IPCACHE6 in excess:
        for pfx, pids in state.ipcache_policies.items():
            owners = {p for p in pids if p >= POLICY_DYNAMIC_MIN}
            if owners:
                prefix_owners[pfx] = len(owners)
                for p in owners:
                    prefixes[p].append(pfx)
    gone = {MAP_RULES: 0, MAP_IPCACHE: 0, MAP_IPCACHE6: 0}
    for k, unit in enumerate(units, 1):
        for name, ip in unit:
            pid = ids[name]
            for i in entries.get((pid, ip), ()):
                owners_left[i] -= 1
                gone[MAP_RULES] += owners_left[i] == 0
            pairs_left[name] -= 1
            if pairs_left[name] == 0:
                for pfx in prefixes.get(pid, ()):
                    prefix_owners[pfx] -= 1
                    gone[_ipcache_map(pfx)] += prefix_owners[pfx] == 0
        if all(gone.get(m, 0) >= n for m, n in excess.items()):
            return k
    return len(units)


def fit(compile_with: Callable[[frozenset[Pair]], PolicyState], capacities: Capacities,
        old: Union[PolicyState, MapImage, None] = None, *, changed: Collection[str] = (),
        applied: Union[Collection[Pair], Callable[[], Collection[Pair]]] = ()) -> Fit:
    """The state to write: `compile_with(frozenset())` if it fits, else the
    same compiled with the shortest prefix of `refusal_order` refused that
    fits (the way from `old` included). `changed`: policy names whose objects
    this change added or edited; `applied`: the pairs whose rules the maps
    hold now, or a function returning them (called only when the state does
    not fit)."""
    new = compile_with(frozenset())
    ops = diff(old, new)
    over = check_capacity(new, capacities, old, ops)
    if not over:
        return Fit(new, ops, [])
    if any(o.map == MAP_ENDPOINTS for o in over):
        return Fit(None, [], over, refused=frozenset(pairs_of(new)))
    if callable(applied):
        applied = applied()       # only a state that does not fit needs them
    units = refusal_order(new, changed, applied)
    tried: dict[int, tuple[PolicyState, list[Op]]] = {}
    compiles = [1]

    def fits(k: int) -> bool:
        refused = frozenset().union(*units[:k])
        st = compile_with(refused)
        st_ops = diff(old, st)
        compiles[0] += 1
        if check_capacity(st, capacities, old, st_ops):
            return False
        tried[k] = (st, st_ops)
        return True

    lo, hi = 0, len(units)
    guess = _estimate_prefix(new, units, {o.map: o.needed - o.capacity for o in over})
    if 0 < guess < hi:
        if fits(guess):
            hi = guess
        else:
            lo = guess
    if hi not in tried and not fits(hi):
        return Fit(None, isolate_only(old, new), over, compiles[0], frozenset(pairs_of(new)))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    st, st_ops = tried[hi]
    return Fit(st, st_ops, over, compiles[0], st.refused)


def isolate_only(old: Union[PolicyState, MapImage, None], new: PolicyState) -> list[Op]:
    """Endpoint writes that switch default deny on wherever `new` has it and
    `old` (the maps) has not, keeping every other field of the maps' value:
    a pod `new` isolates is isolated even when none of its rules fit. Never
    a rule or ipcache write (they need room), never default deny off."""
    if old is None:
        old = MapImage()
    configs = ({ip: ep.config for ip, ep in old.endpoints.items()}
               if isinstance(old, PolicyState) else old.endpoints)
    ops: list[Op] = []
    for ip in sorted(new.endpoints, key=ip4.to_int):
        want = new.endpoints[ip].config
        have = configs.get(ip, EndpointConfig())
        dirs = []
        for d in (Direction.INGRESS, Direction.EGRESS):
            h, w = have.of(d), want.of(d)
            dirs.append(DirectionPolicy(True, False, w.deciding)
                        if w.enforced and not h.enforced else h)
        cfg = EndpointConfig(*dirs)
        if cfg != have:
            ops.append(EndpointPut(ip, cfg))
    return ops
