"""Monitor events, what-if decisions and policy rule views, decoded with
the compiled programs' layouts (their BTF, the `compiled` fixture)."""
from __future__ import annotations

from agent.model import bpfdefs
from agent.inspect import decode, events
from agent.inspect import policy as pview

D = bpfdefs.load()


def raw_event(compiled, **f) -> bytes:
    ev = compiled.ctype(events.EVENT)()
    for k, v in f.items():
        if k in ("saddr", "daddr", "nat_daddr"):
            v = decode.ip4_raw(v)
        elif k in ("sport", "dport", "nat_dport"):
            v = decode.encode_port(v)
        setattr(ev, k, v)
    return bytes(ev)


def test_drop_event_names_interface_reason_policy_and_nat(compiled):
    deny = D.reason_value("dropped-policy-denied")
    etype = next(c.value for c in D.event_types.values() if c.label == "drop")
    raw = raw_event(compiled, ts_ns=9_000_000_000, ifindex=6, reason=deny, dir=0, type=etype,
                    saddr="10.0.0.3", daddr="192.168.0.10", sport=40000, dport=80, proto=6,
                    flags=D.defines["FP_EV_F_NAT"] | D.defines["FP_EV_F_INGRESS"],
                    nat_daddr="10.0.0.2", nat_dport=8080, policy_id=16, peer_id=258)
    ev = events.decode_event(raw, compiled)
    assert ev["flags_names"] == ["nat", "ingress"] and ev["type_label"] == "drop"
    row = events.event_row(ev, links={6: "cali6"}, policy_names={16: "default/b-from-a"},
                           mono_now_ns=10_000_000_000, wall_now=1000.0)
    assert row["time"] == 999.0
    assert (row["ifname"], row["dir"], row["verdict"], row["reason"]) == (
        "cali6", "from-pod", "dropped", "dropped-policy-denied")
    assert (row["nat_daddr"], row["nat_dport"], row["policy"], row["policy_direction"]) == (
        "10.0.0.2", 8080, "default/b-from-a", "ingress")
    line = events.event_line(row)
    assert "TCP 10.0.0.3:40000 -> 192.168.0.10:80 (nat -> 10.0.0.2:8080)" in line
    assert "dropped: dropped-policy-denied policy default/b-from-a (id 16) ingress" in line
    assert events.matches(row, {"drop"}, None)
    assert not events.matches(row, {"trace"}, None)
    assert events.matches(row, None, {"10.0.0.2"})            # the translated destination
    assert not events.matches(row, None, {"10.0.0.9"})
    assert events.matches(row, None, {"10.0.0.9"}, {6})       # seen on the pod's veth


def test_trace_event_without_nat_is_forwarded_and_has_no_policy(compiled):
    etype = next(c.value for c in D.event_types.values() if c.label == "trace")
    ev = events.decode_event(raw_event(compiled, ts_ns=1, ifindex=3, reason=0, dir=2,
                                       type=etype, saddr="10.0.9.9", daddr="10.0.0.2",
                                       proto=17), compiled)
    row = events.event_row(ev)
    assert (row["verdict"], row["nat"], row["nat_daddr"], row["policy"], row["dir"]) == (
        "forwarded", False, "", "", "from-vpc")


def decision(compiled, **f) -> dict:
    dec = compiled.ctype("struct fp_decision")()
    for k, v in f.items():
        if k in ("nexthop", "nat_daddr"):
            v = decode.ip4_raw(v)
        elif k == "nat_dport":
            v = decode.encode_port(v)
        if isinstance(v, list):
            getattr(dec, k)[:] = v
        else:
            setattr(dec, k, v)
    return decode.decode_value("struct fp_decision", dec, compiled)


def test_decision_of_a_translated_allowed_packet_and_of_a_denied_one(compiled):
    none = D.defines["FP_PV_NONE"]
    allow, deny = D.defines["FP_PV_ALLOW"], D.defines["FP_PV_DENY"]
    peer = next(c.value for c in D.redirect_kinds.values() if c.label == "redirect-peer")
    ok = decision(compiled, ifindex=5, kind=peer, reason=D.reason_value("redirected-local"),
                  svc_id=1, backend_id=2, nat_daddr="10.0.0.2", nat_dport=8080,
                  pv=[allow, none], policy_id=[16, 0], peer_id=[256, 0])
    assert ok["pv"] == {"ingress": allow, "ingress_label": "allow", "egress": none,
                        "egress_label": "none"}
    v = events.decision_view(ok, {5: "caliB"}, {16: "default/b-from-a"})
    assert v["service"] == {"svc_id": 1, "backend_id": 2, "nat_daddr": "10.0.0.2",
                            "nat_dport": 8080}
    assert v["policy"] == {"ingress": {"verdict": "allow", "policy_id": 16,
                                       "policy": "default/b-from-a", "peer_id": 256}}
    assert v["redirect"]["ifname"] == "caliB" and not v["dropped"]
    lines = events.decision_lines(v)
    assert lines[-1] == "verdict:  redirect-peer to caliB (redirected-local)"
    assert "ingress allow by default/b-from-a (id 16), peer identity 256" in lines[2]
    bad = decision(compiled, reason=D.reason_value("dropped-policy-denied"), pv=[deny, none],
                   policy_id=[16, 0], peer_id=[258, 0])
    v = events.decision_view(bad)
    assert v["dropped"] and v["service"] is None and v["policy"]["ingress"]["verdict"] == "deny"
    assert events.decision_lines(v)[-1] == "verdict:  DROP (dropped-policy-denied)"


def test_policy_rules_from_the_maps_and_merged_with_the_agents_names():
    fixed = D.defines["FP_POL_FIXED_BITS"]
    enforced = D.defines["FP_POL_F_ENFORCED"]
    ep = [{"key": "10.0.0.2", "value": {"dir": {
        "ingress": {"flags": enforced, "flags_names": ["enforced"], "policy_id": 16},
        "egress": {"flags": 0, "flags_names": [], "policy_id": 0}}}}]

    def rule(ident, proto, port, plen, pid, flows, ip="10.0.0.2"):
        return {"key": {"prefixlen": plen, "ep_ip4": ip, "identity": ident, "dir": 0,
                        "dir_label": "ingress", "proto": proto, "dport": port},
                "value": {"policy_id": pid, "flags": 0, "flags_names": [], "flows": flows}}
    rules = [rule(256, 6, 8080, fixed + 8 + 16, 16, 3), rule(1, 0, 0, fixed, 1, 0),
             rule(300, 17, 1024, fixed + 8 + 6, 17, 1),       # 1024-2047
             rule(256, 6, 80, fixed + 24, 16, 9, ip="10.0.0.9")]
    m = pview.map_rules(ep, rules, "10.0.0.2", fixed)
    assert m["directions"]["ingress"] == {"enforced": True, "audit": False,
                                         "deciding_ids": [16]}
    assert [(r["identity"], r["ports"], r["policy_ids"], r["flows"]) for r in m["rules"]] == [
        (1, "any", [1], 0), (256, "TCP/8080", [16], 3), (300, "UDP/1024-2047", [17], 1)]
    agent = {"ip": "10.0.0.2", "pod": "default/b", "directions": {}, "rules": [
        {"direction": "ingress", "identity": 256, "proto": 6, "port": 8080,
         "port_prefixlen": 16, "policies": ["default/b-from-a"], "policy_ids": [16]},
        {"direction": "ingress", "identity": 999, "proto": 6, "port": 9, "port_prefixlen": 16,
         "policies": ["x/y"], "policy_ids": [20]}]}
    merged = pview.merge(agent, m)
    assert [(r["policies"], r["flows"], r["in_map"]) for r in merged["rules"]] == [
        (["default/b-from-a"], 3, True), (["x/y"], None, False)]
    assert pview.merge(None, m) is m


def raw_event6(compiled, saddr6: str, daddr6: str, **f) -> bytes:
    import socket
    ev = compiled.ctype(events.EVENT6)()
    ev.ev = compiled.ctype(events.EVENT).from_buffer_copy(raw_event(compiled, **f))
    ev.saddr6[:] = list(socket.inet_pton(socket.AF_INET6, saddr6))
    ev.daddr6[:] = list(socket.inet_pton(socket.AF_INET6, daddr6))
    return bytes(ev)


def test_an_ipv6_event_decodes_its_addresses_from_the_ipv6_record(compiled):
    etype = next(c.value for c in D.event_types.values() if c.label == "drop")
    spoof = D.reason_value("dropped-source-spoofed")
    raw = raw_event6(compiled, "fd00:10::1:a", "fd00:20::20", ts_ns=1, ifindex=4, reason=spoof,
                     dir=2, type=etype, sport=41000, dport=443, proto=6,
                     flags=D.defines["FP_EV_F_IPV6"])
    ev = events.decode_event(raw, compiled)
    assert (ev["family"], ev["saddr"], ev["daddr"], ev["nat_daddr"]) == (
        "ipv6", "fd00:10::1:a", "fd00:20::20", "::")
    row = events.event_row(ev, links={4: "eth1"})
    assert (row["family"], row["verdict"], row["dir"]) == ("ipv6", "dropped", "from-vpc")
    assert "TCP [fd00:10::1:a]:41000 -> [fd00:20::20]:443  dropped: dropped-source-spoofed" \
        in events.event_line(row)
    assert events.matches(row, None, {"fd00:10::1:a"})
    # the same bytes without the flag are an IPv4 record, read no further
    v4 = events.decode_event(raw_event(compiled, ts_ns=1, ifindex=4, reason=spoof, dir=2,
                                       type=etype, saddr="10.0.0.1", daddr="10.0.0.2"), compiled)
    assert (v4["family"], v4["saddr"]) == ("ipv4", "10.0.0.1")
