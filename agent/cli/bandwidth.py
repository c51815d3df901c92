"""`fastpath bandwidth list`: every limited pod, its limits, what it sends
and receives now, and what its limits dropped, by reason.

From the pinned maps (so it works while the agent is down: limits, counts,
rates); pod names and rejected annotations come from the agent when it
answers. The current rate is measured here: the pod's counters read twice,
`--interval` seconds apart.
"""
from __future__ import annotations

import time

from agent.cli import bpfobj
from agent.cli.common import run
from agent.inspect import table as tbl


def _limits_of(fields):
    # imported on use: the annotation parser pulls in the Kubernetes model,
    # which commands that only list endpoints need not pay for
    from agent.bandwidth import limits_of
    return limits_of(fields)

M = bpfobj.aliases()
LIMIT_FIELDS = ("egress_rate", "egress_burst_ns", "ingress_rate", "ingress_burst_ns",
                "egress_pkt_ns", "egress_pkt_burst_ns", "ingress_pkt_ns", "ingress_pkt_burst_ns",
                "egress_max_conns", "ingress_max_conns")


def rate_text(bps) -> str:
    if bps is None:
        return "-"
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.4g}{unit}"
    return f"{bps:.0f}bit/s"


def limits_by_ip(ctx) -> dict[str, dict]:
    """Pod IP -> its limits as the pinned map holds them (units of the
    annotations: bits/s, bits, packets/s, packets, connections)."""
    out = {}
    for e in ctx.entries(M["bw"], missing_ok=True):
        v = e["value"]
        out[e["key"]] = _limits_of({f: v[f] for f in LIMIT_FIELDS}).as_dict()
    return out


def _totals(ctx) -> dict[tuple[str, str, str], tuple[int, int]]:
    out = {}
    for e in ctx.entries(M["bw_counters"], missing_ok=True):
        k, v = e["key"], e["value"]
        d = "egress" if k["dir_label"] == "from-pod" else "ingress"
        out[(k["ip4"], d, k["reason_label"])] = (v["packets"], v["bytes"])
    return out


def data_bandwidth(ctx, interval: float = 1.0) -> dict:
    limits = limits_by_ip(ctx)
    states = {e["key"]: e["value"] for e in ctx.entries(M["bw_state"], missing_ok=True)}
    entries = {e["key"]: e["value"] for e in ctx.entries(M["bw"], missing_ok=True)}
    t0, c0 = time.monotonic(), _totals(ctx)
    if interval > 0:
        time.sleep(interval)
    t1, c1 = time.monotonic(), _totals(ctx)
    agent = ctx.agent("Bandwidth") or {}
    eps = ctx.agent("Endpoints") or []
    ctx.note_agent_down("pod names and rejected annotations are not shown")
    names = {e["ip"]: e.get("pod", "") for e in eps}
    rows = []
    for ip in sorted(limits):
        st, ent = states.get(ip, {}), entries.get(ip, {})
        row = {"ip": ip, "pod": names.get(ip, ""), "limits": limits[ip], "rate_bps": {},
               "drops": {}, "connections": {}}
        for d in ("egress", "ingress"):
            now = c1.get((ip, d, "passed"), (0, 0))[1]
            before = c0.get((ip, d, "passed"), (0, 0))[1]
            row["rate_bps"][d] = (now - before) * 8 / (t1 - t0) if interval > 0 else None
            if st:
                row["connections"][d] = max(st[f"{d}_conns_opened"] - st[f"{d}_conns_closed"]
                                            - ent.get(f"{d}_conns_reaped", 0), 0)
        for (cip, d, reason), (pk, _) in c1.items():
            if cip == ip and reason.startswith("dropped-"):
                row["drops"][reason] = row["drops"].get(reason, 0) + pk
        rows.append(row)
    status = agent.get("status", {})
    return {"status": {k: status.get(k) for k in ("enabled", "mode", "summary", "enis")
                       if k in status},
            "problems": status.get("problems", []), "pods": rows, "interval": interval}


def _limit_text(lim: dict, d: str) -> str:
    parts = []
    if f"{d}_bps" in lim:
        parts.append(rate_text(lim[f"{d}_bps"]))
    if f"{d}_pps" in lim:
        parts.append(f"{lim[f'{d}_pps']:,}pkt/s")
    if f"{d}_max_conns" in lim:
        parts.append(f"{lim[f'{d}_max_conns']:,}conn")
    return " ".join(parts) or "-"


def limits_text(lim: dict) -> str:
    """One line for `endpoint get`: "egress 50Mbit/s, ingress 1000pkt/s ..." """
    if not lim:
        return "unlimited"
    parts = [f"{d} {_limit_text(lim, d)}" for d in ("egress", "ingress")
             if _limit_text(lim, d) != "-"]
    return ", ".join(parts)


def render(data: dict) -> str:
    cols = ["pod", "ip",
            ("egress limit", lambda r: _limit_text(r["limits"], "egress")),
            ("egress now", lambda r: rate_text(r["rate_bps"]["egress"])),
            ("ingress limit", lambda r: _limit_text(r["limits"], "ingress")),
            ("ingress now", lambda r: rate_text(r["rate_bps"]["ingress"])),
            ("conns (eg/in)", lambda r: "/".join(str(r["connections"].get(d, "-"))
                                                 for d in ("egress", "ingress"))),
            ("drops", lambda r: ", ".join(f"{k[len('dropped-'):]}={v:,}"
                                          for k, v in sorted(r["drops"].items())) or "-")]
    lines = []
    st = data["status"]
    if st.get("summary"):
        lines.append(f"bandwidth manager {st['summary']}")
    lines.append(tbl.table(data["pods"], cols) if data["pods"] else "(no pod is limited)")
    for p in data["problems"]:
        lines.append(f"rejected: {p}")
    return "\n".join(lines)


@run
def cmd_bandwidth_list(ctx, args) -> int:
    ctx.emit(data_bandwidth(ctx, args.interval), render)
    return 0
