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
- headless and ExternalName Services, Services labelled for another proxy
  (service.kubernetes.io/service-proxy-name) and Services without an IPv4
  ClusterIP are not translated.

Where fastpath deliberately differs (reject instead of drop for Local with no
local endpoint, deterministic tie-breaks) is listed in README-section.md.

Pure module: no kubernetes client, prometheus, grpc or kernel imports.
"""
from __future__ import annotations

import contextlib
import gc
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Optional

from agent.k8s.model import Endpoint, EndpointSlice, Key, Service, ServicePort

__all__ = [
    "Backend", "Frontend", "FrontendState", "KIND_CLUSTER_IP", "KIND_EXTERNAL_IP",
    "KIND_LOAD_BALANCER", "KINDS", "DEFAULT_AFFINITY_TIMEOUT", "TOPOLOGY_SAME_NODE",
    "TOPOLOGY_SAME_ZONE", "compile_service", "compile_services", "describe",
    "translated", "ip_sort_key",
]

KIND_CLUSTER_IP = "clusterip"
KIND_EXTERNAL_IP = "externalip"
KIND_LOAD_BALANCER = "loadbalancer"
KINDS = (KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER)

# What the API server defaults sessionAffinityConfig.clientIP.timeoutSeconds
# to; repeated here only for Service objects built without the parser.
DEFAULT_AFFINITY_TIMEOUT = 10800

TOPOLOGY_SAME_NODE = "PreferSameNode"
TOPOLOGY_SAME_ZONE = "PreferSameZone"

# The address family this build translates. Frontends and backends are plain
# text so that IPv6 needs a second family here, not new types.
FAMILY = "IPv4"


def _is_v4(ip: str) -> bool:
    return ":" not in ip


def ip_sort_key(ip: str) -> tuple[int, bytes]:
    """Numeric order for IPv4 and IPv6 text (IPv4 first), not string order."""
    if ":" in ip:
        return (6, socket.inet_pton(socket.AF_INET6, ip))
    return (4, socket.inet_pton(socket.AF_INET, ip))


@dataclass(frozen=True, slots=True)
class Frontend:
    """An address a client connects to: one per Service port per service IP."""

    ip: str
    port: int
    protocol: str                 # TCP, UDP, SCTP

    def sort_key(self):
        return (ip_sort_key(self.ip), self.port, self.protocol)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


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
    reject: no usable endpoint; the datapath must refuse the connection
    (ECONNREFUSED / ICMP unreachable), never let it time out.
    draining: terminating endpoints new connections must not choose, kept
    for the flows already on them (numeric order, none of `backends`).
    local_only: internalTrafficPolicy Local was applied to this frontend.
    topology: which hints narrowed the set ("" none, PreferSameZone,
    PreferSameNode); for inspection, the backends already reflect it.
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
                        node_name: str, ip_keys: dict[str, tuple]) -> list[_Ep]:
    """Every distinct (address, port) the slices offer for this Service port,
    in numeric (address, port) order.

    A Service port is matched to slice ports by name and protocol, never by
    number: the slice port number is the already-resolved targetPort.
    """
    found: dict[tuple[str, int], _Ep] = {}
    for s in slices:
        if s.address_type != FAMILY:
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
            if ":" in ip:
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


def _cluster_endpoints(eps: list[_Ep], node_name: str, zone: str) -> tuple[list[_Ep], str]:
    mode = _topology_mode(eps, node_name, zone)
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
    return any(_is_v4(ip) for ip in svc.cluster_ips)


def compile_service(svc: Service, slices: Iterable[EndpointSlice], node_name: str,
                    node_zone: str, proxy_name: str = "",
                    _ip_keys: Optional[dict] = None) -> dict[Frontend, FrontendState]:
    """The frontends of one Service, given its EndpointSlices.

    For callers that recompile only the Services a change touched; the result
    for a Service does not depend on any other object.
    """
    if not translated(svc, proxy_name):
        return {}
    slices = tuple(slices)
    cluster_ip = next(ip for ip in svc.cluster_ips if _is_v4(ip))
    externals: list[tuple[str, str]] = [
        (ip, KIND_EXTERNAL_IP) for ip in svc.external_ips if _is_v4(ip)]
    # A load balancer in Proxy mode must receive the traffic itself (it may
    # terminate TLS or enforce policy): short-circuiting its IP would skip it.
    externals += [(i.ip, KIND_LOAD_BALANCER) for i in svc.load_balancer_ingress
                  if i.ip and i.ip_mode == "VIP" and _is_v4(i.ip)]
    affinity = 0
    if svc.session_affinity == "ClientIP":
        affinity = svc.session_affinity_timeout or DEFAULT_AFFINITY_TIMEOUT
    itp_local = svc.internal_traffic_policy == "Local"
    ip_keys = {} if _ip_keys is None else _ip_keys

    out: dict[Frontend, FrontendState] = {}
    for sp in svc.ports:
        eps = _endpoints_for_port(sp, slices, node_name, ip_keys)
        cluster, mode = _cluster_endpoints(eps, node_name, node_zone)
        cluster_b = _backends(cluster, sp.protocol)
        if itp_local:
            internal_b = _backends(_local_endpoints(eps), sp.protocol)
            internal_mode = ""
        else:
            internal_b, internal_mode = cluster_b, mode
        out[Frontend(cluster_ip, sp.port, sp.protocol)] = FrontendState(
            svc.key, sp.name, internal_b, affinity, not internal_b, itp_local,
            KIND_CLUSTER_IP, internal_mode, _draining(eps, internal_b, sp.protocol))
        # External addresses as seen from this node's own sockets and pods
        # (the only clients socket-LB and from-pod translate): kube-proxy
        # sends those to the cluster-wide set whatever the traffic policies.
        for ip, kind in externals:
            out.setdefault(Frontend(ip, sp.port, sp.protocol), FrontendState(
                svc.key, sp.name, cluster_b, affinity, not cluster_b, False, kind, mode,
                _draining(eps, cluster_b, sp.protocol)))
    return out


def compile_services(snapshot, node_name: str, node_zone: str,
                     proxy_name: str = "") -> dict[Frontend, FrontendState]:
    """Every frontend of every translated Service in the snapshot.

    node_name: this node as Endpoint.nodeName spells it ("" = no endpoint is
    local). node_zone: its topology.kubernetes.io/zone ("" = zone hints never
    apply). When two Services claim one frontend (a shared external IP, or a
    hand-written manifest reusing a ClusterIP), a ClusterIP beats an external
    address and otherwise the Service first in (namespace, name) order wins,
    so the outcome never depends on the order objects arrived in.
    """
    with no_cyclic_gc():
        return _compile_all(snapshot, node_name, node_zone, proxy_name)


def _compile_all(snapshot, node_name: str, node_zone: str,
                 proxy_name: str) -> dict[Frontend, FrontendState]:
    services: Mapping[Key, Service] = snapshot.services
    out: dict[Frontend, FrontendState] = {}
    externals: list[tuple[Frontend, FrontendState]] = []
    ip_keys: dict[str, tuple] = {}
    for key in sorted(services):
        svc = services[key]
        if not translated(svc, proxy_name):
            continue
        slices = snapshot.endpoint_slices_for(svc.namespace, svc.name)
        for fe, st in compile_service(svc, slices, node_name, node_zone, proxy_name,
                                      ip_keys).items():
            if st.kind == KIND_CLUSTER_IP:
                out.setdefault(fe, st)
            else:
                externals.append((fe, st))
    for fe, st in externals:
        out.setdefault(fe, st)
    return out


def describe(state: FrontendState) -> str:
    """One line for logs and the CLI."""
    ns, name = state.service
    port = f":{state.port_name}" if state.port_name else ""
    if state.reject:
        what = "reject"
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
    tail = f" [{', '.join(extra)}]" if extra else ""
    return f"{ns}/{name}{port} ({state.kind}) -> {what}{tail}"
