"""`fastpath policy get ENDPOINT`: a pod's effective NetworkPolicy rules,
each traced to the policies (namespace/name) that admit it, with per-rule
hit counters from the pinned rule map."""
from __future__ import annotations

from agent.model import bpfdefs
from agent.cli import bpfobj
from agent.cli.common import EXIT_FAIL, CliExit, run
from agent.inspect import policy as pview
from agent.inspect import table as tbl


def _endpoint_ip(ctx, spec: str) -> str:
    from agent.cli import views
    if all(c.isdigit() or c == "." for c in spec):
        return spec
    rows = views.data_endpoints(ctx)
    # a pod's IPv6 address names it too: its rules are keyed by its IPv4 one
    hit = [r["ip"] for r in rows if spec in (r["pod"], r["pod"].split("/")[-1] if r["pod"]
                                             else None, r["host_ifname"], r.get("ip6") or None)]
    if not hit:
        raise CliExit(EXIT_FAIL, f"no endpoint {spec!r} on this node (IP, namespace/pod, pod)")
    return hit[0]


def data_policy(ctx, spec: str) -> dict:
    from agent.api.inspect import AgentUnreachable  # noqa: F401  (errors come as CliExit)
    M = bpfobj.aliases()
    ip = _endpoint_ip(ctx, spec)
    agent_view = None
    try:
        agent_view = ctx.agent("Policy", endpoint=ip)
    except CliExit as exc:
        ctx.notes.append(exc.message)
    maps_view = None
    if M.get("policy_ep") in ctx.maps() and M.get("policy") in ctx.maps():
        maps_view = pview.map_rules(ctx.entries(M["policy_ep"]), ctx.entries(M["policy"]), ip,
                                    bpfdefs.load().defines["FP_POL_FIXED_BITS"])
    ctx.note_agent_down("policies are shown by id")
    out = pview.merge(agent_view, maps_view)
    if out is None:
        raise CliExit(EXIT_FAIL, "neither the agent nor the pinned maps hold NetworkPolicy state")
    return out


def render(d: dict) -> str:
    lines = [f"endpoint {d.get('pod') or ''} {d['ip']}".replace("  ", " ")]
    for direction in ("ingress", "egress"):
        s = d["directions"].get(direction) or {}
        state = "enforced" if s.get("enforced") else "audit" if s.get("audit") else "not isolated"
        who = s.get("deciding") or [f"id {i}" for i in s.get("deciding_ids", [])]
        lines.append(f"  {direction}: {state}" + (f" (default deny from {', '.join(who)})"
                                                   if who and state != "not isolated" else ""))
    if d.get("refused"):
        lines.append(f"  REFUSED (isolated by them, their rules not written: the policy maps are "
                     f"full): {', '.join(d['refused'])}")
    if d.get("pending"):
        lines.append("  PENDING: its labels were not known at CNI ADD; only the node reaches it "
                     "until its Pod arrives")
    rows = d["rules"]
    if not rows:
        lines.append("(no rules: everything an isolated direction sees is denied)")
        return "\n".join(lines)
    lines.append(tbl.table(rows, [
        "direction", ("peer", lambda r: r.get("peer") or ("any" if r["identity"] == 0
                                                          else f"identity {r['identity']}")),
        "ports", ("policies", lambda r: ", ".join(r.get("policies") or
                                                  [f"id {i}" for i in r["policy_ids"]])),
        ("audit", "audit"), ("hits", lambda r: r.get("flows"))]))
    return "\n".join(lines)


@run
def cmd_policy_get(ctx, args) -> int:
    ctx.emit(data_policy(ctx, args.endpoint), render)
    return 0
