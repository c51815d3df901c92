"""The node's own SCTP clients to Services, translated per packet: socket-LB
leaves SCTP sockets alone, so fp_to_vpc (egress of the interface the node's
route picked) DNATs an association to a ClusterIP, external or
load-balancer IP, and its replies get the frontend back in fp_from_vpc (a
remote backend) or fp_from_pod (a local one). Run through the real
programs with BPF_PROG_TEST_RUN; every rewritten CRC32c is recomputed by
scapy.

    node 10.240.0.11 (eth0, default via .253) ──┬─ caliB ── pod B 10.241.1.11
                                                 └─ eth1 (ENI; 10.243.0.0/16 via it)
    remote backends: 10.242.2.20 (by eth0's default route), 10.243.0.5 (by eth1)
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP

from agent.datapath.maps import DEFS
from tests.bpf.conftest import (NODE_NAME as NODE, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
                                counters, ct_rows, node_datapath, node_run as run, node_services,
                                routed_node, socket_lb_on)
from tests.bpf.sctpnode import SctpNode, prog_run, whatif
from tests.lb.lbdata import ep, eslice, service

NODE_IP, GW, GW_MAC = "10.240.0.11", "10.240.0.253", "02:00:00:00:02:54"
ENI_IP, ENI_GW, ENI_GW_MAC = "10.241.1.1", "10.241.255.253", "02:00:00:00:03:53"
POD_B = "10.241.1.11"
REMOTE, REMOTE_ENI = "10.242.2.20", "10.243.0.5"
EXT_IP, LB_IP = "203.0.113.7", "198.51.100.5"
SERVICE_CIDR = "172.16.0.0/16"
NEAR, FAR, ENI_SVC, NONE, LOCAL = ("172.16.0.20", "172.16.0.21", "172.16.0.22",
                                   "172.16.0.23", "172.16.0.24")

_sport = itertools.count(41000)


@pytest.fixture(scope="module")
def net():
    with routed_node("fpt-sn", NODE_IP, GW, GW_MAC, ENI_IP, ENI_GW, ENI_GW_MAC, POD_B) as n:
        yield n


@pytest.fixture(scope="module")
def dp(bpffs, net):
    with node_datapath(bpffs, net, "sctpnode", SERVICE_CIDR, NODE_IP,
                       [("B", POD_B, None)]) as d:
        yield d


SIG = [("sig", 2905, "SCTP", 2906), ("web", 80, "TCP", 8080)]
SIG_EP = [("sig", 2906, "SCTP"), ("web", 8080, "TCP")]

OBJECTS = [
    service("near", ip=NEAR, ports=SIG), eslice("near-1", "near", [ep(POD_B, node=NODE)],
                                                ports=SIG_EP),
    service("far", ip=FAR, ports=SIG, externalIPs=[EXT_IP]),
    eslice("far-1", "far", [ep(REMOTE, node="node-b")], ports=SIG_EP),
    service("eni", ip=ENI_SVC, ports=SIG),
    eslice("eni-1", "eni", [ep(REMOTE_ENI, node="node-b")], ports=SIG_EP),
    service("none", ip=NONE, ports=SIG),
    # internalTrafficPolicy Local, its only endpoint elsewhere
    service("local", ip=LOCAL, ports=SIG, internalTrafficPolicy="Local"),
    eslice("local-1", "local", [ep(REMOTE, node="node-b")], ports=SIG_EP),
    # a load balancer the node's subnet may reach, and no one else
    service("fw", ip="172.16.0.25", typ="LoadBalancer", ports=[("sig", 2905, "SCTP", 2906, 30905)],
            status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}},
            loadBalancerSourceRanges=["10.240.0.0/24"]),
    eslice("fw-1", "fw", [ep(REMOTE, node="node-b")], ports=[("sig", 2906, "SCTP")]),
]


@pytest.fixture(scope="module")
def svcs(dp):
    with node_services(dp, OBJECTS, NODE_IP, SERVICE_CIDR) as rec:
        yield rec


# -- packets (tests/bpf/sctpnode.py) ---------------------------------------------

PKT = SctpNode(IP, NODE_IP, GW_MAC)
init, data, reply, crc_ok, tuple_of = PKT.init, PKT.data, PKT.reply, PKT.crc_ok, PKT.tuple_of


# -- a remote backend ------------------------------------------------------------

@pytest.mark.parametrize("vip", [FAR, EXT_IP], ids=["clusterip", "external-ip"])
def test_the_nodes_sctp_to_a_remote_backend_is_translated_both_ways(dp, net, svcs, vip):
    sport = next(_sport)
    v, out, reason, kind, _ = run(dp, net, "fp_to_vpc", init(net, vip, sport), "eth0")
    # the backend is behind the frontend's own route: the packet goes on out
    assert (v, reason, kind) == (TC_ACT_UNSPEC, "service-translated", "none")
    assert tuple_of(out) == (NODE_IP, sport, REMOTE, 2906) and crc_ok(out)
    assert Ether(out).dst == GW_MAC and Ether(out)[IP].ttl == 64, "the node's own: no hop"
    assert [r.nat_addr for r in ct_rows(dp, saddr=NODE_IP, sport=sport, daddr=vip)] == [REMOTE]

    back = reply(REMOTE, net.mac("eth0"), GW_MAC, 2906, sport)
    v, out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
    assert v == TC_ACT_UNSPEC, "to the node's stack"
    assert tuple_of(out) == (vip, 2905, NODE_IP, sport) and crc_ok(out)

    # DATA both ways keeps the association's backend
    for size in (0, 1, 3, 700, 1400):
        v, out, reason, *_ = run(dp, net, "fp_to_vpc", data(net, vip, sport, b"d" * size),
                                 "eth0")
        assert (v, reason) == (TC_ACT_UNSPEC, "service-translated")
        assert tuple_of(out) == (NODE_IP, sport, REMOTE, 2906) and crc_ok(out), size
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         reply(REMOTE, net.mac("eth0"), GW_MAC, 2906, sport, b"r" * size),
                         "eth0")
        assert tuple_of(out) == (vip, 2905, NODE_IP, sport) and crc_ok(out), size


def test_a_backend_reached_by_another_interface_is_redirected_there(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", init(net, ENI_SVC, sport), "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-eni", "redirect",
                                      net.idx("eth1"))
    o = Ether(out)
    assert (o.src, o.dst) == (net.mac("eth1"), ENI_GW_MAC)
    assert tuple_of(out) == (NODE_IP, sport, REMOTE_ENI, 2906) and crc_ok(out)


def test_a_gso_packet_longer_than_the_link_is_still_redirected(dp, net, svcs):
    """The node's SCTP may hand its device a GSO packet longer than the MTU
    (the segments are cut later): the FIB is not asked to check its length."""
    sport = next(_sport)
    run(dp, net, "fp_to_vpc", init(net, ENI_SVC, sport), "eth0")
    big = data(net, ENI_SVC, sport, b"g" * 2800)
    res, rec = prog_run(dp, net, "fp_to_vpc", big, "eth0", gso_size=1400, gso_segs=2)
    assert (res.retval, DEFS.reason(rec.reason), rec.ifindex) == \
        (TC_ACT_REDIRECT, "redirected-eni", net.idx("eth1"))
    assert tuple_of(res.data) == (NODE_IP, sport, REMOTE_ENI, 2906) and crc_ok(res.data)


def test_a_zero_crc_stays_zero(dp, net, svcs):
    sport = next(_sport)
    pkt = init(net, FAR, sport)
    pkt[SCTP].chksum = 0
    v, out, *_ = run(dp, net, "fp_to_vpc", pkt, "eth0")
    assert v == TC_ACT_UNSPEC and Ether(out)[SCTP].chksum == 0
    assert tuple_of(out) == (NODE_IP, sport, REMOTE, 2906)


# -- a local backend -------------------------------------------------------------

def test_the_nodes_sctp_to_a_local_backend_goes_into_its_veth_and_the_reply_gets_the_vip(
        dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", init(net, NEAR, sport), "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    o = Ether(out)
    assert (o.src, o.dst) == (net.mac("caliB"), net.pod_mac["B"])
    assert tuple_of(out) == (NODE_IP, sport, POD_B, 2906) and crc_ok(out)
    # the pod's veth egress (fp_to_pod) lets it in unchanged
    v, again, *_ = run(dp, net, "fp_to_pod", out, "caliB")
    assert v == TC_ACT_UNSPEC and again == out

    back = reply(POD_B, net.mac("caliB"), net.pod_mac["B"], 2906, sport)
    v, out, *_ = run(dp, net, "fp_from_pod", back, "caliB")
    assert v == TC_ACT_UNSPEC, "to the node's stack"
    assert tuple_of(out) == (NEAR, 2905, NODE_IP, sport) and crc_ok(out)

    v, out, reason, kind, _ = run(dp, net, "fp_to_vpc", data(net, NEAR, sport, b"x" * 333), "eth0")
    assert (v, kind) == (TC_ACT_REDIRECT, "redirect")
    assert tuple_of(out) == (NODE_IP, sport, POD_B, 2906) and crc_ok(out)
    v, out, *_ = run(dp, net, "fp_from_pod",
                     reply(POD_B, net.mac("caliB"), net.pod_mac["B"], 2906, sport, b"y" * 77),
                     "caliB")
    assert v == TC_ACT_UNSPEC
    assert tuple_of(out) == (NEAR, 2905, NODE_IP, sport) and crc_ok(out)


# -- source ranges, traffic policy, reject, drop -----------------------------------

def test_a_load_balancer_ip_admits_the_node_only_from_its_source_ranges(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, *_ = run(dp, net, "fp_to_vpc", init(net, LB_IP, sport), "eth0")
    assert (v, reason) == (TC_ACT_UNSPEC, "service-translated")
    assert tuple_of(out) == (NODE_IP, sport, REMOTE, 2906) and crc_ok(out)
    before = counters(dp)
    key = (net.idx("eth0"), "to-vpc", "dropped-source-range")
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", init(net, LB_IP, sport, src="10.240.1.99"),
                           "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-source-range")
    assert counters(dp).get(key, 0) == before.get(key, 0) + 1
    assert ct_rows(dp, saddr="10.240.1.99") == []


def test_internal_traffic_policy_local_without_a_local_endpoint_drops(dp, net, svcs):
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", init(net, LOCAL, next(_sport)), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-no-local-backend")


def test_no_endpoints_rejects_into_the_nodes_own_stack(dp, net, svcs):
    sport = next(_sport)
    sent = init(net, NONE, sport)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", sent, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend", "redirect-ingress",
                                      net.idx("eth0"))
    o = Ether(out)
    assert (o[ICMP].type, o[ICMP].code) == (3, 3)
    assert (o[IP].src, o[IP].dst, o.dst) == (NONE, NODE_IP, net.mac("eth0"))
    # the IP header and 20 bytes of SCTP: the node's SCTP matches an error
    # about an INIT by the initiate tag (after the common and chunk headers)
    assert bytes(o[ICMP].payload) == bytes(sent[IP])[:40], "quotes the INIT's initiate tag"
    assert o[IP].len == 68 and o[ICMP].chksum == Ether(bytes(_fresh_icmp(o)))[ICMP].chksum
    # coming in on eth0, it is the node's: fp_from_vpc leaves it to the stack
    v, again, *_ = run(dp, net, "fp_from_vpc", out, "eth0")
    assert v == TC_ACT_UNSPEC and again == out


def _fresh_icmp(o):
    fresh = o.copy()
    del fresh[ICMP].chksum
    return fresh


def test_a_chunk_of_an_unknown_association_is_dropped(dp, net, svcs):
    sport = next(_sport)
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", data(net, FAR, sport), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")
    assert ct_rows(dp, saddr=NODE_IP, sport=sport) == []


def test_tcp_and_non_service_sctp_leave_unchanged(dp, net, svcs):
    syn = Ether(src=net.mac("eth0"), dst=GW_MAC) / IP(src=NODE_IP, dst=NEAR) / \
        TCP(sport=45000, dport=80, flags="S")
    with socket_lb_on(dp):
        v, out, *_ = run(dp, net, "fp_to_vpc", syn, "eth0")
    assert v == TC_ACT_UNSPEC and out == bytes(syn), "TCP is socket-LB's while it is on"
    plain = init(net, REMOTE, next(_sport), dport=2906)
    v, out, *_ = run(dp, net, "fp_to_vpc", plain, "eth0")
    assert v == TC_ACT_UNSPEC and out == bytes(plain)


# -- what-if (fastpath trace) ----------------------------------------------------------

def test_a_whatif_init_from_the_node_shows_its_translation_and_changes_nothing(dp, net, svcs):
    sport = next(_sport)
    before = counters(dp)
    res, rec = whatif(dp, net, init(net, FAR, sport))
    assert (res.retval, DEFS.reason(rec.reason)) == (TC_ACT_UNSPEC, "service-translated")
    assert rec.svc_id != 0 and dp.lb.backends()[rec.backend_id][0] == REMOTE
    assert tuple_of(res.data) == (NODE_IP, sport, REMOTE, 2906)
    assert ct_rows(dp, saddr=NODE_IP, sport=sport) == []
    assert counters(dp) == before
