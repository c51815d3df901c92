"""IPv6 fast redirect: fp_from_pod6 and fp_from_vpc6, reached by tail call
from fp_from_pod and fp_from_vpc, run with BPF_PROG_TEST_RUN.

Pods A and B are dual stack (POD_A6, POD_B6) on the bpfnet node, whose
IPv6 routing is Terway's per family: `from <podIPv6> lookup 1001` sends
pod egress to eth1's table, whose default route has a link-local gateway.
Checksums of the rewritten packets are checked by scapy.
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import UDP as UDP4
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RS,
                                IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting, TCP, UDP)
from scapy.layers.l2 import Ether

from agent.model.endpoint import Endpoint
from tests.bpf.conftest import (GW_MAC, POD_A, POD_A6, POD_B, POD_B6, POD_C6, REMOTE6,
                                REMOTE6_NO_NEIGH, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
                                dual_stack, run_prog)

_sport = itertools.count(42000)
assert UDP is UDP4        # scapy's one UDP class serves both families


@pytest.fixture(scope="module")
def dual(dp, bpfnet):
    """A, B and C registered dual stack (C without a known ENI), as
    discovery finds them; back to IPv4 only afterwards."""
    with dual_stack(dp, bpfnet) as eps:
        yield eps
    assert dp.maps.endpoints6() == [], "re-registering without IPv6 removes the twins"


def from_pod(n, pod, dst, l4=None, hlim=64, ext=None):
    dev = {"a": n.cali_a, "b": n.cali_b, "c": n.cali_c}[pod]
    mac = {"a": n.pod_a_mac, "b": n.pod_b_mac, "c": n.pod_c_mac}[pod]
    src = {"a": POD_A6, "b": POD_B6, "c": POD_C6}[pod]
    ip = IPv6(src=src, dst=dst, hlim=hlim)
    if ext is not None:
        ip = ip / ext
    return Ether(src=mac, dst=dev.mac) / ip / (
        l4 if l4 is not None else UDP(sport=next(_sport), dport=53) / b"query")


def from_vpc(n, src, dst, l4=None, hlim=64):
    return Ether(src=GW_MAC, dst=n.eth1.mac) / IPv6(src=src, dst=dst, hlim=hlim) / (
        l4 if l4 is not None else TCP(sport=next(_sport), dport=80, flags="S") / b"hi")


def run(dp, n, prog, pkt, dev):
    return run_prog(dp, n.ns, prog, bytes(pkt), getattr(n, dev).ifindex)


def assert_forwarded(sent, out, dmac, smac):
    """A router's rewrite: MACs, hop limit - 1, nothing else; the transport
    checksum (mandatory for UDP over IPv6) still verifies."""
    o = Ether(out)
    assert (o.dst, o.src) == (dmac, smac)
    assert o[IPv6].hlim == sent[IPv6].hlim - 1
    assert (o[IPv6].src, o[IPv6].dst) == (sent[IPv6].src, sent[IPv6].dst)
    assert bytes(o[IPv6].payload) == bytes(sent[IPv6].payload), "extension headers and L4 untouched"
    for layer in (TCP, UDP):
        if layer in o and IPv6ExtHdrFragment not in o:
            want = o[layer].chksum
            again = o.copy()
            del again[layer].chksum
            assert Ether(bytes(again))[layer].chksum == want, "transport checksum verifies"
            assert want != 0


# ---- pod to pod on this node ------------------------------------------------

L4S = [("udp", lambda: UDP(sport=next(_sport), dport=53) / b"q"),
       ("tcp", lambda: TCP(sport=next(_sport), dport=80, flags="S")),
       ("icmpv6-echo", lambda: ICMPv6EchoRequest(id=7, seq=1) / b"ping")]


@pytest.mark.parametrize("name,l4", L4S, ids=[x[0] for x in L4S])
def test_pod_to_pod_on_the_node_is_redirected_into_the_peer(dp, bpfnet, dual, name, l4):
    n = bpfnet
    sent = from_pod(n, "a", POD_B6, l4=l4())
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-local",
                                                       "redirect-peer")
    assert r.redirect_ifindex == n.cali_b.ifindex
    assert_forwarded(sent, r.out, n.pod_b_mac, n.cali_b.mac)


EXT_HEADERS = [
    ("hop-by-hop", lambda: IPv6ExtHdrHopByHop()),
    ("destination options", lambda: IPv6ExtHdrDestOpt()),
    ("routing (no segments left)", lambda: IPv6ExtHdrRouting(segleft=0)),
    ("hop-by-hop, routing, destination options", lambda: IPv6ExtHdrHopByHop()
     / IPv6ExtHdrRouting(segleft=0) / IPv6ExtHdrDestOpt()),
    ("first fragment", lambda: IPv6ExtHdrFragment(id=0x1234, m=1, offset=0)),
    ("later fragment", lambda: IPv6ExtHdrFragment(id=0x1234, m=0, offset=4)),
    ("seven extension headers", lambda: IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
     / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
     / IPv6ExtHdrDestOpt()),
]


@pytest.mark.parametrize("name,ext", EXT_HEADERS, ids=[x[0] for x in EXT_HEADERS])
def test_extension_headers_are_walked_and_kept(dp, bpfnet, dual, name, ext):
    n = bpfnet
    sent = from_pod(n, "a", POD_B6, ext=ext())
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local"), name
    assert_forwarded(sent, r.out, n.pod_b_mac, n.cali_b.mac)


def test_more_extension_headers_than_the_walk_allows_are_dropped(dp, bpfnet, dual):
    n = bpfnet
    ext = IPv6ExtHdrHopByHop()
    for _ in range(8):
        ext = ext / IPv6ExtHdrDestOpt()
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6, ext=ext), "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-invalid-packet")


def test_malformed_ipv6_is_dropped(dp, bpfnet, dual):
    n = bpfnet
    good = bytes(from_pod(n, "a", POD_B6))
    # payload length claims more than the packet holds
    longer = bytearray(good)
    longer[14 + 4:14 + 6] = (len(good) - 14 - 40 + 8).to_bytes(2, "big")
    # an extension header that runs past the packet
    cut = bytes(from_pod(n, "a", POD_B6, ext=IPv6ExtHdrDestOpt(len=30), l4=b""))
    for desc, pkt in (("payload length", bytes(longer)), ("extension header", cut)):
        r = run_prog(dp, n.ns, "fp_from_pod", pkt, n.cali_a.ifindex)
        assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-invalid-packet"), desc


def test_hop_limit_about_to_expire_goes_to_the_stack(dp, bpfnet, dual):
    n = bpfnet
    for dst in (POD_B6, REMOTE6):
        sent = from_pod(n, "a", dst, hlim=1)
        r = run(dp, n, "fp_from_pod", sent, "cali_a")
        assert (r.verdict, r.reason) == (TC_ACT_UNSPEC, "to-stack-ttl")
        assert r.out == bytes(sent)
    r = run(dp, n, "fp_from_vpc", from_vpc(n, REMOTE6, POD_B6, hlim=1), "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_UNSPEC, "to-stack-ttl")


def test_neighbour_discovery_link_local_and_multicast_pass_to_the_stack(dp, bpfnet, dual):
    """The link's own traffic, as ARP is for IPv4: unchanged, counted as
    passed (to-stack counts pod traffic the fast path hands to the node, so
    a pod's own ND must not look like traffic fastpath failed to carry)."""
    n = bpfnet
    cases = [("a unicast neighbour solicitation to another pod",
              from_pod(n, "a", POD_B6, l4=ICMPv6ND_NS(tgt=POD_B6))),
             ("a router solicitation", from_pod(n, "a", "ff02::2", l4=ICMPv6ND_RS())),
             ("to a link-local address", from_pod(n, "a", "fe80::1")),
             ("to a multicast group", from_pod(n, "a", "ff02::1"))]
    for desc, sent in cases:
        r = run(dp, n, "fp_from_pod", sent, "cali_a")
        assert (r.verdict, r.reason) == (TC_ACT_UNSPEC, "passed"), desc
        assert r.out == bytes(sent), desc
    sent = from_vpc(n, REMOTE6, POD_B6, l4=ICMPv6ND_NS(tgt=POD_B6))
    r = run(dp, n, "fp_from_vpc", sent, "eth1")
    assert r.verdict == TC_ACT_UNSPEC and r.out == bytes(sent)


# ---- pod to VPC -------------------------------------------------------------

def test_pod_to_vpc_leaves_by_the_pods_eni_with_the_gateways_mac(dp, bpfnet, dual):
    n = bpfnet
    for name, l4 in L4S:
        sent = from_pod(n, "a", REMOTE6, l4=l4())
        r = run(dp, n, "fp_from_pod", sent, "cali_a")
        assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-eni",
                                                           "redirect"), name
        assert r.redirect_ifindex == n.eth1.ifindex
        assert_forwarded(sent, r.out, GW_MAC, n.eth1.mac)


def test_an_unresolved_gateway_is_left_to_the_kernel_redirect_neigh(dp, bpfnet, dual):
    n = bpfnet
    sent = from_pod(n, "a", REMOTE6_NO_NEIGH)
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-eni",
                                                       "redirect-neigh")
    assert r.redirect_ifindex == n.eth1.ifindex
    assert Ether(r.out)[IPv6].hlim == 63


def test_without_a_known_eni_or_a_policy_route_the_stack_decides(dp, bpfnet, dual):
    n = bpfnet
    # C's ENI is unresolved: fastpath does not guess one
    r = run(dp, n, "fp_from_pod", from_pod(n, "c", REMOTE6), "cali_c")
    assert (r.verdict, r.reason) == (TC_ACT_UNSPEC, "to-stack-fib")
    # B has no `from` rule: the FIB answers from the main table, no ENI
    r = run(dp, n, "fp_from_pod", from_pod(n, "b", REMOTE6), "cali_b")
    assert (r.verdict, r.reason) == (TC_ACT_UNSPEC, "to-stack-fib")


# ---- VPC to pod -------------------------------------------------------------

def test_vpc_to_pod_is_redirected_into_the_pod(dp, bpfnet, dual):
    n = bpfnet
    for l4 in (None, UDP(sport=53, dport=next(_sport)) / b"answer",
               ICMPv6EchoRequest(id=3) / b"x"):
        sent = from_vpc(n, REMOTE6, POD_B6, l4=l4)
        r = run(dp, n, "fp_from_vpc", sent, "eth1")
        assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-local",
                                                           "redirect-peer")
        assert r.redirect_ifindex == n.cali_b.ifindex
        assert_forwarded(sent, r.out, n.pod_b_mac, n.cali_b.mac)


def test_ipv6_for_the_node_goes_to_the_stack(dp, bpfnet, dual):
    n = bpfnet
    sent = from_vpc(n, REMOTE6, "fd00:10::2")
    r = run(dp, n, "fp_from_vpc", sent, "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_UNSPEC, "to-stack")
    assert r.out == bytes(sent)


# ---- anti-spoofing per family -------------------------------------------------

def test_the_vpc_never_sends_a_local_pods_ipv6_address(dp, bpfnet, dual):
    n = bpfnet
    r = run(dp, n, "fp_from_vpc", from_vpc(n, POD_A6, POD_B6), "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-source-spoofed")
    counted = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    assert counted[(n.eth1.ifindex, "from-vpc", "dropped-source-spoofed")] >= 1


def test_a_registered_veth_sends_only_its_own_ipv6_address(dp, bpfnet, dual):
    n = bpfnet
    spoofed = Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IPv6(src=POD_B6, dst=REMOTE6) / UDP()
    r = run(dp, n, "fp_from_pod", spoofed, "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-source-spoofed")


def test_an_unregistered_veth_may_not_claim_a_local_pods_ipv6_address(dp, bpfnet, dual):
    n = bpfnet
    assert n.cali_d.ifindex not in dp.maps.veths()
    pkt = lambda src: Ether(dst=n.cali_d.mac) / IPv6(src=src, dst=REMOTE6) / UDP()
    r = run(dp, n, "fp_from_pod", pkt(POD_A6), "cali_d")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-source-spoofed")
    r = run(dp, n, "fp_from_pod", pkt("fd00:99::1"), "cali_d")
    assert (r.verdict, r.reason) == (TC_ACT_UNSPEC, "to-stack")


# ---- the maps -------------------------------------------------------------

def test_endpoint_twins_follow_the_endpoints(dp, bpfnet, dual):
    n = bpfnet
    got = {e.ip: e.host_ifindex for e in dp.maps.endpoints6()}
    assert got == {POD_A6: n.cali_a.ifindex, POD_B6: n.cali_b.ifindex, POD_C6: n.cali_c.ifindex}
    # a new IPv6 address replaces the old one; deleting the endpoint takes both
    b = dual[1]
    moved = Endpoint(b.ip, b.host_ifname, b.host_ifindex, b.host_mac, b.pod_mac, b.eni_name,
                     b.eni_ifindex, ip6="fd00:10::1:bb")
    dp.maps.endpoint_put(moved)
    try:
        got = {e.ip for e in dp.maps.endpoints6()}
        assert "fd00:10::1:bb" in got and POD_B6 not in got
        assert dp.maps.endpoint_delete(b.ip, b.host_ifindex)
        assert {e.ip for e in dp.maps.endpoints6()} == {POD_A6, POD_C6}
        r = run(dp, n, "fp_from_pod", from_pod(n, "a", "fd00:10::1:bb"), "cali_a")
        assert r.reason != "redirected-local", "a deleted pod is no destination"
    finally:
        dp.maps.endpoint_put(b)
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6), "cali_a")
    assert r.reason == "redirected-local"


def test_a_whatif_packet_runs_the_ipv6_program_and_counts_nothing(dp, bpfnet, dual):
    from agent.datapath.maps import DEFS
    from tests.bpf.conftest import NOT_RECORDED
    n = bpfnet
    before = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    dp.maps.decision_reset(NOT_RECORDED)
    r = run_prog(dp, n.ns, "fp_from_pod", bytes(from_pod(n, "a", POD_B6)), n.cali_a.ifindex,
                 mark=DEFS.defines["FP_WHATIF_MARK"])
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    after = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    assert after == before


def test_ipv4_of_dual_stack_pods_is_unchanged(dp, bpfnet, dual):
    from scapy.layers.inet import IP
    n = bpfnet
    sent = Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IP(src=POD_A, dst=POD_B) / UDP4() / b"x"
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")


def test_an_icmpv6_error_is_forwarded_like_any_packet(dp, bpfnet, dual):
    n = bpfnet
    quoted = IPv6(src=POD_B6, dst=REMOTE6) / UDP(sport=1, dport=2)
    sent = from_vpc(n, REMOTE6, POD_B6, l4=ICMPv6DestUnreach(code=4) / quoted)
    r = run(dp, n, "fp_from_vpc", sent, "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert_forwarded(sent, r.out, n.pod_b_mac, n.cali_b.mac)


def test_orphaned_ipv6_entries_are_removed_at_restore(dp, bpfnet, dual):
    """An agent killed between deleting a pod's IPv4 and IPv6 entries leaves
    an IPv6 entry nobody claims: the restore's retain removes it, and only it."""
    from agent.datapath.maps import MAP, key6
    n = bpfnet
    t = dp.module.table(MAP["FP_MAP_ENDPOINTS6"])
    orphan = "fd00:10::1:dead"
    v = t[key6(t, POD_B6)]
    t[key6(t, orphan)] = v
    assert orphan in {e.ip for e in dp.maps.endpoints6()}
    assert dp.maps.endpoints6_retain({POD_A6, POD_B6, POD_C6}) == 1
    assert {e.ip for e in dp.maps.endpoints6()} == {POD_A6, POD_B6, POD_C6}
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6), "cali_a")
    assert r.reason == "redirected-local"


def test_ipv6_host_stack_and_service_cidrs_go_to_the_stack(dp, bpfnet, dual):
    """host_stack_cidrs and service_cidrs of IPv6 (an untranslated IPv6
    Service CIDR, an IPv6 node-local DNS address) are the stack's, as IPv4's."""
    n = bpfnet
    cfg = dp.config
    base = list(cfg.host_stack_cidrs + cfg.service_cidrs)
    dp.maps.bypass_set(base + ["fd00:5::/108", "fd00:53::10/128"])
    try:
        assert set(dp.maps.bypass()) >= {"fd00:5::/108", "fd00:53::10/128"}
        for dst in ("fd00:5::1", "fd00:53::10"):
            sent = from_pod(n, "a", dst)
            r = run(dp, n, "fp_from_pod", sent, "cali_a")
            assert (r.verdict, r.reason) == (TC_ACT_UNSPEC, "to-stack-bypass"), dst
            assert r.out == bytes(sent)
        r = run(dp, n, "fp_from_pod", from_pod(n, "a", "fd00:5::10:0"), "cali_a")
        assert r.reason == "redirected-eni", "outside the /108"
    finally:
        dp.maps.bypass_set(base)
    assert not any(":" in c for c in dp.maps.bypass())
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", "fd00:5::1"), "cali_a")
    assert r.reason == "redirected-eni"
