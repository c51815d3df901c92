"""Kubernetes objects for simulated nodes' manifest directories (the demo
and the vm-tests): the fields fastpath reads, as a user would write them,
dumped as one multi-document YAML text."""
from __future__ import annotations

from typing import Iterable, Optional

import yaml


def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels)}}


def pod(ns: str, name: str, ip: str, node: str, labels: Optional[dict] = None,
        ports: Optional[dict[str, int]] = None,
        annotations: Optional[dict[str, str]] = None) -> dict:
    """A running pod with its address in status, as the API server reports it;
    `ports`: named TCP container ports (default http: 8080)."""
    ports = {"http": 8080} if ports is None else ports
    md = {"name": name, "namespace": ns, "labels": dict(labels or {})}
    if annotations:
        md["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": md,
            "spec": {"nodeName": node, "containers": [{
                "name": "main", "image": "busybox",
                "ports": [{"name": n, "containerPort": p} for n, p in ports.items()]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def service(ns: str, name: str, vip: str, port: int, target_port, port_name: str = "http",
            protocol: str = "TCP") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": vip, "ports": [{"name": port_name, "port": port,
                                                  "targetPort": target_port,
                                                  "protocol": protocol}]}}


def endpoint_slice(ns: str, service_name: str, port: int,
                   endpoints: Iterable[tuple[str, bool, str]], port_name: str = "http",
                   protocol: str = "TCP", name: Optional[str] = None) -> dict:
    """`endpoints`: (address, ready, node name)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-1", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": port, "protocol": protocol}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node}
                          for ip, ready, node in endpoints]}


def dump(objects: Iterable[dict]) -> str:
    return yaml.safe_dump_all(list(objects), sort_keys=False)
