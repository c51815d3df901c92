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

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Optional, Union

from agent.k8s.model import FrozenMap, IPBlock, Key, NetworkPolicy, Pod, PolicyPeer, PolicyRule
from agent.k8s.store import Snapshot
from agent.policy import ip4
from agent.policy.ports import ANY_KEY, PortKey, PortSet, block_size, proto_number
from agent.policy.state import (
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
                   *, previous: Optional[PolicyState] = None) -> PolicyState:
    """Compile the policy of node `node_name`.

    `audited` names the NetworkPolicies in audit mode, as (namespace, name)
    keys or "namespace/name": whoever reads the `fastpath.io/audit`
    annotation passes them here. `previous`, the state currently in the
    maps, keeps identity and policy ids stable so that a change rewrites
    only what it changes.
    """
    return _Compiler(snapshot, node_name, node_ips, Mode(mode),
                     frozenset(policy_name(k) for k in audited), previous).run()


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


def _usable_pods(snapshot: Snapshot, node_ips: frozenset[str]) -> dict[str, Pod]:
    """IPv4 -> the pod that owns it. Host-network pods have no identity of their
    own (their address is the node's); terminal pods and pods without an IPv4
    address cannot send or receive. Two live pods claiming one IP (a stale
    object during IP reuse) resolve to the running, not-deleting one."""
    best: dict[str, tuple[tuple, Pod]] = {}
    for p in snapshot.pods.values():
        if p.host_network or p.is_terminal:
            continue
        ip = next((a for a in p.ips if ip4.is_ip4(a)), None)
        if ip is None or ip in node_ips:
            continue
        rank = (_PHASE_RANK.get(p.phase, 3), p.deleting, p.namespace, p.name)
        cur = best.get(ip)
        if cur is None or rank < cur[0]:
            best[ip] = (rank, p)
    return {ip: p for ip, (_, p) in best.items()}


class _Compiler:
    def __init__(self, snap: Snapshot, node_name: str, node_ips: Iterable[str], mode: Mode,
                 audited: frozenset[str], previous: Optional[PolicyState]):
        self.snap = snap
        self.node_name = node_name
        self.node_ips = tuple(sorted({ip for ip in node_ips if ip4.is_ip4(ip)}))
        self.mode = mode
        self.audited = audited
        self.previous = previous
        self._ns_labels: dict[str, FrozenMap] = {}

    def ns_labels(self, ns: str) -> FrozenMap:
        m = self._ns_labels.get(ns)
        if m is None:
            labels = self.snap.namespace_labels(ns)
            if NAMESPACE_NAME_LABEL not in labels:
                labels = {**dict(labels), NAMESPACE_NAME_LABEL: ns}
            m = self._ns_labels[ns] = FrozenMap(labels)
        return m

    # ------------------------------------------------------------------ run

    def run(self) -> PolicyState:
        snap = self.snap
        prev = self.previous
        policies = sorted(snap.network_policies.values(), key=lambda p: p.key)
        pol_ids = _allocate((policy_name(p.key) for p in policies),
                            {n: i for i, n in prev.policies.items()} if prev else {},
                            {v: k for k, v in RESERVED_POLICIES.items()}, POLICY_DYNAMIC_MIN)
        self.pid = {p.key: pol_ids[policy_name(p.key)] for p in policies}
        policy_table = {i: n for n, i in pol_ids.items()}

        pods = _usable_pods(snap, frozenset(self.node_ips))
        local = sorted(((ip, p) for ip, p in pods.items() if p.node_name == self.node_name),
                       key=lambda t: ip4.to_int(t[0]))

        if self.mode == Mode.NEVER:
            return PolicyState(
                mode=self.mode, node_name=self.node_name, node_ips=self.node_ips,
                identities={HOST_IDENTITY.name: ID_HOST, WORLD_IDENTITY.name: ID_WORLD},
                identity_info={ID_HOST: HOST_IDENTITY, ID_WORLD: WORLD_IDENTITY},
                ipcache={}, ipcache_policies={},
                endpoints={ip: EndpointPolicy(ip, p.namespace, p.name, EndpointConfig(), {})
                           for ip, p in local},
                policies=policy_table, audited=self.audited)

        by_ns: dict[str, list[NetworkPolicy]] = defaultdict(list)
        for p in policies:
            by_ns[p.namespace].append(p)

        # 1. Isolation per endpoint and direction, and which policies' rules count.
        plan: list[tuple[str, Pod, Direction, DirectionPolicy, list[NetworkPolicy]]] = []
        for ip, pod in local:
            for d in Direction:
                enforced, audit = [], []
                for pol in by_ns.get(pod.namespace, ()):
                    affects = pol.affects_ingress if d == Direction.INGRESS else pol.affects_egress
                    if affects and pol.pod_selector.matches(pod.labels):
                        (audit if policy_name(pol.key) in self.audited else enforced).append(pol)
                if enforced or self.mode == Mode.ALWAYS:
                    deciding = tuple(sorted(self.pid[p.key] for p in enforced)) or (POLICY_ALWAYS,)
                    dp, compiled = DirectionPolicy(True, False, deciding), enforced
                elif audit:
                    # An audited policy can only ever add allows to a direction
                    # an enforced policy already isolates, so its rules matter
                    # (as would-be drops) only where nothing enforced selects.
                    dp = DirectionPolicy(False, True, tuple(sorted(self.pid[p.key] for p in audit)))
                    compiled = audit
                else:
                    dp, compiled = DirectionPolicy(), []
                plan.append((ip, pod, d, dp, compiled))

        # 2. Identities, from what the compiled rules can ask about a peer.
        blocks: set[IPBlock] = set()
        named_refs: set[tuple[str, int]] = set()
        block_policies: dict[IPBlock, set[int]] = defaultdict(set)
        for _, _, d, _, compiled in plan:
            for pol in compiled:
                for rule in (pol.ingress if d == Direction.INGRESS else pol.egress):
                    for peer in rule.peers:
                        b = peer.ip_block
                        if b is not None and ip4.is_ip4(b.cidr):
                            blocks.add(b)
                            block_policies[b].add(self.pid[pol.key])
                    if d == Direction.EGRESS:
                        for pp in rule.ports:
                            if isinstance(pp.port, str):
                                named_refs.add((pp.port, proto_number(pp.protocol)))
        self._build_cidrs(blocks)

        ident_of_ip: dict[str, Identity] = {}
        for ip, pod in pods.items():
            ports = tuple(sorted(
                (name, proto, num) for name, proto in named_refs
                if (num := _named_port(pod, name, proto)) is not None))
            ident_of_ip[ip] = Identity("pod", pod.namespace, pod.labels,
                                       self.ns_labels(pod.namespace),
                                       self.blocks_of(ip4.to_int(ip), 32), ports)
        for ip in self.node_ips:
            ident_of_ip[ip] = Identity("host", blocks=self.blocks_of(ip4.to_int(ip), 32))
        cidr_ident = {pfx: (Identity("cidr", blocks=sig) if sig else WORLD_IDENTITY)
                      for pfx, sig in self.cidr_entries.items()}

        all_idents = set(ident_of_ip.values()) | set(cidr_ident.values())
        names = _allocate((i.name for i in all_idents), prev.identities if prev else {},
                          {HOST_IDENTITY.name: ID_HOST, WORLD_IDENTITY.name: ID_WORLD},
                          ID_DYNAMIC_MIN)
        self.id_of = {i: names[i.name] for i in all_idents}
        self.id_of[HOST_IDENTITY] = ID_HOST
        self.id_of[WORLD_IDENTITY] = ID_WORLD
        identity_info = {self.id_of[i]: i for i in all_idents | {HOST_IDENTITY, WORLD_IDENTITY}}

        # Most specific last, so a pod's /32 overrides an ipBlock prefix and a
        # node address overrides both.
        ipcache: dict[str, int] = {}
        ipcache_policies: dict[str, tuple[int, ...]] = {}
        for (plen, net), ident in sorted(cidr_ident.items()):
            text = ip4.prefix_text(plen, net)
            ipcache[text] = self.id_of[ident]
            ipcache_policies[text] = tuple(sorted(
                pid for b in self.prefix_blocks[(plen, net)] for pid in block_policies[b]))
        for ip in sorted(ident_of_ip, key=ip4.to_int):
            ipcache[f"{ip}/32"] = self.id_of[ident_of_ip[ip]]

        self.pod_idents = sorted({(self.id_of[i], i) for i in ident_of_ip.values()
                                  if i.kind == "pod"}, key=lambda t: t[0])
        self.pod_idents_by_ns: dict[str, list[tuple[int, Identity]]] = defaultdict(list)
        for t in self.pod_idents:
            self.pod_idents_by_ns[t[1].namespace].append(t)
        self.block_members: dict[IPBlock, list[int]] = defaultdict(list)
        for ident, i in sorted(identity_info.items()):
            for b in i.blocks:
                self.block_members[b].append(ident)
        # Only identities a node address really has: with no node address
        # known there is nothing to allow.
        self.host_idents = sorted({self.id_of[ident_of_ip[ip]] for ip in self.node_ips})
        self.info_by_id = dict(self.pod_idents)
        self._peer_cache: dict[tuple[str, PolicyPeer], tuple[int, ...]] = {}

        # 3. Rules.
        endpoints: dict[str, EndpointPolicy] = {}
        acc: dict[str, tuple[list[DirectionPolicy], dict[PolicyKey, RuleValue]]] = {}
        enforced_ids: set[int] = set()
        for ip, pod, d, dp, compiled in plan:
            dps, rules = acc.setdefault(ip, ([], {}))
            dps.append(dp)
            if dp.isolated:
                new = self._rules(pod, d, dp, compiled)
                rules.update(new)
                if dp.enforced:
                    enforced_ids.update(k.identity for k in new)
        for ip, pod in local:
            dps, rules = acc[ip]
            endpoints[ip] = EndpointPolicy(ip, pod.namespace, pod.name,
                                           EndpointConfig(ingress=dps[0], egress=dps[1]), rules)

        state = PolicyState(
            mode=self.mode, node_name=self.node_name, node_ips=self.node_ips,
            identities={i.name: n for n, i in identity_info.items()},
            identity_info=identity_info, ipcache=ipcache, ipcache_policies=ipcache_policies,
            endpoints=endpoints, policies=policy_table, audited=self.audited)
        # Known here for free; diff asks for it on every change.
        state._cache["enforced_ids"] = frozenset(enforced_ids)
        return state

    # -------------------------------------------------------------- ipBlocks

    def _build_cidrs(self, blocks: set[IPBlock]) -> None:
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
            parsed.append((b, ip4.parse_prefix(b.cidr),
                           [e for e in map(ip4.parse_prefix, b.except_) if e is not None]))
        bounds: dict[tuple[int, int], set[IPBlock]] = defaultdict(set)
        for b, cidr, excepts in parsed:
            bounds[cidr].add(b)
            for e in excepts:
                bounds[e].add(b)
        sig: dict[tuple[int, int], frozenset[IPBlock]] = {}
        for p in bounds:
            sig[p] = frozenset(
                b for b, cidr, excepts in parsed
                if ip4.contains(cidr, p) and not any(ip4.contains(e, p) for e in excepts))
        self.boundaries = sig
        self.prefix_blocks = bounds
        self.boundary_lens = sorted({p[0] for p in sig}, reverse=True)
        self.cidr_entries = {}
        for p in sorted(sig):
            if sig[p] != self.blocks_of(p[1], p[0], strictly_shorter=True):
                self.cidr_entries[p] = sig[p]

    def blocks_of(self, addr: int, plen: int, strictly_shorter: bool = False) -> frozenset[IPBlock]:
        for l in self.boundary_lens:
            if l > plen or (strictly_shorter and l == plen):
                continue
            s = self.boundaries.get((l, addr & ip4.mask(l)))
            if s is not None:
                return s
        return frozenset()

    # ----------------------------------------------------------------- peers

    def peer_identities(self, pol: NetworkPolicy, peer: PolicyPeer) -> tuple[int, ...]:
        ck = (pol.namespace, peer)
        hit = self._peer_cache.get(ck)
        if hit is not None:
            return hit
        if peer.ip_block is not None:
            out = tuple(self.block_members.get(peer.ip_block, ()))
        elif peer.pod_selector is None and peer.namespace_selector is None:
            # The API refuses an empty peer; matching nothing never widens access.
            out = ()
        else:
            if peer.namespace_selector is None:
                cands = self.pod_idents_by_ns.get(pol.namespace, [])
            else:
                nss = peer.namespace_selector
                cands = [t for t in self.pod_idents if nss.matches(t[1].namespace_labels)]
            ps = peer.pod_selector
            out = tuple(i for i, ident in cands if ps is None or ps.matches(ident.labels))
        self._peer_cache[ck] = out
        return out

    # ----------------------------------------------------------------- rules

    def _rules(self, pod: Pod, d: Direction, dp: DirectionPolicy,
               compiled: list[NetworkPolicy]) -> dict[PolicyKey, RuleValue]:
        # identity -> policy id -> the ports that policy admits from/to it
        want: dict[int, dict[int, PortSet]] = defaultdict(dict)

        def add(ident: int, pid: int, ps: PortSet) -> None:
            if ps:
                cur = want[ident].get(pid)
                want[ident][pid] = ps if cur is None else cur.union(ps)

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
                        add(ID_ANY, pid, ps)
                    for peer in rule.peers:
                        for ident in self.peer_identities(pol, peer):
                            add(ident, pid, ps)
                    continue
                # Egress: named ports resolve on the destination peer, which
                # only a pod has; towards an ipBlock they match nothing.
                if not rule.peers:
                    add(ID_ANY, pid, numeric)
                    if named:
                        for ident, info in self.pod_idents:
                            add(ident, pid, _resolve(info, named))
                for peer in rule.peers:
                    by_pod = peer.ip_block is None
                    for ident in self.peer_identities(pol, peer):
                        add(ident, pid, numeric)
                        if by_pod and named:
                            add(ident, pid, _resolve(self.info_by_id[ident], named))

        if d == Direction.INGRESS:
            # The node reaches its pods whatever the policies say (kubelet
            # probes), under every identity a node address can have.
            for ident in self.host_idents:
                add(ident, POLICY_HOST, PortSet.all())

        out: dict[PolicyKey, RuleValue] = {}
        for ident, per_policy in want.items():
            for k, pids in _lpm_entries(per_policy).items():
                out[PolicyKey(d, ident, *k)] = RuleValue(pids, dp.audit)
        return out


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
