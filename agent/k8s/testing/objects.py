"""Realistic Kubernetes objects in bulk, for the fake API server's benchmarks.

Shapes follow what a real API server returns (owner references, status
conditions, container statuses, managed labels), so parsing cost and the
bytes on the wire are close to a real cluster's, not to a minimal stub.
Deterministic: the same arguments always give the same objects.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

ZONES = ("cn-hangzhou-h", "cn-hangzhou-i", "cn-hangzhou-j")


def _uid(kind: str, i: int) -> str:
    h = f"{abs(hash((kind, i))) & 0xffffffffffff:012x}"
    return f"{i & 0xffffffff:08x}-{kind[:4].lower().ljust(4, '0')}-4000-8000-{h}"


def pod_ip(i: int) -> str:
    i += 256  # skip 10.0.0.x
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def node_name(i: int) -> str:
    return f"cn-hangzhou.192.168.{i // 250}.{i % 250 + 1}"


def namespace(i: int) -> dict:
    return {"kind": "Namespace", "apiVersion": "v1", "metadata": {
        "name": f"ns-{i}", "labels": {"kubernetes.io/metadata.name": f"ns-{i}",
                                      "team": f"team-{i % 7}"}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def node(i: int) -> dict:
    name = node_name(i)
    return {"kind": "Node", "apiVersion": "v1", "metadata": {
        "name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "node.kubernetes.io/instance-type": "ecs.g7.2xlarge",
            "topology.kubernetes.io/region": "cn-hangzhou",
            "topology.kubernetes.io/zone": ZONES[i % len(ZONES)]}},
        "spec": {"podCIDR": f"172.20.{i % 256}.0/24", "providerID": f"cn-hangzhou.i-{i:08x}"},
        "status": {"addresses": [
            {"type": "InternalIP", "address": f"192.168.{i // 250}.{i % 250 + 1}"},
            {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True",
                            "lastHeartbeatTime": "2024-01-01T00:00:00Z",
                            "lastTransitionTime": "2024-01-01T00:00:00Z",
                            "reason": "KubeletReady", "message": "kubelet is posting ready status"}],
            "nodeInfo": {"kubeletVersion": "v1.30.1", "containerRuntimeVersion": "containerd://1.6.28"}}}


def pod(i: int, n_namespaces: int, n_nodes: int) -> dict:
    ns = f"ns-{i % n_namespaces}"
    app = f"app-{i % 1000}"
    name = f"{app}-7d9f8c6b5-{i:06d}"
    ip = pod_ip(i)
    host = f"192.168.{(i % n_nodes) // 250}.{(i % n_nodes) % 250 + 1}"
    ann = {"kubernetes.io/egress-bandwidth": "100M"} if i % 10 == 0 else {}
    return {"kind": "Pod", "apiVersion": "v1", "metadata": {
        "name": name, "namespace": ns, "generateName": f"{app}-7d9f8c6b5-",
        "uid": _uid("Pod", i), "creationTimestamp": "2024-01-01T00:00:00Z",
        "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "tier": ("web", "db", "cache")[i % 3]},
        "annotations": ann,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                             "name": f"{app}-7d9f8c6b5", "uid": _uid("ReplicaSet", i % 1000),
                             "controller": True, "blockOwnerDeletion": True}]},
        "spec": {
            "nodeName": node_name(i % n_nodes),
            "containers": [{
                "name": "main", "image": f"registry.example/{app}:1.4.2",
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1",
                                                                      "fieldPath": "status.podIP"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                              "limits": {"cpu": "1", "memory": "512Mi"}},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": True,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File"}],
            "dnsPolicy": "ClusterFirst", "restartPolicy": "Always",
            "schedulerName": "default-scheduler", "serviceAccountName": "default",
            "securityContext": {}, "enableServiceLinks": True, "priority": 0,
            "preemptionPolicy": "PreemptLowerPriority",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {
                "defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}]},
        "status": {
            "phase": "Running", "hostIP": host, "hostIPs": [{"ip": host}],
            "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "Burstable",
            "startTime": "2024-01-01T00:00:01Z",
            "conditions": [{"type": t, "status": "True", "lastProbeTime": None,
                            "lastTransitionTime": "2024-01-01T00:00:05Z"}
                           for t in ("PodReadyToStartContainers", "Initialized", "Ready",
                                     "ContainersReady", "PodScheduled")],
            "containerStatuses": [{
                "name": "main", "ready": True, "started": True, "restartCount": 0,
                "image": f"registry.example/{app}:1.4.2",
                "imageID": f"registry.example/{app}@sha256:{'ab' * 32}",
                "containerID": f"containerd://{'cd' * 32}",
                "state": {"running": {"startedAt": "2024-01-01T00:00:04Z"}},
                "lastState": {}}]}}


def service(i: int, n_namespaces: int) -> dict:
    ns = f"ns-{i % n_namespaces}"
    ip = f"172.16.{(i >> 8) & 255}.{i & 255}" if i < 65536 else f"172.17.{(i >> 8) & 255}.{i & 255}"
    typ = "NodePort" if i % 20 == 0 else "ClusterIP"
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
             {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": "metrics"}]
    spec: dict[str, Any] = {
        "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack", "ports": ports,
        "selector": {"app": f"app-{i % 1000}"}, "sessionAffinity": "None", "type": typ,
        "internalTrafficPolicy": "Cluster"}
    if typ == "NodePort":
        ports[0]["nodePort"] = 30000 + (i // 20) % 2767
        spec["externalTrafficPolicy"] = "Cluster"
    return {"kind": "Service", "apiVersion": "v1", "metadata": {
        "name": f"svc-{i}", "namespace": ns, "uid": _uid("Service", i),
        "creationTimestamp": "2024-01-01T00:00:00Z", "labels": {"app": f"app-{i % 1000}"}},
        "spec": spec, "status": {"loadBalancer": {}}}


def endpoint_slice(svc: int, first_pod: int, size: int, n_pods: int,
                   n_namespaces: int, n_nodes: int) -> dict:
    ns = f"ns-{svc % n_namespaces}"
    eps = []
    for j in range(size):
        p = (first_pod + j) % max(n_pods, 1)
        eps.append({"addresses": [pod_ip(p)],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": node_name(p % n_nodes), "zone": ZONES[(p % n_nodes) % len(ZONES)],
                    "targetRef": {"kind": "Pod", "namespace": ns,
                                  "name": f"app-{p % 1000}-7d9f8c6b5-{p:06d}", "uid": _uid("Pod", p)}})
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {
        "name": f"svc-{svc}-{svc:05x}", "namespace": ns, "generateName": f"svc-{svc}-",
        "uid": _uid("EndpointSlice", svc),
        "labels": {"kubernetes.io/service-name": f"svc-{svc}",
                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": f"svc-{svc}",
                             "uid": _uid("Service", svc), "controller": True,
                             "blockOwnerDeletion": True}]},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "metrics", "port": 9090, "protocol": "TCP"}]}


def network_policy(i: int, n_namespaces: int) -> dict:
    return {"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1", "metadata": {
        "name": f"allow-web-{i}", "namespace": f"ns-{i % n_namespaces}"},
        "spec": {"podSelector": {"matchLabels": {"tier": "db"}},
                 "policyTypes": ["Ingress", "Egress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}},
                                       {"namespaceSelector": {"matchExpressions": [
                                           {"key": "team", "operator": "In",
                                            "values": ["team-1", "team-2"]}]}}],
                              "ports": [{"protocol": "TCP", "port": 5432}]}],
                 "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                 "except": ["10.1.0.0/16"]}}],
                             "ports": [{"protocol": "TCP", "port": 30000, "endPort": 32767}]}]}}


def populate(services: int = 0, endpoints: int = 0, pods: int = 0, nodes: int = 100,
             namespaces: int = 50, policies: int = 0, slice_size: int = 100) -> list[dict]:
    """Objects for a cluster of this size; endpoints are packed `slice_size` to a
    slice, one slice per service for the first endpoints/slice_size services."""
    out: list[dict] = [namespace(i) for i in range(namespaces)]
    out += [node(i) for i in range(nodes)]
    out += [pod(i, namespaces, nodes) for i in range(pods)]
    out += [service(i, namespaces) for i in range(services)]
    n_slices = (endpoints + slice_size - 1) // slice_size
    for s in range(n_slices):
        size = min(slice_size, endpoints - s * slice_size)
        svc = s * max(services // max(n_slices, 1), 1) if services else s
        out.append(endpoint_slice(svc, s * slice_size, size, pods, namespaces, nodes))
    out += [network_policy(i, namespaces) for i in range(policies)]
    return out


def burst_changes(objects: dict[str, dict], n: int) -> Iterator[tuple[str, Any]]:
    """n changes to an existing cluster, each one exactly one store delta.

    Mix: 60% pod label updates, 20% endpoint readiness flips, 10% service
    port changes, 5% pod creations, 5% pod deletions. `objects` maps kind ->
    {key: object as stored by the fake server (without kind/apiVersion)}.
    """
    pods = sorted(objects["Pod"])
    slices = sorted(objects["EndpointSlice"])
    svcs = sorted(objects["Service"])
    n_ns = max(len(objects["Namespace"]), 1)
    n_nodes = max(len(objects["Node"]), 1)
    counts = {"label": n * 60 // 100, "ready": n * 20 // 100, "svc": n * 10 // 100,
              "create": n * 5 // 100}
    counts["delete"] = n - sum(counts.values())
    if not pods or not slices or not svcs or counts["delete"] + counts["label"] > len(pods):
        raise ValueError("burst needs a populated server with enough pods, slices, services")

    def copy(kind: str, key) -> dict:
        o = json.loads(json.dumps(objects[kind][key]))
        o["kind"] = kind
        return o

    for i in range(counts["label"]):
        o = copy("Pod", pods[i])
        o["metadata"]["labels"]["rollout"] = f"r{i}"
        yield "apply", o
    for i in range(counts["ready"]):
        key = slices[i % len(slices)]
        o = copy("EndpointSlice", key)
        ep = o["endpoints"][(i // len(slices)) % len(o["endpoints"])]
        ep["conditions"]["ready"] = not ep["conditions"]["ready"]
        ep["conditions"]["serving"] = ep["conditions"]["ready"]
        objects["EndpointSlice"][key] = {k: v for k, v in o.items() if k != "kind"}
        yield "apply", o
    for i in range(counts["svc"]):
        key = svcs[i % len(svcs)]
        o = copy("Service", key)
        o["spec"]["ports"][0]["targetPort"] = 20000 + i  # never a value it had
        objects["Service"][key] = {k: v for k, v in o.items() if k != "kind"}
        yield "apply", o
    base = 10_000_000
    for i in range(counts["create"]):
        yield "apply", pod(base + i, n_ns, n_nodes)
    for i in range(counts["delete"]):
        ns, name = pods[-1 - i]
        yield "delete", ("Pod", ns, name)
