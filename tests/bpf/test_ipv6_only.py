"""IPv6-only pods, per packet (BPF_PROG_TEST_RUN).

Pod A is registered IPv6 only (POD_A6, its endpoint key KEY_A, ENI eth1),
B dual stack: A's IPv6 is redirected as any pod's, its endpoint key is
known to the per-pod maps only and makes no IPv4 packet a pod's.
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import IP, TCP as TCP4, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, TCP
from scapy.layers.l2 import ARP, Ether

from agent.datapath.maps import MAP, Maps
from agent.model.endpoint import Endpoint, allocate_endpoint_key, is_endpoint_key
from tests.bpf.conftest import (GW_MAC, POD_A, POD_A6, POD_B, POD_B6, REMOTE, REMOTE6,
                                TC_ACT_REDIRECT, TC_ACT_SHOT, run_prog)

_sport = itertools.count(47000)
KEY_A = allocate_endpoint_key(())


@pytest.fixture(scope="module")
def only6(dp, bpfnet):
    """A IPv6 only, B dual stack; back to IPv4 only afterwards."""
    n = bpfnet
    a = Endpoint("", "caliA", n.cali_a.ifindex, n.cali_a.mac, n.pod_a_mac, "eth1",
                 n.eth1.ifindex, ip6=POD_A6, endpoint_key=KEY_A)
    b = Endpoint(POD_B, "caliB", n.cali_b.ifindex, n.cali_b.mac, n.pod_b_mac, "eth1",
                 n.eth1.ifindex, ip6=POD_B6)
    dp.maps.endpoint_delete(POD_A, n.cali_a.ifindex)
    dp.maps.endpoint_put(a)
    dp.maps.endpoint_put(b)
    try:
        yield a, b
    finally:
        dp.maps.endpoint_delete(KEY_A, n.cali_a.ifindex)
        for ip, dev, mac in ((POD_A, n.cali_a, n.pod_a_mac), (POD_B, n.cali_b, n.pod_b_mac)):
            dp.maps.endpoint_put(Endpoint(ip, dev.name, dev.ifindex, dev.mac, mac, "eth1",
                                          n.eth1.ifindex))
        assert dp.maps.endpoints6() == []


def run(dp, n, prog, pkt, dev):
    return run_prog(dp, n.ns, prog, bytes(pkt), getattr(n, dev).ifindex)


def from_a(n, dst, l4=None):
    return Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IPv6(src=POD_A6, dst=dst) / (
        l4 if l4 is not None else UDP(sport=next(_sport), dport=53) / b"q")


def test_the_key_is_loopback_and_never_a_pod_address():
    assert is_endpoint_key(KEY_A) and KEY_A.startswith("127.")
    assert not is_endpoint_key(POD_A)
    assert allocate_endpoint_key({KEY_A}) != KEY_A


def test_the_maps_know_the_pod_by_ipv6_and_its_key_by_its_veth(dp, bpfnet, only6):
    n = bpfnet
    assert KEY_A not in {e.ip for e in dp.maps.endpoints()}, "no IPv4 entry for the key"
    assert POD_A not in {e.ip for e in dp.maps.endpoints()}
    assert {e.ip: e.host_ifindex for e in dp.maps.endpoints6()}[POD_A6] == n.cali_a.ifindex
    assert dp.maps.veths()[n.cali_a.ifindex] == KEY_A
    assert dp.maps.veth_ip6(n.cali_a.ifindex) == POD_A6


@pytest.mark.parametrize("l4", ["udp", "tcp", "echo"])
def test_ipv6_only_pod_to_a_pod_on_the_node_and_back(dp, bpfnet, only6, l4):
    n = bpfnet
    mk = {"udp": lambda: UDP(sport=next(_sport), dport=53) / b"q",
          "tcp": lambda: TCP(sport=next(_sport), dport=80, flags="S"),
          "echo": lambda: ICMPv6EchoRequest(id=9) / b"p"}[l4]
    r = run(dp, n, "fp_from_pod", from_a(n, POD_B6, mk()), "cali_a")
    assert (r.verdict, r.reason, r.redirect_kind) == (TC_ACT_REDIRECT, "redirected-local",
                                                       "redirect-peer")
    assert r.redirect_ifindex == n.cali_b.ifindex
    back = Ether(src=n.pod_b_mac, dst=n.cali_b.mac) / IPv6(src=POD_B6, dst=POD_A6) / mk()
    r = run(dp, n, "fp_from_pod", back, "cali_b")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert r.redirect_ifindex == n.cali_a.ifindex
    assert Ether(r.out).dst == n.pod_a_mac


def test_ipv6_only_pod_to_the_vpc_and_back(dp, bpfnet, only6):
    n = bpfnet
    r = run(dp, n, "fp_from_pod", from_a(n, REMOTE6), "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-eni")
    assert r.redirect_ifindex == n.eth1.ifindex
    assert Ether(r.out).dst == GW_MAC
    sent = Ether(src=GW_MAC, dst=n.eth1.mac) / IPv6(src=REMOTE6, dst=POD_A6) / TCP(
        sport=443, dport=next(_sport), flags="SA")
    r = run(dp, n, "fp_from_vpc", sent, "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert r.redirect_ifindex == n.cali_a.ifindex


@pytest.mark.parametrize("src", [KEY_A, POD_A, "0.0.0.0"])
def test_no_ipv4_leaves_an_ipv6_only_pod(dp, bpfnet, only6, src):
    """Not from its key, nor from the IPv4 address its veth had before."""
    n = bpfnet
    pkt = Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IP(src=src, dst=POD_B) / UDP(dport=53)
    r = run(dp, n, "fp_from_pod", pkt, "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-source-spoofed")


@pytest.mark.parametrize("spa", [KEY_A, "0.0.0.0"])
def test_no_arp_leaves_an_ipv6_only_pod(dp, bpfnet, only6, spa):
    n = bpfnet
    pkt = Ether(src=n.pod_a_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=spa, pdst=POD_B,
                                                                hwsrc=n.pod_a_mac)
    r = run(dp, n, "fp_from_pod", pkt, "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-source-spoofed")


def test_ipv4_to_the_key_is_no_pods(dp, bpfnet, only6):
    """From another pod and from the VPC, IPv4 to the key is not
    redirected to the IPv6-only pod (nor as a pod's anywhere)."""
    n = bpfnet
    pkt = Ether(src=n.pod_b_mac, dst=n.cali_b.mac) / IP(src=POD_B, dst=KEY_A) / TCP4(dport=80)
    r = run(dp, n, "fp_from_pod", pkt, "cali_b")
    assert r.reason != "redirected-local" and r.redirect_ifindex != n.cali_a.ifindex
    pkt = Ether(src=GW_MAC, dst=n.eth1.mac) / IP(src=REMOTE, dst=KEY_A) / TCP4(dport=80)
    r = run(dp, n, "fp_from_vpc", pkt, "eth1")
    assert r.reason != "redirected-local" and r.redirect_ifindex != n.cali_a.ifindex


def test_deleting_by_the_key_takes_the_ipv6_entry_and_the_veth(dp, bpfnet, only6):
    n = bpfnet
    a = only6[0]
    assert dp.maps.endpoint_delete(KEY_A, n.cali_a.ifindex)
    try:
        assert POD_A6 not in {e.ip for e in dp.maps.endpoints6()}
        assert n.cali_a.ifindex not in dp.maps.veths()
        assert not dp.maps.endpoint_delete(KEY_A, n.cali_a.ifindex)
    finally:
        dp.maps.endpoint_put(a)


class _NoWalk:
    """A table that fails a test which walks it (lookups pass through)."""

    def __init__(self, table):
        self._table = table

    def __getattr__(self, name):
        if name in ("items", "keys", "values", "__iter__"):
            raise AssertionError(f"walked the table ({name})")
        return getattr(self._table, name)

    def __getitem__(self, k):
        return self._table[k]

    def __delitem__(self, k):
        del self._table[k]


def test_deleting_by_the_key_looks_up_its_veth_and_walks_no_veth_map(dp, bpfnet, only6):
    """The key is found in the registration of the veth the caller names
    (one lookup); a veth registered to another pod keeps everything."""
    n = bpfnet
    a = only6[0]
    name = MAP["FP_MAP_EP_IFINDEX"]
    maps = Maps({**dp.maps._t, name: _NoWalk(dp.maps._t[name])})
    assert not maps.endpoint_delete(KEY_A, n.cali_b.ifindex)
    assert POD_A6 in {e.ip for e in dp.maps.endpoints6()}
    assert dp.maps.veths()[n.cali_a.ifindex] == KEY_A
    assert maps.endpoint_delete(KEY_A, n.cali_a.ifindex)
    try:
        assert POD_A6 not in {e.ip for e in dp.maps.endpoints6()}
        assert n.cali_a.ifindex not in dp.maps.veths()
    finally:
        dp.maps.endpoint_put(a)


# ---- NetworkPolicy: the pod isolated under its key, a peer by its IPv6 ----------

CLIENT6, STRANGER6 = "fd00:30::1", "fd00:40::1"
DENIED = "dropped-policy-denied"


@pytest.fixture
def isolated(dp, bpfnet, only6):
    """a (IPv6 only) admits TCP 80 from CLIENT6's /128 only; b admits app=a."""
    from dataclasses import replace
    from tests.bpf.conftest import enforced
    from tests.policy.kube import namespace, netpol, pod, snapshot
    objs = [namespace("x", ns="x"),
            replace(pod("x", "a", KEY_A, labels={"app": "a"}), ips=(KEY_A, POD_A6)),
            replace(pod("x", "b", POD_B, labels={"app": "b"}), ips=(POD_B, POD_B6)),
            netpol("x", "a-in", {"podSelector": {"matchLabels": {"app": "a"}},
                                 "ingress": [{"from": [{"ipBlock": {"cidr": f"{CLIENT6}/128"}}],
                                              "ports": [{"protocol": "TCP", "port": 80}]}]}),
            netpol("x", "b-in", {"podSelector": {"matchLabels": {"app": "b"}},
                                 "ingress": [{"from": [{"podSelector":
                                                        {"matchLabels": {"app": "a"}}}]}]})]
    with enforced(dp, snapshot(objs), flush_first=True, flush_last=True) as state:
        yield state


def syn(sport=None, dport=80):
    return TCP(sport=sport or next(_sport), dport=dport, flags="S")


def test_policy_keys_the_pod_by_its_endpoint_key(dp, bpfnet, isolated):
    assert KEY_A in isolated.endpoints and isolated.endpoints6[POD_A6] == KEY_A
    assert f"{KEY_A}/32" not in isolated.ipcache
    assert KEY_A in {str(k) for k in dp.policy.image().endpoints}


def test_an_ipv6_ipblock_admits_into_an_ipv6_only_pod(dp, bpfnet, isolated):
    n = bpfnet
    vpc = lambda src, dport: Ether(src=GW_MAC, dst=n.eth1.mac) / IPv6(src=src, dst=POD_A6) / syn(
        dport=dport)
    r = run(dp, n, "fp_from_vpc", vpc(CLIENT6, 80), "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert r.redirect_ifindex == n.cali_a.ifindex
    for src, dport in ((CLIENT6, 81), (STRANGER6, 80)):
        r = run(dp, n, "fp_from_vpc", vpc(src, dport), "eth1")
        assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED), (src, dport)
    # a pod on the node outside the block
    pkt = Ether(src=n.pod_b_mac, dst=n.cali_b.mac) / IPv6(src=POD_B6, dst=POD_A6) / syn()
    r = run(dp, n, "fp_from_pod", pkt, "cali_b")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)


def test_an_ipv6_only_pod_is_a_peer_by_its_ipv6_address(dp, bpfnet, isolated):
    n = bpfnet
    r = run(dp, n, "fp_from_pod", from_a(n, POD_B6, syn()), "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert r.redirect_ifindex == n.cali_b.ifindex
    # from the VPC, the same port: not a's
    pkt = Ether(src=GW_MAC, dst=n.eth1.mac) / IPv6(src=REMOTE6, dst=POD_B6) / syn()
    r = run(dp, n, "fp_from_vpc", pkt, "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)


# ---- bandwidth: the pod's limits under its key -----------------------------------

def test_bandwidth_limits_an_ipv6_only_pod_under_its_key(dp, bpfnet, only6):
    from agent.bandwidth import Limits, plan
    n = bpfnet
    p = plan({KEY_A: (Limits(egress_pps=10, egress_pkt_burst=3), "test-key")},
             dp.bandwidth.entries(), htb=False, new_gen=lambda: 77)
    dp.maps.counters_clear()
    dp.settings.set_bandwidth(True, edt=False)
    try:
        for ip, entry in p.writes.items():
            dp.bandwidth.write(ip, entry, ip in p.fresh)
        got = [run(dp, n, "fp_from_pod", from_a(n, REMOTE6), "cali_a").verdict for _ in range(5)]
        assert got == [TC_ACT_REDIRECT] * 3 + [TC_ACT_SHOT] * 2
        drops = {(r["direction"], r["reason"]): r["packets"] for r in dp.bandwidth.counters()
                 if r["ip"] == KEY_A}
        assert drops[("egress", "dropped-packet-rate-egress")] == 2
    finally:
        dp.settings.set_bandwidth(False)
        dp.bandwidth.clear()
        dp.maps.counters_clear()


# ---- a Service whose backend is the IPv6-only pod ----------------------------------

VIP6 = "fd00:16::40"


def test_an_ipv6_clusterip_translates_to_an_ipv6_only_backend_and_back(dp, bpfnet, only6):
    from tests.bpf.conftest import frontends
    n = bpfnet
    with frontends(dp.lb, {81: (POD_A6, 8080, "TCP")}, [(VIP6, 80, "TCP", 80, [81])],
                   flush=True):
        try:
            sport = next(_sport)
            sent = Ether(src=n.pod_b_mac, dst=n.cali_b.mac) / IPv6(src=POD_B6, dst=VIP6) / TCP(
                sport=sport, dport=80, flags="S")
            r = run(dp, n, "fp_from_pod", sent, "cali_b")
            assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
            assert r.redirect_ifindex == n.cali_a.ifindex
            o = Ether(r.out)
            assert (o[IPv6].dst, o[TCP].dport) == (POD_A6, 8080)
            # the reply, from the IPv6-only backend: restored to the ClusterIP
            reply = Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IPv6(src=POD_A6, dst=POD_B6) / TCP(
                sport=8080, dport=sport, flags="SA")
            r = run(dp, n, "fp_from_pod", reply, "cali_a")
            assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
            o = Ether(r.out)
            assert (o[IPv6].src, o[TCP].sport) == (VIP6, 80)
            assert r.redirect_ifindex == n.cali_b.ifindex
        finally:
            dp.lb.delete_backend(81)
