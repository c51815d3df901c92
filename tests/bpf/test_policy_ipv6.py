"""NetworkPolicy for IPv6 in the IPv6 programs (fp_from_pod6, fp_from_vpc6,
fp_to_pod6), run with BPF_PROG_TEST_RUN.

Pods A, B and C are dual stack. The policy maps are filled as the agent
fills them (compile_policy for both families -> diff -> PolicyMaps.apply),
with the node's IPv4 and IPv6 addresses; every new-flow verdict is also
asked of the Python reference (agent.policy.evaluate).

    A (x, app=a): ingress TCP 80 from ipBlock fd00:20::/64 except
                  fd00:20::99/128, UDP 5000 from the same block, anything
                  from pods app=b; IPv4 TCP 80 from 10.0.2.0/24;
                  egress only UDP 53 to pods app=b.
    B (x, app=b): open.  C (y, app=c): ingress denied, audited only.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS,
                                IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting)
from scapy.layers.l2 import Ether

from agent.policy import compile_policy, diff, evaluate
from tests.bpf.conftest import (ENI_IP, ENI_IP6, GW_MAC, POD_A, POD_A6, POD_B, POD_B6, POD_C,
                                POD_C6, REMOTE, TC_ACT_REDIRECT, TC_ACT_SHOT, dual_stack,
                                run_prog)
from tests.policy.kube import namespace, netpol, pod, snapshot

CLIENT6 = "fd00:20::20"          # in the allowed block
EXCEPTED6 = "fd00:20::99"        # in the block's except
STRANGER6 = "fd00:30::30"        # in no block
ROUTER6 = "fd00:20::1"           # sends ICMPv6 errors
DENIED = "dropped-policy-denied"
NO_FIRST = "dropped-fragment-without-first"
_port = itertools.count(33000)


def dual(ns, name, v4, v6, **kw):
    return replace(pod(ns, name, v4, **kw), ips=(v4, v6))


def cluster():
    block = {"ipBlock": {"cidr": "fd00:20::/64", "except": [f"{EXCEPTED6}/128"]}}
    return snapshot([
        namespace("x", ns="x"), namespace("y", ns="y"),
        dual("x", "a", POD_A, POD_A6, labels={"app": "a"}),
        dual("x", "b", POD_B, POD_B6, labels={"app": "b"}),
        dual("y", "c", POD_C, POD_C6, labels={"app": "c"}),
        netpol("x", "a-in", {
            "podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [
                {"from": [block], "ports": [{"protocol": "TCP", "port": 80}]},
                {"from": [block], "ports": [{"protocol": "UDP", "port": 5000}]},
                {"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]},
                {"from": [{"ipBlock": {"cidr": "10.0.2.0/24"}}],
                 "ports": [{"protocol": "TCP", "port": 80}]}]}),
        netpol("x", "a-out", {
            "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}],
                        "ports": [{"protocol": "UDP", "port": 53}]}]}),
        netpol("y", "c-audit", {"podSelector": {"matchLabels": {"app": "c"}}, "ingress": []}),
    ])


@contextlib.contextmanager
def enforced6(dp, snap):
    state = compile_policy(snap, "n1", [ENI_IP, ENI_IP6], "default", {"y/c-audit"})
    for op in diff(dp.policy.image(), state):
        dp.policy.apply(op)
    dp.settings.set_policy(True)
    dp.lb.conntrack_flush()
    try:
        yield state
    finally:
        dp.settings.set_policy(False)
        dp.policy.clear()
        dp.lb.conntrack_flush()


@pytest.fixture(scope="module")
def world(dp, bpfnet):
    # C on the ENI too; back to the shared fixture's endpoints after (C's
    # ENI unresolved: tests/bpf/test_redirect.py relies on it)
    with dual_stack(dp, bpfnet, c_on_eni=True), enforced6(dp, cluster()) as state:
        yield state


def vpc(n, src, dst, l4, ext=None):
    ip = IPv6(src=src, dst=dst, hlim=64)
    if ext is not None:
        ip = ip / ext
    return Ether(src=GW_MAC, dst=n.eth1.mac) / ip / l4


def from_pod(n, who, dst, l4):
    dev = {"a": n.cali_a, "b": n.cali_b, "c": n.cali_c}[who]
    mac = {"a": n.pod_a_mac, "b": n.pod_b_mac, "c": n.pod_c_mac}[who]
    src = {"a": POD_A6, "b": POD_B6, "c": POD_C6}[who]
    return Ether(src=mac, dst=dev.mac) / IPv6(src=src, dst=dst, hlim=64) / l4


def to_a(n, src, l4):
    return Ether(src=n.cali_a.mac, dst=n.pod_a_mac) / IPv6(src=src, dst=POD_A6, hlim=63) / l4


def syn(dport, sport=None):
    return TCP(sport=sport or next(_port), dport=dport, flags="S")


def run(dp, n, prog, pkt, dev):
    return run_prog(dp, n.ns, prog, bytes(pkt), getattr(n, dev).ifindex)


def judged(state, src, dst, proto, port):
    return evaluate(state, src, dst, proto, port).allowed


# ---- ipBlock and except, ports, the Python twin ------------------------------

@pytest.mark.parametrize("src,port,allowed", [
    (CLIENT6, 80, True), (CLIENT6, 81, False), (EXCEPTED6, 80, False), (STRANGER6, 80, False),
])
def test_ipblock_with_except_and_ports_from_the_vpc(dp, bpfnet, world, src, port, allowed):
    n = bpfnet
    r = run(dp, n, "fp_from_vpc", vpc(n, src, POD_A6, syn(port)), "eth1")
    assert judged(world, src, POD_A6, "TCP", port) is allowed
    if allowed:
        assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
        assert r.redirect_ifindex == n.cali_a.ifindex
    else:
        assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)


def test_the_same_verdicts_for_what_the_stack_delivers(dp, bpfnet, world):
    n = bpfnet
    r = run(dp, n, "fp_to_pod", to_a(n, CLIENT6, syn(80)), "cali_a")
    assert r.verdict != TC_ACT_SHOT
    r = run(dp, n, "fp_to_pod", to_a(n, CLIENT6, syn(81)), "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)
    r = run(dp, n, "fp_to_pod", to_a(n, STRANGER6, UDP(sport=1, dport=5000)), "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)
    counted = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    assert counted[(n.cali_a.ifindex, "to-pod", DENIED)] >= 2
    # the deciding policy's counters, as for IPv4
    verdicts = {(v["policy_id"], v["direction"], v["verdict"]): v["flows"]
                for v in dp.policy.verdicts()}
    a_in = world.policy_ids["x/a-in"]
    assert verdicts[(a_in, "ingress", "deny")] >= 2


def test_ports_are_read_after_extension_headers(dp, bpfnet, world):
    n = bpfnet
    ext = IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(segleft=0) / IPv6ExtHdrDestOpt()
    r = run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, syn(80), ext=ext), "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    r = run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, syn(81), ext=ext), "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)


# ---- peers by their IPv6 addresses ---------------------------------------------

def test_pod_peers_match_by_their_ipv6_addresses(dp, bpfnet, world):
    n = bpfnet
    # B may reach A on any port; C may not (both are open for egress)
    r = run(dp, n, "fp_from_pod", from_pod(n, "b", POD_A6, syn(9999)), "cali_b")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert judged(world, POD_B6, POD_A6, "TCP", 9999)
    r = run(dp, n, "fp_from_pod", from_pod(n, "c", POD_A6, syn(80)), "cali_c")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)
    assert not judged(world, POD_C6, POD_A6, "TCP", 80)


def test_egress_of_an_isolated_pod(dp, bpfnet, world):
    n = bpfnet
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6, UDP(sport=next(_port), dport=53)),
            "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    for dst, l4 in ((POD_B6, UDP(sport=next(_port), dport=54)), (POD_C6, UDP(dport=53)),
                    (CLIENT6, syn(443))):
        r = run(dp, n, "fp_from_pod", from_pod(n, "a", dst, l4), "cali_a")
        assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED), dst
        assert not judged(world, POD_A6, dst, "UDP" if UDP in l4 else "TCP", l4.dport)


# ---- replies, RELATED ICMPv6 ----------------------------------------------------

def test_replies_of_admitted_flows_pass_and_new_flows_back_do_not(dp, bpfnet, world):
    n = bpfnet
    sport = next(_port)
    r = run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, syn(80, sport)), "eth1")
    assert r.verdict == TC_ACT_REDIRECT
    # A's egress allows none of this: only the admitted flow's reply passes
    reply = from_pod(n, "a", CLIENT6, TCP(sport=80, dport=sport, flags="SA"))
    r = run(dp, n, "fp_from_pod", reply, "cali_a")
    assert r.verdict != TC_ACT_SHOT and r.reason != DENIED
    r = run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, TCP(sport=sport, dport=80, flags="A")),
            "eth1")
    assert r.verdict == TC_ACT_REDIRECT
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", CLIENT6, syn(sport, 80)), "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)


def test_icmpv6_errors_related_to_admitted_flows_pass(dp, bpfnet, world):
    n = bpfnet
    sport = next(_port)
    run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, syn(80, sport)), "eth1")
    # A's reply could not be delivered: a router tells A, quoting it
    quoted = IPv6(src=POD_A6, dst=CLIENT6) / TCP(sport=80, dport=sport, flags="SA")
    r = run(dp, n, "fp_from_vpc", vpc(n, ROUTER6, POD_A6, ICMPv6DestUnreach(code=3) / quoted),
            "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    r = run(dp, n, "fp_to_pod", to_a(n, ROUTER6, ICMPv6DestUnreach(code=3) / quoted), "cali_a")
    assert r.verdict != TC_ACT_SHOT
    # an error about a flow nobody admitted is a new packet, and denied
    stray = IPv6(src=POD_A6, dst=STRANGER6) / TCP(sport=80, dport=next(_port), flags="SA")
    r = run(dp, n, "fp_from_vpc", vpc(n, ROUTER6, POD_A6, ICMPv6DestUnreach(code=3) / stray),
            "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)


def test_echo_replies_follow_the_request(dp, bpfnet, world):
    n = bpfnet
    # B -> A echo (allowed: B may reach A on anything), A's reply passes its egress
    r = run(dp, n, "fp_from_pod", from_pod(n, "b", POD_A6, ICMPv6EchoRequest(id=77, seq=1)),
            "cali_b")
    assert r.verdict == TC_ACT_REDIRECT
    from scapy.layers.inet6 import ICMPv6EchoReply
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6, ICMPv6EchoReply(id=77, seq=1)),
            "cali_a")
    assert r.verdict == TC_ACT_REDIRECT
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6, ICMPv6EchoReply(id=78, seq=1)),
            "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)


# ---- neighbour discovery, node addresses -----------------------------------------

def test_neighbour_discovery_is_always_allowed(dp, bpfnet, world):
    n = bpfnet
    r = run(dp, n, "fp_to_pod", to_a(n, STRANGER6, ICMPv6ND_NA(tgt=STRANGER6)), "cali_a")
    assert r.verdict != TC_ACT_SHOT
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", "ff02::1:ff00:1", ICMPv6ND_NS(tgt="fe80::1")),
            "cali_a")
    assert r.verdict != TC_ACT_SHOT and r.reason == "passed"
    r = run(dp, n, "fp_from_pod", from_pod(n, "a", STRANGER6, ICMPv6ND_NA(tgt=POD_A6)), "cali_a")
    assert r.verdict != TC_ACT_SHOT and r.reason == "passed"


def test_the_nodes_own_ipv6_address_is_host(dp, bpfnet, world):
    n = bpfnet
    assert world.ipcache[f"{ENI_IP6}/128"] == world.ipcache[f"{ENI_IP}/32"] == 1
    r = run(dp, n, "fp_to_pod", to_a(n, ENI_IP6, syn(8080)), "cali_a")
    assert r.verdict != TC_ACT_SHOT
    assert judged(world, ENI_IP6, POD_A6, "TCP", 8080)


# ---- fragments ---------------------------------------------------------------------

def test_later_fragments_follow_their_first(dp, bpfnet, world):
    n = bpfnet
    for ident, port, allowed in ((0x7001, 5000, True), (0x7002, 5001, False)):
        first = vpc(n, CLIENT6, POD_A6, UDP(sport=7, dport=port, len=1008) / (b"x" * 8),
                    ext=IPv6ExtHdrFragment(id=ident, m=1, offset=0, nh=17))
        later = vpc(n, CLIENT6, POD_A6, b"y" * 16,
                    ext=IPv6ExtHdrFragment(id=ident, m=0, offset=2, nh=17))
        r1 = run(dp, n, "fp_from_vpc", first, "eth1")
        r2 = run(dp, n, "fp_from_vpc", later, "eth1")
        if allowed:
            assert r1.verdict == r2.verdict == TC_ACT_REDIRECT
        else:
            assert (r1.verdict, r1.reason) == (r2.verdict, r2.reason) == (TC_ACT_SHOT, DENIED)
    orphan = vpc(n, CLIENT6, POD_A6, b"z" * 16,
                 ext=IPv6ExtHdrFragment(id=0x7003, m=0, offset=2, nh=17))
    r = run(dp, n, "fp_from_vpc", orphan, "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, NO_FIRST)


# ---- the IPv4 of dual-stack pods, policy checks off ---------------------------------

def test_ipv4_of_dual_stack_pods_keeps_its_own_rules(dp, bpfnet, world):
    n = bpfnet
    pkt = Ether(src=GW_MAC, dst=n.eth1.mac) / IP(src=REMOTE, dst=POD_A, ttl=64)
    r = run(dp, n, "fp_from_vpc", pkt / TCP(sport=next(_port), dport=80, flags="S"), "eth1")
    assert r.verdict == TC_ACT_REDIRECT
    r = run(dp, n, "fp_from_vpc", pkt / UDP(sport=1, dport=5000), "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED), "the IPv6 block holds no IPv4 address"


def test_nothing_is_judged_while_policy_checks_are_off(dp, bpfnet, world):
    n = bpfnet
    dp.settings.set_policy(False)
    try:
        r = run(dp, n, "fp_from_vpc", vpc(n, STRANGER6, POD_A6, syn(81)), "eth1")
        assert r.verdict == TC_ACT_REDIRECT
        r = run(dp, n, "fp_to_pod", to_a(n, STRANGER6, syn(81)), "cali_a")
        assert r.verdict != TC_ACT_SHOT
    finally:
        dp.settings.set_policy(True)


def test_the_ipv6_ipcache_reads_back_as_compiled(dp, world):
    img = dp.policy.image()
    six = {k: v for k, v in world.ipcache.items() if ":" in k}
    assert six and {k: img.ipcache[k] for k in six} == six
    assert img.identity_of(POD_B6) == world.ipcache[f"{POD_B6}/128"]
    assert dp.policy.usage()["ipcache6"] == len(six)


# ---- the agent's side of the IPv6 policy conntrack ----------------------------------

def test_the_gc_sweeps_ipv6_policy_flows_and_fragment_records(dp, bpfnet, world):
    from agent.conntrack.gc import sweep
    from agent.model.conntrack import Lifetimes
    n, ct, life, sec = bpfnet, dp.lb.ct, Lifetimes(), 1_000_000_000
    dp.lb.conntrack_flush()
    assert ct.policy6_entries() == [] and ct.frag_entries(v6=True) == []
    run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, UDP(sport=4444, dport=5000) / b"d"), "eth1")
    first = vpc(n, CLIENT6, POD_A6, UDP(sport=4445, dport=5000, len=1008) / (b"x" * 8),
                ext=IPv6ExtHdrFragment(id=0x7101, m=1, offset=0, nh=17))
    run(dp, n, "fp_from_vpc", first, "eth1")
    flows = ct.policy6_entries()
    assert sorted(k.proto for k, _ in flows) == [17, 17]
    rows = [r for r in ct.rows() if r.table == "policy6"]
    # one entry per flow, lower (address, port) end first
    assert {(frozenset((r.saddr, r.daddr)), r.proto) for r in rows} == {
        (frozenset((CLIENT6, POD_A6)), "UDP")}
    (frag_key, seen), = ct.frag_entries(v6=True)
    last = max(v.last_seen for _, v in flows)
    sweep(ct, last + (life.other - 1) * sec, life)
    assert len(ct.policy6_entries()) == 2
    sweep(ct, max(last, seen) + (max(life.other, 30) + 1) * sec, life)
    assert ct.policy6_entries() == [] and ct.frag_entries(v6=True) == []


def test_a_flush_empties_the_ipv6_policy_tables(dp, bpfnet, world):
    n, ct = bpfnet, dp.lb.ct
    run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, syn(80)), "eth1")
    assert ct.policy6_entries()
    dp.lb.conntrack_flush()
    assert ct.policy6_entries() == []


def test_an_audited_direction_forwards_and_reports_would_be_drops(dp, bpfnet, world):
    n = bpfnet
    r = run(dp, n, "fp_from_vpc", vpc(n, STRANGER6, POD_C6, syn(80)), "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_REDIRECT, "redirected-local")
    assert evaluate(world, STRANGER6, POD_C6, "TCP", 80).reason == "audit-would-deny"
    counted = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    assert counted[(n.eth1.ifindex, "from-vpc", "policy-audit-would-deny")] >= 1


def test_ipv6_policy_flows_are_counted_in_the_conntrack_metric(dp, bpfnet, world):
    from agent.daemon.metrics import DatapathCollector
    n, ct = bpfnet, dp.lb.ct
    dp.lb.conntrack_flush()
    run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, syn(80)), "eth1")
    run(dp, n, "fp_from_vpc", vpc(n, CLIENT6, POD_A6, UDP(sport=4446, dport=5000) / b"d"),
        "eth1")
    assert sorted(k.proto for k, _ in ct.policy6_entries()) == [6, 17]
    fams = {f.name: f for f in DatapathCollector(None)._maps(dp)}
    got = {(s.labels["protocol"], s.labels["direction"]): s.value
           for s in fams["fastpath_conntrack_entries"].samples}
    assert got == {("TCP", "policy"): 1, ("UDP", "policy"): 1}


# ---- the monitor's IPv6 policy records (lib/event6.h's fp_event6_head) --------------

def test_an_ipv6_policy_drop_is_reported_with_its_addresses_ports_and_direction(
        dp, bpfnet, world, events):
    from agent.inspect.events import decode_event
    n = bpfnet
    events.poll()                      # what earlier tests left
    sport = next(_port)
    r = run(dp, n, "fp_from_vpc", vpc(n, STRANGER6, POD_A6, syn(80, sport)), "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, DENIED)
    evs = [e for e in (decode_event(raw, events.schema) for raw in events.poll())
           if e["sport"] == sport]
    assert len(evs) == 1, evs
    e = evs[0]
    assert (e["family"], e["saddr"], e["daddr"], e["dport"], e["proto_label"]) == (
        "ipv6", STRANGER6, POD_A6, 80, "TCP")
    assert (e["type_label"], e["reason_label"], e["ifindex"]) == ("drop", DENIED,
                                                                   n.eth1.ifindex)
    assert sorted(e["flags_names"]) == ["ingress", "ipv6"]
