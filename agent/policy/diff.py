"""Ordered map updates from one compiled policy state to the next.

The promise: while the operations are applied one by one, no packet is ever
allowed unless the old or the new state allows it, nor denied unless the old
or the new state denies it. A flow between two pods of this node is checked
twice (source egress, destination ingress), so it is not enough for each
direction on its own to stay between old and new: old could deny a flow at
egress and new at ingress, and a half-applied mix would let it through.

The operations therefore go through one intermediate state M that allows, in
every direction, exactly what both the old and the new state allow:

  phase 1, tighten: every step keeps  M <= current <= old   (per direction)
  phase 2, relax:   every step keeps  M <= current <= new

so a two-check flow sees (M..old) x (M..old) or (M..new) x (M..new), which
is between old AND new and old OR new. In steps:

  1. rules of directions about to be enforced: drop leftovers (audit rules),
     harmless while not enforced; then write M's rules everywhere. M's rules
     admit a subset of the old ones, so nothing widens.
  2. ipcache to M: an address whose identity changes (old o, new n) first
     moves to a transitional identity T(o, n) whose rules admit only what
     both o (old rules) and n (new rules) admit: never more permissive than
     where it comes from. (Skipped when o and n get exactly the same rules
     in every enforced direction, or when old enforces nothing.) New
     prefixes are written longest first, so each write only re-labels the
     addresses that prefix is meant for.
  3. endpoint configs to M: default deny switched on where either state
     has it (the rules of step 1 are already in place).
  4. delete the old rules M does not have (M's are present, so nothing that
     M allows is lost).
  5. write the new rules (each admits what new admits for the identities
     the addresses now have).
  6. endpoint configs to new: default deny switched off where new has none,
     before any address leaves its transitional identity.
  7. ipcache to new: addresses move from T(o, n) to n (n's new rules cover
     T's); prefixes only old had are first pointed at what new resolves them
     to, then deleted, which changes no lookup.
  8. delete whatever remains that new does not have (transitional
     identities, M's extra rules: all covered by new's), and write the rules
     of directions that new does not enforce (audit rules).

Updates that change only attribution (policy ids of a rule, deciding ids,
audit flags) never change a verdict and ride along wherever convenient.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional, Union

from agent.policy import addr, ip4
from agent.policy.ports import PortKey, PortSet, key_ancestors, key_covers
from agent.policy.state import (
    DIRECTIONS,
    ID_ANY, ID_DYNAMIC_MIN, ID_WORLD, Direction, DirectionPolicy, EndpointConfig, MapImage,
    PolicyKey, PolicyState, RuleValue,
)


@dataclass(frozen=True, slots=True)
class IpcachePut:
    prefix: str
    identity: int

    def apply(self, img: MapImage) -> None:
        img.put_ipcache(self.prefix, self.identity)


@dataclass(frozen=True, slots=True)
class IpcacheDelete:
    prefix: str

    def apply(self, img: MapImage) -> None:
        img.delete_ipcache(self.prefix)


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


# RulePut.was when the writer does not know what the map holds for the key.
UNKNOWN = _Unknown()


@dataclass(frozen=True, slots=True)
class RulePut:
    endpoint: str
    key: PolicyKey
    value: RuleValue
    # What the map holds for the key before this write, as the diff knows
    # it from the old side: None when the key is not there. A writer may
    # use it to skip what the map would not notice (the datapath keeps
    # only the lowest policy id and the audit flag) and to skip reading a
    # key that is not there. Not part of the operation's identity.
    was: object = field(default=UNKNOWN, compare=False, repr=False)

    def apply(self, img: MapImage) -> None:
        img.put_rule(self.endpoint, self.key, self.value)


@dataclass(frozen=True, slots=True)
class RuleDelete:
    endpoint: str
    key: PolicyKey

    def apply(self, img: MapImage) -> None:
        img.delete_rule(self.endpoint, self.key)


@dataclass(frozen=True, slots=True)
class EndpointPut:
    endpoint: str
    config: EndpointConfig

    def apply(self, img: MapImage) -> None:
        img.put_endpoint(self.endpoint, self.config)


@dataclass(frozen=True, slots=True)
class EndpointDelete:
    endpoint: str

    def apply(self, img: MapImage) -> None:
        img.delete_endpoint(self.endpoint)


Op = Union[IpcachePut, IpcacheDelete, RulePut, RuleDelete, EndpointPut, EndpointDelete]


def apply_ops(image: MapImage, ops: Iterable[Op]) -> MapImage:
    """Apply operations in order to `image` (modified in place and returned)."""
    for op in ops:
        op.apply(image)
    return image


# ------------------------------------------------------------------ inputs

Bucket = dict[PortKey, RuleValue]


class _View:
    """One side of the diff, whether a compiled state or a raw map image."""

    def __init__(self, s: Union[PolicyState, MapImage, None]):
        if s is None:
            s = MapImage()
        self.state = s if isinstance(s, PolicyState) else None
        self._split: dict[str, tuple[dict[int, Bucket], dict[int, Bucket]]] = {}
        if isinstance(s, PolicyState):
            self.ipcache: Mapping[str, int] = s.ipcache
            self.configs: Mapping[str, EndpointConfig] = {ip: ep.config for ip, ep in s.endpoints.items()}
            self.rules: Mapping[str, Mapping[PolicyKey, RuleValue]] = {
                ip: ep.rules for ip, ep in s.endpoints.items()}
            self.max_identity = max(s.identity_info, default=0)
            self.enforced_ids = s.enforced_identities()
            self.enforces = s.enforces_anything()
        else:
            self.ipcache = s.ipcache
            self.configs = s.endpoints
            grouped: dict[str, dict[PolicyKey, RuleValue]] = defaultdict(dict)
            for (ip, k), v in s.rules.items():
                grouped[ip][k] = v
            self.rules = grouped
            self.max_identity = max([k.identity for _, k in s.rules], default=0)
            self.enforced_ids = frozenset(
                k.identity for ip, k in s.rules
                if ip in s.endpoints and s.endpoints[ip].of(k.direction).enforced)
            self.enforces = any(c.ingress.enforced or c.egress.enforced
                                for c in s.endpoints.values())
        self.max_identity = max([self.max_identity, *self.ipcache.values()])

    def resolve(self, prefixlen: int, network: int) -> int:
        """The identity the ipcache gives a prefix's addresses from entries no
        longer than it (probing the few candidate prefixes, no index needed)."""
        # both families in agent/policy/addr.py's space, each in its own trie
        for plen in range(prefixlen, addr.floor(prefixlen, network) - 1, -1):
            hit = self.ipcache.get(addr.prefix_text(plen, network & addr.mask(plen)))
            if hit is not None:
                return hit
        return ID_WORLD

    def config(self, ip: str) -> EndpointConfig:
        return self.configs.get(ip) or EndpointConfig()

    def grouped(self, ip: str) -> Mapping[tuple[Direction, int], Bucket]:
        """The endpoint's rules by (direction, identity)."""
        if self.state is not None:
            ep = self.state.endpoints.get(ip)
            return ep.peer_buckets() if ep is not None else {}
        out: dict[tuple[Direction, int], Bucket] = {}
        for k, v in self.rules.get(ip, {}).items():
            out.setdefault((k.direction, k.identity), {})[k.port_key] = v
        return out

    def buckets(self, ip: str, d: Direction) -> dict[int, Bucket]:
        split = self._split.get(ip)
        if split is None:
            split = self._split[ip] = ({}, {})
            for (dd, ident), b in self.grouped(ip).items():
                split[dd][ident] = b
        return split[d]

    def changed_peers(self, ip: str, other: "_View") -> Optional[frozenset]:
        """The (direction, identity) groups of this side's endpoint that may
        differ from the other side's, when the compiler derived one from the
        other; None if unknown."""
        if self.state is None or other.state is None:
            return None
        ep, base = self.state.endpoints.get(ip), other.state.endpoints.get(ip)
        if ep is base or (ep is not None and base is not None and ep.rules is base.rules):
            return frozenset()
        if ep is None or base is None or ep.derived is None or ep.derived[0]() is not base:
            return None
        return ep.derived[1]


def _covering(bucket: Bucket, key: PortKey) -> Optional[RuleValue]:
    """The value of the most specific key of `bucket` covering `key`."""
    v = bucket.get(key)
    if v is not None or not bucket:
        return v
    if len(bucket) <= 8:
        # Fewer keys than ancestors to probe: look at each.
        best = None
        for k, v in bucket.items():
            if key_covers(k, key) and (best is None or _specificity(k) > _specificity(best[0])):
                best = (k, v)
        return best[1] if best is not None else None
    for a in key_ancestors(key):
        v = bucket.get(a)
        if v is not None:
            return v
    return None


def _specificity(k: PortKey) -> int:
    return -1 if k[0] == 0 else k[2]


def _synth_value(buckets: dict[int, Bucket], ident: int, key: PortKey) -> RuleValue:
    """Attribution for a rule only the intermediate state has: the policies
    that admit its first packet on the side it is taken from."""
    pids: set[int] = set()
    for b in (buckets.get(ident, {}), buckets.get(ID_ANY, {})):
        v = _covering(b, key)
        if v is not None:
            pids.update(v.policies)
    return RuleValue(tuple(sorted(pids)), False)


# -------------------------------------------------------------------- diff

def diff(old: Union[PolicyState, MapImage, None],
         new: Union[PolicyState, MapImage]) -> list[Op]:
    """The operations that turn the maps of `old` into those of `new` (see the
    module docstring for the order and why it is safe). `old` may also be
    an image read back from the maps, or None for empty maps."""
    O, N = _View(old), _View(new)
    ops: list[Op] = []

    # ---- identities that change under some ipcache key
    o_cache, n_cache = O.ipcache, N.ipcache
    changed = [k for k in set(o_cache) | set(n_cache) if o_cache.get(k) != n_cache.get(k)]
    parsed = {k: addr.parse_prefix(k) for k in changed}
    next_id = max(O.max_identity, N.max_identity, ID_DYNAMIC_MIN - 1) + 1
    trans: dict[tuple[int, int], int] = {}
    mid: dict[str, int] = {}       # the ipcache of M, for changed keys
    final: dict[str, int] = {}     # what new resolves each changed key to
    for k in sorted(changed):
        plen, net = parsed[k]
        o = O.resolve(plen, net)
        n = N.resolve(plen, net)
        final[k] = n
        if o == n or not _needs_transition(O, N, o, n):
            mid[k] = n
            continue
        t = trans.get((o, n))
        if t is None:
            t = trans[(o, n)] = next_id
            next_id += 1
        mid[k] = t
    # Identities some address still has, as itself, in M.
    counts = Counter(o_cache.values())
    for k in changed:
        if k in o_cache:
            counts[o_cache[k]] -= 1
    present = {i for i, c in counts.items() if c > 0} | {ID_WORLD}
    present |= {i for k, i in mid.items() if i not in trans.values()}
    touched_ids = {o for o, _ in trans} | {n for _, n in trans}

    # ---- per endpoint and direction: M's rules
    eps = sorted(set(O.configs) | set(O.rules) | set(N.configs) | set(N.rules), key=ip4.to_int)
    work = []   # (ip, d, dO, dN, RO, RN, EM)
    both_states = O.state is not None and N.state is not None
    # Identities some rule may name that have no address as themselves in M
    # (all moved away: compiled states name no identity without an address).
    special = touched_ids | ({o_cache[k] for k in changed if k in o_cache} - present)
    for ip in eps:
        cO, cN = O.config(ip), N.config(ip)
        rO, rN = O.rules.get(ip, {}), N.rules.get(ip, {})
        gO = O.grouped(ip)
        if cO == cN and (rO is rN or rO == rN) and not (
                touched_ids and any((d, i) in gO for i in touched_ids for d in DIRECTIONS)):
            continue
        gN = N.grouped(ip)
        known = N.changed_peers(ip, O)
        for d in DIRECTIONS:
            dO, dN = cO.of(d), cN.of(d)
            if (both_states and dO.enforced == dN.enforced
                    and ((a0 := gO.get((d, ID_ANY))) is (n0 := gN.get((d, ID_ANY))) or a0 == n0)):
                # Same default deny and the same "any peer" rules: the peers
                # whose rules are equal on both sides, present as themselves
                # and not moving, need no write in any step (their rules in
                # the intermediate state are the old = new ones), so only the
                # others are looked at.
                if known is None:
                    cand = {z for dd, z in gO.keys() | gN.keys() if dd == d}
                else:
                    cand = {z for dd, z in known if dd == d}
                look = {z for z in cand
                        if (a := gO.get((d, z))) is not (b := gN.get((d, z))) and a != b}
                look |= {z for z in special if (d, z) in gO or (d, z) in gN}
                if not look:
                    continue
                look.add(ID_ANY)
                RO = {z: b for z in look if (b := gO.get((d, z))) is not None}
                RN = {z: b for z in look if (b := gN.get((d, z))) is not None}
            else:
                RO, RN = O.buckets(ip, d), N.buckets(ip, d)
            EM = _intermediate(dO.enforced, dN.enforced, RO, RN, present, trans)
            work.append((ip, d, dO, dN, RO, RN, EM))

    cur: dict[tuple[str, Direction], dict[int, Bucket]] = {}
    for ip, d, dO, dN, RO, RN, EM in work:
        cur[(ip, d)] = {i: dict(b) for i, b in RO.items()}

    def put(ip: str, d: Direction, ident: int, k: PortKey, v: RuleValue) -> None:
        b = cur[(ip, d)].setdefault(ident, {})
        was = b.get(k)
        if was != v:
            b[k] = v
            ops.append(RulePut(ip, PolicyKey(d, ident, *k), v, was))

    def delete_unless(ip: str, d: Direction, keep: dict[int, Bucket]) -> None:
        for ident, b in cur[(ip, d)].items():
            kb = keep.get(ident, {})
            for k in [k for k in b if k not in kb]:
                del b[k]
                ops.append(RuleDelete(ip, PolicyKey(d, ident, *k)))

    # Phase 1 -------------------------------------------------------------
    for ip, d, dO, dN, RO, RN, EM in work:                               # 1
        if dN.enforced and not dO.enforced:
            delete_unless(ip, d, EM)
    for ip, d, dO, dN, RO, RN, EM in work:
        if dO.enforced or dN.enforced:
            for ident, b in EM.items():
                for k, v in b.items():
                    put(ip, d, ident, k, v)
    inserts = sorted((k for k in changed if k not in o_cache), key=lambda k: -parsed[k][0])
    for k in inserts:                                                     # 2
        ops.append(IpcachePut(k, mid[k]))
    for k in sorted(changed):
        if k in o_cache and o_cache[k] != mid[k]:
            ops.append(IpcachePut(k, mid[k]))
    m_cfg: dict[str, EndpointConfig] = {}
    for ip in eps:                                                        # 3
        cO, cN = O.config(ip), N.config(ip)
        dirs = []
        for d in DIRECTIONS:
            dO, dN = cO.of(d), cN.of(d)
            if dO.enforced or dN.enforced:
                dirs.append(DirectionPolicy(True, False, dN.deciding if dN.enforced else dO.deciding))
            else:
                dirs.append(dO)
        cM = EndpointConfig(*dirs)
        m_cfg[ip] = cM
        if cM != cO and (ip in O.configs or cM != EndpointConfig()):
            ops.append(EndpointPut(ip, cM))
    for ip, d, dO, dN, RO, RN, EM in work:                               # 4
        if dO.enforced:
            delete_unless(ip, d, EM)

    # Phase 2 -------------------------------------------------------------
    for ip, d, dO, dN, RO, RN, EM in work:                               # 5
        if dN.enforced:
            for ident, b in RN.items():
                for k, v in b.items():
                    put(ip, d, ident, k, v)
    for ip in eps:                                                        # 6
        exists = ip in O.configs or m_cfg[ip] != EndpointConfig()
        if ip in N.configs:
            if not exists or N.configs[ip] != m_cfg[ip]:
                ops.append(EndpointPut(ip, N.configs[ip]))
        elif exists:
            ops.append(EndpointDelete(ip))
    for k in sorted(changed):                                             # 7
        if k in n_cache and mid[k] != n_cache[k]:
            ops.append(IpcachePut(k, n_cache[k]))
    for k in sorted(changed):
        if k not in n_cache and mid[k] != final[k]:
            ops.append(IpcachePut(k, final[k]))
    for k in sorted(changed):
        if k not in n_cache:
            ops.append(IpcacheDelete(k))
    for ip, d, dO, dN, RO, RN, EM in work:                               # 8
        delete_unless(ip, d, RN)
    for ip, d, dO, dN, RO, RN, EM in work:
        if dN.enforced:
            continue         # step 5 wrote all of RN, and nothing since took any away
        for ident, b in RN.items():
            for k, v in b.items():
                put(ip, d, ident, k, v)
    return ops


def _needs_transition(O: _View, N: _View, o: int, n: int) -> bool:
    """Whether addresses moving from o to n need a transitional identity.

    Not if old enforces nothing (the move happens before any default deny is
    switched on), nor if no enforced direction has rules naming o or n: then
    both identities get exactly the "any peer" rules, before and after.
    """
    if not O.enforces:
        return False
    return o in O.enforced_ids or n in O.enforced_ids or n in N.enforced_ids


def _intermediate(eo: bool, en: bool, RO: dict[int, Bucket], RN: dict[int, Bucket],
                  present: set[int], trans: Mapping[tuple[int, int], int]) -> dict[int, Bucket]:
    """Rules of M for one endpoint and direction: per identity, what old and
    new both admit. Old or new keys are reused where they already say exactly
    that, so an unchanged rule set produces no writes."""
    if not (eo or en):
        return {}
    empty: Bucket = {}
    o0, n0 = RO.get(ID_ANY, empty), RN.get(ID_ANY, empty)
    same_any = eo == en and o0 == n0
    if same_any and RO == RN and not any(o in RO or n in RN for o, n in trans):
        # Nothing to narrow: M is old (and new) for this direction.
        return {i: dict(b) for i, b in RO.items()}
    # Most identities of a direction share their bucket objects with others
    # (the compiler makes one per distinct input), so the port sets of a
    # bucket and M's bucket for a pair of them are worked out once per
    # direction. Keyed by object, each entry holding its objects alive.
    sets: dict[int, tuple[Bucket, PortSet]] = {}

    def keyset(b: Bucket) -> PortSet:
        hit = sets.get(id(b))
        if hit is None or hit[0] is not b:
            hit = sets[id(b)] = (b, PortSet.from_keys(b))
        return hit[1]

    all_o, all_n = (PortSet.all() if not eo else None), (PortSet.all() if not en else None)
    ko0, kn0 = keyset(o0), keyset(n0)

    def allowance_o(b: Bucket) -> PortSet:
        return all_o if all_o is not None else keyset(b).union(ko0)

    def allowance_n(b: Bucket) -> PortSet:
        return all_n if all_n is not None else keyset(b).union(kn0)

    m0 = allowance_o(empty).intersection(allowance_n(empty))
    out: dict[int, Bucket] = {}

    def choose(src_o: int, src_n: int, same: bool, am: PortSet, base: PortSet) -> Optional[Bucket]:
        """M's bucket for an identity taking old rules from src_o and new
        ones from src_n (same: the identity is both); None for none."""
        bo, bn = RO.get(src_o, empty), RN.get(src_n, empty)
        if same:
            if eo and keyset(bo).union(base) == am:
                return dict(bo) if bo else None
            if en and keyset(bn).union(base) == am:
                return dict(bn) if bn else None
        keys = [k for k in am.keys() if not base.covers_key(k)]
        if not keys:
            return None
        side, sident = (RN, src_n) if en else (RO, src_o)
        b: Bucket = {}
        for k in keys:
            v = bn.get(k) if en and same else None
            if v is None and eo and same:
                v = bo.get(k)
            b[k] = v if v is not None else _synth_value(side, sident, k)
        return b

    # "Any peer" first: every other identity's rules only add to it.
    if eo and ko0 == m0:
        if o0:
            out[ID_ANY] = dict(o0)
    elif en and kn0 == m0:
        if n0:
            out[ID_ANY] = dict(n0)
    elif m0:
        side = RN if en else RO
        out[ID_ANY] = {k: _synth_value(side, ID_ANY, k) for k in m0.keys()}
    base = PortSet.from_keys(out.get(ID_ANY, {}))
    unchanged_any = same_any and out.get(ID_ANY, empty) == o0

    # identities that are themselves on both sides: M's bucket depends on
    # the pair of buckets only (the "any peer" ones are the direction's)
    made: dict[tuple[int, int], tuple[Bucket, Bucket, Optional[Bucket]]] = {}
    plain = ((set(RO) if eo else set()) | (set(RN) if en else set())) - {ID_ANY}
    for z in sorted(plain & present):
        bo, bn = RO.get(z, empty), RN.get(z, empty)
        if unchanged_any and z in RO and z in RN and (bo is bn or bo == bn):
            # Same rules on both sides, over the same "any peer" rules.
            out[z] = dict(bo)
            continue
        hit = made.get((id(bo), id(bn)))
        if hit is None or hit[0] is not bo or hit[1] is not bn:
            am = allowance_o(bo).intersection(allowance_n(bn))
            hit = made[(id(bo), id(bn))] = (bo, bn, choose(z, z, True, am, base))
        if hit[2] is not None:
            out[z] = dict(hit[2])
    for (o, n), t in trans.items():
        if (eo and o in RO) or (en and n in RN):
            am = allowance_o(RO.get(o, empty)).intersection(allowance_n(RN.get(n, empty)))
            b = choose(o, n, False, am, base)
            if b is not None:
                out[t] = b
    return out
