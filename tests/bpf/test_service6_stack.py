"""IPv6 replies of translated flows that reach their client through the
node's stack (fp_to_pod6, by tail call from fp_to_pod), and the policy
verdict of the fragments after the first of a reply restored for a local
client; run with BPF_PROG_TEST_RUN.

A backend that is the node itself (a host-network pod, or the node's own
server) answers through the stack: its reply leaves the node by the
client's veth, where fp_to_pod6 must put the ClusterIP back, as fp_to_pod
does for IPv4. With NetworkPolicy on, the later fragments of a restored
reply must get the verdict their first fragment got, as IPv4's do.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import replace

import pytest
from scapy.layers.inet6 import (ICMPv6DestUnreach, IPerror6, IPv6, IPv6ExtHdrFragment, TCP,
                                UDP, UDPerror, defragment6, fragment6)
from scapy.layers.l2 import Ether

from agent.datapath.maps import DEFS
from agent.policy import compile_policy, diff
from tests.bpf.conftest import (ENI_IP, ENI_IP6, POD_A, POD_A6, POD_B, POD_B6, TC_ACT_REDIRECT,
                                TC_ACT_SHOT, TC_ACT_UNSPEC, frontends, run_prog)
from tests.bpf.test_conntrack6 import assert_l4_checksum_valid
from tests.bpf.test_ipv6 import dual  # noqa: F401  (the dual-stack pods fixture)
from tests.policy.kube import namespace, netpol, pod, snapshot

VIP6_HOST = "fd00:16::50"       # backends: the node's own address (host network)
VIP6_POD = "fd00:16::51"        # backend: pod B
CLUSTER_IP = DEFS.defines["FP_SVCNET_F_CLUSTER_IP"]
PAYLOAD = bytes(range(256)) * 11 + b"tail"          # 2,820 bytes: three fragments

_sport = itertools.count(49000)


@pytest.fixture(scope="module")
def svc(dp, dual):  # noqa: F811
    backends = {91: (ENI_IP6, 8080, "TCP"), 92: (ENI_IP6, 5353, "UDP"),
                93: (POD_B6, 5353, "UDP")}
    with frontends(dp.lb, backends, [(VIP6_HOST, 80, "TCP", 90, [91]),
                                     (VIP6_HOST, 53, "UDP", 94, [92]),
                                     (VIP6_POD, 53, "UDP", 95, [93])], flush=True) as lb:
        for vip in (VIP6_HOST, VIP6_POD):
            lb.svcnet_put(f"{vip}/128", CLUSTER_IP)
        try:
            yield lb
        finally:
            for vip in (VIP6_HOST, VIP6_POD):
                lb.svcnet_delete(f"{vip}/128")
            for bid in backends:
                lb.delete_backend(bid)


def dual_pod(ns, name, v4, v6, **kw):
    return replace(pod(ns, name, v4, **kw), ips=(v4, v6))


@contextlib.contextmanager
def a_isolated(dp):
    """NetworkPolicy on, pod A's ingress denied (only replies of its own
    flows come in), as the agent writes it."""
    snap = snapshot([
        namespace("x", ns="x"),
        dual_pod("x", "a", POD_A, POD_A6, labels={"app": "a"}),
        dual_pod("x", "b", POD_B, POD_B6, labels={"app": "b"}),
        netpol("x", "a-in", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": []})])
    state = compile_policy(snap, "n1", [ENI_IP, ENI_IP6], "default", set())
    for op in diff(dp.policy.image(), state):
        dp.policy.apply(op)
    dp.settings.set_policy(True)
    try:
        yield state
    finally:
        dp.settings.set_policy(False)
        dp.policy.clear()


def from_a(n, dst, l4):
    return Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IPv6(src=POD_A6, dst=dst) / l4


def node_to_a(n, src, l4):
    """What the node's stack sends pod A through A's veth."""
    return Ether(src=n.cali_a.mac, dst=n.pod_a_mac) / IPv6(src=src, dst=POD_A6, hlim=64) / l4


def run(dp, n, prog, pkt, dev):
    return run_prog(dp, n.ns, prog, bytes(pkt), getattr(n, dev).ifindex)


def ct6(lb):
    return {(c.direction, c.saddr, c.sport, c.daddr, c.dport): c for c in lb.conntrack()
            if c.table in ("established6", "new6")}


def counter(dp, reason):
    return sum(c.packets for c in dp.maps.counters(by_family=True)
               if c.reason == reason and c.family == "ipv6" and c.direction == "to-pod")


def test_a_host_backends_reply_through_the_stack_gets_the_clusterip_back(dp, bpfnet, svc):
    n = bpfnet
    sport = next(_sport)
    r = run(dp, n, "fp_from_pod", from_a(n, VIP6_HOST, TCP(sport=sport, dport=80, flags="S")),
            "cali_a")
    o = Ether(r.out)
    assert (o[IPv6].dst, o[TCP].dport) == (ENI_IP6, 8080), "translated to the node"
    assert r.verdict != TC_ACT_SHOT, r.reason
    before = counter(dp, "service-reply-restored")
    synack = node_to_a(n, ENI_IP6, TCP(sport=8080, dport=sport, flags="SA"))
    r = run(dp, n, "fp_to_pod", synack, "cali_a")
    assert r.verdict == TC_ACT_UNSPEC, r.reason
    o = Ether(r.out)
    assert (o[IPv6].src, o[TCP].sport, o[IPv6].dst, o[TCP].dport) == (VIP6_HOST, 80, POD_A6,
                                                                      sport)
    assert_l4_checksum_valid(r.out)
    assert ct6(svc)[("forward", POD_A6, sport, VIP6_HOST, 80)].state == "syn-recv"
    assert counter(dp, "service-reply-restored") == before + 1


def test_a_packet_of_no_translated_flow_goes_to_the_pod_unchanged(dp, bpfnet, svc):
    n = bpfnet
    pkt = node_to_a(n, ENI_IP6, TCP(sport=8080, dport=next(_sport), flags="SA"))
    r = run(dp, n, "fp_to_pod", pkt, "cali_a")
    assert r.verdict == TC_ACT_UNSPEC
    assert r.out == bytes(pkt)


def test_a_udp_reply_and_an_error_about_the_clients_datagram_are_restored(dp, bpfnet, svc):
    n = bpfnet
    sport = next(_sport)
    r = run(dp, n, "fp_from_pod", from_a(n, VIP6_HOST, UDP(sport=sport, dport=53) / b"q"),
            "cali_a")
    got = IPv6(bytes(Ether(r.out)[IPv6]))             # what the node received
    assert (got.dst, got[UDP].dport) == (ENI_IP6, 5353)
    r = run(dp, n, "fp_to_pod", node_to_a(n, ENI_IP6, UDP(sport=5353, dport=sport) / b"a"),
            "cali_a")
    o = Ether(r.out)
    assert (o[IPv6].src, o[UDP].sport, o[IPv6].dst) == (VIP6_HOST, 53, POD_A6)
    assert_l4_checksum_valid(r.out)

    before = counter(dp, "related-icmp-restored")
    err = node_to_a(n, ENI_IP6, ICMPv6DestUnreach(code=4) / got)
    r = run(dp, n, "fp_to_pod", err, "cali_a")
    assert r.verdict == TC_ACT_UNSPEC
    o = Ether(r.out)
    assert (o[IPv6].src, o[IPv6].dst) == (VIP6_HOST, POD_A6)
    q = o[IPerror6]
    assert (q.src, q.dst, q[UDPerror].sport, q[UDPerror].dport) == (POD_A6, VIP6_HOST, sport, 53)
    cksum = o[ICMPv6DestUnreach].cksum
    again = o.copy()
    del again[ICMPv6DestUnreach].cksum
    assert Ether(bytes(again))[ICMPv6DestUnreach].cksum == cksum, "ICMPv6 checksum"
    assert counter(dp, "related-icmp-restored") == before + 1


def fragments(src, dst, l4, frag_id):
    return fragment6(IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=frag_id) / l4 / PAYLOAD,
                     1280)


def through(dp, n, prog, frags, dev, macs, want):
    """Each fragment through `prog`, each verdict `want`; the reassembled
    datagram of what came out."""
    outs = []
    for f in frags:
        r = run(dp, n, prog, Ether(src=macs[0], dst=macs[1]) / f, dev)
        assert r.verdict == want, (r.verdict, r.reason)
        outs.append(IPv6(bytes(Ether(r.out)[IPv6])))
    return defragment6(outs)


@pytest.mark.parametrize("policy", [False, True], ids=["policy-off", "a-isolated"])
def test_a_host_backends_fragmented_reply_is_restored_and_judged_whole(dp, bpfnet, svc, policy):
    n = bpfnet
    with a_isolated(dp) if policy else contextlib.nullcontext():
        sport = next(_sport)
        run(dp, n, "fp_from_pod", from_a(n, VIP6_HOST, UDP(sport=sport, dport=53)), "cali_a")
        back = fragments(ENI_IP6, POD_A6, UDP(sport=5353, dport=sport), 0x6d0001 + policy)
        assert len(back) == 3
        d = through(dp, n, "fp_to_pod", back, "cali_a", (n.cali_a.mac, n.pod_a_mac),
                    TC_ACT_UNSPEC)
        assert (d.src, d[UDP].sport, d.dst, d[UDP].dport) == (VIP6_HOST, 53, POD_A6, sport)
        assert bytes(d[UDP].payload) == PAYLOAD
        again = IPv6(bytes(d))
        del again[UDP].chksum
        assert IPv6(bytes(again))[UDP].chksum == d[UDP].chksum


def test_a_local_backends_fragmented_reply_passes_policy_whole(dp, bpfnet, svc):
    """The first fragment is judged as the backend sent it (a reply of A's
    admitted flow), then restored to come from the VIP; the fragments
    after it reach the policy stage restored and must get its verdict."""
    n = bpfnet
    with a_isolated(dp):
        sport = next(_sport)
        r = run(dp, n, "fp_from_pod", from_a(n, VIP6_POD, UDP(sport=sport, dport=53)), "cali_a")
        assert (r.verdict, Ether(r.out)[IPv6].dst) == (TC_ACT_REDIRECT, POD_B6)
        back = fragments(POD_B6, POD_A6, UDP(sport=5353, dport=sport), 0x6d0011)
        d = through(dp, n, "fp_from_pod", back, "cali_b", (n.pod_b_mac, n.cali_b.mac),
                    TC_ACT_REDIRECT)
        assert (d.src, d[UDP].sport, d.dst, d[UDP].dport) == (VIP6_POD, 53, POD_A6, sport)
        assert bytes(d[UDP].payload) == PAYLOAD

        # the isolation is real: B's own datagram to A is denied, every fragment
        own = fragments(POD_B6, POD_A6, UDP(sport=next(_sport), dport=7), 0x6d0012)
        for f in own:
            r = run(dp, n, "fp_from_pod", Ether(src=n.pod_b_mac, dst=n.cali_b.mac) / f, "cali_b")
            assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-policy-denied")
