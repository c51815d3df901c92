"""Per-pod limits from Pod annotations (pure: no kernel, no cluster client).

The annotations (docs/bandwidth.md is the user's reference):

  kubernetes.io/egress-bandwidth       bits/s   what the pod sends
  kubernetes.io/ingress-bandwidth      bits/s   what is delivered to it
  fastpath.io/egressBurst              bits     token bucket depth (same-node egress)
  fastpath.io/ingressBurst             bits     token bucket depth (ingress)
  fastpath.io/egressPacketRate         packets/s
  fastpath.io/ingressPacketRate        packets/s
  fastpath.io/egressPacketBurst        packets
  fastpath.io/ingressPacketBurst       packets
  fastpath.io/egressMaxConnections     TCP connections the pod opens at once
  fastpath.io/ingressMaxConnections    TCP connections it accepts at once

The fastpath.io/ names follow Calico's QoS controls (qos.projectcalico.org/
ingressBurst, egressPacketRate, ingressMaxConnections, ...), their units
and bounds; values use Kubernetes quantity syntax (10M, 1Gi, 500k).

A value that is not valid is reported (naming the pod, the annotation and
why) and that limit is not applied: the pod stays unlimited in that
respect, never blocked. A burst without its rate is reported and ignored.

Defaults: a bucket holds a quarter second of its rate (at least 5
packets). Policing TCP with a shallower bucket starves it: a flow that lost
a whole burst waits for a retransmission timeout (200 ms at least), and the
tokens of that wait are only useful if the bucket can keep them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Optional

from agent.k8s.model import (ANNOTATION_EGRESS_BANDWIDTH, ANNOTATION_INGRESS_BANDWIDTH, Kind,
                             Pod)
from agent.k8s.parse import parse_quantity

__all__ = ["ANNOTATIONS", "Annotation", "Limits", "PodLimits", "compile_limits", "pod_limits",
           "touches_limits", "DEFAULT_BURST_SECONDS", "MIN_PACKET_BURST"]

DEFAULT_BURST_SECONDS = Decimal("0.25")
MIN_PACKET_BURST = 5          # Calico's default packet burst


@dataclass(frozen=True)
class Annotation:
    name: str
    field: str            # Limits field it sets
    unit: str             # what the number counts
    minimum: int
    maximum: int
    needs: str = ""       # the rate annotation a burst belongs to

    def parse(self, text: str) -> int:
        """The value as an integer in `unit`; ValueError saying why not."""
        try:
            q = parse_quantity(text)
        except ValueError:
            raise ValueError("not a Kubernetes quantity (e.g. 10M, 1Gi, 500k)") from None
        if q != q.to_integral_value():
            raise ValueError(f"must be a whole number of {self.unit}")
        v = int(q)
        if v < self.minimum:
            raise ValueError(f"below the minimum {self.minimum:,} {self.unit}")
        if v > self.maximum:
            raise ValueError(f"above the maximum {self.maximum:,} {self.unit}")
        return v


_EGRESS_BW, _INGRESS_BW = ANNOTATION_EGRESS_BANDWIDTH, ANNOTATION_INGRESS_BANDWIDTH
# Bounds: bandwidth as the kubelet and Calico accept it; bursts as Calico
# (up to 2^32 - 1 bytes); connection counts fit the datapath's 32 bits.
ANNOTATIONS: tuple[Annotation, ...] = (
    Annotation(_EGRESS_BW, "egress_bps", "bits/s", 1000, 10**15),
    Annotation(_INGRESS_BW, "ingress_bps", "bits/s", 1000, 10**15),
    Annotation("fastpath.io/egressBurst", "egress_burst_bits", "bits", 1000,
               (2**32 - 1) * 8, needs=_EGRESS_BW),
    Annotation("fastpath.io/ingressBurst", "ingress_burst_bits", "bits", 1000,
               (2**32 - 1) * 8, needs=_INGRESS_BW),
    Annotation("fastpath.io/egressPacketRate", "egress_pps", "packets/s", 1, 10**8),
    Annotation("fastpath.io/ingressPacketRate", "ingress_pps", "packets/s", 1, 10**8),
    Annotation("fastpath.io/egressPacketBurst", "egress_pkt_burst", "packets", 1, 10**8,
               needs="fastpath.io/egressPacketRate"),
    Annotation("fastpath.io/ingressPacketBurst", "ingress_pkt_burst", "packets", 1, 10**8,
               needs="fastpath.io/ingressPacketRate"),
    Annotation("fastpath.io/egressMaxConnections", "egress_max_conns", "connections", 1,
               2**32 - 1),
    Annotation("fastpath.io/ingressMaxConnections", "ingress_max_conns", "connections", 1,
               2**32 - 1),
)
BY_NAME = {a.name: a for a in ANNOTATIONS}


@dataclass(frozen=True)
class Limits:
    """One pod's limits, defaults filled in; None = unlimited."""
    egress_bps: Optional[int] = None
    ingress_bps: Optional[int] = None
    egress_burst_bits: Optional[int] = None
    ingress_burst_bits: Optional[int] = None
    egress_pps: Optional[int] = None
    ingress_pps: Optional[int] = None
    egress_pkt_burst: Optional[int] = None
    ingress_pkt_burst: Optional[int] = None
    egress_max_conns: Optional[int] = None
    ingress_max_conns: Optional[int] = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    @property
    def tracks_connections(self) -> bool:
        return self.egress_max_conns is not None or self.ingress_max_conns is not None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class PodLimits:
    limits: Limits
    problems: tuple[str, ...] = ()


def default_burst_bits(bps: int) -> int:
    return int(Decimal(bps) * DEFAULT_BURST_SECONDS)


def default_packet_burst(pps: int) -> int:
    return max(math.ceil(Decimal(pps) * DEFAULT_BURST_SECONDS), MIN_PACKET_BURST)


def pod_limits(pod: Pod) -> PodLimits:
    """The limits a Pod's annotations ask for, and what is wrong with them."""
    who = f"pod {pod.namespace}/{pod.name}"
    ann = pod.annotations
    values: dict[str, int] = {}
    problems: list[str] = []
    for a in ANNOTATIONS:
        raw = ann.get(a.name)
        if raw is None:
            continue
        try:
            values[a.field] = a.parse(raw)
        except ValueError as exc:
            problems.append(f"{who}: annotation {a.name}={raw!r} rejected: {exc}; "
                            f"{_consequence(a)}")
    for a in ANNOTATIONS:
        if a.needs and a.field in values and BY_NAME[a.needs].field not in values:
            problems.append(f"{who}: annotation {a.name} ignored: it needs a valid {a.needs}")
            del values[a.field]
    for d in ("egress", "ingress"):
        bps = values.get(f"{d}_bps")
        if bps is not None and f"{d}_burst_bits" not in values:
            values[f"{d}_burst_bits"] = default_burst_bits(bps)
        pps = values.get(f"{d}_pps")
        if pps is not None and f"{d}_pkt_burst" not in values:
            values[f"{d}_pkt_burst"] = default_packet_burst(pps)
    return PodLimits(Limits(**values), tuple(problems))


def _consequence(a: Annotation) -> str:
    if a.needs:
        return "the default burst applies"
    return "the pod is not limited by it"


def compile_limits(snapshot, endpoints: Iterable) -> tuple[dict[str, Limits], list[str]]:
    """{endpoint key (its IPv4 address, or an IPv6-only pod's endpoint key): Limits} for the local endpoints whose Pod asks for any
    limit, and every problem found. An endpoint names its Pod by
    namespace/name (what the CNI plugin passes); without a name the Pod is
    found by IP."""
    pods: Mapping = snapshot.of(Kind.POD)
    by_ip: Optional[dict[str, Pod]] = None
    out: dict[str, Limits] = {}
    problems: list[str] = []
    for ep in endpoints:
        pod = pods.get((ep.pod_namespace, ep.pod_name)) if ep.pod_name else None
        if pod is None:
            if by_ip is None:
                by_ip = {ip: p for p in pods.values() for ip in p.ips}
            pod = by_ip.get(ep.ip or ep.ip6)
        if pod is None:
            continue
        pl = pod_limits(pod)
        problems.extend(pl.problems)
        if not pl.limits.empty:
            # (by the pod's key: an IPv6-only pod's is its endpoint key)
            out[ep.pod_key] = pl.limits
    return out, sorted(set(problems))


def _ours(ann: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in ann.items() if k in BY_NAME}


def touches_limits(deltas: Iterable) -> bool:
    """Whether a batch of store deltas may change some pod's limits."""
    for d in deltas:
        if d.kind != Kind.POD:
            continue
        old = _ours(d.old.annotations) if d.old is not None else None
        new = _ours(d.new.annotations) if d.new is not None else None
        if old != new and (old or new):
            return True
        if (old or new) and d.old is not None and d.new is not None and d.old.ips != d.new.ips:
            return True
    return False
