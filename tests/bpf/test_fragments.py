"""IP fragments follow their first fragment (bpf/lib/ct.h).

The first fragment carries the ports: it is translated and judged like any
packet, and what it got is recorded under (source, destination, protocol,
IP id). The fragments after it, in any order, get the same addresses (the
IP header checksum fixed; they have no L4 header) and the same verdict. A
later fragment whose first one was not seen is dropped with its own reason.
Each test reassembles what the programs let through with scapy and checks
the datagram, UDP checksum included.

    pod A --caliA--> fp_from_pod ----> pod B (caliB)
    pod B --caliB--> fp_from_pod ----> pod A (the replies)
    REMOTE --eth1--> fp_from_vpc ----> pod A
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import IP, UDP, defragment, fragment
from scapy.layers.l2 import Ether

from tests.bpf.conftest import (POD_A, POD_B, REMOTE, TC_ACT_REDIRECT, TC_ACT_SHOT, enforced,
                                frontends, pods_abc, run_prog)
from tests.policy.kube import netpol, snapshot

VIP_F = "192.168.82.10"
_ids = itertools.count(100)
_ports = itertools.count(31000)
PAYLOAD = bytes(range(256)) * 11 + b"tail"          # 2,820 bytes: three fragments


@pytest.fixture(scope="module")
def svc(ct_dp):
    with frontends(ct_dp.lb, {31: (POD_B, 5353, "UDP"), 32: (REMOTE, 5353, "UDP")},
                   [(VIP_F, 53, "UDP", 31, [31]), (VIP_F, 54, "UDP", 32, [32])]) as lb:
        yield lb


def frags(src, dst, sport, dport, payload=PAYLOAD):
    dgram = IP(src=src, dst=dst, id=next(_ids), ttl=64) / UDP(sport=sport, dport=dport) / payload
    out = fragment(dgram, fragsize=1200)
    assert len(out) == 3 and out[0].frag == 0 and out[0].flags.MF and out[2].frag > 0
    return dgram, out


def send(dp, net, pkts, src_pod="a"):
    dev = net.cali_a if src_pod == "a" else net.cali_b
    mac = net.pod_a_mac if src_pod == "a" else net.pod_b_mac
    return [run_prog(dp, net.ns, "fp_from_pod", bytes(Ether(src=mac, dst=dev.mac) / p),
                     dev.ifindex) for p in pkts]


def reassembled(runs) -> IP:
    pkts = [Ether(r.out)[IP] for r in runs]
    for p in pkts:
        fresh = IP(bytes(p))
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == p.chksum, "each fragment's IP header checksum"
    whole = defragment(sorted((IP(bytes(p)) for p in pkts), key=lambda p: p.frag))
    assert len(whole) == 1, "the fragments make one datagram again"
    d = IP(bytes(whole[0]))
    ref = IP(bytes(d))
    del ref[UDP].chksum
    assert IP(bytes(ref))[UDP].chksum == d[UDP].chksum, "the datagram's UDP checksum"
    return d


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1)], ids=["in order", "last before middle"])
def test_a_fragmented_datagram_to_a_clusterip_is_translated_whole(ct_dp, bpfnet, svc, order):
    sport = next(_ports)
    dgram, fr = frags(POD_A, VIP_F, sport, 53)
    runs = send(ct_dp, bpfnet, [fr[i] for i in order])
    assert all(r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_b.ifindex
               for r in runs), [r.reason for r in runs]
    first = Ether(runs[0].out)[IP]
    assert (first.dst, first[UDP].dport) == (POD_B, 5353), "first: address and port"
    for r in runs[1:]:
        o = Ether(r.out)[IP]
        assert (o.src, o.dst) == (POD_A, POD_B), "later ones: the address"
    d = reassembled(runs)
    assert (d.src, d.dst, d[UDP].sport, d[UDP].dport) == (POD_A, POD_B, sport, 5353)
    assert bytes(d[UDP].payload) == PAYLOAD

    # the answer, as big, from B: the VIP and Service port come back
    _, rf = frags(POD_B, POD_A, 5353, sport, PAYLOAD[::-1])
    back = send(ct_dp, bpfnet, [rf[i] for i in order], src_pod="b")
    assert all(r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_a.ifindex
               for r in back)
    d = reassembled(back)
    assert (d.src, d[UDP].sport, d.dst, d[UDP].dport) == (VIP_F, 53, POD_A, sport)
    assert bytes(d[UDP].payload) == PAYLOAD[::-1]


def test_replies_from_the_vpc_are_restored_fragment_by_fragment(ct_dp, bpfnet, svc):
    sport = next(_ports)
    send(ct_dp, bpfnet, [IP(src=POD_A, dst=VIP_F) / UDP(sport=sport, dport=54) / b"q"])
    _, rf = frags(REMOTE, POD_A, 5353, sport)
    runs = [run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(Ether(dst=bpfnet.eth1.mac) / p),
                     bpfnet.eth1.ifindex) for p in (rf[0], rf[2], rf[1])]
    assert all(r.verdict == TC_ACT_REDIRECT for r in runs), [r.reason for r in runs]
    d = reassembled(runs)
    assert (d.src, d[UDP].sport, d.dst) == (VIP_F, 54, POD_A)
    assert bytes(d[UDP].payload) == PAYLOAD


def test_a_later_fragment_whose_first_was_not_seen_is_dropped(ct_dp, bpfnet, svc):
    before = ct_dp.lb.ct_events()["fragment-followed"]
    _, fr = frags(POD_A, VIP_F, next(_ports), 53)
    runs = send(ct_dp, bpfnet, [fr[1], fr[2]])
    assert [(r.verdict, r.reason) for r in runs] == [
        (TC_ACT_SHOT, "dropped-fragment-without-first")] * 2
    # the first one after them starts the record: the rest follow it
    runs = send(ct_dp, bpfnet, [fr[0], fr[1], fr[2]])
    assert all(r.verdict == TC_ACT_REDIRECT for r in runs)
    assert ct_dp.lb.ct_events()["fragment-followed"] == before + 2


def test_the_record_is_per_datagram(ct_dp, bpfnet, svc):
    """Two datagrams with different IP ids: each fragment follows its own."""
    s1, s2 = next(_ports), next(_ports)
    _, f1 = frags(POD_A, VIP_F, s1, 53)
    _, f2 = frags(POD_A, POD_B, s2, 5353)                 # straight to B, not translated
    runs = send(ct_dp, bpfnet, [f1[0], f2[0], f2[1], f1[1], f1[2], f2[2]])
    d1 = reassembled([runs[0], runs[3], runs[4]])
    d2 = reassembled([runs[1], runs[2], runs[5]])
    assert (d1.dst, d1[UDP].dport) == (POD_B, 5353) and d1[UDP].sport == s1
    assert (d2.dst, d2[UDP].dport) == (POD_B, 5353) and d2[UDP].sport == s2


@pytest.fixture(scope="module")
def policy(ct_dp, svc):
    """B admits UDP 5353 from A and nothing else."""
    snap = snapshot([*pods_abc(),
                     netpol("x", "b-in", {"podSelector": {"matchLabels": {"app": "b"}},
                                          "ingress": [{"from": [{"podSelector": {
                                              "matchLabels": {"app": "a"}}}],
                                              "ports": [{"protocol": "UDP", "port": 5353}]}]})])
    with enforced(ct_dp, snap) as state:
        yield state


def test_an_allowed_datagram_arrives_whole_and_a_denied_one_not_at_all(ct_dp, bpfnet, svc,
                                                                       policy):
    _, ok = frags(POD_A, POD_B, next(_ports), 5353)
    runs = send(ct_dp, bpfnet, [ok[0], ok[2], ok[1]])
    assert all(r.verdict == TC_ACT_REDIRECT for r in runs), [r.reason for r in runs]
    assert bytes(reassembled(runs)[UDP].payload) == PAYLOAD
    # through the ClusterIP: translated, then judged on the backend's port
    _, via = frags(POD_A, VIP_F, next(_ports), 53)
    runs = send(ct_dp, bpfnet, via)
    assert all(r.verdict == TC_ACT_REDIRECT for r in runs), [r.reason for r in runs]
    _, bad = frags(POD_A, POD_B, next(_ports), 9999)
    runs = send(ct_dp, bpfnet, [bad[0], bad[1], bad[2]])
    assert [(r.verdict, r.reason) for r in runs] == [(TC_ACT_SHOT, "dropped-policy-denied")] * 3
    # with policy on, fragments that come without their first are dropped
    _, lone = frags(POD_A, POD_B, next(_ports), 5353)
    runs = send(ct_dp, bpfnet, [lone[2]])
    assert runs[0].reason == "dropped-fragment-without-first"
