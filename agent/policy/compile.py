"""NetworkPolicies + Pods + Namespaces -> this node's policy maps.

Semantics are networking.k8s.io/v1's (README-section.md spells out every
choice); the output is shaped for constant-cost lookups (state.py):

1. Which pods of this node are isolated, per direction, and by which
   policies. Audited policies (their keys are an input: the cluster-state
   model carries no NetworkPolicy annotations) never change what is enforced;
   they only isolate "on paper" a direction no enforced policy selects.
2. Peer identities: every address is classified once (pod labels and
   namespace labels, the ipBlocks containing it, the numbers of the named
   ports that egress rules ask about), so that a rule never has to name
   individual pods or CIDRs in the per-packet path.
3. Per endpoint and direction, the union of the matching rules as
   (identity, protocol, port-prefix) keys, each carrying the ids of every
   policy that admits it, so the longest match alone explains a verdict.
"""
from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Optional, Union

from agent.k8s.model import FrozenMap, IPBlock, Key, NetworkPolicy, Pod, PolicyPeer, PolicyRule
from agent.k8s.store import Snapshot
from agent.model.endpoint import is_endpoint_key
from agent.policy import addr, ip4
from agent.policy.ports import ANY_KEY, PortKey, PortSet, block_size, proto_number
from agent.policy.state import (
    DIRECTIONS,
    HOST_IDENTITY, ID_ANY, ID_DYNAMIC_MIN, ID_HOST, ID_WORLD, POLICY_ALWAYS, POLICY_DYNAMIC_MIN,
    POLICY_HOST, RESERVED_POLICIES, WORLD_IDENTITY, Direction, DirectionPolicy, EndpointConfig,
    EndpointPolicy, Identity, Mode, PolicyKey, PolicyState, RuleValue,
)

# The API server labels every namespace with its name; manifests fed through
# directory mode may not, and selectors on it must still work.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

_PHASE_RANK = {"Running": 0, "Pending": 1, "": 2, "Unknown": 3}


def policy_name(key: Union[Key, str]) -> str:
    return key if isinstance(key, str) else f"{key[0]}/{key[1]}"


def compile_policy(snapshot: Snapshot, node_name: str, node_ips: Iterable[str],
                   mode: Union[Mode, str], audited: Iterable[Union[Key, str]] = frozenset(),
                   *, previous: Optional[PolicyState] = None,
                   incremental: bool = True,
                   refused: Iterable[tuple[str, str]] = frozenset()) -> PolicyState:
    """Compile the policy of node `node_name`.

    `audited` names the NetworkPolicies in audit mode, as (namespace, name)
    keys or "namespace/name": whoever reads the `fastpath.io/audit`
    annotation passes them here. `previous`, the state currently in the
    maps, keeps identity and policy ids stable so that a change rewrites
    only what it changes.

    With `previous` compiled by this function for the same node, node
    addresses and mode, only what the objects changed since then reach
    (policies, pods, namespaces, audited policies) is recompiled; the result
    is the same as a full compile with the same `previous`, which
    `incremental=False` forces. `previous` itself is left valid: it can be
    the base of another compile (e.g. when its successor was refused).

    `refused` names (policy "namespace/name", endpoint IPv4) pairs whose
    rules are left out because the maps cannot hold them (agent/policy/
    capacity.py decides which): the policy still isolates the endpoint
    (its default deny and its place among the deciding policies stay), it
    only admits nothing there, so a refusal never opens anything. The
    state's `refused` lists the pairs that took effect.
    """
    mode = Mode(mode)
    audited = frozenset(policy_name(k) for k in audited)
    refused = frozenset(refused)
    comp = _Compiler(node_name, node_ips, mode, audited, refused)
    base = previous._cache.get("compiler") if (previous is not None and incremental) else None
    if (isinstance(base, _Compiler) and base.node_name == comp.node_name
            and base.node_ips == comp.node_ips and base.mode == mode):
        return base.update(snapshot, audited, refused)
    return comp.full(snapshot, previous)


def _allocate(names: Iterable[str], previous: Mapping[str, int],
              reserved: Mapping[str, int], start: int) -> dict[str, int]:
    """Stable small ids: a name keeps its previous id; a new name gets the
    lowest id that neither the previous nor the new table uses, so an id never
    changes meaning between two consecutive states."""
    out = dict(reserved)
    pending = []
    for n in sorted(set(names)):
        if n in out:
            continue
        pid = previous.get(n)
        if pid is not None and pid >= start:
            out[n] = pid
        else:
            pending.append(n)
    used = set(out.values()) | set(previous.values())
    nxt = start
    for n in pending:
        while nxt in used:
            nxt += 1
        out[n] = nxt
        used.add(nxt)
    return out


# Peer-dependency key of an egress rule without peers that names ports: its
# rules depend on every pod identity.
ANY_POD = ("", None)

Slot = tuple[str, Direction]      # (endpoint IPv4, direction)


# An IPv6-only pod with no endpoint key here (on another node, or not added
# yet) is indexed under its first IPv6 address with this prefix: a name of
# the compile's own, never an endpoint and never written to a map, so that
# it is a peer by its IPv6 addresses as any pod is.
V6_ONLY = "v6only:"


def _eligible_ip(p: Pod, node_ips: frozenset[str]) -> Optional[str]:
    if p.host_network or p.is_terminal:
        return None
    ip = next((a for a in p.ips if ip4.is_ip4(a)), None)
    if ip is None:
        six = _ip6s(p, node_ips)
        return V6_ONLY + six[0] if six else None
    if ip in node_ips:
        return None
    return ip


def _no_address(ip: str) -> bool:
    """Whether a pod's index is no address of a peer: an IPv6-only pod's
    endpoint key or its compile-only name (V6_ONLY)."""
    return ip.startswith(V6_ONLY) or is_endpoint_key(ip)


def _ip6s(p: Pod, node_ips: frozenset[str]) -> tuple[str, ...]:
    """The pod's IPv6 addresses: peers under the same identity rules as its
    IPv4 address (ipBlocks of IPv6 match them), and the addresses the IPv6
    programs find the pod's policy by."""
    return tuple(a for a in (addr.canonical(x) for x in p.ips if addr.is_ip6(x))
                 if a not in node_ips)


def _rank(p: Pod) -> tuple:
    return (_PHASE_RANK.get(p.phase, 3), p.deleting, p.namespace, p.name)


def _bump(counter: dict, key, delta: int) -> bool:
    """Add delta to a count kept without zeros; True if the key appeared or vanished."""
    n = counter.get(key, 0) + delta
    if n:
        counter[key] = n
    else:
        del counter[key]
    return n == 0 or n == delta


def _changed(old: Mapping, new: Mapping) -> set:
    """Keys whose object differs (added, removed, or replaced by an unequal one)."""
    out = {k for k, v in new.items() if (o := old.get(k)) is not v and o != v}
    out.update(old.keys() - new.keys())
    return out


def _affects(pol: NetworkPolicy, d: Direction) -> bool:
    return pol.affects_ingress if d == Direction.INGRESS else pol.affects_egress


class _Compiler:
    """The compile and everything needed to redo only part of it.

    A full compile fills every table below; `update` starts from a copy of
    the tables of the previous compile and redoes only what the changed
    objects reach. The tables are never modified once a state has been made
    from them (an update copies each one before writing), so a state can be
    updated again, e.g. after its successor was refused.
    """

    # Tables an update writes to (each copied first); the others are only
    # ever replaced as a whole.
    _TABLES = ("policies", "pods", "namespaces", "_ns_labels", "pid", "policy_table", "by_ns",
               "cands", "usable", "local", "local_by_ns", "ns_ips", "sel", "plan", "act_n",
               "act_obj", "block_n", "block_pid_n", "named_n", "ident_of_ip", "ident_n", "id_of",
               "identity_info", "identities", "ipcache", "peer_cache", "deps_of", "peer_deps",
               "peer_index", "endpoints", "enf_n", "program", "v6_of", "pod_of6")

    def __init__(self, node_name: str, node_ips: Iterable[str], mode: Mode, audited: frozenset[str],
                 refused: frozenset[tuple[str, str]] = frozenset()):
        self.node_name = node_name
        # both families: the node's IPv6 addresses are `host` as its IPv4 ones
        self.node_ips = tuple(sorted({addr.canonical(ip) for ip in node_ips}))
        self.mode = mode
        self.audited = audited
        self._set_refused(refused)
        self._ns_labels: dict[str, FrozenMap] = {}
        # Shared by every compile derived from this one (update's shallow
        # copy keeps it): see _bucket.
        self._buckets: dict[tuple, dict[PortKey, RuleValue]] = {}

    def _set_refused(self, refused: frozenset[tuple[str, str]]) -> None:
        self.refused = refused
        by_ip: dict[str, set[str]] = defaultdict(set)
        for name, ip in refused:
            by_ip[ip].add(name)
        self.refused_at = {ip: frozenset(v) for ip, v in by_ip.items()}

    def _set_v6(self, ip: str, pod: Optional[Pod]) -> tuple[str, ...]:
        """Record the IPv6 addresses of the pod now usable at IPv4 `ip`
        (None: no pod); returns the addresses that were and are its."""
        old = self.v6_of.pop(ip, ())
        for a in old:
            if self.pod_of6.get(a) == ip:
                del self.pod_of6[a]
        new = _ip6s(pod, frozenset(self.node_ips)) if pod is not None else ()
        if new:
            self.v6_of[ip] = new
            for a in new:
                self.pod_of6[a] = ip
        return old + new

    def _owner(self, ip: str) -> Optional[Pod]:
        """The usable pod holding address `ip` (of either family)."""
        if addr.is_ip6(ip):
            ip = self.pod_of6.get(ip, "")
        elif _no_address(ip):
            return None         # an IPv6-only pod's key: no address, so no peer
        return self.usable.get(ip)

    def ns_labels(self, ns: str) -> FrozenMap:
        m = self._ns_labels.get(ns)
        if m is None:
            obj = self.namespaces.get(("", ns))
            labels = obj.labels if obj is not None else {}
            if NAMESPACE_NAME_LABEL not in labels:
                labels = {**dict(labels), NAMESPACE_NAME_LABEL: ns}
            m = self._ns_labels[ns] = FrozenMap(labels)
        return m

    # ------------------------------------------------------------ full

    def full(self, snap: Snapshot, prev: Optional[PolicyState]) -> PolicyState:
        self.policies: dict[Key, NetworkPolicy] = dict(snap.network_policies)
        self.pods: dict[Key, Pod] = dict(snap.pods)
        self.namespaces = dict(snap.namespaces)
        pol_ids = _allocate((policy_name(k) for k in self.policies),
                            {n: i for i, n in prev.policies.items()} if prev else {},
                            {v: k for k, v in RESERVED_POLICIES.items()}, POLICY_DYNAMIC_MIN)
        self.pid = {k: pol_ids[policy_name(k)] for k in self.policies}
        self.policy_table = {i: n for n, i in pol_ids.items()}

        node_ips = frozenset(self.node_ips)
        self.cands: dict[str, tuple[Pod, ...]] = {}
        for p in self.pods.values():
            ip = _eligible_ip(p, node_ips)
            if ip is not None:
                self.cands[ip] = self.cands.get(ip, ()) + (p,)
        self.usable = {ip: min(c, key=_rank) for ip, c in self.cands.items()}
        # (an IPv6-only pod is an endpoint once CNI ADD gave it a key)
        self.local = {ip: p for ip, p in sorted(
                          ((ip, p) for ip, p in self.usable.items() if not ip.startswith(V6_ONLY)),
                          key=lambda t: ip4.to_int(t[0]))
                      if p.node_name == self.node_name}
        self.v6_of: dict[str, tuple[str, ...]] = {}
        self.pod_of6: dict[str, str] = {}
        for ip, p in self.usable.items():
            self._set_v6(ip, p)

        if self.mode == Mode.NEVER:
            return PolicyState(
                mode=self.mode, node_name=self.node_name, node_ips=self.node_ips,
                identities={HOST_IDENTITY.name: ID_HOST, WORLD_IDENTITY.name: ID_WORLD},
                identity_info={ID_HOST: HOST_IDENTITY, ID_WORLD: WORLD_IDENTITY},
                ipcache={}, ipcache_policies={},
                endpoints={ip: EndpointPolicy(ip, p.namespace, p.name, EndpointConfig(), {}, {})
                           for ip, p in self.local.items()},
                policies=self.policy_table, audited=self.audited)

        by_ns: dict[str, list[Key]] = defaultdict(list)
        for k in sorted(self.policies):
            by_ns[k[0]].append(k)
        self.by_ns = {ns: tuple(v) for ns, v in by_ns.items()}
        self.local_by_ns: dict[str, frozenset[str]] = {}
        self.ns_ips: dict[str, frozenset[str]] = {}
        for ip, p in self.usable.items():
            self.ns_ips[p.namespace] = self.ns_ips.get(p.namespace, frozenset()) | {ip}
        for ip, p in self.local.items():
            self.local_by_ns[p.namespace] = self.local_by_ns.get(p.namespace, frozenset()) | {ip}

        # 1. Isolation per endpoint and direction, and which policies' rules count.
        self.sel: dict[Slot, frozenset[Key]] = {}
        self.plan: dict[Slot, tuple[DirectionPolicy, tuple[Key, ...]]] = {}
        self.act_n: dict[tuple[Key, Direction], int] = {}
        self.act_obj: dict[tuple[Key, Direction], tuple[NetworkPolicy, int]] = {}
        self.block_n: dict[IPBlock, int] = {}
        self.block_pid_n: dict[tuple[IPBlock, int], int] = {}
        self.named_n: dict[tuple[str, int], int] = {}
        for ip, pod in self.local.items():
            for d in DIRECTIONS:
                self.sel[(ip, d)] = self._select(pod, d)
                self.plan[(ip, d)] = plan = self._plan((ip, d))
                for k in plan[1]:
                    self._activate(k, d, 1)

        # 2. Identities, from what the compiled rules can ask about a peer.
        self.blocks = frozenset(self.block_n)
        self.named_refs = frozenset(self.named_n)
        self._build_cidrs(self.blocks)
        # (an IPv6-only pod's endpoint key is known to the per-pod maps
        # only: its identity is its IPv6 addresses')
        self.ident_of_ip: dict[str, Identity] = {
            ip: self._pod_identity(ip, pod) for ip, pod in self.usable.items()
            if not _no_address(ip)}
        for a6, ip in self.pod_of6.items():
            self.ident_of_ip[a6] = self._pod_identity(a6, self.usable[ip])
        for ip in self.node_ips:
            self.ident_of_ip[ip] = self._host_identity(ip)
        self.cidr_ident = self._cidr_identities()
        self.ident_n: dict[Identity, int] = {}
        for i in (*self.ident_of_ip.values(), *self.cidr_ident.values()):
            self.ident_n[i] = self.ident_n.get(i, 0) + 1
        all_idents = set(self.ident_n)
        names = _allocate((i.name for i in all_idents), prev.identities if prev else {},
                          {HOST_IDENTITY.name: ID_HOST, WORLD_IDENTITY.name: ID_WORLD},
                          ID_DYNAMIC_MIN)
        self.id_of = {i: names[i.name] for i in all_idents}
        self.id_of[HOST_IDENTITY] = ID_HOST
        self.id_of[WORLD_IDENTITY] = ID_WORLD
        self.identity_info = {self.id_of[i]: i for i in all_idents | {HOST_IDENTITY, WORLD_IDENTITY}}
        self.identities = {i.name: n for n, i in self.identity_info.items()}

        # Most specific last, so a pod's /32 overrides an ipBlock prefix and a
        # node address overrides both.
        self.ipcache: dict[str, int] = {}
        for (plen, net), ident in sorted(self.cidr_ident.items()):
            self.ipcache[addr.prefix_text(plen, net)] = self.id_of[ident]
        for ip in sorted(self.ident_of_ip, key=addr.to_int):
            self.ipcache[addr.host_text(ip)] = self.id_of[self.ident_of_ip[ip]]
        self.ipcache_policies = self._cidr_policies()
        self._index_identities()
        self.peer_cache: dict[tuple, tuple[tuple[int, ...], frozenset[int]]] = {}
        self.peer_index: dict[tuple, frozenset] = {}

        # 3. Rules.
        self.program: dict[Slot, tuple] = {}
        self.endpoints: dict[str, EndpointPolicy] = {}
        self.enf_n: dict[int, int] = {}
        self.deps_of: dict[Slot, frozenset] = {}
        self.peer_deps: dict[tuple, frozenset[Slot]] = {}
        acc: dict[tuple, set[Slot]] = defaultdict(set)
        for ip, pod in self.local.items():
            by_peer: dict[tuple[Direction, int], dict] = {}
            for d in DIRECTIONS:
                deps: set = set()
                filled = self._fill(ip, d, by_peer, deps)
                if self.plan[(ip, d)][0].enforced:
                    for ident in filled:
                        _bump(self.enf_n, ident, 1)
                if deps:
                    self.deps_of[(ip, d)] = frozenset(deps)
                    for ck in deps:
                        acc[ck].add((ip, d))
            self.endpoints[ip] = self._endpoint(ip, by_peer, None)
        self.peer_deps = {ck: frozenset(v) for ck, v in acc.items()}
        return self._state()

    def _state(self) -> PolicyState:
        state = PolicyState(
            mode=self.mode, node_name=self.node_name, node_ips=self.node_ips,
            identities=self.identities, identity_info=self.identity_info, ipcache=self.ipcache,
            ipcache_policies=self.ipcache_policies, endpoints=self.endpoints,
            policies=self.policy_table, audited=self.audited, refused=self._refused_in_effect(),
            endpoints6={a: ip for a, ip in self.pod_of6.items() if ip in self.local})
        # Known here for free; diff asks for it on every change.
        state._cache["enforced_ids"] = frozenset(self.enf_n)
        state._cache["compiler"] = self
        return state

    # ------------------------------------------------------- plan pieces

    def _select(self, pod: Pod, d: Direction) -> frozenset[Key]:
        pols = self.policies
        return frozenset(k for k in self.by_ns.get(pod.namespace, ())
                         if _affects(pols[k], d) and pols[k].pod_selector.matches(pod.labels))

    def _plan(self, slot: Slot) -> tuple[DirectionPolicy, tuple[Key, ...]]:
        """The slot's isolation and the policies whose rules it compiles:
        those of _candidates but the refused ones, which keep isolating."""
        dp, keys = self._candidates(slot)
        refused = self.refused_at.get(slot[0])
        if refused:
            keys = tuple(k for k in keys if policy_name(k) not in refused)
        return dp, keys

    def _candidates(self, slot: Slot) -> tuple[DirectionPolicy, tuple[Key, ...]]:
        sel = self.sel[slot]
        enforced = sorted(k for k in sel if policy_name(k) not in self.audited)
        if enforced or self.mode == Mode.ALWAYS:
            deciding = tuple(sorted(self.pid[k] for k in enforced)) or (POLICY_ALWAYS,)
            return DirectionPolicy(True, False, deciding), tuple(enforced)
        audit = sorted(k for k in sel if policy_name(k) in self.audited)
        if audit:
            # An audited policy can only ever add allows to a direction an
            # enforced policy already isolates, so its rules matter (as
            # would-be drops) only where nothing enforced selects.
            return DirectionPolicy(False, True, tuple(sorted(self.pid[k] for k in audit))), tuple(audit)
        return DirectionPolicy(), ()

    def _refused_in_effect(self) -> frozenset[tuple[str, str]]:
        """The refused pairs whose policy would compile rules for the endpoint."""
        out = set()
        for name, ip in self.refused:
            if ip not in self.local:
                continue
            for d in DIRECTIONS:
                if any(policy_name(k) == name for k in self._candidates((ip, d))[1]):
                    out.add((name, ip))
                    break
        return frozenset(out)

    def _activate(self, key: Key, d: Direction, delta: int) -> None:
        """Count the endpoints compiling policy `key` in direction d; its
        ipBlocks and egress named ports count while that is not zero."""
        n = self.act_n.get((key, d), 0)
        if delta > 0 and n == 0:
            pol = self.policies[key]
            self.act_obj[(key, d)] = (pol, self.pid[key])
            self._contribute(pol, self.pid[key], d, 1)
        elif delta < 0 and n == 1:
            pol, pid = self.act_obj.pop((key, d))
            self._contribute(pol, pid, d, -1)
        _bump(self.act_n, (key, d), delta)

    def _contribute(self, pol: NetworkPolicy, pid: int, d: Direction, sign: int) -> None:
        blocks, named = set(), set()
        for rule in (pol.ingress if d == Direction.INGRESS else pol.egress):
            for peer in rule.peers:
                b = peer.ip_block
                if b is not None:
                    blocks.add(b)
            if d == Direction.EGRESS:
                for pp in rule.ports:
                    if isinstance(pp.port, str):
                        named.add((pp.port, proto_number(pp.protocol)))
        for b in blocks:
            _bump(self.block_n, b, sign)
            if _bump(self.block_pid_n, (b, pid), sign):
                self.block_pids_changed = True
        for r in named:
            _bump(self.named_n, r, sign)

    # --------------------------------------------------- identity pieces

    def _pod_identity(self, ip: str, pod: Pod) -> Identity:
        ports = tuple(sorted(
            (name, proto, num) for name, proto in self.named_refs
            if (num := _named_port(pod, name, proto)) is not None))
        return Identity("pod", pod.namespace, pod.labels, self.ns_labels(pod.namespace),
                        self.blocks_of(addr.to_int(ip), addr.HOST_BITS), ports)

    def _host_identity(self, ip: str) -> Identity:
        return Identity("host", blocks=self.blocks_of(addr.to_int(ip), addr.HOST_BITS))

    def _cidr_identities(self) -> dict[tuple[int, int], Identity]:
        return {pfx: (Identity("cidr", blocks=sig) if sig else WORLD_IDENTITY)
                for pfx, sig in self.cidr_entries.items()}

    def _cidr_policies(self) -> dict[str, tuple[int, ...]]:
        block_policies: dict[IPBlock, set[int]] = defaultdict(set)
        for b, pid in self.block_pid_n:
            block_policies[b].add(pid)
        return {addr.prefix_text(plen, net): tuple(sorted(
                    pid for b in self.prefix_blocks[(plen, net)] for pid in block_policies[b]))
                for plen, net in sorted(self.cidr_ident)}

    def _index_identities(self) -> None:
        self.pod_idents = sorted(((n, i) for n, i in self.identity_info.items() if i.kind == "pod"),
                                 key=lambda t: t[0])
        self.pod_idents_by_ns: dict[str, list[tuple[int, Identity]]] = defaultdict(list)
        for t in self.pod_idents:
            self.pod_idents_by_ns[t[1].namespace].append(t)
        self.block_members: dict[IPBlock, list[int]] = defaultdict(list)
        for ident, i in sorted(self.identity_info.items()):
            for b in i.blocks:
                self.block_members[b].append(ident)
        # Only identities a node address really has: with no node address
        # known there is nothing to allow.
        self.host_idents = sorted({self.id_of[self.ident_of_ip[ip]] for ip in self.node_ips})
        self.info_by_id = dict(self.pod_idents)

    # -------------------------------------------------------------- update

    def update(self, snap: Snapshot, audited: frozenset[str],
               refused: frozenset[tuple[str, str]] = frozenset()) -> PolicyState:
        """The state for `snap`, computed from this compile's tables (left as
        they are) by redoing only what changed objects reach."""
        new = copy.copy(self)
        for name in self._TABLES:
            setattr(new, name, dict(getattr(self, name)))
        return new._update(snap, audited, refused)

    def _update(self, snap: Snapshot, audited: frozenset[str],
                refused: frozenset[tuple[str, str]] = frozenset()) -> PolicyState:
        IN, EG = Direction.INGRESS, Direction.EGRESS
        self.block_pids_changed = False
        refusal_changed = {ip for _, ip in self.refused ^ refused}
        self._set_refused(refused)
        # ---- what changed in the inputs
        chg_pol = _changed(self.policies, snap.network_policies)
        chg_pod = _changed(self.pods, snap.pods)
        chg_ns = {k[1] for k in _changed(self.namespaces, snap.namespaces)}
        for name in self.audited ^ audited:
            ns, _, n = name.partition("/")
            if (ns, n) in snap.network_policies:
                chg_pol.add((ns, n))
        self.audited = audited

        # ---- policies and their ids (a new name takes the lowest id neither
        # the previous nor this state uses, exactly as a full compile does)
        used = set(self.policy_table)
        fresh = []
        touched_ns: set[str] = set()
        for k in chg_pol:
            pol = snap.network_policies.get(k)
            had = k in self.policies
            if pol is None:
                del self.policies[k]
                del self.policy_table[self.pid.pop(k)]
            else:
                self.policies[k] = pol
                if not had:
                    fresh.append(k)
            if pol is None or not had:
                touched_ns.add(k[0])
        # once per namespace, however many of its policies came or went
        for ns in touched_ns:
            keys = {x for x in self.by_ns.get(ns, ()) if x in self.policies}
            keys.update(k for k in chg_pol if k[0] == ns and k in self.policies)
            self.by_ns[ns] = tuple(sorted(keys))
        nxt = POLICY_DYNAMIC_MIN
        for k in sorted(fresh, key=policy_name):
            while nxt in used:
                nxt += 1
            self.pid[k] = nxt
            self.policy_table[nxt] = policy_name(k)
            used.add(nxt)

        # ---- pods: which address changes owner
        node_ips = frozenset(self.node_ips)
        touched_ips: set[str] = set()
        for k in chg_pod:
            old, pod = self.pods.get(k), snap.pods.get(k)
            if old is not None:
                ip = _eligible_ip(old, node_ips)
                if ip is not None:
                    rest = tuple(c for c in self.cands[ip] if c is not old)
                    if rest:
                        self.cands[ip] = rest
                    else:
                        del self.cands[ip]
                    touched_ips.add(ip)
                del self.pods[k]
            if pod is not None:
                ip = _eligible_ip(pod, node_ips)
                if ip is not None:
                    self.cands[ip] = self.cands.get(ip, ()) + (pod,)
                    touched_ips.add(ip)
                self.pods[k] = pod
        for k in chg_ns:
            obj = snap.namespaces.get(("", k))
            if obj is None:
                self.namespaces.pop(("", k), None)
            else:
                self.namespaces[("", k)] = obj
            self._ns_labels.pop(k, None)

        changed_ips: set[str] = set()
        old_plans: dict[Slot, tuple[DirectionPolicy, tuple[Key, ...]]] = {}
        gone_eps: set[str] = set()
        for ip in touched_ips:
            c = self.cands.get(ip)
            w = min(c, key=_rank) if c else None
            was = self.usable.get(ip)
            if w is was:
                continue
            changed_ips.add(ip)
            if was is not None:
                del self.usable[ip]
                _discard(self.ns_ips, was.namespace, ip)
            if w is not None:
                self.usable[ip] = w
                self.ns_ips[w.namespace] = self.ns_ips.get(w.namespace, frozenset()) | {ip}
            if ip in self.local:
                was_local = self.local.pop(ip)
                _discard(self.local_by_ns, was_local.namespace, ip)
                for d in DIRECTIONS:
                    old_plans[(ip, d)] = self.plan.pop((ip, d))
                    del self.sel[(ip, d)]
                gone_eps.add(ip)
            if w is not None and w.node_name == self.node_name and not ip.startswith(V6_ONLY):
                self.local[ip] = w
                self.local_by_ns[w.namespace] = self.local_by_ns.get(w.namespace, frozenset()) | {ip}
                for d in DIRECTIONS:
                    self.sel[(ip, d)] = self._select(w, d)
                    self.plan[(ip, d)] = self._plan((ip, d))
                    old_plans.setdefault((ip, d), (DirectionPolicy(), ()))
                gone_eps.discard(ip)

        # ---- policies: which local endpoints they select (every selection
        # first: a plan must not see a policy this change removes)
        reselected: dict[Slot, set[Key]] = defaultdict(set)
        for k in chg_pol:
            pol = self.policies.get(k)
            for ip in self.local_by_ns.get(k[0], ()):
                if ip in changed_ips:
                    continue     # planned from scratch above
                pod = self.local[ip]
                for d in DIRECTIONS:
                    slot = (ip, d)
                    sel = self.sel[slot]
                    hit = pol is not None and _affects(pol, d) and pol.pod_selector.matches(pod.labels)
                    if hit or k in sel:
                        self.sel[slot] = sel | {k} if hit else sel - {k}
                        reselected[slot].add(k)
        for slot, keys in reselected.items():
            before = self.plan[slot]
            after = self._plan(slot)
            if after != before or not keys.isdisjoint(after[1]):
                self.plan[slot] = after
                old_plans.setdefault(slot, before)
        # endpoints where a policy's rules were refused or are let in again
        for ip in refusal_changed:
            if ip not in self.local or ip in changed_ips:
                continue
            for d in DIRECTIONS:
                slot = (ip, d)
                before = self.plan[slot]
                after = self._plan(slot)
                if after != before:
                    self.plan[slot] = after
                    old_plans.setdefault(slot, before)

        # ---- which policies' ipBlocks and named ports count (all releases
        # first, so a replaced policy's old object is released before its new
        # one is taken)
        for slot, (_, keys) in old_plans.items():
            for k in keys:
                self._activate(k, slot[1], -1)
        for slot in old_plans:
            if slot in self.plan:
                for k in self.plan[slot][1]:
                    self._activate(k, slot[1], 1)

        # ---- identities of addresses (each pod's IPv6 ones with its IPv4)
        redo = set(changed_ips)
        for ip in changed_ips:
            redo.update(self._set_v6(ip, self.usable.get(ip)))
        for ns in chg_ns:
            for ip in self.ns_ips.get(ns, frozenset()):
                redo.add(ip)
                redo.update(self.v6_of.get(ip, ()))
        blocks = frozenset(self.block_n)
        blocks_changed = blocks != self.blocks
        if blocks_changed:
            moved = [addr.parse_prefix(b.cidr) for b in blocks ^ self.blocks]
            for ip in (*self.usable, *self.pod_of6, *self.node_ips):
                if ip.startswith(V6_ONLY):
                    continue
                a = addr.to_int(ip)
                if any(a & addr.mask(plen) == net for plen, net in moved):
                    redo.add(ip)
            self.blocks = blocks
            self._build_cidrs(blocks)
        named = frozenset(self.named_n)
        if named != self.named_refs:
            names = {n for n, _ in named ^ self.named_refs}
            for ip, p in self.usable.items():
                if any(cp.name in names for cp in p.ports):
                    redo.add(ip)
                    redo.update(self.v6_of.get(ip, ()))
            self.named_refs = named

        touched: set[Identity] = set()
        dirty_texts: set[str] = set()

        def count(i: Identity, delta: int) -> None:
            if _bump(self.ident_n, i, delta):
                touched.add(i)

        for ip in redo:
            old_i = self.ident_of_ip.get(ip)
            if ip in node_ips:
                new_i = self._host_identity(ip)
            else:
                pod = self._owner(ip)
                new_i = self._pod_identity(ip, pod) if pod is not None else None
            if old_i == new_i:
                continue
            if old_i is not None:
                count(old_i, -1)
            if new_i is not None:
                count(new_i, 1)
                self.ident_of_ip[ip] = new_i
            else:
                del self.ident_of_ip[ip]
            dirty_texts.add(addr.host_text(ip))
        if blocks_changed:
            old_cidr = self.cidr_ident
            self.cidr_ident = self._cidr_identities()
            for pfx in old_cidr.keys() | self.cidr_ident.keys():
                o, n = old_cidr.get(pfx), self.cidr_ident.get(pfx)
                if o != n:
                    if o is not None:
                        count(o, -1)
                    if n is not None:
                        count(n, 1)
                    dirty_texts.add(addr.prefix_text(*pfx))
        if blocks_changed or self.block_pids_changed:
            self.ipcache_policies = self._cidr_policies()

        reserved = (HOST_IDENTITY, WORLD_IDENTITY)
        added = sorted((i for i in touched if i in self.ident_n and i not in self.id_of),
                       key=lambda i: i.name)
        removed = [i for i in touched if i not in self.ident_n and i in self.id_of
                   and i not in reserved]
        used = set(self.identity_info)
        removed_ids = set()
        for i in removed:
            n = self.id_of.pop(i)
            del self.identity_info[n]
            self.identities.pop(i.name, None)
            removed_ids.add(n)
        nxt = ID_DYNAMIC_MIN
        for i in added:
            while nxt in used:
                nxt += 1
            self.id_of[i] = nxt
            self.identity_info[nxt] = i
            self.identities[i.name] = nxt
            used.add(nxt)
        for text in dirty_texts:
            plen, net = addr.parse_prefix(text)
            i = self.ident_of_ip.get(text.rpartition("/")[0]) if plen == addr.HOST_BITS else None
            if i is None:
                i = self.cidr_ident.get((plen, net))
            if i is None:
                self.ipcache.pop(text, None)
            else:
                self.ipcache[text] = self.id_of[i]
        host_before = self.host_idents
        if added or removed:
            self._index_identities()
        else:
            self.host_idents = sorted({self.id_of[self.ident_of_ip[ip]] for ip in self.node_ips})

        # ---- peers: new identities join the peers that match them
        whole: set[Slot] = {s for s in old_plans if s in self.plan}
        if self.host_idents != host_before:
            whole |= {(ip, IN) for ip in self.local}
        partial: dict[Slot, set[int]] = defaultdict(set)
        joins: dict[tuple, set[int]] = defaultdict(set)
        for i in removed:
            for ck in self._peers_of(i):
                joins[ck]
        for i in added:
            n = self.id_of[i]
            for ck in self._peers_of(i):
                joins[ck].add(n)
                for slot in self.peer_deps.get(ck, ()):
                    partial[slot].add(n)
            if i.kind == "pod" and i.named_ports:
                for slot in self.peer_deps.get(ANY_POD, ()):
                    partial[slot].add(n)
        for ck, new_ids in joins.items():
            ids, members = self.peer_cache[ck]
            members = (members - removed_ids) | new_ids
            if new_ids:
                ids = tuple(sorted(members))
            elif len(members) != len(ids):
                ids = tuple(x for x in ids if x in members)
            self.peer_cache[ck] = (ids, members)

        # ---- rules
        eps = {ip for ip, _ in whole} | {ip for ip, _ in partial} | gone_eps
        if removed_ids:
            eps |= {ip for ip, ep in self.endpoints.items()
                    if any((d, n) in ep.by_peer for n in removed_ids for d in DIRECTIONS)}
        for ip in eps:
            old_ep = self.endpoints.get(ip)
            if ip not in self.local:
                if old_ep is not None:
                    for d, n in old_ep.by_peer:
                        if old_plans[(ip, d)][0].enforced:
                            _bump(self.enf_n, n, -1)
                    del self.endpoints[ip]
                for d in DIRECTIONS:
                    self._set_deps((ip, d), frozenset())
                    self.program.pop((ip, d), None)
                continue
            by_peer = dict(old_ep.by_peer) if old_ep is not None else {}
            flat = dict(old_ep.rules) if old_ep is not None else {}
            rewritten: set[tuple[Direction, int]] = set()
            for d in DIRECTIONS:
                slot = (ip, d)
                was_enforced = old_plans.get(slot, self.plan[slot])[0].enforced
                enforced = self.plan[slot][0].enforced
                fresh: dict = {}
                if slot in whole:
                    deps: set = set()
                    filled = self._fill(ip, d, fresh, deps)
                    self._set_deps(slot, frozenset(deps))
                    gone = [key for key in by_peer if key[0] == d]
                elif slot in partial:
                    filled = self._fill(ip, d, fresh, None, only=partial[slot])
                    gone = [(d, n) for n in removed_ids | partial[slot] if (d, n) in by_peer]
                else:
                    filled = ()
                    gone = [(d, n) for n in removed_ids if (d, n) in by_peer]
                for key in gone:
                    b = by_peer[key]
                    if fresh.get(key) is b:
                        # the very same rules (_bucket shares them): nothing to
                        # rewrite, only the count of enforced identities may move
                        if was_enforced != enforced:
                            _bump(self.enf_n, key[1], 1 if enforced else -1)
                        continue
                    del by_peer[key]
                    rewritten.add(key)
                    for k in b:
                        del flat[PolicyKey(d, key[1], *k)]
                    if was_enforced:
                        _bump(self.enf_n, key[1], -1)
                for n in filled:
                    key = (d, n)
                    b = fresh[key]
                    if by_peer.get(key) is b:
                        continue
                    by_peer[key] = b
                    rewritten.add(key)
                    for k, v in b.items():
                        flat[PolicyKey(d, n, *k)] = v
                    if enforced:
                        _bump(self.enf_n, n, 1)
            ep = self.endpoints[ip] = self._endpoint(ip, by_peer, flat)
            if old_ep is not None:
                object.__setattr__(ep, "derived", (weakref.ref(old_ep), frozenset(rewritten)))
        return self._state()

    def _set_deps(self, slot: Slot, deps: frozenset) -> None:
        old = self.deps_of.get(slot, frozenset())
        if old == deps:
            return
        for ck in old - deps:
            rest = self.peer_deps[ck] - {slot}
            if rest:
                self.peer_deps[ck] = rest
            else:
                del self.peer_deps[ck]
                self.peer_cache.pop(ck, None)
                ix = _index_key(ck)
                if ix is not None:
                    _discard(self.peer_index, ix, ck)
        for ck in deps - old:
            self.peer_deps[ck] = self.peer_deps.get(ck, frozenset()) | {slot}
        if deps:
            self.deps_of[slot] = deps
        else:
            self.deps_of.pop(slot, None)

    # -------------------------------------------------------------- ipBlocks

    def _build_cidrs(self, blocks: frozenset[IPBlock]) -> None:
        """Where the set of blocks containing an address changes.

        Every cidr and except is a boundary; all addresses whose longest
        boundary is P share P's set of containing blocks (a block's cidr or
        except holding one of them but not P would be a longer boundary). A
        boundary whose set equals the one it falls back to is left out, so the
        ipcache holds one entry per change, never the 2*N carved pieces a
        hash of disjoint prefixes would need.
        """
        parsed = []
        for b in blocks:
            cidr = addr.parse_prefix(b.cidr)
            excepts = [addr.parse_prefix(e) for e in b.except_]
            if addr.is_ip6(b.cidr) and addr.contains(cidr, addr.V4_RANGE):
                # an IPv6 block holds no IPv4 address (see agent/policy/addr.py)
                excepts.append(addr.V4_RANGE)
            parsed.append((b, cidr, excepts))
        bounds: dict[tuple[int, int], set[IPBlock]] = defaultdict(set)
        for b, cidr, excepts in parsed:
            bounds[cidr].add(b)
            for e in excepts:
                bounds[e].add(b)
        # Blocks by cidr: the cidrs containing a prefix are its ancestors, one
        # per prefix length, so each boundary looks at 33 lengths at most
        # instead of at every block.
        by_cidr: dict[tuple[int, int], list] = defaultdict(list)
        for b, cidr, excepts in parsed:
            by_cidr[cidr].append((b, excepts))
        cidr_lens = sorted({c[0] for c in by_cidr})
        sig: dict[tuple[int, int], frozenset[IPBlock]] = {}
        for p in bounds:
            plen, a = p
            sig[p] = frozenset(
                b for l in cidr_lens if l <= plen
                for b, excepts in by_cidr.get((l, a & addr.mask(l)), ())
                if not any(addr.contains(e, p) for e in excepts))
        self.boundaries = sig
        self.prefix_blocks = bounds
        self.boundary_lens = sorted({p[0] for p in sig}, reverse=True)
        self.cidr_entries = {}
        for p in sorted(sig):
            if sig[p] != self.blocks_of(p[1], p[0], strictly_shorter=True):
                self.cidr_entries[p] = sig[p]

    def blocks_of(self, a: int, plen: int, strictly_shorter: bool = False) -> frozenset[IPBlock]:
        for l in self.boundary_lens:
            if l > plen or (strictly_shorter and l == plen):
                continue
            s = self.boundaries.get((l, a & addr.mask(l)))
            if s is not None:
                return s
        return frozenset()

    # ----------------------------------------------------------------- peers

    def _peer(self, ck: tuple[str, PolicyPeer]) -> tuple[tuple[int, ...], frozenset[int]]:
        """The identities a peer of a policy of namespace ck[0] matches."""
        hit = self.peer_cache.get(ck)
        if hit is not None:
            return hit
        ns, peer = ck
        if peer.ip_block is not None:
            out = tuple(self.block_members.get(peer.ip_block, ()))
        elif peer.pod_selector is None and peer.namespace_selector is None:
            # The API refuses an empty peer; matching nothing never widens access.
            out = ()
        else:
            if peer.namespace_selector is None:
                cands = self.pod_idents_by_ns.get(ns, [])
            else:
                nss = peer.namespace_selector
                cands = [t for t in self.pod_idents if nss.matches(t[1].namespace_labels)]
            ps = peer.pod_selector
            out = tuple(i for i, ident in cands if ps is None or ps.matches(ident.labels))
        hit = self.peer_cache[ck] = (out, frozenset(out))
        ix = _index_key(ck)
        if ix is not None:
            self.peer_index[ix] = self.peer_index.get(ix, frozenset()) | {ck}
        return hit

    def _peers_of(self, info: Identity) -> list[tuple[str, PolicyPeer]]:
        """The cached peers that match identity `info`."""
        pi = self.peer_index
        cands: set = set()
        for b in info.blocks:
            cands |= pi.get(("block", b), frozenset())
        if info.kind == "pod":
            cands |= pi.get(("ns", info.namespace), frozenset())
            for ix, cks in pi.items():
                if ix[0] == "nss" and ix[1].matches(info.namespace_labels):
                    cands |= cks
        return [ck for ck in cands if _peer_matches(ck, info)]

    # ----------------------------------------------------------------- rules

    def _fill(self, ip: str, d: Direction, by_peer: dict, deps: Optional[set],
              only: Optional[set[int]] = None) -> list[int]:
        """Write the rules of endpoint ip in direction d into by_peer, for
        every peer identity (then `deps` collects the peers they depend on)
        or only those in `only`; returns the identities that got rules."""
        slot = (ip, d)
        dp, keys = self.plan[slot]
        if not dp.isolated:
            self.program.pop(slot, None)
            return []
        if only is None:
            prog = self.program[slot] = self._program(
                self.local[ip], d, [self.policies[k] for k in keys])
        else:
            prog = self.program[slot]
        want = self._want(d, prog, only, deps)
        for ident, per_policy in want.items():
            by_peer[(d, ident)] = self._bucket(per_policy, dp.audit)
        return list(want)

    def _bucket(self, per_policy: Mapping[int, PortSet], audit: bool) -> dict[PortKey, RuleValue]:
        """The rules of one peer identity, from what each policy admits of it.

        Most identities of a slot, and most slots, get the same few inputs
        (every pod of a namespace, every endpoint selected by the same
        policies), so each distinct input is computed once and its bucket
        shared: buckets are never modified once made (every writer copies).
        A shared bucket also lets the diff see an unchanged peer by identity.
        """
        sig = (audit, tuple(sorted(per_policy.items(), key=_first)))
        b = self._buckets.get(sig)
        if b is None:
            if len(self._buckets) >= _BUCKET_MEMO_MAX:
                self._buckets.clear()
            b = self._buckets[sig] = {k: RuleValue(pids, audit)
                                      for k, pids in _lpm_entries(per_policy).items()}
        return b

    def _program(self, pod: Pod, d: Direction, compiled: list[NetworkPolicy]) -> tuple:
        """The rules of the policies compiled for a pod and direction, as
        (policy id, peer key, ports, named ports to resolve on the peer):
        peer key None for "any peer", ANY_POD for every pod identity."""
        prog = []
        for pol in compiled:
            pid = self.pid[pol.key]
            for rule in (pol.ingress if d == Direction.INGRESS else pol.egress):
                numeric, named = _split_ports(rule)
                if d == Direction.INGRESS:
                    # Named ports resolve on the selected pod, the destination.
                    ps = numeric
                    for name, proto in named:
                        num = _named_port(pod, name, proto)
                        if num is not None:
                            ps = ps.union(PortSet.of(proto, num, num))
                    if not rule.peers:
                        prog.append((pid, None, ps, ()))
                    for peer in rule.peers:
                        prog.append((pid, (pol.namespace, peer), ps, ()))
                    continue
                # Egress: named ports resolve on the destination peer, which
                # only a pod has; towards an ipBlock they match nothing.
                named = tuple(named)
                if not rule.peers:
                    prog.append((pid, None, numeric, ()))
                    if named:
                        prog.append((pid, ANY_POD, PortSet.none(), named))
                for peer in rule.peers:
                    prog.append((pid, (pol.namespace, peer), numeric,
                                 named if peer.ip_block is None else ()))
        return tuple(prog)

    def _want(self, d: Direction, prog: tuple, only: Optional[set[int]],
              deps: Optional[set]) -> dict[int, dict[int, PortSet]]:
        # identity -> policy id -> the ports that policy admits from/to it
        want: dict[int, dict[int, PortSet]] = defaultdict(dict)

        def add(ident: int, pid: int, ps: PortSet) -> None:
            if ps:
                cur = want[ident].get(pid)
                want[ident][pid] = ps if cur is None else cur.union(ps)

        for pid, ck, ps, named in prog:
            if ck is None:
                if only is None:
                    add(ID_ANY, pid, ps)
                continue
            if deps is not None:
                deps.add(ck)
            if ck is ANY_POD:
                pods = (self.pod_idents if only is None else
                        [(i, self.info_by_id[i]) for i in only if i in self.info_by_id])
                for ident, info in pods:
                    add(ident, pid, _resolve(info, named))
                continue
            ids, members = self._peer(ck)
            for ident in (ids if only is None else [i for i in only if i in members]):
                add(ident, pid, ps)
                if named:
                    add(ident, pid, _resolve(self.info_by_id[ident], named))

        if d == Direction.INGRESS:
            # The node reaches its pods whatever the policies say (kubelet
            # probes), under every identity a node address can have.
            for ident in self.host_idents:
                if only is None or ident in only:
                    add(ident, POLICY_HOST, PortSet.all())
        return want

    def _endpoint(self, ip: str, by_peer: dict, flat: Optional[dict]) -> EndpointPolicy:
        if flat is None:
            flat = {PolicyKey(d, ident, *k): v
                    for (d, ident), b in by_peer.items() for k, v in b.items()}
        pod = self.local[ip]
        cfg = EndpointConfig(ingress=self.plan[(ip, Direction.INGRESS)][0],
                             egress=self.plan[(ip, Direction.EGRESS)][0])
        return EndpointPolicy(ip, pod.namespace, pod.name, cfg, flat, by_peer)


# Distinct (policies, ports) inputs kept by _bucket: a node's slots have a
# few thousand at most; past this the memo starts again rather than grow.
_BUCKET_MEMO_MAX = 1 << 14


def _first(t: tuple):
    return t[0]


def _index_key(ck: tuple) -> Optional[tuple]:
    """Where the peer index files a peer: by ipBlock, by namespace (pod
    selector alone), by namespace selector; None for peers matching nothing."""
    ns, peer = ck
    if peer is None:
        return None
    if peer.ip_block is not None:
        return ("block", peer.ip_block)
    if peer.namespace_selector is not None:
        return ("nss", peer.namespace_selector)
    if peer.pod_selector is not None:
        return ("ns", ns)
    return None


def _peer_matches(ck: tuple, info: Identity) -> bool:
    ns, peer = ck
    if peer.ip_block is not None:
        return peer.ip_block in info.blocks
    if info.kind != "pod" or (peer.pod_selector is None and peer.namespace_selector is None):
        return False
    if peer.namespace_selector is None:
        if info.namespace != ns:
            return False
    elif not peer.namespace_selector.matches(info.namespace_labels):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(info.labels)


def _discard(index: dict, key, item) -> None:
    rest = index.get(key, frozenset()) - {item}
    if rest:
        index[key] = rest
    else:
        index.pop(key, None)


def _named_port(pod: Pod, name: str, proto: int) -> Optional[int]:
    for p in pod.ports:
        if p.name == name and proto_number(p.protocol) == proto:
            return p.container_port
    return None


def _split_ports(rule: PolicyRule) -> tuple[PortSet, list[tuple[str, int]]]:
    """A rule's numeric ports as a set, and its named ports still to resolve."""
    if not rule.ports:
        return PortSet.all(), []
    ranges: dict[int, list[tuple[int, int]]] = defaultdict(list)
    named = []
    for pp in rule.ports:
        proto = proto_number(pp.protocol)
        if isinstance(pp.port, str):
            named.append((pp.port, proto))
        elif pp.port is None:
            ranges[proto].append((0, 0xFFFF))
        else:
            end = pp.end_port if pp.end_port is not None else pp.port
            ranges[proto].append((pp.port, max(end, pp.port)))
    return PortSet(ranges=ranges), named


def _resolve(info: Identity, named: list[tuple[str, int]]) -> PortSet:
    ranges: dict[int, list[tuple[int, int]]] = defaultdict(list)
    wanted = set(named)
    for name, proto, num in info.named_ports:
        if (name, proto) in wanted:
            ranges[proto].append((num, num))
    return PortSet(ranges=ranges)


def _lpm_entries(per_policy: Mapping[int, PortSet]) -> dict[PortKey, tuple[int, ...]]:
    """LPM keys whose longest match names every policy admitting the packet.

    Each policy's set becomes its minimal keys; a key then also carries the
    policies of every key covering it (the longest match must speak for the
    shorter ones it hides), and a key adding nothing to the key it would fall
    back to is dropped.
    """
    raw: dict[PortKey, set[int]] = defaultdict(set)
    for pid, ps in per_policy.items():
        for k in ps.keys():
            raw[k].add(pid)
    if len(raw) == 1:
        return {k: tuple(sorted(p)) for k, p in raw.items()}
    # Only prefix lengths some key of the same protocol has can cover a key.
    lens: dict[int, list[int]] = defaultdict(list)
    for proto, _, plen in raw:
        lens[proto].append(plen)
    lens = {p: sorted(set(v), reverse=True) for p, v in lens.items()}
    has_any = ANY_KEY in raw

    def covering(k: PortKey) -> list[PortKey]:
        """Keys of `raw` strictly covering k, most specific first."""
        proto, port, plen = k
        out = []
        if proto != ANY_KEY[0]:
            for l in lens[proto]:
                if l < plen:
                    a = (proto, port & ~(block_size(l) - 1) & 0xFFFF, l)
                    if a in raw:
                        out.append(a)
            if has_any:
                out.append(ANY_KEY)
        return out

    out = {}
    merged: dict[PortKey, tuple[int, ...]] = {}
    parents: dict[PortKey, list[PortKey]] = {k: covering(k) for k in raw}
    for k, pids in raw.items():
        s = set(pids)
        for a in parents[k]:
            s |= raw[a]
        merged[k] = tuple(sorted(s))
    for k, pids in merged.items():
        up = parents[k]
        if not up or merged[up[0]] != pids:
            out[k] = pids
    return out
