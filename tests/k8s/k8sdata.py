"""Valid objects of every kind (each field fastpath reads set at least once),
and a wait helper: sources are asynchronous, so tests wait for the store to
converge rather than sleeping a fixed time and hoping."""
from __future__ import annotations

import copy
import time


def wait_for(pred, timeout: float = 10.0, interval: float = 0.01):
    """Poll pred() until truthy; fail the test with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


NAMESPACE = {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "shop", "labels": {"team": "payments"}}}

POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "7",
                 "labels": {"app": "web"},
                 "annotations": {"kubernetes.io/egress-bandwidth": "10M",
                                 "kubernetes.io/ingress-bandwidth": "1Gi"}},
    "spec": {"nodeName": "node-1",
             "containers": [{"name": "main", "ports": [
                 {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                 {"name": "dns", "containerPort": 53, "protocol": "UDP",
                  "hostPort": 5353, "hostIP": "192.168.0.10"}]}],
             "initContainers": [{"name": "side", "ports": [{"containerPort": 9000}]}]},
    "status": {"phase": "Running", "podIP": "10.0.1.5",
               "podIPs": [{"ip": "10.0.1.5"}, {"ip": "fd00::0005"}]},
}

NODE = {
    "apiVersion": "v1", "kind": "Node",
    "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "cn-hangzhou-h"}},
    "spec": {"podCIDRs": ["172.20.1.0/24"]},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"},
                             {"type": "Hostname", "address": "node-1"}]},
}

SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop",
                 "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
    "spec": {"type": "LoadBalancer", "clusterIP": "172.16.0.10",
             "clusterIPs": ["172.16.0.10", "fd00:10::10"],
             "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                       {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}],
             "selector": {"app": "web"}, "externalIPs": ["203.0.113.7"],
             "loadBalancerSourceRanges": ["198.51.100.1/24"],
             "sessionAffinity": "ClientIP",
             "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
             "internalTrafficPolicy": "Local", "externalTrafficPolicy": "Local",
             "healthCheckNodePort": 31000, "trafficDistribution": "PreferClose",
             "ipFamilies": ["IPv4", "IPv6"]},
    "status": {"loadBalancer": {"ingress": [{"ip": "47.0.0.1"},
                                            {"ip": "47.0.0.2", "ipMode": "Proxy"},
                                            {"hostname": "lb.example.com"}]}},
}

SLICE = {
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": "web-abc", "namespace": "shop",
                 "labels": {"kubernetes.io/service-name": "web",
                            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
    "addressType": "IPv4",
    "endpoints": [
        {"addresses": ["10.0.1.5"], "conditions": {"ready": True, "serving": True, "terminating": False},
         "nodeName": "node-1", "zone": "cn-hangzhou-h",
         "hints": {"forZones": [{"name": "cn-hangzhou-h"}], "forNodes": [{"name": "node-1"}]},
         "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"}},
        {"addresses": ["10.0.1.6"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["10.0.1.7"], "conditions": {}},
        {"addresses": ["10.0.1.8"], "conditions": {"ready": False}},
    ],
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"},
              {"name": "dns", "port": 5353, "protocol": "UDP"}],
}

POLICY = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "db", "namespace": "shop"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "db"},
                        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]},
        "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"app": "web"}}},
            {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
             "podSelector": {}},
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
            "ports": [{"port": 5432}, {"protocol": "UDP", "port": "dns"},
                      {"protocol": "TCP", "port": 30000, "endPort": 32767}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "fd00::/8"}}]}, {}],
    },
}

ALL_VALID = [NAMESPACE, POD, NODE, SERVICE, SLICE, POLICY]


def clone(obj: dict) -> dict:
    return copy.deepcopy(obj)

