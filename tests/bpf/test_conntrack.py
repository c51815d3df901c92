"""Conntrack in the programs (bpf/lib/ct.h): TCP state and its lifetimes, the
two maps of translated flows and how flows move between them, terminating
and removed backends, and the rule that only a flow's opening packet picks
a backend.

Runs on `ct_dp`: a datapath of its own with short, distinct lifetimes per
state and the smallest maps the configuration allows (conftest.py), so a
test can tell which lifetime applied and fill a map in a few thousand
packets. Entries are read and written through the agent's own CtMaps.

    pod A (client) --caliA--> fp_from_pod --DNAT--> pod B (backend, caliB)
                                                 or REMOTE (behind eth1)
"""
from __future__ import annotations

import itertools
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from agent.model import conntrack as M
from agent.datapath.maps import DEFS, be16, be32
from tests.bpf.conftest import (CT_LIFETIMES, CT_SMALL, POD_A, POD_B, REMOTE, TC_ACT_REDIRECT,
                                TC_ACT_SHOT, frontends, put_frontend, run_prog)

VIP = "192.168.80.10"
VIP_TWO = "192.168.80.11"
VIP_AFF = "192.168.80.12"
SEC = 1_000_000_000
AFF = DEFS.defines["FP_SVC_F_AFFINITY"]
_ports = itertools.count(20000)
LIFE = M.Lifetimes(CT_LIFETIMES["conntrack_tcp_syn_timeout"],
                   CT_LIFETIMES["conntrack_tcp_idle_timeout"],
                   CT_LIFETIMES["conntrack_tcp_fin_timeout"],
                   CT_LIFETIMES["conntrack_tcp_close_timeout"],
                   CT_LIFETIMES["conntrack_idle_timeout"])


@pytest.fixture(scope="module")
def svc(ct_dp):
    backends = {1: (POD_B, 8080, "TCP"), 2: (POD_B, 5353, "UDP"), 3: (REMOTE, 8080, "TCP"),
                4: (REMOTE, 5353, "UDP")}
    with frontends(ct_dp.lb, backends, [
            (VIP, 80, "TCP", 10, [1]), (VIP, 53, "UDP", 11, [2]),
            (VIP_TWO, 80, "TCP", 12, [1, 3]), (VIP_TWO, 53, "UDP", 13, [2, 4]),
            (VIP_AFF, 80, "TCP", 14, [1, 3], AFF, 10800)], flush=True) as lb:
        yield lb


def fkey(sport, vip=VIP, vport=80, proto=6):
    return M.CtKey(be32(POD_A), be32(vip), be16(sport), be16(vport), proto, M.FORWARD)


def rkey(sport, backend=POD_B, bport=8080, proto=6):
    return M.CtKey(be32(backend), be32(POD_A), be16(bport), be16(sport), proto, M.REPLY)


def find(dp, key):
    """(table, value) of a translated-flow key, or (None, None)."""
    for table in ("established", "new"):
        v = dp.lb.ct.get(table, key)
        if v is not None:
            return table, v
    return None, None


class Conn:
    """A TCP connection from pod A to a frontend, driven packet by packet."""

    def __init__(self, dp, net, vip=VIP, vport=80, sport=None):
        self.dp, self.net, self.vip, self.vport = dp, net, vip, vport
        self.sport = sport or next(_ports)
        self.backend = None              # (ip, port) it was sent to

    def client(self, flags, data=b"x"):
        pkt = Ether(src=self.net.pod_a_mac, dst=self.net.cali_a.mac) \
            / IP(src=POD_A, dst=self.vip) / TCP(sport=self.sport, dport=self.vport, flags=flags) \
            / data
        r = run_prog(self.dp, self.net.ns, "fp_from_pod", bytes(pkt), self.net.cali_a.ifindex)
        o = Ether(r.out)
        if r.verdict != TC_ACT_SHOT and TCP in o and o[IP].dst != POD_A:
            self.backend = (o[IP].dst, o[TCP].dport)
        return r

    def server(self, flags, data=b"y"):
        """The backend's answer: from pod B on its veth, or from the VPC."""
        ip, port = self.backend
        if ip == POD_B:
            pkt = Ether(src=self.net.pod_b_mac, dst=self.net.cali_b.mac) / IP(src=ip, dst=POD_A) \
                / TCP(sport=port, dport=self.sport, flags=flags) / data
            return run_prog(self.dp, self.net.ns, "fp_from_pod", bytes(pkt),
                            self.net.cali_b.ifindex)
        pkt = Ether(dst=self.net.eth1.mac) / IP(src=ip, dst=POD_A) \
            / TCP(sport=port, dport=self.sport, flags=flags) / data
        return run_prog(self.dp, self.net.ns, "fp_from_vpc", bytes(pkt), self.net.eth1.ifindex)

    def keys(self):
        ip, port = self.backend
        return (fkey(self.sport, self.vip, self.vport),
                rkey(self.sport, ip, port))

    def state(self):
        """(table, state label) of both entries."""
        out = []
        for k in self.keys():
            t, v = find(self.dp, k)
            out.append((t, M.state_label(v.state) if v else None))
        return out

    def handshake(self):
        assert self.client("S").verdict == TC_ACT_REDIRECT
        r = self.server("SA")
        assert Ether(r.out)[IP].src == self.vip
        assert self.client("A").verdict == TC_ACT_REDIRECT
        return self


def events(dp) -> dict:
    return dp.lb.ct_events()


def test_a_tcp_connection_walks_from_syn_to_closed_and_moves_between_the_maps(ct_dp, bpfnet, svc):
    c = Conn(ct_dp, bpfnet)
    before = events(ct_dp)
    assert c.client("S").verdict == TC_ACT_REDIRECT
    assert c.backend == (POD_B, 8080)
    assert c.state() == [("new", "new")] * 2, "a new flow starts in the LRU map"
    r = c.server("SA")
    assert (Ether(r.out)[IP].src, Ether(r.out)[TCP].sport) == (VIP, 80)
    assert c.state() == [("new", "syn-recv")] * 2
    c.client("A")
    assert c.state() == [("established", "established")] * 2, \
        "the handshake done, both entries are in the map nothing evicts"
    for _ in range(3):
        assert c.client("PA").verdict == TC_ACT_REDIRECT
        assert Ether(c.server("PA").out)[IP].src == VIP
    assert c.state() == [("established", "established")] * 2
    keys = c.keys()
    c.client("FA")
    assert c.state() == [("established", "fin-wait")] * 2, \
        "closing: the state written in place, the flow where it was"
    t, v = find(ct_dp, c.keys()[0])
    assert v.flags & DEFS.defines["FP_CT_F_FIN_ORIG"]
    # the other end still sends (a half-closed connection)
    assert Ether(c.server("PA").out)[IP].src == VIP
    c.server("FA")
    assert c.state() == [("established", "closed")] * 2
    # the last ACK, after both FINs, is still translated, and retires the flow
    r = c.client("A")
    assert r.verdict == TC_ACT_REDIRECT and Ether(r.out)[IP].dst == POD_B
    assert [find(ct_dp, k) for k in keys] == [(None, None)] * 2
    after = events(ct_dp)
    assert after["created"] == before["created"] + 1
    assert after["promoted"] == before["promoted"] + 1
    assert after["demoted"] == before["demoted"], "a close no longer moves the flow"


def test_a_reset_closes_an_established_flow_at_once(ct_dp, bpfnet, svc):
    c = Conn(ct_dp, bpfnet).handshake()
    assert c.state() == [("established", "established")] * 2
    c.server("R")
    assert c.state() == [("new", "closed")] * 2
    c2 = Conn(ct_dp, bpfnet).handshake()
    c2.client("RA")
    assert c2.state() == [("new", "closed")] * 2


def test_a_syn_on_a_closed_tuple_opens_a_new_connection(ct_dp, bpfnet, svc):
    c = Conn(ct_dp, bpfnet).handshake()
    c.client("FA")
    c.server("FA")          # (the last ACK never seen: the close lingers)
    assert c.state() == [("established", "closed")] * 2
    before = events(ct_dp)["created"]
    assert c.client("S").verdict == TC_ACT_REDIRECT
    assert c.state() == [("new", "new")] * 2
    assert events(ct_dp)["created"] == before + 1, "picked anew, like a first SYN"
    # a retransmitted SYN is the same connection: nothing new is created
    c.client("S")
    assert events(ct_dp)["created"] == before + 1
    assert c.server("SA").verdict == TC_ACT_REDIRECT
    c.client("A")
    assert c.state() == [("established", "established")] * 2



def test_a_new_connection_on_a_closed_tuple_keeps_only_its_own_reply_entry(ct_dp, bpfnet, svc):
    """A client reusing its port (what a connection-heavy client does all the
    time) reopens a closed tuple: when the new pick is another backend, the
    old flow's reply entry goes from both maps; when it is the same one, the
    reply entry is the new flow's (written over, not left closed)."""
    c = Conn(ct_dp, bpfnet, vip=VIP_TWO).handshake()
    seen = set()
    for _ in range(64):
        c.client("FA")
        c.server("FA")
        old_backend, old_reply = c.backend, c.keys()[1]
        assert find(ct_dp, old_reply)[0] == "established", "a close without its last ACK"
        assert c.client("S").verdict == TC_ACT_REDIRECT
        fwd, reply = c.keys()
        assert [s for _, s in c.state()] == ["new", "new"]
        t, v = find(ct_dp, reply)
        assert t == "new" and v.state == M.NEW and (v.nat_addr, v.nat_port) == \
            (be32(VIP_TWO), be16(80)), "the reply entry is the new flow's"
        if c.backend != old_backend:
            assert find(ct_dp, old_reply) == (None, None), \
                "the old flow's reply entry, naming the other backend, is gone"
        seen.add(c.backend == old_backend)
        assert c.server("SA").verdict == TC_ACT_REDIRECT
        c.client("A")
        assert c.state() == [("established", "established")] * 2
        if seen == {True, False}:
            break
    assert seen == {True, False}, "both cases were met (two backends, random picks)"


def test_a_packet_that_is_not_an_opening_one_never_picks_a_backend(ct_dp, bpfnet, svc):
    """An ACK of a connection conntrack does not know: dropped with its own
    reason, counted, reported to the monitor; never sent to some backend."""
    from tests.bpf.conftest import Events
    ev = Events(ct_dp)
    ev.poll()
    drops = lambda: sum(c.packets for c in ct_dp.maps.counters()
                        if c.reason == "dropped-ct-no-backend")
    before = drops()
    c = Conn(ct_dp, bpfnet)
    r = c.client("A")
    assert r.verdict == TC_ACT_SHOT and r.reason == "dropped-ct-no-backend"
    assert c.state() == [(None, None), (None, None)] if c.backend else True
    assert find(ct_dp, fkey(c.sport)) == (None, None), "no entry was made"
    assert drops() == before + 1
    got = ev.decoded()
    mine = [e for e in got if e["sport"] == c.sport]
    assert len(mine) == 1 and mine[0]["reason"] == "dropped-ct-no-backend", got
    assert (mine[0]["daddr"], mine[0]["dport"]) == (VIP, 80)
    # a FIN or RST alone does not pick either
    for flags in ("FA", "R", "PA"):
        assert Conn(ct_dp, bpfnet).client(flags).reason == "dropped-ct-no-backend"
    # SCTP: only an INIT opens an association
    from tests.bpf.test_lb import sctp_packet
    ct_dp.lb.put_backend(5, POD_B, 3869, "SCTP")
    ct_dp.lb.put_slots(15, [5])
    ct_dp.lb.put_service(VIP, 3868, "SCTP", 15, 1)
    try:
        data = sctp_packet(POD_A, VIP, 52100, 3868, b"d", bpfnet.pod_a_mac, bpfnet.cali_a.mac)
        r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(data), bpfnet.cali_a.ifindex)
        assert r.reason == "dropped-ct-no-backend"
        init = sctp_packet(POD_A, VIP, 52100, 3868, None, bpfnet.pod_a_mac, bpfnet.cali_a.mac)
        assert run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(init),
                        bpfnet.cali_a.ifindex).verdict == TC_ACT_REDIRECT
        r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(data), bpfnet.cali_a.ifindex)
        assert r.verdict == TC_ACT_REDIRECT
    finally:
        ct_dp.lb.delete_service(VIP, 3868, "SCTP")


def _age(dp, conn, state: int, seconds: float) -> None:
    """Put both entries of `conn` in `state`, last seen `seconds` ago."""
    now = time.monotonic_ns()
    for k in conn.keys():
        t, v = find(dp, k)
        dp.lb.ct.put(t, k, v._replace(state=state, last_seen=now - int(seconds * SEC)))


STATES = [("new", M.NEW, LIFE.tcp_syn), ("syn-recv", M.SYN_RECV, LIFE.tcp_syn),
          ("established", M.ESTABLISHED, LIFE.tcp_established),
          ("fin-wait", M.FIN_WAIT, LIFE.tcp_fin), ("closed", M.CLOSED, LIFE.tcp_close)]


@pytest.mark.parametrize("label,state,lifetime", STATES, ids=[s[0] for s in STATES])
def test_each_tcp_state_lives_exactly_its_own_lifetime(ct_dp, bpfnet, svc, label, state,
                                                       lifetime):
    c = Conn(ct_dp, bpfnet).handshake()
    _age(ct_dp, c, state, lifetime - 2)
    r = c.client("A")
    assert r.verdict == TC_ACT_REDIRECT, f"{label}: alive {lifetime - 2}s after its last packet"
    _age(ct_dp, c, state, lifetime + 2)
    r = c.client("A")
    assert r.reason == "dropped-ct-no-backend", f"{label}: gone {lifetime + 2}s after"
    # and the reply direction is no longer restored either
    r = c.server("A")
    assert Ether(r.out)[IP].src == POD_B


def test_a_udp_flow_lives_the_datagram_lifetime_then_is_new_again(ct_dp, bpfnet, svc):
    sport = next(_ports)
    q = Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / IP(src=POD_A, dst=VIP) \
        / UDP(sport=sport, dport=53) / b"q"
    run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(q), bpfnet.cali_a.ifindex)
    k = fkey(sport, vport=53, proto=17)
    assert find(ct_dp, k)[1].state == M.NEW
    reply = Ether(src=bpfnet.pod_b_mac, dst=bpfnet.cali_b.mac) / IP(src=POD_B, dst=POD_A) \
        / UDP(sport=5353, dport=sport) / b"a"
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(reply), bpfnet.cali_b.ifindex)
    assert Ether(r.out)[IP].src == VIP
    t, v = find(ct_dp, k)
    assert (t, v.state) == ("established", M.ESTABLISHED), "a reply establishes a UDP flow"
    now = time.monotonic_ns()
    for key in (k, rkey(sport, POD_B, 5353, 17)):
        t, v = find(ct_dp, key)
        ct_dp.lb.ct.put(t, key, v._replace(last_seen=now - (LIFE.other - 2) * SEC))
    before = events(ct_dp)["created"]
    run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(q), bpfnet.cali_a.ifindex)
    assert events(ct_dp)["created"] == before
    for key in (k, rkey(sport, POD_B, 5353, 17)):
        t, v = find(ct_dp, key)
        ct_dp.lb.ct.put(t, key, v._replace(last_seen=time.monotonic_ns() - (LIFE.other + 2) * SEC))
    run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(q), bpfnet.cali_a.ifindex)
    assert events(ct_dp)["created"] == before + 1, "expired: the next datagram starts a new flow"
    t, v = find(ct_dp, k)
    assert (t, v.state) == ("new", M.NEW)


def test_a_draining_backend_keeps_its_flows_and_gets_no_new_ones(ct_dp, bpfnet, svc):
    """B goes terminating: the agent takes it out of the slots and flags it
    draining. Flows on it stay on it; new ones only reach REMOTE."""
    lb = ct_dp.lb
    conns = []
    while len(conns) < 3:
        c = Conn(ct_dp, bpfnet, vip=VIP_TWO).handshake()
        if c.backend == (POD_B, 8080):
            conns.append(c)
    while True:
        pending = Conn(ct_dp, bpfnet, vip=VIP_TWO)
        pending.client("S")
        if pending.backend == (POD_B, 8080):
            break
    lb.put_backend(1, POD_B, 8080, "TCP", draining=True)
    put_frontend(lb, VIP_TWO, 80, "TCP", 12, [3])
    lb.delete_slots(12, 2, 2)
    try:
        for c in conns:
            r = c.client("PA")
            assert r.verdict == TC_ACT_REDIRECT and Ether(r.out)[IP].dst == POD_B
            assert Ether(c.server("PA").out)[IP].src == VIP_TWO
        new = {Conn(ct_dp, bpfnet, vip=VIP_TWO).handshake().backend for _ in range(20)}
        assert new == {(REMOTE, 8080)}
        # a connection whose SYN went to B before: its retransmitted SYN stays on B
        assert Ether(pending.client("S").out)[IP].dst == POD_B
        assert Ether(pending.server("SA").out)[IP].src == VIP_TWO
    finally:
        lb.put_backend(1, POD_B, 8080, "TCP")
        put_frontend(lb, VIP_TWO, 80, "TCP", 12, [1, 3])


def test_affinity_never_sends_a_new_connection_to_a_draining_backend(ct_dp, bpfnet, svc):
    lb = ct_dp.lb
    first = Conn(ct_dp, bpfnet, vip=VIP_AFF).handshake().backend
    assert {Conn(ct_dp, bpfnet, vip=VIP_AFF).handshake().backend for _ in range(5)} == {first}
    bid, other, keep = (1, (REMOTE, 8080), 3) if first == (POD_B, 8080) else (3, (POD_B, 8080), 1)
    lb.put_backend(bid, *first, "TCP", draining=True)
    put_frontend(lb, VIP_AFF, 80, "TCP", 14, [keep], AFF, 10800)
    lb.delete_slots(14, 2, 2)
    try:
        assert {Conn(ct_dp, bpfnet, vip=VIP_AFF).handshake().backend for _ in range(5)} == {other}
    finally:
        lb.put_backend(bid, *first, "TCP")
        put_frontend(lb, VIP_AFF, 80, "TCP", 14, [1, 3], AFF, 10800)


def test_after_its_backend_is_removed_a_tcp_flow_keeps_it_and_a_udp_flow_moves(ct_dp, bpfnet,
                                                                               svc):
    """kube-proxy's semantics: an established connection to a pod that left
    the Service goes on until it ends; a datagram flow is re-balanced."""
    lb = ct_dp.lb
    lb.put_backend(6, REMOTE, 9090, "TCP")
    lb.put_backend(7, REMOTE, 9053, "UDP")
    lb.put_backend(8, POD_B, 9053, "UDP")
    put_frontend(lb, VIP, 90, "TCP", 16, [6])
    put_frontend(lb, VIP, 91, "UDP", 17, [7])
    try:
        c = Conn(ct_dp, bpfnet, vport=90).handshake()
        sport = next(_ports)
        q = Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / IP(src=POD_A, dst=VIP) \
            / UDP(sport=sport, dport=91) / b"q"
        assert Ether(run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(q),
                              bpfnet.cali_a.ifindex).out)[IP].dst == REMOTE
        # both backends leave (their Services now point elsewhere / nowhere)
        lb.put_slots(17, [8])
        lb.delete_backend(7)
        lb.put_service(VIP, 90, "TCP", 16, 0, DEFS.defines["FP_SVC_F_REJECT"])
        lb.delete_slots(16, 1, 1)
        lb.delete_backend(6)
        r = c.client("PA")
        assert r.verdict != TC_ACT_SHOT and (Ether(r.out)[IP].dst, Ether(r.out)[TCP].dport) == (
            REMOTE, 9090), "mid-stream: still the backend it had"
        r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(q), bpfnet.cali_a.ifindex)
        assert (Ether(r.out)[IP].dst, Ether(r.out)[UDP].dport) == (POD_B, 9053), \
            "the datagram flow picked a live backend at once"
        # a new TCP connection is refused (no backend left)
        assert Conn(ct_dp, bpfnet, vport=90).client("S").reason == "dropped-service-no-backend"
    finally:
        lb.delete_service(VIP, 90, "TCP")
        lb.delete_service(VIP, 91, "UDP")
        lb.delete_slots(17, 1, 1)
        lb.delete_backend(8)


def test_thousands_of_closed_flows_never_evict_an_established_one(ct_dp, bpfnet, svc):
    """The LRU map holds 1,024 entries; 3,000 connections open and close
    while one established connection stays idle: it keeps both entries, in
    the map nothing evicts, and its next packets are translated both ways."""
    idle = Conn(ct_dp, bpfnet).handshake()
    for _ in range(3000):
        c = Conn(ct_dp, bpfnet).handshake()
        c.client("FA")
        c.server("FA")
    assert idle.state() == [("established", "established")] * 2
    r = idle.client("PA")
    assert r.verdict == TC_ACT_REDIRECT and Ether(r.out)[IP].dst == POD_B
    assert Ether(idle.server("PA").out)[IP].src == VIP
    assert len(ct_dp.lb.ct.nat_entries("new")) <= CT_SMALL


def test_a_full_established_map_keeps_new_established_flows_in_the_lru_and_says_so(ct_dp, bpfnet,
                                                                                  svc):
    lb = ct_dp.lb
    lb.conntrack_flush()
    # fill the established map directly: CT_SMALL entries of made-up flows
    now = time.monotonic_ns()
    filler = [M.CtKey(be32(f"10.77.{i >> 8}.{i & 255}"), be32(VIP), be16(1000), be16(80), 6,
                      M.FORWARD) for i in range(CT_SMALL)]
    for k in filler:
        lb.ct.put("established", k, M.CtValue(now, be32(POD_B), be16(8080), 0, M.ESTABLISHED, 1,
                                              10))
    before = events(ct_dp)["promotion-failed-full"]
    try:
        c = Conn(ct_dp, bpfnet).handshake()
        assert c.state() == [("new", "established")] * 2, "established, but in the LRU map"
        assert events(ct_dp)["promotion-failed-full"] >= before + 1
        r = c.client("PA")
        assert r.verdict == TC_ACT_REDIRECT and Ether(c.server("PA").out)[IP].src == VIP
        # room again: the next refresh of the flow (a second later) promotes it
        lb.ct.delete("established", filler[:8])
        _age(ct_dp, c, M.ESTABLISHED, 2)
        assert c.client("PA").verdict == TC_ACT_REDIRECT
        assert c.state() == [("established", "established")] * 2
    finally:
        lb.ct.delete("established", filler)
