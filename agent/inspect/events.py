"""Monitor events (struct fp_event) and what-if decisions (struct
fp_decision) as rows and lines, decoded with the programs' BTF (a schema,
see decode.py)."""
from __future__ import annotations

import time

from agent.model import bpfdefs
from agent.inspect import decode


EVENT = "struct fp_event"        # the record of the events ring buffer
EVENT6 = "struct fp_event6"      # an IPv6 packet's: fp_event (flag ipv6), then its addresses


def decode_event(raw: bytes, schema) -> dict:
    """One record: an IPv4 event, or (flag `ipv6`) an IPv6 one whose
    addresses replace the common record's (0.0.0.0 there). `family` says
    which."""
    ev = decode.decode_value(EVENT, decode.from_bytes(EVENT, raw, schema), schema)
    if "ipv6" not in ev.get("flags_names", []):
        ev["family"] = "ipv4"
        return ev
    six = decode.decode_value(EVENT6, decode.from_bytes(EVENT6, raw, schema), schema)
    ev["saddr"], ev["daddr"], ev["nat_daddr"] = six["saddr6"], six["daddr6"], six["nat_daddr6"]
    ev["family"] = "ipv6"
    return ev


def event_row(ev: dict, *, links: dict[int, str] | None = None,
              policy_names: dict[int, str] | None = None, mono_now_ns: int | None = None,
              wall_now: float | None = None) -> dict:
    """A decoded event with names: interface, reason, verdict, policy."""
    d = bpfdefs.load()
    links = links or {}
    names = policy_names or {}
    mono_now_ns = time.monotonic_ns() if mono_now_ns is None else mono_now_ns
    wall_now = time.time() if wall_now is None else wall_now
    flags = ev.get("flags_names", [])
    etype = ev["type_label"]
    if d.is_drop(ev["reason"]):
        verdict = "dropped"
    elif ev["reason_label"] == "policy-audit-would-deny":
        verdict = "audit-would-deny"
    else:
        verdict = "forwarded"
    if etype == "policy-verdict" and verdict == "forwarded":
        verdict = "allowed"
    row = {
        "time": wall_now - (mono_now_ns - ev["ts_ns"]) / 1e9,
        "ts_ns": ev["ts_ns"], "type": etype, "family": ev.get("family", "ipv4"),
        "ifindex": ev["ifindex"],
        "ifname": links.get(ev["ifindex"], ""), "dir": ev["dir_label"],
        "reason": ev["reason_label"], "reason_code": ev["reason"], "verdict": verdict,
        "proto": ev["proto_label"], "saddr": ev["saddr"], "sport": ev["sport"],
        "daddr": ev["daddr"], "dport": ev["dport"],
        "nat": "nat" in flags,
        "nat_daddr": ev["nat_daddr"] if "nat" in flags else "",
        "nat_dport": ev["nat_dport"] if "nat" in flags else 0,
        "policy_direction": ("ingress" if "ingress" in flags else "egress")
        if etype == "policy-verdict" or ev["policy_id"] else "",
        "policy_id": ev["policy_id"],
        "policy": names.get(ev["policy_id"], "") if ev["policy_id"] else "",
        "peer_id": ev["peer_id"],
    }
    return row


def event_line(r: dict) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(r["time"])) + f".{int(r['time'] * 1e6) % 1000000:06d}"
    where = f"{r['ifname'] or r['ifindex']} {r['dir']}"
    tup = (f"{r['proto']} {_hostport(r['saddr'], r['sport'])} -> "
           f"{_hostport(r['daddr'], r['dport'])}")
    if r["nat"]:
        tup += f" (nat -> {_hostport(r['nat_daddr'], r['nat_dport'])})"
    pol = ""
    if r["policy_id"]:
        pol = f" policy {r['policy'] or r['policy_id']}"
        if r["policy"]:
            pol += f" (id {r['policy_id']})"
        if r["policy_direction"]:
            pol += f" {r['policy_direction']}"
    return f"{t} {r['type']:<14} {where:<24} {tup}  {r['verdict']}: {r['reason']}{pol}"


def _hostport(addr: str, port: int) -> str:
    """addr:port, an IPv6 address in brackets ([fd00::a]:80)."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def matches(r: dict, types: set[str] | None, addrs: set[str] | None,
            ifindexes: set[int] | None = None) -> bool:
    """--type, and --endpoint: an event of the pod's address (source,
    destination or translated destination) or seen on its host veth (a
    frame too short to parse has no addresses)."""
    if types and r["type"] not in types:
        return False
    if addrs or ifindexes:
        if not ({r["saddr"], r["daddr"], r["nat_daddr"]} & (addrs or set())
                or r["ifindex"] in (ifindexes or set())):
            return False
    return True


def decision_view(dec: dict, links: dict[int, str] | None = None,
                  policy_names: dict[int, str] | None = None,
                  backends: dict[int, dict] | None = None) -> dict:
    """struct fp_decision -> the steps `fastpath trace` prints."""
    links = links or {}
    names = policy_names or {}
    d = bpfdefs.load()
    out = {"reason": dec["reason_label"], "reason_code": dec["reason"],
           "dropped": d.is_drop(dec["reason"]),
           "redirect": {"kind": dec["kind_label"], "ifindex": dec["ifindex"],
                        "ifname": links.get(dec["ifindex"], ""), "nexthop": dec["nexthop"]},
           "service": None, "policy": {}}
    if dec["svc_id"]:
        out["service"] = {"svc_id": dec["svc_id"], "backend_id": dec["backend_id"],
                          "nat_daddr": dec["nat_daddr"], "nat_dport": dec["nat_dport"]}
    for direction in ("ingress", "egress"):
        label = dec["pv"].get(direction + "_label", "")
        if label in ("none", ""):
            continue
        pid = dec["policy_id"][direction]
        out["policy"][direction] = {"verdict": label, "policy_id": pid,
                                    "policy": names.get(pid, ""),
                                    "peer_id": dec["peer_id"][direction]}
    return out


def decision_lines(v: dict) -> list[str]:
    lines = []
    s = v["service"]
    if s:
        lines.append(f"service:  translated by service id {s['svc_id']} to backend "
                     f"{s['backend_id']} {s['nat_daddr']}:{s['nat_dport']}")
    else:
        lines.append("service:  no translation")
    for direction in ("egress", "ingress"):
        p = v["policy"].get(direction)
        if p is None:
            lines.append(f"policy:   {direction} not checked (not isolated)")
            continue
        who = p["policy"] or (f"id {p['policy_id']}" if p["policy_id"] else "no policy")
        if p["policy"] and p["policy_id"]:
            who += f" (id {p['policy_id']})"
        lines.append(f"policy:   {direction} {p['verdict']} by {who}, peer identity {p['peer_id']}")
    r = v["redirect"]
    if v["dropped"]:
        lines.append(f"verdict:  DROP ({v['reason']})")
    elif r["kind"] != "none":
        tgt = r["ifname"] or str(r["ifindex"])
        lines.append(f"verdict:  {r['kind']} to {tgt}"
                     + (f" via {r['nexthop']}" if r["nexthop"] != "0.0.0.0" else "")
                     + f" ({v['reason']})")
    else:
        lines.append(f"verdict:  {v['reason']}")
    return lines
