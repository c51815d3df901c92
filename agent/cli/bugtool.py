"""`fastpath bugtool`: one tar.gz with everything a support ticket needs.

Every view as JSON (status, programs, attachments, maps, every map decoded,
endpoints, services, conntrack, counters), the configuration in force, the
agent's recent log lines, and the node's links, addresses, routes, rules
and tc filters. A part that cannot be collected is listed in errors.json;
the archive is written anyway.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import tarfile
import time

from agent.cli import bpfobj, views
from agent.cli.common import CliExit, run


def _json(data) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True, default=str).encode()


def collect(ctx) -> tuple[dict[str, bytes], dict[str, str]]:
    files: dict[str, bytes] = {}
    errors: dict[str, str] = {}

    def part(name: str, fn):
        try:
            files[name] = _json(fn())
        except CliExit as exc:
            errors[name] = exc.message
        except Exception as exc:           # keep collecting the rest
            errors[name] = f"{type(exc).__name__}: {exc}"

    part("status.json", lambda: views.data_status(ctx))
    progs_att = {}

    def progs():
        progs, att = bpfobj._attachments(ctx, include_foreign=True)
        progs_att["v"] = (progs, att)
        return [p.__dict__ for p in progs.values()]
    part("programs.json", progs)
    part("attachments.json", lambda: bpfobj.attachment_rows(*progs_att["v"]))
    part("maps.json", lambda: bpfobj.map_rows(ctx))
    try:
        names = sorted(ctx.maps())
    except CliExit as exc:
        names = []
        errors["maps"] = exc.message
    for name in names:
        if ctx.maps()[name].type_name == "ringbuf":
            continue
        part(f"map/{name}.json", lambda n=name: ctx.entries(n))
    part("endpoints.json", lambda: views.data_endpoints(ctx))
    part("services.json", lambda: views.data_services(ctx))
    part("conntrack.json", lambda: views.data_ct(ctx))
    from agent.cli.bandwidth import data_bandwidth
    part("bandwidth.json", lambda: data_bandwidth(ctx, 0))
    part("metrics.json", lambda: views.data_metrics(ctx))
    part("policy-metrics.json", lambda: views.data_policy_metrics(ctx))
    part("config.json", lambda: ctx.require_agent("Status").get("config"))
    logs = ctx.agent("Logs", lines=2000)
    if logs is not None:
        files["agent.log"] = ("\n".join(logs) + "\n").encode()
    else:
        errors["agent.log"] = ctx.agent_error or "the agent keeps no log lines"
    for name, cmd in (("ip-link.json", ["ip", "-j", "-d", "link", "show"]),
                      ("ip-addr.json", ["ip", "-j", "addr", "show"]),
                      ("ip-route.json", ["ip", "-j", "route", "show", "table", "all"]),
                      ("ip-rule.json", ["ip", "-j", "rule", "show"]),
                      ("tc-qdisc.json", ["tc", "-j", "qdisc", "show"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            files[name] = r.stdout.encode() if r.returncode == 0 else b""
            if r.returncode != 0:
                errors[name] = r.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors[name] = str(exc)
    files["errors.json"] = _json(errors)
    return files, errors


@run
def cmd_bugtool(ctx, args) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    host = socket.gethostname()
    out = args.output or os.path.join(args.dir, f"fastpath-bugtool-{host}-{stamp}.tar.gz")
    files, errors = collect(ctx)
    top = f"fastpath-bugtool-{host}-{stamp}"
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    os.chmod(out, 0o600)
    result = {"archive": out, "files": sorted(files), "errors": errors}
    ctx.emit(result, lambda r: f"wrote {r['archive']} ({len(r['files'])} files"
             + (f"; not collected: {', '.join(sorted(r['errors']))}" if r["errors"] else "")
             + ")")
    return 0
