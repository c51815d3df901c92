"""What the NetworkPolicy compiler produces: the desired content of the
datapath's three policy maps, and the tables that name what those maps hold.

The maps (the BPF side mirrors these shapes; see README-section.md):

  ipcache    LPM trie, IPv4 prefix -> peer identity. Pod /32s, this node's
             IPs, and the ipBlock prefixes where the set of blocks containing
             an address changes. A miss is the reserved identity `world`.
  endpoints  hash, pod IPv4 -> per direction: enforced (default deny),
             audit (would-be default deny), the deciding policy ids.
  rules      LPM trie, (pod IPv4, peer identity, direction) exact, then
             protocol and destination port as a prefix -> the policy ids
             that allow it. Looked up twice per packet: with the peer's
             identity and with identity 0 ("any peer").

A packet therefore costs one ipcache lookup, one endpoint lookup and two rule
lookups per direction, whatever the number of policies, selected pods or
CIDRs. `MapImage` is the flat, mutable picture of the three maps that the
diff's operations are applied to and that `evaluate` reads exactly as the
programs will.
"""
from __future__ import annotations

import enum
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from agent.k8s.model import EMPTY_MAP, FrozenMap, IPBlock
from agent.policy import addr, ip4
from agent.policy.ports import (
    ANY_KEY, PORT_BITS, PROTO_ANY, PROTOCOL_NAMES, PortKey, block_size,
)


class Mode(enum.StrEnum):
    NEVER = "never"       # no enforcement at all (DataPath V2 without NetworkPolicy)
    DEFAULT = "default"   # Kubernetes semantics
    ALWAYS = "always"     # every pod isolated in both directions, allowed only by rules


class Direction(enum.IntEnum):
    INGRESS = 0
    EGRESS = 1

    # An int's hash (Enum's hashes the name, in Python): directions are in
    # every rule key, and equal to their int values anyway.
    __hash__ = int.__hash__

    @property
    def label(self) -> str:
        return self.name.lower()


# Identities. 0 never appears in the ipcache: in a rule key it means "any peer".
ID_ANY = 0
ID_HOST = 1          # this node's own addresses (kubelet probes come from here)
ID_WORLD = 2         # every address no other entry claims (the ipcache miss)
ID_DYNAMIC_MIN = 256

# Policy ids. The reserved ones let every verdict name what decided it even
# when no NetworkPolicy did.
POLICY_NONE = 0
POLICY_HOST = 1      # the node may always reach its pods
POLICY_ALWAYS = 2    # default deny of enforcement mode `always` (no policy selects the pod)
POLICY_PENDING = 3   # default deny of a pod whose labels are not known yet (agent/policy/pending.py)
POLICY_DYNAMIC_MIN = 16
RESERVED_POLICIES = {POLICY_HOST: "reserved:host-allow", POLICY_ALWAYS: "reserved:mode-always",
                     POLICY_PENDING: "reserved:identity-pending"}

# Rule key bits fully matched before protocol and port: endpoint IPv4 (32),
# identity (32), direction (8). The protocol byte follows, then the port.
RULE_FIXED_BITS = 72


DIRECTIONS = (Direction.INGRESS, Direction.EGRESS)   # iterating the enum costs more


class PolicyKey(NamedTuple):
    """One rule of one endpoint: peer identity (0 = any), IP protocol (0 = any,
    then port and prefixlen are 0), and a port block of 2**(16-prefixlen)
    ports starting at `port`."""

    direction: Direction
    identity: int
    protocol: int
    port: int
    prefixlen: int

    @property
    def port_key(self) -> PortKey:
        return (self.protocol, self.port, self.prefixlen)

    @property
    def lpm_prefixlen(self) -> int:
        """The prefixlen of this key in the datapath's LPM trie."""
        if self.protocol == PROTO_ANY:
            return RULE_FIXED_BITS
        return RULE_FIXED_BITS + 8 + self.prefixlen

    def describe(self) -> str:
        if self.protocol == PROTO_ANY:
            what = "any"
        else:
            proto = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
            last = self.port + block_size(self.prefixlen) - 1
            what = f"{proto}/{self.port}" + (f"-{last}" if last != self.port else "")
        return f"{self.direction.label} id={self.identity} {what}"


class RuleValue(NamedTuple):
    """The policies whose rules admit every packet of the key (sorted ids), and
    whether the key belongs to a direction that is only audited."""

    policies: tuple[int, ...]
    audit: bool = False


@dataclass(frozen=True, slots=True)
class DirectionPolicy:
    # Default deny is on: only packets matching a rule pass.
    enforced: bool = False
    # Not enforced, but audited policies select the pod: misses are counted
    # as would-be drops and forwarded.
    audit: bool = False
    # Policy ids whose default deny applies (enforced or audited ones), so a
    # drop or a would-be drop names a policy.
    deciding: tuple[int, ...] = ()

    @property
    def isolated(self) -> bool:
        return self.enforced or self.audit


OPEN = DirectionPolicy()


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """The value of the endpoints map for one pod."""

    ingress: DirectionPolicy = OPEN
    egress: DirectionPolicy = OPEN

    def of(self, direction: Direction) -> DirectionPolicy:
        return self.ingress if direction == 0 else self.egress


@dataclass(frozen=True, eq=False)
class EndpointPolicy:
    """A pod on this node: its endpoint-map value and its rules."""

    ip: str
    namespace: str
    name: str
    config: EndpointConfig
    rules: Mapping[PolicyKey, RuleValue]
    # The same rules grouped by (direction, peer identity) -> port key -> value,
    # as the compiler builds them; None when constructed without (see peer_buckets).
    by_peer: Optional[Mapping[tuple[Direction, int], Mapping[PortKey, RuleValue]]] = field(
        default=None, repr=False)
    # When the compiler patched this endpoint from the previous state's: a
    # weak reference to that one and the groups it rewrote (every other
    # group is the very same object), so a diff need not compare the rest.
    derived: Optional[tuple[weakref.ref, frozenset[tuple[Direction, int]]]] = field(
        default=None, repr=False)

    def peer_buckets(self) -> Mapping[tuple[Direction, int], Mapping[PortKey, RuleValue]]:
        if self.by_peer is not None:
            return self.by_peer
        out: dict[tuple[Direction, int], dict[PortKey, RuleValue]] = {}
        for k, v in self.rules.items():
            out.setdefault((k.direction, k.identity), {})[k.port_key] = v
        object.__setattr__(self, "by_peer", out)
        return out

    @property
    def ingress(self) -> DirectionPolicy:
        return self.config.ingress

    @property
    def egress(self) -> DirectionPolicy:
        return self.config.egress

    def deciding_policies(self, direction: Direction) -> tuple[int, ...]:
        return self.config.of(direction).deciding

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, EndpointPolicy) and self.ip == other.ip
                and self.namespace == other.namespace and self.name == other.name
                and self.config == other.config and dict(self.rules) == dict(other.rules))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Identity:
    """What a peer is, as far as any policy of this node can ask.

    Pods with the same namespace, labels and namespace labels share one
    identity, refined only when a policy could tell them apart otherwise: by
    the ipBlocks their IP falls in (ipBlock peers match pod IPs too) and by
    the numbers of the named ports that egress rules refer to.
    """

    kind: str                                  # pod, host, cidr, world
    namespace: str = ""
    labels: FrozenMap = EMPTY_MAP
    namespace_labels: FrozenMap = EMPTY_MAP
    blocks: frozenset[IPBlock] = frozenset()   # ipBlocks containing the address(es)
    named_ports: tuple[tuple[str, int, int], ...] = ()   # (name, protocol, port)

    @property
    def name(self) -> str:
        def fmt(m: Mapping[str, str]) -> str:
            return ",".join(f"{k}={m[k]}" for k in sorted(m))
        parts = [self.kind]
        if self.kind == "pod":
            parts += [f"ns={self.namespace}", f"labels={{{fmt(self.labels)}}}",
                      f"nslabels={{{fmt(self.namespace_labels)}}}"]
        if self.blocks:
            parts.append("blocks=" + ";".join(sorted(block_text(b) for b in self.blocks)))
        if self.named_ports:
            parts.append("ports=" + ",".join(f"{n}/{p}={v}" for n, p, v in self.named_ports))
        return " ".join(parts)


def block_text(b: IPBlock) -> str:
    return b.cidr + (" except " + ",".join(sorted(b.except_)) if b.except_ else "")


HOST_IDENTITY = Identity("host")
WORLD_IDENTITY = Identity("world")


@dataclass(frozen=True, eq=False)
class PolicyState:
    """The compiled policy of one node (see `compile_policy`)."""

    mode: Mode
    node_name: str
    node_ips: tuple[str, ...]
    identities: Mapping[str, int]            # identity name -> id (reserved included)
    identity_info: Mapping[int, Identity]
    ipcache: Mapping[str, int]               # IPv4 prefix -> identity
    ipcache_policies: Mapping[str, tuple[int, ...]]  # ipBlock prefixes -> policies that need them
    endpoints: Mapping[str, EndpointPolicy]  # pod IPv4 -> its policy
    policies: Mapping[int, str]              # policy id -> "namespace/name" (reserved included)
    audited: frozenset[str] = frozenset()    # "namespace/name" of audited policies
    # (policy "namespace/name", endpoint IPv4) pairs whose rules are left out
    # for lack of map room: the policy isolates the endpoint, admits nothing
    refused: frozenset[tuple[str, str]] = frozenset()
    # IPv6 address of a local pod -> the pod's endpoint key (its IPv4
    # address): what the IPv6 programs find through fp_policy6_pod
    endpoints6: Mapping[str, str] = field(default_factory=dict)
    # Derived data computed on first use (the state itself never changes).
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def policy_ids(self) -> dict[str, int]:
        return {name: pid for pid, name in self.policies.items()}

    def policy_name(self, pid: int) -> str:
        return self.policies.get(pid, f"policy-{pid}")

    def identity_name(self, ident: int) -> str:
        info = self.identity_info.get(ident)
        return info.name if info is not None else f"identity-{ident}"

    def rule_count(self) -> int:
        return sum(len(ep.rules) for ep in self.endpoints.values())

    def image(self) -> "MapImage":
        """A fresh, mutable copy of the three maps as this state fills them."""
        img = MapImage()
        img.endpoints6 = dict(self.endpoints6)
        for prefix, ident in self.ipcache.items():
            img.put_ipcache(prefix, ident)
        for ip, ep in self.endpoints.items():
            img.put_endpoint(ip, ep.config)
            for k, v in ep.rules.items():
                img.put_rule(ip, k, v)
        return img

    def frozen_image(self) -> "MapImage":
        """The same, built once and shared: callers must not modify it."""
        img = self._cache.get("image")
        if img is None:
            img = self._cache["image"] = self.image()
        return img

    def enforced_identities(self) -> frozenset[int]:
        """Identities named by a rule of an enforced direction."""
        ids = self._cache.get("enforced_ids")
        if ids is None:
            ids = self._cache["enforced_ids"] = frozenset(
                k.identity for ep in self.endpoints.values() for k in ep.rules
                if ep.config.of(k.direction).enforced)
        return ids

    def enforces_anything(self) -> bool:
        return any(ep.ingress.enforced or ep.egress.enforced for ep in self.endpoints.values())


_MASKS = [ip4.mask(l) for l in range(33)]
_PORT_MASKS = [(l, ~(block_size(l) - 1) & 0xFFFF) for l in range(PORT_BITS, -1, -1)]


class MapImage:
    """The contents of the ipcache, endpoints and rules maps, with the
    datapath's lookups. Rule keys are (endpoint IPv4, PolicyKey)."""

    __slots__ = ("ipcache", "endpoints", "rules", "_lpm", "_lens", "_lpm6", "_lens6",
                 "endpoints6")

    def __init__(self) -> None:
        self.ipcache: dict[str, int] = {}
        # IPv6 prefixes are in `ipcache` too (their own trie in the datapath,
        # fp_ipcache6_v1); looked up in their own tables here
        self._lpm6: dict[int, dict[int, int]] = {}
        self._lens6: list[int] = []
        # IPv6 address of a pod -> its endpoint key (see PolicyState.endpoints6)
        self.endpoints6: dict[str, str] = {}
        self.endpoints: dict[str, EndpointConfig] = {}
        self.rules: dict[tuple[str, PolicyKey], RuleValue] = {}
        # prefixlen -> {network: identity}; _lens: its keys, longest first.
        self._lpm: dict[int, dict[int, int]] = {}
        self._lens: list[int] = []

    # ------------------------------------------------------------ writes

    def put_ipcache(self, prefix: str, identity: int) -> None:
        p = ip4.parse_prefix(prefix)
        if p is None:
            p = addr.parse_prefix(prefix)
            self.ipcache[prefix] = identity
            if p[0] not in self._lpm6:
                self._lpm6[p[0]] = {}
                self._lens6 = sorted(self._lpm6, reverse=True)
            self._lpm6[p[0]][p[1]] = identity
            return
        self.ipcache[prefix] = identity
        if p[0] not in self._lpm:
            self._lpm[p[0]] = {}
            self._lens = sorted(self._lpm, reverse=True)
        self._lpm[p[0]][p[1]] = identity

    def delete_ipcache(self, prefix: str) -> None:
        p = ip4.parse_prefix(prefix)
        self.ipcache.pop(prefix, None)
        if p is None:
            p = addr.parse_prefix(prefix)
            bucket = self._lpm6.get(p[0])
            if bucket is not None:
                bucket.pop(p[1], None)
                if not bucket:
                    del self._lpm6[p[0]]
                    self._lens6 = sorted(self._lpm6, reverse=True)
            return
        bucket = self._lpm.get(p[0]) if p else None
        if bucket is not None:
            bucket.pop(p[1], None)
            if not bucket:
                del self._lpm[p[0]]
                self._lens = sorted(self._lpm, reverse=True)

    def put_endpoint(self, ip: str, config: EndpointConfig) -> None:
        self.endpoints[ip] = config

    def delete_endpoint(self, ip: str) -> None:
        self.endpoints.pop(ip, None)

    def put_rule(self, ip: str, key: PolicyKey, value: RuleValue) -> None:
        self.rules[(ip, key)] = value

    def delete_rule(self, ip: str, key: PolicyKey) -> None:
        self.rules.pop((ip, key), None)

    # ----------------------------------------------------------- lookups

    def identity_of(self, ip: str) -> int:
        """The ipcache's longest-prefix match; a miss is `world`."""
        if ":" in ip:
            a = addr.to_int(ip)
            for plen in self._lens6:
                hit = self._lpm6[plen].get(a & addr.mask(plen))
                if hit is not None:
                    return hit
            return ID_WORLD
        a = ip4.to_int(ip)
        lpm = self._lpm
        for plen in self._lens:
            hit = lpm[plen].get(a & _MASKS[plen])
            if hit is not None:
                return hit
        return ID_WORLD

    def lookup_rule(self, ip: str, direction: Direction, identity: int, protocol: int,
                    port: int) -> Optional[tuple[PolicyKey, RuleValue]]:
        """The rules map's longest-prefix match for one packet and one identity."""
        # Plain tuples hash and compare equal to the PolicyKeys stored.
        rules = self.rules
        if protocol != PROTO_ANY:
            for plen, pmask in _PORT_MASKS:
                v = rules.get((ip, (direction, identity, protocol, port & pmask, plen)))
                if v is not None:
                    return PolicyKey(direction, identity, protocol, port & pmask, plen), v
        k = PolicyKey(direction, identity, *ANY_KEY)
        v = rules.get((ip, k))
        return (k, v) if v is not None else None
