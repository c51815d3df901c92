"""NetworkPolicy in the programs: allow/deny of new flows at egress and
ingress, replies of admitted flows, drop reasons and policy ids in counters,
decisions and monitor events, audit, and what-if packets that change nothing.

The policy maps are filled exactly as the agent fills them (compile_policy ->
diff -> PolicyMaps.apply), and every verdict is compared with the Python
reference of the same lookups (agent.policy.evaluate).
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from agent.datapath.maps import DEFS, be32
from agent.k8s.model import FrozenMap, NetworkPolicy
from agent.policy import evaluate
from tests.bpf.conftest import (ENI_IP, POD_A, POD_B, POD_C, REMOTE, TC_ACT_REDIRECT,
                                TC_ACT_SHOT, enforced, run_prog)
from tests.policy.kube import namespace, netpol, pod, snapshot

PV_NONE = DEFS.defines["FP_PV_NONE"]
PV = {DEFS.defines["FP_PV_ALLOW"]: "allow", DEFS.defines["FP_PV_DENY"]: "deny",
      DEFS.defines["FP_PV_AUDIT_DENY"]: "audit-would-deny", PV_NONE: "unchecked"}
WHATIF = DEFS.defines["FP_WHATIF_MARK"]
REMOTE_OUTSIDE = "10.0.2.200"       # in 10.0.2.0/24 but in its except 10.0.2.128/25
_sport = itertools.count(20000)


def audited(p: NetworkPolicy) -> NetworkPolicy:
    from dataclasses import replace
    return replace(p, annotations=FrozenMap({"fastpath.io/audit": "true"}))


def cluster():
    return snapshot([
        namespace("x", ns="x"), namespace("y", ns="y"),
        pod("x", "a", POD_A, labels={"app": "a"}),
        pod("x", "b", POD_B, labels={"app": "b"}, ports=[("http", 8080, "TCP")]),
        pod("y", "c", POD_C, labels={"app": "c"}),
        pod("y", "r", REMOTE, node="n2", labels={"app": "r"}),
        # B admits A on its named port only
        netpol("x", "b-from-a", {"podSelector": {"matchLabels": {"app": "b"}},
                                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                                              "ports": [{"port": "http"}]}]}),
        # A: no ingress at all; egress to B (any port) and to a CIDR range of ports
        netpol("x", "a-locked", {
            "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress", "Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]},
                       {"to": [{"ipBlock": {"cidr": "10.0.2.0/24", "except": ["10.0.2.128/25"]}}],
                        "ports": [{"protocol": "TCP", "port": 443, "endPort": 450}]}]}),
        # C: deny-all ingress, audited only
        audited(netpol("y", "c-audit", {"podSelector": {"matchLabels": {"app": "c"}},
                                        "ingress": []})),
    ])


@pytest.fixture(scope="module")
def policy(dp):
    with enforced(dp, cluster(), {"y/c-audit"}, flush_first=True, flush_last=True) as state:
        yield state


def tcp(src, dst, dport, sport=None, flags="S", src_mac="02:00:00:00:0a:0a", dst_mac="ee:ee:ee:ee:ee:ee"):
    return (Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=dst, ttl=64)
            / TCP(sport=sport or next(_sport), dport=dport, flags=flags) / b"x")


def udp(src, dst, dport, sport=None):
    return (Ether(src="02:00:00:00:0a:0a", dst="ee:ee:ee:ee:ee:ee") / IP(src=src, dst=dst, ttl=64)
            / UDP(sport=sport or next(_sport), dport=dport) / b"q")


def where(net, src):
    """(program, ifindex) a packet from `src` enters by."""
    if src == POD_A:
        return "fp_from_pod", net.cali_a.ifindex
    if src == POD_B:
        return "fp_from_pod", net.cali_b.ifindex
    if src == POD_C:
        return "fp_from_pod", net.cali_c.ifindex
    return "fp_from_vpc", net.eth1.ifindex


CASES = [
    # (src, dst, proto, dport)
    (POD_A, POD_B, "TCP", 8080),     # egress: A may reach B; ingress: B admits A on http
    (POD_A, POD_B, "TCP", 80),       # B's ingress: not the named port
    (POD_A, POD_B, "UDP", 8080),     # B's ingress: http is TCP
    (POD_A, REMOTE, "TCP", 443),     # egress ipBlock, port range
    (POD_A, REMOTE, "TCP", 450),
    (POD_A, REMOTE, "TCP", 451),     # outside endPort
    (POD_A, REMOTE_OUTSIDE, "TCP", 443),  # in the except
    (POD_A, POD_C, "TCP", 80),       # A's egress allows B and the CIDR only
    (POD_B, POD_A, "TCP", 80),       # A admits nothing
    (POD_B, POD_C, "TCP", 80),       # C is only audited: forwarded
    (POD_C, POD_B, "TCP", 8080),     # C is not app=a
    (REMOTE, POD_B, "TCP", 8080),    # from the VPC: r is not app=a
    (REMOTE, POD_C, "UDP", 53),      # audited
]


@pytest.mark.parametrize("src,dst,proto,dport", CASES)
def test_new_flow_verdicts_match_the_reference(dp, bpfnet, policy, src, dst, proto, dport):
    want = evaluate(policy, src, dst, proto, dport)
    prog, ifindex = where(bpfnet, src)
    pkt = tcp(src, dst, dport) if proto == "TCP" else udp(src, dst, dport)
    r = run_prog(dp, bpfnet.ns, prog, bytes(pkt), ifindex)
    dropped = r.verdict == TC_ACT_SHOT
    assert dropped == (not want.allowed), (src, dst, proto, dport, want, r.reason)
    rec = r.record
    if want.allowed:
        assert r.reason != "dropped-policy-denied"
    else:
        assert r.reason == "dropped-policy-denied"
        d = want.direction
        assert PV[rec.pv[int(d)]] == "deny"
        # the datapath names the lowest deciding policy; the reference all of them
        assert policy.policy_name(rec.policy_id[int(d)]) == policy.policy_name(min(want.policies))
    # each checked direction's verdict agrees with the reference's check
    for c in want.checks:
        got = PV[rec.pv[int(c.direction)]]
        if c.reason == "not-isolated":
            assert got == "unchecked", c
        elif c.reason == "audit-would-deny":
            assert got == "audit-would-deny", c
        elif c.allowed:
            assert got == "allow", c
        else:
            assert got == "deny", c


def test_replies_of_admitted_flows_pass_and_unsolicited_ones_do_not(dp, bpfnet, policy):
    # REMOTE:443 -> A: A admits nothing, so an unsolicited packet is dropped
    sport = next(_sport)
    r = run_prog(dp, bpfnet.ns, "fp_from_vpc", bytes(tcp(REMOTE, POD_A, sport, sport=443,
                                                            flags="SA")), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_SHOT and r.reason == "dropped-policy-denied"
    # A opens the connection (its egress allows REMOTE:443) ...
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, REMOTE, 443, sport=sport)),
                 bpfnet.cali_a.ifindex)
    assert r.verdict != TC_ACT_SHOT, r.reason
    # ... and the same reply now passes, without a rule lookup
    r = run_prog(dp, bpfnet.ns, "fp_from_vpc", bytes(tcp(REMOTE, POD_A, sport, sport=443,
                                                            flags="SA")), bpfnet.eth1.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.reason == "redirected-local"
    assert r.record.pv[0] == PV_NONE and r.record.pv[1] == PV_NONE
    # the flow's later packets pass too
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, REMOTE, 443, sport=sport,
                                                          flags="A")), bpfnet.cali_a.ifindex)
    assert r.verdict != TC_ACT_SHOT


def test_the_node_reaches_isolated_pods(dp, bpfnet, policy):
    # kubelet probes: from the node's address, delivered by the stack (to-pod)
    pkt = tcp(ENI_IP, POD_A, 8080)
    r = run_prog(dp, bpfnet.ns, "fp_to_pod", bytes(pkt), bpfnet.cali_a.ifindex)
    assert r.verdict != TC_ACT_SHOT
    assert evaluate(policy, ENI_IP, POD_A, "TCP", 8080).allowed
    # ... while another address is refused on the same path
    r = run_prog(dp, bpfnet.ns, "fp_to_pod", bytes(tcp("10.9.9.9", POD_A, 8080)),
                 bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_SHOT


def test_icmp_is_admitted_only_by_rules_without_ports(dp, bpfnet, policy):
    ping = lambda dst: bytes(Ether(src="02:00:00:00:0a:0a", dst="ee:ee:ee:ee:ee:ee")
                             / IP(src=POD_A, dst=dst, ttl=64) / ICMP(id=7, seq=1))
    # A's egress rule to B has no ports: ping passes egress; B's ingress has ports: denied
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", ping(POD_B), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_SHOT and r.record.pv[1] == DEFS.defines["FP_PV_ALLOW"]
    assert PV[r.record.pv[0]] == "deny"
    # to the CIDR (port range rule only): egress denies
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", ping(REMOTE), bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_SHOT and PV[r.record.pv[1]] == "deny"


def test_drops_are_counted_with_reason_and_policy(dp, bpfnet, policy):
    before = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    pol_before = {(v["policy_id"], v["direction"], v["verdict"]): v["flows"]
                  for v in dp.policy.verdicts()}
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, POD_B, 81)),
                 bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_SHOT
    after = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    key = (bpfnet.cali_a.ifindex, "from-pod", "dropped-policy-denied")
    assert after[key] == before.get(key, 0) + 1
    pid = policy.policy_ids["x/b-from-a"]
    pol_after = {(v["policy_id"], v["direction"], v["verdict"]): v["flows"]
                 for v in dp.policy.verdicts()}
    k = (pid, "ingress", "deny")
    assert pol_after[k] == pol_before.get(k, 0) + 1


def test_audited_policies_forward_and_report(dp, bpfnet, policy):
    before = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_B, POD_C, 80)),
                 bpfnet.cali_b.ifindex)
    assert r.verdict == TC_ACT_REDIRECT
    after = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    key = (bpfnet.cali_b.ifindex, "from-pod", "policy-audit-would-deny")
    assert after[key] == before.get(key, 0) + 1
    assert policy.policy_name(r.record.policy_id[0]) == "y/c-audit"


def test_rule_flow_counters_count_new_flows(dp, bpfnet, policy):
    from agent.policy.state import Direction
    key_of = {k: v for k, v in dp.policy.rule_flows().items() if k[0] == POD_B
              and k[1].direction == Direction.INGRESS}
    assert key_of, "B has ingress rules"
    before = sum(key_of.values())
    sport = next(_sport)
    for flags in ("S", "A", "A"):      # one flow, three packets
        r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, POD_B, 8080, sport=sport,
                                                              flags=flags)), bpfnet.cali_a.ifindex)
        assert r.verdict == TC_ACT_REDIRECT
    after = sum(v for k, v in dp.policy.rule_flows().items() if k[0] == POD_B
                and k[1].direction == Direction.INGRESS)
    assert after == before + 1


def test_a_denied_packet_reaches_the_monitor_with_its_policy(dp, bpfnet, policy, events):
    events.poll()
    sport = next(_sport)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, POD_B, 82, sport=sport)),
                 bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_SHOT
    evs = events.decoded()
    drops = [e for e in evs if e["type"] == 1 and e["sport"] == sport]
    assert len(drops) == 1, evs
    e = drops[0]
    assert (e["saddr"], e["daddr"], e["dport"], e["proto"]) == (POD_A, POD_B, 82, 6)
    assert e["reason"] == "dropped-policy-denied"
    assert policy.policy_name(e["policy_id"]) == "x/b-from-a"
    assert e["flags"] & DEFS.defines["FP_EV_F_INGRESS"]
    assert e["ifindex"] == bpfnet.cali_a.ifindex


def test_whatif_packets_decide_but_change_nothing(dp, bpfnet, policy, events):
    events.poll()
    counters = {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()}
    ct_before = len(dp.lb.conntrack())
    flows_before = dp.policy.rule_flows()
    sport = next(_sport)
    # allowed new flow: would create a conntrack entry and count a rule hit
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, POD_B, 8080, sport=sport)),
                 bpfnet.cali_a.ifindex, mark=WHATIF)
    assert r.verdict == TC_ACT_REDIRECT and PV[r.record.pv[0]] == "allow"
    # denied: would count and report a drop
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, POD_B, 83, sport=sport)),
                 bpfnet.cali_a.ifindex, mark=WHATIF)
    assert r.verdict == TC_ACT_SHOT and r.reason == "dropped-policy-denied"
    assert {(c.ifindex, c.direction, c.reason): c.packets for c in dp.maps.counters()} == counters
    assert len(dp.lb.conntrack()) == ct_before
    assert dp.policy.rule_flows() == flows_before
    assert events.poll() == []
    # the same packet without the mark does change state
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, POD_B, 8080, sport=sport)),
                 bpfnet.cali_a.ifindex)
    assert len(dp.lb.conntrack()) == ct_before + 1


def test_policy_off_checks_nothing(dp, bpfnet, policy):
    dp.settings.set_policy(False)
    try:
        r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, POD_B, 81)),
                     bpfnet.cali_a.ifindex)
        assert r.verdict == TC_ACT_REDIRECT
        assert r.record.pv[0] == PV_NONE and r.record.pv[1] == PV_NONE
    finally:
        dp.settings.set_policy(True)


def test_maps_read_back_as_the_compiled_image(dp, policy):
    img = dp.policy.image()
    want = policy.image()
    assert img.ipcache == want.ipcache
    assert set(img.rules) == set(want.rules)
    assert set(img.endpoints) == set(want.endpoints)
    for ip, cfg in want.endpoints.items():
        got = img.endpoints[ip]
        for d in (0, 1):
            assert got.of(d).enforced == cfg.of(d).enforced
            assert got.of(d).audit == cfg.of(d).audit
    # restored maps diff to nothing that changes a verdict: only attribution
    from agent.policy import diff as _diff
    from agent.policy.diff import RulePut, EndpointPut
    assert all(isinstance(op, (RulePut, EndpointPut)) for op in _diff(img, policy))


def test_admitted_flows_are_tracked_and_swept_when_idle(dp, bpfnet, policy):
    import time
    from agent.conntrack.gc import sweep
    sport = next(_sport)
    r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, POD_B, 8080, sport=sport)),
                 bpfnet.cali_a.ifindex)
    assert r.verdict == TC_ACT_REDIRECT

    def tracked():
        return [c for c in dp.lb.conntrack() if c.direction == "policy" and c.sport == sport]
    assert len(tracked()) == 1 and tracked()[0].daddr == POD_B
    assert tracked()[0].state == "new", "a SYN, not answered yet"
    life = dp.options.lifetimes()
    now = time.monotonic_ns()
    sweep(dp.lb.ct, now, life)
    assert len(tracked()) == 1          # not idle yet
    sweep(dp.lb.ct, now + (life.tcp_syn + 1) * 10**9, life)
    assert tracked() == []


def test_admitted_tcp_flows_follow_their_handshake_and_close(dp, bpfnet, policy):
    """One entry per flow, moved by both directions' packets."""
    sport = next(_sport)
    a = lambda flags: run_prog(dp, bpfnet.ns, "fp_from_pod",
                               bytes(tcp(POD_A, POD_B, 8080, sport=sport, flags=flags)),
                               bpfnet.cali_a.ifindex)
    b = lambda flags: run_prog(dp, bpfnet.ns, "fp_from_pod",
                               bytes(tcp(POD_B, POD_A, sport, sport=8080, flags=flags,
                                         src_mac="02:00:00:00:0b:0b")), bpfnet.cali_b.ifindex)

    def state():
        got = [c.state for c in dp.lb.conntrack() if c.direction == "policy"
               and sport in (c.sport, c.dport)]
        assert len(got) == 1, got
        return got[0]
    for step, want in ((lambda: a("S"), "new"), (lambda: b("SA"), "syn-recv"),
                       (lambda: a("A"), "established"), (lambda: b("FA"), "fin-wait"),
                       (lambda: a("FA"), "closed")):
        assert step().verdict == TC_ACT_REDIRECT
        assert state() == want


def test_trace_events_report_a_reply_as_it_arrived(dp, bpfnet, policy, events):
    """A reply of a translated flow gets its VIP back on delivery; the
    monitor still reports the packet as it arrived, from the backend."""
    vip = "192.168.60.10"
    dp.lb.put_backend(90, POD_B, 8080, "TCP")
    dp.lb.put_slots(90, [90])
    dp.lb.put_service(vip, 80, "TCP", 90, 1)
    dp.monitor.set_events(DEFS.defines["FP_MON_EV_TRACE"])
    try:
        events.poll()
        sport = next(_sport)
        r = run_prog(dp, bpfnet.ns, "fp_from_pod", bytes(tcp(POD_A, vip, 80, sport=sport)),
                     bpfnet.cali_a.ifindex)
        assert r.verdict == TC_ACT_REDIRECT
        r = run_prog(dp, bpfnet.ns, "fp_from_pod",
                     bytes(tcp(POD_B, POD_A, sport, sport=8080, flags="SA",
                               src_mac="02:00:00:00:0b:0b")), bpfnet.cali_b.ifindex)
        assert r.verdict == TC_ACT_REDIRECT
        assert Ether(r.out)[IP].src == vip        # the client sees the VIP
        evs = events.decoded()
        fwd = [e for e in evs if e["type"] == 2 and e["sport"] == sport]
        rep = [e for e in evs if e["type"] == 2 and e["dport"] == sport]
        assert len(fwd) == 1 and len(rep) == 1, evs
        assert (fwd[0]["saddr"], fwd[0]["daddr"], fwd[0]["dport"]) == (POD_A, vip, 80)
        assert fwd[0]["flags"] & DEFS.defines["FP_EV_F_NAT"]
        assert (rep[0]["saddr"], rep[0]["sport"], rep[0]["daddr"]) == (POD_B, 8080, POD_A)
    finally:
        dp.monitor.set_events(0)
        dp.lb.delete_service(vip, 80, "TCP")
        dp.lb.delete_slots(90, 1, 1)
        dp.lb.delete_backend(90)


def test_rule_writes_follow_what_the_diff_knows_the_map_holds(dp, policy):
    """RulePut.was (what the diff knows the map holds for the key) lets the
    writer skip a rewrite the map would not notice (it keeps only the
    lowest policy id and the audit flag) and skip reading a key that is not
    there; a real rewrite keeps the rule's flow count."""
    from agent.policy.diff import RulePut, UNKNOWN
    from agent.policy.state import Direction, PolicyKey, RuleValue
    pm = dp.policy
    key, was = next((k, v) for k, v in policy.endpoints[POD_B].rules.items()
                    if k.direction == Direction.INGRESS)
    raw = pm._rule_key(POD_B, key)
    low = min(was.policies)
    leaf = pm.rules[raw]
    leaf.flows = 41
    pm.rules[raw] = leaf
    try:
        # attribution only: another, higher policy id joins; nothing is written
        # (shown by a value planted behind the writer's back staying put)
        planted = pm.rules[raw]
        planted.policy_id = 7777
        pm.rules[raw] = planted
        pm.apply(RulePut(POD_B, key, RuleValue(tuple(sorted({*was.policies, 9000})), False), was))
        assert pm.rules[raw].policy_id == 7777
        # the lowest id changes: written, the flow count kept
        pm.apply(RulePut(POD_B, key, RuleValue((1,), False), was))
        assert (pm.rules[raw].policy_id, pm.rules[raw].flows) == (1, 41)
        # an unknown previous value: written, the flow count kept
        pm.apply(RulePut(POD_B, key, RuleValue((low,), True), UNKNOWN))
        got = pm.rules[raw]
        assert (got.policy_id, bool(got.flags), got.flows) == (low, True, 41)
        # a key the map does not have: written from nothing
        fresh = PolicyKey(Direction.INGRESS, 60000, 6, 4242, 16)
        pm.apply(RulePut(POD_B, fresh, RuleValue((low,), False), None))
        got = pm.rules[pm._rule_key(POD_B, fresh)]
        assert (got.policy_id, got.flows) == (low, 0)
    finally:
        from agent.policy.diff import RuleDelete
        pm.apply(RuleDelete(POD_B, PolicyKey(Direction.INGRESS, 60000, 6, 4242, 16)))
        pm.apply(RulePut(POD_B, key, was, UNKNOWN))
