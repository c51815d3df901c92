"""Conntrack garbage collection (agent/conntrack/gc.py) on entries the
programs really wrote: an entry goes once it is past its state's lifetime,
the same lifetime the programs apply; one refreshed while the sweep runs is
kept; fragment records go after Linux's reassembly time."""
from __future__ import annotations

import itertools
import time

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.l2 import Ether

from agent.model import conntrack as M
from agent.conntrack.gc import sweep
from tests.bpf.conftest import CT_LIFETIMES, POD_A, POD_B, frontends, run_prog
from tests.bpf.test_conntrack import LIFE, Conn, find

VIP_GC = "192.168.83.10"
SEC = 1_000_000_000
_ports = itertools.count(32000)


@pytest.fixture(scope="module")
def svc(ct_dp):
    with frontends(ct_dp.lb, {41: (POD_B, 8080, "TCP"), 42: (POD_B, 5353, "UDP")},
                   [(VIP_GC, 80, "TCP", 41, [41]), (VIP_GC, 53, "UDP", 42, [42])],
                   flush=True) as lb:
        yield lb


def conn_in(dp, net, state: str):
    """A real connection brought to `state` by its packets."""
    c = Conn(dp, net, vip=VIP_GC)
    c.client("S")
    if state in ("syn-recv", "established", "fin-wait", "closed"):
        c.server("SA")
    if state in ("established", "fin-wait", "closed"):
        c.client("A")
    if state in ("fin-wait", "closed"):
        c.client("FA")
    if state == "closed":
        c.server("FA")
    assert {s for _, s in c.state()} == {state}
    return c


def test_each_entry_goes_when_past_its_states_lifetime(ct_dp, bpfnet, svc):
    ct = ct_dp.lb.ct
    conns = {s: conn_in(ct_dp, bpfnet, s)
             for s in ("new", "syn-recv", "established", "fin-wait", "closed")}
    udp_port = next(_ports)
    q = Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / IP(src=POD_A, dst=VIP_GC) \
        / UDP(sport=udp_port, dport=53) / b"q"
    run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(q), bpfnet.cali_a.ifindex)
    t0 = max(v.last_seen for t in ct.NAT_TABLES for _, v in ct.nat_entries(t))
    total = len(ct_dp.lb.conntrack())
    assert total == 12

    # just before the shortest lifetime (closed): nothing goes
    assert sweep(ct, t0 + (LIFE.tcp_close - 1) * SEC, LIFE) == 0
    # past it: the closed connection's two entries, nothing else
    assert sweep(ct, t0 + (LIFE.tcp_close + 1) * SEC, LIFE) == 2
    assert conns["closed"].state() == [(None, None)] * 2
    assert conns["fin-wait"].state() == [("established", "fin-wait")] * 2, \
        "a close stays in the established hash, which only this sweep empties"
    # past the one-side-closed lifetime
    assert sweep(ct, t0 + (LIFE.tcp_fin + 1) * SEC, LIFE) == 2
    # past the handshake's: both half-open connections
    assert sweep(ct, t0 + (LIFE.tcp_syn + 1) * SEC, LIFE) == 4
    # past UDP's
    assert sweep(ct, t0 + (LIFE.other + 1) * SEC, LIFE) == 2
    assert conns["established"].state() == [("established", "established")] * 2
    # and the established one last, from the map nothing else empties
    assert sweep(ct, t0 + (LIFE.tcp_established - 1) * SEC, LIFE) == 0
    assert sweep(ct, t0 + (LIFE.tcp_established + 1) * SEC, LIFE) == 2
    assert ct_dp.lb.conntrack() == []


def test_an_entry_refreshed_during_the_sweep_is_kept(ct_dp, bpfnet, svc):
    ct = ct_dp.lb.ct
    c = conn_in(ct_dp, bpfnet, "established")
    walked = {t: ct.nat_entries(t) for t in ct.NAT_TABLES}
    walked["policy"] = ct.policy_entries()
    last = max(v.last_seen for t in ct.NAT_TABLES for _, v in walked[t])
    # a packet right after the walk moves the flow on (state and stamp)
    c.client("FA")
    assert sweep(ct, last + (LIFE.tcp_syn + 1) * SEC, LIFE, entries={
        t: [(k, v._replace(last_seen=last - LIFE.tcp_established * SEC)) for k, v in e]
        for t, e in walked.items()}) == 0, "what the walk saw is stale: nothing goes"
    assert c.state() == [("established", "fin-wait")] * 2


def test_policy_entries_go_by_the_same_lifetimes(ct_dp, bpfnet, svc):
    ct = ct_dp.lb.ct
    now = time.monotonic_ns()
    k_tcp = M.CtKey(1, 2, 3, 4, 6, M.POLICY)
    k_udp = M.CtKey(1, 2, 3, 5, 17, M.POLICY)
    ct.put("policy", k_tcp, M.PolicyValue(now - (LIFE.tcp_close + 1) * SEC, 0, M.CLOSED))
    ct.put("policy", k_udp, M.PolicyValue(now - (LIFE.other - 5) * SEC, 0, M.NEW))
    assert sweep(ct, now, LIFE) == 1
    assert ct.get("policy", k_tcp) is None and ct.get("policy", k_udp) is not None
    ct.delete("policy", [k_udp])


def test_fragment_records_go_after_the_reassembly_time(ct_dp, bpfnet, svc):
    ct = ct_dp.lb.ct
    ct.delete_frag(k for k, _ in ct.frag_entries())
    dgram = IP(src=POD_A, dst=VIP_GC, id=777) / UDP(sport=next(_ports), dport=53) / (b"z" * 2000)
    first = fragment(dgram, fragsize=1200)[0]
    run_prog(ct_dp, bpfnet.ns, "fp_from_pod",
             bytes(Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / first),
             bpfnet.cali_a.ifindex)
    recs = ct.frag_entries()
    assert len(recs) == 1
    seen = recs[0][1]
    sweep(ct, seen + 29 * SEC, LIFE)
    assert len(ct.frag_entries()) == 1
    sweep(ct, seen + 31 * SEC, LIFE)
    assert ct.frag_entries() == []
