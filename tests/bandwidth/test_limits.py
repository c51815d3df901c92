"""Pod annotations -> per-pod limits -> limits-map values (agent.bandwidth),
without a kernel: units, defaults, bounds, bad values, and the plan that
keeps a pod's HTB class and connection counts while it lives."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from agent.bandwidth import (ANNOTATIONS, Entry, Limits, compile_limits, encode, limits_of, plan,
                             pod_limits, touches_limits)
from agent.bandwidth.encode import HTB_MAJOR, NS
from agent.k8s.model import Kind
from agent.k8s.parse import parse_object
from agent.k8s.store import Store

EGRESS, INGRESS = "kubernetes.io/egress-bandwidth", "kubernetes.io/ingress-bandwidth"


def pod(name: str, ann: dict | None = None, ip: str = "10.0.1.10", ns: str = "shop") -> dict:
    md = {"name": name, "namespace": ns}
    if ann:
        md["annotations"] = ann
    return {"apiVersion": "v1", "kind": "Pod", "metadata": md,
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}


def limits(ann: dict) -> tuple[Limits, tuple[str, ...]]:
    pl = pod_limits(parse_object(pod("web", ann)))
    return pl.limits, pl.problems


@dataclass(frozen=True)
class Ep:
    ip: str
    pod_namespace: str = "shop"
    pod_name: str = ""
    ip6: str = ""
    endpoint_key: str = ""      # an IPv6-only pod's (agent/model/endpoint.py)

    @property
    def pod_key(self) -> str:
        return self.ip or self.endpoint_key

    @property
    def key(self) -> str:
        return f"c-{self.ip}"


def test_every_annotation_is_named_like_calicos_qos_controls_under_fastpath_io():
    names = {a.name for a in ANNOTATIONS}
    assert {EGRESS, INGRESS} <= names
    for d in ("egress", "ingress"):
        for what in ("Burst", "PacketRate", "PacketBurst", "MaxConnections"):
            assert f"fastpath.io/{d}{what}" in names


@pytest.mark.parametrize("ann, want", [
    ({EGRESS: "50M"}, dict(egress_bps=50_000_000, egress_burst_bits=12_500_000)),
    ({INGRESS: "1Gi"}, dict(ingress_bps=2**30, ingress_burst_bits=2**30 // 4)),
    ({EGRESS: "10M", "fastpath.io/egressBurst": "2M"},
     dict(egress_bps=10_000_000, egress_burst_bits=2_000_000)),
    ({"fastpath.io/ingressPacketRate": "1k"}, dict(ingress_pps=1000, ingress_pkt_burst=250)),
    ({"fastpath.io/egressPacketRate": "4"}, dict(egress_pps=4, egress_pkt_burst=5)),
    ({"fastpath.io/egressPacketRate": "100", "fastpath.io/egressPacketBurst": "2"},
     dict(egress_pps=100, egress_pkt_burst=2)),
    ({"fastpath.io/egressMaxConnections": "10", "fastpath.io/ingressMaxConnections": "1k"},
     dict(egress_max_conns=10, ingress_max_conns=1000)),
])
def test_annotations_give_limits_with_defaults_filled_in(ann, want):
    got, problems = limits(ann)
    assert problems == ()
    assert got.as_dict() == want


def test_a_pod_without_annotations_has_no_limits():
    got, problems = limits({"unrelated": "x"})
    assert got.empty and problems == ()


@pytest.mark.parametrize("ann, annotation, why", [
    ({EGRESS: "fast"}, EGRESS, "not a Kubernetes quantity"),
    ({EGRESS: "10"}, EGRESS, "below the minimum 1,000 bits/s"),
    ({INGRESS: "2E"}, INGRESS, "above the maximum"),
    ({"fastpath.io/egressMaxConnections": "1.5"}, "fastpath.io/egressMaxConnections",
     "whole number of connections"),
    ({"fastpath.io/ingressMaxConnections": "0"}, "fastpath.io/ingressMaxConnections",
     "below the minimum 1"),
    ({"fastpath.io/egressPacketRate": "-3"}, "fastpath.io/egressPacketRate", "quantity"),
    ({"fastpath.io/ingressMaxConnections": "5G"}, "fastpath.io/ingressMaxConnections",
     "above the maximum"),
])
def test_a_bad_value_names_pod_and_annotation_and_leaves_that_limit_off(ann, annotation, why):
    got, problems = limits({**ann, "fastpath.io/egressPacketRate": ann.get(
        "fastpath.io/egressPacketRate", "100")})
    assert len(problems) == 1, problems
    p = problems[0]
    assert p.startswith(f"pod shop/web: annotation {annotation}=") and why in p, p
    field = next(a.field for a in ANNOTATIONS if a.name == annotation)
    assert getattr(got, field) is None, "the bad limit is not applied: unlimited, not blocked"
    if annotation != "fastpath.io/egressPacketRate":
        assert got.egress_pps == 100, "the pod's other, valid limits still apply"


def test_a_burst_without_its_rate_is_reported_and_ignored():
    got, problems = limits({"fastpath.io/ingressBurst": "10M",
                            "fastpath.io/egressPacketBurst": "10"})
    assert got.empty
    assert sorted(problems) == [
        "pod shop/web: annotation fastpath.io/egressPacketBurst ignored: it needs a valid "
        "fastpath.io/egressPacketRate",
        "pod shop/web: annotation fastpath.io/ingressBurst ignored: it needs a valid "
        "kubernetes.io/ingress-bandwidth"]


def test_a_bad_burst_falls_back_to_the_default_burst():
    got, problems = limits({EGRESS: "8M", "fastpath.io/egressBurst": "big"})
    assert got.egress_burst_bits == 2_000_000
    assert "the default burst applies" in problems[0]


def test_encoded_values_are_bytes_per_second_and_bucket_depths_in_ns():
    enc = encode(Limits(egress_bps=80_000_000, egress_burst_bits=8_000_000, ingress_pps=1000,
                        ingress_pkt_burst=10, egress_max_conns=3))
    assert enc["egress_rate"] == 10_000_000                  # bytes/s
    assert enc["egress_burst_ns"] == NS // 10                # 1 MB at 10 MB/s: 100 ms
    assert enc["ingress_pkt_ns"] == 1_000_000 and enc["ingress_pkt_burst_ns"] == 10_000_000
    assert enc["egress_max_conns"] == 3 and enc["flags"] == 1
    assert enc["ingress_rate"] == 0 and enc["ingress_max_conns"] == 0


@pytest.mark.parametrize("ann", [{EGRESS: "50M", INGRESS: "1G"},
                                 {"fastpath.io/egressPacketRate": "300",
                                  "fastpath.io/ingressMaxConnections": "7"},
                                 {INGRESS: "10M", "fastpath.io/ingressBurst": "1M"}])
def test_the_map_values_read_back_as_the_same_limits(ann):
    got, _ = limits(ann)
    assert limits_of(encode(got)) == got


def test_only_local_endpoints_whose_pod_asks_get_limits_found_by_name_or_ip():
    s = Store()
    s.apply(upserts=[parse_object(pod("a", {EGRESS: "10M"}, "10.0.1.1")),
                     parse_object(pod("b", {}, "10.0.1.2")),
                     parse_object(pod("c", {INGRESS: "bad"}, "10.0.1.3")),
                     parse_object(pod("elsewhere", {EGRESS: "1M"}, "10.9.9.9"))])
    eps = [Ep("10.0.1.1", pod_name="a"), Ep("10.0.1.2", pod_name="b"),
           Ep("10.0.1.3", pod_namespace="", pod_name=""), Ep("10.0.1.4", pod_name="gone")]
    want, problems = compile_limits(s.snapshot(), eps)
    assert list(want) == ["10.0.1.1"] and want["10.0.1.1"].egress_bps == 10_000_000
    assert problems == ["pod shop/c: annotation kubernetes.io/ingress-bandwidth='bad' rejected: "
                        "not a Kubernetes quantity (e.g. 10M, 1Gi, 500k); the pod is not "
                        "limited by it"]


def test_an_ipv6_only_pods_limits_are_keyed_by_its_endpoint_key():
    s = Store()
    s.apply(upserts=[parse_object(pod("o", {EGRESS: "10M"}, "fd00:10::5"))])
    by_name = Ep("", pod_name="o", ip6="fd00:10::5", endpoint_key="127.255.0.4")
    by_ip = Ep("", pod_namespace="", ip6="fd00:10::5", endpoint_key="127.255.0.4")
    for ep in (by_name, by_ip):
        want, _ = compile_limits(s.snapshot(), [ep])
        assert list(want) == ["127.255.0.4"] and want["127.255.0.4"].egress_bps == 10_000_000


def test_annotation_changes_touch_limits_and_unrelated_changes_do_not():
    s = Store()
    sub = s.subscribe()
    s.apply(upserts=[parse_object(pod("a", {"x": "1"}))])
    assert not touches_limits(sub.get(timeout=1).deltas), "a pod without limits"
    s.apply(upserts=[parse_object(pod("a", {"x": "2"}))])
    assert not touches_limits(sub.get(timeout=1).deltas), "an unrelated annotation"
    s.apply(upserts=[parse_object(pod("a", {"x": "2", EGRESS: "1M"}))])
    assert touches_limits(sub.get(timeout=1).deltas), "a limit added"
    s.apply(upserts=[parse_object(pod("a", {"x": "2", EGRESS: "2M"}))])
    assert touches_limits(sub.get(timeout=1).deltas), "a limit changed"
    s.apply(upserts=[parse_object(pod("a", {"x": "2", EGRESS: "2M"}, ip="10.0.1.99"))])
    assert touches_limits(sub.get(timeout=1).deltas), "a limited pod's IP changed"
    s.apply(upserts=[parse_object(pod("b"))])
    assert not touches_limits(sub.get(timeout=1).deltas), "an unlimited pod added"
    s.apply(deletes=[(Kind.POD, ("shop", "a"))])
    assert touches_limits(sub.get(timeout=1).deltas), "a limited pod deleted"
    sub.close()


def gens():
    c = itertools.count(100)
    return lambda: next(c)


def test_plan_allocates_htb_classes_and_generations_and_keeps_them_across_changes():
    g = gens()
    a, b = Limits(egress_bps=10_000_000, egress_burst_bits=1), Limits(ingress_pps=5,
                                                                      ingress_pkt_burst=5)
    p1 = plan({"10.0.0.1": (a, "k1"), "10.0.0.2": (b, "k2")}, {}, htb=True, new_gen=g)
    assert p1.deletes == [] and p1.fresh == {"10.0.0.1", "10.0.0.2"}
    e1, e2 = p1.writes["10.0.0.1"], p1.writes["10.0.0.2"]
    assert (e1.htb_minor, e2.htb_minor) == (1, 2) and e1.conn_gen != e2.conn_gen
    assert e1.htb_class == (HTB_MAJOR << 16) | 1
    have = dict(p1.writes)
    # a live change: same class, same generation, reaped counts kept
    have["10.0.0.1"] = Entry(e1.limits, e1.htb_minor, e1.conn_gen, 4, 2, owner="k1")
    a2 = Limits(egress_bps=20_000_000, egress_burst_bits=1)
    p2 = plan({"10.0.0.1": (a2, "k1"), "10.0.0.2": (b, "k2")}, have, htb=True, new_gen=g)
    assert list(p2.writes) == ["10.0.0.1"] and not p2.fresh
    w = p2.writes["10.0.0.1"]
    assert (w.htb_minor, w.conn_gen, w.egress_reaped, w.ingress_reaped) == (1, e1.conn_gen, 4, 2)
    assert w.limits["egress_rate"] == 2_500_000
    # nothing changed: nothing written
    have["10.0.0.1"] = w
    assert plan({"10.0.0.1": (a2, "k1"), "10.0.0.2": (b, "k2")}, have, htb=True,
                new_gen=g).writes == {}
    # a pod gone: its entry goes; its class is free for the next pod
    p3 = plan({"10.0.0.2": (b, "k2"), "10.0.0.3": (a, "k3")}, have, htb=True, new_gen=g)
    assert p3.deletes == ["10.0.0.1"] and p3.writes["10.0.0.3"].htb_minor == 1


def test_a_new_pod_on_a_reused_ip_starts_a_new_generation():
    g = gens()
    a = Limits(egress_max_conns=2)
    old = plan({"10.0.0.1": (a, "old")}, {}, htb=False, new_gen=g).writes["10.0.0.1"]
    have = {"10.0.0.1": Entry(old.limits, 0, old.conn_gen, 5, 0, owner="old")}
    p = plan({"10.0.0.1": (a, "new")}, have, htb=False, new_gen=g)
    assert p.fresh == {"10.0.0.1"}
    new = p.writes["10.0.0.1"]
    assert new.conn_gen != old.conn_gen and new.egress_reaped == 0
