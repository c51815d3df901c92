"""The node's own SCTP clients to IPv6 Services, translated per packet
(test_sctp_node.py's IPv4 walk, over IPv6): fp_to_vpc hands IPv6 to its
IPv6 half, which DNATs an association to an IPv6 ClusterIP, external or
load-balancer IP; replies get the frontend back in fp_vpc6_sctp (a remote
backend, reached through fp_from_vpc and fp_from_vpc6) or fp_from_pod6 (a
local one). Every rewritten CRC32c is recomputed by scapy.

    node 2001:db8:240::11 (eth0, default via ::253) ──┬─ caliB ── pod B 2001:db8:241::11
                                                       └─ eth1 (2001:db8:243::/64 via it)
    remote backends: 2001:db8:242::20 (by eth0's default route), 2001:db8:243::5 (by eth1)
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether

from agent.datapath.maps import DEFS
from tests.bpf.conftest import (NODE_NAME as NODE, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
                                counters, ct_rows, node_datapath, node_netns, node_run as run,
                                node_services, socket_lb_on)
from tests.bpf.sctpnode import SctpNode, whatif
from tests.lb.lbdata import ep, eslice, service

NODE_IP, NODE_IP6 = "10.240.0.11", "2001:db8:240::11"
GW6, GW_MAC = "2001:db8:240::253", "02:00:00:00:02:54"
ENI_GW6, ENI_GW_MAC = "fe80::3:53", "02:00:00:00:03:53"
POD_B, POD_B6 = "10.241.1.11", "2001:db8:241::11"
REMOTE6, REMOTE6_ENI = "2001:db8:242::20", "2001:db8:243::5"
EXT6, LB6 = "2001:db8:113::7", "2001:db8:51::5"
SERVICE_CIDR6 = "fd00:16::/108"
NEAR, FAR, ENI_SVC, NONE, LOCAL = ("fd00:16::20", "fd00:16::21", "fd00:16::22", "fd00:16::23",
                                   "fd00:16::24")

_sport = itertools.count(42000)


@pytest.fixture(scope="module")
def net():
    with node_netns("fpt-sn6", [
        f"addr add {NODE_IP}/24 dev eth0",
        f"-6 addr add {NODE_IP6}/64 dev eth0 nodad",
        f"-6 route add default via {GW6} dev eth0",
        f"-6 neigh add {GW6} lladdr {GW_MAC} dev eth0 nud permanent",
        f"-6 route add 2001:db8:243::/64 via {ENI_GW6} dev eth1",
        f"-6 neigh add {ENI_GW6} lladdr {ENI_GW_MAC} dev eth1 nud permanent",
        f"-6 route add {POD_B6} dev caliB",
    ], sysctls=["net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0"]) as n:
        yield n


@pytest.fixture(scope="module")
def dp(bpffs, net):
    with node_datapath(bpffs, net, "sctp6node", f"172.16.0.0/16,{SERVICE_CIDR6}", NODE_IP,
                       [("B", POD_B, POD_B6)], NODE_IP6) as d:
        yield d


SIG = [("sig", 2905, "SCTP", 2906), ("web", 80, "TCP", 8080)]
SIG_EP = [("sig", 2906, "SCTP"), ("web", 8080, "TCP")]


def svc6(name, ip6, **kw):
    return service(name, ip=ip6, ports=kw.pop("ports", SIG), ipFamilies=["IPv6"],
                   clusterIPs=[ip6], **kw)


def slice6(name, svc, endpoints, ports=SIG_EP):
    return eslice(name, svc, endpoints, ports=ports, address_type="IPv6")


OBJECTS = [
    svc6("near", NEAR), slice6("near-1", "near", [ep(POD_B6, node=NODE)]),
    svc6("far", FAR, externalIPs=[EXT6]),
    slice6("far-1", "far", [ep(REMOTE6, node="node-b")]),
    svc6("eni", ENI_SVC), slice6("eni-1", "eni", [ep(REMOTE6_ENI, node="node-b")]),
    svc6("none", NONE),
    svc6("local", LOCAL, internalTrafficPolicy="Local"),
    slice6("local-1", "local", [ep(REMOTE6, node="node-b")]),
    svc6("fw", "fd00:16::25", typ="LoadBalancer", ports=[("sig", 2905, "SCTP", 2906, 30905)],
         status={"loadBalancer": {"ingress": [{"ip": LB6}]}},
         loadBalancerSourceRanges=["2001:db8:240::/64"]),
    slice6("fw-1", "fw", [ep(REMOTE6, node="node-b")], ports=[("sig", 2906, "SCTP")]),
]


@pytest.fixture(scope="module")
def svcs(dp):
    with node_services(dp, OBJECTS, NODE_IP6, SERVICE_CIDR6) as rec:
        yield rec


# the packets (tests/bpf/sctpnode.py)
PKT = SctpNode(IPv6, NODE_IP6, GW_MAC)
init, data, reply, crc_ok, tuple_of = PKT.init, PKT.data, PKT.reply, PKT.crc_ok, PKT.tuple_of


@pytest.mark.parametrize("vip", [FAR, EXT6], ids=["clusterip", "external-ip"])
def test_the_nodes_sctp_to_a_remote_backend_is_translated_both_ways(dp, net, svcs, vip):
    sport = next(_sport)
    v, out, reason, kind, _ = run(dp, net, "fp_to_vpc", init(net, vip, sport), "eth0")
    assert (v, reason, kind) == (TC_ACT_UNSPEC, "service-translated", "none")
    assert tuple_of(out) == (NODE_IP6, sport, REMOTE6, 2906) and crc_ok(out)
    assert Ether(out)[IPv6].hlim == 64
    assert [r.nat_addr for r in ct_rows(dp, saddr=NODE_IP6, sport=sport, daddr=vip)] == [REMOTE6]

    v, out, *_ = run(dp, net, "fp_from_vpc", reply(REMOTE6, net.mac("eth0"), GW_MAC, 2906,
                                                   sport), "eth0")
    assert v == TC_ACT_UNSPEC, "to the node's stack"
    assert tuple_of(out) == (vip, 2905, NODE_IP6, sport) and crc_ok(out)

    for size in (0, 1, 3, 700, 1400):
        v, out, reason, *_ = run(dp, net, "fp_to_vpc", data(net, vip, sport, b"d" * size),
                                 "eth0")
        assert (v, reason) == (TC_ACT_UNSPEC, "service-translated")
        assert tuple_of(out) == (NODE_IP6, sport, REMOTE6, 2906) and crc_ok(out), size
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         reply(REMOTE6, net.mac("eth0"), GW_MAC, 2906, sport, b"r" * size), "eth0")
        assert tuple_of(out) == (vip, 2905, NODE_IP6, sport) and crc_ok(out), size


def test_a_backend_reached_by_another_interface_is_redirected_there(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", init(net, ENI_SVC, sport), "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-eni", "redirect",
                                      net.idx("eth1"))
    assert (Ether(out).src, Ether(out).dst) == (net.mac("eth1"), ENI_GW_MAC)
    assert tuple_of(out) == (NODE_IP6, sport, REMOTE6_ENI, 2906) and crc_ok(out)


def test_the_nodes_sctp_to_a_local_backend_goes_into_its_veth_and_the_reply_gets_the_vip(
        dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", init(net, NEAR, sport), "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    assert (Ether(out).src, Ether(out).dst) == (net.mac("caliB"), net.pod_mac["B"])
    assert tuple_of(out) == (NODE_IP6, sport, POD_B6, 2906) and crc_ok(out)
    v, again, *_ = run(dp, net, "fp_to_pod", out, "caliB")
    assert v == TC_ACT_UNSPEC and again == out

    for payload in (None, b"y" * 77):
        v, out, *_ = run(dp, net, "fp_from_pod",
                         reply(POD_B6, net.mac("caliB"), net.pod_mac["B"], 2906, sport, payload),
                         "caliB")
        assert v == TC_ACT_UNSPEC, "to the node's stack"
        assert tuple_of(out) == (NEAR, 2905, NODE_IP6, sport) and crc_ok(out)


def test_source_ranges_traffic_policy_and_unknown_chunks(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, *_ = run(dp, net, "fp_to_vpc", init(net, LB6, sport), "eth0")
    assert (v, reason) == (TC_ACT_UNSPEC, "service-translated")
    assert tuple_of(out) == (NODE_IP6, sport, REMOTE6, 2906) and crc_ok(out)
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", init(net, LB6, sport, src="2001:db8:99::1"),
                           "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-source-range")
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", init(net, LOCAL, next(_sport)), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-no-local-backend")
    sport = next(_sport)
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", data(net, FAR, sport), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")
    assert ct_rows(dp, saddr=NODE_IP6, sport=sport) == []


def test_no_endpoints_rejects_into_the_nodes_own_stack(dp, net, svcs):
    sent = init(net, NONE, next(_sport))
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", sent, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend",
                                      "redirect-ingress", net.idx("eth0"))
    o = Ether(out)
    assert ICMPv6DestUnreach in o and o[ICMPv6DestUnreach].code == 4
    assert (o[IPv6].src, o[IPv6].dst, o.dst) == (NONE, NODE_IP6, net.mac("eth0"))
    # the IPv6 header and 20 bytes of SCTP (the INIT's initiate tag)
    assert bytes(o[ICMPv6DestUnreach].payload) == bytes(sent[IPv6])[:60]
    fresh = o.copy()
    del fresh[ICMPv6DestUnreach].cksum
    assert Ether(bytes(fresh))[ICMPv6DestUnreach].cksum == o[ICMPv6DestUnreach].cksum


def test_tcp_leaves_unchanged_while_socket_lb_is_on(dp, net, svcs):
    syn = Ether(src=net.mac("eth0"), dst=GW_MAC) / IPv6(src=NODE_IP6, dst=NEAR) / \
        TCP(sport=45000, dport=80, flags="S")
    with socket_lb_on(dp):
        v, out, *_ = run(dp, net, "fp_to_vpc", syn, "eth0")
    assert v == TC_ACT_UNSPEC and out == bytes(syn)


def test_a_whatif_init_from_the_node_changes_nothing(dp, net, svcs):
    sport = next(_sport)
    before = counters(dp, by_family=True)
    res, rec = whatif(dp, net, init(net, FAR, sport))
    assert (res.retval, DEFS.reason(rec.reason)) == (TC_ACT_UNSPEC, "service-translated")
    assert rec.svc_id != 0 and dp.lb.backends()[rec.backend_id][0] == REMOTE6
    assert tuple_of(res.data) == (NODE_IP6, sport, REMOTE6, 2906)
    assert ct_rows(dp, saddr=NODE_IP6, sport=sport) == []
    assert counters(dp, by_family=True) == before
