"""Services + EndpointSlices -> backends, case by case, as kube-proxy chooses them.

Every object goes through agent.k8s.parse from a dict shaped like the API
server's, so the API's defaults (ready unset = ready, serving unset = ready,
targetPort = port, affinity timeout 10800) are the parser's, not the test's.
"""
from __future__ import annotations

import random

import pytest

from agent.k8s.model import Service, ServicePort
from agent.lb.compile import (
    KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, TOPOLOGY_SAME_NODE,
    TOPOLOGY_SAME_ZONE, Backend, Frontend, compile_service, compile_services, describe,
)
from tests.lb.lbdata import NODE, ZONE, ep, eslice, service, snapshot

VIP = "172.16.0.10"


def compile_(*objects, node=NODE, zone=ZONE, **kw):
    return compile_services(snapshot(*objects), node, zone, **kw)


def addrs(state) -> list[str]:
    return [f"{b.ip}:{b.port}" for b in state.backends]


def only(out, ip=VIP, port=80, proto="TCP"):
    return out[Frontend(ip, port, proto)]


# ------------------------------------------------------------ the basics

def test_ready_endpoints_become_backends_on_the_slice_port_in_numeric_order():
    out = compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.10", node="node-b", zone="zone-2"),
        ep("10.0.0.9", node="node-a", zone="zone-1")]))
    assert list(out) == [Frontend(VIP, 80, "TCP")]
    st = only(out)
    # Numeric, not string order: .9 before .10.
    assert st.backends == (Backend("10.0.0.9", 8080, "TCP", False, "node-a", "zone-1"),
                           Backend("10.0.0.10", 8080, "TCP", False, "node-b", "zone-2"))
    assert st.service == ("shop", "web") and st.port_name == "http"
    assert (st.kind, st.reject, st.local_only, st.affinity_timeout, st.topology) == (
        KIND_CLUSTER_IP, False, False, 0, "")


def test_a_service_without_endpoint_slices_rejects():
    st = only(compile_(service("web")))
    assert st.reject and st.backends == ()


def test_a_slice_with_no_endpoints_rejects():
    st = only(compile_(service("web"), eslice("web-1", "web", [])))
    assert st.reject and st.backends == ()


def test_endpoint_conditions_unset_mean_ready():
    st = only(compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.1", ready=None)])))
    assert addrs(st) == ["10.0.0.1:8080"] and not st.backends[0].terminating


def test_only_ready_endpoints_are_used_while_any_is_ready():
    st = only(compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.1"),
        ep("10.0.0.2", ready=False),                                       # starting
        ep("10.0.0.3", ready=False, serving=True, terminating=True)])))    # draining
    assert addrs(st) == ["10.0.0.1:8080"] and not st.reject


def test_not_ready_and_not_terminating_endpoints_reject():
    st = only(compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.1", ready=False), ep("10.0.0.2", ready=False, serving=False)])))
    assert st.reject and st.backends == ()


def test_all_terminating_falls_back_to_the_serving_ones():
    st = only(compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.1", ready=False, serving=True, terminating=True),
        ep("10.0.0.2", ready=False, serving=False, terminating=True),
        ep("10.0.0.3", ready=False, serving=True, terminating=True)])))
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.3:8080"]
    assert all(b.terminating for b in st.backends) and not st.reject


def test_terminating_endpoints_that_no_longer_serve_reject():
    st = only(compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.1", ready=False, serving=False, terminating=True)])))
    assert st.reject and st.backends == ()


def test_serving_but_not_terminating_is_no_fallback():
    # Only a terminating endpoint may be used while not ready: a starting pod
    # that already answers its probe halfway is not one.
    st = only(compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.1", ready=False, serving=True, terminating=False)])))
    assert st.reject


# ------------------------------------------------------------------ ports

def test_named_target_port_resolves_per_slice():
    out = compile_(
        service("web", ports=[("http", 80, "TCP", "http")]),
        eslice("web-a", "web", [ep("10.0.0.1")], ports=[("http", 8080, "TCP")]),
        eslice("web-b", "web", [ep("10.0.0.2")], ports=[("http", 8081, "TCP")]))
    assert addrs(only(out)) == ["10.0.0.1:8080", "10.0.0.2:8081"]


def test_one_address_with_two_resolved_numbers_is_two_backends():
    # A pod mid-rollout can sit in two slices with different numbers for the
    # same named port; both (address, port) pairs are distinct backends.
    out = compile_(
        service("web", ports=[("http", 80, "TCP", "http")]),
        eslice("web-a", "web", [ep("10.0.0.1")], ports=[("http", 8080, "TCP")]),
        eslice("web-b", "web", [ep("10.0.0.1")], ports=[("http", 8081, "TCP")]))
    assert addrs(only(out)) == ["10.0.0.1:8080", "10.0.0.1:8081"]


def test_multi_port_service_matches_slice_ports_by_name_not_number():
    out = compile_(
        service("web", ports=[("http", 80, "TCP", 8080), ("metrics", 9090, "TCP", "metrics")]),
        eslice("web-1", "web", [ep("10.0.0.1"), ep("10.0.0.2")],
               ports=[("metrics", 9100, "TCP"), ("http", 8080, "TCP")]),
        # This slice only knows the http port: its endpoint serves nothing else.
        eslice("web-2", "web", [ep("10.0.0.3")], ports=[("http", 8080, "TCP")]))
    assert set(out) == {Frontend(VIP, 80, "TCP"), Frontend(VIP, 9090, "TCP")}
    assert addrs(out[Frontend(VIP, 80, "TCP")]) == [
        "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    metrics = out[Frontend(VIP, 9090, "TCP")]
    assert addrs(metrics) == ["10.0.0.1:9100", "10.0.0.2:9100"]
    assert metrics.port_name == "metrics"


def test_service_port_without_a_matching_slice_port_rejects():
    out = compile_(
        service("web", ports=[("http", 80, "TCP", 8080), ("admin", 81, "TCP", 9000)]),
        eslice("web-1", "web", [ep("10.0.0.1")], ports=[("http", 8080, "TCP")]))
    assert not out[Frontend(VIP, 80, "TCP")].reject
    assert out[Frontend(VIP, 81, "TCP")].reject


def test_slice_port_without_a_number_is_ignored():
    out = compile_(service("web"),
                   eslice("web-1", "web", [ep("10.0.0.1")], ports=[("http", None, "TCP")]))
    assert only(out).reject


def test_udp_tcp_and_sctp_ports_are_separate_frontends():
    out = compile_(
        service("dns", ports=[("dns", 53, "UDP", 5353), ("dns-tcp", 53, "TCP", 5353),
                              ("diameter", 3868, "SCTP", 3868)]),
        eslice("dns-1", "dns", [ep("10.0.0.1")], ports=[
            ("dns", 5353, "UDP"), ("dns-tcp", 5353, "TCP"), ("diameter", 3868, "SCTP")]))
    assert set(out) == {Frontend(VIP, 53, "UDP"), Frontend(VIP, 53, "TCP"),
                        Frontend(VIP, 3868, "SCTP")}
    for fe, st in out.items():
        assert [b.protocol for b in st.backends] == [fe.protocol]
    assert addrs(out[Frontend(VIP, 53, "UDP")]) == ["10.0.0.1:5353"]
    assert addrs(out[Frontend(VIP, 3868, "SCTP")]) == ["10.0.0.1:3868"]


def test_a_slice_port_of_the_same_name_but_another_protocol_does_not_match():
    out = compile_(
        service("dns", ports=[("dns", 53, "UDP", 53)]),
        eslice("dns-1", "dns", [ep("10.0.0.1")], ports=[("dns", 53, "TCP")]))
    assert out[Frontend(VIP, 53, "UDP")].reject


# ---------------------------------------------------------- addresses

def test_duplicate_endpoints_across_slices_become_one_backend():
    out = compile_(service("web"),
                   eslice("web-1", "web", [ep("10.0.0.1"), ep("10.0.0.2")]),
                   eslice("web-2", "web", [ep("10.0.0.2"), ep("10.0.0.3")]))
    assert addrs(only(out)) == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]


@pytest.mark.parametrize("first_ready", [True, False])
def test_a_duplicate_that_disagrees_is_resolved_the_same_whichever_slice_comes_first(first_ready):
    # An endpoint moving between slices may briefly be ready in one and not
    # in the other; the answer must not depend on slice names.
    a = ep("10.0.0.1", ready=first_ready)
    b = ep("10.0.0.1", ready=not first_ready)
    out = compile_(service("web"), eslice("web-1", "web", [a]), eslice("web-2", "web", [b]))
    assert addrs(only(out)) == ["10.0.0.1:8080"]


def test_a_duplicate_claiming_this_node_wins():
    out = compile_(service("web", internalTrafficPolicy="Local"),
                   eslice("web-1", "web", [ep("10.0.0.1", node="node-b")]),
                   eslice("web-2", "web", [ep("10.0.0.1", node=NODE)]))
    st = only(out)
    assert addrs(st) == ["10.0.0.1:8080"] and st.backends[0].node_name == NODE


def test_only_the_first_address_of_an_endpoint_is_used():
    out = compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.1", extra_addresses=("10.0.0.99",))]))
    assert addrs(only(out)) == ["10.0.0.1:8080"]


def test_slices_of_another_address_type_are_ignored():
    out = compile_(
        service("web"),
        eslice("web-v6", "web", [ep("fd00::1")], address_type="IPv6"),
        eslice("web-fqdn", "web", [ep("db.example.com")], address_type="FQDN"),
        eslice("web-v4", "web", [ep("10.0.0.1")]))
    assert addrs(only(out)) == ["10.0.0.1:8080"]


def test_slices_of_other_services_and_namespaces_are_not_mixed_in():
    out = compile_(service("web"), service("api", ip="172.16.0.11"),
                   service("web", ns="other", ip="172.16.0.12"),
                   eslice("web-1", "web", [ep("10.0.0.1")]),
                   eslice("api-1", "api", [ep("10.0.0.2")]),
                   eslice("web-1", "web", [ep("10.0.0.3")], ns="other"))
    assert addrs(only(out)) == ["10.0.0.1:8080"]
    assert addrs(only(out, "172.16.0.11")) == ["10.0.0.2:8080"]
    assert addrs(only(out, "172.16.0.12")) == ["10.0.0.3:8080"]


# ------------------------------------------------------ not translated

def test_headless_services_are_not_translated():
    out = compile_(service("db", ip="None"), eslice("db-1", "db", [ep("10.0.0.1")]),
                   service("web"), eslice("web-1", "web", [ep("10.0.0.2")]))
    assert set(out) == {Frontend(VIP, 80, "TCP")}


def test_external_name_services_are_not_translated():
    out = compile_(service("ext", ip=None, typ="ExternalName", externalName="db.example.com"))
    assert out == {}


def test_services_for_another_proxy_are_not_translated():
    objs = (service("mesh", labels={"service.kubernetes.io/service-proxy-name": "other"}),
            eslice("mesh-1", "mesh", [ep("10.0.0.1")]),
            service("web", ip="172.16.0.11"), eslice("web-1", "web", [ep("10.0.0.2")]))
    assert set(compile_(*objs)) == {Frontend("172.16.0.11", 80, "TCP")}
    # A fastpath configured with a proxy name takes exactly the labelled ones.
    assert set(compile_(*objs, proxy_name="other")) == {Frontend(VIP, 80, "TCP")}


def test_each_family_gets_its_own_frontend_with_the_slices_of_its_family():
    # (the dual-stack cases in full: tests/lb/test_lb_dualstack.py)
    out = compile_(
        service("dual", ip=["172.16.0.10", "fd00:10::10"], ipFamilies=["IPv4", "IPv6"],
                ipFamilyPolicy="PreferDualStack"),
        eslice("dual-1", "dual", [ep("10.0.0.1")]),
        service("six", ip="fd00:10::11", ipFamilies=["IPv6"]),
        eslice("six-1", "six", [ep("fd00::1")], address_type="IPv6"))
    assert set(out) == {Frontend(VIP, 80, "TCP"), Frontend("fd00:10::10", 80, "TCP"),
                        Frontend("fd00:10::11", 80, "TCP")}
    assert addrs(only(out)) == ["10.0.0.1:8080"]
    # the dual-stack Service has no IPv6 slice: its IPv6 frontend rejects
    assert only(out, "fd00:10::10").reject
    assert [str(b) for b in only(out, "fd00:10::11").backends] == ["[fd00::1]:8080/TCP"]


def test_a_service_whose_cluster_ip_is_not_allocated_yet_is_skipped():
    assert compile_(service("web", ip=None), eslice("web-1", "web", [ep("10.0.0.1")])) == {}


# ------------------------------------------------- internalTrafficPolicy

def test_internal_traffic_policy_local_keeps_only_this_nodes_endpoints():
    st = only(compile_(service("web", internalTrafficPolicy="Local"), eslice("web-1", "web", [
        ep("10.0.0.1", node=NODE), ep("10.0.0.2", node="node-b"), ep("10.0.0.3", node=NODE)])))
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.3:8080"]
    assert st.local_only and not st.reject


def test_internal_traffic_policy_local_with_endpoints_only_elsewhere_drops():
    # kube-proxy (nftables mode): "has no local endpoints" -> drop; only a
    # Service with no usable endpoint anywhere rejects.
    st = only(compile_(service("web", internalTrafficPolicy="Local"), eslice("web-1", "web", [
        ep("10.0.0.2", node="node-b")])))
    assert st.drop and not st.reject and st.local_only and st.backends == ()


def test_internal_traffic_policy_local_without_any_endpoint_rejects():
    st = only(compile_(service("web", internalTrafficPolicy="Local"), eslice("web-1", "web", [
        ep("10.0.0.2", node="node-b", ready=False)])))
    assert st.reject and not st.drop and st.backends == ()


def test_internal_traffic_policy_local_uses_local_terminating_only_when_no_local_ready():
    objs = [service("web", internalTrafficPolicy="Local")]
    st = only(compile_(*objs, eslice("web-1", "web", [
        ep("10.0.0.1", node=NODE, ready=False, serving=True, terminating=True),
        ep("10.0.0.2", node="node-b")])))      # ready, but elsewhere
    assert addrs(st) == ["10.0.0.1:8080"] and st.backends[0].terminating
    st = only(compile_(*objs, eslice("web-1", "web", [
        ep("10.0.0.1", node=NODE, ready=False, serving=True, terminating=True),
        ep("10.0.0.3", node=NODE)])))
    assert addrs(st) == ["10.0.0.3:8080"]


def test_internal_traffic_policy_local_ignores_topology_hints():
    st = only(compile_(service("web", internalTrafficPolicy="Local"), eslice("web-1", "web", [
        ep("10.0.0.1", node=NODE, zone=ZONE, for_zones=["zone-2"]),
        ep("10.0.0.2", node="node-b", zone="zone-2", for_zones=[ZONE])])))
    assert addrs(st) == ["10.0.0.1:8080"] and st.topology == ""


def test_a_node_without_a_name_has_no_local_endpoints():
    st = only(compile_(service("web", internalTrafficPolicy="Local"),
                       eslice("web-1", "web", [ep("10.0.0.1", node=None)]), node=""))
    assert st.drop and not st.backends


# ------------------------------------------------------------- topology

def zoned(*eps):
    return eslice("web-1", "web", list(eps))


def test_zone_hints_for_this_zone_keep_only_the_hinted_endpoints():
    st = only(compile_(service("web", trafficDistribution="PreferClose"), zoned(
        ep("10.0.0.1", zone=ZONE, for_zones=[ZONE]),
        ep("10.0.0.2", zone="zone-2", for_zones=["zone-2"]),
        ep("10.0.0.3", zone="zone-3", for_zones=["zone-3", ZONE]))))
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.3:8080"]
    assert st.topology == TOPOLOGY_SAME_ZONE


def test_hints_that_name_only_other_zones_fall_back_to_all_endpoints():
    # PreferClose with no endpoint in this zone: the controller hints every
    # endpoint for its own zone, none for ours.
    st = only(compile_(service("web", trafficDistribution="PreferClose"), zoned(
        ep("10.0.0.1", zone="zone-2", for_zones=["zone-2"]),
        ep("10.0.0.2", zone="zone-3", for_zones=["zone-3"]))))
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.2:8080"] and st.topology == ""


def test_one_ready_endpoint_without_a_hint_disables_zone_hints():
    st = only(compile_(service("web"), zoned(
        ep("10.0.0.1", zone=ZONE, for_zones=[ZONE]),
        ep("10.0.0.2", zone="zone-2"))))
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.2:8080"] and st.topology == ""


def test_unready_endpoints_without_hints_do_not_disable_zone_hints():
    st = only(compile_(service("web"), zoned(
        ep("10.0.0.1", zone=ZONE, for_zones=[ZONE]),
        ep("10.0.0.2", zone="zone-2", for_zones=["zone-2"]),
        ep("10.0.0.3", ready=False))))
    assert addrs(st) == ["10.0.0.1:8080"]


def test_prefer_close_without_hints_uses_all_endpoints():
    # The hints, written by the EndpointSlice controller, are what narrow the
    # set; a field the controller has not acted on yet changes nothing.
    st = only(compile_(service("web", trafficDistribution="PreferClose"), zoned(
        ep("10.0.0.1", zone=ZONE), ep("10.0.0.2", zone="zone-2"))))
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_hints_are_honoured_without_traffic_distribution():
    # topology-mode: Auto (an annotation) also works through hints only.
    st = only(compile_(service("web"), zoned(
        ep("10.0.0.1", zone=ZONE, for_zones=[ZONE]),
        ep("10.0.0.2", zone="zone-2", for_zones=["zone-2"]))))
    assert addrs(st) == ["10.0.0.1:8080"]


def test_a_node_without_a_zone_ignores_zone_hints():
    st = only(compile_(service("web"), zoned(
        ep("10.0.0.1", zone=ZONE, for_zones=[ZONE]),
        ep("10.0.0.2", zone="zone-2", for_zones=["zone-2"])), zone=""))
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_node_hints_take_precedence_over_zone_hints():
    st = only(compile_(service("web", trafficDistribution="PreferSameNode"), zoned(
        ep("10.0.0.1", node=NODE, zone=ZONE, for_zones=[ZONE], for_nodes=[NODE]),
        ep("10.0.0.2", node="node-c", zone=ZONE, for_zones=[ZONE], for_nodes=["node-c"]),
        ep("10.0.0.3", node="node-b", zone="zone-2", for_zones=["zone-2"], for_nodes=["node-b"]))))
    assert addrs(st) == ["10.0.0.1:8080"] and st.topology == TOPOLOGY_SAME_NODE


def test_node_hints_for_other_nodes_fall_back_to_zone_hints():
    st = only(compile_(service("web", trafficDistribution="PreferSameNode"), zoned(
        ep("10.0.0.2", node="node-c", zone=ZONE, for_zones=[ZONE], for_nodes=["node-c"]),
        ep("10.0.0.3", node="node-b", zone="zone-2", for_zones=["zone-2"], for_nodes=["node-b"]))))
    assert addrs(st) == ["10.0.0.2:8080"] and st.topology == TOPOLOGY_SAME_ZONE


def test_with_no_ready_endpoint_the_terminating_fallback_ignores_hints():
    st = only(compile_(service("web"), zoned(
        ep("10.0.0.1", ready=False, serving=True, terminating=True, for_zones=["zone-2"]),
        ep("10.0.0.2", ready=False, serving=True, terminating=True, for_zones=[ZONE]))))
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.2:8080"] and st.topology == ""


# ------------------------------------------------------------- affinity

def test_client_ip_affinity_defaults_to_three_hours():
    st = only(compile_(service("web", sessionAffinity="ClientIP"),
                       eslice("web-1", "web", [ep("10.0.0.1")])))
    assert st.affinity_timeout == 10800


def test_client_ip_affinity_takes_the_configured_timeout():
    st = only(compile_(service("web", sessionAffinity="ClientIP",
                               sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
                       eslice("web-1", "web", [ep("10.0.0.1")])))
    assert st.affinity_timeout == 600


def test_no_affinity_is_timeout_zero():
    st = only(compile_(service("web", sessionAffinity="None"),
                       eslice("web-1", "web", [ep("10.0.0.1")])))
    assert st.affinity_timeout == 0


def test_a_service_built_without_the_parser_still_gets_the_default_timeout():
    svc = Service("shop", "web", cluster_ips=(VIP,), ports=(ServicePort(80, "TCP", "http"),),
                  session_affinity="ClientIP", session_affinity_timeout=0)
    st = compile_service(svc, (), NODE, ZONE)[Frontend(VIP, 80, "TCP")]
    assert st.affinity_timeout == 10800


# ---------------------------------------------------- external addresses

def test_external_ips_and_load_balancer_ips_are_frontends_of_their_kind():
    out = compile_(
        service("web", typ="LoadBalancer", externalIPs=["203.0.113.7", "2001:db8::7"],
                ports=[("http", 80, "TCP", 8080)],
                status={"loadBalancer": {"ingress": [
                    {"ip": "198.51.100.1"}, {"ip": "198.51.100.2", "ipMode": "Proxy"},
                    {"hostname": "lb.example.com"}, {"ip": "2001:db8::1"}]}}),
        eslice("web-1", "web", [ep("10.0.0.1")]))
    kinds = {fe.ip: st.kind for fe, st in out.items()}
    # A Proxy-mode load balancer must see its traffic itself; hostnames and
    # IPv6 have nothing to translate here.
    assert kinds == {VIP: KIND_CLUSTER_IP, "203.0.113.7": KIND_EXTERNAL_IP,
                     "198.51.100.1": KIND_LOAD_BALANCER}
    assert all(addrs(st) == ["10.0.0.1:8080"] for st in out.values())


def test_external_frontends_use_all_endpoints_even_with_internal_traffic_policy_local():
    out = compile_(
        service("web", externalIPs=["203.0.113.7"], internalTrafficPolicy="Local",
                externalTrafficPolicy="Local"),
        eslice("web-1", "web", [ep("10.0.0.1", node=NODE), ep("10.0.0.2", node="node-b")]))
    assert addrs(only(out)) == ["10.0.0.1:8080"] and only(out).local_only
    ext = only(out, "203.0.113.7")
    assert addrs(ext) == ["10.0.0.1:8080", "10.0.0.2:8080"] and not ext.local_only


def test_external_frontends_follow_topology_hints():
    out = compile_(service("web", externalIPs=["203.0.113.7"]), zoned(
        ep("10.0.0.1", zone=ZONE, for_zones=[ZONE]),
        ep("10.0.0.2", zone="zone-2", for_zones=["zone-2"])))
    assert addrs(only(out, "203.0.113.7")) == ["10.0.0.1:8080"]


def test_a_shared_external_ip_goes_to_the_first_service_by_name_and_a_cluster_ip_beats_it():
    out = compile_(
        service("b-web", ip="172.16.0.11", externalIPs=["203.0.113.7"]),
        eslice("b-web-1", "b-web", [ep("10.0.0.2")]),
        service("a-web", ip="172.16.0.12", externalIPs=["203.0.113.7", "172.16.0.11"]),
        eslice("a-web-1", "a-web", [ep("10.0.0.1")]))
    assert only(out, "203.0.113.7").service == ("shop", "a-web")
    assert only(out, "172.16.0.11").service == ("shop", "b-web")
    assert only(out, "172.16.0.11").kind == KIND_CLUSTER_IP


# ------------------------------------------------------------ determinism

def test_the_result_does_not_depend_on_the_order_of_slices_or_endpoints():
    eps = [ep(f"10.0.{i // 250}.{i % 250 + 1}", ready=i % 7 != 0,
              serving=True, terminating=i % 7 == 0) for i in range(600)]
    svc = service("web", ports=[("http", 80, "TCP", "http")])
    rng = random.Random(7)
    results = []
    for _ in range(4):
        shuffled = eps[:]
        rng.shuffle(shuffled)
        cut = rng.randrange(1, 599)
        names = ["web-x", "web-y"]
        rng.shuffle(names)
        results.append(compile_(
            svc, eslice(names[0], "web", shuffled[:cut]),
            eslice(names[1], "web", shuffled[cut:] + shuffled[:10])))
    assert all(r == results[0] for r in results)
    backends = only(results[0]).backends
    assert len(backends) == 600 - len(range(0, 600, 7))
    assert list(backends) == sorted(backends, key=Backend.sort_key)


def test_describe_says_where_a_frontend_goes():
    out = compile_(service("web", sessionAffinity="ClientIP", internalTrafficPolicy="Local"),
                   eslice("web-1", "web", [
                       ep("10.0.0.1", node=NODE, ready=False, serving=True, terminating=True)]))
    assert describe(only(out)) == (
        "shop/web:http (clusterip) -> 10.0.0.1:8080/TCP (terminating) [local, affinity 10800s]")
    assert describe(only(compile_(service("web")))) == "shop/web:http (clusterip) -> reject"


# ------------------------------------------------- graceful termination

def test_a_terminating_endpoint_is_draining_while_others_are_ready():
    """New connections get only the ready ones; the terminating one stays
    listed as draining, for the flows already on it, serving or not."""
    out = compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=True, terminating=True),
        ep("10.0.0.3", ready=False, serving=False, terminating=True),
        ep("10.0.0.4", ready=False)]))
    st = only(out)
    assert addrs(st) == ["10.0.0.1:8080"]
    assert [f"{b.ip}:{b.port}" for b in st.draining] == ["10.0.0.2:8080", "10.0.0.3:8080"]
    assert all(b.terminating for b in st.draining)
    assert "draining 10.0.0.2:8080/TCP, 10.0.0.3:8080/TCP" in describe(st)


def test_serving_terminating_endpoints_used_as_the_fallback_are_not_draining():
    out = compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.2", ready=False, serving=True, terminating=True),
        ep("10.0.0.3", ready=False, serving=False, terminating=True)]))
    st = only(out)
    assert addrs(st) == ["10.0.0.2:8080"]
    assert [b.ip for b in st.draining] == ["10.0.0.3"]


def test_a_frontend_without_usable_endpoints_rejects_and_keeps_its_draining_ones():
    st = only(compile_(service("web"), eslice("web-1", "web", [
        ep("10.0.0.3", ready=False, serving=False, terminating=True)])))
    assert st.reject and st.backends == ()
    assert [b.ip for b in st.draining] == ["10.0.0.3"]


def test_an_endpoint_removed_from_the_slice_is_neither_backend_nor_draining():
    st = only(compile_(service("web"), eslice("web-1", "web", [ep("10.0.0.1")])))
    assert st.draining == ()
