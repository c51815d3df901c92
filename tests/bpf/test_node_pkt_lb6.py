"""test_node_pkt_lb.py over IPv6: the node's own TCP and UDP to IPv6
Services, translated per packet while socket-LB is off (fp_to_vpc's IPv6
half, fp_to_vpc6_node; fp_lo's fp_lo6_run); the replies get the frontend
back in fp_vpc6_node (a remote backend, reached through fp_from_vpc and
fp_from_vpc6) and fp_from_pod6 (a local one). With FP_CFG_F_SOCKLB set the
same packets pass unchanged. Every rewritten checksum is recomputed by
scapy.

    node 2001:db8:240::11 (eth0, default via ::253) ── caliB ── pod B 2001:db8:241::11
    remote backend: 2001:db8:242::20 (by eth0's default route)
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether

from tests.bpf.conftest import (NODE_NAME as NODE, TC_ACT_REDIRECT, TC_ACT_SHOT,
                                TC_ACT_UNSPEC, ct_rows, node_datapath, node_netns,
                                lo_run as on_lo, node_run as run, node_services, socket_lb_on)
from tests.lb.lbdata import ep, eslice, service

NODE_IP, NODE_IP6 = "10.240.0.11", "2001:db8:240::11"
GW6, GW_MAC = "2001:db8:240::253", "02:00:00:00:02:54"
POD_B, POD_B6 = "10.241.1.11", "2001:db8:241::11"
REMOTE6 = "2001:db8:242::20"
SERVICE_CIDR6 = "fd00:16::/108"
NEAR, FAR, NONE, HOST = "fd00:16::20", "fd00:16::21", "fd00:16::23", "fd00:16::26"
NODEPORT = 30080

_sport = itertools.count(43000)


@pytest.fixture(scope="module")
def net():
    with node_netns("fpt-npl6", [
        f"addr add {NODE_IP}/24 dev eth0",
        f"-6 addr add {NODE_IP6}/64 dev eth0 nodad",
        f"-6 route add default via {GW6} dev eth0",
        f"-6 neigh add {GW6} lladdr {GW_MAC} dev eth0 nud permanent",
        f"-6 route add {POD_B6} dev caliB",
    ], sysctls=["net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0"]) as n:
        yield n


@pytest.fixture(scope="module")
def dp(bpffs, net):
    with node_datapath(bpffs, net, "nodepktlb6", f"172.16.0.0/16,{SERVICE_CIDR6}", NODE_IP,
                       [("B", POD_B, POD_B6)], NODE_IP6) as d:
        yield d


PORTS = [("web", 80, "TCP", 8080), ("dns", 53, "UDP", 5353)]
EP_PORTS = [("web", 8080, "TCP"), ("dns", 5353, "UDP")]


def svc6(name, ip6, **kw):
    return service(name, ip=ip6, ports=kw.pop("ports", PORTS), ipFamilies=["IPv6"],
                   clusterIPs=[ip6], **kw)


def slice6(name, svc, endpoints):
    return eslice(name, svc, endpoints, ports=EP_PORTS, address_type="IPv6")


OBJECTS = [
    svc6("near", NEAR, typ="NodePort",
         ports=[("web", 80, "TCP", 8080, NODEPORT), ("dns", 53, "UDP", 5353, NODEPORT)]),
    slice6("near-1", "near", [ep(POD_B6, node=NODE)]),
    svc6("far", FAR), slice6("far-1", "far", [ep(REMOTE6, node="node-b")]),
    svc6("none", NONE),
    # a host-network backend: the node itself
    svc6("host", HOST), slice6("host-1", "host", [ep(NODE_IP6, node=NODE)]),
]


@pytest.fixture(scope="module")
def svcs(dp):
    with node_services(dp, OBJECTS, NODE_IP6, SERVICE_CIDR6) as rec:
        yield rec


# -- packets ---------------------------------------------------------------------

def sent(net, l4, dst, sport, dport=None, flags="S", payload=b"", src=NODE_IP6, macs=None):
    """The node's TCP segment (or UDP datagram) as it leaves eth0 (or, with
    macs, another device)."""
    smac, dmac = macs or (net.mac("eth0"), GW_MAC)
    ip = Ether(src=smac, dst=dmac) / IPv6(src=src, dst=dst, hlim=64)
    if l4 is TCP:
        return ip / TCP(sport=sport, dport=dport or 80, flags=flags, seq=1000) / payload
    return ip / UDP(sport=sport, dport=dport or 53) / (payload or b"q")


def answer(l4, src, sport, dport, dst_mac, src_mac, payload=b"a"):
    ip = Ether(src=src_mac, dst=dst_mac) / IPv6(src=src, dst=NODE_IP6, hlim=63)
    if l4 is TCP:
        return ip / TCP(sport=sport, dport=dport, flags="SA", seq=5000, ack=1001) / payload
    return ip / UDP(sport=sport, dport=dport) / payload


def sums_ok(out: bytes) -> bool:
    o, fresh = Ether(out), Ether(out)
    l4 = TCP if TCP in o else UDP
    del fresh[l4].chksum
    return Ether(bytes(fresh))[l4].chksum == o[l4].chksum


def tuple_of(out: bytes):
    o = Ether(out)
    l4 = TCP if TCP in o else UDP
    return o[IPv6].src, o[l4].sport, o[IPv6].dst, o[l4].dport


TARGET = {TCP: (80, 8080), UDP: (53, 5353)}
BOTH = pytest.mark.parametrize("l4", [TCP, UDP], ids=["tcp", "udp"])


# -- remote and local backends -------------------------------------------------------

@BOTH
def test_the_nodes_traffic_to_a_remote_backend_is_translated_both_ways(dp, net, svcs, l4):
    port, target = TARGET[l4]
    sport = next(_sport)
    for size in (1, 700):
        v, out, reason, kind, _ = run(dp, net, "fp_to_vpc",
                                      sent(net, l4, FAR, sport, payload=b"d" * size,
                                           flags="S" if size == 1 else "PA"), "eth0")
        assert (v, reason, kind) == (TC_ACT_UNSPEC, "service-translated", "none"), size
        assert tuple_of(out) == (NODE_IP6, sport, REMOTE6, target) and sums_ok(out)
        assert Ether(out)[IPv6].hlim == 64
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         answer(l4, REMOTE6, target, sport, net.mac("eth0"), GW_MAC,
                                b"r" * size), "eth0")
        assert v == TC_ACT_UNSPEC, "to the node's stack"
        assert tuple_of(out) == (FAR, port, NODE_IP6, sport) and sums_ok(out), size
    assert [r.nat_addr for r in ct_rows(dp, saddr=NODE_IP6, sport=sport, daddr=FAR)] == [REMOTE6]


@BOTH
def test_the_nodes_traffic_to_a_local_backend_goes_into_its_veth_and_the_reply_gets_the_vip(
        dp, net, svcs, l4):
    port, target = TARGET[l4]
    sport = next(_sport)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", sent(net, l4, NEAR, sport), "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    assert tuple_of(out) == (NODE_IP6, sport, POD_B6, target) and sums_ok(out)
    back = answer(l4, POD_B6, target, sport, net.mac("caliB"), net.pod_mac["B"])
    v, out, *_ = run(dp, net, "fp_from_pod", back, "caliB")
    assert tuple_of(out) == (NEAR, port, NODE_IP6, sport) and sums_ok(out)


@pytest.mark.parametrize("vip,local,backend", [(FAR, False, REMOTE6), (NEAR, True, POD_B6)],
                         ids=["remote", "local"])
def test_a_fragmented_udp_datagram_follows_its_first_fragment(dp, net, svcs, vip, local,
                                                              backend):
    sport = next(_sport)
    whole = IPv6(src=NODE_IP6, dst=vip, hlim=64) / IPv6ExtHdrFragment(id=sport) / \
        UDP(sport=sport, dport=53) / (b"f" * 3000)
    frags = [Ether(src=net.mac("eth0"), dst=GW_MAC) / f
             for f in fragment6(whole, 1280)]
    assert len(frags) == 3
    outs = []
    for f in frags:
        v, out, *_ = run(dp, net, "fp_to_vpc", f, "eth0")
        assert (v == TC_ACT_REDIRECT) == local
        o = Ether(out)
        assert (o[IPv6].src, o[IPv6].dst) == (NODE_IP6, backend)
        outs.append(o)
    # the pieces make the translated datagram, its checksum right
    payload = b"".join(bytes(o[IPv6ExtHdrFragment].payload) for o in outs)
    got = UDP(payload)
    assert (got.dport, len(got.payload)) == (5353, 3000)
    fresh = IPv6(src=NODE_IP6, dst=backend) / UDP(sport=sport, dport=5353) / (b"f" * 3000)
    assert IPv6(bytes(fresh))[UDP].chksum == got.chksum


def test_a_host_network_backend_is_reached_through_lo(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", sent(net, TCP, HOST, sport), "eth0")
    assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect-ingress", 1)
    assert tuple_of(out) == (NODE_IP6, sport, NODE_IP6, 8080) and sums_ok(out)


# -- the node's own NodePort, through lo ---------------------------------------------

ZERO = ("00:00:00:00:00:00", "00:00:00:00:00:00")


def test_the_nodes_udp_to_its_own_nodeport_is_translated_on_lo(dp, net, svcs):
    sport = next(_sport)
    pkt = sent(net, UDP, NODE_IP6, sport, dport=NODEPORT, macs=ZERO)
    v, out, reason, kind, idx = on_lo(dp, net, pkt)
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    assert tuple_of(out) == (NODE_IP6, sport, POD_B6, 5353) and sums_ok(out)
    back = answer(UDP, POD_B6, 5353, sport, net.mac("caliB"), net.pod_mac["B"])
    v, out, *_ = run(dp, net, "fp_from_pod", back, "caliB")
    assert tuple_of(out) == (NODE_IP6, NODEPORT, NODE_IP6, sport) and sums_ok(out)


def test_a_host_network_backends_reply_on_lo_gets_the_frontend_back(dp, net, svcs):
    """The node reaching a Service whose backend is the node itself: the
    backend's answer leaves by lo, where fp_lo puts the frontend back."""
    sport = next(_sport)
    run(dp, net, "fp_to_vpc", sent(net, UDP, HOST, sport), "eth0")
    back = answer(UDP, NODE_IP6, 5353, sport, *ZERO)
    v, out, reason, *_ = on_lo(dp, net, back)
    assert (v, reason) == (TC_ACT_UNSPEC, "service-reply-restored")
    assert tuple_of(out) == (HOST, 53, NODE_IP6, sport) and sums_ok(out)


# -- reject, mid-stream, socket-LB on ------------------------------------------------------

@BOTH
def test_no_endpoints_rejects_into_the_nodes_own_stack(dp, net, svcs, l4):
    pkt = sent(net, l4, NONE, next(_sport))
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", pkt, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend",
                                      "redirect-ingress", net.idx("eth0"))
    o = Ether(out)
    assert ICMPv6DestUnreach in o and o[ICMPv6DestUnreach].code == 4
    assert (o[IPv6].src, o[IPv6].dst) == (NONE, NODE_IP6)


def test_a_mid_stream_segment_of_an_unknown_connection_is_dropped(dp, net, svcs):
    sport = next(_sport)
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", sent(net, TCP, FAR, sport, flags="A"), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")


def test_with_socket_lb_on_the_same_packets_pass_unchanged(dp, net, svcs):
    sports = [next(_sport) for _ in range(5)]
    with socket_lb_on(dp):
        for pkt in (sent(net, TCP, FAR, sports[0]), sent(net, UDP, FAR, sports[1]),
                    sent(net, UDP, NEAR, sports[2]), sent(net, TCP, NONE, sports[3])):
            v, out, *_ = run(dp, net, "fp_to_vpc", pkt, "eth0")
            assert v == TC_ACT_UNSPEC and out == bytes(pkt), pkt.summary()
        pkt = sent(net, UDP, NODE_IP6, sports[4], dport=NODEPORT, macs=ZERO)
        v, out, *_ = on_lo(dp, net, pkt)
        assert v == TC_ACT_UNSPEC and out == bytes(pkt)
    for sport in sports:
        assert ct_rows(dp, saddr=NODE_IP6, sport=sport) == [], "no flow made"


def test_with_socket_lb_on_a_remote_backends_packet_to_the_node_is_not_looked_up(dp, net, svcs):
    sport = next(_sport)
    run(dp, net, "fp_to_vpc", sent(net, UDP, FAR, sport), "eth0")
    back = answer(UDP, REMOTE6, 5353, sport, net.mac("eth0"), GW_MAC)
    with socket_lb_on(dp):
        v, out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
        assert v == TC_ACT_UNSPEC and out == bytes(back)
    v, out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
    assert tuple_of(out) == (FAR, 53, NODE_IP6, sport)
