"""Services + EndpointSlices -> the frontends this node translates, and to what.

This is the decision half of the kube-proxy replacement. Given the cluster
state (`agent.k8s.store.Snapshot`), this node's name and its zone, it says for
every (VIP, port, protocol) which backends a new connection may be sent to,
whether the frontend must reject, and with which session affinity. The
reconciler (`agent.lb.reconcile`) turns two such answers into map writes;
nothing here knows about maps or ids.

The choices are kube-proxy's, so that replacing kube-proxy changes nothing a
workload can observe:

- a Service port's backends come from the EndpointSlice ports carrying the
  same name and protocol; the slice's port number is the backend port (the
  EndpointSlice controller resolved targetPort, by number or by name, per pod,
  which is why one named port may map to different numbers in different
  slices);
- ready endpoints only; when none is ready anywhere, endpoints that are
  serving and terminating;
- terminating endpoints not chosen above are *draining*: no new connection
  goes to them, but the flows already on them keep their backend (the
  datapath keeps a draining backend for them; kube-proxy likewise leaves
  established connections to a terminating pod alone);
- internalTrafficPolicy Local: only this node's endpoints (ready, else
  serving+terminating), topology ignored;
- topology: when every ready endpoint carries a node hint and one names this
  node, only those; else when every ready endpoint carries a zone hint and one
  names this node's zone, only those; else all. The EndpointSlice controller
  writes the hints for trafficDistribution (PreferClose/PreferSameZone,
  PreferSameNode) and for the topology-mode annotation, so the hints alone
  decide here, as in kube-proxy;
- headless and ExternalName Services and Services labelled for another
  proxy (service.kubernetes.io/service-proxy-name) are not translated;
- each family on its own: a Service's IPv4 ClusterIP gets the backends of
  its IPv4 EndpointSlices, its IPv6 ClusterIP those of its IPv6 slices (a
  dual-stack Service has both frontends, each with its own answer), and
  so do its node-facing frontends: the NodePort addresses, external IPs,
  load-balancer IPs and loadBalancerSourceRanges of each family go with
  that family's ClusterIP and backends (kube-proxy's per-family filtering:
  a family the source ranges name no prefix of is not filtered);
- node-facing frontends: each `nodePort` on each of this node's NodePort
  addresses (kube-proxy's --nodeport-addresses), each external IP, each
  load-balancer IP in VIP mode;
- traffic from this node's own sockets and pods to an external address
  (ExternalIP, load-balancer IP, NodePort) uses the cluster-wide set
  whatever externalTrafficPolicy says (kube-proxy's short-circuit of pod
  and node traffic); traffic arriving from outside (SCOPE_EXTERNAL) honours
  externalTrafficPolicy Local: this node's endpoints only;
- no usable endpoint anywhere: reject (ICMP unreachable, ECONNREFUSED);
  endpoints exist but none this traffic policy may use on this node: drop
  (kube-proxy's nftables mode; internalTrafficPolicy Local included).

Where fastpath deliberately differs (deterministic tie-breaks, no masquerade
on VPC-native routing) is listed in docs/services.md.

Pure module: no kubernetes client, prometheus, grpc or kernel imports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Optional

from agent.k8s.model import Endpoint, EndpointSlice, Key, Service, ServicePort

__all__ = [
    "Backend", "Frontend", "FrontendState", "KIND_CLUSTER_IP", "KIND_EXTERNAL_IP",
    "KIND_LOAD_BALANCER", "KIND_NODE_PORT", "KIND_HOST_PORT", "KINDS",
    "SCOPE_INTERNAL", "SCOPE_EXTERNAL", "LbOptions", "HealthCheck",
    "DEFAULT_AFFINITY_TIMEOUT", "TOPOLOGY_SAME_NODE",
    "TOPOLOGY_SAME_ZONE", "compile_service", "compile_services", "describe", "with_sole",
    "translated", "ip_sort_key", "health_check", "kind_rank", "FAMILY", "FAMILY6", "family_of",
]

KIND_CLUSTER_IP = "clusterip"
KIND_NODE_PORT = "nodeport"
KIND_EXTERNAL_IP = "externalip"
KIND_LOAD_BALANCER = "loadbalancer"
KIND_HOST_PORT = "hostport"
KINDS = (KIND_CLUSTER_IP, KIND_NODE_PORT, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, KIND_HOST_PORT)

# Which clients an entry is for (fp_svc4_key.scope). An internal entry
# serves this node's own sockets and pods, and traffic from outside too when
# the frontend has no external entry of its own; an external entry serves
# only traffic arriving on the node's interfaces (primary NIC and ENIs).
SCOPE_INTERNAL = 0
SCOPE_EXTERNAL = 1

# What the API server defaults sessionAffinityConfig.clientIP.timeoutSeconds
# to; repeated here only for Service objects built without the parser.
DEFAULT_AFFINITY_TIMEOUT = 10800

TOPOLOGY_SAME_NODE = "PreferSameNode"
TOPOLOGY_SAME_ZONE = "PreferSameZone"

# The address families translated, as EndpointSlice.addressType spells them.
# Frontends and backends are plain text: a family is a filter, not a type.
FAMILY = "IPv4"
FAMILY6 = "IPv6"


def family_of(ip: str) -> str:
    return FAMILY6 if ":" in ip else FAMILY


def _is_v4(ip: str) -> bool:
    return ":" not in ip


def ip_sort_key(ip: str) -> tuple[int, bytes]:
    """Numeric order for IPv4 and IPv6 text (IPv4 first), not string order."""
    if ":" in ip:
        return (6, socket.inet_pton(socket.AF_INET6, ip))
    return (4, socket.inet_pton(socket.AF_INET, ip))


@dataclass(frozen=True, slots=True)
class Frontend:
    """An address a client connects to: one per Service port per service IP
    (and per scope, when clients from outside get another answer)."""

    ip: str
    port: int
    protocol: str                 # TCP, UDP, SCTP
    scope: int = SCOPE_INTERNAL

    def sort_key(self):
        return (ip_sort_key(self.ip), self.port, self.protocol, self.scope)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        tail = " (external)" if self.scope == SCOPE_EXTERNAL else ""
        return f"{host}:{self.port}/{self.protocol}{tail}"


@dataclass(frozen=True, slots=True)
class Backend:
    """One endpoint address for one Service port."""

    ip: str
    port: int
    protocol: str
    # Chosen through the serving+terminating fallback: the endpoint is going
    # away but is the best there is.
    terminating: bool = False
    node_name: str = ""
    zone: str = ""

    @property
    def key(self) -> tuple[str, int, str]:
        """What identifies a backend in the maps (one backend id per key)."""
        return (self.ip, self.port, self.protocol)

    def sort_key(self):
        return (ip_sort_key(self.ip), self.port, self.protocol)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class FrontendState:
    """What a frontend translates to.

    backends: in numeric (ip, port) order, so equal inputs give equal states
    and the reconciler's minimal diff is not disturbed by slice order.
    reject: no usable endpoint anywhere; the datapath must refuse the
    connection (ECONNREFUSED / ICMP unreachable), never let it time out.
    drop: endpoints exist, but the traffic policy leaves none for this
    node's clients of this entry (internalTrafficPolicy Local, or
    externalTrafficPolicy Local for traffic from outside): packets are
    dropped, as kube-proxy does.
    draining: terminating endpoints new connections must not choose, kept
    for the flows already on them (numeric order, none of `backends`).
    local_only: a Local traffic policy was applied to this frontend.
    topology: which hints narrowed the set ("" none, PreferSameZone,
    PreferSameNode); for inspection, the backends already reflect it.
    maglev: new flows choose by the Maglev table (external entries, when
    configured), not at random.
    source_ranges: loadBalancerSourceRanges of a load-balancer frontend
    (canonical CIDRs, sorted); other sources are dropped.
    sole: a node-facing frontend's internal entry that has no external
    twin (with_sole): traffic from outside takes it without looking for one.
    """

    service: Key
    port_name: str
    backends: tuple[Backend, ...]
    affinity_timeout: int = 0     # seconds; 0 = no ClientIP affinity
    reject: bool = False
    local_only: bool = False
    kind: str = KIND_CLUSTER_IP
    topology: str = ""
    draining: tuple[Backend, ...] = ()
    drop: bool = False
    maglev: bool = False
    source_ranges: tuple[str, ...] = ()
    sole: bool = False


@dataclass(frozen=True, slots=True)
class LbOptions:
    """What this node's configuration says about Services (pure data; the
    agent fills it from agent.config and the node's addresses).

    nodeport_ips: the addresses NodePorts are served on (kube-proxy's
    --nodeport-addresses, resolved; agent/lb/nodeaddr.py).
    maglev: external entries choose backends by Maglev instead of at random.
    """

    nodeport_ips: tuple[str, ...] = ()
    node_port: bool = True
    external_ips: bool = True
    in_cluster_lb: bool = True
    session_affinity: bool = True
    topology: bool = True
    maglev: bool = False


DEFAULT_OPTIONS = LbOptions()


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A healthCheckNodePort this node answers (externalTrafficPolicy Local
    Services of type LoadBalancer), and how many local endpoints it reports."""

    service: Key
    port: int
    local_endpoints: int


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Hold the cyclic collector off while building many acyclic objects.

    A full compile or plan allocates hundreds of thousands of objects, none
    in a cycle; every few hundred allocations would otherwise let the
    collector walk the whole heap (the cluster state included), which costs
    more than the work itself. Reference counting still frees everything.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ------------------------------------------------------------- endpoints

# One deduplicated endpoint of one Service port: (address, slice port, the
# Endpoint, whether it is on this node). Plain tuples: a full compile builds
# hundreds of thousands of them.
_Ep = tuple[str, int, Endpoint, bool]


def _rank(ep: _Ep) -> tuple[bool, bool, bool]:
    # When slices disagree about one address (an endpoint moving between
    # slices), prefer the copy that says local (as kube-proxy does), then the
    # more usable one; kube-proxy's own choice here depends on map iteration
    # order, ours must not.
    e = ep[2]
    return (ep[3], e.ready, e.serving and e.terminating)


def _endpoints_for_port(sp: ServicePort, slices: Iterable[EndpointSlice],
                        node_name: str, ip_keys: dict[str, tuple],
                        family: str = FAMILY) -> list[_Ep]:
    """Every distinct (address, port) the slices offer for this Service port,
    in numeric (address, port) order.

    A Service port is matched to slice ports by name and protocol, never by
    number: the slice port number is the already-resolved targetPort.
    """
    found: dict[tuple[str, int], _Ep] = {}
    v6 = family == FAMILY6
    for s in slices:
        if s.address_type != family:
            continue
        port = None
        for p in s.ports:
            if p.name == sp.name and p.protocol == sp.protocol and p.port:
                port = p.port
                break
        if port is None:
            continue
        for e in s.endpoints:
            if not e.addresses:
                continue
            # Endpoint addresses are fungible by API contract; consumers use
            # the first.
            ip = e.addresses[0]
            if (":" in ip) != v6:
                continue
            ep = (ip, port, e, e.node_name == node_name and bool(node_name))
            prev = found.get((ip, port))
            if prev is None or _rank(ep) > _rank(prev):
                found[(ip, port)] = ep
    eps = list(found.values())
    if len(eps) > 1:
        for ip, _, _, _ in eps:
            if ip not in ip_keys:
                ip_keys[ip] = ip_sort_key(ip)
        eps.sort(key=lambda ep: (ip_keys[ep[0]], ep[1]))
    return eps


def _topology_mode(eps: list[_Ep], node_name: str, zone: str) -> str:
    """Which hints to honour: all ready endpoints must carry one of the kind,
    and at least one must name this node (zone); otherwise hints are ignored."""
    any_ready = False
    all_node, for_node = True, False
    all_zone, for_zone = True, False
    for ep in eps:
        e = ep[2]
        if not e.ready:
            continue
        any_ready = True
        if not e.hints_nodes:
            all_node = False
        elif node_name and node_name in e.hints_nodes:
            for_node = True
        if not e.hints_zones:
            all_zone = False
        elif zone and zone in e.hints_zones:
            for_zone = True
    if not any_ready:
        return ""
    if all_node and for_node:
        return TOPOLOGY_SAME_NODE
    if all_zone and for_zone:
        return TOPOLOGY_SAME_ZONE
    return ""


def _cluster_endpoints(eps: list[_Ep], node_name: str, zone: str,
                       topology: bool = True) -> tuple[list[_Ep], str]:
    mode = _topology_mode(eps, node_name, zone) if topology else ""
    if mode == TOPOLOGY_SAME_NODE:
        out = [ep for ep in eps if ep[2].ready and node_name in ep[2].hints_nodes]
    elif mode == TOPOLOGY_SAME_ZONE:
        out = [ep for ep in eps if ep[2].ready and zone in ep[2].hints_zones]
    else:
        out = [ep for ep in eps if ep[2].ready]
    if out:
        return out, mode
    # No ready endpoint anywhere (a topology mode always leaves at least one
    # ready endpoint, so topology plays no part in this fallback).
    return [ep for ep in eps if ep[2].serving and ep[2].terminating], ""


def _local_endpoints(eps: list[_Ep]) -> list[_Ep]:
    out = [ep for ep in eps if ep[3] and ep[2].ready]
    if out:
        return out
    return [ep for ep in eps if ep[3] and ep[2].serving and ep[2].terminating]


def _backends(eps: list[_Ep], protocol: str) -> tuple[Backend, ...]:
    # eps is already in backend order.
    return tuple([Backend(ip, port, protocol, e.terminating, e.node_name, e.zone)
                  for ip, port, e, _ in eps])


def _draining(eps: list[_Ep], chosen: tuple[Backend, ...], protocol: str) -> tuple[Backend, ...]:
    """Terminating endpoints new connections do not get: their flows stay."""
    if not any(ep[2].terminating for ep in eps):
        return ()
    taken = {(b.ip, b.port) for b in chosen}
    return tuple([Backend(ip, port, protocol, True, e.node_name, e.zone)
                  for ip, port, e, _ in eps if e.terminating and (ip, port) not in taken])


# --------------------------------------------------------------- services

def translated(svc: Service, proxy_name: str = "") -> bool:
    """Whether fastpath translates this Service at all.

    proxy_name: Services labelled service.kubernetes.io/service-proxy-name
    belong to the proxy of that name; with the default "" fastpath, like
    kube-proxy, takes only the unlabelled ones.
    """
    if svc.type == "ExternalName" or svc.headless:
        return False
    if svc.service_proxy_name != proxy_name:
        return False
    return bool(svc.cluster_ips)


def _external_frontends(svc: Service, sp: ServicePort, options: LbOptions,
                        family: str = FAMILY) -> list[tuple[str, str, bool]]:
    """(address, kind, in_cluster) of one Service port's node-facing
    frontends of one address family. in_cluster: whether this node's
    sockets and pods get it translated too (a load-balancer IP with
    in-cluster load balancing off is left to reach the load balancer)."""
    v4 = family == FAMILY
    out: list[tuple[str, str, bool]] = []
    if options.node_port and sp.node_port and svc.type in ("NodePort", "LoadBalancer"):
        out += [(ip, KIND_NODE_PORT, True) for ip in options.nodeport_ips if _is_v4(ip) == v4]
    if options.external_ips:
        out += [(ip, KIND_EXTERNAL_IP, True) for ip in svc.external_ips if _is_v4(ip) == v4]
    # A load balancer in Proxy mode must receive the traffic itself (it may
    # terminate TLS or enforce policy): short-circuiting its IP would skip it.
    out += [(i.ip, KIND_LOAD_BALANCER, options.in_cluster_lb)
            for i in svc.load_balancer_ingress
            if i.ip and i.ip_mode == "VIP" and _is_v4(i.ip) == v4]
    return out


def kind_rank(kind: str) -> int:
    """Which frontend wins an address:port several claim: a ClusterIP, then a
    NodePort, then an external or load-balancer IP, then a hostPort."""
    return KINDS.index(kind) if kind != KIND_LOAD_BALANCER else KINDS.index(KIND_EXTERNAL_IP)


def compile_service(svc: Service, slices: Iterable[EndpointSlice], node_name: str,
                    node_zone: str, proxy_name: str = "",
                    _ip_keys: Optional[dict] = None,
                    options: LbOptions = DEFAULT_OPTIONS) -> dict[Frontend, FrontendState]:
    """The frontends of one Service, given its EndpointSlices.

    For callers that recompile only the Services a change touched; the result
    for a Service does not depend on any other object.
    """
    if not translated(svc, proxy_name):
        return {}
    slices = tuple(slices)
    affinity = 0
    if svc.session_affinity == "ClientIP" and options.session_affinity:
        affinity = svc.session_affinity_timeout or DEFAULT_AFFINITY_TIMEOUT
    ranges = tuple(sorted(set(svc.load_balancer_source_ranges),
                          key=lambda c: (ip_sort_key(c.split("/")[0]), c)))
    ip_keys = {} if _ip_keys is None else _ip_keys

    out: dict[Frontend, FrontendState] = {}
    for cluster_ip in svc.cluster_ips:
        _compile_family(svc, cluster_ip, slices, node_name, node_zone, ip_keys, options,
                        affinity, ranges, out)
    return out


def _compile_family(svc: Service, cluster_ip: str, slices: tuple[EndpointSlice, ...],
                    node_name: str, node_zone: str, ip_keys: dict, options: LbOptions,
                    affinity: int, ranges: tuple[str, ...],
                    out: dict[Frontend, FrontendState]) -> None:
    """The frontends of one family of `svc`: its ClusterIP of that family
    and its node-facing frontends of that family, with the backends of the
    slices of that family. `ranges` are both families'; a load-balancer
    frontend gets its own family's."""
    family = family_of(cluster_ip)
    ranges = tuple(c for c in ranges if family_of(c) == family)
    itp_local = svc.internal_traffic_policy == "Local"
    etp_local = svc.external_traffic_policy == "Local"
    for sp in svc.ports:
        eps = _endpoints_for_port(sp, slices, node_name, ip_keys, family)
        cluster, mode = _cluster_endpoints(eps, node_name, node_zone if options.topology else "",
                                           options.topology)
        cluster_b = _backends(cluster, sp.protocol)
        # kube-proxy's hasEndpoints: anything usable anywhere. Without it a
        # frontend rejects; with it, a policy that leaves this node nothing
        # drops.
        usable = bool(cluster_b)
        if itp_local:
            internal_b = _backends(_local_endpoints(eps), sp.protocol)
            internal_mode = ""
        else:
            internal_b, internal_mode = cluster_b, mode
        out[Frontend(cluster_ip, sp.port, sp.protocol)] = FrontendState(
            svc.key, sp.name, internal_b, affinity, not usable,
            itp_local, KIND_CLUSTER_IP, internal_mode, _draining(eps, internal_b, sp.protocol),
            drop=usable and not internal_b)

        externals = _external_frontends(svc, sp, options, family)
        if not externals:
            continue
        if etp_local:
            outside_b = _backends(_local_endpoints(eps), sp.protocol)
            outside_mode = ""
        else:
            outside_b, outside_mode = cluster_b, mode
        for ip, kind, in_cluster in externals:
            port = sp.node_port if kind == KIND_NODE_PORT else sp.port
            fr = ranges if kind == KIND_LOAD_BALANCER else ()
            # This node's sockets and pods: the cluster-wide set, whatever
            # the traffic policies (kube-proxy's short-circuit).
            inside = FrontendState(svc.key, sp.name, cluster_b, affinity, not usable, False,
                                   kind, mode, _draining(eps, cluster_b, sp.protocol),
                                   source_ranges=fr)
            outside = FrontendState(svc.key, sp.name, outside_b, affinity, not usable,
                                    etp_local, kind, outside_mode,
                                    _draining(eps, outside_b, sp.protocol),
                                    drop=usable and not outside_b,
                                    maglev=options.maglev and bool(outside_b), source_ranges=fr)
            fe = Frontend(ip, port, sp.protocol)
            if in_cluster:
                out.setdefault(fe, inside)
            if not in_cluster or outside != inside:
                out.setdefault(Frontend(ip, port, sp.protocol, SCOPE_EXTERNAL), outside)


def health_check(svc: Service, slices: Iterable[EndpointSlice], node_name: str,
                 proxy_name: str = "") -> Optional[HealthCheck]:
    """The healthCheckNodePort this node serves for `svc`, if any.

    kube-proxy serves one for every Service it proxies that has one (the API
    server allocates it for type LoadBalancer with externalTrafficPolicy
    Local). It reports the number of distinct addresses of ready endpoints on
    this node, over all the Service's ports: terminating endpoints still
    serve their flows, but a node that has only those must fail the check so
    that the load balancer stops sending new ones.
    """
    if not translated(svc, proxy_name) or not svc.health_check_node_port:
        return None
    if svc.external_traffic_policy != "Local":
        return None
    # The family of the Service's primary ClusterIP: a node's local
    # endpoints are counted once, not once per family.
    family = family_of(svc.cluster_ips[0])
    local: set[str] = set()
    for s in slices:
        if s.address_type != family:
            continue
        for e in s.endpoints:
            if e.addresses and e.ready and node_name and e.node_name == node_name:
                local.add(e.addresses[0])
    return HealthCheck(svc.key, svc.health_check_node_port, len(local))


def compile_services(snapshot, node_name: str, node_zone: str,
                     proxy_name: str = "",
                     options: LbOptions = DEFAULT_OPTIONS) -> dict[Frontend, FrontendState]:
    """Every frontend of every translated Service in the snapshot.

    node_name: this node as Endpoint.nodeName spells it ("" = no endpoint is
    local). node_zone: its topology.kubernetes.io/zone ("" = zone hints never
    apply). When two Services claim one frontend (a shared external IP, or a
    hand-written manifest reusing a ClusterIP), the kinds rank (kind_rank: a
    ClusterIP first) and otherwise the Service first in (namespace, name)
    order wins, so the outcome never depends on the order objects arrived in.
    """
    with no_cyclic_gc():
        return _compile_all(snapshot, node_name, node_zone, proxy_name, options)


def _compile_all(snapshot, node_name: str, node_zone: str,
                 proxy_name: str, options: LbOptions) -> dict[Frontend, FrontendState]:
    services: Mapping[Key, Service] = snapshot.services
    claims: dict[Frontend, tuple[tuple, FrontendState]] = {}
    ip_keys: dict[str, tuple] = {}
    for key in sorted(services):
        svc = services[key]
        if not translated(svc, proxy_name):
            continue
        slices = snapshot.endpoint_slices_for(svc.namespace, svc.name)
        for fe, st in compile_service(svc, slices, node_name, node_zone, proxy_name,
                                      ip_keys, options).items():
            rank = (kind_rank(st.kind), key)
            cur = claims.get(fe)
            if cur is None or rank < cur[0]:
                claims[fe] = (rank, st)
    out = {fe: st for fe, (_, st) in claims.items()}
    for fe, st in out.items():
        out[fe] = with_sole(fe, st, out)
    return out


def with_sole(fe: Frontend, st: FrontendState, desired: Mapping) -> FrontendState:
    """`st` with `sole` as the whole set of frontends `desired` makes it: a
    node-facing frontend's internal entry without an external twin (the
    datapath then skips the twin's lookup for every packet from outside)."""
    sole = (fe.scope == SCOPE_INTERNAL and st.kind != KIND_CLUSTER_IP
            and Frontend(fe.ip, fe.port, fe.protocol, SCOPE_EXTERNAL) not in desired)
    return st if st.sole == sole else dataclasses.replace(st, sole=sole)


def describe(state: FrontendState) -> str:
    """One line for logs and the CLI."""
    ns, name = state.service
    port = f":{state.port_name}" if state.port_name else ""
    if state.reject:
        what = "reject"
    elif state.drop:
        what = "drop (no endpoint for this traffic policy here)"
    else:
        what = ", ".join(f"{b}{' (terminating)' if b.terminating else ''}"
                         for b in state.backends)
    extra = []
    if state.local_only:
        extra.append("local")
    if state.topology:
        extra.append(state.topology)
    if state.draining:
        extra.append("draining " + ", ".join(str(b) for b in state.draining))
    if state.affinity_timeout:
        extra.append(f"affinity {state.affinity_timeout}s")
    if state.maglev:
        extra.append("maglev")
    if state.source_ranges:
        extra.append("from " + ", ".join(state.source_ranges))
    tail = f" [{', '.join(extra)}]" if extra else ""
    return f"{ns}/{name}{port} ({state.kind}) -> {what}{tail}"
