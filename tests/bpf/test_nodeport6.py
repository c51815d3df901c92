"""IPv6 node-facing Services, run through the real programs with
BPF_PROG_TEST_RUN: a pod's IPv6 packet to an IPv6 NodePort, external or
load-balancer IP (fp_from_pod6: the internal entry, source ranges), and
the node's own IPv6 packets kube-proxy would drop, on their way out
(fp_to_vpc). The maps are filled the agent's way: IPv6 Service objects
compiled by agent.lb, planned by the reconciler, written by apply_ops.

    client 2001:db8:250::11 ─┐                  ┌─ caliA ── pod A 2001:db8:241::10
                             └ eth0 ══ node ════╪─ caliB ── pod B 2001:db8:241::11 (a backend)
      2001:db8:240::11/64, default via ::253    └─ eth1 (ENI, table 1001)
    a backend on another node: 2001:db8:242::20 (through eth0's default route)
"""
from __future__ import annotations

from collections import Counter

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from agent.config import Config
from agent.daemon.services import apply_ops
from agent.datapath import Datapath
from agent.lb.compile import SCOPE_EXTERNAL, Frontend, LbOptions, compile_services
from agent.lb.maglev import flow_hash6
from agent.lb.reconcile import Reconciler
from tests.bpf.conftest import (NODE_NAME as NODE, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
                                ct_rows, node_datapath, node_netns, node_run as run, node_services,
                                socket_lb_on)
from tests.bpf.test_conntrack6 import assert_l4_checksum_valid
from tests.bpf.test_nodeport import close_walk
from tests.lb.lbdata import ep, eslice, service, snapshot

NODE_IP, NODE_IP6 = "10.240.0.11", "2001:db8:240::11"
GW6, GW_MAC = "2001:db8:240::253", "02:00:00:00:02:54"
ENI_IP6, ENI_GW6, ENI_GW_MAC = "2001:db8:241::1", "2001:db8:241::fffd", "02:00:00:00:03:53"
POD_A, POD_B = "10.241.1.10", "10.241.1.11"
POD_A6, POD_B6 = "2001:db8:241::10", "2001:db8:241::11"
REMOTE6 = "2001:db8:242::20"
CLIENT6, OUTSIDER6 = "2001:db8:250::11", "2001:db8:c0::5"
CLIENT_MAC = GW_MAC
EXT6, LB6 = "2001:db8:113::7", "2001:db8:51::5"
SERVICE_CIDR6 = "fd00:16::/108"


@pytest.fixture(scope="module")
def net():
    with node_netns("fpt-np6", [
        f"addr add {NODE_IP}/24 dev eth0",
        f"-6 addr add {NODE_IP6}/64 dev eth0 nodad",
        f"-6 route add default via {GW6} dev eth0",
        f"-6 neigh add {GW6} lladdr {GW_MAC} dev eth0 nud permanent",
        f"-6 addr add {ENI_IP6}/128 dev eth1 nodad",
        f"-6 route add {ENI_GW6} dev eth1 table 1001",
        f"-6 route add default via {ENI_GW6} dev eth1 table 1001",
        f"-6 neigh add {ENI_GW6} lladdr {ENI_GW_MAC} dev eth1 nud permanent",
        f"-6 route add {POD_A6} dev caliA",
        f"-6 route add {POD_B6} dev caliB",
        f"-6 rule add to {POD_A6} lookup main pref 512",
        f"-6 rule add to {POD_B6} lookup main pref 512",
        f"-6 rule add from {POD_A6} lookup 1001 pref 2048",
        f"-6 rule add from {POD_B6} lookup 1001 pref 2048",
    ], sysctls=["net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0"]) as n:
        yield n


@pytest.fixture(scope="module")
def dp(bpffs, net):
    with node_datapath(bpffs, net, "nodeport6", f"172.16.0.0/16,{SERVICE_CIDR6}", NODE_IP,
                       [("A", POD_A, POD_A6), ("B", POD_B, POD_B6)], NODE_IP6) as d:
        yield d


# -- the Services (IPv6 only), compiled and written the agent's way -----------------

def lb_svc6(name, ip6, node_port, etp="Cluster", lb_ip=None, ports=None, **spec):
    status = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}} if lb_ip else None
    return service(name, ip=ip6, typ="LoadBalancer" if lb_ip else "NodePort", status=status,
                   externalTrafficPolicy=etp, ipFamilies=["IPv6"], ipFamilyPolicy="SingleStack",
                   ports=ports or [("http", 80, "TCP", 8080, node_port)], **spec)


def eslice6(name, svc, endpoints, **kw):
    return eslice(name, svc, endpoints, address_type="IPv6", **kw)


OBJECTS = [
    # eTP Cluster: one backend here, one on another node
    lb_svc6("both", "fd00:16::10", 30080),
    eslice6("both-1", "both", [ep(POD_B6, node=NODE), ep(REMOTE6, node="node-b")]),
    # only the remote one (SNAT every time from outside)
    lb_svc6("far", "fd00:16::11", 30081),
    eslice6("far-1", "far", [ep(REMOTE6, node="node-b")]),
    # eTP Local with its endpoint elsewhere: dropped from outside, served inside
    lb_svc6("local", "fd00:16::12", 30082, etp="Local"),
    eslice6("local-1", "local", [ep(REMOTE6, node="node-b")]),
    # no endpoint at all: rejected
    lb_svc6("none", "fd00:16::13", 30083),
    # a load balancer reachable from one range only, with an external IP too
    lb_svc6("fw", "fd00:16::14", 30084, lb_ip=LB6, loadBalancerSourceRanges=[
        "2001:db8:250::/64", "10.250.0.0/24"], externalIPs=[EXT6]),
    eslice6("fw-1", "fw", [ep(POD_B6, node=NODE)]),
    # UDP
    lb_svc6("dns", "fd00:16::15", 30053, ports=[("dns", 53, "UDP", 5353, 30053),
                                                ("sig", 2905, "SCTP", 2906, 30905)]),
    eslice6("dns-1", "dns", [ep(POD_B6, node=NODE)], ports=[("dns", 5353, "UDP"),
                                                            ("sig", 2906, "SCTP")]),
    # internalTrafficPolicy Local, its endpoint elsewhere: the ClusterIP drops
    service("itp", ip="fd00:16::16", ipFamilies=["IPv6"], ipFamilyPolicy="SingleStack",
            internalTrafficPolicy="Local"),
    eslice6("itp-1", "itp", [ep(REMOTE6, node="node-b")]),
    # Maglev over four remote backends
    lb_svc6("mag", "fd00:16::17", 30086),
    eslice6("mag-1", "mag", [ep(f"2001:db8:243::{i}", node="node-c") for i in range(1, 5)]),
]


@pytest.fixture(scope="module")
def svcs(dp):
    with node_services(dp, OBJECTS, NODE_IP6, SERVICE_CIDR6) as rec:
        yield rec


def from_pod(net, pod, dst, dport, sport=41000, proto="tcp"):
    l4 = TCP(sport=sport, dport=dport, flags="S", seq=7) if proto == "tcp" else \
        UDP(sport=sport, dport=dport) / b"q"
    return Ether(src=net.pod_mac[pod], dst=net.mac(f"cali{pod}")) / \
        IPv6(src={"A": POD_A6, "B": POD_B6}[pod], dst=dst, hlim=64) / l4


def own(net, dst, dport, src=NODE_IP6, sport=45000):
    """The node's own SYN on its way out of eth0."""
    return Ether(src=net.mac("eth0"), dst=GW_MAC) / IPv6(src=src, dst=dst) / \
        TCP(sport=sport, dport=dport, flags="S")


# -- from pods ----------------------------------------------------------------------

@pytest.mark.parametrize("dst, dport", [(NODE_IP6, 30084), (EXT6, 80)])
def test_a_pods_ipv6_packet_to_a_node_port_or_external_ip_is_translated(dp, net, svcs,
                                                                        dst, dport):
    sport = 41000 + dport % 1000
    v, out, reason, _, idx = run(dp, net, "fp_from_pod", from_pod(net, "A", dst, dport, sport),
                                 "caliA")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliB"))
    o = Ether(out)
    assert (o[IPv6].src, o[IPv6].dst, o[TCP].sport, o[TCP].dport) == (POD_A6, POD_B6, sport, 8080)
    assert_l4_checksum_valid(out)
    fwd = ct_rows(dp, direction="forward", saddr=POD_A6, sport=sport)
    assert [(r.daddr, r.dport, r.nat_addr, r.nat_port) for r in fwd] == [
        (dst, dport, POD_B6, 8080)]
    # the backend's reply gets the frontend back on its way to A
    reply = Ether(src=net.pod_mac["B"], dst=net.mac("caliB")) / IPv6(src=POD_B6, dst=POD_A6) / \
        TCP(sport=8080, dport=sport, flags="SA", seq=9, ack=8)
    v, out, reason, _, idx = run(dp, net, "fp_from_pod", reply, "caliB")
    assert (v, idx) == (TC_ACT_REDIRECT, net.idx("caliA"))
    o = Ether(out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst) == (dst, dport, POD_A6)
    assert_l4_checksum_valid(out)


def test_a_pods_udp_to_an_ipv6_node_port_is_translated(dp, net, svcs):
    v, out, reason, _, idx = run(dp, net, "fp_from_pod",
                                 from_pod(net, "A", NODE_IP6, 30053, 41053, proto="udp"), "caliA")
    assert (v, reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert (Ether(out)[IPv6].dst, Ether(out)[UDP].dport) == (POD_B6, 5353)
    assert_l4_checksum_valid(out)


def test_pods_reach_a_local_policy_node_port_through_the_cluster_wide_set(dp, net, svcs):
    # outside traffic would be dropped here (no local endpoint); a pod's is not
    v, out, reason, _, idx = run(dp, net, "fp_from_pod",
                                 from_pod(net, "A", NODE_IP6, 30082, 41082), "caliA")
    assert reason != "dropped-service-no-local-backend"
    assert Ether(out)[IPv6].dst == REMOTE6 and Ether(out)[TCP].dport == 8080
    assert_l4_checksum_valid(out)


def test_a_pod_outside_the_source_ranges_of_an_ipv6_load_balancer_ip_is_dropped(dp, net, svcs):
    v, _, reason, _, _ = run(dp, net, "fp_from_pod", from_pod(net, "A", LB6, 80, 41100), "caliA")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-source-range")
    assert ct_rows(dp, saddr=POD_A6, sport=41100) == []
    # the same Service's NodePort and external IP are not filtered (as for IPv4)
    v, _, reason, _, _ = run(dp, net, "fp_from_pod", from_pod(net, "A", EXT6, 80, 41101),
                             "caliA")
    assert reason == "redirected-local"


def test_a_pods_packet_to_an_ipv6_node_port_without_endpoints_is_rejected(dp, net, svcs):
    v, out, reason, _, _ = run(dp, net, "fp_from_pod",
                               from_pod(net, "A", NODE_IP6, 30083, 41083), "caliA")
    assert reason == "dropped-service-no-backend"
    from scapy.layers.inet6 import ICMPv6DestUnreach
    o = Ether(out)
    assert ICMPv6DestUnreach in o and o[ICMPv6DestUnreach].code == 4
    assert o[IPv6].src == NODE_IP6 and o[IPv6].dst == POD_A6


# -- the node's own packets on their way out -----------------------------------------

def test_the_nodes_own_ipv6_packets_that_kube_proxy_would_drop_are_dropped_on_the_way_out(
        dp, net, svcs):
    # (socket-LB on: it left these untranslated; off, fp_to_vpc translates
    # them itself, tests/bpf/test_node_pkt_lb6.py)
    with socket_lb_on(dp):
        _own_ipv6_packets_socket_lb_left(dp, net)


def _own_ipv6_packets_socket_lb_left(dp, net):
    # a load-balancer IP the node's address is outside the ranges of
    assert run(dp, net, "fp_to_vpc", own(net, LB6, 80), "eth0")[:3:2] == (
        TC_ACT_SHOT, "dropped-source-range")
    # a source inside them goes on
    assert run(dp, net, "fp_to_vpc", own(net, LB6, 80, src=CLIENT6), "eth0")[0] == TC_ACT_UNSPEC
    # a ClusterIP whose internalTrafficPolicy leaves this node nothing
    assert run(dp, net, "fp_to_vpc", own(net, "fd00:16::16", 80), "eth0")[2] == \
        "dropped-service-no-local-backend"
    # an unallocated address of the IPv6 Service CIDR
    assert run(dp, net, "fp_to_vpc", own(net, "fd00:16::99", 80), "eth0")[2] == \
        "dropped-service-unallocated"
    # anything else goes through untouched
    assert run(dp, net, "fp_to_vpc", own(net, REMOTE6, 8080), "eth0")[0] == TC_ACT_UNSPEC
    # a packet in the middle of a flow is never judged
    mid = Ether(src=net.mac("eth0"), dst=GW_MAC) / IPv6(src=NODE_IP6, dst=LB6) / \
        TCP(sport=45001, dport=80, flags="A")
    assert run(dp, net, "fp_to_vpc", mid, "eth0")[0] == TC_ACT_UNSPEC


# -- from outside (fp_from_vpc6) ------------------------------------------------------

def from_outside(net, dst, dport, sport=40000, src=CLIENT6, dev="eth0", proto="tcp", flags="S"):
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=100) if proto == "tcp" else \
        UDP(sport=sport, dport=dport) / b"q"
    return Ether(src=CLIENT_MAC, dst=net.mac(dev)) / IPv6(src=src, dst=dst, hlim=64) / l4


def test_an_ipv6_node_port_from_outside_reaches_a_local_backend_keeping_the_clients_address(
        dp, net, svcs):
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP6, 30084,
                                                                      40100), "eth0")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliB"))
    o = Ether(out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (CLIENT6, 40100, POD_B6, 8080)
    assert o[IPv6].hlim == 63
    assert_l4_checksum_valid(out)
    # the backend's reply gets the frontend back and leaves by the primary
    # NIC, which owns that address (the pod's ENI would be the wrong way)
    reply = Ether(src=net.pod_mac["B"], dst=net.mac("caliB")) / \
        IPv6(src=POD_B6, dst=CLIENT6) / TCP(sport=8080, dport=40100, flags="SA", seq=5, ack=101)
    v, out, reason, _, idx = run(dp, net, "fp_from_pod", reply, "caliB")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-eni", net.idx("eth0"))
    o = Ether(out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (
        NODE_IP6, 30084, CLIENT6, 40100)
    assert o.dst == GW_MAC
    assert_l4_checksum_valid(out)
    # a pod's own traffic to an outside address is left alone (no entry)
    plain = Ether(src=net.pod_mac["B"], dst=net.mac("caliB")) / \
        IPv6(src=POD_B6, dst=CLIENT6) / TCP(sport=8081, dport=40100, flags="S")
    v, out, reason, _, idx = run(dp, net, "fp_from_pod", plain, "caliB")
    assert Ether(out)[IPv6].src == POD_B6 and idx != net.idx("eth0")


def test_an_ipv6_udp_node_port_from_outside_is_translated_with_a_valid_checksum(dp, net, svcs):
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", from_outside(
        net, NODE_IP6, 30053, 40153, proto="udp"), "eth0")
    assert (v, reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert (Ether(out)[IPv6].dst, Ether(out)[UDP].dport) == (POD_B6, 5353)
    assert_l4_checksum_valid(out)


def test_an_ipv6_node_port_to_a_backend_on_another_node_is_snated_and_its_reply_reversed(
        dp, net, svcs):
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP6, 30081,
                                                                      40200), "eth0")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-eni", net.idx("eth0"))
    o = Ether(out)
    snat_port = o[TCP].sport
    assert (o[IPv6].src, o[IPv6].dst, o[TCP].dport) == (NODE_IP6, REMOTE6, 8080)
    assert 61000 <= snat_port <= 65535
    assert_l4_checksum_valid(out)
    fwd = ct_rows(dp, direction="forward", saddr=CLIENT6, sport=40200)
    assert [(r.nat_addr, r.nat_port) for r in fwd] == [(REMOTE6, 8080)]
    # the remote backend's reply comes back to the node's SNAT port
    back = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=REMOTE6, dst=NODE_IP6) / \
        TCP(sport=8080, dport=snat_port, flags="SA", seq=1, ack=101)
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", back, "eth0")
    assert (v, idx) == (TC_ACT_REDIRECT, net.idx("eth0"))
    o = Ether(out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (
        NODE_IP6, 30081, CLIENT6, 40200)
    assert_l4_checksum_valid(out)
    # the client's next packet goes the same way, with the same port
    ack = from_outside(net, NODE_IP6, 30081, 40200, flags="A")
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", ack, "eth0")
    assert (Ether(out)[IPv6].src, Ether(out)[TCP].sport) == (NODE_IP6, snat_port)


@pytest.mark.parametrize("first", ["client", "backend"])
def test_a_snated_ipv6_node_port_flow_is_retired_by_its_last_ack(dp, net, svcs, first):
    """tests/bpf/test_nodeport.py's close of a SNATed flow, for IPv6: both
    FINs translated both ways, the flow in the established hash while it
    closes, the last ACK translated and then both entries deleted."""
    sport = 40300 if first == "client" else 40301
    v, out, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP6, 30081, sport), "eth0")
    snat_port = Ether(out)[TCP].sport

    def client(flags):
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         from_outside(net, NODE_IP6, 30081, sport, flags=flags), "eth0")
        o = Ether(out)
        assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == \
            (NODE_IP6, snat_port, REMOTE6, 8080), flags
        assert_l4_checksum_valid(out)

    def backend(flags):
        back = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=REMOTE6, dst=NODE_IP6) / \
            TCP(sport=8080, dport=snat_port, flags=flags)
        v, out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
        o = Ether(out)
        assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == \
            (NODE_IP6, 30081, CLIENT6, sport), flags
        assert_l4_checksum_valid(out)

    def tables():
        fwd = ct_rows(dp, direction="forward", saddr=CLIENT6, sport=sport, dport=30081)
        rep = ct_rows(dp, direction="reply", saddr=REMOTE6, daddr=NODE_IP6, dport=snat_port)
        return [(r.state, r.table) for r in fwd + rep]

    backend("SA")
    client("A")
    assert tables() == [("established", "established6")] * 2
    close_walk(first, client, backend, tables, "established6")


def test_an_icmpv6_error_about_a_snated_flow_reaches_the_client_about_its_own_packet(
        dp, net, svcs):
    v, out, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP6, 30081, 40250), "eth0")
    sent = Ether(out)
    assert sent[IPv6].src == NODE_IP6
    # a router between the node and the backend says "packet too big" to
    # the node's SNAT address, quoting the whole SNATed packet
    err = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=GW6, dst=NODE_IP6) / \
        ICMPv6PacketTooBig(mtu=1280) / bytes(sent[IPv6])
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", err, "eth0")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-eni", net.idx("eth0"))
    o = Ether(out)
    assert (o[IPv6].src, o[IPv6].dst) == (GW6, CLIENT6)
    # the quote is the client's own packet: its address and port, the
    # NodePort (not the node's SNAT port, nor the backend)
    q = IPv6(bytes(o[ICMPv6PacketTooBig].payload))
    assert (q.src, q[TCP].sport, q.dst, q[TCP].dport) == (CLIENT6, 40250, NODE_IP6, 30081)
    quoted = q.copy()
    del quoted[TCP].chksum
    assert IPv6(bytes(quoted))[TCP].chksum == q[TCP].chksum
    fresh = o.copy()
    del fresh[ICMPv6PacketTooBig].cksum
    assert Ether(bytes(fresh))[ICMPv6PacketTooBig].cksum == o[ICMPv6PacketTooBig].cksum
    # an error about no flow of this node is the node's
    stray = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=GW6, dst=NODE_IP6) / \
        ICMPv6PacketTooBig(mtu=1280) / IPv6(src=NODE_IP6, dst=REMOTE6) / \
        TCP(sport=61999, dport=8080, flags="S")
    v, out, reason, *_ = run(dp, net, "fp_from_vpc", stray, "eth0")
    assert (v, reason) == (TC_ACT_UNSPEC, "to-stack")
    assert Ether(out)[IPv6].dst == NODE_IP6


def test_local_policy_drops_ipv6_outside_traffic_on_a_node_without_endpoints(dp, net, svcs):
    v, _, reason, _, _ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP6, 30082, 40300),
                             "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-no-local-backend")
    assert ct_rows(dp, saddr=CLIENT6, sport=40300) == []


def test_an_ipv6_node_port_without_endpoints_is_rejected_out_of_the_interface_it_came_in_on(
        dp, net, svcs):
    v, out, reason, kind, idx = run(dp, net, "fp_from_vpc",
                                    from_outside(net, NODE_IP6, 30083, 40400), "eth0")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend", net.idx("eth0"))
    from scapy.layers.inet6 import ICMPv6DestUnreach
    o = Ether(out)
    assert o[ICMPv6DestUnreach].code == 4
    assert (o[IPv6].src, o[IPv6].dst, o.dst) == (NODE_IP6, CLIENT6, CLIENT_MAC)
    # TCP: the IPv6 header + 8 bytes (only SCTP's quote is longer)
    sent = from_outside(net, NODE_IP6, 30083, 40400)
    assert bytes(o[ICMPv6DestUnreach].payload) == bytes(sent[IPv6])[:48]
    again = o.copy()
    del again[ICMPv6DestUnreach].cksum
    assert Ether(bytes(again))[ICMPv6DestUnreach].cksum == o[ICMPv6DestUnreach].cksum


def test_ipv6_load_balancer_source_ranges_drop_outside_clients_outside_them(dp, net, svcs):
    v, _, reason, _, _ = run(dp, net, "fp_from_vpc",
                             from_outside(net, LB6, 80, 40500, src=OUTSIDER6), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-source-range")
    v, out, reason, _, _ = run(dp, net, "fp_from_vpc", from_outside(net, LB6, 80, 40501), "eth0")
    assert reason == "redirected-local" and Ether(out)[IPv6].dst == POD_B6
    # the external IP of the same Service is not filtered
    v, out, reason, _, _ = run(dp, net, "fp_from_vpc",
                               from_outside(net, EXT6, 80, 40502, src=OUTSIDER6), "eth0")
    assert reason == "redirected-local"


def test_the_nodes_own_ipv6_traffic_from_outside_goes_to_the_stack(dp, net, svcs):
    v, out, reason, _, _ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP6, 22, 40600),
                               "eth0")
    assert (v, reason) == (TC_ACT_UNSPEC, "to-stack")
    assert Ether(out)[IPv6].dst == NODE_IP6
    # an unallocated address of the IPv6 Service CIDR: dropped
    v, _, reason, _, _ = run(dp, net, "fp_from_vpc", from_outside(net, "fd00:16::99", 80),
                             "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-unallocated")


def test_sctp_to_an_ipv6_node_port_is_translated_from_a_pod_and_from_outside(dp, net, svcs):
    from scapy.layers.sctp import SCTP, SCTPChunkInit
    init = SCTP(sport=40905, dport=30905) / SCTPChunkInit(init_tag=7, a_rwnd=1500, n_out_streams=1,
                                                          n_in_streams=1, init_tsn=1)
    pod = Ether(src=net.pod_mac["A"], dst=net.mac("caliA")) / IPv6(src=POD_A6, dst=NODE_IP6) / init
    v, out, reason, _, idx = run(dp, net, "fp_from_pod", pod, "caliA")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliB"))
    assert (Ether(out)[IPv6].dst, Ether(out)[SCTP].dport) == (POD_B6, 2906)
    # from outside too (fp_vpc6_sctp; tests/bpf/test_sctp6_outside.py has the rest)
    outside = Ether(src=CLIENT_MAC, dst=net.mac("eth0")) / IPv6(src=CLIENT6, dst=NODE_IP6) / init
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", outside, "eth0")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliB"))
    assert (Ether(out)[IPv6].src, Ether(out)[IPv6].dst, Ether(out)[SCTP].dport) == (
        CLIENT6, POD_B6, 2906)


# -- Maglev ---------------------------------------------------------------------------

def test_maglev_sends_an_ipv6_flow_to_the_entry_its_hash_names(dp, net, svcs):
    fe = Frontend(NODE_IP6, 30086, "TCP", SCOPE_EXTERNAL)
    table = svcs.maglev_table(fe)
    bes = dp.lb.backends()
    # the table the external IPv6 entry names holds the IPv6 backends
    assert {bes[b][0] for b in table} == {f"2001:db8:243::{i}" for i in range(1, 5)}
    picks = Counter()
    by_client = {}
    # clients differing in either half of the address, and in the port; the
    # last one's words XOR like CLIENT6's (fp_maglev_hash6 mixes each word
    # by itself: they are hashed apart)
    for client in (CLIENT6, "2001:db8:250::12", "2001:db8:251::11", "2001:db8:250:ff::ee"):
        for sport in range(42000, 42030):
            want = bes[table[flow_hash6(client, sport, 30086, 6) % dp.lb.maglev_size]][0]
            v, out, reason, *_ = run(dp, net, "fp_from_vpc",
                                     from_outside(net, NODE_IP6, 30086, sport, src=client),
                                     "eth0")
            assert v == TC_ACT_REDIRECT, reason
            got = Ether(out)[IPv6].dst
            assert got == want, (client, sport)
            picks[got] += 1
            by_client[client, sport] = got
    assert len(picks) == 4, picks
    assert sum(by_client[CLIENT6, p] != by_client["2001:db8:250:ff::ee", p]
               for p in range(42000, 42030)) >= 10
    # a new flow of a tuple whose entry has gone picks the same again
    # (not a conntrack hit: the hash, not chance, decides)
    dp.lb.conntrack_flush()
    for sport in range(42000, 42030):
        want = bes[table[flow_hash6(CLIENT6, sport, 30086, 6) % dp.lb.maglev_size]][0]
        v, out, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP6, 30086, sport),
                         "eth0")
        assert Ether(out)[IPv6].dst == want


def test_two_nodes_with_different_backend_ids_send_an_ipv6_flow_to_the_same_backend(
        bpffs, dp, net, svcs):
    """A second node's datapath (programs and maps of its own) whose
    backend ids differ: the same client tuple picks the same backend
    address on both, as the table rests on the addresses alone."""
    cfg = Config.defaults().replace(bpffs_root=f"{bpffs}/nodeport6-b",
                                    service_cidrs=f"172.16.0.0/16,{SERVICE_CIDR6}")
    other = Datapath(cfg, netns=net.ns, test_build=True).load()
    try:
        other.settings.set_node(NODE_IP, net.idx("eth0"), NODE_IP6)
        snap = snapshot(*[o for o in OBJECTS if o["metadata"]["name"] in ("both", "both-1")])
        # another Service first, so this node numbers the backends apart
        rec = Reconciler(maglev_size=other.lb.maglev_size)
        apply_ops(other.lb, rec.plan(compile_services(
            snap, NODE, "", options=LbOptions(nodeport_ips=(NODE_IP6,)))))
        snap = snapshot(*OBJECTS)
        mag = {fe: st for fe, st in compile_services(
            snap, NODE, "", options=LbOptions(nodeport_ips=(NODE_IP6,), maglev=True)).items()
            if st.service == ("shop", "mag")}
        apply_ops(other.lb, rec.plan(mag))
        fe = Frontend(NODE_IP6, 30086, "TCP", SCOPE_EXTERNAL)
        ids = lambda d, r: {d.lb.backends()[b][0]: b for b in r.maglev_table(fe)}
        assert ids(dp, svcs) != ids(other, rec)
        picks = set()
        for sport in range(43000, 43030):
            pkt = from_outside(net, NODE_IP6, 30086, sport, src="2001:db8:250::99")
            a = Ether(run(dp, net, "fp_from_vpc", pkt, "eth0")[1])[IPv6].dst
            b = Ether(run(other, net, "fp_from_vpc", pkt, "eth0")[1])[IPv6].dst
            assert a == b, sport
            picks.add(a)
        assert len(picks) > 1
        apply_ops(other.lb, rec.plan({}))
    finally:
        other.close()
