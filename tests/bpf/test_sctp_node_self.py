"""The node's own SCTP to its own addresses, and to a backend at its own
address: fp_lo (tc egress of lo) translates an association to a NodePort,
hostPort or external IP the node holds, which never reaches an interface;
the replies whose restored source is the node's own address go into lo's
ingress (lib/lo.h), the only device whose input routing takes them with
lo's accept_local (the agent's). Run through the real programs with
BPF_PROG_TEST_RUN; every rewritten CRC32c is recomputed by scapy.

    node 10.240.0.11 (eth0, default via .253) ──┬─ caliB ── pod B 10.241.1.11
                                                 └─ eth1 (ENI)
    lo: the node's packets to 10.240.0.11 (and to 10.240.0.11's hostPorts)
    remote backend 10.242.2.20 (by eth0's default route)
"""
from __future__ import annotations

import contextlib
import itertools
import json
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.layers.sctp import SCTP, SCTPChunkData, SCTPChunkInit, SCTPChunkInitAck

from agent.datapath.libbpf import prog_test_run
from agent.datapath.maps import DEFS
from agent.datapath.nsenter import in_netns
from tests.bpf.conftest import (NODE_NAME as NODE, NOT_RECORDED, TC_ACT_REDIRECT, TC_ACT_SHOT,
                                TC_ACT_UNSPEC, ct_rows, node_datapath, node_netns, node_run,
                                lo_run as on_lo, node_services, socket_lb_on)
from tests.lb.lbdata import ep, eslice, service

NODE_IP, GW, GW_MAC = "10.240.0.11", "10.240.0.253", "02:00:00:00:02:54"
ENI_IP = "10.241.1.1"
POD_B = "10.241.1.11"
REMOTE = "10.242.2.20"
EXT_IP = "203.0.113.7"          # an external IP the node holds (on its lo)
SERVICE_CIDR = "172.16.0.0/16"
NODE_IP6, GW6 = "2001:db8:240::11", "2001:db8:240::253"
POD_B6, REMOTE6 = "2001:db8:241::11", "2001:db8:242::20"
EXT6, EXT6_FAR, EXT6_NONE = "2001:db8:113::7", "2001:db8:113::8", "2001:db8:113::9"
SERVICE_CIDR6 = "fd00:16::/108"
SELF6 = "fd00:16::33"
NEAR, FAR, NONE, SELF = "172.16.0.30", "172.16.0.31", "172.16.0.32", "172.16.0.33"
NP_NEAR, NP_FAR, NP_NONE, NP_SELF, HOSTPORT = 30911, 30912, 30913, 30914, 9443
LO = 1
ZERO_MAC = "00:00:00:00:00:00"

_sport = itertools.count(43000)


@pytest.fixture(scope="module")
def net():
    with node_netns("fpt-sl", [
        f"addr add {NODE_IP}/24 dev eth0",
        f"addr add {EXT_IP}/32 dev lo",
        f"route add default via {GW} dev eth0",
        f"neigh add {GW} lladdr {GW_MAC} dev eth0 nud permanent",
        f"addr add {ENI_IP}/32 dev eth1",
        f"route add {POD_B} dev caliB scope link",
        f"-6 addr add {NODE_IP6}/64 dev eth0 nodad",
        *[f"-6 addr add {a}/128 dev lo" for a in (EXT6, EXT6_FAR, EXT6_NONE)],
        f"-6 route add default via {GW6} dev eth0",
        f"-6 neigh add {GW6} lladdr {GW_MAC} dev eth0 nud permanent",
        f"-6 route add {POD_B6} dev caliB",
    ], sysctls=["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.default.accept_dad=0"]) as n:
        yield n


@pytest.fixture(scope="module")
def dp(bpffs, net):
    with node_datapath(bpffs, net, "sctpself", f"{SERVICE_CIDR},{SERVICE_CIDR6}", NODE_IP,
                       [("B", POD_B, POD_B6)], NODE_IP6) as d:
        yield d


def sig(nodeport):
    if nodeport is None:
        return [("sig", 2905, "SCTP", 2906), ("web", 80, "TCP", 8080)]
    return [("sig", 2905, "SCTP", 2906, nodeport), ("web", 80, "TCP", 8080, nodeport)]


SIG_EP = [("sig", 2906, "SCTP"), ("web", 8080, "TCP")]

OBJECTS = [
    service("near", ip=NEAR, typ="NodePort", ports=sig(NP_NEAR), externalIPs=[EXT_IP]),
    eslice("near-1", "near", [ep(POD_B, node=NODE)], ports=SIG_EP),
    service("far", ip=FAR, typ="NodePort", ports=sig(NP_FAR)),
    eslice("far-1", "far", [ep(REMOTE, node="node-b")], ports=SIG_EP),
    service("none", ip=NONE, typ="NodePort", ports=sig(NP_NONE)),
    # a host-network backend: the node's own address
    service("self", ip=SELF, typ="NodePort", ports=sig(NP_SELF)),
    eslice("self-1", "self", [ep(NODE_IP, node=NODE)], ports=SIG_EP),
    # IPv6: external IPs the node holds
    service("near6", ip="fd00:16::30", ports=sig(None), ipFamilies=["IPv6"],
            clusterIPs=["fd00:16::30"], externalIPs=[EXT6]),
    eslice("near6-1", "near6", [ep(POD_B6, node=NODE)], ports=SIG_EP, address_type="IPv6"),
    service("far6", ip="fd00:16::31", ports=sig(None)[:1], ipFamilies=["IPv6"],
            clusterIPs=["fd00:16::31"], externalIPs=[EXT6_FAR]),
    eslice("far6-1", "far6", [ep(REMOTE6, node="node-b")], ports=SIG_EP[:1],
           address_type="IPv6"),
    service("none6", ip="fd00:16::32", ports=sig(None)[:1], ipFamilies=["IPv6"],
            clusterIPs=["fd00:16::32"], externalIPs=[EXT6_NONE]),
    # IPv6, a host-network backend: the node's own IPv6 address, which is
    # also an external IP of its Service (one the node holds, on eth0)
    service("self6", ip=SELF6, ports=sig(None)[:1], ipFamilies=["IPv6"], clusterIPs=[SELF6],
            externalIPs=[NODE_IP6]),
    eslice("self6-1", "self6", [ep(NODE_IP6, node=NODE)], ports=SIG_EP[:1],
           address_type="IPv6"),
]


@pytest.fixture(scope="module")
def svcs(dp):
    from agent.lb.hostport import PortMapping, frontends_of
    hostport = frontends_of(("shop", "h"), POD_B, [PortMapping(HOSTPORT, 2906, "SCTP")],
                            [NODE_IP], NODE)
    with node_services(dp, OBJECTS, NODE_IP, SERVICE_CIDR, hostport) as rec:
        yield rec


# -- packets (as lo carries them: all-zero MACs) ---------------------------------

def init(dst, dport, sport, src=NODE_IP, smac=ZERO_MAC, dmac=ZERO_MAC):
    return Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, ttl=64) / \
        SCTP(sport=sport, dport=dport, tag=0) / \
        SCTPChunkInit(init_tag=7, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)


def data(dst, dport, sport, payload=b"ping", smac=ZERO_MAC, dmac=ZERO_MAC):
    return Ether(src=smac, dst=dmac) / IP(src=NODE_IP, dst=dst, ttl=64) / \
        SCTP(sport=sport, dport=dport, tag=9) / SCTPChunkData(tsn=1, data=payload)


def init_ack(src, sport, dport, dst_mac=ZERO_MAC, src_mac=ZERO_MAC):
    return Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=NODE_IP, ttl=64) / \
        SCTP(sport=sport, dport=dport, tag=7) / \
        SCTPChunkInitAck(init_tag=9, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)


def reply_data(src, sport, dport, payload=b"pong", dst_mac=ZERO_MAC, src_mac=ZERO_MAC):
    return Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=NODE_IP, ttl=64) / \
        SCTP(sport=sport, dport=dport, tag=7) / SCTPChunkData(tsn=1, data=payload)


def crc_ok(out: bytes) -> bool:
    o = Ether(out)
    fresh = Ether(out)
    del fresh[SCTP].chksum
    del fresh[IP].chksum
    fresh = Ether(bytes(fresh))
    return (fresh[SCTP].chksum, fresh[IP].chksum) == (o[SCTP].chksum, o[IP].chksum)


def tuple_of(out: bytes):
    o = Ether(out)
    return o[IP].src, o[SCTP].sport, o[IP].dst, o[SCTP].dport


def into_lo(out: bytes) -> bool:
    o = Ether(out)
    return (o.src, o.dst) == (ZERO_MAC, ZERO_MAC)


# -- a backend pod on this node ---------------------------------------------------

@pytest.mark.parametrize("dst,dport", [(NODE_IP, NP_NEAR), (EXT_IP, 2905),
                                       (NODE_IP, HOSTPORT)],
                         ids=["nodeport", "external-ip-the-node-holds", "hostport"])
def test_the_nodes_sctp_to_its_own_address_reaches_a_local_pod_and_the_reply_comes_back_by_lo(
        dp, net, svcs, dst, dport):
    sport = next(_sport)
    src = dst        # the node's stack picks the address it reaches as source
    v, out, reason, kind, idx = on_lo(dp, net, init(dst, dport, sport, src=src))
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    o = Ether(out)
    assert (o.src, o.dst) == (net.mac("caliB"), net.pod_mac["B"])
    assert tuple_of(out) == (src, sport, POD_B, 2906) and crc_ok(out)
    assert [r.nat_addr for r in ct_rows(dp, saddr=src, sport=sport, daddr=dst)] == [POD_B]

    # the pod's answer: its frontend back, into lo's ingress (on caliB the
    # node's stack would refuse a packet from its own address)
    back = init_ack(POD_B, 2906, sport, dst_mac=net.mac("caliB"), src_mac=net.pod_mac["B"])
    back[IP].dst = src
    v, out, reason, kind, idx = node_run(dp, net, "fp_from_pod", back, "caliB")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "to-stack", "redirect-ingress", LO)
    assert tuple_of(out) == (dst, dport, src, sport) and crc_ok(out) and into_lo(out)

    # DATA both ways stays on the association (the reply by fp_from_pod's
    # established walk, as a pod's mid-stream packets go)
    for size in (0, 1, 700, 1400):
        pkt = data(dst, dport, sport, b"d" * size)
        pkt[IP].src = src
        v, out, reason, kind, _ = on_lo(dp, net, pkt)
        assert (v, kind) == (TC_ACT_REDIRECT, "redirect"), size
        assert tuple_of(out) == (src, sport, POD_B, 2906) and crc_ok(out), size
        rep = reply_data(POD_B, 2906, sport, b"r" * size, dst_mac=net.mac("caliB"),
                         src_mac=net.pod_mac["B"])
        rep[IP].dst = src
        v, out, reason, kind, idx = node_run(dp, net, "fp_from_pod", rep, "caliB")
        assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect-ingress", LO), size
        assert tuple_of(out) == (dst, dport, src, sport) and crc_ok(out) and into_lo(out), size


# -- a backend on another node ---------------------------------------------------

def test_the_nodes_sctp_to_its_own_nodeport_leaves_for_a_remote_backend_and_the_reply_goes_to_lo(
        dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = on_lo(dp, net, init(NODE_IP, NP_FAR, sport))
    # by the FIB's way to the backend: out of eth0 to its gateway, TTL kept
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-eni", "redirect",
                                      net.idx("eth0"))
    o = Ether(out)
    assert (o.src, o.dst, o[IP].ttl) == (net.mac("eth0"), GW_MAC, 64)
    assert tuple_of(out) == (NODE_IP, sport, REMOTE, 2906) and crc_ok(out)

    back = init_ack(REMOTE, 2906, sport, dst_mac=net.mac("eth0"), src_mac=GW_MAC)
    v, out, reason, kind, idx = node_run(dp, net, "fp_from_vpc", back, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "to-stack", "redirect-ingress", LO)
    assert tuple_of(out) == (NODE_IP, NP_FAR, NODE_IP, sport) and crc_ok(out) and into_lo(out)

    v, out, *_ = node_run(dp, net, "fp_from_vpc",
                          reply_data(REMOTE, 2906, sport, b"x" * 99, dst_mac=net.mac("eth0"),
                                     src_mac=GW_MAC), "eth0")
    assert v == TC_ACT_REDIRECT and tuple_of(out) == (NODE_IP, NP_FAR, NODE_IP, sport)
    assert crc_ok(out)


def test_a_reply_restored_to_a_frontend_the_node_does_not_reach_from_itself_still_goes_up_eth0(
        dp, net, svcs):
    """Only a reply to the node's own address from its own address goes to
    lo: the node's SCTP to a ClusterIP keeps its reply on the way it came."""
    sport = next(_sport)
    init_pkt = init(FAR, 2905, sport, smac=net.mac("eth0"), dmac=GW_MAC)
    v, out, reason, *_ = node_run(dp, net, "fp_to_vpc", init_pkt, "eth0")
    assert (v, reason) == (TC_ACT_UNSPEC, "service-translated")
    back = init_ack(REMOTE, 2906, sport, dst_mac=net.mac("eth0"), src_mac=GW_MAC)
    v, out, reason, kind, _ = node_run(dp, net, "fp_from_vpc", back, "eth0")
    assert (v, kind) == (TC_ACT_UNSPEC, "none")
    assert tuple_of(out) == (FAR, 2905, NODE_IP, sport) and crc_ok(out)


# -- a backend at the node's own address (a host-network pod) -----------------------

def test_the_nodes_sctp_to_a_clusterip_whose_backend_is_the_node_turns_back_into_lo(
        dp, net, svcs):
    sport = next(_sport)
    init_pkt = init(SELF, 2905, sport, smac=net.mac("eth0"), dmac=GW_MAC)
    v, out, reason, kind, idx = node_run(dp, net, "fp_to_vpc", init_pkt, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "to-stack", "redirect-ingress", LO)
    assert tuple_of(out) == (NODE_IP, sport, NODE_IP, 2906) and crc_ok(out) and into_lo(out)
    # the backend's reply leaves by lo, where it gets the ClusterIP back
    v, out, reason, kind, _ = on_lo(dp, net, init_ack(NODE_IP, 2906, sport))
    assert (v, reason, kind) == (TC_ACT_UNSPEC, "service-reply-restored", "none")
    assert tuple_of(out) == (SELF, 2905, NODE_IP, sport) and crc_ok(out)
    # DATA the same way
    v, out, *_ = node_run(dp, net, "fp_to_vpc",
                          data(SELF, 2905, sport, b"q" * 500, smac=net.mac("eth0"), dmac=GW_MAC),
                          "eth0")
    assert v == TC_ACT_REDIRECT and tuple_of(out) == (NODE_IP, sport, NODE_IP, 2906)
    assert crc_ok(out)


def test_the_nodes_sctp_to_its_own_nodeport_with_a_backend_at_its_own_address(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = on_lo(dp, net, init(NODE_IP, NP_SELF, sport))
    assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect-ingress", LO)
    assert tuple_of(out) == (NODE_IP, sport, NODE_IP, 2906) and crc_ok(out)
    v, out, reason, *_ = on_lo(dp, net, init_ack(NODE_IP, 2906, sport))
    assert (v, reason) == (TC_ACT_UNSPEC, "service-reply-restored")
    assert tuple_of(out) == (NODE_IP, NP_SELF, NODE_IP, sport) and crc_ok(out)


# -- no endpoints, and everything else lo carries ----------------------------------

def test_no_endpoints_rejects_into_the_nodes_stack_by_lo(dp, net, svcs):
    sport = next(_sport)
    sent = init(NODE_IP, NP_NONE, sport)
    v, out, reason, kind, idx = on_lo(dp, net, sent)
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend",
                                      "redirect-ingress", LO)
    o = Ether(out)
    assert (o[ICMP].type, o[ICMP].code) == (3, 3)
    assert (o[IP].src, o[IP].dst) == (NODE_IP, NODE_IP) and into_lo(out)
    assert bytes(o[ICMP].payload) == bytes(sent[IP])[:40]


def test_everything_else_on_lo_passes_untouched_and_unrecorded(dp, net, svcs):
    """(TCP: the production build's test below; the test build takes TCP
    on lo too, for the real-traffic proof in vm-tests/test_node_self.py.)"""
    sport = next(_sport)
    others = [
        # UDP to the same NodePort: socket-LB's (or the stack's)
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / IP(src=NODE_IP, dst=NODE_IP) /
        UDP(sport=sport, dport=NP_NEAR) / b"x",
        # SCTP to no frontend (either family), to 127.0.0.1
        init(NODE_IP, 2905, sport),
        init("127.0.0.1", NP_NEAR, sport, src="127.0.0.1"),
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src="::1", dst="::1") /
        SCTP(sport=sport, dport=NP_NEAR),
        # IPv6 TCP to an external IP the node holds, on a port no frontend has
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src=EXT6, dst=EXT6) /
        TCP(sport=sport, dport=81, flags="S"),
        # IPv4 fragments of SCTP to a frontend, first and later (as IPv6's)
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / IP(src=NODE_IP, dst=NODE_IP, flags="MF", id=7) /
        SCTP(sport=sport, dport=NP_NEAR) / (b"f" * 64),
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / IP(src=NODE_IP, dst=NODE_IP, frag=9, id=7,
                                                proto=132) / (b"f" * 64),
        # IPv6 fragments of SCTP to a frontend, first and later (a fragment's
        # CRC covers bytes it lacks: never translated)
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src=EXT6, dst=EXT6) /
        IPv6ExtHdrFragment(m=1, id=7, offset=0) / SCTP(sport=sport, dport=2905) / (b"f" * 64),
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src=EXT6, dst=EXT6) / IPv6ExtHdrHopByHop() /
        IPv6ExtHdrFragment(m=1, id=8, offset=0) / SCTP(sport=sport, dport=2905) / (b"f" * 64),
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src=EXT6, dst=EXT6) / IPv6ExtHdrHopByHop() /
        IPv6ExtHdrFragment(m=0, id=8, offset=9, nh=132) / (b"f" * 64),
        # not IP at all
        Ether(src=ZERO_MAC, dst=ZERO_MAC) / ARP(psrc=NODE_IP, pdst=NODE_IP),
    ]
    for pkt in others:
        v, out, reason, kind, _ = on_lo(dp, net, pkt)
        assert (v, out, reason, kind) == (TC_ACT_UNSPEC, bytes(pkt), DEFS.reason(NOT_RECORDED),
                                          "none"), pkt.summary()
    assert ct_rows(dp, sport=sport) == []


def test_a_strangers_packet_from_the_nodes_own_address_is_never_handed_to_lo(dp, net, svcs):
    """lo takes local sources (accept_local): only a reply conntrack restored
    to the node's own address goes there, never a packet from outside that
    claims it."""
    sport = next(_sport)
    forged = init(NODE_IP, NP_SELF, sport, smac=GW_MAC, dmac=net.mac("eth0"))
    v, out, reason, kind, idx = node_run(dp, net, "fp_from_vpc", forged, "eth0")
    assert (kind, idx) != ("redirect-ingress", LO)
    # nor one that forges a reply of an association that does not exist
    forged = init_ack(REMOTE, 2906, sport, dst_mac=net.mac("eth0"), src_mac=GW_MAC)
    v, out, reason, kind, idx = node_run(dp, net, "fp_from_vpc", forged, "eth0")
    assert (kind, idx) != ("redirect-ingress", LO) and tuple_of(out)[0] == REMOTE


def test_the_production_build_translates_sctp_on_lo_and_tcp_only_while_socket_lb_is_off(
        bpffs, net, dp):
    """The build the agent runs (no FP_TEST): SCTP to the node's own
    NodePort is translated on lo; TCP to it is left to socket-LB while that
    is on, and translated like SCTP while it is off."""
    from agent.config import Config
    from agent.datapath.node import Datapath
    cfg = Config.defaults().replace(bpffs_root=f"{bpffs}/sctpselfprod",
                                    service_cidrs=SERVICE_CIDR)
    prod = Datapath(cfg, netns=net.ns).load()
    try:
        from agent.model.endpoint import Endpoint
        prod.maps.endpoint_put(Endpoint(POD_B, "caliB", net.idx("caliB"), net.mac("caliB"),
                                        net.pod_mac["B"], "eth1", net.idx("eth1")))
        prod.settings.set_node(NODE_IP, net.idx("eth0"))
        with node_services(prod, OBJECTS, NODE_IP, SERVICE_CIDR):
            sport = next(_sport)
            with in_netns(net.ns):
                res = prog_test_run(prod.prog_fd("fp_lo"), bytes(init(NODE_IP, NP_NEAR, sport)),
                                    ifindex=LO)
                assert res.retval == TC_ACT_REDIRECT
                assert tuple_of(res.data) == (NODE_IP, sport, POD_B, 2906) and crc_ok(res.data)
                syn = Ether(src=ZERO_MAC, dst=ZERO_MAC) / IP(src=NODE_IP, dst=NODE_IP) / \
                    TCP(sport=sport, dport=NP_NEAR, flags="S")
                with socket_lb_on(prod):
                    res = prog_test_run(prod.prog_fd("fp_lo"), bytes(syn), ifindex=LO)
                    assert (res.retval, res.data) == (TC_ACT_UNSPEC, bytes(syn))
                    # IPv6 alike: TCP to a frontend the node holds passes
                    # (the test build translates it, the next test)
                    res = prog_test_run(prod.prog_fd("fp_lo"), bytes(syn6(sport)), ifindex=LO)
                    assert (res.retval, res.data) == (TC_ACT_UNSPEC, bytes(syn6(sport)))
                # socket-LB off: the SYN is the node's to translate here
                res = prog_test_run(prod.prog_fd("fp_lo"), bytes(syn), ifindex=LO)
                assert res.retval == TC_ACT_REDIRECT
                o = Ether(res.data)
                assert (o[IP].dst, o[TCP].dport) == (POD_B, 8080)
    finally:
        prod.close()


def syn6(sport):
    return Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src=EXT6, dst=EXT6, hlim=64) / \
        TCP(sport=sport, dport=80, flags="S", seq=1000)


def test_the_test_build_takes_ipv6_tcp_on_lo_as_the_production_build_takes_sctp(dp, net, svcs):
    """The stand-in the IPv6 vm-test (vm-tests/test_node_self6.py) runs
    real traffic through: the test build's fp_lo translates the node's IPv6
    TCP to a frontend it holds as the production build its SCTP, checksum
    fixed (scapy recomputes it)."""
    sport = next(_sport)
    v, out, reason, kind, idx = on_lo(dp, net, syn6(sport))
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    o = Ether(out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (EXT6, sport, POD_B6, 8080)
    fresh = Ether(out)
    del fresh[TCP].chksum
    assert Ether(bytes(fresh))[TCP].chksum == o[TCP].chksum


# -- the path MTU: lo's is 65,536, the way out's is not ----------------------------

def data_of_ip_len(dst, dport, sport, ip_len):
    """An SCTP DATA packet whose IP total length is ip_len (a multiple of 4)."""
    pkt = data(dst, dport, sport, b"m" * (ip_len - 20 - 12 - 16))
    assert len(pkt[IP]) == ip_len
    return pkt


def frag_needed(out: bytes, sent, mtu: int):
    """out is ICMP "fragmentation needed" into lo's ingress, telling `mtu`
    and quoting the packet exactly as the node sent it."""
    o = Ether(out)
    assert into_lo(out) and (o[IP].src, o[IP].dst) == (sent[IP].dst, sent[IP].src)
    assert (o[ICMP].type, o[ICMP].code, o[ICMP].nexthopmtu) == (3, 4, mtu)
    fresh = Ether(out)
    del fresh[IP].chksum, fresh[ICMP].chksum
    fresh = Ether(bytes(fresh))
    assert (fresh[IP].chksum, fresh[ICMP].chksum) == (o[IP].chksum, o[ICMP].chksum)
    assert bytes(o[ICMP].payload) == bytes(sent[IP])[:40] and len(out) == 14 + 20 + 8 + 40


@pytest.fixture(scope="module")
def monitor(dp):
    from tests.bpf.conftest import Events
    ev = Events(dp)
    ev.poll()
    return ev


def told_events(monitor) -> list[tuple]:
    """The monitor's fragmentation-needed drops since the last poll."""
    return [(e["ifindex"], e["saddr"], e["daddr"], e["sport"], e["dport"])
            for e in monitor.decoded() if e["reason"] == "dropped-fragmentation-needed"]


def frag_counted(dp) -> int:
    return sum(r.packets for r in dp.maps.counters()
               if (r.ifindex, r.direction, r.reason) == (LO, "to-vpc",
                                                         "dropped-fragmentation-needed"))


@contextlib.contextmanager
def mtu_of(net, dev, mtu):
    old = json.loads(subprocess.run(["ip", "-n", net.ns, "-j", "link", "show", dev], check=True,
                                    capture_output=True, text=True).stdout)[0]["mtu"]
    subprocess.run(["ip", "-n", net.ns, "link", "set", dev, "mtu", str(mtu)], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", net.ns, "link", "set", dev, "mtu", str(old)], check=True)


@pytest.mark.parametrize("dport,dev,mtu", [(NP_NEAR, "caliB", 1500), (NP_FAR, "eth0", 1400)],
                         ids=["local-pod-by-its-veth", "remote-backend-by-eth0"])
def test_a_packet_longer_than_the_way_out_is_answered_with_fragmentation_needed(
        dp, net, svcs, monitor, dport, dev, mtu):
    """The node's stack sized the packet by lo's MTU: fp_lo checks it against
    the device it redirects to and tells the node's stack that device's MTU,
    quoting the packet as the node sent it (the frontend, before the
    translation), so the association finds itself; nothing is forwarded."""
    with mtu_of(net, dev, mtu):
        sport = next(_sport)
        # a large INIT (an INIT with a long cookie-preservative padding)
        big_init = init(NODE_IP, dport, sport) / (b"\0" * (mtu + 100))
        before = frag_counted(dp)
        monitor.poll()
        v, out, reason, kind, idx = on_lo(dp, net, big_init)
        assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-fragmentation-needed",
                                          "redirect-ingress", LO)
        frag_needed(out, big_init, mtu)
        assert frag_counted(dp) == before + 1
        # the monitor sees the drop, from the node to the frontend it reached
        assert told_events(monitor) == [(LO, NODE_IP, NODE_IP, sport, dport)]
        # the INIT that fits opens the association; DATA up to the MTU passes
        # translated, one byte word more is answered
        v, out, reason, kind, idx = on_lo(dp, net, init(NODE_IP, dport, sport))
        assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect", net.idx(dev))
        backend = POD_B if dev == "caliB" else REMOTE
        fits = data_of_ip_len(NODE_IP, dport, sport, mtu)
        v, out, reason, kind, idx = on_lo(dp, net, fits)
        assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect", net.idx(dev))
        assert tuple_of(out) == (NODE_IP, sport, backend, 2906) and crc_ok(out)
        assert len(Ether(out)[IP]) == mtu
        big = data_of_ip_len(NODE_IP, dport, sport, mtu + 4)
        v, out, reason, kind, idx = on_lo(dp, net, big)
        assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-fragmentation-needed",
                                          "redirect-ingress", LO)
        frag_needed(out, big, mtu)
        assert frag_counted(dp) == before + 2


# -- IPv6 ------------------------------------------------------------------------

def init6(dst, sport, dport=2905):
    return Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src=dst, dst=dst, hlim=64) / \
        SCTP(sport=sport, dport=dport, tag=0) / \
        SCTPChunkInit(init_tag=7, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)


def crc6_ok(out: bytes) -> bool:
    o = Ether(out)
    fresh = Ether(out)
    del fresh[SCTP].chksum
    return Ether(bytes(fresh))[SCTP].chksum == o[SCTP].chksum


def tuple6(out: bytes):
    o = Ether(out)
    return o[IPv6].src, o[SCTP].sport, o[IPv6].dst, o[SCTP].dport


def test_the_nodes_ipv6_sctp_to_an_address_it_holds_reaches_a_local_pod_and_back(dp, net, svcs):
    """IPv6 takes a packet from the node's own address on any device: the
    pod's restored reply goes to the stack where it arrives."""
    sport = next(_sport)
    v, out, reason, kind, idx = on_lo(dp, net, init6(EXT6, sport))
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    assert (Ether(out).src, Ether(out).dst) == (net.mac("caliB"), net.pod_mac["B"])
    assert tuple6(out) == (EXT6, sport, POD_B6, 2906) and crc6_ok(out)
    back = Ether(src=net.pod_mac["B"], dst=net.mac("caliB")) / \
        IPv6(src=POD_B6, dst=EXT6, hlim=64) / SCTP(sport=2906, dport=sport, tag=7) / \
        SCTPChunkInitAck(init_tag=9, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)
    v, out, *_ = node_run(dp, net, "fp_from_pod", back, "caliB")
    assert v == TC_ACT_UNSPEC, "to the node's stack"
    assert tuple6(out) == (EXT6, 2905, EXT6, sport) and crc6_ok(out)


def test_the_nodes_ipv6_sctp_to_an_address_it_holds_leaves_for_a_remote_backend(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, kind, idx = on_lo(dp, net, init6(EXT6_FAR, sport))
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-eni", "redirect",
                                      net.idx("eth0"))
    assert (Ether(out).src, Ether(out).dst) == (net.mac("eth0"), GW_MAC)
    assert tuple6(out) == (EXT6_FAR, sport, REMOTE6, 2906) and crc6_ok(out)
    back = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=REMOTE6, dst=EXT6_FAR, hlim=63) / \
        SCTP(sport=2906, dport=sport, tag=7) / \
        SCTPChunkInitAck(init_tag=9, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)
    v, out, *_ = node_run(dp, net, "fp_from_vpc", back, "eth0")
    assert v == TC_ACT_UNSPEC, "to the node's stack"
    assert tuple6(out) == (EXT6_FAR, 2905, EXT6_FAR, sport) and crc6_ok(out)


def test_the_nodes_ipv6_sctp_without_endpoints_is_rejected_into_its_stack(dp, net, svcs):
    from scapy.layers.inet6 import ICMPv6DestUnreach
    v, out, reason, kind, idx = on_lo(dp, net, init6(EXT6_NONE, next(_sport)))
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend",
                                      "redirect-ingress", LO)
    o = Ether(out)
    assert o[ICMPv6DestUnreach].code == 4 and (o[IPv6].src, o[IPv6].dst) == (EXT6_NONE, EXT6_NONE)


# -- IPv6: the path MTU (ICMPv6 Packet Too Big) ------------------------------------

def data6_of_ip_len(dst, sport, ip_len, dport=2905):
    """An IPv6 SCTP DATA packet of ip_len bytes from the IPv6 header on."""
    pkt = Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src=dst, dst=dst, hlim=64) / \
        SCTP(sport=sport, dport=dport, tag=9) / \
        SCTPChunkData(tsn=1, data=b"m" * (ip_len - 40 - 12 - 16))
    assert len(pkt[IPv6]) == ip_len
    return pkt


def packet_too_big(out: bytes, sent, mtu: int):
    """out is ICMPv6 Packet Too Big into lo's ingress from the frontend the
    node sent to, telling 8 bytes less than `mtu` (lib/lo.h FP_LO6_TOLD_MTU:
    the node's stack takes no path MTU to its own address at or above the
    MTU of the device that holds it; vm-tests/test_node_self6.py) and quoting the IPv6 header and 20 bytes of
    the packet exactly as the node sent it (lib/lo.h's fixed quote)."""
    from scapy.layers.inet6 import ICMPv6PacketTooBig
    o = Ether(out)
    assert into_lo(out) and o.type == 0x86DD
    assert (o[IPv6].src, o[IPv6].dst, o[IPv6].nh, o[IPv6].hlim) == \
        (sent[IPv6].dst, sent[IPv6].src, 58, 64)
    assert (o[ICMPv6PacketTooBig].type, o[ICMPv6PacketTooBig].code,
            o[ICMPv6PacketTooBig].mtu) == (2, 0, mtu - 8)
    fresh = Ether(out)
    del fresh[ICMPv6PacketTooBig].cksum
    fresh = Ether(bytes(fresh))
    assert fresh[ICMPv6PacketTooBig].cksum == o[ICMPv6PacketTooBig].cksum
    quote = bytes(o[ICMPv6PacketTooBig].payload)
    assert quote == bytes(sent[IPv6])[:60] and len(out) == 14 + 40 + 8 + 60
    assert o[IPv6].plen == 8 + 60


def too_big6_counted(dp) -> int:
    return sum(r.packets for r in dp.maps.counters(by_family=True)
               if (r.ifindex, r.direction, r.reason, r.family) ==
               (LO, "to-vpc", "dropped-fragmentation-needed", "ipv6"))


@pytest.mark.parametrize("frontend,dev,mtu", [(EXT6, "caliB", 1500), (EXT6_FAR, "eth0", 1400)],
                         ids=["local-pod-by-its-veth", "remote-backend-by-eth0"])
def test_an_ipv6_packet_longer_than_the_way_out_is_answered_with_packet_too_big(
        dp, net, svcs, monitor, frontend, dev, mtu):
    """fp_lo's IPv6 half as its IPv4 one: checked against the device it
    redirects to, answered with ICMPv6 Packet Too Big into the node's stack
    (from the frontend, quoting the packet before the translation);
    nothing forwarded."""
    with mtu_of(net, dev, mtu):
        sport = next(_sport)
        big_init = init6(frontend, sport) / (b"\0" * (mtu + 100))
        before = too_big6_counted(dp)
        monitor.poll()
        v, out, reason, kind, idx = on_lo(dp, net, big_init)
        assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-fragmentation-needed",
                                          "redirect-ingress", LO)
        packet_too_big(out, big_init, mtu)
        assert too_big6_counted(dp) == before + 1
        # the monitor sees the drop (IPv6 events: the translated tuple)
        backend = POD_B6 if dev == "caliB" else REMOTE6
        assert told_events(monitor) == [(LO, frontend, backend, sport, 2906)]
        v, out, reason, kind, idx = on_lo(dp, net, init6(frontend, sport))
        assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect", net.idx(dev))
        backend = POD_B6 if dev == "caliB" else REMOTE6
        fits = data6_of_ip_len(frontend, sport, mtu)
        v, out, reason, kind, idx = on_lo(dp, net, fits)
        assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect", net.idx(dev))
        assert tuple6(out) == (frontend, sport, backend, 2906) and crc6_ok(out)
        assert len(Ether(out)[IPv6]) == mtu
        big = data6_of_ip_len(frontend, sport, mtu + 4)
        v, out, reason, kind, idx = on_lo(dp, net, big)
        assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-fragmentation-needed",
                                          "redirect-ingress", LO)
        packet_too_big(out, big, mtu)
        assert too_big6_counted(dp) == before + 2


# -- IPv6: a backend at the node's own address (a host-network pod) ------------------

def sctp6(src, dst, sport, dport, chunk, tag=0, smac=ZERO_MAC, dmac=ZERO_MAC):
    return Ether(src=smac, dst=dmac) / IPv6(src=src, dst=dst, hlim=64) / \
        SCTP(sport=sport, dport=dport, tag=tag) / chunk


def init_chunk():
    return SCTPChunkInit(init_tag=7, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)


def init_ack_chunk():
    return SCTPChunkInitAck(init_tag=9, a_rwnd=65535, n_out_streams=1, n_in_streams=1,
                            init_tsn=1)


def not_a_hairpin(dp, sport, frontend):
    """The association keeps the node's own address as its client (a pod's
    hairpin would be sourced from the IPv6 hairpin address): the forward
    entry goes to the backend at the node's address, the reply entry is
    keyed on the node as destination, neither is flagged."""
    fwd = ct_rows(dp, direction="forward", proto="SCTP", sport=sport)
    rev = ct_rows(dp, direction="reply", proto="SCTP", dport=sport)
    assert [(r.saddr, r.daddr, r.nat_addr, r.nat_port, r.flags) for r in fwd] == \
        [(NODE_IP6, frontend, NODE_IP6, 2906, 0)]
    assert [(r.saddr, r.sport, r.daddr, r.nat_addr, r.nat_port, r.flags) for r in rev] == \
        [(NODE_IP6, 2906, NODE_IP6, frontend, 2905, 0)]


def test_the_nodes_ipv6_sctp_to_a_clusterip_whose_backend_is_the_node_turns_back_into_lo(
        dp, net, svcs):
    """fp_to_vpc's IPv6 half as its IPv4 one: the translated INIT (source
    and destination the node's own address) goes into lo's ingress, not out
    of eth0; the backend's reply leaves by lo and gets the ClusterIP back
    in fp_lo."""
    sport = next(_sport)
    mac = dict(smac=net.mac("eth0"), dmac=GW_MAC)
    sent = sctp6(NODE_IP6, SELF6, sport, 2905, init_chunk(), **mac)
    v, out, reason, kind, idx = node_run(dp, net, "fp_to_vpc", sent, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "to-stack", "redirect-ingress", LO)
    assert tuple6(out) == (NODE_IP6, sport, NODE_IP6, 2906) and crc6_ok(out) and into_lo(out)
    assert Ether(out)[IPv6].hlim == 64 and bytes(Ether(out)[SCTP].payload) == \
        bytes(sent[SCTP].payload)
    not_a_hairpin(dp, sport, SELF6)
    # the backend's reply leaves by lo, where it gets the ClusterIP back
    back = sctp6(NODE_IP6, NODE_IP6, 2906, sport, init_ack_chunk(), tag=7)
    v, out, reason, kind, _ = on_lo(dp, net, back)
    assert (v, reason, kind) == (TC_ACT_UNSPEC, "service-reply-restored", "none")
    assert tuple6(out) == (SELF6, 2905, NODE_IP6, sport) and crc6_ok(out)
    assert bytes(Ether(out)[SCTP].payload) == bytes(back[SCTP].payload)
    # DATA both ways stays on the association
    for size in (1, 500, 1200):
        v, out, reason, kind, idx = node_run(
            dp, net, "fp_to_vpc",
            sctp6(NODE_IP6, SELF6, sport, 2905, SCTPChunkData(tsn=1, data=b"q" * size), tag=9,
                  **mac), "eth0")
        assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect-ingress", LO), size
        assert tuple6(out) == (NODE_IP6, sport, NODE_IP6, 2906) and crc6_ok(out), size
        v, out, reason, *_ = on_lo(dp, net, sctp6(NODE_IP6, NODE_IP6, 2906, sport,
                                                  SCTPChunkData(tsn=1, data=b"r" * size),
                                                  tag=7))
        assert (v, reason) == (TC_ACT_UNSPEC, "service-reply-restored"), size
        assert tuple6(out) == (SELF6, 2905, NODE_IP6, sport) and crc6_ok(out), size
    not_a_hairpin(dp, sport, SELF6)


def test_the_nodes_ipv6_sctp_to_its_own_address_with_a_backend_at_that_address(dp, net, svcs):
    """The frontend is the node's own IPv6 address (an external IP it holds):
    fp_lo translates the INIT to the backend at that same address and hands
    it back to lo's ingress; the backend's reply is restored in fp_lo."""
    sport = next(_sport)
    sent = init6(NODE_IP6, sport)
    v, out, reason, kind, idx = on_lo(dp, net, sent)
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "to-stack", "redirect-ingress", LO)
    assert tuple6(out) == (NODE_IP6, sport, NODE_IP6, 2906) and crc6_ok(out) and into_lo(out)
    not_a_hairpin(dp, sport, NODE_IP6)
    back = sctp6(NODE_IP6, NODE_IP6, 2906, sport, init_ack_chunk(), tag=7)
    v, out, reason, kind, _ = on_lo(dp, net, back)
    assert (v, reason, kind) == (TC_ACT_UNSPEC, "service-reply-restored", "none")
    assert tuple6(out) == (NODE_IP6, 2905, NODE_IP6, sport) and crc6_ok(out)


def test_ipv6_sctp_on_lo_that_is_no_reply_of_a_translated_association_passes_untouched(
        dp, net, svcs):
    """fp_lo's new first step (the reply restore) leaves the rest alone: the
    node's SCTP between its own addresses on a port no association of a
    Service uses passes unchanged and unrecorded, even from the backend's
    port."""
    sport = next(_sport)
    for pkt in (sctp6(NODE_IP6, NODE_IP6, 2906, sport, init_ack_chunk(), tag=7),
                sctp6(EXT6, NODE_IP6, 2906, sport, init_chunk())):
        v, out, reason, kind, _ = on_lo(dp, net, pkt)
        assert (v, out, reason, kind) == (TC_ACT_UNSPEC, bytes(pkt), DEFS.reason(NOT_RECORDED),
                                          "none"), pkt.summary()


# -- IPv6: extension headers before SCTP -------------------------------------------

@pytest.mark.parametrize("ext", ["hop-by-hop", "destination-options", "both"])
def test_the_nodes_ipv6_sctp_with_extension_headers_is_translated_on_lo_too(dp, net, svcs, ext):
    """A node socket with sticky options (IPV6_HOPOPTS, IPV6_DSTOPTS) sends
    its SCTP behind extension headers: fp_lo walks them as the node's
    interfaces do, instead of taking the first header for the transport;
    the headers are kept, the CRC is fixed past them."""
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
    sport = next(_sport)
    hdrs = {"hop-by-hop": IPv6ExtHdrHopByHop(),
            "destination-options": IPv6ExtHdrDestOpt(),
            "both": IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()}[ext]
    sent = Ether(src=ZERO_MAC, dst=ZERO_MAC) / IPv6(src=EXT6, dst=EXT6, hlim=64) / hdrs / \
        SCTP(sport=sport, dport=2905, tag=0) / init_chunk()
    v, out, reason, kind, idx = on_lo(dp, net, sent)
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local", "redirect",
                                      net.idx("caliB"))
    o = Ether(out)
    assert tuple6(out) == (EXT6, sport, POD_B6, 2906) and crc6_ok(out)
    n = len(hdrs)
    assert bytes(o[IPv6].payload)[:n] == bytes(sent[IPv6].payload)[:n] and len(out) == len(sent)
    # the pod's answer (without the headers) gets the address back as before
    back = Ether(src=net.pod_mac["B"], dst=net.mac("caliB")) / \
        IPv6(src=POD_B6, dst=EXT6, hlim=64) / SCTP(sport=2906, dport=sport, tag=7) / \
        init_ack_chunk()
    v, out, *_ = node_run(dp, net, "fp_from_pod", back, "caliB")
    assert v == TC_ACT_UNSPEC and tuple6(out) == (EXT6, 2905, EXT6, sport) and crc6_ok(out)


# -- ICMP errors about the node's own association to itself --------------------------

def test_an_icmp_error_about_the_nodes_association_to_itself_reaches_it_restored(
        dp, net, svcs):
    """A router on the way to a remote backend (fragmentation needed) or the
    backend itself (port unreachable) answers the translated packet: the
    error reaches the node's stack about the packet as the node sent it
    (its NodePort), and one the backend sent comes from the NodePort, so
    it too is from the node's own address to itself: lo's ingress."""
    sport = next(_sport)
    on_lo(dp, net, init(NODE_IP, NP_FAR, sport))
    sent_on = data(REMOTE, 2906, sport, b"z" * 64)        # as it left eth0
    for src, typ, code, where in ((GW, 3, 4, "stack"), (REMOTE, 3, 3, "lo")):
        err = Ether(src=GW_MAC, dst=net.mac("eth0")) / IP(src=src, dst=NODE_IP, ttl=63) / \
            ICMP(type=typ, code=code, nexthopmtu=1400 if code == 4 else 0) / \
            bytes(sent_on[IP])[:48]
        v, out, reason, kind, idx = node_run(dp, net, "fp_from_vpc", err, "eth0")
        o = Ether(out)
        q = IP(bytes(o[ICMP].payload))
        assert (q.src, q.dst, q[SCTP].sport, q[SCTP].dport) == (NODE_IP, NODE_IP, sport,
                                                                NP_FAR), src
        fresh = Ether(out)
        del fresh[ICMP].chksum, fresh[IP].chksum
        fresh = Ether(bytes(fresh))
        assert (fresh[ICMP].chksum, fresh[IP].chksum) == (o[ICMP].chksum, o[IP].chksum), src
        if where == "stack":
            assert v in (TC_ACT_UNSPEC, 0) and (o[IP].src, o[IP].dst) == (GW, NODE_IP)
        else:
            assert (v, kind, idx) == (TC_ACT_REDIRECT, "redirect-ingress", LO), src
            assert (o[IP].src, o[IP].dst) == (NODE_IP, NODE_IP) and into_lo(out)


def test_an_icmpv6_error_about_the_nodes_ipv6_association_to_itself_reaches_it_restored(
        dp, net, svcs):
    """IPv6 alike, to the stack where it arrives (IPv6 input takes the
    node's own address as source on any device)."""
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig
    sport = next(_sport)
    v, *_ = on_lo(dp, net, init6(EXT6_FAR, sport))
    assert v == TC_ACT_REDIRECT
    sent_on = Ether() / IPv6(src=EXT6_FAR, dst=REMOTE6, hlim=64) / \
        SCTP(sport=sport, dport=2906, tag=9) / SCTPChunkData(tsn=1, data=b"z" * 64)
    for src, icmp in ((GW6, ICMPv6PacketTooBig(mtu=1400)), (REMOTE6, ICMPv6DestUnreach(code=4))):
        err = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=src, dst=EXT6_FAR, hlim=63) / \
            icmp / bytes(sent_on[IPv6])[:60]
        v, out, reason, kind, idx = node_run(dp, net, "fp_from_vpc", err, "eth0")
        assert v in (TC_ACT_UNSPEC, 0), src
        o = Ether(out)
        q = IPv6(bytes(o[icmp.__class__].payload))
        assert (q.src, q.dst, q[SCTP].sport, q[SCTP].dport) == (EXT6_FAR, EXT6_FAR, sport,
                                                                2905), src
        assert (o[IPv6].src, o[IPv6].dst) == (EXT6_FAR if src == REMOTE6 else GW6, EXT6_FAR)
        fresh = Ether(out)
        del fresh[icmp.__class__].cksum
        assert Ether(bytes(fresh))[icmp.__class__].cksum == o[icmp.__class__].cksum, src


def test_no_ipv6_packet_from_outside_or_a_pod_is_handed_to_lo(dp, net, svcs):
    """IPv6 hands nothing it restores to lo's ingress (the stack takes the
    node's own address as source on any device): a packet from outside or
    from a pod claiming the node's address, or forging a reply of an
    association that does not exist, is never redirected into lo."""
    sport = next(_sport)
    cases = [
        ("fp_from_vpc", "eth0", sctp6(NODE_IP6, NODE_IP6, 2906, sport, init_ack_chunk(), tag=7,
                                      smac=GW_MAC, dmac=net.mac("eth0"))),
        ("fp_from_vpc", "eth0", sctp6(NODE_IP6, EXT6, sport, 2905, init_chunk(),
                                      smac=GW_MAC, dmac=net.mac("eth0"))),
        ("fp_from_vpc", "eth0", sctp6(REMOTE6, EXT6_FAR, 2906, sport, init_ack_chunk(), tag=7,
                                      smac=GW_MAC, dmac=net.mac("eth0"))),
        ("fp_from_pod", "caliB", sctp6(POD_B6, EXT6, 2906, sport, init_ack_chunk(), tag=7,
                                       smac=net.pod_mac["B"], dmac=net.mac("caliB"))),
        ("fp_from_pod", "caliB", sctp6(NODE_IP6, NODE_IP6, 2906, sport, init_ack_chunk(), tag=7,
                                       smac=net.pod_mac["B"], dmac=net.mac("caliB"))),
    ]
    for prog, dev, pkt in cases:
        v, out, reason, kind, idx = node_run(dp, net, prog, pkt, dev)
        assert (kind, idx) != ("redirect-ingress", LO), (prog, pkt.summary())
        assert (v, kind) != (TC_ACT_REDIRECT, "redirect-ingress"), (prog, pkt.summary())


def test_a_crc_left_to_offload_stays_zero_through_lo(dp, net, svcs):
    """lo offers SCTP CRC offload, so the node's SCTP on lo leaves its
    CRC32c zero for the device that finally sends it (CHECKSUM_PARTIAL):
    the translation keeps it zero in both families, instead of "fixing" a
    CRC that is not there yet."""
    for pkt, dst in ((init(NODE_IP, NP_NEAR, next(_sport)), POD_B),
                     (init6(EXT6, next(_sport)), POD_B6)):
        pkt[SCTP].chksum = 0
        v, out, reason, kind, idx = on_lo(dp, net, pkt)
        assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliB"))
        o = Ether(out)
        assert o[SCTP].chksum == 0 and o[SCTP].dport == 2906
        assert (o[IP].dst if IP in o else o[IPv6].dst) == dst
