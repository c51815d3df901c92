"""Kubernetes objects for simulated nodes' manifest directories (the demo,
the vm-tests and the benchmarks): the fields fastpath reads, as a user
would write them, dumped as one multi-document YAML text."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

import yaml

# An endpoint's conditions by the name a test gives its state: `ready`,
# `not-ready` (withdrawn, not serving) or `terminating` (being deleted, still
# serving: what kube-proxy falls back to when no endpoint is ready).
CONDITIONS = {"ready": {"ready": True},
              "not-ready": {"ready": False},
              "terminating": {"ready": False, "serving": True, "terminating": True}}


def namespace(name: str, annotations: Optional[dict[str, str]] = None, **labels: str) -> dict:
    md: dict = {"name": name, "labels": dict(labels)}
    if annotations:
        md["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": md}


def pod(ns: str, name: str, ip: Optional[str], node: str, labels: Optional[dict] = None,
        ports: Optional[dict[str, int]] = None,
        annotations: Optional[dict[str, str]] = None, ip6: Optional[str] = None) -> dict:
    """A running pod with its address in status, as the API server reports it;
    `ports`: named TCP container ports (default http: 8080); `ip` None: a pod
    without a status yet (its kubelet has not reported it); `ip6`: a
    dual-stack pod's IPv6 address, second in podIPs."""
    ports = {"http": 8080} if ports is None else ports
    md = {"name": name, "namespace": ns, "labels": dict(labels or {})}
    if annotations:
        md["annotations"] = dict(annotations)
    obj = {"apiVersion": "v1", "kind": "Pod",
           "metadata": md,
           "spec": {"nodeName": node, "containers": [{
               "name": "main", "image": "busybox",
               "ports": [{"name": n, "containerPort": p} for n, p in ports.items()]}]}}
    if ip is not None:
        obj["status"] = {"phase": "Running", "podIP": ip,
                         "podIPs": [{"ip": a} for a in (ip, ip6) if a]}
    return obj


def service(ns: str, name: str, vip: str, port: int, target_port, port_name: str = "http",
            protocol: str = "TCP", *, more_ports: Iterable[tuple[str, int, object, str]] = (),
            affinity_seconds: Optional[int] = None) -> dict:
    """A ClusterIP Service; `more_ports`: further (name, port, target port,
    protocol); `affinity_seconds`: sessionAffinity ClientIP with that
    timeout."""
    ports = [(port_name, port, target_port, protocol), *more_ports]
    spec: dict = {"clusterIP": vip,
                  "ports": [{"name": n, "port": p, "targetPort": t, "protocol": pr}
                            for n, p, t, pr in ports]}
    if affinity_seconds is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_seconds}}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": spec}


Condition = Union[bool, str]


def endpoint_slice(ns: str, service_name: str, port: int,
                   endpoints: Iterable[tuple[str, Condition, Optional[str]]],
                   port_name: str = "http", protocol: str = "TCP", name: Optional[str] = None,
                   more_ports: Iterable[tuple[str, int, str]] = ()) -> dict:
    """`endpoints`: (address, condition, node name or None); the condition a
    bool (ready or not) or a key of CONDITIONS. `more_ports`: further
    (name, port, protocol)."""
    ports = [(port_name, port, protocol), *more_ports]

    def endpoint(ip, cond, node):
        cond = CONDITIONS["ready" if cond else "not-ready"] if isinstance(cond, bool) \
            else CONDITIONS[cond]
        ep = {"addresses": [ip], "conditions": dict(cond)}
        if node is not None:
            ep["nodeName"] = node
        return ep

    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-1", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
            "endpoints": [endpoint(*e) for e in endpoints]}


def ingress_policy(ns: str, name: str, pod_labels: dict, from_labels: dict,
                   ports: Iterable[tuple[object, Optional[str]]]) -> dict:
    """A NetworkPolicy: pods with `pod_labels` accept, on `ports` ((port,
    protocol or None)), only pods of their namespace with `from_labels`."""
    def port(p, proto):
        return {"port": p, **({"protocol": proto} if proto else {})}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {"matchLabels": dict(pod_labels)},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": dict(from_labels)}}],
                                  "ports": [port(*p) for p in ports]}]}}


def dump(objects: Iterable[dict]) -> str:
    return yaml.safe_dump_all(list(objects), sort_keys=False)


def write(directory: str, name: str, objects: Union[str, Iterable[dict]]) -> Path:
    """Put `objects` (or a YAML text) in `directory`/`name` at once (a new
    file renamed over the old), so a watcher of the directory never reads
    half a file."""
    path = Path(directory, name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(objects if isinstance(objects, str) else dump(objects))
    os.replace(tmp, path)
    return path
