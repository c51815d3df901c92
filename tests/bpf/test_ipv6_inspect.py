"""Inspection of IPv6 (issue #17): the monitor's events carry IPv6
addresses (struct fp_event6, flag FP_EV_F_IPV6) and the verdict counters
are kept per address family (fp_counter_key.family), run with
BPF_PROG_TEST_RUN on the dual-stack pods of tests/bpf/test_ipv6.py.
"""
from __future__ import annotations

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, TCP
from scapy.layers.l2 import Ether

from agent.datapath.maps import DEFS
from agent.inspect.events import decode_event, event_line, event_row
from tests.bpf.conftest import (POD_A, POD_A6, POD_B, POD_B6, REMOTE6, TC_ACT_REDIRECT,
                                TC_ACT_SHOT, counters, run_prog)
from tests.bpf.test_ipv6 import dual, from_pod, from_vpc, run  # noqa: F401 (fixture)


def drained(events) -> list[dict]:
    return [decode_event(raw, events.schema) for raw in events.poll()]


def test_an_ipv6_drop_from_the_vpc_is_reported_with_its_addresses_and_ports(dp, bpfnet, dual,
                                                                            events):
    n = bpfnet
    drained(events)
    pkt = from_vpc(n, POD_A6, POD_B6, TCP(sport=41001, dport=8443, flags="S"))
    r = run(dp, n, "fp_from_vpc", pkt, "eth1")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-source-spoofed")
    evs = [e for e in drained(events) if e["sport"] == 41001]
    assert len(evs) == 1, evs
    e = evs[0]
    assert (e["family"], e["saddr"], e["daddr"], e["dport"], e["proto_label"]) == (
        "ipv6", POD_A6, POD_B6, 8443, "TCP")
    assert e["flags_names"] == ["ipv6"] and e["type_label"] == "drop"
    row = event_row(e, links={n.eth1.ifindex: "eth1"})
    assert (row["family"], row["verdict"], row["reason"]) == (
        "ipv6", "dropped", "dropped-source-spoofed")
    assert f"TCP [{POD_A6}]:41001 -> [{POD_B6}]:8443" in event_line(row)


def test_the_guards_ipv6_drop_names_both_addresses(dp, bpfnet, dual, events):
    """A registered veth sending another local pod's IPv6 source is dropped
    by the guard (fp_from_pod6's, before it judges anything): the record
    holds the packet's addresses and the drop is counted as IPv6."""
    n = bpfnet
    drained(events)
    spoofed = Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IPv6(src=POD_B6, dst=REMOTE6) / UDP(
        sport=41002, dport=53)
    before = counters(dp, by_family=True)
    r = run(dp, n, "fp_from_pod", spoofed, "cali_a")
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-source-spoofed")
    evs = [e for e in drained(events) if e["reason_label"] == "dropped-source-spoofed"]
    assert len(evs) == 1, evs
    assert (evs[0]["family"], evs[0]["saddr"], evs[0]["daddr"], evs[0]["proto_label"]) == (
        "ipv6", POD_B6, REMOTE6, "UDP")
    key = (n.cali_a.ifindex, "from-pod", "dropped-source-spoofed", "ipv6")
    assert counters(dp, by_family=True).get(key, 0) == before.get(key, 0) + 1, "counted as IPv6"


def test_ipv6_forwarding_is_traced_with_its_addresses_while_a_monitor_asks(dp, bpfnet, dual,
                                                                           events):
    n = bpfnet
    pkt = lambda: from_pod(n, "a", POD_B6, UDP(sport=41003, dport=5353) / b"x")
    drained(events)
    assert run(dp, n, "fp_from_pod", pkt(), "cali_a").verdict == TC_ACT_REDIRECT
    assert [e for e in drained(events) if e["sport"] == 41003] == [], "no monitor: no trace"
    dp.monitor.set_events(DEFS.defines["FP_MON_EV_TRACE"])
    try:
        assert run(dp, n, "fp_from_pod", pkt(), "cali_a").verdict == TC_ACT_REDIRECT
        evs = [e for e in drained(events) if e["sport"] == 41003]
    finally:
        dp.monitor.set_events(0)
    assert len(evs) == 1, evs
    assert (evs[0]["type_label"], evs[0]["reason_label"], evs[0]["saddr"], evs[0]["daddr"],
            evs[0]["dport"]) == ("trace", "redirected-local", POD_A6, POD_B6, 5353)


def test_counters_are_kept_per_family_and_summed_without_it(dp, bpfnet, dual):
    n = bpfnet
    before = counters(dp, by_family=True)
    before_all = counters(dp)
    assert run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6), "cali_a").verdict == \
        TC_ACT_REDIRECT
    four = Ether(src=n.pod_a_mac, dst=n.cali_a.mac) / IP(src=POD_A, dst=POD_B) / UDP(
        sport=41004, dport=53) / b"q"
    assert run_prog(dp, n.ns, "fp_from_pod", bytes(four), n.cali_a.ifindex).verdict == \
        TC_ACT_REDIRECT
    after = counters(dp, by_family=True)
    for fam in ("ipv4", "ipv6"):
        key = (n.cali_a.ifindex, "from-pod", "redirected-local", fam)
        assert after.get(key, 0) == before.get(key, 0) + 1, fam
    key = (n.cali_a.ifindex, "from-pod", "redirected-local")
    after_all = counters(dp)
    assert after_all[key] == before_all.get(key, 0) + 2, "both families in the plain rows"


def test_the_traces_ipv6_packets_get_the_decisions_of_real_ones_and_change_nothing(
        dp, bpfnet, dual, events):
    """`fastpath trace` with IPv6 addresses: its packets (agent/cli/trace.py
    build_packet), marked what-if, enter fp_from_pod or fp_from_vpc, are
    handed to the IPv6 program and recorded: into the peer pod, out of the
    pod's ENI, and from the VPC into a pod. No counter, no event."""
    from agent.cli.trace import build_packet
    n = bpfnet
    whatif = DEFS.defines["FP_WHATIF_MARK"]
    before = counters(dp, by_family=True)
    drained(events)
    dp.monitor.set_events(DEFS.defines["FP_MON_EV_TRACE"])
    try:
        cases = (("fp_from_pod", n.cali_a, POD_A6, n.pod_a_mac, n.cali_a.mac, POD_B6, "tcp",
                  ("redirected-local", "redirect-peer", n.cali_b.ifindex)),
                 ("fp_from_pod", n.cali_a, POD_A6, n.pod_a_mac, n.cali_a.mac, REMOTE6, "icmpv6",
                  ("redirected-eni", "redirect", n.eth1.ifindex)),
                 ("fp_from_vpc", n.eth1, "fd00:20::99", "02:00:00:00:00:01", n.eth1.mac, POD_B6,
                  "udp", ("redirected-local", "redirect-peer", n.cali_b.ifindex)))
        for prog, dev, src, smac, dmac, dst, proto, want in cases:
            pkt = build_packet(src, smac, dmac, dst, 8080, proto)
            r = run_prog(dp, n.ns, prog, pkt, dev.ifindex, mark=whatif)
            assert (r.reason, r.redirect_kind, r.redirect_ifindex) == want, (prog, dst, proto)
        assert drained(events) == [], "a what-if run reports nothing"
    finally:
        dp.monitor.set_events(0)
    assert counters(dp, by_family=True) == before, "nor counts"


def test_an_ipv6_packet_whose_program_is_missing_is_counted_as_ipv6(dp, bpfnet, dual):
    """The hand-over's drop (an empty FP_TAIL_FROM_POD6 slot) is IPv6's,
    though the IPv4 program counts it."""
    import ctypes
    n = bpfnet
    tails = dp.module.table(DEFS.maps["FP_MAP_TAILS"])
    before = counters(dp, by_family=True)
    del tails[ctypes.c_int(int(DEFS.defines["FP_TAIL_FROM_POD6"]))]
    try:
        r = run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6), "cali_a")
    finally:
        dp.module.fill_tail_calls()
    assert (r.verdict, r.reason) == (TC_ACT_SHOT, "dropped-tail-call-missing")
    key = (n.cali_a.ifindex, "from-pod", "dropped-tail-call-missing")
    after = counters(dp, by_family=True)
    assert after.get(key + ("ipv6",), 0) == before.get(key + ("ipv6",), 0) + 1
    assert after.get(key + ("ipv4",), 0) == before.get(key + ("ipv4",), 0)
    assert run(dp, n, "fp_from_pod", from_pod(n, "a", POD_B6), "cali_a").verdict == \
        TC_ACT_REDIRECT, "the slot is back"
