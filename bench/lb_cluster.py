"""API-shaped Services and EndpointSlices for the load-balancer benchmark.

The control-plane figures must go through the agent's real path: raw
Kubernetes JSON (as dicts) -> agent.k8s.parse -> Store -> compile ->
Reconciler.plan -> map writes. These builders make that JSON in the shape a
real API server returns (metadata, clusterIPs, ipFamilies, endpoint
conditions, nodeName, zone, targetRef, managed-by label), one TCP port per
Service, deterministic for a given index.

Addresses: ClusterIPs from SERVICE_CIDR, endpoints from ENDPOINT_CIDR; both
exist only as map entries and rule text, never on an interface.
"""
from __future__ import annotations

import ipaddress

SERVICE_CIDR = "192.168.0.0/16"
ENDPOINT_CIDR = "10.128.0.0/10"
NAMESPACES = 50
NODES = 100
ZONES = ("cn-hangzhou-h", "cn-hangzhou-i", "cn-hangzhou-j")
_VIP0 = int(ipaddress.ip_address("192.168.0.10"))
_EP0 = int(ipaddress.ip_address("10.128.0.10"))


def vip(i: int) -> str:
    return str(ipaddress.ip_address(_VIP0 + i))


def endpoint_ip(k: int) -> str:
    """The k-th distinct endpoint address (k < 4 million)."""
    return str(ipaddress.ip_address(_EP0 + k))


def namespace_of(i: int) -> str:
    return f"ns-{i % NAMESPACES}"


def service(i: int, port: int = 80, target_port: int = 8080) -> dict:
    ip = vip(i)
    return {
        "kind": "Service", "apiVersion": "v1",
        "metadata": {"name": f"svc-{i}", "namespace": namespace_of(i),
                     "uid": f"{i:08x}-5e7c-4000-8000-000000000000",
                     "resourceVersion": str(1000 + i),
                     "creationTimestamp": "2024-01-01T00:00:00Z",
                     "labels": {"app": f"app-{i}"}},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "ipFamilyPolicy": "SingleStack", "type": "ClusterIP",
                 "ports": [{"name": "http", "port": port, "protocol": "TCP",
                            "targetPort": target_port}],
                 "selector": {"app": f"app-{i}"}, "sessionAffinity": "None",
                 "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(i: int, addresses: list[str], port: int = 8080, generation: int = 1) -> dict:
    ns = namespace_of(i)
    eps = []
    for j, ip in enumerate(addresses):
        node = (i * 7 + j) % NODES
        eps.append({"addresses": [ip],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": f"node-{node}", "zone": ZONES[node % len(ZONES)],
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": f"app-{i}-{j}",
                                  "uid": f"{i:08x}-{j:04x}-4000-8000-000000000000"}})
    return {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": f"svc-{i}-abcde", "namespace": ns, "generateName": f"svc-{i}-",
                     "uid": f"{i:08x}-e5e5-4000-8000-000000000000",
                     "resourceVersion": str(100000 + i * 16 + generation),
                     "generation": generation,
                     "labels": {"kubernetes.io/service-name": f"svc-{i}",
                                "endpointslice.kubernetes.io/managed-by":
                                    "endpointslice-controller.k8s.io"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                          "name": f"svc-{i}", "controller": True,
                                          "blockOwnerDeletion": True,
                                          "uid": f"{i:08x}-5e7c-4000-8000-000000000000"}]},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def cluster(services: int, endpoints_per_service: int) -> list[dict]:
    """Services with their slices; endpoint addresses are all distinct."""
    out: list[dict] = []
    for i in range(services):
        out.append(service(i))
        first = i * endpoints_per_service
        out.append(endpoint_slice(i, [endpoint_ip(first + j) for j in range(endpoints_per_service)]))
    return out
