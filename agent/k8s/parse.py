"""Kubernetes JSON (as dicts) -> fastpath model objects, with the API server's checks.

Both sources hand raw dicts here: the Kubernetes source the decoded JSON of
list and watch responses, the directory source the decoded YAML/JSON
documents. An object that fails a check raises `ValidationError` naming the
kind, the object, the field path and what is wrong; the caller keeps the
previous good version of that object. Nothing here is half-built: an object is
either returned whole or not at all.

The checks are the ones the API server enforces for the fields fastpath uses
(names, label syntax, protocols, port ranges, IP and CIDR syntax, selector
operators, NetworkPolicy peer and endPort rules), so a manifest directory is
held to the same standard as a cluster. Objects coming from a real API server
pass them by construction; running them anyway costs little and means a
corrupted or hostile stream cannot push a malformed entry into the datapath.

Pure module: no kubernetes client, prometheus, grpc or kernel imports.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import sys
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

from agent.k8s.model import (
    ANNOTATION_POD_IPS,
    CLUSTER_SCOPED, EMPTY_MAP, LABEL_MANAGED_BY, LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME, LABEL_ZONE, LABEL_ZONE_LEGACY, PROTOCOLS,
    ContainerPort, Endpoint, EndpointPort, EndpointSlice, FrozenMap, IPBlock,
    Key, Kind, LabelRequirement, LabelSelector, LoadBalancerIngress, Namespace,
    NetworkPolicy, Node, NodeAddress, Object, Pod, PolicyPeer,
    PolicyPort, PolicyRule, Service, ServicePort,
)

_intern = sys.intern
_inet_pton, _inet_ntop = socket.inet_pton, socket.inet_ntop
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


class ValidationError(ValueError):
    """An object (or manifest) fastpath refuses, and exactly why.

    kind: the object's kind ("Manifest" for a file that does not decode);
    name: "namespace/name", "name" or "?" when unknown; field: the JSON path of
    the offending field; origin: the file (directory source) or "" (API).
    """

    def __init__(self, kind: str, name: str, field: str, message: str,
                 origin: str = "", key: Optional[Key] = None):
        self.kind = kind
        self.name = name
        self.field = field
        self.message = message
        self.origin = origin
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" (in {self.origin})" if self.origin else ""
        field = f"{self.field}: " if self.field else ""
        return f"{self.kind} {self.name}: {field}{self.message}{where}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "object": self.name, "field": self.field,
                "message": self.message, "origin": self.origin}


class UnsupportedKind(Exception):
    """A well-formed object of a kind fastpath does not consume (Deployment, ...)."""

    def __init__(self, api_version: str, kind: str):
        self.api_version = api_version
        self.kind = kind
        super().__init__(f"{api_version or '?'} {kind or '?'}")


class _FieldError(Exception):
    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message


API_VERSIONS: dict[Kind, str] = {
    Kind.NAMESPACE: "v1", Kind.POD: "v1", Kind.NODE: "v1", Kind.SERVICE: "v1",
    Kind.ENDPOINT_SLICE: "discovery.k8s.io/v1",
    Kind.NETWORK_POLICY: "networking.k8s.io/v1",
}

# ------------------------------------------------------------ syntax checks

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_LABEL_VALUE = _QUALIFIED_NAME
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_HAS_LETTER = re.compile(r"[a-z]")


def _fail(path: str, message: str):
    raise _FieldError(path, message)


def _check_dns_label(v: str, path: str) -> None:
    if len(v) > 63 or not _DNS_LABEL.match(v):
        _fail(path, f"{v!r} is not a valid DNS-1123 label")


def _check_dns1035_label(v: str, path: str) -> None:
    if len(v) > 63 or not _DNS1035_LABEL.match(v):
        _fail(path, f"{v!r} is not a valid DNS-1035 label")


def _check_dns_subdomain(v: str, path: str) -> None:
    if len(v) > 253 or not _DNS_SUBDOMAIN.match(v):
        _fail(path, f"{v!r} is not a valid DNS-1123 subdomain")


def _check_qualified_name(k: str, path: str) -> None:
    prefix, slash, name = k.rpartition("/")
    if slash:
        if not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix):
            _fail(path, f"key {k!r} has an invalid prefix")
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        _fail(path, f"key {k!r} is not a valid qualified name")


def _check_label_value(v: str, path: str) -> None:
    if v and (len(v) > 63 or not _LABEL_VALUE.match(v)):
        _fail(path, f"{v!r} is not a valid label value")


def _check_port_name(v: str, path: str) -> None:
    # IANA_SVC_NAME: what named container and NetworkPolicy ports must be.
    if (len(v) > 15 or not _IANA_SVC_NAME.match(v) or "--" in v
            or not _HAS_LETTER.search(v)):
        _fail(path, f"{v!r} is not a valid port name (IANA_SVC_NAME)")


# --------------------------------------------------------- typed accessors

def _dict(v: Any, path: str) -> Mapping:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        _fail(path, f"must be an object, got {type(v).__name__}")
    return v


def _list(v: Any, path: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        _fail(path, f"must be a list, got {type(v).__name__}")
    return v


def _str(v: Any, path: str, default: str = "") -> str:
    if v is None:
        return default
    if not isinstance(v, str):
        _fail(path, f"must be a string, got {type(v).__name__}")
    return v


def _bool(v: Any, path: str, default: Optional[bool] = False) -> Optional[bool]:
    if v is None:
        return default
    if not isinstance(v, bool):
        _fail(path, f"must be a boolean, got {type(v).__name__}")
    return v


def _int(v: Any, path: str, lo: int, hi: int, default: Optional[int] = None) -> Optional[int]:
    if v is None:
        return default
    # bool is an int subclass; "true" is never a port.
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(path, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        _fail(path, f"{v} is out of range {lo}..{hi}")
    return v


def _port(v: Any, path: str, required: bool = True) -> Optional[int]:
    if v is None and required:
        _fail(path, "required")
    return _int(v, path, 1, 65535)


def _protocol(v: Any, path: str) -> str:
    p = _str(v, path, "TCP")
    if p not in PROTOCOLS:
        _fail(path, f"unsupported protocol {p!r} (TCP, UDP or SCTP)")
    return p


def _int_or_name(v: Any, path: str) -> int | str:
    if isinstance(v, str):
        _check_port_name(v, path)
        return v
    return _port(v, path)


def _ip(v: Any, path: str) -> str:
    """Canonical text of an IPv4/IPv6 address (RFC 5952 for IPv6).

    inet_pton is the C parser the kernel's users share: strict dotted quads
    (no leading zeros, as the API server requires), no zone index, and twenty
    times faster than the ipaddress module, which matters at 100,000 endpoints.
    """
    if type(v) is str:
        try:
            if ":" in v:
                return _inet_ntop(_AF_INET6, _inet_pton(_AF_INET6, v))
            _inet_pton(_AF_INET, v)
            return v  # a dotted quad inet_pton accepts is already canonical
        except OSError:
            pass
    s = _str(v, path)
    if "%" in s:
        _fail(path, f"{s!r} is not a valid IP address (zone index not allowed)")
    _fail(path, f"{s!r} is not a valid IP address")


def _cidr(v: Any, path: str):
    s = _str(v, path)
    if "/" not in s:
        _fail(path, f"{s!r} is not a valid CIDR (missing prefix length)")
    try:
        # The API server accepts host bits set (10.0.0.1/24) and means the
        # network; keep the canonical network so equal policies compare equal.
        return ipaddress.ip_network(s, strict=False)
    except ValueError:
        _fail(path, f"{s!r} is not a valid CIDR")


def _string_map(v: Any, path: str, check_values: bool) -> FrozenMap:
    m = _dict(v, path)
    if not m:
        return EMPTY_MAP
    out = {}
    for k, val in m.items():
        if not isinstance(k, str):
            _fail(path, f"key {k!r} must be a string")
        _check_qualified_name(k, path)
        if not isinstance(val, str):
            _fail(f"{path}[{k}]", f"must be a string, got {type(val).__name__}")
        if check_values:
            _check_label_value(val, f"{path}[{k}]")
            val = _intern(val)
        out[_intern(k)] = val
    return FrozenMap(out)


def _labels(v: Any, path: str = "metadata.labels") -> FrozenMap:
    return _string_map(v, path, check_values=True)


# Dropped on parse: it repeats the whole object and can be many KiB per pod.
_DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def _annotations(v: Any) -> FrozenMap:
    m = _dict(v, "metadata.annotations")
    if any(a in m for a in _DROPPED_ANNOTATIONS):
        m = {k: val for k, val in m.items() if k not in _DROPPED_ANNOTATIONS}
    return _string_map(m, "metadata.annotations", check_values=False)


def _label_selector(v: Any, path: str) -> LabelSelector:
    d = _dict(v, path)
    for k in d:
        if k not in ("matchLabels", "matchExpressions"):
            _fail(f"{path}.{k}", "unknown field")
    ml = _labels(d.get("matchLabels"), f"{path}.matchLabels")
    reqs = []
    for i, e in enumerate(_list(d.get("matchExpressions"), f"{path}.matchExpressions")):
        p = f"{path}.matchExpressions[{i}]"
        e = _dict(e, p)
        key = _str(e.get("key"), f"{p}.key")
        if not key:
            _fail(f"{p}.key", "required")
        _check_qualified_name(key, f"{p}.key")
        op = _str(e.get("operator"), f"{p}.operator")
        values = _list(e.get("values"), f"{p}.values")
        if op in ("In", "NotIn"):
            if not values:
                _fail(f"{p}.values", f"must be non-empty when operator is {op}")
        elif op in ("Exists", "DoesNotExist"):
            if values:
                _fail(f"{p}.values", f"must be empty when operator is {op}")
        else:
            _fail(f"{p}.operator", f"{op!r} is not a valid operator "
                  "(In, NotIn, Exists, DoesNotExist)")
        for j, val in enumerate(values):
            _check_label_value(_str(val, f"{p}.values[{j}]"), f"{p}.values[{j}]")
        reqs.append(LabelRequirement(_intern(key), op, frozenset(values)))
    return LabelSelector(ml, tuple(reqs))


# ---------------------------------------------------------------- metadata

class _Meta:
    __slots__ = ("namespace", "name", "labels", "uid", "rv", "raw")

    def __init__(self, namespace, name, labels, uid, rv, raw):
        self.namespace = namespace
        self.name = name
        self.labels = labels
        self.uid = uid
        self.rv = rv
        self.raw = raw


def _meta(d: Mapping, kind: Kind, default_namespace: str, name_check) -> _Meta:
    m = _dict(d.get("metadata"), "metadata")
    name = _str(m.get("name"), "metadata.name")
    if not name:
        _fail("metadata.name", "required")
    name_check(name, "metadata.name")
    if kind in CLUSTER_SCOPED:
        ns = ""
    else:
        ns = _str(m.get("namespace"), "metadata.namespace") or default_namespace
        if not ns:
            _fail("metadata.namespace", "required")
        _check_dns_label(ns, "metadata.namespace")
        ns = _intern(ns)
    return _Meta(ns, name, _labels(m.get("labels")),
                 _str(m.get("uid"), "metadata.uid"),
                 _str(m.get("resourceVersion"), "metadata.resourceVersion"), m)


# ---------------------------------------------------------------- per kind

def parse_namespace(d: Mapping, ctx: "_Ctx") -> Namespace:
    md = _meta(d, Kind.NAMESPACE, "", _check_dns_label)
    return Namespace(name=md.name, labels=md.labels,
                     annotations=_annotations(md.raw.get("annotations")),
                     uid=md.uid, resource_version=md.rv)


_QUANTITY_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "m": Decimal("0.001"),
}
_QUANTITY = re.compile(r"([+]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)\Z")


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource.Quantity (10M, 1Gi, 1.5k, 1e6, 500m) as a
    number; ValueError when `text` is not one."""
    mt = _QUANTITY.match(text.strip())
    if not mt or mt.group(2) not in _QUANTITY_SUFFIX:
        raise ValueError(f"{text!r} is not a valid quantity (e.g. 10M, 1Gi)")
    try:
        return Decimal(mt.group(1)) * _QUANTITY_SUFFIX[mt.group(2)]
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a valid quantity") from None


def parse_bandwidth(text: str, path: str) -> int:
    """A resource.Quantity in bits per second, within the kubelet's sane bounds."""
    try:
        bps = int(parse_quantity(text))
    except ValueError as exc:
        _fail(path, str(exc))
    # Same bounds the kubelet applies before it shapes traffic.
    if bps < 1000:
        _fail(path, f"{text!r} is unreasonably small (< 1kbit)")
    if bps > 10**15:
        _fail(path, f"{text!r} is unreasonably large (> 1Pbit)")
    return bps


def _pod_ips(raw_ips: list[str], path: str) -> tuple[str, ...]:
    out: list[str] = []
    fams = set()
    for i, s in enumerate(raw_ips):
        ip = _ip(s, f"{path}[{i}]")
        if ip in out:
            continue
        fam = 6 if ":" in ip else 4
        if fam in fams:
            _fail(f"{path}[{i}]", "at most one IP per address family")
        fams.add(fam)
        out.append(ip)
    return tuple(out)


def parse_pod(d: Mapping, ctx: "_Ctx") -> Pod:
    md = _meta(d, Kind.POD, ctx.default_namespace, _check_dns_subdomain)
    ann = _annotations(md.raw.get("annotations"))
    spec = _dict(d.get("spec"), "spec")
    status = _dict(d.get("status"), "status")

    ports: list[ContainerPort] = []
    for ckey in ("containers", "initContainers"):
        for ci, c in enumerate(_list(spec.get(ckey), f"spec.{ckey}")):
            cpath = f"spec.{ckey}[{ci}]"
            c = _dict(c, cpath)
            for pi, p in enumerate(_list(c.get("ports"), f"{cpath}.ports")):
                pp = f"{cpath}.ports[{pi}]"
                p = _dict(p, pp)
                name = _str(p.get("name"), f"{pp}.name")
                if name:
                    _check_port_name(name, f"{pp}.name")
                host_ip = p.get("hostIP")
                ports.append(ContainerPort(
                    container_port=_port(p.get("containerPort"), f"{pp}.containerPort"),
                    protocol=_protocol(p.get("protocol"), f"{pp}.protocol"),
                    name=_intern(name),
                    host_port=_int(p.get("hostPort"), f"{pp}.hostPort", 0, 65535, 0),
                    host_ip=_ip(host_ip, f"{pp}.hostIP") if host_ip else "",
                ))

    raw_ips = [_dict(e, f"status.podIPs[{i}]").get("ip")
               for i, e in enumerate(_list(status.get("podIPs"), "status.podIPs"))]
    path = "status.podIPs"
    if not raw_ips and status.get("podIP"):
        raw_ips, path = [status["podIP"]], "status.podIP"
    if not raw_ips and ctx.pod_ip_annotation and ann.get(ANNOTATION_POD_IPS):
        raw_ips = [s.strip() for s in ann[ANNOTATION_POD_IPS].split(",") if s.strip()]
        path = f"metadata.annotations[{ANNOTATION_POD_IPS}]"
    ips = _pod_ips(raw_ips, path)

    # Bandwidth and other limit annotations are read by agent.bandwidth: a
    # bad value there leaves the pod unlimited, it never rejects the Pod.

    return Pod(
        namespace=md.namespace, name=md.name, labels=md.labels, annotations=ann,
        node_name=_intern(_str(spec.get("nodeName"), "spec.nodeName")),
        ips=ips,
        host_network=_bool(spec.get("hostNetwork"), "spec.hostNetwork"),
        phase=_intern(_str(status.get("phase"), "status.phase")),
        deleting=md.raw.get("deletionTimestamp") is not None,
        ports=tuple(ports),
        uid=md.uid, resource_version=md.rv,
    )


_NODE_ADDRESS_TYPES = frozenset({"InternalIP", "ExternalIP", "Hostname",
                                 "InternalDNS", "ExternalDNS"})


def parse_node(d: Mapping, ctx: "_Ctx") -> Node:
    md = _meta(d, Kind.NODE, "", _check_dns_subdomain)
    spec = _dict(d.get("spec"), "spec")
    status = _dict(d.get("status"), "status")
    addrs = []
    for i, a in enumerate(_list(status.get("addresses"), "status.addresses")):
        p = f"status.addresses[{i}]"
        a = _dict(a, p)
        t = _str(a.get("type"), f"{p}.type")
        if t not in _NODE_ADDRESS_TYPES:
            _fail(f"{p}.type", f"unknown address type {t!r}")
        addr = _str(a.get("address"), f"{p}.address")
        if t in ("InternalIP", "ExternalIP"):
            addr = _ip(addr, f"{p}.address")
        elif not addr:
            _fail(f"{p}.address", "required")
        addrs.append(NodeAddress(t, addr))
    cidrs = _list(spec.get("podCIDRs"), "spec.podCIDRs")
    cpath = "spec.podCIDRs"
    if not cidrs and spec.get("podCIDR"):
        cidrs, cpath = [spec["podCIDR"]], "spec.podCIDR"
    pod_cidrs = tuple(str(_cidr(c, f"{cpath}[{i}]")) for i, c in enumerate(cidrs))
    zone = md.labels.get(LABEL_ZONE) or md.labels.get(LABEL_ZONE_LEGACY) or ""
    return Node(name=md.name, labels=md.labels, addresses=tuple(addrs), zone=zone,
                pod_cidrs=pod_cidrs, uid=md.uid, resource_version=md.rv)


_SERVICE_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"})
_POLICIES = ("Cluster", "Local")


def _one_of(v: Any, path: str, allowed, default: str) -> str:
    s = _str(v, path, default) or default
    if s not in allowed:
        _fail(path, f"{s!r} is not one of {', '.join(allowed)}")
    return s


_FAMILY_POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")


def _check_families(families: tuple[str, ...], policy: str, cips: list[str]) -> None:
    """The API server's rules tying ipFamilies, ipFamilyPolicy and clusterIPs
    together: a Service whose addresses contradict its families would be
    translated for a family it does not have."""
    if len(families) > 2:
        _fail("spec.ipFamilies", f"at most two families, got {len(families)}")
    if len(families) == 2 and families[0] == families[1]:
        _fail("spec.ipFamilies[1]", f"duplicate family {families[1]}")
    if policy == "SingleStack":
        if len(families) > 1:
            _fail("spec.ipFamilies", "SingleStack allows one family")
        if len(cips) > 1:
            _fail("spec.clusterIPs", "SingleStack allows one ClusterIP")
    for i, ip in enumerate(cips):
        fam = "IPv6" if ":" in ip else "IPv4"
        if i < len(families) and families[i] != fam:
            _fail(f"spec.clusterIPs[{i}]",
                  f"{ip} is an {fam} address, spec.ipFamilies[{i}] is {families[i]}")
        if i >= len(families) and families and len(cips) > len(families):
            _fail(f"spec.clusterIPs[{i}]",
                  f"{ip} has no family in spec.ipFamilies ({', '.join(families)})")


def parse_service(d: Mapping, ctx: "_Ctx") -> Service:
    md = _meta(d, Kind.SERVICE, ctx.default_namespace, _check_dns1035_label)
    spec = _dict(d.get("spec"), "spec")
    status = _dict(d.get("status"), "status")
    typ = _one_of(spec.get("type"), "spec.type", sorted(_SERVICE_TYPES), "ClusterIP")

    cluster_ip = _str(spec.get("clusterIP"), "spec.clusterIP")
    raw_cips = _list(spec.get("clusterIPs"), "spec.clusterIPs")
    if raw_cips and cluster_ip and raw_cips[0] != cluster_ip:
        _fail("spec.clusterIPs[0]", "must match spec.clusterIP")
    if not raw_cips and cluster_ip:
        raw_cips = [cluster_ip]
    headless = False
    cips: list[str] = []
    if typ != "ExternalName":
        if raw_cips and raw_cips[0] == "None":
            if len(raw_cips) > 1:
                _fail("spec.clusterIPs", "'None' must be the only entry")
            if typ != "ClusterIP":
                _fail("spec.clusterIP", f"may not be 'None' for type {typ}")
            headless = True
        else:
            fams = set()
            for i, s in enumerate(raw_cips):
                ip = _ip(s, f"spec.clusterIPs[{i}]")
                fam = ":" in ip
                if fam in fams:
                    _fail(f"spec.clusterIPs[{i}]", "at most one IP per address family")
                fams.add(fam)
                cips.append(ip)

    ports: list[ServicePort] = []
    raw_ports = _list(spec.get("ports"), "spec.ports")
    names, seen = set(), set()
    for i, p in enumerate(raw_ports):
        pp = f"spec.ports[{i}]"
        p = _dict(p, pp)
        name = _str(p.get("name"), f"{pp}.name")
        if name:
            _check_dns_label(name, f"{pp}.name")
        elif len(raw_ports) > 1:
            _fail(f"{pp}.name", "required when the service has more than one port")
        if name in names:
            _fail(f"{pp}.name", f"duplicate port name {name!r}")
        names.add(name)
        port = _port(p.get("port"), f"{pp}.port")
        proto = _protocol(p.get("protocol"), f"{pp}.protocol")
        if (port, proto) in seen:
            _fail(f"{pp}", f"duplicate port {port}/{proto}")
        seen.add((port, proto))
        tp = p.get("targetPort")
        target = port if tp in (None, 0, "") else _int_or_name(tp, f"{pp}.targetPort")
        node_port = _int(p.get("nodePort"), f"{pp}.nodePort", 0, 65535, 0)
        if node_port and typ not in ("NodePort", "LoadBalancer"):
            _fail(f"{pp}.nodePort", f"may not be set for type {typ}")
        ports.append(ServicePort(
            port=port, protocol=proto, name=_intern(name), target_port=target,
            node_port=node_port,
            app_protocol=_str(p.get("appProtocol"), f"{pp}.appProtocol")))
    if not ports and not headless and typ != "ExternalName":
        _fail("spec.ports", "required")

    external_ips = tuple(_ip(s, f"spec.externalIPs[{i}]")
                         for i, s in enumerate(_list(spec.get("externalIPs"), "spec.externalIPs")))
    lb = _dict(status.get("loadBalancer"), "status.loadBalancer")
    ingress = []
    for i, e in enumerate(_list(lb.get("ingress"), "status.loadBalancer.ingress")):
        p = f"status.loadBalancer.ingress[{i}]"
        e = _dict(e, p)
        ip = e.get("ip")
        ingress.append(LoadBalancerIngress(
            ip=_ip(ip, f"{p}.ip") if ip else "",
            hostname=_str(e.get("hostname"), f"{p}.hostname"),
            ip_mode=_one_of(e.get("ipMode"), f"{p}.ipMode", ("VIP", "Proxy"), "VIP")))
    ranges = tuple(str(_cidr(c, f"spec.loadBalancerSourceRanges[{i}]"))
                   for i, c in enumerate(_list(spec.get("loadBalancerSourceRanges"),
                                               "spec.loadBalancerSourceRanges")))

    affinity = _one_of(spec.get("sessionAffinity"), "spec.sessionAffinity",
                       ("None", "ClientIP"), "None")
    timeout = 0
    if affinity == "ClientIP":
        cfg = _dict(_dict(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
                    .get("clientIP"), "spec.sessionAffinityConfig.clientIP")
        timeout = _int(cfg.get("timeoutSeconds"),
                       "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 1, 86400, 10800)

    externally = typ in ("NodePort", "LoadBalancer") or bool(external_ips)
    etp = _str(spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy")
    if etp or externally:
        etp = _one_of(etp, "spec.externalTrafficPolicy", _POLICIES, "Cluster")
    families = tuple(_one_of(f, f"spec.ipFamilies[{i}]", ("IPv4", "IPv6"), "")
                     for i, f in enumerate(_list(spec.get("ipFamilies"), "spec.ipFamilies")))
    policy = _str(spec.get("ipFamilyPolicy"), "spec.ipFamilyPolicy")
    if policy:
        policy = _one_of(policy, "spec.ipFamilyPolicy", _FAMILY_POLICIES, "")
    _check_families(families, policy, cips)
    external_name = _str(spec.get("externalName"), "spec.externalName")
    if typ == "ExternalName":
        if not external_name:
            _fail("spec.externalName", "required for type ExternalName")
        _check_dns_subdomain(external_name.rstrip("."), "spec.externalName")
    selector = spec.get("selector")

    return Service(
        namespace=md.namespace, name=md.name, type=typ, cluster_ips=tuple(cips),
        headless=headless, ports=tuple(ports),
        selector=None if selector is None else _labels(selector, "spec.selector"),
        external_ips=external_ips, load_balancer_ingress=tuple(ingress),
        load_balancer_source_ranges=ranges,
        session_affinity=affinity, session_affinity_timeout=timeout,
        internal_traffic_policy=_one_of(spec.get("internalTrafficPolicy"),
                                        "spec.internalTrafficPolicy", _POLICIES, "Cluster"),
        external_traffic_policy=etp,
        health_check_node_port=_int(spec.get("healthCheckNodePort"),
                                    "spec.healthCheckNodePort", 0, 65535, 0),
        # Kept verbatim: values unknown to this version must not make the
        # whole Service disappear; the compiler treats them as unset.
        traffic_distribution=_str(spec.get("trafficDistribution"), "spec.trafficDistribution"),
        service_proxy_name=md.labels.get(LABEL_SERVICE_PROXY_NAME, ""),
        publish_not_ready_addresses=_bool(spec.get("publishNotReadyAddresses"),
                                          "spec.publishNotReadyAddresses"),
        external_name=external_name, ip_families=families, ip_family_policy=policy,
        labels=md.labels,
        uid=md.uid, resource_version=md.rv,
    )


_ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")


def _names(v: Any, path: str) -> tuple[str, ...]:
    return tuple(_intern(_str(_dict(z, f"{path}[{k}]").get("name"), f"{path}[{k}].name"))
                 for k, z in enumerate(_list(v, path)))


def _endpoint(e: Any, at: str, want_v6: bool) -> Endpoint:
    """One endpoint; error paths are relative (".addresses[0]") for the caller to prefix."""
    if type(e) is not dict:
        e = _dict(e, "")
    raw_addrs = e.get("addresses")
    if type(raw_addrs) is not list:
        raw_addrs = _list(raw_addrs, ".addresses")
    if not 1 <= len(raw_addrs) <= 100:
        _fail(".addresses", "must have 1 to 100 addresses")
    addrs = []
    for j, a in enumerate(raw_addrs):
        if at == "FQDN":
            s = _str(a, f".addresses[{j}]")
            _check_dns_subdomain(s, f".addresses[{j}]")
            addrs.append(s)
            continue
        ip = _ip(a, f".addresses[{j}]")
        if (":" in ip) != want_v6:
            _fail(f".addresses[{j}]", f"{ip} is not an {at} address")
        addrs.append(ip)
    cond = e.get("conditions")
    ready = serving = terminating = None
    if cond:
        cond = _dict(cond, ".conditions")
        ready = _bool(cond.get("ready"), ".conditions.ready", None)
        serving = _bool(cond.get("serving"), ".conditions.serving", None)
        terminating = _bool(cond.get("terminating"), ".conditions.terminating", None)
    ready = True if ready is None else ready
    zones = nodes = ()
    hints = e.get("hints")
    if hints:
        hints = _dict(hints, ".hints")
        zones = _names(hints.get("forZones"), ".hints.forZones")
        nodes = _names(hints.get("forNodes"), ".hints.forNodes")
    tr = e.get("targetRef")
    if tr is not None:          # checked, not kept (agent.k8s.model.Endpoint)
        tr = _dict(tr, ".targetRef")
        for f in ("kind", "namespace", "name"):
            _str(tr.get(f), f".targetRef.{f}")
    hostname = e.get("hostname")
    if hostname is not None:
        hostname = _str(hostname, ".hostname")
        if hostname:
            _check_dns_label(hostname, ".hostname")
    node = e.get("nodeName")
    zone = e.get("zone")
    return Endpoint(
        addresses=tuple(addrs), ready=ready,
        # An unset serving defers to ready, as the API documents.
        serving=ready if serving is None else serving,
        terminating=bool(terminating),
        node_name=_intern(node) if type(node) is str else _str(node, ".nodeName"),
        zone=_intern(zone) if type(zone) is str else _str(zone, ".zone"),
        hints_zones=zones, hints_nodes=nodes, hostname=hostname or "")


def parse_endpoint_slice(d: Mapping, ctx: "_Ctx") -> EndpointSlice:
    md = _meta(d, Kind.ENDPOINT_SLICE, ctx.default_namespace, _check_dns_subdomain)
    at = _str(d.get("addressType"), "addressType")
    if at not in _ADDRESS_TYPES:
        _fail("addressType", f"{at!r} is not one of IPv4, IPv6, FQDN" if at else "required")
    want_v6 = at == "IPv6"
    raw_eps = _list(d.get("endpoints"), "endpoints")
    if len(raw_eps) > 1000:
        _fail("endpoints", f"{len(raw_eps)} endpoints, at most 1000 allowed")
    eps = []
    for i, e in enumerate(raw_eps):
        try:
            eps.append(_endpoint(e, at, want_v6))
        except _FieldError as err:
            # Paths are built only on failure: formatting them for each of
            # 100,000 endpoints would cost more than the parsing.
            raise _FieldError(f"endpoints[{i}]{err.path}", err.message) from None
    ports, names = [], set()
    raw_ports = _list(d.get("ports"), "ports")
    if len(raw_ports) > 100:
        _fail("ports", f"{len(raw_ports)} ports, at most 100 allowed")
    for i, p in enumerate(raw_ports):
        pp = f"ports[{i}]"
        p = _dict(p, pp)
        name = _str(p.get("name"), f"{pp}.name")
        if name:
            _check_dns_label(name, f"{pp}.name")
        if name in names:
            _fail(f"{pp}.name", f"duplicate port name {name!r}")
        names.add(name)
        ports.append(EndpointPort(
            port=_port(p.get("port"), f"{pp}.port", required=False),
            protocol=_protocol(p.get("protocol"), f"{pp}.protocol"),
            name=_intern(name),
            app_protocol=_str(p.get("appProtocol"), f"{pp}.appProtocol")))
    return EndpointSlice(
        namespace=md.namespace, name=md.name, address_type=at,
        endpoints=tuple(eps), ports=tuple(ports),
        service_name=_intern(md.labels.get(LABEL_SERVICE_NAME, "")),
        managed_by=md.labels.get(LABEL_MANAGED_BY, ""),
        labels=md.labels, uid=md.uid, resource_version=md.rv)


def _ip_block(v: Any, path: str) -> IPBlock:
    b = _dict(v, path)
    if not b.get("cidr"):
        _fail(f"{path}.cidr", "required")
    net = _cidr(b["cidr"], f"{path}.cidr")
    excepts = []
    for i, e in enumerate(_list(b.get("except"), f"{path}.except")):
        ep = f"{path}.except[{i}]"
        ex = _cidr(e, ep)
        if ex.version != net.version or not ex.subnet_of(net) or ex.prefixlen <= net.prefixlen:
            _fail(ep, f"{e} must be a strict subset of cidr {b['cidr']}")
        excepts.append(str(ex))
    return IPBlock(str(net), tuple(excepts))


def _peer(v: Any, path: str) -> PolicyPeer:
    d = _dict(v, path)
    ps, ns, ipb = d.get("podSelector"), d.get("namespaceSelector"), d.get("ipBlock")
    if ipb is not None and (ps is not None or ns is not None):
        _fail(path, "may not specify both ipBlock and another peer")
    if ipb is None and ps is None and ns is None:
        _fail(path, "must specify a peer (podSelector, namespaceSelector or ipBlock)")
    return PolicyPeer(
        pod_selector=None if ps is None else _label_selector(ps, f"{path}.podSelector"),
        namespace_selector=None if ns is None else _label_selector(ns, f"{path}.namespaceSelector"),
        ip_block=None if ipb is None else _ip_block(ipb, f"{path}.ipBlock"))


def _policy_port(v: Any, path: str) -> PolicyPort:
    d = _dict(v, path)
    proto = _protocol(d.get("protocol"), f"{path}.protocol")
    raw = d.get("port")
    port = None if raw is None else _int_or_name(raw, f"{path}.port")
    end = d.get("endPort")
    if end is not None:
        if port is None:
            _fail(f"{path}.endPort", "may not be set without port")
        if isinstance(port, str):
            _fail(f"{path}.endPort", "may not be set with a named port")
        end = _port(end, f"{path}.endPort")
        if end < port:
            _fail(f"{path}.endPort", f"{end} must be greater than or equal to port {port}")
    return PolicyPort(proto, port, end)


def _rules(v: Any, path: str, peers_key: str) -> tuple[PolicyRule, ...]:
    out = []
    for i, r in enumerate(_list(v, path)):
        p = f"{path}[{i}]"
        r = _dict(r, p)
        ports = tuple(_policy_port(x, f"{p}.ports[{j}]")
                      for j, x in enumerate(_list(r.get("ports"), f"{p}.ports")))
        peers = tuple(_peer(x, f"{p}.{peers_key}[{j}]")
                      for j, x in enumerate(_list(r.get(peers_key), f"{p}.{peers_key}")))
        out.append(PolicyRule(ports, peers))
    return tuple(out)


def parse_network_policy(d: Mapping, ctx: "_Ctx") -> NetworkPolicy:
    md = _meta(d, Kind.NETWORK_POLICY, ctx.default_namespace, _check_dns_subdomain)
    spec = _dict(d.get("spec"), "spec")
    if spec.get("podSelector") is None and "podSelector" not in spec:
        # Required by the API; an explicit {} selects every pod.
        _fail("spec.podSelector", "required")
    sel = _label_selector(spec.get("podSelector"), "spec.podSelector")
    ingress = _rules(spec.get("ingress"), "spec.ingress", "from")
    egress = _rules(spec.get("egress"), "spec.egress", "to")
    raw_types = spec.get("policyTypes")
    if raw_types is None:
        types = ("Ingress", "Egress") if egress else ("Ingress",)
    else:
        seen = []
        for i, t in enumerate(_list(raw_types, "spec.policyTypes")):
            t = _one_of(t, f"spec.policyTypes[{i}]", ("Ingress", "Egress"), "")
            if t in seen:
                _fail(f"spec.policyTypes[{i}]", f"duplicate {t}")
            seen.append(t)
        if not seen:
            seen = ["Ingress"]
        types = tuple(t for t in ("Ingress", "Egress") if t in seen)
    return NetworkPolicy(namespace=md.namespace, name=md.name, pod_selector=sel,
                         policy_types=types, ingress=ingress, egress=egress,
                         labels=md.labels, uid=md.uid, resource_version=md.rv,
                         annotations=_annotations(md.raw.get("annotations")))


# ------------------------------------------------------------------ entry

class _Ctx:
    __slots__ = ("default_namespace", "pod_ip_annotation")

    def __init__(self, default_namespace: str, pod_ip_annotation: bool):
        self.default_namespace = default_namespace
        self.pod_ip_annotation = pod_ip_annotation


PARSERS = {
    Kind.NAMESPACE: parse_namespace, Kind.POD: parse_pod, Kind.NODE: parse_node,
    Kind.SERVICE: parse_service, Kind.ENDPOINT_SLICE: parse_endpoint_slice,
    Kind.NETWORK_POLICY: parse_network_policy,
}

_KIND_BY_NAME = {k.value: k for k in Kind}


def kind_of(d: Mapping, kind: Optional[str] = None) -> Kind:
    """The object's Kind; UnsupportedKind for kinds fastpath does not consume.

    `kind` is given for list items, which the API server sends without their
    own kind/apiVersion; otherwise the document's kind and apiVersion decide.
    """
    if kind is not None:
        return Kind(kind)
    k = d.get("kind")
    av = d.get("apiVersion")
    if not isinstance(k, str) or k not in _KIND_BY_NAME:
        raise UnsupportedKind(av if isinstance(av, str) else "", k if isinstance(k, str) else "")
    kk = _KIND_BY_NAME[k]
    if av != API_VERSIONS[kk]:
        raise ValidationError(k, _name_of(d, kk, ""), "apiVersion",
                              f"{av!r} is not supported, use {API_VERSIONS[kk]}")
    return kk


def _name_of(d: Mapping, kind: Kind, default_namespace: str) -> str:
    key = object_key(d, kind, default_namespace)
    if key is None:
        return "?"
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


def object_key(d: Mapping, kind: Kind, default_namespace: str = "") -> Optional[Key]:
    """Best-effort (namespace, name) of a raw object, even an invalid one."""
    m = d.get("metadata") if isinstance(d, Mapping) else None
    if not isinstance(m, Mapping) or not isinstance(m.get("name"), str) or not m["name"]:
        return None
    if kind in CLUSTER_SCOPED:
        return ("", m["name"])
    ns = m.get("namespace") or default_namespace
    return (ns, m["name"]) if isinstance(ns, str) and ns else None


def parse_object(d: Any, kind: Optional[str] = None, *, origin: str = "",
                 default_namespace: str = "", pod_ip_annotation: bool = False) -> Object:
    """Turn one raw Kubernetes object into its model object, or raise ValidationError.

    default_namespace applies to namespaced objects without metadata.namespace
    (the directory source passes "default", as kubectl does). pod_ip_annotation
    lets a Pod without status IPs take them from the fastpath.io/pod-ips
    annotation; only the directory source enables it, because in a cluster
    any user who can create a pod could otherwise claim someone else's IP.
    """
    if not isinstance(d, Mapping):
        raise ValidationError(kind or "Manifest", "?", "",
                              f"expected an object, got {type(d).__name__}", origin)
    try:
        k = kind_of(d, kind)
    except ValidationError as e:
        e.origin = origin
        raise
    try:
        return PARSERS[k](d, _Ctx(default_namespace, pod_ip_annotation))
    except _FieldError as e:
        raise ValidationError(k.value, _name_of(d, k, default_namespace), e.path,
                              e.message, origin,
                              key=object_key(d, k, default_namespace)) from None
