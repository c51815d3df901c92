"""Which local pods keep their sockets away from socket-LB (pure).

With socket-LB for all sockets, a connect() to a ClusterIP is rewritten to a
backend before any packet exists: a service mesh sidecar that intercepts the
pod's traffic then never sees the VIP. The annotation

    fastpath.io/socket-lb: "disabled"

on a Pod, or on its Namespace (for every pod in it), opts such pods out:
their sockets are left alone and their traffic is translated per packet on
their veth, after the sidecar. On a Pod, "enabled" overrides a disabled
Namespace. Any other value is reported and ignored (the pod keeps the
default); a typo must not change how a workload is served.

`opt_outs(snapshot, endpoints)` maps each local endpoint that opts out to
the FP_SOCKLB_SKIP_* flags saying why; the caller turns the endpoints'
network namespaces into map keys.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional

from agent.model import bpfdefs
from agent.k8s.model import ANNOTATION_SOCKET_LB, Kind, Namespace, Pod

__all__ = ["SKIP_POD", "SKIP_NAMESPACE", "Decision", "decide", "opt_outs",
           "touches_opt_out"]

_DEFS = bpfdefs.load().defines
SKIP_POD = _DEFS["FP_SOCKLB_SKIP_POD"]
SKIP_NAMESPACE = _DEFS["FP_SOCKLB_SKIP_NAMESPACE"]

VALUES = ("enabled", "disabled")


@dataclass(frozen=True)
class Decision:
    flags: int            # 0: socket-LB applies; else FP_SOCKLB_SKIP_* (why not)
    problems: tuple[str, ...] = ()


def _value(obj, what: str, problems: list[str]) -> Optional[str]:
    if obj is None:
        return None
    v = obj.annotations.get(ANNOTATION_SOCKET_LB)
    if v is None:
        return None
    norm = v.strip().lower()
    if norm not in VALUES:
        problems.append(f"{what}: annotation {ANNOTATION_SOCKET_LB}={v!r} is not one of "
                        f"{', '.join(VALUES)}; ignored")
        return None
    return norm


def decide(pod: Optional[Pod], namespace: Optional[Namespace]) -> Decision:
    """The Pod's annotation wins; else its Namespace's; else socket-LB applies."""
    problems: list[str] = []
    pv = _value(pod, f"pod {pod.namespace}/{pod.name}" if pod else "", problems)
    nv = _value(namespace, f"namespace {namespace.name}" if namespace else "", problems)
    if pv == "disabled":
        return Decision(SKIP_POD, tuple(problems))
    if pv is None and nv == "disabled":
        return Decision(SKIP_NAMESPACE, tuple(problems))
    return Decision(0, tuple(problems))


def opt_outs(snapshot, endpoints: Iterable) -> tuple[dict[str, int], list[str]]:
    """{endpoint key: FP_SOCKLB_SKIP_* flags} for the endpoints that opt out,
    and the problems found. An endpoint names its pod by namespace/name (what
    the CNI plugin passes); when it has no name, the Pod is found by IP."""
    pods: Mapping = snapshot.of(Kind.POD)
    namespaces: Mapping = snapshot.of(Kind.NAMESPACE)
    by_ip: Optional[dict[str, Pod]] = None
    out: dict[str, int] = {}
    problems: list[str] = []
    for ep in endpoints:
        pod = None
        if ep.pod_name:
            pod = pods.get((ep.pod_namespace, ep.pod_name))
        if pod is None:
            if by_ip is None:
                by_ip = {ip: p for p in pods.values() for ip in p.ips}
            pod = by_ip.get(ep.ip or ep.ip6)
        ns_name = pod.namespace if pod is not None else ep.pod_namespace
        ns = namespaces.get(("", ns_name)) if ns_name else None
        d = decide(pod, ns)
        problems.extend(d.problems)
        if d.flags:
            out[ep.key] = d.flags
    return out, sorted(set(problems))


def touches_opt_out(deltas: Iterable) -> bool:
    """Whether a batch of store deltas may change some pod's choice."""
    for d in deltas:
        if d.kind not in (Kind.POD, Kind.NAMESPACE):
            continue
        before = d.old.annotations.get(ANNOTATION_SOCKET_LB) if d.old is not None else None
        after = d.new.annotations.get(ANNOTATION_SOCKET_LB) if d.new is not None else None
        if before != after or (d.kind == Kind.POD and (d.old is None) != (d.new is None)):
            return True
        if d.kind == Kind.POD and d.old is not None and d.new is not None \
                and d.old.ips != d.new.ips and after is not None:
            return True
    return False
