"""Building cluster state for the policy tests the way a source would.

NetworkPolicies are written as the manifests users apply and go through the
real parser, so the API server's defaulting (policyTypes, protocol TCP) is
part of what the tests exercise.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from agent.k8s.model import ContainerPort, FrozenMap, Namespace, NetworkPolicy, Object, Pod
from agent.k8s.parse import parse_object
from agent.k8s.store import Snapshot, Store


def namespace(name: str, **labels: str) -> Namespace:
    return Namespace(name, FrozenMap(labels))


def pod(ns: str, name: str, ip: Optional[str], node: str = "n1", labels: Optional[dict] = None,
        ports: Iterable[tuple[str, int, str]] = (), phase: str = "Running",
        host_network: bool = False, deleting: bool = False) -> Pod:
    """`ports`: (name, number, protocol) container ports."""
    return Pod(namespace=ns, name=name, labels=FrozenMap(labels or {}), node_name=node,
               ips=(ip,) if ip else (), phase=phase, host_network=host_network,
               deleting=deleting,
               ports=tuple(ContainerPort(num, proto, pname) for pname, num, proto in ports))


def netpol(ns: str, name: str, spec: dict[str, Any]) -> NetworkPolicy:
    spec = dict(spec)
    spec.setdefault("podSelector", {})
    obj = parse_object({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                        "metadata": {"namespace": ns, "name": name}, "spec": spec})
    assert isinstance(obj, NetworkPolicy)
    return obj


def snapshot(objects: Iterable[Object]) -> Snapshot:
    store = Store()
    store.apply(upserts=list(objects))
    return store.snapshot()
