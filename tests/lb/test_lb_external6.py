"""IPv6 node-facing Services (issues #15 and #17): NodePorts on the node's
IPv6 NodePort addresses, IPv6 external and load-balancer IPs, from the
Service's IPv6 backends, with IPv4's scopes, SOLE, traffic policies,
reject and drop, and source ranges of their own family; the node's IPv6
NodePort addresses (kube-proxy's --nodeport-addresses per family); the
reconciler writing and restoring them; bad input named by object and field."""
from __future__ import annotations

import pytest

from agent.k8s.parse import ValidationError, parse_object
from agent.lb.capacity import Capacities, admit
from agent.lb.compile import (
    KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, KIND_NODE_PORT, SCOPE_EXTERNAL, Frontend, LbOptions,
    compile_services,
)
from agent.lb.nodeaddr import node_addresses, nodeport_addresses
from agent.lb.reconcile import FLAG_SOLE, FLAG_SRC_RANGE, FakeMaps, Reconciler, check_whole
from agent.lb.table import ServiceTable
from tests.lb.lbdata import NODE, ZONE, ep, eslice, service, snapshot

V4, V6 = "172.16.0.10", "fd00:10::10"
NP4, NP6 = "10.240.0.11", "2001:db8:1::11"
OPTS = LbOptions(nodeport_ips=(NP4, NP6))
LB4, LB6 = "198.51.100.7", "2001:db8:ff::7"


def svc(name="web", typ="LoadBalancer", ips=(V4, V6), status=True, **kw):
    fams = ["IPv6" if ":" in i else "IPv4" for i in ips]
    st = None
    if status:
        st = {"loadBalancer": {"ingress": [{"ip": LB4}, {"ip": LB6}]}}
    return service(name, ip=list(ips), typ=typ, ipFamilies=fams,
                   ipFamilyPolicy="PreferDualStack" if len(ips) > 1 else "SingleStack",
                   ports=(("http", 80, "TCP", 8080, 30080),), status=st, **kw)


def slices(name="web", v4=(("10.0.0.1", "node-b"),), v6=(("fd00::1", NODE), ("fd00::2", "node-b"))):
    out = []
    if v4:
        out.append(eslice(f"{name}-4", name, [ep(i, node=n) for i, n in v4]))
    if v6:
        out.append(eslice(f"{name}-6", name, [ep(i, node=n) for i, n in v6],
                          address_type="IPv6"))
    return out


def compiled(*objs, options=OPTS):
    return compile_services(snapshot(*objs), NODE, ZONE, options=options)


def ips(state):
    return [b.ip for b in state.backends]


# ------------------------------------------------------------- frontends

def test_ipv6_node_ports_external_and_load_balancer_ips_get_the_ipv6_backends():
    out = compiled(svc(externalIPs=["192.0.2.7", "2001:db8::7"]), *slices())
    for ip, port, kind in ((NP6, 30080, KIND_NODE_PORT), ("2001:db8::7", 80, KIND_EXTERNAL_IP),
                           (LB6, 80, KIND_LOAD_BALANCER)):
        st = out[Frontend(ip, port, "TCP")]
        assert (st.kind, ips(st)) == (kind, ["fd00::1", "fd00::2"]), ip
        # eTP Cluster without Maglev: one entry, sole for traffic from outside
        assert st.sole and Frontend(ip, port, "TCP", SCOPE_EXTERNAL) not in out
    for ip, port in ((NP4, 30080), ("192.0.2.7", 80), (LB4, 80)):
        assert ips(out[Frontend(ip, port, "TCP")]) == ["10.0.0.1"]


def test_an_ipv6_only_service_has_ipv6_node_facing_frontends_only():
    out = compiled(svc(ips=(V6,)), *slices(v4=()))
    assert {fe.ip for fe in out} == {V6, NP6, LB6}


def test_local_policy_from_outside_keeps_to_this_nodes_ipv6_endpoints_per_family():
    out = compiled(svc(externalTrafficPolicy="Local"), *slices())
    inside = out[Frontend(NP6, 30080, "TCP")]
    outside = out[Frontend(NP6, 30080, "TCP", SCOPE_EXTERNAL)]
    assert ips(inside) == ["fd00::1", "fd00::2"] and not inside.sole
    assert ips(outside) == ["fd00::1"] and outside.local_only and not outside.drop
    # the IPv4 family has no endpoint on this node: its outside entry drops
    # while the IPv6 one serves (each family on its own)
    assert out[Frontend(NP4, 30080, "TCP", SCOPE_EXTERNAL)].drop


def test_local_policy_drops_ipv6_outside_traffic_on_a_node_without_ipv6_endpoints():
    out = compiled(svc(externalTrafficPolicy="Local"),
                   *slices(v6=(("fd00::2", "node-b"),)))
    outside = out[Frontend(LB6, 80, "TCP", SCOPE_EXTERNAL)]
    assert outside.drop and not outside.reject and outside.backends == ()
    assert ips(out[Frontend(LB6, 80, "TCP")]) == ["fd00::2"]


def test_no_ipv6_endpoint_anywhere_rejects_the_ipv6_frontends_only():
    out = compiled(svc(externalTrafficPolicy="Local"), *slices(v6=()))
    for fe, st in out.items():
        assert st.reject == (":" in fe.ip), fe


def test_source_ranges_go_to_the_load_balancer_ip_of_their_own_family():
    out = compiled(svc(loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8:c::/48"]),
                   *slices())
    assert out[Frontend(LB6, 80, "TCP")].source_ranges == ("2001:db8:c::/48",)
    assert out[Frontend(LB4, 80, "TCP")].source_ranges == ("203.0.113.0/24",)
    assert out[Frontend(NP6, 30080, "TCP")].source_ranges == ()
    # a family the ranges name no prefix of is not filtered (kube-proxy's
    # per-family ranges)
    out = compiled(svc(loadBalancerSourceRanges=["203.0.113.0/24"]), *slices())
    assert out[Frontend(LB6, 80, "TCP")].source_ranges == ()
    assert out[Frontend(LB4, 80, "TCP")].source_ranges == ("203.0.113.0/24",)


def test_maglev_gives_ipv6_outside_traffic_an_entry_of_its_own():
    out = compiled(svc(), *slices(), options=LbOptions(nodeport_ips=(NP6,), maglev=True))
    assert out[Frontend(NP6, 30080, "TCP", SCOPE_EXTERNAL)].maglev
    assert not out[Frontend(NP6, 30080, "TCP")].sole


def test_in_cluster_lb_off_leaves_pods_and_the_node_to_the_ipv6_load_balancer():
    out = compiled(svc(), *slices(), options=LbOptions(nodeport_ips=(NP6,),
                                                       in_cluster_lb=False))
    assert Frontend(LB6, 80, "TCP") not in out
    assert ips(out[Frontend(LB6, 80, "TCP", SCOPE_EXTERNAL)]) == ["fd00::1", "fd00::2"]


# ------------------------------------------------------ NodePort addresses

IFACES = ["127.0.0.1", NP4, "10.241.1.1", "::1", NP6, "2001:db8:2::5", "fe80::1",
          "fd00::a9fe:a01"]


def test_ipv6_node_ports_answer_on_the_primary_ipv6_address_by_default():
    a = node_addresses((), IFACES, node_object_ips=[NP4, NP6])
    assert (a.primary, a.nodeport, a.primary6, a.nodeport6) == ((NP4,), (NP4,), (NP6,), (NP6,))
    # no IPv6 InternalIP: the first global IPv6 address of the primary device
    a = node_addresses((), IFACES, node_object_ips=[NP4],
                       primary_device_ips=[NP4, "fe80::5", "2001:db8:2::5"])
    assert a.primary6 == ("2001:db8:2::5",) and a.nodeport6 == ("2001:db8:2::5",)
    # an IPv4-only node has none
    assert node_addresses((), IFACES, node_object_ips=[NP4]).nodeport6 == ()


def test_a_cidr_list_selects_each_familys_addresses_by_its_own_cidrs():
    a = node_addresses(("10.240.0.0/16", "2001:db8::/32"), IFACES, node_object_ips=[NP4, NP6])
    assert a.nodeport == (NP4,) and a.nodeport6 == (NP6, "2001:db8:2::5")
    # link-local addresses never serve NodePorts, whatever covers them
    assert "fe80::1" not in nodeport_addresses(("::/0",), IFACES, [], family=6)
    assert nodeport_addresses(("::/0",), IFACES, [], family=6) == (
        "::1", "2001:db8:1::11", "2001:db8:2::5", "fd00::a9fe:a01")
    # a family the list names no CIDR of keeps its primary address
    a = node_addresses(("10.240.0.0/16",), IFACES, node_object_ips=[NP4, NP6])
    assert a.nodeport6 == (NP6,)
    a = node_addresses(("2001:db8:2::/48",), IFACES, node_object_ips=[NP4, NP6])
    assert a.nodeport == (NP4,) and a.nodeport6 == ("2001:db8:2::5",)


# ------------------------------------------------------------ reconciler

def test_the_plan_writes_ipv6_node_facing_entries_whole_with_their_flags_and_ranges():
    rec, maps = Reconciler(), FakeMaps()
    table = ServiceTable(NODE, ZONE, options=OPTS)
    objs = (svc(externalTrafficPolicy="Local",
                loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8:c::/48"]), *slices())
    maps.apply_all(rec.plan_changes(table.rebuild(snapshot(*objs))))
    assert check_whole(maps) == []
    assert {b.ip for b in maps.resolve(Frontend(NP6, 30080, "TCP", SCOPE_EXTERNAL))} == {
        "fd00::1"}
    lb6 = maps.services[Frontend(LB6, 80, "TCP", SCOPE_EXTERNAL)]
    assert lb6.flags & FLAG_SRC_RANGE and maps.ranges[lb6.service_id] == {"2001:db8:c::/48"}
    lb4 = maps.services[Frontend(LB4, 80, "TCP", SCOPE_EXTERNAL)]
    assert maps.ranges[lb4.service_id] == {"203.0.113.0/24"}
    # restored from the maps, nothing to do
    assert maps.restore().plan(table.desired) == []
    # eTP Cluster now: the outside entries go, the inside ones become sole
    objs = (svc(loadBalancerSourceRanges=["2001:db8:c::/48"]), *slices())
    for op in rec.plan_changes(table.rebuild(snapshot(*objs))):
        maps.apply(op)
        assert check_whole(maps) == []
    assert Frontend(NP6, 30080, "TCP", SCOPE_EXTERNAL) not in maps.services
    assert maps.services[Frontend(NP6, 30080, "TCP")].flags & FLAG_SOLE


def test_ipv6_node_facing_frontends_count_against_the_ipv6_maps():
    rec = Reconciler()
    updates = ServiceTable(NODE, ZONE, options=OPTS).rebuild(snapshot(svc(), *slices()))
    # V6, NP6, LB6 need three IPv6 entries
    caps = Capacities(services=100, slots=100, backends=100, maglev=10, ranges=10,
                      services6=2, backends6=100)
    _, refused = admit(rec, updates, caps)
    assert [(r.owner, r.map) for r in refused] == [(("shop", "web"), "services6")]


# -------------------------------------------------------------- bad input

@pytest.mark.parametrize("field, value, msg", [
    ("externalIPs", ["2001:db8::zz"], r"spec\.externalIPs\[0\]"),
    ("loadBalancerSourceRanges", ["2001:db8::/300"], r"spec\.loadBalancerSourceRanges\[0\]"),
])
def test_bad_ipv6_node_facing_input_is_named_by_object_and_field(field, value, msg):
    with pytest.raises(ValidationError, match=msg) as exc:
        parse_object(svc(**{field: value}))
    assert "shop/web" in str(exc.value) or "web" in str(exc.value)


def test_a_bad_ipv6_load_balancer_ingress_ip_is_named_by_its_field():
    bad = svc()
    bad["status"]["loadBalancer"]["ingress"][1]["ip"] = "2001:db8::g"
    with pytest.raises(ValidationError, match=r"status\.loadBalancer\.ingress\[1\]\.ip"):
        parse_object(bad)
