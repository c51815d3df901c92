"""Node-facing frontends: NodePorts, external and load-balancer IPs, traffic
policies for clients inside and outside the node, reject vs drop, Maglev,
source ranges, health-check node ports, and the feature switches.

Objects go through agent.k8s.parse from API-shaped dicts, as in
test_lb_compile.py.
"""
from __future__ import annotations

import pytest

from agent.lb.compile import (
    KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, KIND_NODE_PORT, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, Frontend, HealthCheck, LbOptions, compile_services, describe,
)
from agent.lb.table import ServiceTable
from tests.lb.lbdata import NODE, ZONE, ep, eslice, service, snapshot

VIP = "172.16.0.10"
NODE_IP, ENI_IP = "10.240.0.11", "10.241.1.1"
EXT_IP, LB_IP = "203.0.113.7", "198.51.100.5"
OPTS = LbOptions(nodeport_ips=(NODE_IP,))


def lb_service(name="web", etp="Cluster", node_port=30080, lb_ip=LB_IP, ports=None, **spec):
    status = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}} if lb_ip else None
    if ports is None:
        ports = [("http", 80, "TCP", 8080, node_port) if node_port else ("http", 80, "TCP", 8080)]
    return service(name, typ="LoadBalancer", status=status, externalTrafficPolicy=etp,
                   ports=ports, **spec)


def endpoints(*eps, name="web"):
    return eslice(f"{name}-1", name, list(eps))


def compile_(*objects, options=OPTS):
    return compile_services(snapshot(*objects), NODE, ZONE, options=options)


def addrs(st) -> list[str]:
    return [f"{b.ip}:{b.port}" for b in st.backends]


LOCAL, REMOTE = ep("10.0.0.1", node=NODE), ep("10.0.0.2", node="node-b")


# ---------------------------------------------------------------- NodePort

def test_a_node_port_is_a_frontend_on_each_node_port_address_at_the_node_port():
    out = compile_(lb_service(lb_ip=None), endpoints(LOCAL, REMOTE),
                   options=LbOptions(nodeport_ips=(NODE_IP, ENI_IP)))
    for ip in (NODE_IP, ENI_IP):
        st = out[Frontend(ip, 30080, "TCP")]
        assert st.kind == KIND_NODE_PORT and addrs(st) == ["10.0.0.1:8080", "10.0.0.2:8080"]
    # Cluster policy, random choice: one entry serves inside and outside
    assert Frontend(NODE_IP, 30080, "TCP", SCOPE_EXTERNAL) not in out
    assert Frontend(VIP, 80, "TCP") in out


def test_node_ports_need_a_node_port_type_an_allocated_port_and_the_switch():
    assert not any(fe.port == 30080 for fe in compile_(
        lb_service(lb_ip=None), endpoints(LOCAL), options=LbOptions(nodeport_ips=(NODE_IP,),
                                                                     node_port=False)))
    assert not any(fe.ip == NODE_IP for fe in compile_(
        lb_service(lb_ip=None, node_port=None), endpoints(LOCAL)))
    # no NodePort address known yet (the agent has not read them): none
    assert not any(fe.port == 30080 for fe in compile_(
        lb_service(lb_ip=None), endpoints(LOCAL), options=LbOptions()))
    out = compile_(service("np", typ="NodePort", ports=[("http", 80, "TCP", 8080, 31000)]),
                   eslice("np-1", "np", [LOCAL]))
    assert out[Frontend(NODE_IP, 31000, "TCP")].kind == KIND_NODE_PORT


def test_udp_and_sctp_node_ports_are_frontends_of_their_protocol():
    svc = service("dns", typ="NodePort", ports=[("dns", 53, "UDP", 53, 30053),
                                                 ("sig", 2905, "SCTP", 2905, 30905)])
    out = compile_(svc, eslice("dns-1", "dns", [LOCAL], ports=[("dns", 53, "UDP"),
                                                               ("sig", 2905, "SCTP")]))
    assert addrs(out[Frontend(NODE_IP, 30053, "UDP")]) == ["10.0.0.1:53"]
    assert addrs(out[Frontend(NODE_IP, 30905, "SCTP")]) == ["10.0.0.1:2905"]


# ------------------------------------------------ externalTrafficPolicy

def test_local_policy_keeps_outside_traffic_on_this_nodes_endpoints_and_inside_on_all():
    out = compile_(lb_service(etp="Local"), endpoints(LOCAL, REMOTE))
    for ip, port, kind in ((NODE_IP, 30080, KIND_NODE_PORT), (LB_IP, 80, KIND_LOAD_BALANCER)):
        inside = out[Frontend(ip, port, "TCP", SCOPE_INTERNAL)]
        outside = out[Frontend(ip, port, "TCP", SCOPE_EXTERNAL)]
        assert addrs(inside) == ["10.0.0.1:8080", "10.0.0.2:8080"] and not inside.local_only
        assert addrs(outside) == ["10.0.0.1:8080"] and outside.local_only
        assert inside.kind == outside.kind == kind
    # the ClusterIP is not external: no outside entry, traffic policy not applied
    assert Frontend(VIP, 80, "TCP", SCOPE_EXTERNAL) not in out


def test_local_policy_drops_outside_traffic_on_a_node_without_endpoints():
    out = compile_(lb_service(etp="Local"), endpoints(REMOTE))
    outside = out[Frontend(NODE_IP, 30080, "TCP", SCOPE_EXTERNAL)]
    assert outside.drop and not outside.reject and outside.backends == ()
    inside = out[Frontend(NODE_IP, 30080, "TCP")]
    assert addrs(inside) == ["10.0.0.2:8080"] and not inside.drop
    assert "drop" in describe(outside)


def test_local_policy_without_any_endpoint_rejects_inside_and_outside():
    out = compile_(lb_service(etp="Local"), endpoints(ep("10.0.0.1", node=NODE, ready=False)))
    for scope in (SCOPE_INTERNAL, SCOPE_EXTERNAL):
        st = out[Frontend(NODE_IP, 30080, "TCP", scope)]
        assert st.reject and not st.drop


def test_local_policy_falls_back_to_local_terminating_endpoints():
    out = compile_(lb_service(etp="Local"), endpoints(
        ep("10.0.0.1", node=NODE, ready=False, serving=True, terminating=True), REMOTE))
    outside = out[Frontend(LB_IP, 80, "TCP", SCOPE_EXTERNAL)]
    assert addrs(outside) == ["10.0.0.1:8080"] and outside.backends[0].terminating


def test_cluster_policy_uses_every_endpoint_for_outside_traffic_too():
    out = compile_(lb_service(), endpoints(LOCAL, REMOTE))
    st = out[Frontend(LB_IP, 80, "TCP")]
    assert addrs(st) == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert Frontend(LB_IP, 80, "TCP", SCOPE_EXTERNAL) not in out


def test_internal_traffic_policy_does_not_apply_to_external_addresses():
    out = compile_(lb_service(internalTrafficPolicy="Local", externalIPs=[EXT_IP]),
                   endpoints(REMOTE))
    assert out[Frontend(VIP, 80, "TCP")].drop
    for fe in (Frontend(EXT_IP, 80, "TCP"), Frontend(LB_IP, 80, "TCP"),
               Frontend(NODE_IP, 30080, "TCP")):
        assert addrs(out[fe]) == ["10.0.0.2:8080"], fe


# ------------------------------------------ external and load-balancer IPs

def test_external_ips_are_frontends_unless_switched_off():
    out = compile_(service("web", externalIPs=[EXT_IP]), endpoints(LOCAL))
    assert out[Frontend(EXT_IP, 80, "TCP")].kind == KIND_EXTERNAL_IP
    out = compile_(service("web", externalIPs=[EXT_IP]), endpoints(LOCAL),
                   options=LbOptions(external_ips=False))
    assert set(out) == {Frontend(VIP, 80, "TCP")}


def test_without_in_cluster_load_balancing_only_outside_traffic_is_translated():
    out = compile_(lb_service(), endpoints(LOCAL),
                   options=LbOptions(nodeport_ips=(NODE_IP,), in_cluster_lb=False))
    assert Frontend(LB_IP, 80, "TCP") not in out
    assert addrs(out[Frontend(LB_IP, 80, "TCP", SCOPE_EXTERNAL)]) == ["10.0.0.1:8080"]
    # NodePorts and external IPs are not load balancers: unaffected
    assert Frontend(NODE_IP, 30080, "TCP") in out


def test_a_proxy_mode_load_balancer_ip_is_left_to_the_load_balancer():
    svc = service("web", typ="LoadBalancer", ports=[("http", 80, "TCP", 8080, 30080)],
                  status={"loadBalancer": {"ingress": [{"ip": LB_IP, "ipMode": "Proxy"}]}})
    assert not any(fe.ip == LB_IP for fe in compile_(svc, endpoints(LOCAL)))


def test_source_ranges_apply_to_load_balancer_ips_only():
    out = compile_(lb_service(loadBalancerSourceRanges=["192.0.2.0/24", "10.0.0.0/8"],
                              externalIPs=[EXT_IP]), endpoints(LOCAL))
    assert out[Frontend(LB_IP, 80, "TCP")].source_ranges == ("10.0.0.0/8", "192.0.2.0/24")
    for fe in (Frontend(EXT_IP, 80, "TCP"), Frontend(NODE_IP, 30080, "TCP"),
               Frontend(VIP, 80, "TCP")):
        assert out[fe].source_ranges == (), fe


def test_source_ranges_hold_for_both_scopes_of_a_local_policy_load_balancer():
    out = compile_(lb_service(etp="Local", loadBalancerSourceRanges=["10.0.0.0/8"]),
                   endpoints(LOCAL, REMOTE))
    for scope in (SCOPE_INTERNAL, SCOPE_EXTERNAL):
        assert out[Frontend(LB_IP, 80, "TCP", scope)].source_ranges == ("10.0.0.0/8",)


# ----------------------------------------------------------------- Maglev

def test_maglev_is_for_outside_traffic_only():
    out = compile_(lb_service(externalIPs=[EXT_IP]), endpoints(LOCAL, REMOTE),
                   options=LbOptions(nodeport_ips=(NODE_IP,), maglev=True))
    for ip, port in ((NODE_IP, 30080), (LB_IP, 80), (EXT_IP, 80)):
        assert out[Frontend(ip, port, "TCP", SCOPE_EXTERNAL)].maglev
        assert not out[Frontend(ip, port, "TCP", SCOPE_INTERNAL)].maglev
    assert not out[Frontend(VIP, 80, "TCP")].maglev
    assert Frontend(VIP, 80, "TCP", SCOPE_EXTERNAL) not in out


# ------------------------------------------------------------ precedence

def test_a_node_port_wins_an_address_an_external_ip_also_claims():
    # a Service whose external IP is the node's own address, on the port
    # another Service has as its NodePort
    out = compile_(lb_service("a-np", lb_ip=None), endpoints(LOCAL, name="a-np"),
                   service("b-ext", ip="172.16.0.11", externalIPs=[NODE_IP],
                           ports=[("http", 30080, "TCP", 9090)]),
                   eslice("b-ext-1", "b-ext", [REMOTE], ports=[("http", 9090, "TCP")]))
    st = out[Frontend(NODE_IP, 30080, "TCP")]
    assert st.kind == KIND_NODE_PORT and st.service == ("shop", "a-np")


# ------------------------------------------------------ feature switches

def test_session_affinity_and_topology_can_be_switched_off():
    svc = service("web", sessionAffinity="ClientIP")
    sl = endpoints(ep("10.0.0.1", zone=ZONE, for_zones=[ZONE]),
                   ep("10.0.0.2", zone="zone-2", for_zones=["zone-2"]))
    on = compile_(svc, sl)[Frontend(VIP, 80, "TCP")]
    assert on.affinity_timeout == 10800 and addrs(on) == ["10.0.0.1:8080"]
    off = compile_(svc, sl, options=LbOptions(session_affinity=False, topology=False))
    st = off[Frontend(VIP, 80, "TCP")]
    assert st.affinity_timeout == 0 and addrs(st) == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert st.topology == ""


# ------------------------------------------------- healthCheckNodePort

def test_health_check_node_ports_count_this_nodes_ready_endpoint_addresses():
    objs = [lb_service(etp="Local", healthCheckNodePort=32000,
                       ports=[("http", 80, "TCP", 8080, 30080), ("https", 443, "TCP", 8443, 30443)]),
            eslice("web-1", "web", [LOCAL, ep("10.0.0.3", node=NODE), REMOTE,
                                    ep("10.0.0.4", node=NODE, ready=False, serving=True,
                                       terminating=True)],
                   ports=[("http", 8080, "TCP"), ("https", 8443, "TCP")])]
    table = ServiceTable(NODE, ZONE, options=OPTS)
    table.rebuild(snapshot(*objs))
    # two ports of one address count once; terminating ones not at all
    assert table.health_checks == {("shop", "web"): HealthCheck(("shop", "web"), 32000, 2)}


def test_cluster_policy_services_have_no_health_check_here():
    table = ServiceTable(NODE, ZONE, options=OPTS)
    table.rebuild(snapshot(lb_service(healthCheckNodePort=32000), endpoints(LOCAL)))
    assert table.health_checks == {}


# ------------------------------------------------------ table = compile

@pytest.mark.parametrize("maglev", [False, True])
def test_the_table_follows_changes_like_a_full_compile_with_node_facing_frontends(maglev):
    opts = LbOptions(nodeport_ips=(NODE_IP, ENI_IP), maglev=maglev)
    objs = [lb_service(etp="Local", externalIPs=[EXT_IP]), endpoints(LOCAL, REMOTE)]
    table = ServiceTable(NODE, ZONE, options=opts)
    table.rebuild(snapshot(*objs))
    assert table.desired == compile_services(snapshot(*objs), NODE, ZONE, options=opts)
    from agent.k8s.parse import parse_object
    from agent.k8s.store import Store
    store = Store()
    store.apply(upserts=[parse_object(o) for o in objs])
    sub = store.subscribe()
    table = ServiceTable(NODE, ZONE, options=opts)
    table.rebuild(sub.snapshot)
    objs2 = [lb_service(etp="Cluster", externalIPs=[EXT_IP]), endpoints(REMOTE)]
    store.apply(upserts=[parse_object(o) for o in objs2])
    for cs in sub.drain():
        table.apply(cs.deltas)
    assert table.desired == compile_services(snapshot(*objs2), NODE, ZONE, options=opts)
    sub.close()


# ------------------------------------------- sole entries (FP_SVC_F_SOLE)

def test_a_node_facing_entry_without_an_external_twin_is_sole_for_traffic_from_outside():
    out = compile_(lb_service(externalIPs=[EXT_IP]), endpoints(LOCAL, REMOTE))
    for fe in (Frontend(NODE_IP, 30080, "TCP"), Frontend(LB_IP, 80, "TCP"),
               Frontend(EXT_IP, 80, "TCP")):
        assert out[fe].sole, fe
    assert not out[Frontend(VIP, 80, "TCP")].sole       # a ClusterIP is not node-facing
    out = compile_(lb_service(etp="Local", externalIPs=[EXT_IP]), endpoints(LOCAL, REMOTE))
    for ip, port in ((NODE_IP, 30080), (LB_IP, 80), (EXT_IP, 80)):
        assert not out[Frontend(ip, port, "TCP")].sole  # outside asks its twin
        assert not out[Frontend(ip, port, "TCP", SCOPE_EXTERNAL)].sole


def test_the_table_marks_an_entry_sole_when_another_services_external_twin_leaves():
    """Service a's external IP is service b's load-balancer IP, which b's
    proxy-mode load balancer (in-cluster load balancing off) gives only an
    external entry: a's internal entry is not sole while b's exists, and
    becomes sole when b goes, though nothing recompiled a."""
    from agent.k8s.model import Kind
    from agent.k8s.parse import parse_object
    from agent.k8s.store import Store
    opts = LbOptions(nodeport_ips=(NODE_IP,), in_cluster_lb=False)
    a = service("a", ip="172.16.0.21", externalIPs=[LB_IP])
    b = lb_service("b", node_port=None)
    objs = [a, endpoints(LOCAL, name="a"), b, endpoints(REMOTE, name="b")]
    store = Store()
    store.apply(upserts=[parse_object(o) for o in objs])
    sub = store.subscribe()
    table = ServiceTable(NODE, ZONE, options=opts)
    table.rebuild(sub.snapshot)
    fe = Frontend(LB_IP, 80, "TCP")
    assert table.desired[fe].service == ("shop", "a") and not table.desired[fe].sole
    assert Frontend(LB_IP, 80, "TCP", SCOPE_EXTERNAL) in table.desired
    store.delete(Kind.SERVICE, ("shop", "b"))
    updates = {}
    for cs in sub.drain():
        updates.update(table.apply(cs.deltas))
    assert updates[fe].sole and updates[Frontend(LB_IP, 80, "TCP", SCOPE_EXTERNAL)] is None
    assert table.desired == compile_services(snapshot(*objs[:2], objs[3]), NODE, ZONE,
                                             options=opts)
    sub.close()
