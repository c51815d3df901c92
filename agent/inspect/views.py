"""Joined views over decoded map entries (see decode.py for the entry form).

Each function takes decoded entries ({"key": ..., "value": ...}) of the maps
it needs plus what the agent knows (names, states) when it answers, and
returns rows of plain data: the `--json` output of the CLI, documented in
the README's CLI section.
"""
from __future__ import annotations

import ipaddress
from collections import Counter

from agent.model import bpfdefs
from agent.inspect.decode import PROTO_NUMBERS


def _ipkey(ip: str):
    """A sort key for addresses of both families (IPv4 first)."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        a = ipaddress.ip_address("0.0.0.0")
    return a.version, int(a)


# -- endpoints ---------------------------------------------------------------

def endpoints(entries: list[dict], links: dict[int, str], agent_view: list[dict] | None = None,
              policy: dict[str, dict] | None = None) -> list[dict]:
    """Rows of the endpoints map, with interface names and, when the agent
    answers, the pod; `policy` maps pod IP -> its policy state."""
    by_ip = {e["ip"]: e for e in (agent_view or [])}
    rows = []
    for ent in entries:
        k, v = ent["key"], ent["value"]
        ip = k["ip4"]
        a = by_ip.get(ip, {})
        rows.append({
            "ip": ip,
            "pod": a.get("pod", ""),
            "host_ifname": links.get(v["host_ifindex"], a.get("host_ifname", "")),
            "host_ifindex": v["host_ifindex"],
            "eni": links.get(v["eni_ifindex"], a.get("eni", "")) if v["eni_ifindex"] else "",
            "eni_ifindex": v["eni_ifindex"],
            "pod_mac": v["pod_mac"],
            "host_mac": v["host_mac"],
            "ep_id": v["ep_id"],
            "registered": "registered" in v.get("flags_names", []),
            "policy": (policy or {}).get(ip, {"state": "unknown" if policy is None else
                                              "not-isolated"}),
            "container_id": a.get("container_id", ""),
        })
    return sorted(rows, key=lambda r: _ipkey(r["ip"]))


def policy_state_text(p: dict) -> str:
    """One word for a table cell from an endpoint's policy state."""
    if not p:
        return "-"
    if "state" in p:
        return p["state"]
    parts = []
    for d in ("ingress", "egress"):
        s = p.get(d)
        if s and s != "open":
            parts.append(f"{d}:{s}")
    return ",".join(parts) or "not-isolated"


# -- services ----------------------------------------------------------------

def frontend_text(ip: str, port: int, proto: str) -> str:
    return f"{ip}:{port}/{proto}"


def services(svc: list[dict], slots: list[dict], backends: list[dict],
             names: list[dict] | None = None) -> list[dict]:
    """Frontend -> backends, from the three service maps (and the agent's
    view of which Service and port each frontend is, when it answers).

    A backend's `state` comes from the agent (ready / terminating / ...)
    when it answers; from the maps alone it is `active` when its slot
    points at a backend entry, `missing` when the entry is absent."""
    be_by_id = {e["key"]: e["value"] for e in backends}
    slot_by = {}
    for e in slots:
        slot_by.setdefault(e["key"]["svc_id"], {})[e["key"]["slot"]] = e["value"]["backend_id"]
    named = {(n["vip"], n["port"], n["proto"], n.get("scope", "internal")): n
             for n in (names or [])}
    rows = []
    for e in svc:
        k, v = e["key"], e["value"]
        proto = k.get("proto_label", str(k["proto"]))
        scope = "external" if k.get("scope") else "internal"
        fe = (k["vip"], k["port"], proto)
        info = named.get(fe + (scope,), {})
        agent_be = {(b["ip"], b["port"]): b for b in info.get("backends", [])}
        flags = v.get("flags_names", [])
        bes = []
        for slot in range(1, v["count"] + 1):
            bid = slot_by.get(v["svc_id"], {}).get(slot)
            be = be_by_id.get(bid) if bid is not None else None
            if be is None:
                bes.append({"slot": slot, "backend_id": bid, "ip": "", "port": 0,
                            "state": "missing"})
                continue
            a = agent_be.get((be["ip"], be["port"]), {})
            bes.append({"slot": slot, "backend_id": bid, "ip": be["ip"], "port": be["port"],
                        "state": a.get("state", "active"), "node": a.get("node", ""),
                        "zone": a.get("zone", "")})
        rows.append({
            "frontend": frontend_text(*fe) + (" (external)" if scope == "external" else ""),
            "vip": k["vip"], "port": k["port"], "proto": proto, "scope": scope,
            "service": info.get("service", ""), "port_name": info.get("port_name", ""),
            "kind": info.get("kind", "") or _kind_of(flags),
            "svc_id": v["svc_id"], "flags": flags,
            "affinity": "ClientIP" if "affinity" in flags else "None",
            "affinity_timeout": v["affinity_timeout"],
            "traffic_policy": "Local" if "local" in flags else "Cluster",
            "reject": "reject" in flags, "drop": "drop" in flags,
            "maglev": "maglev" in flags,
            "source_ranges": info.get("source_ranges", []),
            "backends": bes,
        })
    return sorted(rows, key=lambda r: (_ipkey(r["vip"]), r["port"], r["proto"], r["scope"]))


def _kind_of(flags: list[str]) -> str:
    """The frontend's kind from its flags alone (the agent down)."""
    if "nodeport" in flags:
        return "nodeport"
    if "hostport" in flags:
        return "hostport"
    return "external" if "external" in flags else "clusterip"


def backends_text(row: dict, limit: int = 4) -> str:
    if row["reject"] and not row["backends"]:
        return "(none: rejected)"
    if row.get("drop") and not row["backends"]:
        return "(none here: dropped)"
    parts = [f"{b['ip']}:{b['port']}" + ("" if b["state"] in ("active", "ready")
                                          else f"({b['state']})") for b in row["backends"]]
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f", +{more} more" if more > 0 else "")


def find_service(rows: list[dict], query: str) -> list[dict]:
    """By ns/name, name, VIP, VIP:port, or VIP:port/PROTO."""
    q = query.strip()
    out = []
    for r in rows:
        svc = r["service"]
        if q in (svc, svc.split("/", 1)[-1] if svc else None, r["vip"],
                 f"{r['vip']}:{r['port']}", r["frontend"],
                 frontend_text(r["vip"], r["port"], r["proto"])):
            out.append(r)
    return out


# -- conntrack ---------------------------------------------------------------

def ct_rows(entries: list[dict], now_ns: int, table: str = "") -> list[dict]:
    """One row per conntrack entry, in flow terms: `client` is the side
    that opened the flow, `frontend` the Service address it asked for and
    `backend` the address it was translated to, whichever direction the
    entry is for. `table`: the map the entries come from (established, new
    or policy; established6 and new6 for IPv6 flows), kept in each row."""
    rows = []
    for e in entries:
        k, v = e["key"], e["value"]
        d = k.get("dir_label", str(k["dir"]))
        if d == "policy":
            # a policy entry: the tuple after translation, no NAT of its own
            # (lower end first: the originator is at either end)
            v = {"nat_addr": k["daddr"], "nat_port": k["dport"], "svc_id": 0,
                 "backend_id": 0, **v}
            client, cport = k["saddr"], k["sport"]
            vip, vport = k["daddr"], k["dport"]
            backend, bport = k["daddr"], k["dport"]
        elif d == "reply":
            client, cport = k["daddr"], k["dport"]
            backend, bport = k["saddr"], k["sport"]
            vip, vport = v["nat_addr"], v["nat_port"]
        else:
            client, cport = k["saddr"], k["sport"]
            vip, vport = k["daddr"], k["dport"]
            backend, bport = v["nat_addr"], v["nat_port"]
        age = max(0, now_ns - v["last_seen"]) / 1e9 if v["last_seen"] else None
        rows.append({
            "dir": d, "dir_num": k["dir"], "proto": k.get("proto_label", str(k["proto"])),
            "proto_num": k["proto"],
            "saddr": k["saddr"], "sport": k["sport"], "daddr": k["daddr"], "dport": k["dport"],
            "nat_addr": v["nat_addr"], "nat_port": v["nat_port"],
            "client": client, "client_port": cport, "frontend": vip, "frontend_port": vport,
            "backend": backend, "backend_port": bport,
            "svc_id": v["svc_id"], "backend_id": v["backend_id"],
            "flags": v.get("flags_names", []), "table": table,
            "state": v.get("state_label", ""), "state_num": v.get("state", 0),
            "age_seconds": round(age, 3) if age is not None else None,
        })
    return sorted(rows, key=lambda r: (_ipkey(r["client"]), r["client_port"], r["dir"]))


def _in(addr: str, spec: str | None) -> bool:
    if not spec:
        return True
    try:
        return ipaddress.ip_address(addr) in ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False


def ct_match(row: dict, src: str | None = None, dst: str | None = None,
             proto: str | None = None, port: int | None = None) -> bool:
    """--src matches the flow's client; --dst its frontend or backend (an
    address or a CIDR); --proto TCP/UDP; --port the frontend or backend port."""
    if proto and row["proto"].upper() != proto.upper():
        return False
    if not _in(row["client"], src):
        return False
    if dst and not (_in(row["frontend"], dst) or _in(row["backend"], dst)):
        return False
    if port and port not in (row["frontend_port"], row["backend_port"]):
        return False
    return True


def ct_top(rows: list[dict], endpoints_rows: list[dict], max_entries: int,
           n: int = 10) -> dict:
    """Busiest endpoints: how many conntrack entries each address holds as
    client or backend, busiest first, with the pod when it is local."""
    counts: Counter = Counter()
    for r in rows:
        counts[("client", r["client"])] += 1
        counts[("backend", r["backend"])] += 1
    eps = {e["ip"]: e for e in endpoints_rows}
    per_ip: dict[str, dict] = {}
    for (role, ip), c in counts.items():
        d = per_ip.setdefault(ip, {"ip": ip, "as_client": 0, "as_backend": 0})
        d["as_" + role] += c
    top = []
    for d in per_ip.values():
        d["entries"] = d["as_client"] + d["as_backend"]
        ep = eps.get(d["ip"])
        d["pod"] = ep["pod"] if ep else ""
        d["local"] = ep is not None
        d["share"] = round(d["entries"] / len(rows), 4) if rows else 0.0
        top.append(d)
    top.sort(key=lambda d: (-d["entries"], _ipkey(d["ip"])))
    return {"entries": len(rows), "max_entries": max_entries,
            "fill": round(len(rows) / max_entries, 4) if max_entries else 0.0,
            "top": top[:n]}


def proto_number(name: str) -> int:
    try:
        return PROTO_NUMBERS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r} (TCP, UDP, ICMP, SCTP)") from None


# -- counters ----------------------------------------------------------------

def counters(entries: list[dict], links: dict[int, str]) -> list[dict]:
    rows = []
    for e in entries:
        k, v = e["key"], e["value"]
        rows.append({"ifindex": k["ifindex"], "ifname": links.get(k["ifindex"], ""),
                     "direction": k["dir_label"], "reason": k["reason_label"],
                     "reason_code": k["reason"], "drop": bpfdefs.load().is_drop(k["reason"]),
                     # a map pinned before the family split has no family: IPv4 then
                     "family": k.get("family_label", "ipv4"),
                     "packets": v["packets"], "bytes": v["bytes"]})
    return sorted(rows, key=lambda r: (r["ifindex"], r["direction"], r["reason_code"],
                                       r["family"]))
