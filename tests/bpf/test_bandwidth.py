"""The bandwidth manager in the programs (bpf/lib/bw.h), run with
BPF_PROG_TEST_RUN: EDT departure times for a sequence of packets at a given
rate, the HTB class of a limited pod, the ingress and same-node token
buckets' verdicts, packet-rate limits, connection limits (opened, refused,
closed by RST and FIN, given back by the agent's sweep), and that unlimited
pods, what-if packets and a switched-off manager are left alone.

Limits are written exactly as the agent writes them (agent.bandwidth.plan ->
BandwidthMaps.write). Rates are chosen so that the microseconds between two
test runs refill nothing that matters: each verdict is exact.

    podA --- caliA \\
    podB --- caliB  >  node --- eth1 === VPC (REMOTE 10.0.2.20)
"""
from __future__ import annotations

import itertools
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from agent.bandwidth import Limits
from agent.datapath.maps import DEFS
from tests.bpf.conftest import (GW_MAC, POD_A, POD_B, REMOTE, TC_ACT_REDIRECT, TC_ACT_SHOT,
                                TC_ACT_UNSPEC)
from tests.bpf.bwrun import bandwidth_on, conns, counts, pad, run, small_flows

NS = 1_000_000_000
WHATIF = DEFS.defines["FP_WHATIF_MARK"]
HTB_MAJOR = DEFS.defines["FP_BW_HTB_MAJOR"]
HORIZON_NS = DEFS.defines["FP_BW_HORIZON_NS"]
_gen = itertools.count(7)
_port = itertools.count(30000)


@pytest.fixture
def bw(dp):
    """The manager switched on (HTB or EDT per test), limits cleared after."""
    with bandwidth_on(dp, _gen) as limit:
        yield limit


def to_vpc(net, src=POD_A, size=1000):
    """A frame from a pod leaving by the ENI (after the redirect)."""
    return pad(Ether(src=net.eth1.mac, dst=GW_MAC) / IP(src=src, dst=REMOTE) /
               UDP(sport=5000, dport=6000), size)


def from_vpc(net, dst, size=1000, **tcp):
    l4 = TCP(sport=tcp.pop("sport", 443), dport=tcp.pop("dport", 40000), **tcp) if tcp \
        else UDP(sport=53, dport=5353)
    return pad(Ether(src=GW_MAC, dst=net.eth1.mac) / IP(src=REMOTE, dst=dst) / l4, size)


def from_a(net, dst, size=1000, **tcp):
    l4 = TCP(sport=tcp.pop("sport", 40000), dport=tcp.pop("dport", 443), **tcp) if tcp \
        else UDP(sport=5000, dport=6000)
    return pad(Ether(src=net.pod_a_mac, dst=net.cali_a.mac) / IP(src=POD_A, dst=dst) / l4, size)


# -- egress to the VPC: EDT -----------------------------------------------------

def test_edt_departure_times_space_packets_at_the_pods_rate(dp, bpfnet, bw):
    """80 kbit/s is 10,000 bytes/s: a 1000-byte frame every 100 ms (far
    more than a test run takes, so the pod never catches up with its
    timeline here)."""
    bw(POD_A, Limits(egress_bps=80_000, egress_burst_bits=10**6))
    dp.settings.set_bandwidth(True, edt=True)
    before = time.monotonic_ns()
    outs = [run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet), "eth1") for _ in range(12)]
    after = time.monotonic_ns()
    assert all(o.verdict == TC_ACT_UNSPEC for o in outs)
    assert outs[0].tstamp == 0, "an idle pod's first packet leaves at once"
    stamps = [o.tstamp for o in outs[1:]]
    assert before + 100_000_000 <= stamps[0] <= after + 100_000_000
    assert [b - a for a, b in zip(stamps, stamps[1:])] == [100_000_000] * 10, \
        "each departure exactly one frame's time at the rate after the previous"
    assert stamps[-1] - after > 900_000_000, "departures run ahead of the clock: fq holds them"
    assert counts(dp, POD_A)[("egress", "passed")] == 12


def test_edt_follows_a_later_departure_the_sender_chose(dp, bpfnet, bw):
    """A sender pacing itself slower than the limit (TCP's own EDT stamp)
    keeps its departure, and the pod's next packet queues behind it."""
    bw(POD_A, Limits(egress_bps=8_000_000, egress_burst_bits=10**6))
    dp.settings.set_bandwidth(True, edt=True)
    later = time.monotonic_ns() + 50_000_000
    out = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet), "eth1", tstamp=later)
    assert out.tstamp == later
    nxt = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet), "eth1")
    assert nxt.tstamp == later + 1_000_000


def test_edt_drops_departures_beyond_the_horizon(dp, bpfnet, bw):
    """At 1000 bit/s a 500-byte frame takes 4 s: the second one would leave
    beyond the 2 s horizon."""
    bw(POD_A, Limits(egress_bps=1000, egress_burst_bits=1000))
    dp.settings.set_bandwidth(True, edt=True)
    first = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, size=500), "eth1")
    second = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, size=500), "eth1")
    assert first.verdict == TC_ACT_UNSPEC and second.verdict == TC_ACT_SHOT
    assert HORIZON_NS == 2 * NS
    c = counts(dp, POD_A)
    assert c[("egress", "dropped-bandwidth-horizon")] == 1 and c[("egress", "passed")] == 1
    eth1 = [r for r in dp.maps.counters() if r.ifindex == bpfnet.eth1.ifindex
            and r.reason == "dropped-bandwidth-horizon"]
    assert eth1 and eth1[0].direction == "to-vpc"


def test_unlimited_pods_and_the_nodes_own_traffic_leave_unstamped(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_bps=8_000_000, egress_burst_bits=10**6))
    dp.settings.set_bandwidth(True, edt=True)
    for _ in range(3):
        for src in (POD_B, "10.0.1.2"):
            out = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, src=src), "eth1")
            assert (out.verdict, out.tstamp, out.priority) == (TC_ACT_UNSPEC, 0, 0)
    assert counts(dp, POD_B) == {}


def test_a_switched_off_manager_limits_nothing(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_bps=1000, egress_burst_bits=1000, ingress_bps=1000,
                     ingress_burst_bits=1000))
    dp.settings.set_bandwidth(False)
    for _ in range(5):
        assert run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet), "eth1").tstamp == 0
        assert run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, POD_A), "eth1").verdict == \
            TC_ACT_REDIRECT
    assert counts(dp, POD_A) == {}


# -- egress to the VPC: HTB -----------------------------------------------------

def test_htb_mode_names_the_pods_class_and_stamps_nothing(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_bps=50_000_000, egress_burst_bits=10**6), htb=True)
    minor = dp.bandwidth.entries()[POD_A].htb_minor
    assert minor >= 1
    out = run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet), "eth1")
    assert out.priority == (HTB_MAJOR << 16) | minor and out.tstamp == 0
    assert run(dp, bpfnet, "fp_to_vpc", to_vpc(bpfnet, src=POD_B), "eth1").priority == 0


# -- ingress and same-node token buckets -----------------------------------------

# 10 B/s with 500 B of burst: a 100-byte frame costs 10 s of the bucket, so
# no scheduling stall of the test process refills one between two runs (at
# 1,000 B/s a 0.1 s stall under load let one more frame through)
SLOW = dict(ingress_bps=80, ingress_burst_bits=4000)


@pytest.mark.parametrize("path", ["redirect", "stack"])
def test_ingress_bucket_passes_the_burst_then_drops_and_counts(dp, bpfnet, bw, path):
    """10 bytes/s with 500 bytes of burst, 100-byte frames (10 s each):
    an idle bucket admits 5, then refuses; redirect (fp_from_vpc) and stack
    (fp_to_pod) deliveries share the pod's bucket."""
    bw(POD_A, Limits(**SLOW))
    prog, dev = ("fp_from_vpc", "eth1") if path == "redirect" else ("fp_to_pod", "cali_a")
    ok = TC_ACT_REDIRECT if path == "redirect" else TC_ACT_UNSPEC
    verdicts = [run(dp, bpfnet, prog, from_vpc(bpfnet, POD_A, size=100), dev).verdict
                for _ in range(8)]
    assert verdicts == [ok] * 5 + [TC_ACT_SHOT] * 3
    c = counts(dp, POD_A)
    assert c[("ingress", "passed")] == 5 and c[("ingress", "dropped-bandwidth-ingress")] == 3
    # the other pod is not limited by A's bucket
    assert all(run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, POD_B, size=100), "eth1").verdict
               == TC_ACT_REDIRECT for _ in range(8))


def test_a_packet_larger_than_the_burst_passes_a_full_bucket_into_debt(dp, bpfnet, bw):
    """A GSO super-packet bigger than the bucket must not stall its flow."""
    bw(POD_A, Limits(**SLOW))
    big = run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, POD_A, size=1400), "eth1")
    small = run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, POD_A, size=100), "eth1")
    assert (big.verdict, small.verdict) == (TC_ACT_REDIRECT, TC_ACT_SHOT)


def test_same_node_egress_is_policed_at_the_sender_and_vpc_egress_is_not(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_bps=80, egress_burst_bits=4000))     # as SLOW, for egress
    local = [run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, POD_B, size=100), "cali_a").verdict
             for _ in range(7)]
    assert local == [TC_ACT_REDIRECT] * 5 + [TC_ACT_SHOT] * 2
    remote = [run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, REMOTE, size=100), "cali_a").verdict
              for _ in range(7)]
    assert remote == [TC_ACT_REDIRECT] * 7, "paced at the ENI instead (EDT or HTB)"
    c = counts(dp, POD_A)
    assert c[("egress", "passed")] == 5 and c[("egress", "dropped-bandwidth-egress")] == 2
    drops = [r for r in dp.maps.counters() if r.ifindex == bpfnet.cali_a.ifindex
             and r.reason == "dropped-bandwidth-egress"]
    assert drops and drops[0].packets == 2


def test_a_local_destination_limits_what_it_receives_from_its_neighbour(dp, bpfnet, bw):
    bw(POD_B, Limits(**SLOW))
    got = [run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, POD_B, size=100), "cali_a").verdict
           for _ in range(6)]
    assert got == [TC_ACT_REDIRECT] * 5 + [TC_ACT_SHOT]
    assert counts(dp, POD_B)[("ingress", "dropped-bandwidth-ingress")] == 1


# -- packet rates -------------------------------------------------------------------

def test_packet_rate_counts_wire_packets_of_gso_super_packets(dp, bpfnet, bw):
    """10 packets/s, burst 6: three 2-segment packets use it up."""
    bw(POD_A, Limits(egress_pps=10, egress_pkt_burst=6, ingress_pps=10, ingress_pkt_burst=3))
    eg = [run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, REMOTE), "cali_a", gso_segs=2).verdict
          for _ in range(4)]
    assert eg == [TC_ACT_REDIRECT] * 3 + [TC_ACT_SHOT]
    ing = [run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, POD_A), "eth1").verdict
           for _ in range(5)]
    assert ing == [TC_ACT_REDIRECT] * 3 + [TC_ACT_SHOT] * 2
    c = counts(dp, POD_A)
    assert c[("egress", "dropped-packet-rate-egress")] == 1
    assert c[("ingress", "dropped-packet-rate-ingress")] == 2


# -- connections --------------------------------------------------------------------------

def syn(net, sport):
    return from_a(net, REMOTE, size=60, sport=sport, flags="S")


def test_egress_connection_limit_refuses_the_next_syn_until_one_closes(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_max_conns=2))
    p1, p2, p3 = next(_port), next(_port), next(_port)
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, p1), "cali_a").verdict == TC_ACT_REDIRECT
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, p2), "cali_a").verdict == TC_ACT_REDIRECT
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, p1), "cali_a").verdict == TC_ACT_REDIRECT, \
        "a retransmitted SYN is the same connection"
    assert conns(dp, POD_A) == 2
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, p3), "cali_a").verdict == TC_ACT_SHOT
    assert counts(dp, POD_A)[("egress", "dropped-connection-limit-egress")] == 1
    # the peer resets connection 1 (arriving from the VPC, delivered to A)
    rst = from_vpc(bpfnet, POD_A, size=60, sport=443, dport=p1, flags="R")
    assert run(dp, bpfnet, "fp_from_vpc", rst, "eth1").verdict == TC_ACT_REDIRECT
    assert conns(dp, POD_A) == 1
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, p3), "cali_a").verdict == TC_ACT_REDIRECT
    # connection 2 closes with a FIN from each end (the peer answered first)
    synack = from_vpc(bpfnet, POD_A, size=60, sport=443, dport=p2, flags="SA")
    run(dp, bpfnet, "fp_from_vpc", synack, "eth1")
    assert {(f.sport, f.established) for f in dp.bandwidth.flows()} >= {(p2, True)}
    run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, REMOTE, 60, sport=p2, flags="FA"), "cali_a")
    assert conns(dp, POD_A) == 2, "one FIN half-closes: still counted"
    run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, POD_A, 60, sport=443, dport=p2, flags="FA"),
        "eth1")
    assert conns(dp, POD_A) == 1
    assert {f.sport for f in dp.bandwidth.flows()} == {p3}


def test_ingress_connection_limit_counts_connections_the_pod_accepts(dp, bpfnet, bw):
    bw(POD_B, Limits(ingress_max_conns=1))
    s1, s2 = next(_port), next(_port)
    syn_in = lambda p: from_vpc(bpfnet, POD_B, 60, sport=p, dport=8080, flags="S")  # noqa: E731
    assert run(dp, bpfnet, "fp_from_vpc", syn_in(s1), "eth1").verdict == TC_ACT_REDIRECT
    assert run(dp, bpfnet, "fp_from_vpc", syn_in(s2), "eth1").verdict == TC_ACT_SHOT
    assert counts(dp, POD_B)[("ingress", "dropped-connection-limit-ingress")] == 1
    # the stack path counts against the same limit
    assert run(dp, bpfnet, "fp_to_pod", syn_in(s2), "cali_b").verdict == TC_ACT_SHOT
    assert conns(dp, POD_B, "ingress") == 1


def test_a_refused_same_node_syn_gives_the_initiators_count_back(dp, bpfnet, bw):
    """A may open 1 connection, B accept 1 and B is full: A's SYN to B is
    refused at B's door, and A can still open its one connection elsewhere."""
    bw(POD_A, Limits(egress_max_conns=1))
    bw(POD_B, Limits(ingress_max_conns=1))
    full = from_vpc(bpfnet, POD_B, 60, sport=next(_port), dport=8080, flags="S")
    assert run(dp, bpfnet, "fp_from_vpc", full, "eth1").verdict == TC_ACT_REDIRECT
    to_b = from_a(bpfnet, POD_B, 60, sport=next(_port), dport=8080, flags="S")
    assert run(dp, bpfnet, "fp_from_pod", to_b, "cali_a").verdict == TC_ACT_SHOT
    assert counts(dp, POD_B)[("ingress", "dropped-connection-limit-ingress")] == 1
    assert conns(dp, POD_A) == 0
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, next(_port)), "cali_a").verdict == \
        TC_ACT_REDIRECT


def test_the_agents_sweep_gives_idle_connections_back(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_max_conns=1))
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, next(_port)), "cali_a").verdict == \
        TC_ACT_REDIRECT
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, next(_port)), "cali_a").verdict == \
        TC_ACT_SHOT
    e = dp.bandwidth.entries()[POD_A]
    # not idle yet: kept
    reaped, gone = dp.bandwidth.sweep(time.monotonic_ns(), NS, NS, {POD_A: e.conn_gen})
    assert (reaped, gone) == ({}, 0)
    # an unanswered SYN older than the opening timeout: reaped, counted back
    reaped, gone = dp.bandwidth.sweep(time.monotonic_ns() + 2 * NS, 3600 * NS, NS,
                                      {POD_A: e.conn_gen})
    assert gone == 1 and reaped == {(POD_A, 0): 1}
    from dataclasses import replace
    dp.bandwidth.write(POD_A, replace(e, egress_reaped=e.egress_reaped + 1), False)
    assert conns(dp, POD_A) == 0
    assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, next(_port)), "cali_a").verdict == \
        TC_ACT_REDIRECT


def test_flows_of_a_pod_gone_are_swept_without_counting(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_max_conns=5))
    run(dp, bpfnet, "fp_from_pod", syn(bpfnet, next(_port)), "cali_a")
    reaped, gone = dp.bandwidth.sweep(time.monotonic_ns(), 3600 * NS, 3600 * NS, {})
    assert (reaped, gone) == ({}, 1)


def test_udp_and_non_syn_tcp_open_no_connection(dp, bpfnet, bw):
    bw(POD_A, Limits(egress_max_conns=1))
    for _ in range(3):
        assert run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, REMOTE), "cali_a").verdict == \
            TC_ACT_REDIRECT
        assert run(dp, bpfnet, "fp_from_pod", from_a(bpfnet, REMOTE, 60, sport=next(_port),
                                                     flags="A"), "cali_a").verdict == \
            TC_ACT_REDIRECT
    assert conns(dp, POD_A) == 0 and dp.bandwidth.flows() == []


# -- what-if packets -----------------------------------------------------------------------

def test_what_if_packets_are_never_limited_and_change_no_bucket(dp, bpfnet, bw):
    bw(POD_A, Limits(ingress_bps=8000, ingress_burst_bits=800, egress_max_conns=1))
    for _ in range(5):
        out = run(dp, bpfnet, "fp_from_vpc", from_vpc(bpfnet, POD_A, size=100), "eth1",
                  mark=WHATIF)
        assert out.verdict == TC_ACT_REDIRECT
        assert run(dp, bpfnet, "fp_from_pod", syn(bpfnet, next(_port)), "cali_a",
                   mark=WHATIF).verdict == TC_ACT_REDIRECT
    assert dp.bandwidth.states()[POD_A]["ingress_tat"] == 0
    assert conns(dp, POD_A) == 0 and counts(dp, POD_A) == {}


def test_a_full_flows_map_admits_new_connections_uncounted(bpffs, bpfnet):
    """A SYN flood that fills the tracked-connections map must neither stop
    the pod's new connections (fail open) nor corrupt its count: the extra
    ones pass uncounted, under their own reason, until the sweep makes room."""
    with small_flows(bpffs, bpfnet, "small-flows") as small:
        verdicts = [run(small, bpfnet, "fp_from_pod", syn(bpfnet, 1024 + i), "cali_a").verdict
                    for i in range(1030)]
        assert verdicts == [TC_ACT_REDIRECT] * 1030
        assert len(small.bandwidth.flows()) == 1024
        c = counts(small, POD_A)
        assert c[("egress", "connection-untracked")] == 6
        assert conns(small, POD_A) == 1024
