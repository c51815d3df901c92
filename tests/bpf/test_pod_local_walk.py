"""fp_from_pod's one-program walk (bpf/pod.c, fp_from_pod_established): a
packet of an established flow from a pod to another pod of the node, or out
of its ENI to the VPC, is forwarded without the tail call to fp_pod_route,
with the same outcome; everything else still takes the whole walk.

Which walk a packet took is made visible by emptying the tail-call slot
for the duration of a check: the whole walk then ends in
dropped-tail-call-missing, the one-program walk does not notice.

Runs on `ct_dp` (its own datapath; the slot is filled again after each
check, whatever happens).
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from agent.datapath.maps import DEFS
from agent.model import bpfdefs
from tests.bpf.conftest import (GW_MAC, POD_A, POD_B, REMOTE, REMOTE_NO_NEIGH, TC_ACT_REDIRECT,
                                TC_ACT_SHOT, frontends, run_prog)

VIP = "192.168.81.10"
NO_TAIL = "dropped-tail-call-missing"


@contextmanager
def tail_slot_empty(dp):
    defs = bpfdefs.load()
    tails = dp.module.table(defs.maps["FP_MAP_TAILS"])
    del tails[ctypes.c_int(int(defs.defines["FP_TAIL_FROM_POD_ROUTE"]))]
    try:
        yield
    finally:
        dp.module.fill_tail_calls()


@pytest.fixture(scope="module")
def svc(ct_dp):
    with frontends(ct_dp.lb, {41: (POD_B, 8080, "TCP")}, [(VIP, 80, "TCP", 41, [41])],
                   flush=True) as lb:
        yield lb
    lb.delete_slots(41, 1, 1)
    lb.delete_backend(41)


def a_to(bpfnet, dst, dport, flags="A", sport=41000, ttl=64):
    return bytes(Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac)
                 / IP(src=POD_A, dst=dst, ttl=ttl) / TCP(sport=sport, dport=dport, flags=flags)
                 / b"data")


def b_to_a(bpfnet, sport, dport, flags="A"):
    return bytes(Ether(src=bpfnet.pod_b_mac, dst=bpfnet.cali_b.mac)
                 / IP(src=POD_B, dst=POD_A) / TCP(sport=sport, dport=dport, flags=flags)
                 / b"data")


def test_established_pod_to_pod_is_delivered_in_one_program(ct_dp, bpfnet):
    with tail_slot_empty(ct_dp):
        r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", a_to(bpfnet, POD_B, 5000), bpfnet.cali_a.ifindex)
        # the slot really is empty: an opening packet takes the whole walk
        syn = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", a_to(bpfnet, POD_B, 5000, "S"),
                       bpfnet.cali_a.ifindex)
    assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-local", "redirect-peer")
    assert r.redirect_ifindex == bpfnet.cali_b.ifindex
    out = Ether(r.out)
    assert (out.dst, out.src) == (bpfnet.pod_b_mac, bpfnet.cali_b.mac)
    assert out[IP].ttl == 63
    resum = IP(bytes(out[IP]))
    del resum.chksum
    assert out[IP].chksum == IP(bytes(resum)).chksum, "header checksum kept right"
    assert (syn.verdict, syn.reason) == (TC_ACT_SHOT, NO_TAIL)


@pytest.mark.parametrize("dst, kind", [(REMOTE, "redirect"), (REMOTE_NO_NEIGH, "redirect-neigh")])
def test_established_pod_to_vpc_leaves_by_its_eni_in_one_program(ct_dp, bpfnet, dst, kind):
    with tail_slot_empty(ct_dp):
        r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", a_to(bpfnet, dst, 5000), bpfnet.cali_a.ifindex)
        syn = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", a_to(bpfnet, dst, 5000, "S"),
                       bpfnet.cali_a.ifindex)
    assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-eni", kind)
    assert r.redirect_ifindex == bpfnet.eth1.ifindex
    out = Ether(r.out)
    if kind == "redirect":
        # the FIB's MACs: the ENI's own towards the vSwitch gateway
        assert (out.dst, out.src) == (GW_MAC, bpfnet.eth1.mac)
    assert out[IP].ttl == 63
    resum = IP(bytes(out[IP]))
    del resum.chksum
    assert out[IP].chksum == IP(bytes(resum)).chksum, "header checksum kept right"
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == (POD_A, dst, 5000)
    assert (syn.verdict, syn.reason) == (TC_ACT_SHOT, NO_TAIL)


def test_translated_reply_gets_its_vip_back_in_one_program(ct_dp, svc, bpfnet):
    sport = 41001
    syn = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", a_to(bpfnet, VIP, 80, "S", sport),
                   bpfnet.cali_a.ifindex)
    assert syn.verdict == TC_ACT_REDIRECT and Ether(syn.out)[IP].dst == POD_B
    with tail_slot_empty(ct_dp):
        r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", b_to_a(bpfnet, 8080, sport, "SA"),
                     bpfnet.cali_b.ifindex)
        # SYN-ACK has no SYN-without-ACK: not opening, so one program; the
        # client's next packets go to a frontend: the whole walk
        fwd = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", a_to(bpfnet, VIP, 80, "A", sport),
                       bpfnet.cali_a.ifindex)
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert r.redirect_ifindex == bpfnet.cali_a.ifindex
    out = Ether(r.out)
    assert (out[IP].src, out[TCP].sport) == (VIP, 80), "the reply comes from the VIP again"
    assert (out[IP].dst, out[TCP].dport) == (POD_A, sport)
    resum = IP(bytes(out[IP]))
    del resum.chksum, resum[TCP].chksum
    resum = IP(bytes(resum))
    assert (out[IP].chksum, out[TCP].chksum) == (resum.chksum, resum[TCP].chksum)
    assert (fwd.verdict, fwd.reason) == (TC_ACT_SHOT, NO_TAIL)


@pytest.mark.parametrize("what", ["policy", "udp", "frontend-port", "ttl"])
def test_what_the_one_program_walk_leaves_to_the_whole_walk(ct_dp, svc, bpfnet, what):
    pkt = a_to(bpfnet, POD_B, 5000, ttl=1 if what == "ttl" else 64)
    if what == "udp":          # every datagram may open a flow
        pkt = bytes(Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac)
                    / IP(src=POD_A, dst=POD_B) / UDP(sport=41002, dport=53) / b"q")
    elif what == "frontend-port":
        pkt = a_to(bpfnet, VIP, 80)
    elif what == "policy":
        ct_dp.settings.set_policy(True)
    try:
        with tail_slot_empty(ct_dp):
            r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", pkt, bpfnet.cali_a.ifindex)
    finally:
        ct_dp.settings.set_policy(False)
    if what == "ttl":
        # one program, with the whole walk's answer: the stack answers an
        # expiring TTL
        assert (r.verdict, r.reason) == (-1, "to-stack-ttl")
        return
    if what == "frontend-port":
        # judged as the whole walk judges it: mid-stream to a frontend
        # without a flow is dropped before the hand-over
        assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")
        return
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, NO_TAIL)


def test_a_new_generation_serves_the_attached_programs_tail_call(ct_dp, bpfnet):
    """What an upgrade does: the next agent's programs (another build: here
    one conntrack lifetime differs, so another build key and another
    compiled set) fill the slot with their fp_pod_route while the previous
    fp_from_pod is still the attached one. The two meet in the pinned
    hand-over map, so the walk ends as it would in one generation. A reader
    of the pins leaves the slot alone."""
    from agent.datapath.node import Datapath
    cfg = ct_dp.config
    upgrade = cfg.replace(conntrack_tcp_close_timeout=cfg.conntrack_tcp_close_timeout + 1)
    with tail_slot_empty(ct_dp):
        reader = Datapath(cfg, netns=bpfnet.ns, test_build=True).load(reader=True)
        reader.close()
        untouched = run_prog(ct_dp, bpfnet.ns, "fp_from_pod",
                             a_to(bpfnet, POD_B, 5001, "S", sport=41901), bpfnet.cali_a.ifindex)
        nxt = Datapath(upgrade, netns=bpfnet.ns, test_build=True).load()
        try:
            assert nxt.build_key != ct_dp.build_key, "a set of its own"
            r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod",
                         a_to(bpfnet, POD_B, 5001, "S", sport=41902), bpfnet.cali_a.ifindex)
        finally:
            nxt.close()
        after_close = run_prog(ct_dp, bpfnet.ns, "fp_from_pod",
                               a_to(bpfnet, POD_B, 5001, "S", sport=41903), bpfnet.cali_a.ifindex)
    assert (untouched.verdict, untouched.reason) == (TC_ACT_SHOT, NO_TAIL)
    for run in (r, after_close):
        assert (run.verdict, run.reason) == (TC_ACT_REDIRECT, "redirected-local"), run.reason
        assert run.redirect_ifindex == bpfnet.cali_b.ifindex
        out = Ether(run.out)
        assert (out.dst, out.src, out[IP].dst) == (bpfnet.pod_b_mac, bpfnet.cali_b.mac, POD_B)
