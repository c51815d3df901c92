"""How a translated TCP flow closes (bpf/lib/ct.h fp_ct_nat_seen, ct6.h
fp_ct6_nat_seen), both families, with BPF_PROG_TEST_RUN: a flow in the
established hash stays there while it closes (FIN_WAIT, then CLOSED, the
state written in place) and the ACK of the second FIN, sent by the end that
did not send it, is translated and then deletes both entries. Crossing
FINs wait for that ACK, not the other end's; a RST moves the flow to the
LRU; a close whose last ACK never comes goes by its lifetime and the GC.

    pod A (client) --caliA--> fp_from_pod --DNAT--> pod B (caliB)
                                                 or REMOTE (behind eth1)
"""
from __future__ import annotations

import itertools
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from agent.conntrack.gc import sweep
from agent.datapath.loader import BuildOptions
from agent.datapath.maps import be16, be32
from agent.model import conntrack as M
from tests.bpf.conftest import (GW_MAC, POD_A, POD_A6, POD_B, POD_B6, REMOTE, REMOTE6,
                                TC_ACT_REDIRECT, frontends, run_prog)
from tests.bpf.test_conntrack import LIFE, Conn, fkey, find
from tests.bpf.test_conntrack6 import (VIP6, VIP6_HAIRPIN, VIP6_REMOTE, ct6, pkt_from, run,  # noqa: F401
                                       svc6)
from tests.bpf.test_ipv6 import dual  # noqa: F401

VIP_LOCAL = "192.168.84.10"
VIP_REMOTE = "192.168.84.11"
VIP_HAIRPIN = "192.168.84.12"
SEC = 1_000_000_000
_ports = itertools.count(36000)
_ports6 = itertools.count(47000)


@pytest.fixture(scope="module")
def svc(ct_dp):
    with frontends(ct_dp.lb, {81: (POD_B, 8080, "TCP"), 82: (REMOTE, 8080, "TCP"),
                              85: (POD_A, 8080, "TCP")},
                   [(VIP_LOCAL, 80, "TCP", 83, [81]), (VIP_REMOTE, 80, "TCP", 84, [82]),
                    (VIP_HAIRPIN, 80, "TCP", 86, [85])],
                   flush=True) as lb:
        yield lb


def conn(dp, net, where):
    c = Conn(dp, net, vip=VIP_LOCAL if where == "local" else VIP_REMOTE,
             sport=next(_ports)).handshake()
    assert c.state() == [("established", "established")] * 2
    return c


def send(c, who, flags):
    """`who` ("client" or "backend") sends; the packet must come out translated."""
    if who == "client":
        r = c.client(flags)
        o = Ether(r.out)
        assert r.verdict == TC_ACT_REDIRECT and (o[IP].dst, o[TCP].dport) == c.backend, flags
    else:
        r = c.server(flags)
        o = Ether(r.out)
        assert (o[IP].src, o[TCP].sport, o[IP].dst) == (c.vip, c.vport, POD_A), flags
    return r


def gone(dp, c):
    return [find(dp, k) for k in c.keys()] == [(None, None)] * 2


OTHER = {"client": "backend", "backend": "client"}


@pytest.mark.parametrize("where", ["local", "remote"])
@pytest.mark.parametrize("first", ["client", "backend"])
def test_a_close_stays_in_the_hash_and_the_last_ack_is_translated_then_retires_it(
        ct_dp, bpfnet, svc, first, where):
    c = conn(ct_dp, bpfnet, where)
    send(c, first, "FA")
    assert c.state() == [("established", "fin-wait")] * 2
    send(c, OTHER[first], "FA")
    assert c.state() == [("established", "closed")] * 2
    send(c, first, "A")
    assert gone(ct_dp, c), "the ACK of the second FIN deleted both entries"


@pytest.mark.parametrize("first", ["client", "backend"])
def test_crossing_fins_retire_the_flow_only_at_the_ack_of_the_second_fin(
        ct_dp, bpfnet, svc, first):
    """A simultaneous close: each end sends its FIN before it has the
    other's, then each ACKs the other's. The second FIN's sender ACKs the
    first FIN: that keeps the flow; the other end's ACK ends it."""
    c = conn(ct_dp, bpfnet, "local")
    send(c, first, "FA")
    send(c, OTHER[first], "FA")
    send(c, OTHER[first], "A")
    assert c.state() == [("established", "closed")] * 2, "not the ACK of the second FIN"
    send(c, first, "A")
    assert gone(ct_dp, c)


def test_a_reset_moves_a_closing_flow_to_the_lru_where_stray_packets_still_find_it(
        ct_dp, bpfnet, svc):
    c = conn(ct_dp, bpfnet, "local")
    send(c, "client", "FA")
    send(c, "backend", "R")
    assert c.state() == [("new", "closed")] * 2
    send(c, "client", "A")
    assert c.state() == [("new", "closed")] * 2, "an ACK after a reset retires nothing"


def test_a_half_closed_flow_keeps_working_in_the_hash(ct_dp, bpfnet, svc):
    c = conn(ct_dp, bpfnet, "local")
    send(c, "client", "FA")
    for _ in range(3):
        send(c, "backend", "PA")
        send(c, "client", "A")
    assert c.state() == [("established", "fin-wait")] * 2
    send(c, "backend", "FA")
    send(c, "client", "A")
    assert gone(ct_dp, c)


def test_a_fin_wait_flow_left_alone_expires_and_the_gc_takes_it_from_the_hash(
        ct_dp, bpfnet, svc):
    c = conn(ct_dp, bpfnet, "local")
    send(c, "client", "FA")
    assert c.state() == [("established", "fin-wait")] * 2
    now = time.monotonic_ns()
    ct = ct_dp.lb.ct
    # within the one-side-closed lifetime the sweep keeps it
    sweep(ct, now + (LIFE.tcp_fin - 2) * SEC, LIFE)
    assert c.state() == [("established", "fin-wait")] * 2
    # past it, the datapath no longer knows the flow: the backend's
    # packet is not translated back
    for k in c.keys():
        t, v = find(ct_dp, k)
        ct.put(t, k, v._replace(last_seen=now - (LIFE.tcp_fin + 2) * SEC))
    r = c.server("PA")
    assert Ether(r.out)[IP].src == POD_B
    assert sweep(ct, time.monotonic_ns(), LIFE) >= 2
    assert gone(ct_dp, c)


def test_a_syn_after_a_completed_close_makes_a_whole_new_flow(ct_dp, bpfnet, svc):
    c = conn(ct_dp, bpfnet, "local")
    send(c, "client", "FA")
    send(c, "backend", "FA")
    send(c, "client", "A")
    assert gone(ct_dp, c)
    before = ct_dp.lb.ct_events()["created"]
    send(c, "client", "S")
    assert ct_dp.lb.ct_events()["created"] == before + 1
    assert c.state() == [("new", "new")] * 2
    t, v = find(ct_dp, c.keys()[0])
    assert v.flags == 0, "none of the old flow's FIN flags"
    send(c, "backend", "SA")
    send(c, "client", "A")
    assert c.state() == [("established", "established")] * 2


@pytest.mark.parametrize("first", ["client", "backend"])
def test_a_hairpinned_flow_is_retired_by_its_last_ack(ct_dp, bpfnet, svc, first):
    """Pod A reaching itself through a Service: the reply entry's key names
    the router address (the client's stand-in), and the close finds it."""
    n, sport = bpfnet, next(_ports)
    router = BuildOptions.hairpin_ip       # the address the programs were built with
    keys = (fkey(sport, VIP_HAIRPIN),
            M.CtKey(be32(POD_A), be32(router), be16(8080), be16(sport), 6, M.REPLY))

    def send_(who, flags):
        if who == "client":
            pkt = IP(src=POD_A, dst=VIP_HAIRPIN) / TCP(sport=sport, dport=80, flags=flags)
            want = (router, sport, POD_A, 8080)
        else:
            pkt = IP(src=POD_A, dst=router) / TCP(sport=8080, dport=sport, flags=flags)
            want = (VIP_HAIRPIN, 80, POD_A, sport)
        r = run_prog(ct_dp, n.ns, "fp_from_pod",
                     bytes(Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / pkt), n.cali_a.ifindex)
        o = Ether(r.out)
        assert (o[IP].src, o[TCP].sport, o[IP].dst, o[TCP].dport) == want, (who, flags)

    def tables():
        return [(find(ct_dp, k)[0], M.state_label(find(ct_dp, k)[1].state))
                if find(ct_dp, k)[1] else None for k in keys]

    send_("client", "S")
    send_("backend", "SA")
    send_("client", "A")
    assert tables() == [("established", "established")] * 2
    send_(first, "FA")
    send_(OTHER[first], "FA")
    assert tables() == [("established", "closed")] * 2
    send_(first, "A")
    assert tables() == [None, None]


# ---- IPv6 ----

class Conn6:
    """Pod A's TCP connection to an IPv6 frontend (a local or a remote backend)."""

    def __init__(self, dp, n, vip):
        self.dp, self.n, self.vip = dp, n, vip
        self.sport = next(_ports6)
        self.backend = {VIP6: POD_B6, VIP6_REMOTE: REMOTE6, VIP6_HAIRPIN: POD_A6}[vip]
        # hairpin: the router's address stands in for the client
        self.client = dp.config.hairpin_source_ipv6 if vip == VIP6_HAIRPIN else POD_A6

    def send(self, who, flags):
        n, dp = self.n, self.dp
        if who == "client":
            r = run(dp, n, "fp_from_pod", pkt_from(n, "a", POD_A6, self.vip,
                                                   TCP(sport=self.sport, dport=80, flags=flags)),
                    "cali_a")
            o = Ether(r.out)
            assert (r.verdict, o[IPv6].src, o[IPv6].dst, o[TCP].dport) == (
                TC_ACT_REDIRECT, self.client, self.backend, 8080), flags
            return r
        l4 = TCP(sport=8080, dport=self.sport, flags=flags)
        if self.backend == POD_B6:
            r = run(dp, n, "fp_from_pod", pkt_from(n, "b", POD_B6, POD_A6, l4), "cali_b")
        elif self.backend == POD_A6:
            r = run(dp, n, "fp_from_pod", pkt_from(n, "a", POD_A6, self.client, l4), "cali_a")
        else:
            r = run(dp, n, "fp_from_vpc", Ether(src=GW_MAC, dst=n.eth1.mac) /
                    IPv6(src=REMOTE6, dst=POD_A6) / l4, "eth1")
        o = Ether(r.out)
        assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst) == (self.vip, 80, POD_A6), flags
        return r

    def state(self, lb):
        ct = ct6(lb)
        out = []
        for k in (("forward", POD_A6, self.sport, self.vip, 80),
                  ("reply", self.backend, 8080, self.client, self.sport)):
            row = ct.get(k)
            out.append((row.table, row.state) if row else None)
        return out


@pytest.mark.parametrize("vip", [VIP6, VIP6_REMOTE, VIP6_HAIRPIN], ids=["local", "remote",
                                                                         "hairpin"])
@pytest.mark.parametrize("first", ["client", "backend"])
def test_an_ipv6_close_stays_in_the_hash_and_the_last_ack_retires_it(dp, bpfnet, svc6, vip,
                                                                      first):
    c = Conn6(dp, bpfnet, vip)
    c.send("client", "S")
    c.send("backend", "SA")
    c.send("client", "A")
    assert c.state(svc6) == [("established6", "established")] * 2
    c.send(first, "FA")
    assert c.state(svc6) == [("established6", "fin-wait")] * 2
    c.send(OTHER[first], "FA")
    assert c.state(svc6) == [("established6", "closed")] * 2
    # crossing FINs: the second FIN's sender ACKing the first keeps it
    c.send(OTHER[first], "A")
    assert c.state(svc6) == [("established6", "closed")] * 2
    c.send(first, "A")
    assert c.state(svc6) == [None, None], "the ACK of the second FIN deleted both entries"
    # the tuple again: a whole new flow
    c.send("client", "S")
    assert c.state(svc6) == [("new6", "new")] * 2


def test_an_ipv6_reset_moves_a_closing_flow_to_the_lru(dp, bpfnet, svc6):
    c = Conn6(dp, bpfnet, VIP6)
    c.send("client", "S")
    c.send("backend", "SA")
    c.send("client", "A")
    c.send("client", "FA")
    c.send("backend", "R")
    assert c.state(svc6) == [("new6", "closed")] * 2
