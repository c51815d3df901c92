"""ICMP errors belong to the flow they quote (RELATED), and ICMP echo is
tracked by its identifier.

Reverse translation: an error about a client's packet to a ClusterIP (the
packet after DNAT, quoted by the backend or a router on the way) reaches the
client as an error about the packet it sent: the quoted destination is the
VIP and Service port again, the error comes from the VIP when the backend
sent it. Every checksum is checked by scapy: the outer IP header, the ICMP
message, and, inside it, the quoted IP header and TCP/UDP checksum, which
must be exactly those of the packet the client sent.

Policy: an error quoting a flow NetworkPolicy admitted passes an isolated
pod's ingress; one quoting anything else is judged like any ICMP; an echo
reply passes only for an echo request the pod sent with that identifier.

    pod A (client) ── caliA ┐                 ┌ eth1 ── VPC: REMOTE (backend), GW (router)
    pod B (backend) ─ caliB ┴ node ───────────┘
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import checksum

from tests.bpf.conftest import (ENI_IP, GW, POD_A, POD_B, REMOTE, TC_ACT_REDIRECT, TC_ACT_SHOT,
                                TC_ACT_UNSPEC, enforced, frontends, pods_abc, run_prog)
from tests.policy.kube import netpol, snapshot

VIP_R = "192.168.81.10"       # backends behind the VPC
VIP_L = "192.168.81.11"       # a backend on this node (B)
VIP_H = "192.168.81.12"       # A itself (hairpin)
_ports = itertools.count(30000)


@pytest.fixture(scope="module")
def svc(ct_dp):
    rows = [(21, REMOTE, 5353, "UDP", VIP_R, 53), (22, REMOTE, 8080, "TCP", VIP_R, 80),
            (23, POD_B, 5353, "UDP", VIP_L, 53), (24, POD_B, 8080, "TCP", VIP_L, 80),
            (25, POD_A, 5353, "UDP", VIP_H, 53)]
    with frontends(ct_dp.lb, {bid: (ip, port, proto) for bid, ip, port, proto, _, _ in rows},
                   [(vip, vport, proto, bid, [bid]) for bid, _, _, proto, vip, vport in rows]) \
            as lb:
        yield lb


def from_a(net, dst, l4, payload=b"question"):
    return Ether(src=net.pod_a_mac, dst=net.cali_a.mac) / IP(src=POD_A, dst=dst, ttl=64) / l4 \
        / payload


def translated(dp, net, sent):
    r = run_prog(dp, net.ns, "fp_from_pod", bytes(sent), net.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT, r.reason
    return Ether(r.out)[IP]


def as_sent(sent, ttl_drop: int = 1) -> bytes:
    """The client's packet as the error must quote it: what it sent, TTL
    decremented by the hop that forwarded it, every checksum recomputed."""
    ip = IP(bytes(sent[IP]))
    ip.ttl -= ttl_drop
    del ip.chksum
    return bytes(IP(bytes(ip)))


def check_error(out: bytes, src: str, dst: str, icmp: tuple[int, int], quote: bytes):
    o = Ether(out)
    ip = o[IP]
    assert (ip.src, ip.dst, ip.proto) == (src, dst, 1)
    fresh = IP(bytes(ip))
    del fresh.chksum
    assert IP(bytes(fresh)).chksum == ip.chksum, "outer IPv4 header checksum"
    msg = bytes(ip.payload)
    assert (msg[0], msg[1]) == icmp
    assert checksum(msg) == 0, "ICMP checksum over the message and the quote"
    got = msg[8:]
    q = IP(got)
    ref = IP(got)
    del ref.chksum
    assert IP(bytes(ref)).chksum == q.chksum, "quoted IPv4 header checksum"
    if UDP in q or TCP in q:
        ref = IP(got)
        l4 = ref[UDP] if UDP in ref else ref[TCP]
        del l4.chksum
        ref = IP(bytes(ref))
        want = (ref[UDP] if UDP in ref else ref[TCP]).chksum
        have = (q[UDP] if UDP in q else q[TCP]).chksum
        assert want == have, "quoted TCP/UDP checksum (pseudo-header with the VIP)"
    assert got == quote, "the quote is exactly the packet the client sent"


ERRORS = [(3, 3, "port unreachable"), (3, 4, "fragmentation needed"),
          (3, 1, "host unreachable"), (11, 0, "time exceeded"), (12, 0, "parameter problem")]


@pytest.mark.parametrize("itype,code,what", ERRORS, ids=[e[2] for e in ERRORS])
def test_a_backends_error_about_a_udp_datagram_reaches_the_client_from_the_vip(
        ct_dp, bpfnet, svc, itype, code, what):
    sport = next(_ports)
    sent = from_a(bpfnet, VIP_R, UDP(sport=sport, dport=53))
    wire = translated(ct_dp, bpfnet, sent)
    assert (wire.dst, wire[UDP].dport) == (REMOTE, 5353)
    err = Ether(dst=bpfnet.eth1.mac) / IP(src=REMOTE, dst=POD_A, ttl=60) \
        / ICMP(type=itype, code=code, nexthopmtu=1400 if code == 4 else 0) / bytes(wire)
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(err), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_a.ifindex
    check_error(r.out, VIP_R, POD_A, (itype, code), as_sent(sent))


def test_a_routers_fragmentation_needed_about_a_tcp_segment_keeps_the_routers_address(
        ct_dp, bpfnet, svc):
    sport = next(_ports)
    sent = from_a(bpfnet, VIP_R, TCP(sport=sport, dport=80, flags="PA", seq=7, ack=9),
                  b"x" * 200)
    # (a SYN first: conntrack knows the connection)
    translated(ct_dp, bpfnet, from_a(bpfnet, VIP_R, TCP(sport=sport, dport=80, flags="S")))
    wire = translated(ct_dp, bpfnet, sent)
    assert (wire.dst, wire[TCP].dport) == (REMOTE, 8080)
    err = Ether(dst=bpfnet.eth1.mac) / IP(src=GW, dst=POD_A, ttl=60) \
        / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(wire)
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(err), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_REDIRECT
    check_error(r.out, GW, POD_A, (3, 4), as_sent(sent))


def test_a_quote_holding_only_the_first_8_bytes_of_tcp_is_translated_without_its_checksum(
        ct_dp, bpfnet, svc):
    sport = next(_ports)
    translated(ct_dp, bpfnet, from_a(bpfnet, VIP_R, TCP(sport=sport, dport=80, flags="S")))
    sent = from_a(bpfnet, VIP_R, TCP(sport=sport, dport=80, flags="A", seq=1))
    wire = bytes(translated(ct_dp, bpfnet, sent))[:28]        # RFC 792's minimum
    err = Ether(dst=bpfnet.eth1.mac) / IP(src=GW, dst=POD_A) / ICMP(type=11) / wire
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(err), bpfnet.eth1.ifindex)
    msg = bytes(Ether(r.out)[IP].payload)
    assert checksum(msg) == 0
    assert msg[8:8 + 28] == as_sent(sent)[:28]


def test_a_local_backends_error_is_translated_on_its_way_to_the_client(ct_dp, bpfnet, svc):
    sport = next(_ports)
    sent = from_a(bpfnet, VIP_L, UDP(sport=sport, dport=53))
    wire = translated(ct_dp, bpfnet, sent)
    assert wire.dst == POD_B
    err = Ether(src=bpfnet.pod_b_mac, dst=bpfnet.cali_b.mac) / IP(src=POD_B, dst=POD_A) \
        / ICMP(type=3, code=3) / bytes(wire)
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(err), bpfnet.cali_b.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_a.ifindex
    check_error(r.out, VIP_L, POD_A, (3, 3), as_sent(sent))


def test_an_error_from_the_nodes_own_stack_is_translated_on_the_pods_veth(ct_dp, bpfnet, svc):
    """The node forwarded the client's packet itself (too big for the ENI)
    and answered "fragmentation needed": fp_to_pod fixes the quote."""
    sport = next(_ports)
    translated(ct_dp, bpfnet, from_a(bpfnet, VIP_R, TCP(sport=sport, dport=80, flags="S")))
    sent = from_a(bpfnet, VIP_R, TCP(sport=sport, dport=80, flags="A"), b"y" * 1400)
    wire = translated(ct_dp, bpfnet, sent)
    err = Ether(dst=bpfnet.pod_a_mac, src=bpfnet.cali_a.mac) / IP(src=ENI_IP, dst=POD_A) \
        / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(wire)[:576 - 28]
    r = run_prog(ct_dp, bpfnet.ns, "fp_to_pod", bytes(err), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_UNSPEC
    msg = bytes(Ether(r.out)[IP].payload)
    assert Ether(r.out)[IP].src == ENI_IP
    assert checksum(msg) == 0
    want = as_sent(sent)
    assert msg[8:] == want[:len(msg) - 8], "quoted header and data as the client sent them"
    q = IP(msg[8:])
    assert (q.dst, q[TCP].dport) == (VIP_R, 80)


def test_a_pod_reaching_itself_gets_its_own_error_about_the_vip(ct_dp, bpfnet, svc):
    router = ct_dp.config.local_router_ipv4
    sport = next(_ports)
    sent = from_a(bpfnet, VIP_H, UDP(sport=sport, dport=53))
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(sent), bpfnet.cali_a.ifindex)
    wire = Ether(r.out)[IP]
    assert (wire.src, wire.dst, wire[UDP].dport) == (router, POD_A, 5353)
    # A has nothing on 5353: its stack answers the router address
    err = Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / IP(src=POD_A, dst=router) \
        / ICMP(type=3, code=3) / bytes(wire)
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(err), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_a.ifindex
    check_error(r.out, VIP_H, POD_A, (3, 3), as_sent(sent))


def test_an_error_about_a_flow_nobody_translated_is_left_alone(ct_dp, bpfnet, svc):
    quote = bytes(IP(src=POD_A, dst=REMOTE) / UDP(sport=next(_ports), dport=7777) / b"z")
    err = Ether(dst=bpfnet.eth1.mac) / IP(src=REMOTE, dst=POD_A) / ICMP(type=3, code=3) / quote
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(err), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_REDIRECT
    assert bytes(Ether(r.out)[IP].payload) == bytes(err[IP].payload)


def test_related_errors_are_counted(ct_dp, bpfnet, svc):
    before = ct_dp.lb.ct_events()["related-icmp"]
    sport = next(_ports)
    wire = translated(ct_dp, bpfnet, from_a(bpfnet, VIP_R, UDP(sport=sport, dport=53)))
    err = Ether(dst=bpfnet.eth1.mac) / IP(src=REMOTE, dst=POD_A) / ICMP(type=3, code=3) \
        / bytes(wire)
    run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(err), bpfnet.eth1.ifindex)
    assert ct_dp.lb.ct_events()["related-icmp"] == before + 1


# ------------------------------------------------------------------ policy

@pytest.fixture(scope="module")
def isolated(ct_dp, svc):
    """A admits nothing in (default deny ingress); egress is open."""
    snap = snapshot([*pods_abc(),
                     netpol("x", "a-deny-in", {"podSelector": {"matchLabels": {"app": "a"}},
                                               "ingress": []})])
    with enforced(ct_dp, snap) as state:
        yield state


def _remote_icmp(net, icmp, payload=b""):
    return Ether(dst=net.eth1.mac) / IP(src=REMOTE, dst=POD_A) / icmp / payload


def test_an_error_about_an_admitted_flow_passes_an_isolated_pods_ingress(ct_dp, bpfnet, svc,
                                                                         isolated):
    sport = next(_ports)
    out = from_a(bpfnet, REMOTE, UDP(sport=sport, dport=9999))
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(out), bpfnet.cali_a.ifindex)
    assert r.verdict != TC_ACT_SHOT
    err = _remote_icmp(bpfnet, ICMP(type=3, code=3), bytes(Ether(r.out)[IP]))
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(err), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_REDIRECT, r.reason
    # the same error about a flow A never opened is judged as ICMP: denied
    other = bytes(IP(src=POD_A, dst=REMOTE) / UDP(sport=next(_ports), dport=9999) / b"q")
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc",
                 bytes(_remote_icmp(bpfnet, ICMP(type=3, code=3), other)), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_SHOT and r.reason == "dropped-policy-denied"


def test_fragmentation_needed_about_a_translated_flow_passes_and_is_restored(ct_dp, bpfnet, svc,
                                                                             isolated):
    """The path-MTU case: A (isolated, default deny) talks to a ClusterIP; a
    router's error about the translated packet is RELATED to A's flow."""
    sport = next(_ports)
    translated(ct_dp, bpfnet, from_a(bpfnet, VIP_R, TCP(sport=sport, dport=80, flags="S")))
    sent = from_a(bpfnet, VIP_R, TCP(sport=sport, dport=80, flags="A"), b"x" * 100)
    wire = translated(ct_dp, bpfnet, sent)
    err = Ether(dst=bpfnet.eth1.mac) / IP(src=GW, dst=POD_A) \
        / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(wire)
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(err), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_REDIRECT, r.reason
    check_error(r.out, GW, POD_A, (3, 4), as_sent(sent))


def test_echo_is_tracked_by_its_identifier(ct_dp, bpfnet, svc, isolated):
    ping = from_a(bpfnet, REMOTE, ICMP(type=8, id=4242, seq=1), b"")
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(ping), bpfnet.cali_a.ifindex)
    assert r.verdict != TC_ACT_SHOT
    pol = [c for c in ct_dp.lb.conntrack() if c.direction == "policy" and c.proto == "ICMP"]
    assert any(4242 in (c.sport, c.dport) for c in pol), pol
    # its reply passes A's isolated ingress ...
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc",
                 bytes(_remote_icmp(bpfnet, ICMP(type=0, id=4242, seq=1))), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_REDIRECT, r.reason
    # ... a reply with another identifier does not, nor do other messages
    # from the same peer (before: anything ICMP from it passed for a minute)
    for icmp in (ICMP(type=0, id=4243, seq=1), ICMP(type=13, id=4242), ICMP(type=8, id=4242)):
        r = run_prog(ct_dp, bpfnet.ns, "fp_from_vpc", bytes(_remote_icmp(bpfnet, icmp)),
                     bpfnet.eth1.ifindex)
        assert r.verdict == TC_ACT_SHOT and r.reason == "dropped-policy-denied", icmp.summary()


def test_a_clients_error_about_a_reply_goes_to_the_backend_about_what_it_sent(ct_dp, bpfnet,
                                                                              svc):
    """The other way round: the backend's reply reached the client from the
    VIP; the client's stack answers it with "port unreachable" (its socket
    is gone). The error goes to the backend, quoting the reply as the
    backend sent it."""
    sport = next(_ports)
    translated(ct_dp, bpfnet, from_a(bpfnet, VIP_L, UDP(sport=sport, dport=53)))
    reply = Ether(src=bpfnet.pod_b_mac, dst=bpfnet.cali_b.mac) \
        / IP(src=POD_B, dst=POD_A, ttl=64) / UDP(sport=5353, dport=sport) / b"answer"
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(reply), bpfnet.cali_b.ifindex)
    seen = Ether(r.out)[IP]
    assert (seen.src, seen[UDP].sport) == (VIP_L, 53)
    err = Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / IP(src=POD_A, dst=VIP_L) \
        / ICMP(type=3, code=3) / bytes(seen)
    r = run_prog(ct_dp, bpfnet.ns, "fp_from_pod", bytes(err), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_b.ifindex
    check_error(r.out, POD_A, POD_B, (3, 3), as_sent(reply))
