"""The bandwidth manager for IPv6 (bpf/lib/bw.h, docs/bandwidth.md "IPv6"),
run with BPF_PROG_TEST_RUN: a dual-stack pod's limits hold for both
families against ONE budget (its state keyed by the pod, not by the
family). IPv6 packets get EDT departure times from the same timeline as
the pod's IPv4 packets, go to the pod's HTB class, and share the ingress,
same-node and packet-rate buckets with IPv4, on the redirect and the stack
paths; the drops are counted per pod and per interface as IPv4's are.

Pods A and B are registered dual stack (POD_A6, POD_B6) on the bpfnet node.
Limits are written as the agent writes them (agent.bandwidth.plan ->
BandwidthMaps.write), keyed by the pod's IPv4 address.
"""
from __future__ import annotations

import itertools
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.layers.l2 import Ether

from agent.bandwidth import Limits
from agent.datapath.maps import DEFS
from tests.bpf.bwrun import bandwidth_on, conns, counts, pad, run, small_flows
from tests.bpf.conftest import (ENI_IP6, GW_MAC, POD_A, POD_A6, POD_B, POD_B6, REMOTE, REMOTE6,
                                TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, dual_stack)

NS = 1_000_000_000
WHATIF = DEFS.defines["FP_WHATIF_MARK"]
HTB_MAJOR = DEFS.defines["FP_BW_HTB_MAJOR"]
_gen = itertools.count(500)
_port = itertools.count(31000)

# 10 B/s with 500 B of burst: a 100-byte frame costs 10 s of the bucket, so
# no stall of the test process refills one between two runs
SLOW_IN = dict(ingress_bps=80, ingress_burst_bits=4000)
SLOW_OUT = dict(egress_bps=80, egress_burst_bits=4000)


@pytest.fixture(scope="module")
def dual(dp, bpfnet):
    """A and B dual stack, as discovery registers them; IPv4 only after."""
    with dual_stack(dp, bpfnet, "AB") as eps:
        yield eps


@pytest.fixture
def bw(dp, dual):
    # the interface counters too: other modules' tests count exact drops
    with bandwidth_on(dp, _gen, clear_counters=True) as limit:
        yield limit


def to_vpc(net, six: bool, src=None, size=1000):
    """A frame from a pod leaving by the ENI (after the redirect)."""
    ip = IPv6(src=src or POD_A6, dst=REMOTE6) if six else IP(src=src or POD_A, dst=REMOTE)
    return pad(Ether(src=net.eth1.mac, dst=GW_MAC) / ip / UDP(sport=5000, dport=6000), size)


def from_vpc(net, six: bool, dst=None, size=100):
    ip = IPv6(src=REMOTE6, dst=dst or POD_A6) if six else IP(src=REMOTE, dst=dst or POD_A)
    return pad(Ether(src=GW_MAC, dst=net.eth1.mac) / ip / UDP(sport=53, dport=5353), size)


def from_a(net, six: bool, dst, size=100, **tcp):
    ip = IPv6(src=POD_A6, dst=dst) if six else IP(src=POD_A, dst=dst)
    l4 = TCP(sport=next(_port), dport=443, **tcp) if tcp else UDP(sport=5000, dport=6000)
    return pad(Ether(src=net.pod_a_mac, dst=net.cali_a.mac) / ip / l4, size)


def if_drops(dp, ifindex: int, reason: str, family: str = "ipv6") -> int:
    """An interface's drops of `family` (what the limits dropped over IPv6
    is labelled so, as every IPv6 verdict is)."""
    return sum(r.packets for r in dp.maps.counters(by_family=True) if r.ifindex == ifindex
               and r.reason == reason and r.family == family)


ALTERNATE = [bool(i % 2) for i in range(12)]      # IPv4, IPv6, IPv4, ...


# -- egress to the VPC ---------------------------------------------------------------

def test_edt_stamps_ipv6_from_the_pods_one_timeline_shared_with_ipv4(dp, bpfnet, bw):
    """80 kbit/s (a 1000-byte frame every 100 ms), the pod sending IPv4 and
    IPv6 in turn: every departure is one frame's time after the previous
    one, whatever its family, so both together get the pod's rate once."""
    bw(POD_A, Limits(egress_bps=80_000, egress_burst_bits=10**6))
    dp.settings.set_bandwidth(True, edt=True)
    before = time.monotonic_ns()
    outs = [run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, six), "eth1") for six in ALTERNATE]
    after = time.monotonic_ns()
    assert all(o.verdict == TC_ACT_UNSPEC for o in outs)
    assert outs[0].tstamp == 0, "an idle pod's first packet leaves at once"
    stamps = [o.tstamp for o in outs[1:]]
    assert before + 100_000_000 <= stamps[0] <= after + 100_000_000
    assert [b - a for a, b in zip(stamps, stamps[1:])] == [100_000_000] * 10
    assert counts(dp, POD_A)[("egress", "passed")] == 12, "one pod's counters, both families"


def test_an_ipv6_only_sender_is_paced_and_dropped_beyond_the_horizon(dp, bpfnet, bw):
    """At 1000 bit/s a 500-byte frame takes 4 s: the second IPv6 frame would
    leave beyond the 2 s horizon, and so would an IPv4 one after it."""
    bw(POD_A, Limits(egress_bps=1000, egress_burst_bits=1000))
    dp.settings.set_bandwidth(True, edt=True)
    first = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, True, size=500), "eth1")
    second = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, True, size=500), "eth1")
    v4 = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, False, size=500), "eth1")
    assert (first.verdict, second.verdict, v4.verdict) == (TC_ACT_UNSPEC, TC_ACT_SHOT,
                                                           TC_ACT_SHOT)
    c = counts(dp, POD_A)
    assert c[("egress", "dropped-bandwidth-horizon")] == 2 and c[("egress", "passed")] == 1
    fams = {r.family: r.packets for r in dp.maps.counters(by_family=True)
            if r.ifindex == bpfnet.eth1.ifindex and r.reason == "dropped-bandwidth-horizon"}
    assert fams == {"ipv6": 1, "ipv4": 1}, "the ENI's drop counters by family"


def test_htb_mode_puts_ipv6_in_the_pods_class(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_bps=50_000_000, egress_burst_bits=10**6), htb=True)
    minor = dp.bandwidth.entries()[POD_A].htb_minor
    out = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, True), "eth1")
    assert out.priority == (HTB_MAJOR << 16) | minor and out.tstamp == 0
    assert run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, True, src=POD_B6), "eth1").priority == 0


def test_unlimited_pods_and_the_nodes_own_ipv6_leave_unstamped(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_bps=8_000_000, egress_burst_bits=10**6))
    dp.settings.set_bandwidth(True, edt=True)
    for _ in range(3):
        for src in (POD_B6, ENI_IP6, "fd00:99::1"):
            out = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, True, src=src), "eth1")
            assert (out.verdict, out.tstamp, out.priority) == (TC_ACT_UNSPEC, 0, 0)
    assert counts(dp, POD_B) == {}


def test_a_switched_off_manager_limits_no_ipv6(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_bps=1000, egress_burst_bits=1000, **SLOW_IN))
    dp.settings.set_bandwidth(False)
    for _ in range(7):
        assert run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, True), "eth1").tstamp == 0
        assert run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, True), "eth1").verdict == \
            TC_ACT_REDIRECT
    assert counts(dp, POD_A) == {}


# -- ingress: one bucket for both families, redirect and stack alike -----------------

@pytest.mark.parametrize("path", ["redirect", "stack"])
def test_ingress_bucket_is_shared_by_ipv4_and_ipv6(dp, bpfnet, bw, path):
    """10 bytes/s, 500 bytes of burst, 100-byte frames in both families:
    five pass, whatever their family, then both are refused."""
    bw(POD_A, Limits(**SLOW_IN))
    prog, dev = ("fp_from_vpc", "eth1") if path == "redirect" else ("fp_to_pod", "cali_a")
    ok = TC_ACT_REDIRECT if path == "redirect" else TC_ACT_UNSPEC
    verdicts = [run(dp, bpfnet, prog, from_vpc(bpfnet, six), dev).verdict
                for six in ALTERNATE[:8]]
    assert verdicts == [ok] * 5 + [TC_ACT_SHOT] * 3
    c = counts(dp, POD_A)
    assert c[("ingress", "passed")] == 5 and c[("ingress", "dropped-bandwidth-ingress")] == 3
    ifindex = bpfnet.eth1.ifindex if path == "redirect" else bpfnet.cali_a.ifindex
    assert (if_drops(dp, ifindex, "dropped-bandwidth-ingress"),
            if_drops(dp, ifindex, "dropped-bandwidth-ingress", "ipv4")) == (2, 1)
    # B is not limited by A's bucket
    assert all(run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, True, dst=POD_B6), "eth1").verdict
               == TC_ACT_REDIRECT for _ in range(8))


def test_an_ipv6_burst_leaves_nothing_for_ipv4(dp, bpfnet, bw):
    bw(POD_A, Limits(**SLOW_IN))
    six = [run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, True), "eth1").verdict
           for _ in range(6)]
    four = run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, False), "eth1").verdict
    assert six == [TC_ACT_REDIRECT] * 5 + [TC_ACT_SHOT] and four == TC_ACT_SHOT


def test_neighbour_discovery_to_a_limited_pod_is_never_limited(dp, bpfnet, bw):
    """The stack path limits a pod's global address only: its link's own
    traffic (neighbour discovery, link-local) passes whatever the bucket."""
    bw(POD_A, Limits(**SLOW_IN))
    for _ in range(6):
        run(dp, bpfnet, "fp_to_pod", from_vpc(bpfnet, True), "cali_a")
    ns = Ether(src=bpfnet.cali_a.mac, dst="33:33:ff:00:00:0a") / IPv6(
        src="fe80::1", dst="ff02::1:ff00:a", hlim=255) / ICMPv6ND_NS(tgt=POD_A6)
    ll = pad(Ether(src=bpfnet.cali_a.mac, dst=bpfnet.pod_a_mac) / IPv6(
        src="fe80::1", dst="fe80::a") / UDP(sport=1, dport=2), 100)
    for pkt in (ns, ll):
        assert run(dp, bpfnet, "fp_to_pod", pkt, "cali_a").verdict == TC_ACT_UNSPEC


# -- same-node egress and packet rates ----------------------------------------------

def test_same_node_ipv6_is_policed_at_the_sender_with_its_ipv4(dp, bpfnet, bw):
    bw(POD_A, Limits(**SLOW_OUT))
    local = [run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, six, POD_B6 if six else POD_B),
                 "cali_a").verdict for six in ALTERNATE[:7]]
    assert local == [TC_ACT_REDIRECT] * 5 + [TC_ACT_SHOT] * 2
    remote = [run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, True, REMOTE6), "cali_a").verdict
              for _ in range(5)]
    assert remote == [TC_ACT_REDIRECT] * 5, "paced at the ENI instead (EDT or HTB)"
    c = counts(dp, POD_A)
    assert c[("egress", "passed")] == 5 and c[("egress", "dropped-bandwidth-egress")] == 2
    assert (if_drops(dp, bpfnet.cali_a.ifindex, "dropped-bandwidth-egress"),
            if_drops(dp, bpfnet.cali_a.ifindex, "dropped-bandwidth-egress", "ipv4")) == (1, 1)


def test_a_local_ipv6_destination_limits_what_it_receives(dp, bpfnet, bw):
    bw(POD_B, Limits(**SLOW_IN))
    got = [run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, True, POD_B6), "cali_a").verdict
           for _ in range(6)]
    assert got == [TC_ACT_REDIRECT] * 5 + [TC_ACT_SHOT]
    assert counts(dp, POD_B)[("ingress", "dropped-bandwidth-ingress")] == 1


def test_packet_rates_count_both_families_against_one_budget(dp, bpfnet, bw):
    """10 packets/s: a burst of 4 egress and 3 ingress, the families in turn."""
    bw(POD_A, Limits(egress_pps=10, egress_pkt_burst=4, ingress_pps=10, ingress_pkt_burst=3))
    eg = [run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, six, REMOTE6 if six else REMOTE),
              "cali_a").verdict for six in ALTERNATE[:6]]
    assert eg == [TC_ACT_REDIRECT] * 4 + [TC_ACT_SHOT] * 2
    ing = [run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, six), "eth1").verdict
           for six in ALTERNATE[:5]]
    assert ing == [TC_ACT_REDIRECT] * 3 + [TC_ACT_SHOT] * 2
    c = counts(dp, POD_A)
    assert c[("egress", "dropped-packet-rate-egress")] == 2
    assert c[("ingress", "dropped-packet-rate-ingress")] == 2


# -- what-if packets ------------------------------------------------------------------

def test_what_if_ipv6_is_never_limited_and_changes_no_bucket(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_pps=1, egress_pkt_burst=1, **SLOW_IN))
    for _ in range(6):
        assert run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, True), "eth1",
                   mark=WHATIF).verdict == TC_ACT_REDIRECT
        assert run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, True, REMOTE6), "cali_a",
                   mark=WHATIF).verdict == TC_ACT_REDIRECT
    st = dp.bandwidth.states()[POD_A]
    assert st["ingress_tat"] == 0 and st["egress_pkt_tat"] == 0
    assert counts(dp, POD_A) == {}


# -- connections: one count per pod, IPv6 tuples in their own map ---------------------

def syn6(net, sport, dst=REMOTE6):
    return Ether(src=net.pod_a_mac, dst=net.cali_a.mac) / IPv6(src=POD_A6, dst=dst) / TCP(
        sport=sport, dport=443, flags="S")


def syn4(net, sport):
    return Ether(src=net.pod_a_mac, dst=net.cali_a.mac) / IP(src=POD_A, dst=REMOTE) / TCP(
        sport=sport, dport=443, flags="S")


def reply6(net, dport, flags, src=REMOTE6, dst=POD_A6, sport=443):
    return Ether(src=GW_MAC, dst=net.eth1.mac) / IPv6(src=src, dst=dst) / TCP(
        sport=sport, dport=dport, flags=flags)


def test_ipv4_and_ipv6_connections_count_against_one_limit(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_max_conns=2))
    p4, p6, p6b, p4b = next(_port), next(_port), next(_port), next(_port)
    go = lambda pkt: run(dp, bpfnet, "fp_from_pod", pkt, "cali_a").verdict    # noqa: E731
    assert go(syn4(bpfnet, p4)) == TC_ACT_REDIRECT
    assert go(syn6(bpfnet, p6)) == TC_ACT_REDIRECT
    assert go(syn6(bpfnet, p6)) == TC_ACT_REDIRECT, "a retransmitted SYN is the same connection"
    assert conns(dp, POD_A) == 2
    assert go(syn6(bpfnet, p6b)) == TC_ACT_SHOT, "the third connection, whatever its family"
    assert go(syn4(bpfnet, p4b)) == TC_ACT_SHOT
    assert counts(dp, POD_A)[("egress", "dropped-connection-limit-egress")] == 2
    assert (if_drops(dp, bpfnet.cali_a.ifindex, "dropped-connection-limit-egress"),
            if_drops(dp, bpfnet.cali_a.ifindex, "dropped-connection-limit-egress", "ipv4")) == \
        (1, 1)
    flows = {(f.saddr, f.daddr, f.sport, f.egress_pod) for f in dp.bandwidth.flows()}
    assert flows == {(POD_A, REMOTE, p4, POD_A), (POD_A6, REMOTE6, p6, POD_A)}, \
        "the IPv6 connection by its IPv6 tuple, counted against the pod's key"
    # the peer resets the IPv6 connection: a new one may open
    assert run(dp, bpfnet, "fp_from_vpc", reply6(bpfnet, p6, "R"), "eth1").verdict == \
        TC_ACT_REDIRECT
    assert conns(dp, POD_A) == 1
    assert go(syn6(bpfnet, p6b)) == TC_ACT_REDIRECT
    # that one closes with a FIN from each end (the peer answered first)
    run(dp, bpfnet, "fp_from_vpc", reply6(bpfnet, p6b, "SA"), "eth1")
    assert {(f.sport, f.established) for f in dp.bandwidth.flows()} >= {(p6b, True)}
    fin = Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / IPv6(src=POD_A6, dst=REMOTE6) / \
        TCP(sport=p6b, dport=443, flags="FA")
    go(fin)
    assert conns(dp, POD_A) == 2, "one FIN half-closes: still counted"
    run(dp, bpfnet, "fp_from_vpc", reply6(bpfnet, p6b, "FA"), "eth1")
    assert conns(dp, POD_A) == 1
    assert {f.sport for f in dp.bandwidth.flows()} == {p4}


@pytest.mark.parametrize("path", ["redirect", "stack"])
def test_ipv6_connections_a_pod_accepts_count_with_its_ipv4_ones(dp, bpfnet, bw, path):
    bw(POD_B, Limits(ingress_max_conns=2))
    prog, dev = ("fp_from_vpc", "eth1") if path == "redirect" else ("fp_to_pod", "cali_b")
    ok = TC_ACT_REDIRECT if path == "redirect" else TC_ACT_UNSPEC
    syn_in6 = lambda p: reply6(bpfnet, 8080, "S", dst=POD_B6, sport=p)      # noqa: E731
    syn_in4 = Ether(src=GW_MAC, dst=bpfnet.eth1.mac) / IP(src=REMOTE, dst=POD_B) / TCP(
        sport=next(_port), dport=8080, flags="S")
    assert run(dp, bpfnet, "fp_from_vpc", syn_in4, "eth1").verdict == TC_ACT_REDIRECT
    assert run(dp, bpfnet, prog, syn_in6(next(_port)), dev).verdict == ok
    assert run(dp, bpfnet, prog, syn_in6(next(_port)), dev).verdict == TC_ACT_SHOT
    assert counts(dp, POD_B)[("ingress", "dropped-connection-limit-ingress")] == 1
    assert conns(dp, POD_B, "ingress") == 2


def test_a_refused_same_node_ipv6_syn_gives_the_initiators_count_back(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_max_conns=1))
    bw(POD_B, Limits(ingress_max_conns=1))
    full = reply6(bpfnet, 8080, "S", dst=POD_B6, sport=next(_port))
    assert run(dp, bpfnet, "fp_from_vpc", full, "eth1").verdict == TC_ACT_REDIRECT
    to_b = syn6(bpfnet, next(_port), dst=POD_B6)
    assert run(dp, bpfnet, "fp_from_pod", to_b, "cali_a").verdict == TC_ACT_SHOT
    assert conns(dp, POD_A) == 0
    assert run(dp, bpfnet, "fp_from_pod", syn6(bpfnet, next(_port)), "cali_a").verdict == \
        TC_ACT_REDIRECT


def test_the_agents_sweep_gives_idle_ipv6_connections_back(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_max_conns=1))
    assert run(dp, bpfnet, "fp_from_pod", syn6(bpfnet, next(_port)), "cali_a").verdict == \
        TC_ACT_REDIRECT
    assert run(dp, bpfnet, "fp_from_pod", syn6(bpfnet, next(_port)), "cali_a").verdict == \
        TC_ACT_SHOT
    e = dp.bandwidth.entries()[POD_A]
    assert dp.bandwidth.sweep(time.monotonic_ns(), NS, NS, {POD_A: e.conn_gen}) == ({}, 0)
    reaped, gone = dp.bandwidth.sweep(time.monotonic_ns() + 2 * NS, 3600 * NS, NS,
                                      {POD_A: e.conn_gen})
    assert gone == 1 and reaped == {(POD_A, 0): 1}
    assert dp.bandwidth.flows() == []
    from dataclasses import replace
    dp.bandwidth.write(POD_A, replace(e, egress_reaped=e.egress_reaped + 1), False)
    assert run(dp, bpfnet, "fp_from_pod", syn6(bpfnet, next(_port)), "cali_a").verdict == \
        TC_ACT_REDIRECT


def test_udp_and_mid_stream_ipv6_open_no_connection(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_max_conns=1))
    for _ in range(3):
        assert run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, True, REMOTE6), "cali_a").verdict \
            == TC_ACT_REDIRECT
        assert run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, True, REMOTE6, flags="A"),
                   "cali_a").verdict == TC_ACT_REDIRECT
    assert conns(dp, POD_A) == 0 and dp.bandwidth.flows() == []


def test_each_family_has_its_own_flows_capacity(bpffs, bpfnet):
    """An IPv6 SYN flood that fills the IPv6 connections map lets the
    pod's further IPv6 connections pass uncounted (fail open, as IPv4's do)
    and leaves the IPv4 map's room alone: an IPv4 connection is still
    counted."""
    with small_flows(bpffs, bpfnet, "small-flows6", ip6=POD_A6) as small:
        verdicts = [run(small, bpfnet, "fp_from_pod", syn6(bpfnet, 1024 + i), "cali_a").verdict
                    for i in range(1030)]
        assert verdicts == [TC_ACT_REDIRECT] * 1030
        assert len(small.bandwidth.flows()) == 1024
        assert counts(small, POD_A)[("egress", "connection-untracked")] == 6
        assert conns(small, POD_A) == 1024
        assert run(small, bpfnet, "fp_from_pod", syn4(bpfnet, 40000), "cali_a").verdict == \
            TC_ACT_REDIRECT
        assert conns(small, POD_A) == 1025, "the IPv4 map had room of its own"
        assert counts(small, POD_A)[("egress", "connection-untracked")] == 6


def test_a_packet_whose_hop_limit_expires_takes_nothing_from_the_bucket(dp, bpfnet, bw):
    """It goes to the stack, which answers time exceeded: nothing is
    delivered, so nothing is charged (as an IPv4 packet whose TTL expires)."""
    bw(POD_A, Limits(**SLOW_IN))
    for _ in range(8):
        pkt = Ether(src=GW_MAC, dst=bpfnet.eth1.mac) / IPv6(src=REMOTE6, dst=POD_A6, hlim=1) / \
            UDP(sport=53, dport=5353)
        assert run(dp, bpfnet, "fp_from_vpc", pkt, "eth1").verdict == TC_ACT_UNSPEC
    assert counts(dp, POD_A) == {}
    assert run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, True), "eth1").verdict == \
        TC_ACT_REDIRECT
