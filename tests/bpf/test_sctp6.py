"""SCTP to an IPv6 ClusterIP per packet: fp_from_pod6 / fp_pod6_route (by
tail call from fp_from_pod) and fp_from_vpc6, run with BPF_PROG_TEST_RUN.

The kernel these tests run on has no SCTP module, so SCTP is proven with
test-run packets, as IPv4's is (tests/bpf/test_lb.py): every rewritten
packet's CRC32c is recomputed by scapy and compared with the program's.
SCTP's CRC covers no pseudo-header, so only a port change touches it.
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP, SCTPChunkData, SCTPChunkInit

from agent.datapath.maps import DEFS
from tests.bpf.conftest import (GW_MAC, POD_A6, POD_B6, REMOTE6, TC_ACT_REDIRECT, TC_ACT_SHOT,
                                frontends, run_prog)
from tests.bpf.test_ipv6 import dual  # noqa: F401  (the dual-stack pods fixture)

VIP6_SCTP = "fd00:16::40"
CLUSTER_IP = DEFS.defines["FP_SVCNET_F_CLUSTER_IP"]

_sport = itertools.count(47000)


@pytest.fixture(scope="module")
def sctp6(dp, dual):  # noqa: F811
    # 3868 -> targetPort 3869 (the port and the CRC change); 2905 -> 2905
    # (only the address); 2906 -> a backend on another node
    backends = {81: (POD_B6, 3869, "SCTP"), 82: (POD_B6, 2905, "SCTP"),
                83: (REMOTE6, 2906, "SCTP")}
    with frontends(dp.lb, backends, [(VIP6_SCTP, 3868, "SCTP", 80, [81]),
                                     (VIP6_SCTP, 2905, "SCTP", 84, [82]),
                                     (VIP6_SCTP, 2906, "SCTP", 85, [83])], flush=True) as lb:
        lb.svcnet_put(f"{VIP6_SCTP}/128", CLUSTER_IP)
        try:
            yield lb
        finally:
            lb.svcnet_delete(f"{VIP6_SCTP}/128")
            for bid in backends:
                lb.delete_backend(bid)


def sctp6_packet(src, dst, sport, dport, data, mac_src, mac_dst):
    """An INIT when `data` is None, else a DATA chunk of an association."""
    chunk = SCTPChunkInit(init_tag=0x1234, a_rwnd=65535, n_out_streams=1, n_in_streams=1,
                          init_tsn=1) if data is None else SCTPChunkData(tsn=7, data=data)
    return Ether(src=mac_src, dst=mac_dst) / IPv6(src=src, dst=dst) \
        / SCTP(sport=sport, dport=dport, tag=0 if data is None else 0x1234) / chunk


def from_a(n, dst, sport, dport, data=None):
    return sctp6_packet(POD_A6, dst, sport, dport, data, n.pod_a_mac, n.cali_a.mac)


def run(dp, n, prog, pkt, dev):
    return run_prog(dp, n.ns, prog, bytes(pkt), getattr(n, dev).ifindex)


def assert_crc_valid(out: bytes):
    """The CRC32c the program left is scapy's over the packet as it is."""
    pkt = Ether(out)
    fresh = Ether(out)
    del fresh[SCTP].chksum
    assert Ether(bytes(fresh))[SCTP].chksum == pkt[SCTP].chksum, "SCTP CRC32c"


def ct6(lb):
    return {(c.direction, c.saddr, c.sport, c.daddr, c.dport): c for c in lb.conntrack()
            if c.table in ("established6", "new6")}


def test_an_sctp_init_to_an_ipv6_clusterip_is_translated_and_tracked(dp, bpfnet, sctp6):
    n = bpfnet
    sport = next(_sport)
    init = from_a(n, VIP6_SCTP, sport, 3868)
    r = run(dp, n, "fp_from_pod", init, "cali_a")
    assert (r.verdict, r.reason, r.redirect_ifindex) == (TC_ACT_REDIRECT, "redirected-local",
                                                         n.cali_b.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[SCTP].sport, o[IPv6].dst, o[SCTP].dport) == (POD_A6, sport, POD_B6,
                                                                        3869)
    assert bytes(o[SCTP].payload) == bytes(Ether(bytes(init))[SCTP].payload)
    assert o[SCTP].chksum != Ether(bytes(init))[SCTP].chksum, "the port change moved the CRC"
    assert_crc_valid(r.out)
    ct = ct6(sctp6)
    fwd = ct[("forward", POD_A6, sport, VIP6_SCTP, 3868)]
    rev = ct[("reply", POD_B6, 3869, POD_A6, sport)]
    assert (fwd.proto, fwd.nat_addr, fwd.nat_port, fwd.backend_id) == ("SCTP", POD_B6, 3869, 81)
    assert (rev.nat_addr, rev.nat_port) == (VIP6_SCTP, 3868)

    # the INIT ACK of the local backend gets the VIP and the Service port back
    ack = sctp6_packet(POD_B6, POD_A6, 3869, sport, b"", n.pod_b_mac, n.cali_b.mac)
    r = run(dp, n, "fp_from_pod", ack, "cali_b")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[SCTP].sport, o[IPv6].dst, o[SCTP].dport) == (VIP6_SCTP, 3868,
                                                                        POD_A6, sport)
    assert_crc_valid(r.out)
    assert ct6(sctp6)[("forward", POD_A6, sport, VIP6_SCTP, 3868)].state == "established"


@pytest.mark.parametrize("data", [b"", b"x", b"abcdefg", bytes(range(256)) * 4, b"y" * 1400])
def test_sctp_data_both_ways_keeps_a_valid_crc32c(dp, bpfnet, sctp6, data):
    n = bpfnet
    sport = next(_sport)
    run(dp, n, "fp_from_pod", from_a(n, VIP6_SCTP, sport, 3868), "cali_a")
    sent = from_a(n, VIP6_SCTP, sport, 3868, data)
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_b.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].dst, o[SCTP].dport) == (POD_B6, 3869)
    assert bytes(o[SCTP].payload) == bytes(Ether(bytes(sent))[SCTP].payload)
    assert_crc_valid(r.out)
    back = sctp6_packet(POD_B6, POD_A6, 3869, sport, data, n.pod_b_mac, n.cali_b.mac)
    r = run(dp, n, "fp_from_pod", back, "cali_b")
    o = Ether(r.out)
    assert (o[IPv6].src, o[SCTP].sport) == (VIP6_SCTP, 3868)
    assert_crc_valid(r.out)


def test_sctp_to_the_same_port_changes_only_the_address_and_keeps_the_crc(dp, bpfnet, sctp6):
    n = bpfnet
    sport = next(_sport)
    init = Ether(bytes(from_a(n, VIP6_SCTP, sport, 2905)))
    r = run(dp, n, "fp_from_pod", init, "cali_a")
    o = Ether(r.out)
    assert (o[IPv6].dst, o[SCTP].dport) == (POD_B6, 2905)
    assert o[SCTP].chksum == init[SCTP].chksum
    assert_crc_valid(r.out)


def test_an_sctp_crc_left_to_offload_stays_zero(dp, bpfnet, sctp6):
    n = bpfnet
    sport = next(_sport)
    raw = bytearray(bytes(from_a(n, VIP6_SCTP, sport, 3868)))
    raw[14 + 40 + 8: 14 + 40 + 12] = bytes(4)      # CHECKSUM_PARTIAL: computed later
    r = run(dp, n, "fp_from_pod", bytes(raw), "cali_a")
    o = Ether(r.out)
    assert (o[IPv6].dst, o[SCTP].dport, o[SCTP].chksum) == (POD_B6, 3869, 0)


def test_sctp_data_of_an_unknown_association_is_dropped_not_balanced(dp, bpfnet, sctp6):
    n = bpfnet
    r = run(dp, n, "fp_from_pod", from_a(n, VIP6_SCTP, next(_sport), 3868, b"d"), "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-ct-no-backend")


def test_an_sctp_init_to_an_unknown_port_is_rejected(dp, bpfnet, sctp6):
    n = bpfnet
    sport = next(_sport)
    r = run(dp, n, "fp_from_pod", from_a(n, VIP6_SCTP, sport, 9999), "cali_a")
    assert r.reason == "dropped-service-unknown-port"
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[IPv6].dst) == (VIP6_SCTP, POD_A6)
    assert (o[ICMPv6DestUnreach].type, o[ICMPv6DestUnreach].code) == (1, 4)
    q = o[IPerror6]
    assert (q.src, q.dst, q.nh) == (POD_A6, VIP6_SCTP, 132)


def test_a_remote_backends_sctp_reply_is_restored_from_the_vpc(dp, bpfnet, sctp6):
    n = bpfnet
    sport = next(_sport)
    r = run(dp, n, "fp_from_pod", from_a(n, VIP6_SCTP, sport, 2906), "cali_a")
    assert (r.verdict, r.reason, r.redirect_ifindex) == (TC_ACT_REDIRECT, "redirected-eni",
                                                         n.eth1.ifindex)
    assert (Ether(r.out)[IPv6].dst, Ether(r.out)[SCTP].dport) == (REMOTE6, 2906)
    back = sctp6_packet(REMOTE6, POD_A6, 2906, sport, b"ok", GW_MAC, n.eth1.mac)
    r = run(dp, n, "fp_from_vpc", back, "eth1")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[SCTP].sport, o[IPv6].dst) == (VIP6_SCTP, 2906, POD_A6)
    assert_crc_valid(r.out)


def test_an_icmpv6_error_quoting_an_sctp_init_reaches_the_client_about_the_vip(
        dp, bpfnet, sctp6):
    n = bpfnet
    sport = next(_sport)
    sent = from_a(n, VIP6_SCTP, sport, 3868)
    r = run(dp, n, "fp_from_pod", sent, "cali_a")
    quoted = IPv6(bytes(Ether(r.out)[IPv6]))           # what the backend received
    err = Ether(src=n.pod_b_mac, dst=n.cali_b.mac) / IPv6(src=POD_B6, dst=POD_A6) \
        / ICMPv6DestUnreach(code=4) / quoted
    r = run(dp, n, "fp_from_pod", err, "cali_b")
    assert (r.verdict, r.redirect_ifindex) == (TC_ACT_REDIRECT, n.cali_a.ifindex)
    o = Ether(r.out)
    assert (o[IPv6].src, o[IPv6].dst) == (VIP6_SCTP, POD_A6)
    q = IPv6(bytes(o[IPerror6]))
    assert (q.src, q.dst, q[SCTP].sport, q[SCTP].dport) == (POD_A6, VIP6_SCTP, sport, 3868)
    got = o[ICMPv6DestUnreach].cksum
    again = o.copy()
    del again[ICMPv6DestUnreach].cksum
    assert Ether(bytes(again))[ICMPv6DestUnreach].cksum == got, "ICMPv6 checksum"
