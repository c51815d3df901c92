"""The guards every packet passes first (bpf/lib/guard.h): anti-spoofing on
registered pod veths in every family and on ENIs; IPv6 of isolated pods is
judged by NetworkPolicy (tests/bpf/test_policy_ipv6.py), no longer held back.

Pod A's veth is registered with an IPv4 and an IPv6 address; the policy maps
are filled by the real compiler and diff: A is isolated (ingress), B is not,
C is only audited.
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6MLReport2, ICMPv6ND_NA, ICMPv6ND_NS, \
    ICMPv6ND_RS, IPv6
from scapy.layers.l2 import ARP, Ether

from agent.datapath.maps import DEFS
from agent.model.endpoint import Endpoint
from tests.bpf.conftest import (ENI_IP, GW_MAC, POD_A, POD_B, POD_C, REMOTE, TC_ACT_REDIRECT,
                                TC_ACT_SHOT, enforced, run_prog)
from tests.bpf.test_policy import audited
from tests.policy.kube import namespace, netpol, pod, snapshot

POD_A6 = "fd00:10::a"
OTHER6 = "fd00:10::b"
SPOOFED = "dropped-source-spoofed"
UNJUDGED = "dropped-ipv6-not-judged"   # the retired interim rule
DENIED = "dropped-policy-denied"
_sport = itertools.count(31000)


@pytest.fixture(scope="module")
def pod_a6(dp, bpfnet):
    """A's veth registration with its IPv6 address too, as discovery finds it."""
    n = bpfnet
    ep = Endpoint(POD_A, "caliA", n.cali_a.ifindex, n.cali_a.mac, n.pod_a_mac, "eth1",
                  n.eth1.ifindex, ip6=POD_A6)
    dp.maps.endpoint_put(ep)
    try:
        yield ep
    finally:
        dp.maps.endpoint_put(Endpoint(POD_A, "caliA", n.cali_a.ifindex, n.cali_a.mac,
                                      n.pod_a_mac, "eth1", n.eth1.ifindex))


@pytest.fixture(scope="module")
def isolation(dp):
    """A isolated for ingress, B open, C audited only; policy checks on."""
    snap = snapshot([
        namespace("x", ns="x"), namespace("y", ns="y"),
        pod("x", "a", POD_A, labels={"app": "a"}),
        pod("x", "b", POD_B, labels={"app": "b"}),
        pod("y", "c", POD_C, labels={"app": "c"}),
        netpol("x", "a-deny", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": []}),
        audited(netpol("y", "c-audit", {"podSelector": {"matchLabels": {"app": "c"}},
                                        "ingress": []})),
    ])
    with enforced(dp, snap, {"y/c-audit"}, flush_last=True) as state:
        yield state


def eth_a(n):
    return Ether(src=n.pod_a_mac, dst=n.cali_a.mac)


def v4_from_a(n, src, dst=REMOTE):
    return eth_a(n) / IP(src=src, dst=dst, ttl=64) / UDP(sport=next(_sport), dport=53) / b"q"


def v6_from_a(n, src, dst=OTHER6, l4=None):
    return eth_a(n) / IPv6(src=src, dst=dst) / (l4 if l4 is not None else
                                               UDP(sport=next(_sport), dport=53) / b"q")


def run_a(dp, n, pkt, mark=0):
    return run_prog(dp, n.ns, "fp_from_pod", bytes(pkt), n.cali_a.ifindex, mark=mark)


SPOOF_CASES = [
    ("another local pod's IPv4 address", lambda n: v4_from_a(n, POD_B)),
    ("a remote pod's IPv4 address (one a destination's policy may trust)",
     lambda n: v4_from_a(n, REMOTE, dst=POD_B)),
    ("an IPv4 address nobody has", lambda n: v4_from_a(n, "10.77.0.1")),
    ("the node's own address", lambda n: v4_from_a(n, ENI_IP, dst=POD_B)),
    ("an ARP reply claiming another pod's address",
     lambda n: eth_a(n) / ARP(op=2, psrc=POD_B, hwsrc=n.pod_a_mac, pdst="169.254.1.1")),
    ("an IPv6 source other than the pod's own", lambda n: v6_from_a(n, OTHER6)),
    ("a global IPv6 source on a pod whose IPv6 address is another",
     lambda n: v6_from_a(n, "2001:db8::1")),
]


@pytest.mark.parametrize("desc,make", SPOOF_CASES, ids=[c[0] for c in SPOOF_CASES])
def test_a_registered_veth_drops_every_source_but_its_endpoints(dp, bpfnet, pod_a6, desc, make):
    r = run_a(dp, bpfnet, make(bpfnet))
    assert r.verdict == TC_ACT_SHOT and r.reason == SPOOFED, (desc, r.verdict, r.reason)


OWN_CASES = [
    ("its own IPv4 address", lambda n: v4_from_a(n, POD_A), "redirected-eni"),
    ("an ARP request from its own address",
     lambda n: eth_a(n) / ARP(psrc=POD_A, hwsrc=n.pod_a_mac, pdst="169.254.1.1"), "passed"),
    ("an ARP probe (sender address 0.0.0.0)",
     lambda n: eth_a(n) / ARP(psrc="0.0.0.0", hwsrc=n.pod_a_mac, pdst=POD_A), "passed"),
    # (IPv6 is then fp_from_pod6's: no route for OTHER6 here; link-local passed, like ARP)
    ("its own IPv6 address", lambda n: v6_from_a(n, POD_A6), "to-stack-fib"),
    ("a link-local IPv6 address", lambda n: v6_from_a(n, "fe80::a", dst="fe80::1"), "passed"),
    ("the unspecified IPv6 address (duplicate address detection)",
     lambda n: v6_from_a(n, "::", dst="ff02::1:ff00:a", l4=ICMPv6ND_NS(tgt=POD_A6)), "passed"),
]


@pytest.mark.parametrize("desc,make,reason", OWN_CASES, ids=[c[0] for c in OWN_CASES])
def test_a_registered_veth_passes_its_endpoints_own_sources(dp, bpfnet, pod_a6, desc, make,
                                                            reason):
    r = run_a(dp, bpfnet, make(bpfnet))
    assert r.verdict != TC_ACT_SHOT and r.reason == reason, (desc, r.verdict, r.reason)


def test_a_pod_without_an_ipv6_address_may_only_use_link_local_ones(dp, bpfnet):
    # B is registered with IPv4 only
    n = bpfnet
    pkt = lambda src, dst: (Ether(src=n.pod_b_mac, dst=n.cali_b.mac) / IPv6(src=src, dst=dst)
                            / UDP(sport=next(_sport), dport=53))
    r = run_prog(dp, n.ns, "fp_from_pod", bytes(pkt(POD_A6, OTHER6)), n.cali_b.ifindex)
    assert r.verdict == TC_ACT_SHOT and r.reason == SPOOFED
    r = run_prog(dp, n.ns, "fp_from_pod", bytes(pkt("fe80::b", "fe80::1")), n.cali_b.ifindex)
    assert r.verdict != TC_ACT_SHOT and r.reason == "passed"


def test_a_spoofed_packet_is_counted_and_reported_with_its_addresses(dp, bpfnet, pod_a6, events):
    events.poll()
    key = (bpfnet.cali_a.ifindex, "from-pod", SPOOFED)
    before = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    r = run_a(dp, bpfnet, v4_from_a(bpfnet, REMOTE, dst=POD_B))
    assert r.verdict == TC_ACT_SHOT
    after = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    assert after[key] == before.get(key, 0) + 1
    drops = events.decoded()
    drops = [e for e in drops if e["type"] == 1]            # FP_EV_DROP
    assert [(e["reason"], e["saddr"], e["daddr"], e["ifindex"]) for e in drops] == \
        [(SPOOFED, REMOTE, POD_B, bpfnet.cali_a.ifindex)]


def test_whatif_spoofed_packets_change_nothing(dp, bpfnet, pod_a6):
    whatif = DEFS.defines["FP_WHATIF_MARK"]
    before = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    r = run_a(dp, bpfnet, v4_from_a(bpfnet, POD_B), mark=whatif)
    assert r.verdict == TC_ACT_SHOT and r.reason == SPOOFED
    assert {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()} == before


def from_vpc(n, src, dst):
    return (Ether(src=GW_MAC, dst=n.eth1.mac) / IP(src=src, dst=dst, ttl=64)
            / UDP(sport=next(_sport), dport=53) / b"q")


def test_an_eni_drops_packets_claiming_a_local_pods_address(dp, bpfnet):
    n = bpfnet
    for src in (POD_A, POD_C):
        r = run_prog(dp, n.ns, "fp_from_vpc", bytes(from_vpc(n, src, POD_B)), n.eth1.ifindex)
        assert r.verdict == TC_ACT_SHOT and r.reason == SPOOFED, src
    # to the node itself as well: the source is what is forged
    r = run_prog(dp, n.ns, "fp_from_vpc", bytes(from_vpc(n, POD_A, ENI_IP)), n.eth1.ifindex)
    assert r.verdict == TC_ACT_SHOT and r.reason == SPOOFED
    # a remote pod's address is what the VPC delivers
    r = run_prog(dp, n.ns, "fp_from_vpc", bytes(from_vpc(n, REMOTE, POD_B)), n.eth1.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.reason == "redirected-local"
    counted = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    assert counted[(n.eth1.ifindex, "from-vpc", SPOOFED)] >= 3


def test_a_removed_registration_disarms_the_guard(dp, bpfnet):
    n = bpfnet
    d_ep = Endpoint("10.0.1.13", "caliD", n.cali_d.ifindex, n.cali_d.mac, "02:00:00:00:0d:0d")
    pkt = (Ether(src="02:00:00:00:0d:0d", dst=n.cali_d.mac) / IP(src="10.0.1.99", dst=POD_B)
           / ICMP())
    dp.maps.endpoint_put(d_ep)
    try:
        assert n.cali_d.ifindex in dp.maps.veths()
        r = run_prog(dp, n.ns, "fp_from_pod", bytes(pkt), n.cali_d.ifindex)
        assert r.verdict == TC_ACT_SHOT and r.reason == SPOOFED
    finally:
        assert dp.maps.endpoint_delete(d_ep.ip, d_ep.host_ifindex)
    assert n.cali_d.ifindex not in dp.maps.veths()
    r = run_prog(dp, n.ns, "fp_from_pod", bytes(pkt), n.cali_d.ifindex)
    assert r.reason == "to-stack"


# ---- IPv6: the guard in fp_from_pod6 ---------------------------------------
# fp_from_pod hands IPv6 over before anything else; fp_from_pod6 guards it
# before it decides anything (its endpoint lookup proves a source registered
# on the very veth, lib/guard.h).

def _bad_plen(n, src):
    return eth_a(n) / IPv6(src=src, dst=OTHER6, plen=400) / UDP(sport=next(_sport), dport=53)


def _ns(n, src):
    return v6_from_a(n, src, dst="ff02::1:ff00:1", l4=ICMPv6ND_NS(tgt="fe80::1"))


def _ll(n, src):
    return v6_from_a(n, src, dst="fe80::1")


def _mld(n, src):
    return v6_from_a(n, src, dst="ff02::16", l4=ICMPv6MLReport2())


PASSED6 = [("neighbour solicitation", _ns), ("to a link-local address", _ll),
           ("an MLD report to a multicast group", _mld)]


def test_an_ipv6_source_is_guarded_before_the_packet_is_judged(dp, bpfnet, pod_a6):
    """A forged source is dropped as spoofed however the IPv6 program would
    judge the packet otherwise: malformed, or the link's own traffic it
    passes unjudged; with the pod's own source the same packets are judged
    as before."""
    n = bpfnet
    for desc, make in [("malformed: payload length past the packet", _bad_plen)] + PASSED6:
        r = run_a(dp, n, make(n, OTHER6))
        assert (r.verdict, r.reason) == (TC_ACT_SHOT, SPOOFED), desc
    r = run_a(dp, n, _bad_plen(n, POD_A6))
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-invalid-packet")
    for desc, make in PASSED6:
        r = run_a(dp, n, make(n, POD_A6))
        assert r.verdict != TC_ACT_SHOT and r.reason == "passed", desc


def test_whatif_spoofed_ipv6_packets_change_nothing(dp, bpfnet, pod_a6):
    whatif = DEFS.defines["FP_WHATIF_MARK"]
    before = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    r = run_a(dp, bpfnet, v6_from_a(bpfnet, OTHER6), mark=whatif)
    assert r.verdict == TC_ACT_SHOT and r.reason == SPOOFED
    assert {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()} == before


# ---- IPv6 of isolated pods ------------------------------------------------

def to_pod(n, dev, dst6, l4=None):
    d = getattr(n, dev)
    return (Ether(src=d.mac, dst="02:00:00:00:0a:0a") / IPv6(src=OTHER6, dst=dst6)
            / (l4 if l4 is not None else UDP(sport=next(_sport), dport=53) / b"q"))


def test_ipv6_from_an_isolated_pod_is_judged_not_held_back(dp, bpfnet, pod_a6, isolation):
    """The interim rule (dropped-ipv6-not-judged) is retired: A is isolated
    for ingress only, so what it sends passes its (open) egress."""
    n = bpfnet
    for l4 in (None, ICMPv6EchoRequest()):
        r = run_a(dp, n, v6_from_a(n, POD_A6, l4=l4))
        assert r.verdict != TC_ACT_SHOT and r.reason != UNJUDGED
    r = run_a(dp, n, v6_from_a(n, "fe80::a", dst="ff02::16", l4=ICMPv6MLReport2()))
    assert r.verdict != TC_ACT_SHOT and r.reason == "passed"
    for l4, dst in ((ICMPv6ND_NS(tgt="fe80::1"), "ff02::1:ff00:1"),
                    (ICMPv6ND_NA(tgt=POD_A6), "fe80::1"),
                    (ICMPv6ND_RS(), "ff02::2")):
        r = run_a(dp, n, v6_from_a(n, POD_A6, dst=dst, l4=l4))
        assert r.verdict != TC_ACT_SHOT and r.reason == "passed", l4.name
    # a spoofed source is still that, whatever the isolation
    r = run_a(dp, n, v6_from_a(n, OTHER6))
    assert r.reason == SPOOFED


def test_ipv6_to_an_isolated_pod_is_judged_neighbour_discovery_aside(dp, bpfnet, pod_a6,
                                                                     isolation):
    n = bpfnet
    r = run_prog(dp, n.ns, "fp_to_pod", bytes(to_pod(n, "cali_a", POD_A6)), n.cali_a.ifindex)
    assert r.verdict == TC_ACT_SHOT and r.reason == DENIED
    r = run_prog(dp, n.ns, "fp_to_pod", bytes(to_pod(n, "cali_a", POD_A6, ICMPv6ND_NA(tgt=OTHER6))),
                 n.cali_a.ifindex)
    assert r.verdict != TC_ACT_SHOT
    counted = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    assert counted[(n.cali_a.ifindex, "to-pod", DENIED)] >= 1
    assert not any(reason == UNJUDGED for (_, _, reason) in counted)


def test_ipv6_of_open_and_audited_pods_passes(dp, bpfnet, isolation):
    n = bpfnet
    for dev in ("cali_b", "cali_c"):        # B: no policy; C: audit only
        r = run_prog(dp, n.ns, "fp_to_pod", bytes(to_pod(n, dev, "fd00:10::99")),
                     getattr(n, dev).ifindex)
        assert r.verdict != TC_ACT_SHOT, (dev, r.reason)
    r = run_prog(dp, n.ns, "fp_from_pod", bytes(
        Ether(src=n.pod_c_mac, dst=n.cali_c.mac) / IPv6(src="fe80::c", dst="fe80::1") / UDP()),
        n.cali_c.ifindex)
    assert r.verdict != TC_ACT_SHOT and r.reason == "passed"


def test_ipv6_of_isolated_pods_passes_while_policy_checks_are_off(dp, bpfnet, pod_a6, isolation):
    dp.settings.set_policy(False)
    try:
        r = run_a(dp, bpfnet, v6_from_a(bpfnet, POD_A6))
        assert r.verdict != TC_ACT_SHOT and r.reason == "to-stack-fib"
        r = run_prog(dp, bpfnet.ns, "fp_to_pod", bytes(to_pod(bpfnet, "cali_a", POD_A6)),
                     bpfnet.cali_a.ifindex)
        assert r.verdict != TC_ACT_SHOT
    finally:
        dp.settings.set_policy(True)
