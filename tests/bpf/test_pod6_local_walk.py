"""fp_from_pod6's one-program walk (bpf/pod.c, fp_from_pod6_established): a
mid-stream IPv6 packet from a pod to another pod of the node, or out of its
ENI to the VPC, a local backend's reply of a translated flow, and a client's
mid-stream segment to an IPv6 frontend once translated, are forwarded
without the tail call to fp_pod6_route, with the outcome the two halves
give; everything else still takes both.

Which walk a packet took is made visible by emptying the
FP_TAIL_FROM_POD6_ROUTE slot for the duration of a check: the two-program
walk then ends in dropped-tail-call-missing, the one-program walk does not
notice. The slot is filled again after each check, whatever happens.
"""
from __future__ import annotations

import ctypes
import itertools
from contextlib import contextmanager

import pytest
from scapy.layers.inet6 import IPv6, TCP, UDP
from scapy.layers.l2 import Ether

from agent.model import bpfdefs
from tests.bpf.conftest import (GW_MAC, POD_A6, POD_B6, REMOTE6, REMOTE6_NO_NEIGH,
                                TC_ACT_REDIRECT, TC_ACT_SHOT, frontends, run_prog)
from tests.bpf.test_ipv6 import dual  # noqa: F401  (the dual-stack pods fixture)

VIP6 = "fd00:16::40"
VIP6_OUT = "fd00:16::41"           # its backend behind the VPC
VIP6_SELF = "fd00:16::42"          # its backend is pod a itself (hairpin)
NO_TAIL = "dropped-tail-call-missing"
_sport = itertools.count(47000)


@contextmanager
def route6_slot_empty(dp):
    defs = bpfdefs.load()
    tails = dp.module.table(defs.maps["FP_MAP_TAILS"])
    del tails[ctypes.c_int(int(defs.defines["FP_TAIL_FROM_POD6_ROUTE"]))]
    try:
        yield
    finally:
        dp.module.fill_tail_calls()


@pytest.fixture(scope="module")
def svc6(dp, dual):  # noqa: F811
    with frontends(dp.lb, {81: (POD_B6, 8080, "TCP"), 82: (REMOTE6, 8080, "TCP"),
                           83: (POD_A6, 8080, "TCP")},
                   [(VIP6, 80, "TCP", 80, [81]), (VIP6_OUT, 80, "TCP", 81, [82]),
                    (VIP6_SELF, 80, "TCP", 82, [83])], flush=True) as lb:
        yield lb
    for slots, bid in ((80, 81), (81, 82), (82, 83)):
        dp.lb.delete_slots(slots, 1, 1)
        dp.lb.delete_backend(bid)


def from_a(n, dst, dport, flags="A", sport=47999, hlim=64, l4=None):
    l4 = l4 if l4 is not None else TCP(sport=sport, dport=dport, flags=flags)
    return bytes(Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IPv6(src=POD_A6, dst=dst, hlim=hlim)
                 / l4 / b"data")


def b_to_a(n, sport, dport, flags="A"):
    return bytes(Ether(src=n.pod_b_mac, dst=n.cali_b.mac) / IPv6(src=POD_B6, dst=POD_A6)
                 / TCP(sport=sport, dport=dport, flags=flags) / b"data")


def run(dp, n, pkt, dev):
    return run_prog(dp, n.ns, "fp_from_pod", pkt, getattr(n, dev).ifindex)


def tcp_checksum_right(out):
    resum = IPv6(bytes(out[IPv6]))
    del resum[TCP].chksum
    return out[TCP].chksum == IPv6(bytes(resum))[TCP].chksum


def test_established_pod_to_pod_is_delivered_in_one_program(dp, bpfnet, dual):  # noqa: F811
    n = bpfnet
    with route6_slot_empty(dp):
        r = run(dp, n, from_a(n, POD_B6, 5000), "cali_a")
        # the slot really is empty: an opening packet takes both programs
        syn = run(dp, n, from_a(n, POD_B6, 5000, "S"), "cali_a")
    assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-local",
                                                      "redirect-peer")
    assert r.redirect_ifindex == n.cali_b.ifindex
    out = Ether(r.out)
    assert (out.dst, out.src) == (n.pod_b_mac, n.cali_b.mac)
    assert out[IPv6].hlim == 63
    assert (syn.verdict, syn.reason) == (TC_ACT_SHOT, NO_TAIL)


@pytest.mark.parametrize("dst, kind", [(REMOTE6, "redirect"), (REMOTE6_NO_NEIGH, "redirect-neigh")])
def test_established_pod_to_vpc_leaves_by_its_eni_in_one_program(dp, bpfnet, dual, dst,  # noqa: F811
                                                                 kind):
    n = bpfnet
    with route6_slot_empty(dp):
        r = run(dp, n, from_a(n, dst, 5000), "cali_a")
        syn = run(dp, n, from_a(n, dst, 5000, "S"), "cali_a")
    assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-eni", kind)
    assert r.redirect_ifindex == n.eth1.ifindex
    out = Ether(r.out)
    if kind == "redirect":
        assert (out.dst, out.src) == (GW_MAC, n.eth1.mac)
    assert out[IPv6].hlim == 63
    assert (out[IPv6].src, out[IPv6].dst, out[TCP].dport) == (POD_A6, dst, 5000)
    assert (syn.verdict, syn.reason) == (TC_ACT_SHOT, NO_TAIL)


def test_translated_reply_gets_its_vip_back_in_one_program(dp, svc6, bpfnet):
    n = bpfnet
    sport = next(_sport)
    syn = run(dp, n, from_a(n, VIP6, 80, "S", sport), "cali_a")
    assert syn.verdict == TC_ACT_REDIRECT and Ether(syn.out)[IPv6].dst == POD_B6
    with route6_slot_empty(dp):
        r = run(dp, n, b_to_a(n, 8080, sport, "SA"), "cali_b")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert r.redirect_ifindex == n.cali_a.ifindex
    out = Ether(r.out)
    assert (out[IPv6].src, out[TCP].sport) == (VIP6, 80), "the reply comes from the VIP again"
    assert (out[IPv6].dst, out[TCP].dport) == (POD_A6, sport)
    assert tcp_checksum_right(out)


@pytest.mark.parametrize("vip, backend, reason, dev", [
    (VIP6, POD_B6, "redirected-local", "cali_b"),
    (VIP6_OUT, REMOTE6, "redirected-eni", "eth1")])
def test_translated_segment_to_a_frontend_goes_in_one_program(dp, svc6, bpfnet, vip, backend,
                                                              reason, dev):
    n = bpfnet
    sport = next(_sport)
    syn = run(dp, n, from_a(n, vip, 80, "S", sport), "cali_a")
    assert syn.verdict == TC_ACT_REDIRECT and Ether(syn.out)[IPv6].dst == backend
    both = run(dp, n, from_a(n, vip, 80, "A", sport), "cali_a")
    with route6_slot_empty(dp):
        one = run(dp, n, from_a(n, vip, 80, "A", sport), "cali_a")
        # the SYN of another flow still takes both programs
        other = run(dp, n, from_a(n, vip, 80, "S", next(_sport)), "cali_a")
    assert (one.verdict, one.reason) == (TC_ACT_REDIRECT, reason)
    assert one.redirect_ifindex == getattr(n, dev).ifindex
    out = Ether(one.out)
    assert (out[IPv6].src, out[TCP].sport) == (POD_A6, sport)
    assert (out[IPv6].dst, out[TCP].dport) == (backend, 8080)
    assert out[IPv6].hlim == 63
    assert tcp_checksum_right(out)
    # what the two programs make of the same segment, byte for byte
    assert (both.verdict, both.reason, both.redirect_ifindex, both.out) == \
        (one.verdict, one.reason, one.redirect_ifindex, one.out)
    assert (other.verdict, other.reason) == (TC_ACT_SHOT, NO_TAIL)


def test_hairpinned_segment_still_takes_both_programs(dp, svc6, bpfnet):
    n = bpfnet
    sport = next(_sport)
    syn = run(dp, n, from_a(n, VIP6_SELF, 80, "S", sport), "cali_a")
    assert syn.verdict == TC_ACT_REDIRECT
    assert Ether(syn.out)[IPv6].src == dp.config.hairpin_source_ipv6
    with route6_slot_empty(dp):
        r = run(dp, n, from_a(n, VIP6_SELF, 80, "A", sport), "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, NO_TAIL)


@pytest.mark.parametrize("what", ["policy", "udp", "frontend-port", "hop-limit",
                                  "frontend-policy"])
def test_what_the_one_program_walk_leaves_to_both(dp, svc6, bpfnet, what):
    n = bpfnet
    pkt = from_a(n, POD_B6, 5000, hlim=1 if what == "hop-limit" else 64)
    if what == "udp":          # every datagram may open a flow
        pkt = from_a(n, POD_B6, 53, l4=UDP(sport=47998, dport=53))
    elif what == "frontend-port":
        pkt = from_a(n, VIP6, 80, sport=next(_sport))
    elif what == "frontend-policy":
        # a translated segment with policy on: judged in fp_pod6_route
        sport = next(_sport)
        assert run(dp, n, from_a(n, VIP6, 80, "S", sport), "cali_a").verdict == TC_ACT_REDIRECT
        pkt = from_a(n, VIP6, 80, sport=sport)
        dp.settings.set_policy(True)
    elif what == "policy":
        dp.settings.set_policy(True)
    try:
        with route6_slot_empty(dp):
            r = run(dp, n, pkt, "cali_a")
    finally:
        dp.settings.set_policy(False)
    if what == "hop-limit":
        # one program, with both programs' answer: the stack answers an
        # expiring hop limit
        assert (r.verdict, r.reason) == (-1, "to-stack-ttl")
        return
    if what == "frontend-port":
        # mid-stream to a frontend without a flow: dropped before the
        # hand-over, as both programs always did
        assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")
        return
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, NO_TAIL)


@pytest.mark.parametrize("to", ["pod", "frontend"])
def test_with_policy_on_an_admitted_flow_goes_in_one_program(dp, svc6, bpfnet, to):
    """NetworkPolicy on: a segment of a flow policy has not admitted yet is
    judged in fp_pod6_route (both programs), which admits it; the flow's
    next segments take the one-program walk with the same outcome."""
    n = bpfnet
    sport = next(_sport)
    dst, dport, backend = (POD_B6, 5000, POD_B6) if to == "pod" else (VIP6, 80, POD_B6)
    if to == "frontend":
        # opened with policy off: translated, never judged
        assert run(dp, n, from_a(n, dst, dport, "S", sport), "cali_a").verdict == \
            TC_ACT_REDIRECT
    dp.settings.set_policy(True)
    try:
        with route6_slot_empty(dp):
            first = run(dp, n, from_a(n, dst, dport, "A", sport), "cali_a")
        judged = run(dp, n, from_a(n, dst, dport, "A", sport), "cali_a")
        with route6_slot_empty(dp):
            one = run(dp, n, from_a(n, dst, dport, "A", sport), "cali_a")
    finally:
        dp.settings.set_policy(False)
    assert (first.verdict, first.reason) == (TC_ACT_SHOT, NO_TAIL)
    assert (judged.verdict, judged.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert (one.verdict, one.reason, one.redirect_ifindex) == \
        (TC_ACT_REDIRECT, "redirected-local", n.cali_b.ifindex)
    assert Ether(one.out)[IPv6].dst == backend
    assert one.out == judged.out
