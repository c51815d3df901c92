"""The node's own TCP and UDP to Services, translated per packet while
socket-LB is off (the config map's FP_CFG_F_SOCKLB clear): fp_to_vpc DNATs
them on the way out as it does the node's SCTP (bpf/eni.c fp_to_vpc_node),
fp_lo takes them to the node's own addresses, and the replies get the
frontend back in fp_from_vpc (a remote backend) or fp_from_pod (a local
one). With the flag set, the same packets pass unchanged: the sockets
translated them. Run through the real programs with BPF_PROG_TEST_RUN;
every rewritten checksum is recomputed by scapy.

    node 10.240.0.11 (eth0, default via .253) ──┬─ caliB ── pod B 10.241.1.11
                                                 └─ eth1 (ENI; 10.243.0.0/16 via it)
    remote backends: 10.242.2.20 (by eth0's default route)
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, defragment, fragment
from scapy.layers.l2 import Ether

from tests.bpf.conftest import (NODE_NAME as NODE, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
                                ct_rows, lo_run as on_lo, node_datapath, node_run as run, node_services,
                                routed_node, socket_lb_on)
from tests.lb.lbdata import ep, eslice, service

NODE_IP, GW, GW_MAC = "10.240.0.11", "10.240.0.253", "02:00:00:00:02:54"
ENI_IP, ENI_GW, ENI_GW_MAC = "10.241.1.1", "10.241.255.253", "02:00:00:00:03:53"
POD_B = "10.241.1.11"
REMOTE = "10.242.2.20"
LB_IP = "198.51.100.5"
SERVICE_CIDR = "172.16.0.0/16"
NEAR, FAR, NONE, LOCAL, HOST = ("172.16.0.20", "172.16.0.21", "172.16.0.23", "172.16.0.24",
                                "172.16.0.26")
NODEPORT = 30080

_sport = itertools.count(42000)


@pytest.fixture(scope="module")
def net():
    with routed_node("fpt-npl", NODE_IP, GW, GW_MAC, ENI_IP, ENI_GW, ENI_GW_MAC, POD_B) as n:
        yield n


@pytest.fixture(scope="module")
def dp(bpffs, net):
    with node_datapath(bpffs, net, "nodepktlb", SERVICE_CIDR, NODE_IP,
                       [("B", POD_B, None)]) as d:
        yield d


PORTS = [("web", 80, "TCP", 8080), ("dns", 53, "UDP", 5353)]
EP_PORTS = [("web", 8080, "TCP"), ("dns", 5353, "UDP")]

OBJECTS = [
    service("near", ip=NEAR, typ="NodePort",
            ports=[("web", 80, "TCP", 8080, NODEPORT), ("dns", 53, "UDP", 5353, NODEPORT)]),
    eslice("near-1", "near", [ep(POD_B, node=NODE)], ports=EP_PORTS),
    service("far", ip=FAR, ports=PORTS),
    eslice("far-1", "far", [ep(REMOTE, node="node-b")], ports=EP_PORTS),
    service("none", ip=NONE, ports=PORTS),
    service("local", ip=LOCAL, ports=PORTS, internalTrafficPolicy="Local"),
    eslice("local-1", "local", [ep(REMOTE, node="node-b")], ports=EP_PORTS),
    # a host-network backend: the node itself
    service("host", ip=HOST, ports=PORTS),
    eslice("host-1", "host", [ep(NODE_IP, node=NODE)], ports=EP_PORTS),
    # a load balancer the node's subnet may reach, and no one else
    service("fw", ip="172.16.0.25", typ="LoadBalancer", ports=[("web", 80, "TCP", 8080, 30081)],
            status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}},
            loadBalancerSourceRanges=["10.240.0.0/24"]),
    eslice("fw-1", "fw", [ep(REMOTE, node="node-b")], ports=[("web", 8080, "TCP")]),
]


@pytest.fixture(scope="module")
def svcs(dp):
    with node_services(dp, OBJECTS, NODE_IP, SERVICE_CIDR) as rec:
        yield rec


# -- packets ---------------------------------------------------------------------

def out_of(net, dev="eth0", mac=GW_MAC):
    return Ether(src=net.mac(dev), dst=mac)


def tcp(net, dst, sport, dport=80, flags="S", payload=b"", src=NODE_IP, seq=1000, ack=0):
    return out_of(net) / IP(src=src, dst=dst) / \
        TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / payload


def udp(net, dst, sport, dport=53, payload=b"q", src=NODE_IP):
    return out_of(net) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload


def answer(l4, src, sport, dport, dst_mac, src_mac, flags="SA", payload=b""):
    """The backend's reply to the node: a TCP segment or a UDP datagram."""
    ip = Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=NODE_IP, ttl=63)
    if l4 is TCP:
        return ip / TCP(sport=sport, dport=dport, flags=flags, seq=5000, ack=1001) / payload
    return ip / UDP(sport=sport, dport=dport) / payload


def sums_ok(out: bytes) -> bool:
    """The IPv4 header's and the L4 checksums as scapy computes them afresh:
    every rewrite updated them."""
    o, fresh = Ether(out), Ether(out)
    l4 = TCP if TCP in o else UDP
    del fresh[IP].chksum
    del fresh[l4].chksum
    fresh = Ether(bytes(fresh))
    return (fresh[IP].chksum, fresh[l4].chksum) == (o[IP].chksum, o[l4].chksum)


def tuple_of(out: bytes):
    o = Ether(out)
    l4 = TCP if TCP in o else UDP
    return o[IP].src, o[l4].sport, o[IP].dst, o[l4].dport


# -- a remote backend ------------------------------------------------------------

def test_the_nodes_tcp_to_a_remote_backend_is_translated_both_ways(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, _ = run(dp, net, "fp_to_vpc", tcp(net, FAR, sport), "eth0")
    assert (v, reason, kind) == (TC_ACT_UNSPEC, "service-translated", "none")
    assert tuple_of(out) == (NODE_IP, sport, REMOTE, 8080) and sums_ok(out)
    assert Ether(out).dst == GW_MAC and Ether(out)[IP].ttl == 64, "the node's own: no hop"
    assert [r.nat_addr for r in ct_rows(dp, saddr=NODE_IP, sport=sport, daddr=FAR)] == [REMOTE]

    back = answer(TCP, REMOTE, 8080, sport, net.mac("eth0"), GW_MAC)
    v, out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
    assert v == TC_ACT_UNSPEC, "to the node's stack"
    assert tuple_of(out) == (FAR, 80, NODE_IP, sport) and sums_ok(out)

    # the handshake's ACK and data both ways stay on the flow's backend
    for flags, size in (("A", 0), ("PA", 1), ("PA", 700), ("PA", 1400)):
        v, out, reason, *_ = run(dp, net, "fp_to_vpc",
                                 tcp(net, FAR, sport, flags=flags, payload=b"d" * size,
                                     seq=1001, ack=5001), "eth0")
        assert (v, reason) == (TC_ACT_UNSPEC, "service-translated"), (flags, size)
        assert tuple_of(out) == (NODE_IP, sport, REMOTE, 8080) and sums_ok(out), size
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         answer(TCP, REMOTE, 8080, sport, net.mac("eth0"), GW_MAC, "PA",
                                b"r" * size), "eth0")
        assert v == TC_ACT_UNSPEC
        assert tuple_of(out) == (FAR, 80, NODE_IP, sport) and sums_ok(out), size


def test_the_nodes_udp_to_a_remote_backend_is_translated_both_ways(dp, net, svcs):
    sport = next(_sport)
    for size in (1, 300):
        v, out, reason, *_ = run(dp, net, "fp_to_vpc", udp(net, FAR, sport, payload=b"q" * size),
                                 "eth0")
        assert (v, reason) == (TC_ACT_UNSPEC, "service-translated")
        assert tuple_of(out) == (NODE_IP, sport, REMOTE, 5353) and sums_ok(out)
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         answer(UDP, REMOTE, 5353, sport, net.mac("eth0"), GW_MAC,
                                payload=b"a" * size), "eth0")
        assert v == TC_ACT_UNSPEC
        assert tuple_of(out) == (FAR, 53, NODE_IP, sport) and sums_ok(out)
    assert len(ct_rows(dp, saddr=NODE_IP, sport=sport, daddr=FAR)) == 1, "one flow"


def test_an_icmp_error_from_the_remote_backend_reaches_the_node_about_the_clusterip(
        dp, net, svcs):
    """Nothing listens at the backend's port: its port unreachable, quoting
    the translated datagram, gets the frontend back in both headers, so
    the node's connected socket learns ECONNREFUSED."""
    sport = next(_sport)
    v, out, *_ = run(dp, net, "fp_to_vpc", udp(net, FAR, sport), "eth0")
    sent = Ether(out)[IP]
    err = Ether(src=GW_MAC, dst=net.mac("eth0")) / IP(src=REMOTE, dst=NODE_IP) / \
        ICMP(type=3, code=3) / bytes(sent)[:28]
    v, out, reason, *_ = run(dp, net, "fp_from_vpc", err, "eth0")
    assert v == TC_ACT_UNSPEC
    o = Ether(out)
    assert (o[IP].src, o[IP].dst) == (FAR, NODE_IP)
    quoted = IP(bytes(o[ICMP].payload))
    assert (quoted.src, quoted.dst, quoted[UDP].sport, quoted[UDP].dport) == \
        (NODE_IP, FAR, sport, 53)


def test_a_udp_datagram_without_checksum_keeps_none(dp, net, svcs):
    sport = next(_sport)
    pkt = udp(net, FAR, sport)
    pkt[UDP].chksum = 0
    v, out, *_ = run(dp, net, "fp_to_vpc", pkt, "eth0")
    assert v == TC_ACT_UNSPEC and Ether(out)[UDP].chksum == 0
    assert tuple_of(out) == (NODE_IP, sport, REMOTE, 5353)


def fragments(net, dst, sport, size=3000, ident=4242):
    """The node's UDP datagram to dst:53 as its stack fragments it (its
    first fragment carries the UDP header and the datagram's checksum)."""
    whole = IP(src=NODE_IP, dst=dst, id=ident) / UDP(sport=sport, dport=53) / (b"f" * size)
    return [out_of(net) / f for f in fragment(whole, fragsize=1480)]


@pytest.mark.parametrize("vip,dev,backend", [(FAR, "eth0", REMOTE), (NEAR, "caliB", POD_B)],
                         ids=["remote", "local"])
def test_a_fragmented_udp_datagram_follows_its_first_fragment(dp, net, svcs, vip, dev, backend):
    sport = next(_sport)
    frags = fragments(net, vip, sport, ident=sport)
    assert len(frags) == 3
    outs = []
    for f in frags:
        v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", f, "eth0")
        assert (v == TC_ACT_REDIRECT) == (dev != "eth0") and reason != "dropped-ct-no-backend"
        o = Ether(out)
        assert (o[IP].src, o[IP].dst) == (NODE_IP, backend)
        fresh = o.copy()
        del fresh[IP].chksum
        assert Ether(bytes(fresh))[IP].chksum == o[IP].chksum
        outs.append(o[IP])
    # the pieces make the translated datagram, its checksum right
    whole = defragment([o.copy() for o in outs])[0]
    assert (whole[IP].dst, whole[UDP].dport) == (backend, 5353)
    fresh = whole.copy()
    del fresh[UDP].chksum
    assert IP(bytes(fresh))[UDP].chksum == whole[UDP].chksum
    assert len(whole[UDP].payload) == 3000


def test_a_fragmented_datagram_to_no_endpoint_is_rejected_once(dp, net, svcs):
    sport = next(_sport)
    first, *rest = fragments(net, NONE, sport, ident=sport)
    v, out, reason, kind, _ = run(dp, net, "fp_to_vpc", first, "eth0")
    assert (v, reason, kind) == (TC_ACT_REDIRECT, "dropped-service-no-backend", "redirect-ingress")
    assert ICMP in Ether(out)
    for f in rest:
        v, _, reason, *_ = run(dp, net, "fp_to_vpc", f, "eth0")
        assert (v, reason) == (TC_ACT_SHOT, "dropped-service-no-backend")


def test_with_socket_lb_on_a_later_fragment_passes_unchanged(dp, net, svcs):
    sport = next(_sport)
    first, *rest = fragments(net, FAR, sport, ident=sport)
    run(dp, net, "fp_to_vpc", first, "eth0")        # recorded while socket-LB is off
    with socket_lb_on(dp):
        v, out, *_ = run(dp, net, "fp_to_vpc", rest[0], "eth0")
    assert v == TC_ACT_UNSPEC and out == bytes(rest[0])


# -- a local backend, a host-network one ---------------------------------------------

@pytest.mark.parametrize("l4", [TCP, UDP], ids=["tcp", "udp"])
def test_the_nodes_traffic_to_a_local_backend_goes_into_its_veth_and_the_reply_gets_the_vip(
        dp, net, svcs, l4):
    sport = next(_sport)
    sent = tcp(net, NEAR, sport) if l4 is TCP else udp(net, NEAR, sport)
    port, target = (80, 8080) if l4 is TCP else (53, 5353)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", sent, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    o = Ether(out)
    assert (o.src, o.dst) == (net.mac("caliB"), net.pod_mac["B"])
    assert tuple_of(out) == (NODE_IP, sport, POD_B, target) and sums_ok(out)
    v, again, *_ = run(dp, net, "fp_to_pod", out, "caliB")
    assert v == TC_ACT_UNSPEC and again == out

    back = answer(l4, POD_B, target, sport, net.mac("caliB"), net.pod_mac["B"], payload=b"x")
    v, out, *_ = run(dp, net, "fp_from_pod", back, "caliB")
    assert v == TC_ACT_UNSPEC, "to the node's stack"
    assert tuple_of(out) == (NEAR, port, NODE_IP, sport) and sums_ok(out)


def test_a_host_network_backend_is_reached_through_lo(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", tcp(net, HOST, sport), "eth0")
    assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect-ingress", 1)
    assert tuple_of(out) == (NODE_IP, sport, NODE_IP, 8080) and sums_ok(out)


# -- the node's own NodePort, through lo ---------------------------------------------

def lo_frame(pkt):
    """pkt as lo carries it: both MACs zero."""
    pkt[Ether].src = pkt[Ether].dst = "00:00:00:00:00:00"
    return pkt


def test_the_nodes_udp_to_its_own_nodeport_is_translated_on_lo(dp, net, svcs):
    sport = next(_sport)
    sent = lo_frame(udp(net, NODE_IP, sport, dport=NODEPORT))
    v, out, reason, kind, idx = on_lo(dp, net, sent)
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    assert tuple_of(out) == (NODE_IP, sport, POD_B, 5353) and sums_ok(out)
    back = answer(UDP, POD_B, 5353, sport, net.mac("caliB"), net.pod_mac["B"], payload=b"y")
    v, out, _, kind, idx = run(dp, net, "fp_from_pod", back, "caliB")
    assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect-ingress", 1), "up lo to the socket"
    assert tuple_of(out) == (NODE_IP, NODEPORT, NODE_IP, sport) and sums_ok(out)


def test_a_host_network_backends_reply_on_lo_gets_the_frontend_back(dp, net, svcs):
    """The node reaching a Service whose backend is the node itself: the
    backend's answer leaves by lo, where fp_lo puts the frontend back."""
    sport = next(_sport)
    run(dp, net, "fp_to_vpc", udp(net, HOST, sport), "eth0")
    back = lo_frame(answer(UDP, NODE_IP, 5353, sport, net.mac("eth0"), GW_MAC, payload=b"a"))
    v, out, reason, *_ = on_lo(dp, net, back)
    assert (v, reason) == (TC_ACT_UNSPEC, "service-reply-restored")
    assert tuple_of(out) == (HOST, 53, NODE_IP, sport) and sums_ok(out)


# -- reject, drop, mid-stream --------------------------------------------------------

@pytest.mark.parametrize("l4", [TCP, UDP], ids=["tcp", "udp"])
def test_no_endpoints_rejects_into_the_nodes_own_stack(dp, net, svcs, l4):
    sent = tcp(net, NONE, next(_sport)) if l4 is TCP else udp(net, NONE, next(_sport))
    v, out, reason, kind, idx = run(dp, net, "fp_to_vpc", sent, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend",
                                      "redirect-ingress", net.idx("eth0"))
    o = Ether(out)
    assert (o[ICMP].type, o[ICMP].code) == (3, 3)
    assert (o[IP].src, o[IP].dst, o.dst) == (NONE, NODE_IP, net.mac("eth0"))
    assert bytes(o[ICMP].payload)[:28] == bytes(sent[IP])[:28], "quotes the node's packet"


def test_a_load_balancer_ip_admits_the_node_only_from_its_source_ranges(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, *_ = run(dp, net, "fp_to_vpc", tcp(net, LB_IP, sport), "eth0")
    assert (v, reason) == (TC_ACT_UNSPEC, "service-translated")
    assert tuple_of(out) == (NODE_IP, sport, REMOTE, 8080) and sums_ok(out)
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", tcp(net, LB_IP, sport, src="10.240.1.99"),
                           "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-source-range")
    assert ct_rows(dp, saddr="10.240.1.99") == []


def test_internal_traffic_policy_local_without_a_local_endpoint_drops(dp, net, svcs):
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", tcp(net, LOCAL, next(_sport)), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-no-local-backend")


def test_a_mid_stream_segment_of_an_unknown_connection_is_dropped(dp, net, svcs):
    sport = next(_sport)
    v, _, reason, *_ = run(dp, net, "fp_to_vpc", tcp(net, FAR, sport, flags="A"), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")
    assert ct_rows(dp, saddr=NODE_IP, sport=sport) == []


def test_traffic_to_no_frontend_is_left_alone(dp, net, svcs):
    for pkt in (tcp(net, REMOTE, next(_sport), dport=8080), udp(net, "10.242.2.21", 40000)):
        v, out, *_ = run(dp, net, "fp_to_vpc", pkt, "eth0")
        assert v == TC_ACT_UNSPEC and out == bytes(pkt)
    # nor a packet to the node from outside that is no reply
    ssh = answer(TCP, REMOTE, 40022, 22, net.mac("eth0"), GW_MAC, flags="S")
    v, out, *_ = run(dp, net, "fp_from_vpc", ssh, "eth0")
    assert v == TC_ACT_UNSPEC and out == bytes(ssh)


# -- socket-LB on: the sockets' job ------------------------------------------------------

def test_with_socket_lb_on_the_same_packets_pass_unchanged(dp, net, svcs):
    sports = [next(_sport) for _ in range(5)]
    with socket_lb_on(dp):
        for pkt in (tcp(net, FAR, sports[0]), udp(net, FAR, sports[1]),
                    tcp(net, NEAR, sports[2]), udp(net, NONE, sports[3])):
            v, out, *_ = run(dp, net, "fp_to_vpc", pkt, "eth0")
            assert v == TC_ACT_UNSPEC and out == bytes(pkt), pkt.summary()
        sent = lo_frame(udp(net, NODE_IP, sports[4], dport=NODEPORT))
        v, out, *_ = on_lo(dp, net, sent)
        assert v == TC_ACT_UNSPEC and out == bytes(sent)
    for sport in sports:
        assert ct_rows(dp, saddr=NODE_IP, sport=sport) == [], "no flow made"


def test_with_socket_lb_on_a_remote_backends_packet_to_the_node_is_not_looked_up(dp, net, svcs):
    """The reply gate: a flow translated while socket-LB was off, its reply
    after it was turned on, reaches the node as it came (the lookup the
    gate saves is the whole difference)."""
    sport = next(_sport)
    run(dp, net, "fp_to_vpc", udp(net, FAR, sport), "eth0")
    back = answer(UDP, REMOTE, 5353, sport, net.mac("eth0"), GW_MAC, payload=b"a")
    with socket_lb_on(dp):
        v, out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
        assert v == TC_ACT_UNSPEC and out == bytes(back)
    v, out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
    assert tuple_of(out) == (FAR, 53, NODE_IP, sport)
