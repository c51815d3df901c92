"""Builders of Service and EndpointSlice objects shaped like the API server's,
and a snapshot of them parsed the way the agent parses a cluster."""
from __future__ import annotations

from typing import Any, Optional

from agent.k8s.parse import parse_object
from agent.k8s.store import Snapshot, Store

NODE = "node-a"
ZONE = "zone-1"


def service(name: str, ns: str = "shop", ip: Optional[str] = "172.16.0.10",
            ports: Any = (("http", 80, "TCP", 8080),), typ: str = "ClusterIP",
            labels: Optional[dict] = None, status: Optional[dict] = None,
            **spec: Any) -> dict:
    """ports: (name, port, protocol, targetPort[, nodePort]) tuples, or dicts."""
    def port(p):
        if isinstance(p, dict):
            return p
        d = {"name": p[0], "port": p[1], "protocol": p[2], "targetPort": p[3]}
        if len(p) > 4:
            d["nodePort"] = p[4]
        return d
    s: dict[str, Any] = {"type": typ, "selector": {"app": name},
                         "ports": [port(p) for p in ports]}
    if ip is not None:
        ips = ip if isinstance(ip, list) else [ip]
        s["clusterIP"] = ips[0]
        s["clusterIPs"] = ips
    s.update(spec)
    d = {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
         "spec": s}
    if status is not None:
        d["status"] = status
    return d


def ep(ip: str, ready: Optional[bool] = True, serving: Optional[bool] = None,
       terminating: Optional[bool] = None, node: Optional[str] = "node-b",
       zone: Optional[str] = "zone-2", for_zones: Optional[list] = None,
       for_nodes: Optional[list] = None, extra_addresses: tuple = ()) -> dict:
    cond = {}
    if ready is not None:
        cond["ready"] = ready
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    e: dict[str, Any] = {"addresses": [ip, *extra_addresses], "conditions": cond}
    if node is not None:
        e["nodeName"] = node
    if zone is not None:
        e["zone"] = zone
    hints: dict[str, Any] = {}
    if for_zones is not None:
        hints["forZones"] = [{"name": z} for z in for_zones]
    if for_nodes is not None:
        hints["forNodes"] = [{"name": n} for n in for_nodes]
    if hints:
        e["hints"] = hints
    return e


def eslice(name: str, svc: str, endpoints: list, ports: Any = (("http", 8080, "TCP"),),
           ns: str = "shop", address_type: str = "IPv4") -> dict:
    """ports: (name, port, protocol) tuples; port None leaves it unset."""
    ps = []
    for n, p, proto in ports:
        d: dict[str, Any] = {"name": n, "protocol": proto}
        if p is not None:
            d["port"] = p
        ps.append(d)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc,
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-controller.k8s.io"}},
            "addressType": address_type, "endpoints": endpoints, "ports": ps}


def snapshot(*objects: dict) -> Snapshot:
    store = Store()
    store.apply(upserts=[parse_object(o) for o in objects])
    return store.snapshot()
