"""Per-packet service translation: DNAT to a backend, conntrack, reverse NAT
of replies, affinity, removed backends and services without backends.

Maps are filled through the agent's LbMaps writer; packets are scapy-built
and every rewritten packet's IPv4 and TCP/UDP checksums are recomputed by
scapy and compared with what the program produced.
"""
from __future__ import annotations

from collections import Counter

import pytest
from scapy.layers.inet import ICMP, IP, IPerror, TCP, UDP
from scapy.layers.l2 import Ether

from agent.datapath.maps import DEFS
from tests.bpf.conftest import (POD_A, POD_B, REMOTE, TC_ACT_REDIRECT, TC_ACT_SHOT,
                                TC_ACT_UNSPEC, counters, frontends, run_prog)

VIP = "192.168.50.10"
VIP_AFF = "192.168.50.11"
VIP_EMPTY = "192.168.50.12"
VIP_TWO = "192.168.50.13"
AFF = DEFS.defines["FP_SVC_F_AFFINITY"]
REJECT = DEFS.defines["FP_SVC_F_REJECT"]


@pytest.fixture(scope="module")
def services(dp):
    backends = {1: (POD_B, 8080, "TCP"), 2: (POD_B, 5353, "UDP"), 3: (REMOTE, 8080, "TCP")}
    with frontends(dp.lb, backends, [
            (VIP, 80, "TCP", 10, [1]), (VIP, 53, "UDP", 11, [2]),
            (VIP_AFF, 80, "TCP", 12, [1, 3], AFF, 10800), (VIP_EMPTY, 80, "TCP", 13, [], REJECT),
            (VIP_TWO, 80, "TCP", 14, [1, 3])]) as lb:
        yield lb
    lb.conntrack_flush()


def syn(net, dst, dport=80, sport=40000):
    return Ether(src=net.pod_a_mac, dst=net.cali_a.mac) / IP(src=POD_A, dst=dst) \
        / TCP(sport=sport, dport=dport, flags="S", seq=1000) / b"GET /"


def assert_checksums_valid(out: bytes):
    pkt = Ether(out)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    got_ip, got_l4 = pkt[IP].chksum, l4.chksum
    if UDP in pkt and got_l4 == 0:
        got_l4 = None
    fresh = Ether(out)
    del fresh[IP].chksum
    if TCP in fresh:
        del fresh[TCP].chksum
    elif got_l4 is not None:
        del fresh[UDP].chksum
    fresh = Ether(bytes(fresh))
    assert fresh[IP].chksum == got_ip, "IPv4 header checksum"
    if got_l4 is not None:
        want = fresh[TCP].chksum if TCP in fresh else fresh[UDP].chksum
        assert want == got_l4, "L4 checksum incl. pseudo-header"


def test_a_connection_to_a_clusterip_is_translated_to_its_backend_and_redirected(dp, bpfnet, services):
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP)), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.reason == "redirected-local"
    assert r.redirect_ifindex == bpfnet.cali_b.ifindex
    out = Ether(r.out)
    assert (out[IP].dst, out[TCP].dport) == (POD_B, 8080)
    assert (out[IP].src, out[TCP].sport) == (POD_A, 40000), "the client is not masqueraded"
    assert bytes(out[TCP].payload) == b"GET /"
    assert_checksums_valid(r.out)
    ct = {(c.direction, c.saddr, c.sport, c.daddr, c.dport): c for c in services.conntrack()}
    fwd = ct[("forward", POD_A, 40000, VIP, 80)]
    assert (fwd.nat_addr, fwd.nat_port) == (POD_B, 8080)
    rev = ct[("reply", POD_B, 8080, POD_A, 40000)]
    assert (rev.nat_addr, rev.nat_port) == (VIP, 80)


def test_a_translated_ipv4_packet_counts_as_service_translated_ipv4(dp, bpfnet, services):
    # (the IPv4 walk once counted it under the IPv6 family)
    key = (bpfnet.cali_a.ifindex, "from-pod", "service-translated")
    before = counters(dp, by_family=True)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP, sport=40009)),
                 bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT
    after = counters(dp, by_family=True)
    assert after.get((*key, "ipv4"), 0) == before.get((*key, "ipv4"), 0) + 1
    assert after.get((*key, "ipv6"), 0) == before.get((*key, "ipv6"), 0)


def test_the_reply_gets_the_vip_back_as_its_source(dp, bpfnet, services):
    run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP, sport=40001)), bpfnet.cali_a.ifindex)
    reply = Ether(src=bpfnet.pod_b_mac, dst=bpfnet.cali_b.mac) / IP(src=POD_B, dst=POD_A) \
        / TCP(sport=8080, dport=40001, flags="SA", seq=5, ack=1001) / b"200 OK"
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(reply), bpfnet.cali_b.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_a.ifindex
    out = Ether(r.out)
    assert (out[IP].src, out[TCP].sport) == (VIP, 80)
    assert (out[IP].dst, out[TCP].dport) == (POD_A, 40001)
    assert_checksums_valid(r.out)


def test_a_reply_delivered_by_the_stack_is_restored_on_the_pods_veth(dp, bpfnet, services):
    # a remote backend's reply that took the host stack reaches fp_to_pod
    run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP_TWO, sport=40002)),
             bpfnet.cali_a.ifindex)
    fwd = {(c.saddr, c.sport): c for c in services.conntrack() if c.direction == "forward"}
    be_ip, be_port = fwd[(POD_A, 40002)].nat_addr, fwd[(POD_A, 40002)].nat_port
    reply = Ether(dst=bpfnet.pod_a_mac, src=bpfnet.cali_a.mac) / IP(src=be_ip, dst=POD_A) \
        / TCP(sport=be_port, dport=40002, flags="SA")
    r = run_prog(dp, bpfnet.ns, "fp_to_pod", bytes(reply), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_UNSPEC
    out = Ether(r.out)
    assert (out[IP].src, out[TCP].sport) == (VIP_TWO, 80)
    assert_checksums_valid(r.out)


def test_later_packets_of_a_flow_stay_on_the_same_backend(dp, bpfnet, services):
    chosen = set()
    for _ in range(10):
        r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP_TWO, sport=41000)),
                     bpfnet.cali_a.ifindex)
        chosen.add(Ether(r.out)[IP].dst)
    assert len(chosen) == 1


def test_new_flows_spread_over_backends_without_affinity(dp, bpfnet, services):
    picks = Counter()
    for sport in range(42000, 42040):
        r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP_TWO, sport=sport)),
                     bpfnet.cali_a.ifindex)
        picks[Ether(r.out)[IP].dst] += 1
    assert set(picks) == {POD_B, REMOTE}, picks


def test_client_ip_affinity_keeps_every_new_flow_on_one_backend(dp, bpfnet, services):
    picks = set()
    for sport in range(43000, 43030):
        r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP_AFF, sport=sport)),
                     bpfnet.cali_a.ifindex)
        picks.add(Ether(r.out)[IP].dst)
    assert len(picks) == 1, picks


def test_udp_is_translated_with_a_valid_checksum_and_zero_stays_zero(dp, bpfnet, services):
    q = Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / IP(src=POD_A, dst=VIP) \
        / UDP(sport=33333, dport=53) / b"dns-query"
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(q), bpfnet.cali_a.ifindex)
    out = Ether(r.out)
    assert (out[IP].dst, out[UDP].dport) == (POD_B, 5353)
    assert_checksums_valid(r.out)
    raw = bytearray(bytes(Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac)
                          / IP(src=POD_A, dst=VIP) / UDP(sport=33334, dport=53) / b"x"))
    raw[14 + 20 + 6: 14 + 20 + 8] = b"\x00\x00"     # "no checksum"
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(raw), bpfnet.cali_a.ifindex)
    assert Ether(r.out)[UDP].chksum == 0


def test_a_service_without_backends_answers_icmp_port_unreachable_from_the_vip(dp, bpfnet, services):
    sent = syn(bpfnet, VIP_EMPTY, sport=45000)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(sent), bpfnet.cali_a.ifindex)
    assert r.reason == "dropped-service-no-backend"
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_kind == "redirect-peer"
    assert r.redirect_ifindex == bpfnet.cali_a.ifindex, "the error goes back into the client's netns"
    out = Ether(r.out)
    assert (out.dst, out.src) == (bpfnet.pod_a_mac, bpfnet.cali_a.mac)
    assert (out[IP].src, out[IP].dst, out[IP].proto) == (VIP_EMPTY, POD_A, 1)
    icmp = out[ICMP]
    assert (icmp.type, icmp.code) == (3, 3)
    quoted = IPerror(bytes(icmp.payload))
    assert (quoted.src, quoted.dst) == (POD_A, VIP_EMPTY)
    assert bytes(icmp.payload)[20:24] == bytes(sent[TCP])[:4], "the original ports are quoted"
    fresh = Ether(r.out)
    del fresh[IP].chksum
    del fresh[ICMP].chksum
    fresh = Ether(bytes(fresh))
    assert (fresh[IP].chksum, fresh[ICMP].chksum) == (out[IP].chksum, icmp.chksum)


def test_a_flow_whose_backend_was_removed_moves_to_a_remaining_backend(dp, bpfnet, services):
    lb = services
    lb.put_backend(4, POD_B, 9090, "TCP")
    lb.put_backend(5, REMOTE, 9090, "TCP")
    lb.put_slots(20, [4, 5])
    lb.put_service("192.168.50.20", 80, "TCP", 20, 2)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, "192.168.50.20", sport=44000)),
                 bpfnet.cali_a.ifindex)
    first = Ether(r.out)[IP].dst
    gone, stays = (4, 5) if first == POD_B else (5, 4)
    # the agent's order on removal: shrink the service, then slots, then the backend
    lb.put_slots(20, [stays])
    lb.put_service("192.168.50.20", 80, "TCP", 20, 1)
    lb.delete_slots(20, 2, 2)
    lb.delete_backend(gone)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, "192.168.50.20", sport=44000)),
                 bpfnet.cali_a.ifindex)
    assert Ether(r.out)[IP].dst != first
    lb.delete_service("192.168.50.20", 80, "TCP")


def test_traffic_to_a_non_service_port_of_a_vip_is_not_translated(dp, bpfnet, services):
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP, dport=81)), bpfnet.cali_a.ifindex)
    assert Ether(r.out)[IP].dst == VIP


def test_a_pod_reaching_itself_through_its_service_is_hairpinned_via_the_router_address(
        dp, bpfnet, services):
    router = dp.config.local_router_ipv4
    lb = services
    lb.put_backend(6, POD_A, 8080, "TCP")
    lb.put_slots(30, [6])
    lb.put_service("192.168.50.30", 80, "TCP", 30, 1)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, "192.168.50.30", sport=46000)),
                 bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_a.ifindex
    out = Ether(r.out)
    # a pod drops packets whose source is its own address: the router's stands in
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (router, 46000, POD_A, 8080)
    assert_checksums_valid(r.out)
    reply = Ether(src=bpfnet.pod_a_mac, dst=bpfnet.cali_a.mac) / IP(src=POD_A, dst=router) \
        / TCP(sport=8080, dport=46000, flags="SA")
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(reply), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_a.ifindex
    out = Ether(r.out)
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (
        "192.168.50.30", 80, POD_A, 46000)
    assert_checksums_valid(r.out)
    lb.delete_service("192.168.50.30", 80, "TCP")


def test_a_direct_connection_reusing_a_translated_flows_tuple_is_not_hijacked(dp, bpfnet, services):
    """The old flow's reply entry must not turn the new flow's SYN-ACK into a
    packet "from the VIP": the direct SYN retires it."""
    run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP, sport=47000)), bpfnet.cali_a.ifindex)
    assert any(c.direction == "reply" and c.dport == 47000 for c in services.conntrack())
    run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, POD_B, dport=8080, sport=47000)),
             bpfnet.cali_a.ifindex)
    assert not any(c.direction == "reply" and c.dport == 47000 for c in services.conntrack())
    synack = Ether(src=bpfnet.pod_b_mac, dst=bpfnet.cali_b.mac) / IP(src=POD_B, dst=POD_A) \
        / TCP(sport=8080, dport=47000, flags="SA")
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(synack), bpfnet.cali_b.ifindex)
    assert (Ether(r.out)[IP].src, Ether(r.out)[TCP].sport) == (POD_B, 8080)


# ---------------------------------------------------------------- SCTP
# No SCTP module in the test kernel: SCTP is proven with test-run packets,
# each rewritten packet's CRC32c recomputed by scapy.

VIP_SCTP = "192.168.50.40"


@pytest.fixture(scope="module")
def sctp_services(dp, services):
    # port 3868 -> targetPort 3869; 2905 -> 2905: only the address changes
    backends = {40: (POD_B, 3869, "SCTP"), 41: (POD_B, 2905, "SCTP")}
    with frontends(services, backends, [(VIP_SCTP, 3868, "SCTP", 40, [40]),
                                        (VIP_SCTP, 2905, "SCTP", 41, [41])]) as lb:
        yield lb


def sctp_packet(src, dst, sport, dport, data: bytes | None, mac_src, mac_dst):
    from scapy.layers.sctp import SCTP, SCTPChunkData, SCTPChunkInit
    chunk = SCTPChunkInit(init_tag=0x1234, a_rwnd=65535, n_out_streams=1, n_in_streams=1,
                          init_tsn=1) if data is None else SCTPChunkData(tsn=7, data=data)
    return Ether(src=mac_src, dst=mac_dst) / IP(src=src, dst=dst) \
        / SCTP(sport=sport, dport=dport, tag=0 if data is None else 0x1234) / chunk


def sctp_open(dp, net, sport, dport):
    """The association's INIT: only it may pick a backend (a DATA chunk of
    an association conntrack does not know is dropped)."""
    init = sctp_packet(POD_A, VIP_SCTP, sport, dport, None, net.pod_a_mac, net.cali_a.mac)
    r = run_prog(dp, net.ns, "fp_from_pod", bytes(init), net.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT, r.reason


def assert_sctp_checksums_valid(out: bytes):
    from scapy.layers.sctp import SCTP
    pkt = Ether(out)
    fresh = Ether(out)
    del fresh[IP].chksum
    del fresh[SCTP].chksum
    fresh = Ether(bytes(fresh))
    assert fresh[IP].chksum == pkt[IP].chksum, "IPv4 header checksum"
    assert fresh[SCTP].chksum == pkt[SCTP].chksum, "SCTP CRC32c"


@pytest.mark.parametrize("data", [None, b"", b"x", b"abcdefg", bytes(range(256)) * 4, b"y" * 1400])
def test_sctp_is_translated_with_a_valid_crc32c_when_the_port_changes(
        dp, bpfnet, sctp_services, data):
    from scapy.layers.sctp import SCTP
    sport = 50000 + (len(data) if data is not None else 1999)
    if data is not None:
        sctp_open(dp, bpfnet, sport, 3868)
    pkt = sctp_packet(POD_A, VIP_SCTP, sport, 3868, data, bpfnet.pod_a_mac, bpfnet.cali_a.mac)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(pkt), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_b.ifindex
    out = Ether(r.out)
    assert (out[IP].dst, out[SCTP].dport, out[IP].src, out[SCTP].sport) == (
        POD_B, 3869, POD_A, sport)
    assert bytes(out[SCTP].payload) == bytes(pkt[SCTP].payload)
    assert_sctp_checksums_valid(r.out)
    # the backend's answer gets the VIP and the Service port back
    reply = sctp_packet(POD_B, POD_A, 3869, sport, data, bpfnet.pod_b_mac, bpfnet.cali_b.mac)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(reply), bpfnet.cali_b.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.redirect_ifindex == bpfnet.cali_a.ifindex
    out = Ether(r.out)
    assert (out[IP].src, out[SCTP].sport, out[IP].dst, out[SCTP].dport) == (
        VIP_SCTP, 3868, POD_A, sport)
    assert_sctp_checksums_valid(r.out)


def test_sctp_to_the_same_port_changes_only_the_address_and_keeps_the_crc(
        dp, bpfnet, sctp_services):
    from scapy.layers.sctp import SCTP
    sctp_open(dp, bpfnet, 51000, 2905)
    pkt = Ether(bytes(sctp_packet(POD_A, VIP_SCTP, 51000, 2905, b"m3ua", bpfnet.pod_a_mac,
                                  bpfnet.cali_a.mac)))
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(pkt), bpfnet.cali_a.ifindex)
    out = Ether(r.out)
    assert (out[IP].dst, out[SCTP].dport) == (POD_B, 2905)
    # CRC32c covers no pseudo-header: the address change leaves it as it was
    assert out[SCTP].chksum == pkt[SCTP].chksum
    assert_sctp_checksums_valid(r.out)


def test_sctp_with_its_crc_left_to_offload_keeps_a_zero_checksum(dp, bpfnet, sctp_services):
    from scapy.layers.sctp import SCTP
    sctp_open(dp, bpfnet, 52000, 3868)
    raw = bytearray(bytes(sctp_packet(POD_A, VIP_SCTP, 52000, 3868, b"q", bpfnet.pod_a_mac,
                                      bpfnet.cali_a.mac)))
    raw[14 + 20 + 8: 14 + 20 + 12] = bytes(4)     # CHECKSUM_PARTIAL: computed later
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(raw), bpfnet.cali_a.ifindex)
    out = Ether(r.out)
    assert (out[IP].dst, out[SCTP].dport) == (POD_B, 3869)
    assert out[SCTP].chksum == 0


def test_sctp_counts_in_conntrack_like_tcp_and_udp(dp, bpfnet, sctp_services):
    sctp_open(dp, bpfnet, 53000, 3868)
    pkt = sctp_packet(POD_A, VIP_SCTP, 53000, 3868, b"z", bpfnet.pod_a_mac, bpfnet.cali_a.mac)
    run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(pkt), bpfnet.cali_a.ifindex)
    ct = {(c.direction, c.proto, c.sport): c for c in sctp_services.conntrack()}
    assert (ct[("forward", "SCTP", 53000)].nat_addr, ct[("forward", "SCTP", 53000)].nat_port) == (
        POD_B, 3869)
    assert ct[("reply", "SCTP", 3869)].nat_port == 3868


# ------------------------------------------------ conntrack upkeep on removal

def test_removing_backends_deletes_their_datagram_flows_and_keeps_their_connections(dp, services):
    """Both directions of every UDP flow of the removed backends go at once;
    their TCP flows stay (they go on to the backend until it closes them);
    nothing else is touched. Entries written straight into both maps of
    translated flows, 40,000 of them, so the batched walk crosses several
    batches."""
    from agent.conntrack.purge import purge_backends
    from agent.daemon.conntrack_gc import ConntrackPurger
    from agent.model import conntrack as M
    ct = dp.lb.ct
    dp.lb.conntrack_flush()
    n = 40000
    for table in ("established", "new"):
        t = ct.tables[table]
        keys = (t.Key * (n // 2))()
        vals = (t.Leaf * (n // 2))()
        for j in range(n // 2):
            i = j if table == "established" else n // 2 + j
            keys[j].saddr, keys[j].sport, keys[j].proto = 0x0A000000 + i, i & 0xFFFF, 6 if i % 2 else 17
            keys[j].dir = i % 2
            vals[j].backend_id = i % 50
            vals[j].svc_id = 1
            vals[j].state = M.ESTABLISHED
        t.items_update_batch(keys, vals)
    assert len(dp.lb.conntrack()) == n
    gone = {7, 11, 49}
    # i % 50 in gone and UDP (i even): 3 of 50 ids, half of each's entries
    want = sum(1 for i in range(n) if i % 50 in gone and i % 2 == 0)
    assert purge_backends(ct, gone) == want
    left = dp.lb.conntrack()
    assert len(left) == n - want
    assert not any(r.backend_id in gone and r.proto == "UDP" for r in left)
    assert {r.backend_id for r in left if r.proto == "TCP"} >= gone, "connections stay"
    assert {r.backend_id for r in left} == set(range(50))
    assert purge_backends(ct, [7]) == 0                  # nothing left to delete
    assert purge_backends(ct, []) == 0
    # the agent's purger: removals that arrive together, one pass, off the plan's path
    purger = ConntrackPurger(ct)
    try:
        purger.add([1])
        purger.add([2, 3])
        assert purger.wait_idle(10)
        assert purger.purged == sum(1 for i in range(n) if i % 50 in (1, 2, 3) and i % 2 == 0)
        assert not any(r.backend_id in (1, 2, 3) and r.proto == "UDP" for r in dp.lb.conntrack())
    finally:
        purger.stop()
    dp.lb.conntrack_flush()


def test_a_translated_connection_after_a_direct_one_on_its_tuple_gets_its_reply_entry_back(
        dp, bpfnet, services):
    """translated, then direct (which retires the reply entry), then translated
    again on the same 4-tuple: the new SYN finds the old forward entry and
    must write the reply entry again, or its SYN-ACK arrives from the
    backend's address and the connection hangs."""
    run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP, sport=47100)), bpfnet.cali_a.ifindex)
    run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, POD_B, dport=8080, sport=47100)),
             bpfnet.cali_a.ifindex)
    assert not any(c.direction == "reply" and c.dport == 47100 for c in services.conntrack())
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP, sport=47100)),
                 bpfnet.cali_a.ifindex)
    assert (Ether(r.out)[IP].dst, Ether(r.out)[TCP].dport) == (POD_B, 8080)
    synack = Ether(src=bpfnet.pod_b_mac, dst=bpfnet.cali_b.mac) / IP(src=POD_B, dst=POD_A) \
        / TCP(sport=8080, dport=47100, flags="SA")
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(synack), bpfnet.cali_b.ifindex)
    out = Ether(r.out)
    assert (out[IP].src, out[TCP].sport) == (VIP, 80)
    assert_checksums_valid(r.out)
    # a later packet of the connection (not a SYN) rewrites nothing more
    ack = syn(bpfnet, VIP, sport=47100)
    ack[TCP].flags = "A"
    before = [c for c in services.conntrack() if c.dport == 47100 or c.sport == 47100]
    run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(ack), bpfnet.cali_a.ifindex)
    after = [c for c in services.conntrack() if c.dport == 47100 or c.sport == 47100]
    assert len(after) == len(before) == 2


def test_a_batched_plan_writes_what_one_write_per_op_writes(dp):
    """apply_ops turns runs of backend, slot and service writes into batched
    map updates; the maps end up exactly as the plan says, op by op."""
    from agent.lb.compile import Backend, Frontend, FrontendState
    from agent.daemon.services import apply_ops, restore_reconciler
    lb = dp.lb
    rec = restore_reconciler(lb)          # owns what other tests left in the maps
    apply_ops(lb, rec.plan_changes({}))   # ... and drops what nothing uses
    before = (lb.services(), lb.all_slots(), lb.backends())
    desired = {Frontend(f"192.168.70.{i}", 80, "TCP"): FrontendState(
        ("shop", f"s{i}"), "http",
        tuple(Backend(f"10.70.{i}.{j}", 8080, "TCP") for j in range(1, 1 + i % 4)),
        reject=i % 4 == 0)
        for i in range(1, 200)}
    ops = rec.plan_changes(desired)
    assert len(ops) > 3 * 150
    try:
        assert apply_ops(lb, ops) == []
        svcs = {(s["vip"], s["port"], s["proto"]): s for s in lb.services()}
        slots, bes = lb.all_slots(), lb.backends()
        for fe, st in desired.items():
            s = svcs[(fe.ip, fe.port, fe.protocol)]
            assert s["count"] == len(st.backends)
            got = [bes[slots[(s["svc_id"], k)]] for k in range(1, s["count"] + 1)]
            assert sorted(got) == sorted((b.ip, b.port, b.protocol) for b in st.backends)
    finally:
        apply_ops(lb, rec.plan_changes({fe: None for fe in desired}))
    assert (lb.services(), lb.all_slots(), lb.backends()) == before


def test_an_affinity_stamped_ahead_of_the_packet_clock_is_honoured(dp, bpfnet, services):
    """Socket-LB stamps affinity with the precise clock, the tc programs read
    the tick-granular one, which can stand behind it: such an entry is fresh,
    not billions of years old. Each trial names the other backend, so a
    picker that took the entry as expired (and chose at random) fails one in
    two; ten trials."""
    import time
    from agent.datapath.maps import be32
    aff = services._aff
    for i, (backend_id, want) in enumerate([(1, POD_B), (3, REMOTE)] * 5):
        ahead = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 5 * 10**9
        aff[aff.Key(svc_id=12, client=be32(POD_A))] = aff.Leaf(last_seen=ahead,
                                                               backend_id=backend_id)
        r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(syn(bpfnet, VIP_AFF, sport=44000 + i)),
                     bpfnet.cali_a.ifindex)
        assert Ether(r.out)[IP].dst == want, f"trial {i}"
    aff.clear()
