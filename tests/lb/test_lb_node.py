"""NodePort addresses, hostPort mappings and conflicts, service-map capacity,
Service address ranges: the pure pieces around the Service compiler."""
from __future__ import annotations

import pytest

from agent.lb.capacity import Capacities, admit
from agent.lb.compile import (
    KIND_HOST_PORT, SCOPE_EXTERNAL, Backend, Frontend, FrontendState, LbOptions, compile_services,
)
from agent.lb.hostport import HostPorts, PortMapping, PortMappingError, family_refusal, \
    frontends_of, \
    parse_port_mappings
from agent.lb.nodeaddr import node_addresses, nodeport_addresses
from agent.lb.reconcile import FakeMaps, Reconciler
from agent.lb.svcnet import FLAG_CLUSTER_IP, FLAG_RANGE, entries
from agent.lb.table import ServiceTable
from tests.lb.lbdata import NODE, ZONE, ep, eslice, service, snapshot

IFACES = ["127.0.0.1", "10.240.0.11", "10.241.1.1", "10.242.1.1", "169.254.10.1", "fd00::5"]


# ---------------------------------------------------- NodePort addresses

def test_by_default_node_ports_answer_on_the_primary_address_only():
    assert nodeport_addresses((), IFACES, ["10.240.0.11"]) == ("10.240.0.11",)
    assert nodeport_addresses((), IFACES, []) == ()


def test_node_port_cidrs_select_every_matching_interface_address():
    assert nodeport_addresses(("10.240.0.0/16", "10.242.0.0/16"), IFACES, ["10.240.0.11"]) == (
        "10.240.0.11", "10.242.1.1")
    assert nodeport_addresses(("0.0.0.0/0",), IFACES, []) == (
        "10.240.0.11", "10.241.1.1", "10.242.1.1", "127.0.0.1", "169.254.10.1")


def test_the_primary_address_is_the_node_objects_internal_ip_else_the_primary_devices():
    a = node_addresses((), IFACES, node_object_ips=["10.240.0.11"],
                       primary_device_ips=["10.240.0.99"])
    assert a.primary == ("10.240.0.11",) and a.nodeport == ("10.240.0.11",)
    a = node_addresses((), IFACES, primary_device_ips=["10.240.0.11"])
    assert a.primary == ("10.240.0.11",)
    # hostPorts answer on every local address but link-local plumbing
    assert a.local == ("10.240.0.11", "10.241.1.1", "10.242.1.1", "127.0.0.1")


# ------------------------------------------------------------ hostPorts

def test_port_mappings_parse_as_cni_runtimes_pass_them():
    ms, notes = parse_port_mappings([
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "UDP", "hostIP": "10.240.0.11"},
        {"hostPort": 2905, "containerPort": 2905, "protocol": "sctp", "hostIP": "0.0.0.0"},
        {"hostPort": 8081, "containerPort": 81},
        {"hostPort": 9000, "containerPort": 90, "hostIP": "fd00:0::1"},
        {"hostPort": 9001, "containerPort": 91, "hostIP": "::"}])
    assert ms == (PortMapping(8080, 80, "TCP"), PortMapping(5353, 53, "UDP", "10.240.0.11"),
                  PortMapping(2905, 2905, "SCTP"), PortMapping(8081, 81, "TCP"),
                  PortMapping(9000, 90, "TCP", "fd00::1"), PortMapping(9001, 91, "TCP"))
    assert notes == []
    assert parse_port_mappings(None) == ((), [])


@pytest.mark.parametrize("bad, msg", [
    ({"hostPort": 0, "containerPort": 80}, r"\[0\]\.hostPort: expected a port number"),
    ({"hostPort": 80, "containerPort": "80"}, r"\[0\]\.containerPort"),
    ({"hostPort": 80, "containerPort": 80, "protocol": "icmp"}, r"\[0\]\.protocol: 'icmp'"),
    ({"hostPort": 80, "containerPort": 80, "hostIP": "node"}, r"\[0\]\.hostIP: 'node'"),
    ("80:80", r"\[0\]: expected an object"),
])
def test_a_bad_port_mapping_is_refused_naming_the_entry_and_field(bad, msg):
    with pytest.raises(PortMappingError, match=msg):
        parse_port_mappings([bad])


def test_the_same_host_port_twice_in_one_pod_is_refused():
    with pytest.raises(PortMappingError, match=r"\[1\]: \*:80/TCP is already mapped by .*\[0\]"):
        parse_port_mappings([{"hostPort": 80, "containerPort": 80},
                             {"hostPort": 80, "containerPort": 81}])
    # the same port for another protocol, or on another hostIP, is fine
    parse_port_mappings([{"hostPort": 80, "containerPort": 80},
                         {"hostPort": 80, "containerPort": 80, "protocol": "udp"}])


def test_a_mapping_without_host_ip_answers_on_every_local_address():
    fes = frontends_of(("web", "a"), "10.241.1.20",
                       [PortMapping(8080, 80, "TCP"), PortMapping(53, 5353, "UDP", "10.240.0.11")],
                       ["10.240.0.11", "10.241.1.1", "127.0.0.1"], NODE)
    assert sorted(map(str, fes)) == ["10.240.0.11:53/UDP", "10.240.0.11:8080/TCP",
                                     "10.241.1.1:8080/TCP", "127.0.0.1:8080/TCP"]
    st = fes[Frontend("127.0.0.1", 8080, "TCP")]
    assert st.kind == KIND_HOST_PORT and st.service == ("web", "a")
    assert st.backends == (Backend("10.241.1.20", 80, "TCP", False, NODE),)


def test_ipv6_host_ports_go_to_the_pods_address_of_the_host_ips_family():
    local, local6 = ["10.240.0.11", "127.0.0.1"], ["::1", "fd00::11"]
    ms = [PortMapping(8080, 80, "TCP"), PortMapping(53, 5353, "UDP", "fd00::11"),
          PortMapping(54, 5354, "UDP", "10.240.0.11")]
    # dual stack: without hostIP on every local address of both families
    fes = frontends_of(("web", "a"), "10.241.1.20", ms, local, NODE, "fd00:241::20", local6)
    assert sorted(map(str, fes)) == ["10.240.0.11:54/UDP", "10.240.0.11:8080/TCP",
                                     "127.0.0.1:8080/TCP", "[::1]:8080/TCP",
                                     "[fd00::11]:53/UDP", "[fd00::11]:8080/TCP"]
    assert fes[Frontend("fd00::11", 53, "UDP")].backends == (
        Backend("fd00:241::20", 5353, "UDP", False, NODE),)
    assert fes[Frontend("::1", 8080, "TCP")].backends[0].ip == "fd00:241::20"
    assert fes[Frontend("127.0.0.1", 8080, "TCP")].backends[0].ip == "10.241.1.20"
    assert fes[Frontend("::1", 8080, "TCP")].kind == KIND_HOST_PORT
    # IPv6 only: IPv6 addresses only; an IPv4 hostIP is refused by name
    only6 = frontends_of(("web", "a"), "", ms[:2], local, NODE, "fd00:241::20", local6)
    assert sorted(map(str, only6)) == ["[::1]:8080/TCP", "[fd00::11]:53/UDP",
                                       "[fd00::11]:8080/TCP"]
    assert family_refusal(ms[:2], "", "fd00:241::20") is None
    assert family_refusal(ms, "", "fd00:241::20") == (
        "hostPort 10.240.0.11:54/UDP->5354: hostIP 10.240.0.11 is IPv4, the pod has no "
        "IPv4 address")
    assert family_refusal(ms, "10.241.1.20", "") == (
        "hostPort [fd00::11]:53/UDP->5353: hostIP fd00::11 is IPv6, the pod has no IPv6 address")
    # IPv4 only, as before
    only4 = frontends_of(("web", "a"), "10.241.1.20", ms[::2], local, NODE, "", local6)
    assert sorted(map(str, only4)) == ["10.240.0.11:54/UDP", "10.240.0.11:8080/TCP",
                                       "127.0.0.1:8080/TCP"]


def test_the_local_ipv6_addresses_are_the_global_ones_and_loopback():
    a = node_addresses((), ["10.240.0.11", "fe80::1", "fd00::11", "::1", "2001:db8::5"],
                       primary_device_ips=["10.240.0.11", "fd00::11"])
    assert a.local6 == ("::1", "2001:db8::5", "fd00::11")


def test_a_service_wins_a_host_port_and_two_pods_cannot_share_one():
    hp = HostPorts()
    local = ["10.240.0.11"]
    a = frontends_of(("web", "a"), "10.241.1.20", [PortMapping(30080, 80, "TCP")], local)
    b = frontends_of(("web", "b"), "10.241.1.21", [PortMapping(30080, 80, "TCP")], local)
    hp.set(("web", "a"), a)
    snap = snapshot(service("np", typ="NodePort", ports=[("http", 80, "TCP", 8080, 30080)]),
                    eslice("np-1", "np", [ep("10.0.0.1")]))
    services = compile_services(snap, NODE, ZONE, options=LbOptions(nodeport_ips=tuple(local)))
    fe = Frontend("10.240.0.11", 30080, "TCP")
    # refused at ADD: the Service has it; and another pod would hold it too
    assert [str(c) for c in hp.refusal(("web", "b"), b, services)] == [
        "hostPort 10.240.0.11:30080/TCP of pod web/b is taken by Service shop/np"]
    assert [str(c) for c in hp.refusal(("web", "b"), b, {})] == [
        "hostPort 10.240.0.11:30080/TCP of pod web/b is taken by pod web/a"]
    # the same pod (a new sandbox) replaces its own mappings
    assert hp.refusal(("web", "a"), a, {}) == []
    # a Service that arrives later wins, and the pod's loss is reported
    assert hp.combine(fe, services[fe]) is services[fe]
    assert hp.combine(fe, None).service == ("web", "a")
    assert [str(c) for c in hp.conflicts(services)] == [
        "hostPort 10.240.0.11:30080/TCP of pod web/a is taken by Service shop/np"]
    assert hp.set(("web", "a"), {}) == {fe} and hp.frontends() == set()


# ------------------------------------------------------------- capacity

def st(name, *ips, ranges=(), maglev=False, kind="clusterip"):
    return FrontendState(("shop", name), "http",
                         tuple(Backend(ip, 8080, "TCP") for ip in ips), reject=not ips,
                         kind=kind, maglev=maglev, source_ranges=ranges)


def fe(n, scope=0):
    return Frontend(f"172.16.0.{n}", 80, "TCP", scope)


CAPS = Capacities(services=4, slots=6, backends=5, maglev=1, ranges=2)


def test_services_that_fit_pass_and_the_one_that_would_overflow_is_refused_by_name():
    rec = Reconciler()
    updates = {fe(1): st("a", "10.0.0.1", "10.0.0.2"), fe(2): st("b", "10.0.0.3"),
               fe(3): st("c", "10.0.0.4", "10.0.0.5", "10.0.0.6"), fe(4): st("d", "10.0.0.1")}
    ok, refused = admit(rec, updates, CAPS)
    # c would need a sixth backend: refused whole; d (after it by name) still fits
    assert set(ok) == {fe(1), fe(2), fe(4)}
    assert [str(r) for r in refused] == [
        "Service shop/c refused: the backends map would need 6 entries (capacity 5)"]


def test_a_service_already_in_the_maps_is_never_displaced_by_a_new_one():
    rec, maps = Reconciler(), FakeMaps()
    maps.apply_all(rec.plan({fe(5): st("z", "10.0.0.9")}))
    # a new Service "a" sorts first, but the existing "z" grows first
    updates = {fe(1): st("a", *[f"10.0.1.{i}" for i in range(4)]),
               fe(5): st("z", "10.0.0.9", "10.0.0.8")}
    ok, refused = admit(rec, updates, CAPS)
    assert set(ok) == {fe(5)} and refused[0].owner == ("shop", "a")


def test_removals_always_pass_and_backends_are_freed_only_after_the_additions():
    rec, maps = Reconciler(), FakeMaps()
    maps.apply_all(rec.plan({fe(1): st("a", *[f"10.0.0.{i}" for i in range(5)])}))
    updates = {fe(1): None, fe(2): st("b", "10.0.1.1")}
    ok, refused = admit(rec, updates, CAPS)
    # b's backend is written before a's go: six at the peak
    assert ok == {fe(1): None} and refused[0].map == "backends"


def test_a_removed_frontend_makes_room_for_a_new_one_in_the_same_plan():
    rec, maps = Reconciler(), FakeMaps()
    maps.apply_all(rec.plan({fe(i): st(f"s{i}", "10.0.0.1") for i in range(1, 5)}))
    # the services map is full (4); one goes, one comes: its entry is
    # deleted before the new one is written
    ok, refused = admit(rec, {fe(4): None, fe(9): st("new", "10.0.0.1")}, CAPS)
    assert refused == [] and set(ok) == {fe(4), fe(9)}
    ops = rec.plan_changes(ok)
    assert [type(o).__name__ for o in ops][:2] == ["DeleteService", "DeleteSlots"]


def test_maglev_tables_and_source_ranges_count_against_their_maps():
    rec = Reconciler()
    updates = {fe(1, SCOPE_EXTERNAL): st("a", "10.0.0.1", maglev=True),
               fe(2, SCOPE_EXTERNAL): st("b", "10.0.0.1", maglev=True),
               fe(3): st("c", "10.0.0.1", ranges=("10.0.0.0/8", "192.0.2.0/24", "198.18.0.0/15"))}
    ok, refused = admit(rec, updates, CAPS)
    assert set(ok) == {fe(1, SCOPE_EXTERNAL)}
    assert sorted((r.owner[1], r.map) for r in refused) == [("b", "maglev"), ("c", "ranges")]


def test_host_ports_are_refused_as_a_pods_not_a_services():
    rec = Reconciler()
    hp = frontends_of(("web", "a"), "10.241.1.20", [PortMapping(8080, 80, "TCP")],
                      [f"10.240.0.{i}" for i in range(5)])
    ok, refused = admit(rec, hp, CAPS)
    assert ok == {} and [str(r) for r in refused] == [
        "hostPorts of pod web/a refused: the services map would need 5 entries (capacity 4)"]


# -------------------------------------------------------- address ranges

def test_service_cidrs_drop_and_cluster_ips_reject_unless_another_proxy_owns_them():
    table = ServiceTable(NODE, ZONE)
    table.rebuild(snapshot(service("web"), service("other", ip="172.16.0.11",
                                                   labels={"service.kubernetes.io/"
                                                           "service-proxy-name": "x"})))
    assert table.cluster_ips == {"172.16.0.10": True, "172.16.0.11": False}
    assert entries(table.cluster_ips, ["172.16.0.0/16", "fd00::/108"]) == {
        "172.16.0.0/16": FLAG_RANGE, "172.16.0.10/32": FLAG_CLUSTER_IP, "172.16.0.11/32": 0,
        # the IPv6 range too (its own map, FP_MAP_SVCNET6)
        "fd00::/108": FLAG_RANGE}
    assert table.changed_cluster_ips == {"172.16.0.10", "172.16.0.11"}
