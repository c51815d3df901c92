"""IPv6 ClusterIPs per packet with IPv6 conntrack: fp_from_pod6 and
fp_from_vpc6 (reached by tail call from fp_from_pod / fp_from_vpc), run
with BPF_PROG_TEST_RUN.

A pod's TCP or UDP packet to an IPv6 frontend is translated to a backend
(DNAT, the transport checksum fixed over the IPv6 pseudo-header), the flow
is tracked in the IPv6 conntrack maps (forward + reply entries, the IPv4
state machine and tiers), and the backend's reply gets the VIP back where
it arrives: from a local backend in fp_from_pod6, from a remote one in
fp_from_vpc6. Every rewritten packet's checksum is recomputed by scapy and
compared with the program's.
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6PacketTooBig, IPerror6, IPv6,
                                IPv6ExtHdrFragment, TCP, TCPerror, UDP, UDPerror, defragment6,
                                fragment6)
from scapy.layers.l2 import Ether

from agent.conntrack import gc, purge
from agent.datapath.maps import DEFS
from agent.model.conntrack import Lifetimes
from tests.bpf.conftest import (GW_MAC, POD_A6, POD_B6, REMOTE6, TC_ACT_REDIRECT, TC_ACT_SHOT,
                                frontends, run_prog)
from tests.bpf.test_ipv6 import dual  # noqa: F401  (the dual-stack pods fixture)

VIP6 = "fd00:16::10"
VIP6_REMOTE = "fd00:16::11"
VIP6_EMPTY = "fd00:16::12"
VIP6_HAIRPIN = "fd00:16::13"
VIP6_TWO = "fd00:16::14"
VIP6_AFF = "fd00:16::15"
SVC6_RANGE = "fd00:16::/108"
UNALLOCATED6 = "fd00:16::99"
REJECT = DEFS.defines["FP_SVC_F_REJECT"]
AFF = DEFS.defines["FP_SVC_F_AFFINITY"]
CLUSTER_IP = DEFS.defines["FP_SVCNET_F_CLUSTER_IP"]
RANGE = DEFS.defines["FP_SVCNET_F_RANGE"]

_sport = itertools.count(43000)


@pytest.fixture(scope="module")
def svc6(dp, dual):  # noqa: F811
    backends = {61: (POD_B6, 8080, "TCP"), 62: (POD_B6, 5353, "UDP"),
                63: (REMOTE6, 8080, "TCP"), 64: (POD_A6, 8080, "TCP"),
                65: (REMOTE6, 5353, "UDP")}
    lb = dp.lb
    with frontends(lb, backends, [
            (VIP6, 80, "TCP", 60, [61]), (VIP6, 53, "UDP", 66, [62]),
            (VIP6_REMOTE, 80, "TCP", 67, [63]), (VIP6_EMPTY, 80, "TCP", 68, [], REJECT),
            (VIP6_HAIRPIN, 80, "TCP", 69, [64]), (VIP6_TWO, 53, "UDP", 70, [62, 65]),
            (VIP6_REMOTE, 53, "UDP", 71, [65]),
            (VIP6_AFF, 80, "TCP", 72, [61, 63], AFF, 10800)],
            flush=True):
        lb.svcnet_put(SVC6_RANGE, RANGE)
        for vip in (VIP6, VIP6_REMOTE, VIP6_EMPTY, VIP6_HAIRPIN, VIP6_TWO, VIP6_AFF):
            lb.svcnet_put(f"{vip}/128", CLUSTER_IP)
        try:
            yield lb
        finally:
            for p in [SVC6_RANGE] + [f"{v}/128" for v in (VIP6, VIP6_REMOTE, VIP6_EMPTY,
                                                          VIP6_HAIRPIN, VIP6_TWO, VIP6_AFF)]:
                lb.svcnet_delete(p)
            for bid in backends:
                lb.delete_backend(bid)


def pkt_from(n, pod, src, dst, l4):
    dev = {"a": n.cali_a, "b": n.cali_b}[pod]
    mac = {"a": n.pod_a_mac, "b": n.pod_b_mac}[pod]
    return Ether(src=mac, dst=dev.mac) / IPv6(src=src, dst=dst) / l4


def run(dp, n, prog, pkt, dev):
    return run_prog(dp, n.ns, prog, bytes(pkt), getattr(n, dev).ifindex)


def syn_from_a(dp, n, dst, dport=80, sport=None):
    """Pod A's SYN to dst:dport through fp_from_pod: (the SYN, the run)."""
    sent = pkt_from(n, "a", POD_A6, dst, TCP(sport=sport or next(_sport), dport=dport, flags="S"))
    return sent, run(dp, n, "fp_from_pod", sent, "cali_a")


def assert_l4_checksum_valid(out: bytes):
    """The program's TCP/UDP checksum is what scapy computes over the
    packet as it is (IPv6 pseudo-header included); a UDP one is never 0."""
    o = Ether(out)
    layer = TCP if TCP in o else UDP
    got = o[layer].chksum
    again = o.copy()
    del again[layer].chksum
    assert Ether(bytes(again))[layer].chksum == got, "transport checksum over the pseudo-header"
    assert got != 0


def ct6(lb):
    """{(direction, saddr, sport, daddr, dport): row} of the IPv6 conntrack tables."""
    return {(c.direction, c.saddr, c.sport, c.daddr, c.dport): c for c in lb.conntrack()
            if c.table in ("established6", "new6")}


def test_a_tcp_connection_to_an_ipv6_clusterip_is_translated_and_tracked(dp, bpfnet, svc6):
    n = bpfnet
    sport = next(_sport)
    sent = pkt_from(n, "a", POD_A6, VIP6, TCP(sport=sport, dport=80, flags="S", seq=1000) / b"hi")
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert r.redirect_ifindex == n.cali_b.ifindex
    o = Ether(r.out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (POD_A6, sport, POD_B6, 8080)
    assert o[IPv6].hlim == 63 and bytes(o[TCP].payload) == b"hi"
    assert_l4_checksum_valid(r.out)
    ct = ct6(svc6)
    fwd = ct[("forward", POD_A6, sport, VIP6, 80)]
    rev = ct[("reply", POD_B6, 8080, POD_A6, sport)]
    assert (fwd.nat_addr, fwd.nat_port, fwd.backend_id, fwd.state, fwd.table) == (
        POD_B6, 8080, 61, "new", "new6")
    assert (rev.nat_addr, rev.nat_port, rev.state) == (VIP6, 80, "new")
    assert not any(c.table in ("established", "new") and c.dport == sport
                   for c in svc6.conntrack()), "IPv4 maps untouched"

    # the reply of the local backend gets the VIP back and goes into A
    synack = pkt_from(n, "b", POD_B6, POD_A6, TCP(sport=8080, dport=sport, flags="SA"))
    r = run(dp, n, "fp_from_pod", synack, "cali_b")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (VIP6, 80, POD_A6, sport)
    assert_l4_checksum_valid(r.out)
    assert ct6(svc6)[("forward", POD_A6, sport, VIP6, 80)].state == "syn-recv"

    # the completing ACK: established, both entries promoted to the hash
    ack = pkt_from(n, "a", POD_A6, VIP6, TCP(sport=sport, dport=80, flags="A"))
    r = run(dp, n, "fp_from_pod", ack, "cali_a")
    assert Ether(r.out)[IPv6].dst == POD_B6
    ct = ct6(svc6)
    for k in (("forward", POD_A6, sport, VIP6, 80), ("reply", POD_B6, 8080, POD_A6, sport)):
        assert (ct[k].state, ct[k].table) == ("established", "established6"), k

    # FIN from each end: closed, where it was (the last ACK never seen)
    for pkt, dev in ((pkt_from(n, "a", POD_A6, VIP6, TCP(sport=sport, dport=80, flags="FA")),
                      "cali_a"),
                     (pkt_from(n, "b", POD_B6, POD_A6, TCP(sport=8080, dport=sport, flags="FA")),
                      "cali_b")):
        run(dp, n, "fp_from_pod", pkt, dev)
    ct = ct6(svc6)
    fwd = ct[("forward", POD_A6, sport, VIP6, 80)]
    assert (fwd.state, fwd.table) == ("closed", "established6")


def test_udp_to_an_ipv6_clusterip_is_translated_with_a_valid_checksum(dp, bpfnet, svc6):
    n = bpfnet
    sport = next(_sport)
    sent = pkt_from(n, "a", POD_A6, VIP6, UDP(sport=sport, dport=53) / b"query")
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_b.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].dst, o[UDP].dport, bytes(o[UDP].payload)) == (POD_B6, 5353, b"query")
    assert_l4_checksum_valid(r.out)
    reply = pkt_from(n, "b", POD_B6, POD_A6, UDP(sport=5353, dport=sport) / b"answer")
    r = run(dp, n, "fp_from_pod", reply, "cali_b")
    o = Ether(r.out)
    assert (o[IPv6].src, o[UDP].sport, o[IPv6].dst) == (VIP6, 53, POD_A6)
    assert_l4_checksum_valid(r.out)
    fwd = ct6(svc6)[("forward", POD_A6, sport, VIP6, 53)]
    assert (fwd.state, fwd.table) == ("established", "established6"), "a reply establishes UDP"


def test_a_udp_checksum_that_becomes_zero_is_sent_as_ffff(dp, bpfnet, svc6):
    """IPv6 forbids a zero UDP checksum: a rewrite that sums to zero must
    write 0xffff. Payload bytes are chosen so the translated datagram's
    checksum is exactly zero."""
    n = bpfnet
    sport = next(_sport)

    def translated(payload):
        return Ether() / IPv6(src=POD_A6, dst=POD_B6, hlim=63) / UDP(sport=sport, dport=5353) \
            / payload

    base = translated(b"\x00\x00")
    c = Ether(bytes(base))[UDP].chksum           # ~sum with a zero word
    # choose the word w so that the ones' complement sum is 0xffff: checksum 0
    w = c if c != 0xffff else 0
    payload = w.to_bytes(2, "big")
    assert Ether(bytes(translated(payload)))[UDP].chksum in (0, 0xffff)
    sent = pkt_from(n, "a", POD_A6, VIP6, UDP(sport=sport, dport=53) / payload)
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    o = Ether(r.out)
    assert o[IPv6].dst == POD_B6
    assert o[UDP].chksum == 0xffff


def test_a_remote_backends_reply_is_restored_where_it_arrives_from_the_vpc(dp, bpfnet, svc6):
    n = bpfnet
    sport = next(_sport)
    _, r = syn_from_a(dp, n, VIP6_REMOTE, sport=sport)
    assert (r.verdict, r.reason, r.redirect_ifindex) == (TC_ACT_REDIRECT, "redirected-eni",
                                                         n.eth1.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].dst, o[TCP].dport, o.dst) == (REMOTE6, 8080, GW_MAC)
    assert_l4_checksum_valid(r.out)
    synack = Ether(src=GW_MAC, dst=n.eth1.mac) / IPv6(src=REMOTE6, dst=POD_A6) \
        / TCP(sport=8080, dport=sport, flags="SA")
    r = run(dp, n, "fp_from_vpc", synack, "eth1")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (VIP6_REMOTE, 80, POD_A6,
                                                                      sport)
    assert_l4_checksum_valid(r.out)


def test_a_mid_stream_packet_conntrack_does_not_know_is_dropped(dp, bpfnet, svc6):
    n = bpfnet
    sent = pkt_from(n, "a", POD_A6, VIP6, TCP(sport=next(_sport), dport=80, flags="A"))
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")


def assert_port_unreachable(r, n, vip, sent):
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o.dst, o.src) == (n.pod_a_mac, n.cali_a.mac)
    assert (o[IPv6].src, o[IPv6].dst) == (vip, POD_A6)
    assert (o[ICMPv6DestUnreach].type, o[ICMPv6DestUnreach].code) == (1, 4)
    got = o[ICMPv6DestUnreach].cksum
    again = o.copy()
    del again[ICMPv6DestUnreach].cksum
    assert Ether(bytes(again))[ICMPv6DestUnreach].cksum == got, "ICMPv6 checksum"
    q = o[IPerror6]
    assert (q.src, q.dst, q[TCPerror].sport, q[TCPerror].dport) == (
        POD_A6, vip, sent[TCP].sport, sent[TCP].dport), "the refused packet is quoted"


def test_a_service_without_backends_answers_icmpv6_port_unreachable(dp, bpfnet, svc6):
    n = bpfnet
    sent, r = syn_from_a(dp, n, VIP6_EMPTY)
    assert r.reason == "dropped-service-no-backend"
    assert_port_unreachable(r, n, VIP6_EMPTY, sent)


def test_an_unknown_port_of_a_live_ipv6_clusterip_is_rejected(dp, bpfnet, svc6):
    n = bpfnet
    sent, r = syn_from_a(dp, n, VIP6, dport=81)
    assert r.reason == "dropped-service-unknown-port"
    assert_port_unreachable(r, n, VIP6, sent)


def test_an_unallocated_address_of_the_ipv6_service_cidr_is_dropped(dp, bpfnet, svc6):
    n = bpfnet
    _, r = syn_from_a(dp, n, UNALLOCATED6)
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-service-unallocated")


def test_a_pod_reaching_itself_through_an_ipv6_service_is_hairpinned(dp, bpfnet, svc6):
    n = bpfnet
    router = dp.config.hairpin_source_ipv6
    sport = next(_sport)
    _, r = syn_from_a(dp, n, VIP6_HAIRPIN, sport=sport)
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    # the pod would take its own address as a local peer: the router's stands in
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (router, sport, POD_A6, 8080)
    assert_l4_checksum_valid(r.out)
    reply = pkt_from(n, "a", POD_A6, router, TCP(sport=8080, dport=sport, flags="SA"))
    r = run(dp, n, "fp_from_pod", reply, "cali_a")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (VIP6_HAIRPIN, 80, POD_A6,
                                                                      sport)
    assert_l4_checksum_valid(r.out)


def test_a_direct_connection_reusing_a_translated_tuple_is_not_hijacked(dp, bpfnet, svc6):
    n = bpfnet
    sport = next(_sport)
    run(dp, n, "fp_from_pod", pkt_from(n, "a", POD_A6, VIP6, TCP(sport=sport, dport=80,
                                                                  flags="S")), "cali_a")
    assert ("reply", POD_B6, 8080, POD_A6, sport) in ct6(svc6)
    run(dp, n, "fp_from_pod", pkt_from(n, "a", POD_A6, POD_B6, TCP(sport=sport, dport=8080,
                                                                    flags="S")), "cali_a")
    assert ("reply", POD_B6, 8080, POD_A6, sport) not in ct6(svc6)
    synack = pkt_from(n, "b", POD_B6, POD_A6, TCP(sport=8080, dport=sport, flags="SA"))
    o = Ether(run(dp, n, "fp_from_pod", synack, "cali_b").out)
    assert (o[IPv6].src, o[TCP].sport) == (POD_B6, 8080)


def test_gc_and_backend_removal_cover_the_ipv6_maps(dp, bpfnet, svc6):
    """The agent's sweep removes expired IPv6 entries; removing a backend
    deletes its IPv6 datagram flows and keeps its connections."""
    n = bpfnet
    ct = svc6.ct
    tcp_sport, udp_sport = next(_sport), next(_sport)
    run(dp, n, "fp_from_pod", pkt_from(n, "a", POD_A6, VIP6, TCP(sport=tcp_sport, dport=80,
                                                                  flags="S")), "cali_a")
    run(dp, n, "fp_from_pod", pkt_from(n, "a", POD_A6, VIP6, UDP(sport=udp_sport, dport=53)),
        "cali_a")
    assert purge.purge_backends(ct, {62}) >= 2
    have = ct6(svc6)
    assert ("forward", POD_A6, udp_sport, VIP6, 53) not in have
    assert ("reply", POD_B6, 5353, POD_A6, udp_sport) not in have
    assert ("forward", POD_A6, tcp_sport, VIP6, 80) in have, "connections stay"
    lifetimes = Lifetimes.from_config(dp.config)
    now = max(c.last_seen_ns for c in have.values()) + 10**9 * 10**6
    gone = gc.sweep(ct, now, lifetimes)
    assert gone >= 2
    assert ct6(svc6) == {}


def test_a_udp_flow_whose_backend_is_gone_picks_a_live_one(dp, bpfnet, svc6):
    n = bpfnet
    sport = next(_sport)
    seen = set()
    r = run(dp, n, "fp_from_pod", pkt_from(n, "a", POD_A6, VIP6_TWO, UDP(sport=sport, dport=53)),
            "cali_a")
    first = Ether(r.out)[IPv6].dst
    gone = 62 if first == POD_B6 else 65
    live = 65 if gone == 62 else 62
    # as the agent removes a backend: slots first, then the backend
    svc6.put_slots(70, [live])
    svc6.put_service(VIP6_TWO, 53, "UDP", 70, 1)
    svc6.delete_backend(gone)
    try:
        for _ in range(3):
            r = run(dp, n, "fp_from_pod",
                    pkt_from(n, "a", POD_A6, VIP6_TWO, UDP(sport=sport, dport=53)), "cali_a")
            seen.add(Ether(r.out)[IPv6].dst)
        assert seen == {REMOTE6 if gone == 62 else POD_B6}
    finally:
        svc6.put_backend(gone, *((POD_B6, 5353, "UDP") if gone == 62 else (REMOTE6, 5353, "UDP")))
        svc6.put_slots(70, [62, 65])
        svc6.put_service(VIP6_TWO, 53, "UDP", 70, 2)


# ---- ICMPv6 errors RELATED to translated flows ------------------------------------

def assert_icmp6_checksum_valid(out: bytes, layer):
    o = Ether(out)
    got = o[layer].cksum
    again = o.copy()
    del again[layer].cksum
    assert Ether(bytes(again))[layer].cksum == got, "ICMPv6 checksum over the pseudo-header"


def test_a_local_backends_port_unreachable_reaches_the_client_about_the_vip(dp, bpfnet, svc6):
    """The backend's ICMPv6 error quotes the packet it got (client -> backend):
    the client must see an error from the VIP about its packet to the VIP."""
    n = bpfnet
    sport = next(_sport)
    sent = pkt_from(n, "a", POD_A6, VIP6, UDP(sport=sport, dport=53) / b"query")
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    got = Ether(r.out)
    quoted = IPv6(bytes(got[IPv6]))                    # what the backend received
    err = pkt_from(n, "b", POD_B6, POD_A6, ICMPv6DestUnreach(code=4) / quoted)
    before = svc6.ct_events().get("related-icmp", 0)
    r = run(dp, n, "fp_from_pod", err, "cali_b")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[IPv6].dst) == (VIP6, POD_A6)
    q = o[IPerror6]
    assert (q.src, q.dst, q[UDPerror].sport, q[UDPerror].dport) == (POD_A6, VIP6, sport, 53)
    assert_icmp6_checksum_valid(r.out, ICMPv6DestUnreach)
    # the quoted datagram's checksum is the one the client's own packet had
    assert q[UDPerror].chksum == Ether(bytes(sent))[UDP].chksum
    assert svc6.ct_events()["related-icmp"] == before + 1


def test_a_packet_too_big_from_the_vpc_is_restored_for_a_remote_backends_flow(dp, bpfnet, svc6):
    n = bpfnet
    sport = next(_sport)
    sent, r = syn_from_a(dp, n, VIP6_REMOTE, sport=sport)
    quoted = IPv6(bytes(Ether(r.out)[IPv6]))
    router = "fd00:10::fe"
    ptb = Ether(src=GW_MAC, dst=n.eth1.mac) / IPv6(src=router, dst=POD_A6) \
        / ICMPv6PacketTooBig(mtu=1280) / quoted
    r = run(dp, n, "fp_from_vpc", ptb, "eth1")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[IPv6].dst, o[ICMPv6PacketTooBig].mtu) == (router, POD_A6, 1280)
    q = o[IPerror6]
    assert (q.src, q.dst, q[TCPerror].sport, q[TCPerror].dport) == (POD_A6, VIP6_REMOTE, sport,
                                                                    80)
    assert q[TCPerror].chksum == Ether(bytes(sent))[TCP].chksum
    assert_icmp6_checksum_valid(r.out, ICMPv6PacketTooBig)


def test_an_error_about_no_translated_flow_is_left_alone(dp, bpfnet, svc6):
    n = bpfnet
    quoted = IPv6(src=POD_A6, dst=POD_B6) / UDP(sport=next(_sport), dport=9)
    err = pkt_from(n, "b", POD_B6, POD_A6, ICMPv6DestUnreach(code=4) / quoted)
    r = run(dp, n, "fp_from_pod", err, "cali_b")
    assert r.verdict == TC_ACT_REDIRECT
    assert bytes(Ether(r.out)[IPv6].payload) == bytes(err[IPv6].payload)


# ---- fragments of translated flows ---------------------------------------------

FRAG_PAYLOAD = bytes(range(256)) * 11 + b"tail"          # 2,820 bytes: three fragments


def fragments(src, dst, l4, frag_id):
    whole = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=frag_id) / l4 / FRAG_PAYLOAD
    return fragment6(whole, 1280)


def through(dp, n, prog, frags, dev, mac_src, mac_dst, order=None):
    """Each fragment through `prog`; the reassembled datagram of what came out."""
    outs = []
    for f in [frags[i] for i in (order or range(len(frags)))]:
        r = run(dp, n, prog, Ether(src=mac_src, dst=mac_dst) / f, dev)
        assert r.verdict == TC_ACT_REDIRECT, (r.verdict, r.reason)
        outs.append(IPv6(bytes(Ether(r.out)[IPv6])))
    return defragment6(outs)


def assert_datagram_checksum_valid(d):
    got = d[UDP].chksum
    again = IPv6(bytes(d))
    del again[UDP].chksum
    assert IPv6(bytes(again))[UDP].chksum == got


def test_the_fragments_of_a_translated_datagram_and_of_its_reply_follow_their_first(
        dp, bpfnet, svc6):
    n = bpfnet
    sport = next(_sport)
    frags = fragments(POD_A6, VIP6, UDP(sport=sport, dport=53), 0x6c7001)
    assert len(frags) == 3
    before = svc6.ct_events().get("fragment-followed", 0)
    # the first one first, then the others in reverse order
    d = through(dp, n, "fp_from_pod", frags, "cali_a", n.pod_a_mac, n.cali_a.mac, [0, 2, 1])
    assert (d.src, d.dst, d[UDP].sport, d[UDP].dport) == (POD_A6, POD_B6, sport, 5353)
    assert bytes(d[UDP].payload) == FRAG_PAYLOAD
    assert_datagram_checksum_valid(d)
    assert svc6.ct_events()["fragment-followed"] == before + 2

    # the backend's fragmented answer comes back from the VIP
    back = fragments(POD_B6, POD_A6, UDP(sport=5353, dport=sport), 0x6c7002)
    d = through(dp, n, "fp_from_pod", back, "cali_b", n.pod_b_mac, n.cali_b.mac)
    assert (d.src, d.dst, d[UDP].sport, d[UDP].dport) == (VIP6, POD_A6, 53, sport)
    assert_datagram_checksum_valid(d)


def test_a_remote_backends_fragmented_reply_is_restored_from_the_vpc(dp, bpfnet, svc6):
    n = bpfnet
    sport = next(_sport)
    r = run(dp, n, "fp_from_pod",
            pkt_from(n, "a", POD_A6, VIP6_REMOTE, UDP(sport=sport, dport=53)), "cali_a")
    assert Ether(r.out)[IPv6].dst == REMOTE6
    back = fragments(REMOTE6, POD_A6, UDP(sport=5353, dport=sport), 0x6c7003)
    d = through(dp, n, "fp_from_vpc", back, "eth1", GW_MAC, n.eth1.mac)
    assert (d.src, d[UDP].sport, d.dst) == (VIP6_REMOTE, 53, POD_A6)
    assert_datagram_checksum_valid(d)


def test_fragments_of_an_untranslated_datagram_go_on_as_they_came(dp, bpfnet, svc6):
    n = bpfnet
    frags = fragments(POD_A6, POD_B6, UDP(sport=next(_sport), dport=9), 0x6c7004)
    d = through(dp, n, "fp_from_pod", frags, "cali_a", n.pod_a_mac, n.cali_a.mac)
    assert (d.src, d.dst) == (POD_A6, POD_B6) and bytes(d[UDP].payload) == FRAG_PAYLOAD


def test_client_ip_affinity_keeps_a_pods_new_ipv6_flows_on_one_backend(dp, bpfnet, svc6):
    """Without affinity new flows spread over both backends; with it, every
    new connection of pod A goes where its first one went."""
    n = bpfnet

    def pick(vip):
        return Ether(syn_from_a(dp, n, vip)[1].out)[IPv6].dst

    svc6.put_slots(73, [61, 63])
    svc6.put_service("fd00:16::16", 80, "TCP", 73, 2)
    try:
        assert {pick("fd00:16::16") for _ in range(24)} == {POD_B6, REMOTE6}
    finally:
        svc6.delete_service("fd00:16::16", 80, "TCP")
    first = pick(VIP6_AFF)
    assert {pick(VIP6_AFF) for _ in range(12)} == {first}


def test_a_clients_error_about_a_reply_goes_to_the_backend_about_what_it_sent(
        dp, bpfnet, svc6):
    """The client saw the reply come from the VIP; its error quotes that:
    the backend must get an error about the datagram it sent."""
    n = bpfnet
    sport = next(_sport)
    run(dp, n, "fp_from_pod", pkt_from(n, "a", POD_A6, VIP6, UDP(sport=sport, dport=53)),
        "cali_a")
    reply = pkt_from(n, "b", POD_B6, POD_A6, UDP(sport=5353, dport=sport) / b"answer")
    r = run(dp, n, "fp_from_pod", reply, "cali_b")
    seen = IPv6(bytes(Ether(r.out)[IPv6]))            # what the client got
    assert (seen.src, seen[UDP].sport) == (VIP6, 53)
    err = pkt_from(n, "a", POD_A6, VIP6, ICMPv6DestUnreach(code=4) / seen)
    r = run(dp, n, "fp_from_pod", err, "cali_a")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_b.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[IPv6].dst) == (POD_A6, POD_B6)
    q = o[IPerror6]
    assert (q.src, q[UDPerror].sport, q.dst, q[UDPerror].dport) == (POD_B6, 5353, POD_A6, sport)
    assert q[UDPerror].chksum == Ether(bytes(reply))[UDP].chksum
    assert_icmp6_checksum_valid(r.out, ICMPv6DestUnreach)
