"""The typed, immutable view of the Kubernetes objects fastpath consumes.

Everything the services compiler (kube-proxy semantics) and the NetworkPolicy
compiler read comes from these classes, whichever source filled the store (the
Kubernetes API or a manifest directory). They are frozen dataclasses holding
only tuples, frozensets and `FrozenMap`s, so a snapshot can be handed to any
thread without copying and objects can be compared to suppress no-op updates.

Only the fields fastpath decides on are kept; everything else in the API
object (status conditions, managedFields, most of spec) is dropped at parse
time, which is what keeps 50,000 pods affordable in memory. Defaults the API
server would fill in (targetPort = port, TCP, Cluster traffic policies,
EndpointSlice condition fallbacks) are resolved here once, so consumers never
re-implement them.

This module is pure: no kubernetes client, prometheus, grpc or kernel imports.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Optional, Union


class Kind(enum.StrEnum):
    NAMESPACE = "Namespace"
    POD = "Pod"
    NODE = "Node"
    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    NETWORK_POLICY = "NetworkPolicy"


# Order in which kinds are listed and reported; dependencies first so that a
# consumer reading an initial sync sees namespaces before what lives in them.
ALL_KINDS: tuple[Kind, ...] = (
    Kind.NAMESPACE, Kind.NODE, Kind.POD, Kind.SERVICE,
    Kind.ENDPOINT_SLICE, Kind.NETWORK_POLICY,
)

CLUSTER_SCOPED = frozenset({Kind.NAMESPACE, Kind.NODE})


class Action(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


# (namespace, name); namespace is "" for cluster-scoped kinds.
Key = tuple[str, str]

PROTOCOLS = frozenset({"TCP", "UDP", "SCTP"})

# Well-known labels and annotations fastpath reads.
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_ZONE = "topology.kubernetes.io/zone"
LABEL_ZONE_LEGACY = "failure-domain.beta.kubernetes.io/zone"
ANNOTATION_EGRESS_BANDWIDTH = "kubernetes.io/egress-bandwidth"
ANNOTATION_INGRESS_BANDWIDTH = "kubernetes.io/ingress-bandwidth"
# Directory mode only: where a hand-written Pod manifest may put its IPs when
# it has no status (see agent/k8s/README-section.md).
ANNOTATION_POD_IPS = "fastpath.io/pod-ips"
# On a Pod or a Namespace: "disabled" keeps socket-LB away from the pod's
# sockets (translated per packet instead); "enabled" on a Pod overrides its
# Namespace.
ANNOTATION_SOCKET_LB = "fastpath.io/socket-lb"
# On a NetworkPolicy: "true" audits it (would-be drops reported, not enforced).
ANNOTATION_POLICY_AUDIT = "fastpath.io/audit"


class FrozenMap(Mapping[str, str]):
    """A read-only, hashable str -> str mapping (labels, annotations, selectors)."""

    __slots__ = ("_d", "_h")

    def __init__(self, items: Union[Mapping[str, str], None] = None):
        self._d: dict[str, str] = dict(items) if items else {}
        self._h: Optional[int] = None

    def __getitem__(self, k: str) -> str:
        return self._d[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, k: object) -> bool:
        return k in self._d

    def get(self, k, default=None):
        return self._d.get(k, default)

    def __hash__(self) -> int:
        if self._h is None:
            self._h = hash(frozenset(self._d.items()))
        return self._h

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._d == other._d
        if isinstance(other, Mapping):
            return self._d == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"

    def to_dict(self) -> dict[str, str]:
        return dict(self._d)


EMPTY_MAP = FrozenMap()


# ---------------------------------------------------------------- selectors

@dataclass(frozen=True, slots=True)
class LabelRequirement:
    key: str
    operator: str                 # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "Exists":
            return self.key in labels
        if op == "DoesNotExist":
            return self.key not in labels
        v = labels.get(self.key)
        if op == "In":
            return v is not None and v in self.values
        # NotIn also matches objects that do not carry the key at all, as the
        # API server's selector semantics define.
        return v is None or v not in self.values


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """metav1.LabelSelector; the empty selector matches everything."""

    match_labels: FrozenMap = EMPTY_MAP
    match_expressions: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        return all(r.matches(labels) for r in self.match_expressions)

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


# ------------------------------------------------------------------ objects

class ClusterScoped:
    """An object without a namespace: its key is ("", name)."""
    __slots__ = ()

    @property
    def namespace(self) -> str:
        return ""

    @property
    def key(self) -> "Key":
        return ("", self.name)


class Namespaced:
    """An object in a namespace: its key is (namespace, name)."""
    __slots__ = ()

    @property
    def key(self) -> "Key":
        return (self.namespace, self.name)


# ---------------------------------------------------------------- Namespace

@dataclass(frozen=True, slots=True)
class Namespace(ClusterScoped):
    name: str
    labels: FrozenMap = EMPTY_MAP
    annotations: FrozenMap = EMPTY_MAP
    uid: str = ""
    resource_version: str = field(default="", compare=False)

    kind = Kind.NAMESPACE


# ---------------------------------------------------------------------- Pod

@dataclass(frozen=True, slots=True)
class ContainerPort:
    container_port: int
    protocol: str = "TCP"
    name: str = ""
    host_port: int = 0            # 0 = no hostPort
    host_ip: str = ""             # "" = all host addresses


@dataclass(frozen=True, slots=True)
class Pod(Namespaced):
    namespace: str
    name: str
    labels: FrozenMap = EMPTY_MAP
    annotations: FrozenMap = EMPTY_MAP
    node_name: str = ""
    ips: tuple[str, ...] = ()     # canonical text; status.podIPs order (primary first)
    host_network: bool = False
    phase: str = ""               # Pending/Running/Succeeded/Failed/Unknown; "" if unset
    deleting: bool = False        # metadata.deletionTimestamp is set
    ports: tuple[ContainerPort, ...] = ()
    uid: str = ""
    resource_version: str = field(default="", compare=False)

    kind = Kind.POD

    @property
    def is_terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def host_ports(self) -> tuple[ContainerPort, ...]:
        return tuple(p for p in self.ports if p.host_port)

    def named_port(self, name: str, protocol: str = "TCP") -> Optional[int]:
        """Resolve a named container port, as NetworkPolicy named ports do."""
        for p in self.ports:
            if p.name == name and p.protocol == protocol:
                return p.container_port
        return None


# --------------------------------------------------------------------- Node

@dataclass(frozen=True, slots=True)
class NodeAddress:
    type: str                     # InternalIP, ExternalIP, Hostname, InternalDNS, ExternalDNS
    address: str


@dataclass(frozen=True, slots=True)
class Node(ClusterScoped):
    name: str
    labels: FrozenMap = EMPTY_MAP
    addresses: tuple[NodeAddress, ...] = ()
    zone: str = ""                # topology.kubernetes.io/zone (legacy label as fallback)
    pod_cidrs: tuple[str, ...] = ()
    uid: str = ""
    resource_version: str = field(default="", compare=False)

    kind = Kind.NODE

    def ips(self, type_: Optional[str] = None) -> tuple[str, ...]:
        """Addresses that are IPs (InternalIP/ExternalIP), optionally of one type."""
        return tuple(a.address for a in self.addresses
                     if a.type in ("InternalIP", "ExternalIP")
                     and (type_ is None or a.type == type_))


# ------------------------------------------------------------------ Service

@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    protocol: str = "TCP"
    name: str = ""
    target_port: Union[int, str] = 0  # number, or a container port name
    node_port: int = 0            # 0 = none allocated
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class LoadBalancerIngress:
    ip: str = ""
    hostname: str = ""
    # "VIP" (default) or "Proxy": with Proxy the node must not short-circuit
    # traffic to this IP, it has to go to the load balancer.
    ip_mode: str = "VIP"


@dataclass(frozen=True, slots=True)
class Service(Namespaced):
    namespace: str
    name: str
    type: str = "ClusterIP"       # ClusterIP, NodePort, LoadBalancer, ExternalName
    cluster_ips: tuple[str, ...] = ()   # empty when headless or ExternalName
    headless: bool = False        # clusterIP: None
    ports: tuple[ServicePort, ...] = ()
    selector: Optional[FrozenMap] = None  # None: endpoints are managed by someone else
    external_ips: tuple[str, ...] = ()
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    session_affinity: str = "None"      # None or ClientIP
    session_affinity_timeout: int = 0   # seconds; 10800 by default with ClientIP
    internal_traffic_policy: str = "Cluster"
    external_traffic_policy: str = ""   # Cluster/Local for NodePort/LoadBalancer, else ""
    health_check_node_port: int = 0
    traffic_distribution: str = ""      # e.g. PreferClose; "" if unset
    service_proxy_name: str = ""        # service.kubernetes.io/service-proxy-name label
    publish_not_ready_addresses: bool = False
    external_name: str = ""
    ip_families: tuple[str, ...] = ()   # IPv4/IPv6, in clusterIPs' order
    ip_family_policy: str = ""          # SingleStack, PreferDualStack, RequireDualStack; "" unset
    labels: FrozenMap = EMPTY_MAP
    uid: str = ""
    resource_version: str = field(default="", compare=False)

    kind = Kind.SERVICE

    @property
    def load_balancer_ips(self) -> tuple[str, ...]:
        return tuple(i.ip for i in self.load_balancer_ingress if i.ip)


# ------------------------------------------------------------ EndpointSlice

@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    # Resolved as the API documents: ready unset -> True; serving unset ->
    # same as ready; terminating unset -> False.
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    hints_zones: tuple[str, ...] = ()   # hints.forZones[].name
    hints_nodes: tuple[str, ...] = ()   # hints.forNodes[].name
    hostname: str = ""
    # targetRef (the Pod behind the address) is checked by the parser but
    # not kept: nothing reads it, and with 100,000 endpoints it was 11 MB
    # of the agent (bench/agent_memory.py)


@dataclass(frozen=True, slots=True)
class EndpointPort:
    port: Optional[int] = None    # None: all ports (only meaningful without a Service port)
    protocol: str = "TCP"
    name: str = ""
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSlice(Namespaced):
    namespace: str
    name: str
    address_type: str             # IPv4, IPv6, FQDN
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()
    service_name: str = ""        # kubernetes.io/service-name label, "" if absent
    managed_by: str = ""
    labels: FrozenMap = EMPTY_MAP
    uid: str = ""
    resource_version: str = field(default="", compare=False)

    kind = Kind.ENDPOINT_SLICE

    @property
    def service_key(self) -> Optional[Key]:
        return (self.namespace, self.service_name) if self.service_name else None


# ------------------------------------------------------------ NetworkPolicy

@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: str                      # canonical network form
    except_: tuple[str, ...] = ()  # canonical, each a strict subset of cidr


@dataclass(frozen=True, slots=True)
class PolicyPeer:
    """One from/to entry. Either ip_block, or one/both selectors.

    pod_selector None with a namespace_selector means all pods of the selected
    namespaces; namespace_selector None with a pod_selector means the policy's
    own namespace.
    """

    pod_selector: Optional[LabelSelector] = None
    namespace_selector: Optional[LabelSelector] = None
    ip_block: Optional[IPBlock] = None


@dataclass(frozen=True, slots=True)
class PolicyPort:
    protocol: str = "TCP"
    port: Union[int, str, None] = None   # None: all ports; str: a named container port
    end_port: Optional[int] = None       # inclusive; only with a numeric port


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """An ingress or egress rule; empty ports = all ports, empty peers = all peers."""

    ports: tuple[PolicyPort, ...] = ()
    peers: tuple[PolicyPeer, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkPolicy(Namespaced):
    namespace: str
    name: str
    pod_selector: LabelSelector = LabelSelector()
    # Always resolved: Ingress, plus Egress when egress rules exist and the
    # object did not say otherwise (the API server's defaulting).
    policy_types: tuple[str, ...] = ("Ingress",)
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    labels: FrozenMap = EMPTY_MAP
    uid: str = ""
    resource_version: str = field(default="", compare=False)
    annotations: FrozenMap = EMPTY_MAP

    kind = Kind.NETWORK_POLICY

    @property
    def audited(self) -> bool:
        return self.annotations.get(ANNOTATION_POLICY_AUDIT, "").lower() == "true"

    @property
    def affects_ingress(self) -> bool:
        return "Ingress" in self.policy_types

    @property
    def affects_egress(self) -> bool:
        return "Egress" in self.policy_types


Object = Union[Namespace, Pod, Node, Service, EndpointSlice, NetworkPolicy]

KIND_CLASSES: dict[Kind, type] = {
    Kind.NAMESPACE: Namespace, Kind.POD: Pod, Kind.NODE: Node,
    Kind.SERVICE: Service, Kind.ENDPOINT_SLICE: EndpointSlice,
    Kind.NETWORK_POLICY: NetworkPolicy,
}


def object_name(kind: str, key: Key) -> str:
    """How logs and status name an object: ns/name, or name if cluster-scoped."""
    ns, name = key
    return f"{ns}/{name}" if ns else name
