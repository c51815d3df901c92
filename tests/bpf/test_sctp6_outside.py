"""SCTP from outside to IPv6 node-facing frontends (NodePort, external and
load-balancer IPs), run through the real programs with BPF_PROG_TEST_RUN:
fp_from_vpc hands IPv6 to fp_from_vpc6, which hands the node's SCTP to
fp_vpc6_sctp (slot FP_TAIL_FROM_VPC6_SCTP). The semantics are IPv4's SCTP
from outside and IPv6's TCP/UDP from outside: only an INIT picks a
backend, externalTrafficPolicy, source ranges, reject vs drop, Maglev,
SNAT to the node's IPv6 address for a backend on another node and the
reversal of both replies. Every rewritten packet's CRC32c is recomputed by
scapy and compared with the program's (the kernel here has no SCTP).

The node is test_nodeport6.py's (its `net` fixture), with a datapath and
Services of this module's own.
"""
from __future__ import annotations

import ctypes
import itertools
import socket
from contextlib import contextmanager

import pytest
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP, SCTPChunkData, SCTPChunkInit, SCTPChunkInitAck

from agent.datapath.maps import DEFS
from agent.lb.compile import SCOPE_EXTERNAL, Frontend
from agent.lb.maglev import flow_hash6
from tests.bpf.conftest import (NODE_NAME as NODE, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
                                ct_rows, node_datapath, node_run as run, node_services)
from tests.bpf.test_nodeport6 import (CLIENT6, CLIENT_MAC, ENI_GW_MAC, EXT6, GW6, GW_MAC, LB6,
                                      NODE_IP, NODE_IP6, OUTSIDER6, POD_A, POD_A6, POD_B,
                                      POD_B6, REMOTE6, SERVICE_CIDR6, eslice6, lb_svc6, net)
from tests.lb.lbdata import ep

_ = net  # the node (test_nodeport6.py's fixture)
IPPROTO_SCTP = 132
MAG_BACKENDS = [f"2001:db8:243::{i}" for i in range(1, 5)]


def sctp_svc6(name, ip6, node_port, **kw):
    return lb_svc6(name, ip6, node_port, ports=[("sig", 2905, "SCTP", 2906, node_port)], **kw)


def sctp_slice6(name, svc, endpoints):
    return eslice6(name, svc, endpoints, ports=[("sig", 2906, "SCTP")])


OBJECTS = [
    # a load balancer reachable from one range only, with an external IP,
    # its backend here
    sctp_svc6("sig", "fd00:16::20", 30905, lb_ip=LB6, externalIPs=[EXT6],
              loadBalancerSourceRanges=["2001:db8:250::/64"]),
    sctp_slice6("sig-1", "sig", [ep(POD_B6, node=NODE)]),
    # only a backend on another node: SNAT from outside
    sctp_svc6("far", "fd00:16::21", 30906),
    sctp_slice6("far-1", "far", [ep(REMOTE6, node="node-b")]),
    # eTP Local, its endpoint elsewhere: dropped from outside
    sctp_svc6("local", "fd00:16::22", 30907, etp="Local"),
    sctp_slice6("local-1", "local", [ep(REMOTE6, node="node-b")]),
    # eTP Local with both: the local one, the client's address kept
    sctp_svc6("mine", "fd00:16::23", 30908, etp="Local"),
    sctp_slice6("mine-1", "mine", [ep(POD_B6, node=NODE), ep(REMOTE6, node="node-b")]),
    # no endpoint at all: rejected
    sctp_svc6("none", "fd00:16::24", 30909),
    # Maglev over four remote backends (node_services: ("shop", "mag"))
    sctp_svc6("mag", "fd00:16::25", 30910),
    sctp_slice6("mag-1", "mag", [ep(b, node="node-c") for b in MAG_BACKENDS]),
]


@pytest.fixture(scope="module")
def dp(bpffs, net):
    with node_datapath(bpffs, net, "sctp6-outside", f"172.16.0.0/16,{SERVICE_CIDR6}",
                       NODE_IP, [("A", POD_A, POD_A6), ("B", POD_B, POD_B6)], NODE_IP6) as d:
        yield d


@pytest.fixture(scope="module")
def svcs(dp):
    # pod A's SCTP hostPort on the node's IPv6 address (a CNI ADD's portMappings)
    from agent.lb.hostport import PortMapping, frontends_of
    hostport = frontends_of(("web", "h"), POD_A, [PortMapping(3868, 3869, "SCTP")], [NODE_IP],
                            NODE, pod_ip6=POD_A6, local_ips6=[NODE_IP6])
    with node_services(dp, OBJECTS, NODE_IP6, SERVICE_CIDR6, hostport) as rec:
        yield rec


_sport = itertools.count(44000)


def init_chunk(tag=0x1234):
    return SCTPChunkInit(init_tag=tag, a_rwnd=65535, n_out_streams=1, n_in_streams=1,
                         init_tsn=1)


def outside(net, dst, dport, sport, src=CLIENT6, dev="eth0", data=None, tag=0):
    """An INIT from a client outside (data None), else a DATA chunk."""
    chunk = init_chunk() if data is None else SCTPChunkData(tsn=7, data=data)
    return Ether(src=CLIENT_MAC if dev == "eth0" else ENI_GW_MAC, dst=net.mac(dev)) / \
        IPv6(src=src, dst=dst, hlim=64) / SCTP(sport=sport, dport=dport, tag=tag) / chunk


def assert_crc_valid(out: bytes):
    """The CRC32c the program left is scapy's over the packet as it is."""
    pkt = Ether(out)
    fresh = Ether(out)
    del fresh[SCTP].chksum
    assert pkt[SCTP].chksum != 0
    assert Ether(bytes(fresh))[SCTP].chksum == pkt[SCTP].chksum, "SCTP CRC32c"


def addrs(out: bytes):
    o = Ether(out)
    return o[IPv6].src, o[SCTP].sport, o[IPv6].dst, o[SCTP].dport


# -- to a backend on this node --------------------------------------------------------

@pytest.mark.parametrize("dst, dport, dev", [(NODE_IP6, 30905, "eth0"), (EXT6, 2905, "eth0"),
                                             (LB6, 2905, "eth0"), (NODE_IP6, 30905, "eth1")])
def test_an_sctp_association_from_outside_reaches_a_local_backend_and_its_replies_the_client(
        dp, net, svcs, dst, dport, dev):
    sport = next(_sport)
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", outside(net, dst, dport, sport, dev=dev),
                                 dev)
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliB"))
    # eTP Cluster with a local backend: the client's address is kept
    assert addrs(out) == (CLIENT6, sport, POD_B6, 2906)
    assert Ether(out)[IPv6].hlim == 63
    assert_crc_valid(out)
    fwd = ct_rows(dp, direction="forward", saddr=CLIENT6, sport=sport)
    assert [(r.proto, r.daddr, r.dport, r.nat_addr, r.nat_port) for r in fwd] == [
        ("SCTP", dst, dport, POD_B6, 2906)]
    # the backend's INIT ACK gets the frontend back and leaves by the
    # primary NIC, which owns the node's address
    ack = Ether(src=net.pod_mac["B"], dst=net.mac("caliB")) / IPv6(src=POD_B6, dst=CLIENT6) / \
        SCTP(sport=2906, dport=sport, tag=0x1234) / SCTPChunkInitAck(init_tag=0x99, a_rwnd=65535,
                                                                      n_out_streams=1,
                                                                      n_in_streams=1, init_tsn=5)
    v, out, reason, _, idx = run(dp, net, "fp_from_pod", ack, "caliB")
    assert (v, idx) == (TC_ACT_REDIRECT, net.idx("eth0"))
    assert addrs(out) == (dst, dport, CLIENT6, sport)
    assert_crc_valid(out)
    # the association's DATA, both ways
    for data in (b"x", bytes(range(256)) * 5):
        v, out, reason, _, idx = run(dp, net, "fp_from_vpc",
                                     outside(net, dst, dport, sport, dev=dev, data=data,
                                             tag=0x99), dev)
        assert (v, idx) == (TC_ACT_REDIRECT, net.idx("caliB"))
        assert addrs(out) == (CLIENT6, sport, POD_B6, 2906)
        assert bytes(Ether(out)[SCTP].payload) == bytes(SCTPChunkData(tsn=7, data=data))
        assert_crc_valid(out)
        back = Ether(src=net.pod_mac["B"], dst=net.mac("caliB")) / \
            IPv6(src=POD_B6, dst=CLIENT6) / SCTP(sport=2906, dport=sport, tag=0x1234) / \
            SCTPChunkData(tsn=9, data=data)
        v, out, reason, _, idx = run(dp, net, "fp_from_pod", back, "caliB")
        assert addrs(out) == (dst, dport, CLIENT6, sport)
        assert_crc_valid(out)


def test_an_sctp_host_port_from_outside_reaches_its_pod_and_the_pods_reply_the_client(
        dp, net, svcs):
    sport = next(_sport)
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", outside(net, NODE_IP6, 3868, sport),
                                 "eth0")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliA"))
    assert addrs(out) == (CLIENT6, sport, POD_A6, 3869)
    assert_crc_valid(out)
    ack = Ether(src=net.pod_mac["A"], dst=net.mac("caliA")) / IPv6(src=POD_A6, dst=CLIENT6) / \
        SCTP(sport=3869, dport=sport, tag=0x1234) / SCTPChunkData(tsn=1, data=b"ok")
    v, out, reason, _, idx = run(dp, net, "fp_from_pod", ack, "caliA")
    assert (v, idx) == (TC_ACT_REDIRECT, net.idx("eth0"))
    assert addrs(out) == (NODE_IP6, 3868, CLIENT6, sport)
    assert_crc_valid(out)


def test_local_policy_keeps_the_clients_address_for_sctp_from_outside(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", outside(net, NODE_IP6, 30908, sport),
                                 "eth0")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliB"))
    assert addrs(out) == (CLIENT6, sport, POD_B6, 2906)
    assert_crc_valid(out)


def test_an_sctp_crc_left_to_offload_stays_zero_from_outside(dp, net, svcs):
    raw = bytearray(bytes(outside(net, NODE_IP6, 30905, next(_sport))))
    raw[14 + 40 + 8: 14 + 40 + 12] = bytes(4)
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", bytes(raw), "eth0")
    assert (v, idx) == (TC_ACT_REDIRECT, net.idx("caliB"))
    assert (Ether(out)[SCTP].dport, Ether(out)[SCTP].chksum) == (2906, 0)


# -- to a backend on another node: SNAT --------------------------------------------------

def test_sctp_from_outside_to_a_remote_backend_is_snated_and_its_reply_reversed(dp, net, svcs):
    sport = next(_sport)
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", outside(net, NODE_IP6, 30906, sport),
                                 "eth0")
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-eni", net.idx("eth0"))
    src, snat_port, dst, dport = addrs(out)
    assert (src, dst, dport) == (NODE_IP6, REMOTE6, 2906)
    assert 61000 <= snat_port <= 65535
    assert Ether(out).dst == GW_MAC
    assert_crc_valid(out)
    # the remote backend's INIT ACK to the node's SNAT port: the client back
    back = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=REMOTE6, dst=NODE_IP6) / \
        SCTP(sport=2906, dport=snat_port, tag=0x1234) / SCTPChunkInitAck(
            init_tag=0x77, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=3)
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", back, "eth0")
    assert (v, idx) == (TC_ACT_REDIRECT, net.idx("eth0"))
    assert addrs(out) == (NODE_IP6, 30906, CLIENT6, sport)
    assert_crc_valid(out)
    # the association's DATA goes the same way, with the same port, both ways
    for data in (bytes(range(256)) * 5, b"hello"):
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         outside(net, NODE_IP6, 30906, sport, data=data, tag=0x77), "eth0")
        assert addrs(out) == (NODE_IP6, snat_port, REMOTE6, 2906)
        assert_crc_valid(out)
        back = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=REMOTE6, dst=NODE_IP6) / \
            SCTP(sport=2906, dport=snat_port, tag=0x1234) / SCTPChunkData(tsn=3, data=data)
        v, back_out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
        assert addrs(back_out) == (NODE_IP6, 30906, CLIENT6, sport)
        assert_crc_valid(back_out)
    # a router's "packet too big" about the SNATed packet reaches the client
    # about its own packet (fp_vpc6_node: RELATED ICMPv6 quoting SCTP)
    err = Ether(src=GW_MAC, dst=net.mac("eth0")) / IPv6(src=GW6, dst=NODE_IP6) / \
        ICMPv6PacketTooBig(mtu=1280) / bytes(Ether(out)[IPv6])
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc", err, "eth0")
    assert (v, idx) == (TC_ACT_REDIRECT, net.idx("eth0"))
    o = Ether(out)
    assert (o[IPv6].src, o[IPv6].dst) == (GW6, CLIENT6)
    q = IPv6(bytes(o[ICMPv6PacketTooBig].payload))
    assert (q.src, q[SCTP].sport, q.dst, q[SCTP].dport) == (CLIENT6, sport, NODE_IP6, 30906)
    fresh = o.copy()
    del fresh[ICMPv6PacketTooBig].cksum
    assert Ether(bytes(fresh))[ICMPv6PacketTooBig].cksum == o[ICMPv6PacketTooBig].cksum


# -- what kube-proxy drops or rejects ------------------------------------------------

def test_sctp_data_of_an_unknown_association_from_outside_is_dropped(dp, net, svcs):
    sport = next(_sport)
    v, _, reason, _, _ = run(dp, net, "fp_from_vpc",
                             outside(net, NODE_IP6, 30905, sport, data=b"d", tag=5), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")
    assert ct_rows(dp, saddr=CLIENT6, sport=sport) == []


def test_local_policy_drops_sctp_from_outside_on_a_node_without_endpoints(dp, net, svcs):
    sport = next(_sport)
    v, _, reason, _, _ = run(dp, net, "fp_from_vpc", outside(net, NODE_IP6, 30907, sport),
                             "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-no-local-backend")
    assert ct_rows(dp, saddr=CLIENT6, sport=sport) == []


@pytest.mark.parametrize("dev", ["eth0", "eth1"])
def test_sctp_to_a_node_port_without_endpoints_is_rejected_out_of_the_interface_it_came_in_on(
        dp, net, svcs, dev):
    v, out, reason, _, idx = run(dp, net, "fp_from_vpc",
                                 outside(net, NODE_IP6, 30909, next(_sport), dev=dev), dev)
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend", net.idx(dev))
    o = Ether(out)
    assert o[ICMPv6DestUnreach].code == 4
    assert (o[IPv6].src, o[IPv6].dst) == (NODE_IP6, CLIENT6)
    quote = bytes(o[ICMPv6DestUnreach].payload)
    assert (IPv6(quote).dst, int.from_bytes(quote[42:44], "big")) == (NODE_IP6, 30909)


@pytest.mark.parametrize("prog,dev", [("fp_from_pod", "caliA"), ("fp_from_vpc", "eth0")])
def test_a_rejected_sctp_init_quotes_its_initiate_tag(dp, net, svcs, prog, dev):
    # A pod's INIT and an outside client's alike: the client's SCTP matches
    # the error to its INIT by the initiate tag, 20 bytes into SCTP, and
    # ignores a shorter quote (the INIT retried until it times out).
    sport = next(_sport)
    sent = outside(net, NODE_IP6, 30909, sport)
    sent[SCTP].payload = init_chunk(tag=0x5EC7A16)
    if prog == "fp_from_pod":
        sent = Ether(src=net.pod_mac["A"], dst=net.mac("caliA")) / sent[IPv6].copy()
        sent[IPv6].src = POD_A6
    sent = Ether(bytes(sent))
    v, out, reason, _, idx = run(dp, net, prog, sent, dev)
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend", net.idx(dev))
    o = Ether(out)
    assert (o[ICMPv6DestUnreach].type, o[ICMPv6DestUnreach].code) == (1, 4)
    quote = bytes(o[ICMPv6DestUnreach].payload)
    assert quote == bytes(sent[IPv6])[:60], "IPv6 header + 20 bytes of SCTP"
    assert quote[56:60] == (0x5EC7A16).to_bytes(4, "big"), "initiate tag"
    assert o[IPv6].plen == 8 + 60
    again = o.copy()
    del again[ICMPv6DestUnreach].cksum
    assert Ether(bytes(again))[ICMPv6DestUnreach].cksum == o[ICMPv6DestUnreach].cksum
    # too short for 20 bytes of SCTP: the usual quote, not a drop
    short = Ether(bytes(sent)[:14 + 40 + 16])
    short[IPv6].plen = 16
    short = Ether(bytes(short))
    v, out, reason, *_ = run(dp, net, prog, short, dev)
    assert (v, reason) == (TC_ACT_REDIRECT, "dropped-service-no-backend")
    assert bytes(Ether(out)[ICMPv6DestUnreach].payload) == bytes(short[IPv6])[:48]


def test_sctp_load_balancer_source_ranges_drop_outside_clients_outside_them(dp, net, svcs):
    sport = next(_sport)
    v, _, reason, _, _ = run(dp, net, "fp_from_vpc",
                             outside(net, LB6, 2905, sport, src=OUTSIDER6), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-source-range")
    assert ct_rows(dp, saddr=OUTSIDER6, sport=sport) == []
    # the external IP of the same Service is not filtered
    v, out, reason, _, _ = run(dp, net, "fp_from_vpc",
                               outside(net, EXT6, 2905, sport, src=OUTSIDER6), "eth0")
    assert reason == "redirected-local" and addrs(out)[2:] == (POD_B6, 2906)


def test_the_nodes_own_sctp_and_unallocated_service_addresses_from_outside(dp, net, svcs):
    # no frontend: the node's own association, the stack's, untouched
    pkt = outside(net, NODE_IP6, 9899, next(_sport))
    v, out, reason, _, _ = run(dp, net, "fp_from_vpc", pkt, "eth0")
    assert (v, reason) == (TC_ACT_UNSPEC, "to-stack")
    assert out == bytes(pkt)
    # an unallocated address of the IPv6 Service CIDR: dropped
    v, _, reason, _, _ = run(dp, net, "fp_from_vpc",
                             outside(net, "fd00:16::99", 2905, next(_sport)), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-unallocated")


# -- Maglev ---------------------------------------------------------------------------

def test_maglev_sends_an_sctp_association_from_outside_to_the_entry_its_hash_names(
        dp, net, svcs):
    fe = Frontend(NODE_IP6, 30910, "SCTP", SCOPE_EXTERNAL)
    table = svcs.maglev_table(fe)
    bes = dp.lb.backends()
    assert {bes[b][0] for b in table} == set(MAG_BACKENDS)
    picks = set()
    for sport in range(45000, 45024):
        want = bes[table[flow_hash6(CLIENT6, sport, 30910, IPPROTO_SCTP) % dp.lb.maglev_size]][0]
        v, out, reason, *_ = run(dp, net, "fp_from_vpc", outside(net, NODE_IP6, 30910, sport),
                                 "eth0")
        assert v == TC_ACT_REDIRECT, reason
        assert addrs(out)[2] == want, sport
        assert_crc_valid(out)
        picks.add(want)
    assert len(picks) > 1


# -- the slot ------------------------------------------------------------------------

def by_family(dp) -> dict:
    return {(c.ifindex, c.direction, c.reason, c.family): c.packets
            for c in dp.maps.counters(by_family=True)}


@contextmanager
def sctp_slot_empty(dp):
    tails = dp.module.table(DEFS.maps["FP_MAP_TAILS"])
    del tails[ctypes.c_int(int(DEFS.defines["FP_TAIL_FROM_VPC6_SCTP"]))]
    try:
        yield
    finally:
        dp.module.fill_tail_calls()


def test_sctp_from_outside_is_dropped_not_left_untranslated_when_its_program_is_missing(
        dp, net, svcs):
    sport = next(_sport)
    key = (net.idx("eth0"), "from-vpc", "dropped-tail-call-missing")
    before = by_family(dp)
    with sctp_slot_empty(dp):
        v, out, reason, _, _ = run(dp, net, "fp_from_vpc", outside(net, NODE_IP6, 30905, sport),
                                   "eth0")
        assert (v, reason) == (TC_ACT_SHOT, "dropped-tail-call-missing")
        # counted as IPv6's, though an IPv6 program counts it
        after = by_family(dp)
        assert after.get(key + ("ipv6",), 0) == before.get(key + ("ipv6",), 0) + 1
        assert after.get(key + ("ipv4",), 0) == before.get(key + ("ipv4",), 0)
        # TCP and UDP to the node are another program's: unaffected
        from tests.bpf.test_nodeport6 import from_outside
        v, _, reason, *_ = run(dp, net, "fp_from_vpc",
                               from_outside(net, NODE_IP6, 22, next(_sport)), "eth0")
        assert (v, reason) == (TC_ACT_UNSPEC, "to-stack")
    assert ct_rows(dp, saddr=CLIENT6, sport=sport) == []
    v, out, reason, *_ = run(dp, net, "fp_from_vpc", outside(net, NODE_IP6, 30905, sport), "eth0")
    assert reason == "redirected-local", "the slot is back"


# -- what-if (fastpath trace) ----------------------------------------------------------

def test_a_whatif_sctp_init_from_outside_shows_its_translation_and_changes_nothing(
        dp, net, svcs):
    """`fastpath trace --proto sctp` from outside: the run through
    fp_vpc6_sctp records the Service and backend, and leaves no conntrack
    entry nor count behind."""
    from agent.datapath.libbpf import prog_test_run
    from agent.datapath.nsenter import in_netns
    from tests.bpf.conftest import NOT_RECORDED
    sport = next(_sport)
    before = by_family(dp)
    dp.maps.decision_reset(NOT_RECORDED)
    with in_netns(net.ns):
        res = prog_test_run(dp.prog_fd("fp_from_vpc"),
                            bytes(outside(net, NODE_IP6, 30906, sport)), ifindex=net.idx("eth0"),
                            mark=int(DEFS.defines["FP_WHATIF_MARK"]))
    rec = dp.maps.decision()
    assert (res.retval, DEFS.reason(rec.reason)) == (TC_ACT_REDIRECT, "redirected-eni")
    assert rec.svc_id != 0 and rec.backend_id != 0 and socket.ntohs(rec.nat_dport) == 2906
    assert dp.lb.backends()[rec.backend_id][0] == REMOTE6
    assert addrs(res.data)[2:] == (REMOTE6, 2906)
    assert ct_rows(dp, saddr=CLIENT6, sport=sport) == []
    assert by_family(dp) == before
