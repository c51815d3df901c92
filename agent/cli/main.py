"""The `fastpath` command: the agent daemon and bpftool-style inspection.

Grammar: `fastpath OBJECT VERB [options]`, `--json` for scripts. Exit codes:
0 success, 1 the thing asked about is wrong/absent, 2 usage or config error,
3 the agent is unreachable, 4 missing privileges or kernel support.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from agent.config import KEYS, Config, ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_AGENT, EXIT_PRIV = 0, 1, 2, 3, 4


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="configuration file (YAML or JSON)")
    for k in KEYS:
        p.add_argument(_flag(k.name), dest=f"cfg_{k.name}", default=None,
                       help=f"{k.help} (default: {k.default!r})")


def load_config(args) -> Config:
    cfg = Config.defaults()
    if getattr(args, "config", None):
        cfg = cfg.with_file(args.config)
    overrides = {k.name: getattr(args, f"cfg_{k.name}", None) for k in KEYS}
    return cfg.with_values(overrides, "flag")


def cmd_agent(args) -> int:
    from agent.agent import Agent
    from agent.datapath.errors import DatapathError, NotPrivileged, NoBpfSupport
    cfg = load_config(args)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(cfg)
    try:
        agent.start()
    except (NotPrivileged, NoBpfSupport) as exc:
        print(f"fastpath agent: {exc}", file=sys.stderr)
        return EXIT_PRIV
    except DatapathError as exc:
        print(f"fastpath agent: {exc}", file=sys.stderr)
        return EXIT_FAIL
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    agent.stop()
    return EXIT_OK


def _call(args, method: str, params: dict | None = None):
    from agent.api import wire
    try:
        return wire.call(args.socket, method, params)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"fastpath: the agent is not reachable at {args.socket} ({exc.strerror}); "
              "is `fastpath agent` running?", file=sys.stderr)
        raise SystemExit(EXIT_NO_AGENT)
    except wire.RemoteError as exc:
        print(f"fastpath: {exc.code}: {exc.message}", file=sys.stderr)
        raise SystemExit(EXIT_FAIL)


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    out = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))
    return "\n".join(out)


def _emit(args, data, cols: list[str] | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True))
    elif cols is not None:
        print(_table(data, cols))
    else:
        for k, v in data.items():
            print(f"{k}: {v}")


def cmd_endpoint(args) -> int:
    if args.verb == "add":
        ns, _, name = (args.pod or "/").partition("/")
        res = _call(args, "EndpointAdd", {"netns": args.netns, "ifname": args.ifname,
                                           "container_id": args.container_id,
                                           "pod_namespace": ns, "pod_name": name})
        _emit(args, res)
    elif args.verb == "del":
        _emit(args, _call(args, "EndpointDel", {"container_id": args.container_id,
                                                 "ifname": args.ifname}))
    else:
        rows = _call(args, "EndpointList")
        _emit(args, rows, ["ip", "pod", "host_ifname", "eni", "pod_mac", "key"])
    return EXIT_OK


def cmd_metrics(args) -> int:
    rows = _call(args, "Counters")
    _emit(args, rows, ["ifindex", "direction", "reason", "packets", "bytes"])
    return EXIT_OK


def cmd_status(args) -> int:
    _emit(args, _call(args, "Status"))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpath", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="object", required=True)

    a = sub.add_parser("agent", help="run the node agent (the DaemonSet's policy container)")
    add_config_flags(a)
    a.set_defaults(func=cmd_agent)

    def client(name: str, **kw) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, **kw)
        sp.add_argument("--socket", default=Config.defaults().api_socket,
                        help="the agent's API socket")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    e = client("endpoint", help="pods on this node")
    e.add_argument("verb", choices=["list", "add", "del"])
    e.add_argument("--netns", help="pod netns path (add)")
    e.add_argument("--ifname", default="eth0")
    e.add_argument("--container-id", default="")
    e.add_argument("--pod", help="namespace/name (add)")
    e.set_defaults(func=cmd_endpoint)

    m = client("metrics", help="datapath counters by interface, direction and reason")
    m.set_defaults(func=cmd_metrics)

    s = client("status", help="agent health")
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fastpath: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
