"""fastpath's own views: endpoints, services, conntrack, metrics, status.

Each view reads the pinned maps (so it works while the agent is down) and
adds what the agent knows (pod and Service names, backend states, sync
state) when it answers over gRPC. `data_*` functions return the `--json`
form; `fastpath bugtool` collects them all.
"""
from __future__ import annotations

from agent.cli import bpfobj
from agent.cli.common import (EXIT_FAIL, EXIT_NO_AGENT, EXIT_USAGE, CliExit, fmt_age, now_ns,
                              run)
from agent.inspect import table as tbl
from agent.inspect import views

M = bpfobj.aliases()


# -- endpoints ---------------------------------------------------------------

def policy_states(ctx) -> tuple[bool | None, dict]:
    """pod IP -> its policy state, from the pinned maps (works while the
    agent is down): {"state": "not-enforced"} for every pod when the
    datapath's policy checks are off, else per direction enforced / audit /
    open with the deciding policy id."""
    from agent.model import bpfdefs
    maps = ctx.maps()
    if M.get("policy_ep") not in maps or M.get("config") not in maps:
        return None, {}
    cfg = ctx.entries(M["config"])
    on = bool(cfg) and "policy" in cfg[0]["value"].get("flags_names", [])
    if not on:
        return False, {}
    out = {}
    for e in ctx.entries(M["policy_ep"]):
        dirs = {}
        for d, v in e["value"]["dir"].items():
            if d.endswith("_label"):
                continue
            names = v.get("flags_names", [])
            dirs[d] = ("enforced" if "enforced" in names else "audit" if "audit" in names
                       else "open")
            if v["policy_id"] and dirs[d] != "open":
                dirs[d] += f"({v['policy_id']})"
        out[e["key"]] = dirs
    return True, out


def data_endpoints(ctx) -> list[dict]:
    from agent.cli.bandwidth import limits_by_ip
    entries = ctx.entries(M["endpoints"])
    agent_view = ctx.agent("Endpoints")
    ctx.note_agent_down("pod names are not shown")
    enabled, pol = policy_states(ctx)
    rows = views.endpoints(entries, ctx.links(), agent_view, pol if enabled else None)
    if enabled is False:
        for r in rows:
            r["policy"] = {"state": "not-enforced"}
    limits = limits_by_ip(ctx)
    for r in rows:
        r["bandwidth"] = limits.get(r["ip"], {})
    # a dual-stack pod's IPv6 address, from the IPv6 twin of the map
    entries6 = ctx.entries(M["endpoints6"], missing_ok=True) if "endpoints6" in M else []
    ip6_of = {e["value"]["host_ifindex"]: e["key"]["ip6"] for e in entries6}
    for r in rows:
        r["ip6"] = ip6_of.get(r["host_ifindex"], "")
        r["key"] = r["ip"]
    # IPv6-only pods: in the IPv6 map alone, known to the per-pod maps by
    # the endpoint key of their veth's registration
    seen = {r["host_ifindex"] for r in rows}
    only6 = [e for e in entries6 if e["value"]["host_ifindex"] not in seen]
    if only6:
        keys = {e["key"]: e["value"]["ip4"]
                for e in ctx.entries(M["ep_ifindex"], missing_ok=True)}
        extra = views.endpoints([{"key": {"ip4": keys.get(e["value"]["host_ifindex"], "")},
                                  "value": e["value"]} for e in only6],
                                ctx.links(), agent_view, pol if enabled else None)
        for r, e in zip(sorted(extra, key=lambda r: r["host_ifindex"]),
                        sorted(only6, key=lambda e: e["value"]["host_ifindex"])):
            r["key"], r["ip"], r["ip6"] = r["ip"], "", e["key"]["ip6"]
            if enabled is False:
                r["policy"] = {"state": "not-enforced"}
            r["bandwidth"] = limits.get(r["key"], {})
            if not r["pod"] or not r["container_id"]:
                a = next((a for a in agent_view or [] if a.get("ip6") == r["ip6"]), {})
                r["pod"] = r["pod"] or a.get("pod", "")
                r["container_id"] = r["container_id"] or a.get("container_id", "")
        rows += extra
    return rows


ENDPOINT_COLS = [("ip", lambda r: r["ip"] or "-"), ("ip6", lambda r: r.get("ip6") or "-"),
                 "pod",
                 ("host_veth", "host_ifname"), "eni",
                 ("policy", lambda r: views.policy_state_text(r["policy"])), "pod_mac",
                 ("ep_id", "ep_id")]


@run
def cmd_endpoint_list(ctx, args) -> int:
    ctx.emit(data_endpoints(ctx), lambda rows: tbl.table(rows, ENDPOINT_COLS))
    return 0


@run
def cmd_endpoint_get(ctx, args) -> int:
    rows = data_endpoints(ctx)
    q = args.endpoint
    hit = [r for r in rows if q in (r["ip"], r["ip6"] or None, r["pod"],
                                    r["pod"].split("/")[-1] if r["pod"] else
                                    None, r["host_ifname"], r["container_id"])]
    if not hit:
        raise CliExit(EXIT_FAIL, f"no endpoint {q!r} on this node (by IP or IPv6, namespace/pod, pod, "
                                 "host veth or container id)")
    if len(hit) > 1:
        raise CliExit(EXIT_FAIL, f"{q!r} names {len(hit)} endpoints: "
                                 + ", ".join(r["ip"] for r in hit))
    r = hit[0]

    def render(r):
        from agent.cli.bandwidth import limits_text
        return "\n".join(f"{k}: {views.policy_state_text(v) if k == 'policy' else limits_text(v) if k == 'bandwidth' else v}"
                         for k, v in r.items())
    ctx.emit(r, render)
    return 0


# -- services ----------------------------------------------------------------

def data_services(ctx) -> list[dict]:
    svc = ctx.entries(M["services"])
    slots = ctx.entries(M["slots"])
    bes = ctx.entries(M["backends"])
    names = ctx.agent("Services")
    ctx.note_agent_down("Service names and backend states come from the maps alone")
    return views.services(svc, slots, bes, names)


SERVICE_COLS = ["frontend", ("service", lambda r: (r["service"] + (":" + r["port_name"]
                                                                    if r["port_name"] else ""))
                             or "-"),
                ("kind", lambda r: r.get("kind") or "-"),
                ("id", "svc_id"), ("affinity", lambda r: r["affinity"] if r["affinity"] == "None"
                                   else f"{r['affinity']}({r['affinity_timeout']}s)"),
                ("traffic", "traffic_policy"), ("backends", views.backends_text)]


@run
def cmd_service_list(ctx, args) -> int:
    ctx.emit(data_services(ctx), lambda rows: tbl.table(rows, SERVICE_COLS))
    return 0


@run
def cmd_service_get(ctx, args) -> int:
    rows = views.find_service(data_services(ctx), args.service)
    if not rows:
        raise CliExit(EXIT_FAIL, f"no Service frontend {args.service!r} in the service map "
                                 "(by namespace/name, name, VIP, VIP:port or VIP:port/PROTO)")

    def render(rows):
        out = []
        for r in rows:
            out.append(f"{r['frontend']}  {r['service'] or '(name unknown)'}"
                       f"{':' + r['port_name'] if r['port_name'] else ''}  id {r['svc_id']}  "
                       f"affinity {r['affinity']}"
                       f"{' ' + str(r['affinity_timeout']) + 's' if r['affinity'] != 'None' else ''}"
                       f"  traffic {r['traffic_policy']}{'  REJECT' if r['reject'] else ''}"
                       f"{'  DROP' if r.get('drop') else ''}{'  maglev' if r.get('maglev') else ''}"
                       + (f"  from {', '.join(r['source_ranges'])}" if r.get("source_ranges")
                          else ""))
            out.append(tbl.table(r["backends"], ["slot", ("backend_id", "backend_id"), "ip",
                                                 "port", "state", "node", "zone"]))
            out.append("")
        return "\n".join(out).rstrip()
    ctx.emit(rows, render)
    return 0


# -- conntrack ---------------------------------------------------------------

# The conntrack maps as `ct list` shows them: translated flows, established
# and new, of each family, then flows NetworkPolicy admitted.
CT_TABLES = (("established", "ct"), ("new", "ct_new"), ("established6", "ct6"),
             ("new6", "ct_new6"), ("policy", "ct_policy"))


def data_ct(ctx, args=None) -> list[dict]:
    rows = []
    for table, alias in CT_TABLES:
        rows += views.ct_rows(ctx.entries(M[alias], missing_ok=True), now_ns(), table)
    if args is not None:
        if getattr(args, "proto", None):
            try:
                views.proto_number(args.proto)
            except ValueError as exc:
                raise CliExit(EXIT_USAGE, str(exc)) from None
        rows = [r for r in rows if views.ct_match(r, args.src, args.dst, args.proto, args.port)]
    return rows


CT_COLS = ["proto", "dir", ("source", lambda r: f"{r['saddr']}:{r['sport']}"),
           ("destination", lambda r: f"{r['daddr']}:{r['dport']}"),
           ("nat", lambda r: f"{r['nat_addr']}:{r['nat_port']}" if r["dir"] != "policy" else "-"),
           ("svc", "svc_id"), ("backend", "backend_id"), "state", "table", "flags",
           ("age", lambda r: fmt_age(r["age_seconds"]))]


@run
def cmd_ct_list(ctx, args) -> int:
    rows = data_ct(ctx, args)
    if args.top is not None:
        cap = sum(ctx.map(M[alias]).max_entries for _, alias in CT_TABLES)
        eps = data_endpoints(ctx)
        top = views.ct_top(rows, eps, cap, args.top)

        def render(t):
            head = (f"conntrack: {t['entries']} entries of {t['max_entries']} "
                    f"({t['fill'] * 100:.1f}% full)")
            return head + "\n" + tbl.table(t["top"], ["ip", ("pod", lambda r: r["pod"] or
                                                            ("-" if r["local"] else "(remote)")),
                                                      "entries", "as_client", "as_backend",
                                                      ("share", lambda r: f"{r['share'] * 100:.1f}%")])
        ctx.emit(top, render)
        return 0
    ctx.emit(rows, lambda rows: tbl.table(rows, CT_COLS) if rows else "(no conntrack entries)")
    return 0


@run
def cmd_ct_flush(ctx, args) -> int:
    from agent.inspect import decode
    if not (args.src or args.dst or args.proto or args.port or args.all):
        raise CliExit(EXIT_USAGE, "ct flush without a filter removes every translated flow: "
                                  "give --src/--dst/--proto/--port, or --all")
    maps = {table: ctx.map(M[alias]) for table, alias in CT_TABLES}
    layouts = {table: ctx.layout(m.name, m) for table, m in maps.items()}
    rows = data_ct(ctx, args)
    deleted = 0
    for r in rows:
        lay = layouts[r["table"]]
        key = decode.encode_key(lay.schema, lay.key, saddr=r["saddr"], daddr=r["daddr"],
                                sport=r["sport"], dport=r["dport"],
                                proto=r["proto_num"], dir=r["dir_num"])
        if maps[r["table"]].delete(key):
            deleted += 1
    ctx.emit({"matched": len(rows), "deleted": deleted},
             lambda d: f"deleted {d['deleted']} conntrack entries ({d['matched']} matched)")
    return 0


# -- metrics -----------------------------------------------------------------

def data_metrics(ctx) -> list[dict]:
    return views.counters(ctx.entries(M["counters"]), ctx.links())


def data_policy_metrics(ctx) -> list[dict]:
    """New flows (and their bytes) per NetworkPolicy, direction and verdict."""
    if M.get("policy_cnt") not in ctx.maps():
        return []
    names = {int(k): v for k, v in (ctx.agent("PolicyNames") or {}).items()}
    rows = []
    for e in ctx.entries(M["policy_cnt"]):
        k, v = e["key"], e["value"]
        rows.append({"policy_id": k["policy_id"], "policy": names.get(k["policy_id"], ""),
                     "direction": k["dir_label"], "verdict": k["verdict_label"],
                     "flows": v["packets"], "bytes": v["bytes"]})
    return sorted(rows, key=lambda r: (r["policy_id"], r["direction"], r["verdict"]))


@run
def cmd_metrics(ctx, args) -> int:
    if args.policy:
        rows = data_policy_metrics(ctx)
        ctx.emit(rows, lambda rows: tbl.table(rows, [
            ("id", "policy_id"), ("policy", lambda r: r["policy"] or "-"), "direction",
            "verdict", "flows", "bytes"]) if rows else "(no policy verdicts counted)")
        return 0
    rows = data_metrics(ctx)
    if args.drops:
        rows = [r for r in rows if r["drop"]]
    ctx.emit(rows, lambda rows: tbl.table(rows, ["ifindex", ("interface", "ifname"),
                                                 "direction", "reason", "family", "packets",
                                                 "bytes"]))
    return 0


# -- status ------------------------------------------------------------------

PRESSURE = 0.8


def data_status(ctx) -> dict:
    from agent.datapath import pinned
    from agent import config as configuration
    st = ctx.status()
    out: dict = {"agent": {"reachable": st is not None}}
    if st is None:
        out["agent"]["error"] = ctx.agent_error
        cfg = ctx.cfg
        out["config"] = {r["key"]: r["value"] for r in configuration.describe(cfg)}
        out["config_from"] = "the local configuration (the agent does not answer)"
    else:
        out["agent"].update({k: st.get(k) for k in ("ready", "pid", "started_at", "endpoints",
                                                      "enis", "http", "migration_notes")})
        out["source"] = st.get("source")
        out["services"] = st.get("services")
        out["policy"] = st.get("policy")
        out["bandwidth"] = st.get("bandwidth")
        out["config"] = st.get("config")
        out["config_sources"] = st.get("config_sources")
        out["config_from"] = "the agent"
    out["bpffs_root"] = ctx.bpffs_root
    out["kernel"] = pinned.kernel_features()
    try:
        maps = bpfobj.map_rows(ctx)
        out["maps"] = maps
        out["pressure"] = [m["name"] for m in maps if m["fill"] is not None
                           and m["fill"] >= PRESSURE and m["max_entries"] > 1]
    except CliExit as exc:
        out["maps"] = []
        out["maps_error"] = exc.message
        out["pressure"] = []
    return out


def render_status(d: dict) -> str:
    a = d["agent"]
    lines = []
    if a["reachable"]:
        import time
        up = time.time() - a["started_at"] if a.get("started_at") else 0
        lines.append(f"agent:    {'ready' if a['ready'] else 'NOT READY'} (pid {a['pid']}, up "
                     f"{fmt_age(up)}, {a['endpoints']} endpoints, ENIs "
                     f"{', '.join(a['enis']) or '-'})")
        src = d.get("source") or {}
        objs = src.get("objects") or {}
        lines.append(f"source:   {src.get('state', '?')} ({src.get('spec', '')}"
                     + (f"; {', '.join(f'{k}={v}' for k, v in sorted(objs.items()))}"
                        if objs else "") + (f"; error: {src['error']}" if src.get("error")
                                            else "") + ")")
        watch = (src.get("status") or {}).get("watch")
        if watch:
            lines.append(f"  watch: {watch}")
        for problem in ((src.get("status") or {}).get("problems") or []):
            lines.append(f"  problem: {problem}")
        for rej in ((src.get("status") or {}).get("rejected") or []):
            lines.append(f"  rejected: {rej.get('kind', '')} {rej.get('object', '')}: "
                         f"{rej.get('field', '')} {rej.get('message', '')} "
                         f"({rej.get('origin', '')})")
        s = d.get("services")
        if s:
            lines.append(f"services: {s['frontends']} frontends, {s['plans']} plans applied, "
                         f"{s['errors']} errors (store v{s['applied_version']})")
        p = d.get("policy") or {}
        refused = p.get("refused") if isinstance(p.get("refused"), list) else []
        pending = p.get("pending") if isinstance(p.get("pending"), list) else []
        line = f"policy:   enforcement {p.get('enforcement', p.get('mode', '?'))}"
        if p.get("compiled") or refused:
            line += (f", {p.get('policies', 0)} policies, {p.get('endpoints', 0)} endpoints, "
                     f"{p.get('rules', 0)} rules, {p.get('errors', 0)} errors, "
                     f"{len(refused)} refused")
        lines.append(line)
        for r in refused:
            lines.append(f"  REFUSED {r.get('policy')}: rules not written for "
                         f"{', '.join(r.get('pods') or [])} ({r.get('reason', '')})")
        if pending:
            lines.append(f"  PENDING (labels not known yet, in the policy_unknown_pod state): "
                         f"{', '.join(pending)}")
        bw = d.get("bandwidth") or {}
        if bw:
            lines.append(f"bandwidth: {bw.get('summary', '?')}"
                         + (f"; {bw.get('pods', 0)} pods limited" if bw.get("enabled") else "")
                         + (f", {len(bw['problems'])} annotations rejected (fastpath bandwidth "
                            "list)" if bw.get("problems") else ""))
            for eni, what in sorted((bw.get("enis") or {}).items()):
                if not what.startswith("fastpath"):
                    lines.append(f"  {eni}: {what}")
    else:
        lines.append(f"agent:    NOT REACHABLE ({a.get('error', '')})")
    k = d["kernel"]
    missing = [n for n, ok in {**k["map_types"], **k["helpers"]}.items() if not ok]
    lines.append(f"kernel:   {k['release']}, BTF {'yes' if k['btf'] else 'NO'}, "
                 + (f"missing: {', '.join(missing)}" if missing else
                    "every map type and helper fastpath uses is available")
                 + (", bpf stats on" if k["bpf_stats_enabled"] else ""))
    lines.append(f"maps:     {d['bpffs_root']}: " + (
        d.get("maps_error") or (f"{len(d['maps'])} pinned, fullest "
                                + ", ".join(f"{m['alias'] or m['name']} {m['fill'] * 100:.1f}%"
                                            for m in sorted((m for m in d["maps"] if m["fill"]
                                                             is not None and m["max_entries"] > 1),
                                                            key=lambda m: -m["fill"])[:3]))))
    if d["pressure"]:
        lines.append(f"PRESSURE: {', '.join(d['pressure'])} at or above "
                     f"{PRESSURE * 100:.0f}% of max entries")
    conf = d.get("config") or {}
    srcs = d.get("config_sources") or {}
    changed = {k: v for k, v in conf.items() if srcs.get(k, "default") != "default"}
    lines.append(f"config:   from {d['config_from']}; not default: " + (
        ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "none"))
    return "\n".join(lines)


@run
def cmd_status(ctx, args) -> int:
    d = data_status(ctx)
    ctx.emit(d, render_status)
    if not d["agent"]["reachable"]:
        return EXIT_NO_AGENT
    return 0 if d["agent"]["ready"] and not d.get("maps_error") else EXIT_FAIL
