"""IPv6 and dual-stack Services (issue #17): per-family compile, the
reconciler's writes for both families in one plan, capacity per family,
the Service address ranges of both families, and bad family input named by
object and field."""
from __future__ import annotations

import pytest

from agent.k8s.parse import ValidationError, parse_object
from agent.lb.capacity import Capacities, admit
from agent.lb.compile import Frontend, compile_services
from agent.lb.reconcile import FakeMaps, Reconciler, check_whole
from agent.lb.svcnet import FLAG_CLUSTER_IP, FLAG_RANGE, entries
from agent.lb.table import ServiceTable
from tests.lb.lbdata import NODE, ZONE, ep, eslice, service, snapshot

V4, V6 = "172.16.0.10", "fd00:10::10"


def dual(name="web", ips=(V4, V6), **kw):
    fams = ["IPv6" if ":" in i else "IPv4" for i in ips]
    return service(name, ip=list(ips), ipFamilies=fams,
                   ipFamilyPolicy="PreferDualStack" if len(ips) > 1 else "SingleStack", **kw)


def slices(name="web", v4=("10.0.0.1", "10.0.0.2"), v6=("fd00::1", "fd00::2")):
    out = []
    if v4:
        out.append(eslice(f"{name}-4", name, [ep(i) for i in v4]))
    if v6:
        out.append(eslice(f"{name}-6", name, [ep(i) for i in v6], address_type="IPv6"))
    return out


def compiled(*objs):
    return compile_services(snapshot(*objs), NODE, ZONE)


def test_a_dual_stack_service_has_a_frontend_per_family_each_with_its_own_backends():
    out = compiled(dual(), *slices())
    assert set(out) == {Frontend(V4, 80, "TCP"), Frontend(V6, 80, "TCP")}
    assert [b.ip for b in out[Frontend(V4, 80, "TCP")].backends] == ["10.0.0.1", "10.0.0.2"]
    assert [b.ip for b in out[Frontend(V6, 80, "TCP")].backends] == ["fd00::1", "fd00::2"]


def test_an_ipv6_first_service_and_an_ipv6_only_one():
    out = compiled(dual("a", ips=(V6, V4)), *slices("a"),
                   dual("b", ips=("fd00:10::11",)), *slices("b", v4=(), v6=("fd00::9",)))
    assert [b.ip for b in out[Frontend(V6, 80, "TCP")].backends] == ["fd00::1", "fd00::2"]
    assert [b.ip for b in out[Frontend(V4, 80, "TCP")].backends] == ["10.0.0.1", "10.0.0.2"]
    assert [b.ip for b in out[Frontend("fd00:10::11", 80, "TCP")].backends] == ["fd00::9"]


def test_families_reject_and_drop_on_their_own():
    # IPv6 slice empty, IPv4 has endpoints: only the IPv6 frontend rejects
    out = compiled(dual(), *slices(v6=()))
    assert out[Frontend(V6, 80, "TCP")].reject and not out[Frontend(V4, 80, "TCP")].reject
    # internalTrafficPolicy Local with the IPv6 endpoint local only
    svc = dual(internalTrafficPolicy="Local")
    objs = [svc, eslice("web-4", "web", [ep("10.0.0.1", node="node-b")]),
            eslice("web-6", "web", [ep("fd00::1", node=NODE)], address_type="IPv6")]
    out = compiled(*objs)
    assert out[Frontend(V4, 80, "TCP")].drop
    assert [b.ip for b in out[Frontend(V6, 80, "TCP")].backends] == ["fd00::1"]


def test_an_ipv4_slice_never_feeds_an_ipv6_frontend_even_if_mislabelled_by_address():
    # an endpoint address of the wrong family is refused by the parser, so
    # a slice of the other family simply does not count
    out = compiled(dual(ips=(V6,)), *slices(v6=()))
    assert out[Frontend(V6, 80, "TCP")].reject


def test_node_facing_frontends_of_each_family_go_with_that_familys_cluster_ip():
    # (the whole semantics of IPv6 node-facing frontends: test_lb_external6.py)
    svc = dual(typ="NodePort", ports=(("http", 80, "TCP", 8080, 30080),),
               externalIPs=["192.0.2.7", "2001:db8::7"])
    from agent.lb.compile import LbOptions
    out = compile_services(snapshot(svc, *slices()), NODE, ZONE,
                           options=LbOptions(nodeport_ips=("192.168.0.5", "2001:db8::5")))
    assert {fe.ip for fe in out} == {V4, V6, "192.168.0.5", "192.0.2.7", "2001:db8::5",
                                     "2001:db8::7"}
    # an IPv4-only Service gets no IPv6 node-facing frontend
    out = compile_services(snapshot(dual(ips=(V4,), typ="NodePort",
                                         ports=(("http", 80, "TCP", 8080, 30080),),
                                         externalIPs=["2001:db8::7"]), *slices()),
                           NODE, ZONE, options=LbOptions(nodeport_ips=("192.168.0.5",
                                                                       "2001:db8::5")))
    assert {fe.ip for fe in out} == {V4, "192.168.0.5"}


# ------------------------------------------------------------ reconciler

def test_one_plan_writes_both_families_whole_and_removes_them_whole():
    rec, maps = Reconciler(), FakeMaps()
    table = ServiceTable(NODE, ZONE)
    maps.apply_all(rec.plan_changes(table.rebuild(snapshot(dual(), *slices()))))
    assert check_whole(maps) == []
    assert {b.ip for b in maps.resolve(Frontend(V6, 80, "TCP"))} == {"fd00::1", "fd00::2"}
    assert {b.ip for b in maps.resolve(Frontend(V4, 80, "TCP"))} == {"10.0.0.1", "10.0.0.2"}
    # one id space: no backend id names two addresses, no service id two frontends
    assert len(set(maps.backends)) == 4
    assert len({e.service_id for e in maps.services.values()}) == 2
    # every intermediate state is whole when the IPv6 slice shrinks, then all goes
    for objs in ((dual(), *slices(v6=("fd00::2",))), ()):
        for op in rec.plan_changes(table.rebuild(snapshot(*objs))):
            maps.apply(op)
            assert check_whole(maps) == []
    assert maps.services == {} and maps.backends == {} and maps.slots == {}


def test_restore_reads_both_families_back_and_plans_nothing():
    rec, maps = Reconciler(), FakeMaps()
    desired = compiled(dual(), *slices())
    maps.apply_all(rec.plan(desired))
    again = maps.restore()
    assert again.plan(desired) == []


# -------------------------------------------------------------- capacity

def test_capacity_is_counted_per_family_and_refuses_by_service_name():
    rec = Reconciler()
    objs = [dual("a"), *slices("a"),
            dual("b", ips=("172.16.0.11", "fd00:10::11")),
            *slices("b", v4=("10.0.1.1",), v6=("fd00::11",))]
    updates = ServiceTable(NODE, ZONE).rebuild(snapshot(*objs))
    # room for two IPv4 frontends, one IPv6 one: the second Service is refused whole
    caps = Capacities(services=2, slots=100, backends=100, maglev=10, ranges=10,
                      services6=1, backends6=100)
    ok, refused = admit(rec, updates, caps)
    assert [(r.owner, r.map) for r in refused] == [(("shop", "b"), "services6")]
    assert "Service shop/b refused: the services6 map" in str(refused[0])
    assert {fe.ip for fe in ok} == {V4, V6}
    # IPv6 backends count against their own map
    caps = Capacities(services=10, slots=100, backends=100, maglev=10, ranges=10,
                      services6=10, backends6=2)
    ok, refused = admit(rec, updates, caps)
    assert [(r.owner, r.map, r.needed) for r in refused] == [(("shop", "b"), "backends6", 3)]
    # unset IPv6 sizes are the IPv4 ones (the programs size the twins alike)
    caps = Capacities(services=2, slots=100, backends=100, maglev=10, ranges=10)
    assert caps.of("services6") == 2 and caps.of("backends6") == 100
    ok, refused = admit(rec, updates, caps)
    assert refused == [] and len(ok) == 4
    maps = FakeMaps()
    maps.apply_all(rec.plan_changes(ok))
    assert rec.usage()["services6"] == 2 and rec.usage()["services"] == 2
    assert rec.usage()["backends6"] == 3 and rec.usage()["backends"] == 3


# ----------------------------------------------------- service ranges

def test_service_ranges_and_cluster_ips_of_both_families():
    table = ServiceTable(NODE, ZONE)
    table.rebuild(snapshot(dual(), *slices()))
    assert table.cluster_ips == {V4: True, V6: True}
    got = entries(table.cluster_ips, ["172.16.0.0/16", "fd00:10::/108"])
    assert got == {"172.16.0.0/16": FLAG_RANGE, "fd00:10::/108": FLAG_RANGE,
                   f"{V4}/32": FLAG_CLUSTER_IP, f"{V6}/128": FLAG_CLUSTER_IP}
    # the Service becomes IPv4-only: its IPv6 ClusterIP leaves the ranges
    table.rebuild(snapshot(dual(ips=(V4,)), *slices()))
    assert V6 in table.changed_cluster_ips and table.cluster_ips == {V4: True}


# ------------------------------------------------------------ bad input

@pytest.mark.parametrize("spec, field, words", [
    ({"ipFamilies": ["IPv4"]}, "spec.clusterIPs[1]", "no family"),
    ({"ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}, "spec.clusterIPs",
     "SingleStack allows one ClusterIP"),
    ({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "SingleStack"}, "spec.ipFamilies",
     "SingleStack allows one"),
    ({"ipFamilies": ["IPv6", "IPv4"]}, "spec.clusterIPs[0]", "spec.ipFamilies[0] is IPv6"),
    ({"ipFamilies": ["IPv4", "IPv4"]}, "spec.ipFamilies[1]", "duplicate"),
    ({"ipFamilyPolicy": "DualStackPlease"}, "spec.ipFamilyPolicy", "not one of"),
])
def test_family_mismatches_are_named_by_object_and_field(spec, field, words):
    d = service("bad", ip=[V4, V6], **spec)
    with pytest.raises(ValidationError) as e:
        parse_object(d)
    assert e.value.field == field and words in str(e.value)
    assert "shop/bad" in str(e.value) and "Service" in str(e.value)


def test_an_ipv6_cluster_ip_on_an_ipv4_only_service_is_refused():
    d = service("bad", ip=[V6], ipFamilies=["IPv4"], ipFamilyPolicy="SingleStack")
    with pytest.raises(ValidationError) as e:
        parse_object(d)
    assert e.value.field == "spec.clusterIPs[0]" and "IPv6 address" in str(e.value)


def test_an_ipv6_address_in_an_ipv4_slice_is_refused():
    d = eslice("web-4", "web", [ep("fd00::1")])
    with pytest.raises(ValidationError) as e:
        parse_object(d)
    assert e.value.field == "endpoints[0].addresses[0]"
