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

from agent import config as configuration
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
    overrides = {k.name: getattr(args, f"cfg_{k.name}", None) for k in KEYS}
    return configuration.load(getattr(args, "config", None), overrides)


def cmd_agent(args) -> int:
    from agent.daemon.agent import Agent
    from agent.datapath.errors import DatapathError, NotPrivileged, NoBpfSupport
    cfg = load_config(args)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.api.inspect import log_ring
    log_ring()          # recent lines for `fastpath bugtool`, from the first one
    # Whatever the agent creates (state records, sockets, pins' directory)
    # is root's alone, including files written by code that does not say so.
    os.umask(0o077)
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
    sock = getattr(args, "socket", None) or getattr(args, "cfg_api_socket", None) \
        or Config.defaults().api_socket
    try:
        return wire.call(sock, method, params)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"fastpath: the agent is not reachable at {sock} ({exc.strerror}); "
              "is `fastpath agent` running?", file=sys.stderr)
        raise SystemExit(EXIT_NO_AGENT)
    except wire.RemoteError as exc:
        print(f"fastpath: {exc.code}: {exc.message}", file=sys.stderr)
        raise SystemExit(EXIT_FAIL)


def _table(rows: list[dict], cols: list[str]) -> str:
    from agent.inspect.table import table
    return table(rows, cols)


def _emit(args, data, cols: list[str] | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True))
    elif cols is not None:
        print(_table(data, cols))
    else:
        for k, v in data.items():
            print(f"{k}: {v}")


def cmd_endpoint(args) -> int:
    from agent.cli import views
    if args.verb == "add":
        ns, _, name = (args.pod or "/").partition("/")
        res = _call(args, "EndpointAdd", {"netns": args.netns, "ifname": args.ifname,
                                           "container_id": args.container_id,
                                           "pod_namespace": ns, "pod_name": name})
        _emit(args, res)
    elif args.verb == "del":
        _emit(args, _call(args, "EndpointDel", {"container_id": args.container_id,
                                                 "ifname": args.ifname}))
    elif args.verb == "get":
        if not args.endpoint:
            print("fastpath endpoint get: name the endpoint (IP, namespace/pod, pod, host veth)",
                  file=sys.stderr)
            return EXIT_USAGE
        return views.cmd_endpoint_get(args)
    else:
        return views.cmd_endpoint_list(args)
    return EXIT_OK


def cmd_config(args) -> int:
    """The configuration in force: the running agent's, or (--local) the one
    an agent started with these files and flags would use."""
    if args.local:
        cfg = load_config(args)
        data = {"keys": configuration.describe(cfg), "notes": list(cfg.notes)}
    else:
        data = _call(args, "Config")
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True))
        return EXIT_OK
    rows = [{"key": r["key"], "value": configuration.show(
                tuple(r["value"]) if isinstance(r["value"], list) else r["value"]),
             "source": r["source"], "note": "" if r["in_effect"] else "not yet in effect"}
            for r in data["keys"]]
    print(_table(rows, ["key", "value", "source", "note"]))
    pending = [r for r in data["keys"] if not r["in_effect"]]
    if pending:
        print("\nNot yet in effect (accepted and validated; the datapath does not act on them):")
        for r in pending:
            print(f"  {r['key']}: {r['pending']}")
    for note in data["notes"]:
        print(f"\n{note}")
    return EXIT_OK


def cmd_uninstall(args) -> int:
    """Remove fastpath from this node: kernel state, then files."""
    from agent.datapath import cgroup as cgroups
    from agent.daemon import nodeinstall
    from agent.api import wire
    from agent.datapath import uninstall
    cfg = load_config(args)
    sock = os.path.join(args.host_root or "/", cfg.api_socket.lstrip("/"))
    try:
        wire.call(sock, "Status", timeout=2)
        running = True
    except (OSError, wire.WireError):
        running = False
    if running and not args.force:
        print(f"fastpath uninstall: an agent answers on {sock}; stop it first (delete the "
              "DaemonSet), or it re-attaches what is removed", file=sys.stderr)
        return EXIT_FAIL
    try:
        cgroup_root = cgroups.resolve_root(cfg.cgroup_root)
    except FileNotFoundError as exc:
        cgroup_root = None
        print(f"fastpath uninstall: {exc}; no cgroup programs to look for", file=sys.stderr)
    kernel = uninstall.uninstall(cfg.bpffs_root, cgroup_root, netns=args.netns)
    files = nodeinstall.FileReport()
    if not args.keep_cni:
        nodeinstall.uninstall_cni(conf_dir=args.cni_conf_dir, host_root=args.host_root,
                                  report=files)
    from agent.config import grpc_socket_path
    nodeinstall.uninstall_state(cfg.state_dir, cfg.api_socket, host_root=args.host_root,
                                report=files, other_sockets=(grpc_socket_path(cfg),))
    data = {**kernel.as_dict(), "files": files.as_dict()}
    data["kept"] = kernel.kept + files.kept
    data["files"].pop("kept")
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True))
    else:
        for what, items in (("detached", kernel.filters + kernel.cgroup_programs),
                            ("restored", kernel.qdiscs),
                            ("unpinned", kernel.pins), ("removed", files.removed),
                            ("restored", files.restored), ("edited", files.edited),
                            ("kept", data["kept"])):
            for item in items:
                print(f"{what}: {item}")
    return EXIT_OK


def cmd_cni(args) -> int:
    from agent.daemon import nodeinstall
    try:
        for line in nodeinstall.install_cni(args.conflist, bin_dir=args.cni_bin_dir,
                                            conf_dir=args.cni_conf_dir, python=args.python,
                                            host_root=args.host_root):
            print(line)
    except nodeinstall.InstallError as exc:
        print(f"fastpath cni install: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def register_inspection(sub) -> None:
    """bpftool-style objects and fastpath's own views (agent/cli/*.py)."""
    from agent.cli import bpfobj
    from agent.cli.common import add_common

    def cmd(parent, name: str, func, **kw):
        sp = parent.add_parser(name, **kw)
        add_common(sp)
        sp.set_defaults(func=func)
        return sp

    prog = sub.add_parser("prog", help="fastpath's loaded programs").add_subparsers(
        dest="verb", required=True)
    cmd(prog, "show", bpfobj.cmd_prog, help="programs using fastpath's pinned maps, where attached")
    net = sub.add_parser("net", help="where fastpath's programs are attached").add_subparsers(
        dest="verb", required=True)
    n = cmd(net, "show", bpfobj.cmd_net, help="tc filters and cgroup hooks of fastpath's programs")
    n.add_argument("--all", action="store_true", help="also other bpf tc filters and cgroup hooks")
    mp = sub.add_parser("map", help="fastpath's pinned maps").add_subparsers(dest="verb",
                                                                              required=True)
    cmd(mp, "list", bpfobj.cmd_map_list, help="type, sizes, entries and fill of every pinned map")
    d = cmd(mp, "dump", bpfobj.cmd_map_dump, help="decoded entries of one map")
    d.add_argument("name", help="pinned name (fp_ep4_v1) or alias (endpoints, ct, services, ...)")

    from agent.cli import views
    sv = sub.add_parser("service", help="Service frontends and their backends").add_subparsers(
        dest="verb", required=True)
    cmd(sv, "list", views.cmd_service_list, help="frontend -> backends, affinity, traffic policy")
    g = cmd(sv, "get", views.cmd_service_get, help="one Service's frontends, backend by backend")
    g.add_argument("service", help="namespace/name, name, VIP, VIP:port or VIP:port/PROTO")
    bpf = sub.add_parser("bpf", help="aliases in the style of other datapaths").add_subparsers(
        dest="area", required=True)
    lb = bpf.add_parser("lb", help="service load-balancing").add_subparsers(dest="verb",
                                                                             required=True)
    cmd(lb, "list", views.cmd_service_list, help="same as `fastpath service list`")

    ct = sub.add_parser("ct", help="conntrack: translated flows and flows NetworkPolicy admitted").add_subparsers(
        dest="verb", required=True)

    def ct_filters(sp):
        sp.add_argument("--src", help="the flow's client: address or CIDR")
        sp.add_argument("--dst", help="the flow's frontend or backend: address or CIDR")
        sp.add_argument("--proto", help="TCP or UDP")
        sp.add_argument("--port", type=int, help="frontend or backend port")
    cl = cmd(ct, "list", views.cmd_ct_list, help="entries with NAT state and age")
    ct_filters(cl)
    cl.add_argument("--top", type=int, nargs="?", const=10, default=None, metavar="N",
                    help="the N busiest endpoints (default 10) instead of the entries")
    cf = cmd(ct, "flush", views.cmd_ct_flush, help="delete matching entries (both directions)")
    ct_filters(cf)
    cf.add_argument("--all", action="store_true", help="every entry")

    m = cmd(sub, "metrics", views.cmd_metrics,
            help="datapath counters by interface, direction and reason")
    m.add_argument("--drops", action="store_true", help="drop reasons only")
    m.add_argument("--policy", action="store_true",
                   help="new flows per NetworkPolicy, direction and verdict instead")
    from agent.cli import bandwidth
    bwp = sub.add_parser("bandwidth", help="per-pod bandwidth, packet-rate and connection "
                         "limits").add_subparsers(dest="verb", required=True)
    bl = cmd(bwp, "list", bandwidth.cmd_bandwidth_list, help="limited pods: limits, current "
             "rate, connections, drops by reason, rejected annotations")
    bl.add_argument("--interval", type=float, default=1.0, help="seconds over which the "
                    "current rate is measured (0: do not measure)")
    from agent.cli import bugtool, monitor, policy, trace
    pol = sub.add_parser("policy", help="NetworkPolicy as enforced on this node").add_subparsers(
        dest="verb", required=True)
    pg = cmd(pol, "get", policy.cmd_policy_get, help="a pod's effective rules, traced to their "
             "NetworkPolicies, with hit counters")
    pg.add_argument("endpoint", help="pod IP, namespace/pod or pod")
    mo = cmd(sub, "monitor", monitor.cmd_monitor, help="live drop / trace / policy-verdict events")
    mo.add_argument("--type", action="append", help="drop, trace, policy-verdict (repeat or "
                    "comma-separate; default all)")
    mo.add_argument("--endpoint", action="append", help="only events to or from this pod "
                    "(IP, namespace/pod, pod; repeatable)")
    mo.add_argument("--count", type=int, default=0, help="stop after N events")
    mo.add_argument("--duration", type=float, default=0, help="stop after S seconds")
    tr = cmd(sub, "trace", trace.cmd_trace, help="run one packet through the loaded programs "
             "(BPF_PROG_TEST_RUN, no state change) and print each decision")
    tr.add_argument("--from", required=True, help="source: a pod of this node (IP, "
                    "namespace/pod, pod) or any IPv4 or IPv6 address (arriving from the VPC)")
    tr.add_argument("--to", required=True, help="destination IPv4:PORT or [IPv6]:PORT (the "
                    "address alone for icmp/icmpv6)")
    tr.add_argument("--proto", default="tcp",
                    help="tcp (a SYN, default), udp, sctp (an INIT), icmp or icmpv6 (an echo "
                    "request)")
    tr.add_argument("--sport", type=int, default=43210, help="source port (default 43210)")
    tr.add_argument("--via", help="for a source outside this node: the ENI the packet arrives "
                    "on (default: the destination pod's ENI)")
    b = cmd(sub, "bugtool", bugtool.cmd_bugtool, help="one tar.gz with every view as JSON, "
            "config and recent agent logs, for a support ticket")
    b.add_argument("-o", "--output", help="archive path (default: DIR/fastpath-bugtool-HOST-"
                   "TIME.tar.gz)")
    b.add_argument("--dir", default="/tmp", help="where to write it (default /tmp)")
    cmd(sub, "status", views.cmd_status, help="agent health, config in force, kernel features, "
        "map pressure, source sync state")


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

    from agent.cli.common import add_common
    e = sub.add_parser("endpoint", help="pods on this node")
    add_common(e)
    e.add_argument("verb", choices=["list", "get", "add", "del"])
    e.add_argument("endpoint", nargs="?", help="get: IP, namespace/pod, pod, host veth")
    e.add_argument("--netns", help="pod netns path (add)")
    e.add_argument("--ifname", default="eth0")
    e.add_argument("--container-id", default="")
    e.add_argument("--pod", help="namespace/name (add)")
    e.set_defaults(func=cmd_endpoint)

    register_inspection(sub)

    c = client("config", help="the configuration in force and where each value came from")
    c.add_argument("verb", choices=["show"])
    c.add_argument("--local", action="store_true",
                   help="compute it from --config, --eni-config and flags instead of asking "
                        "the running agent")
    add_config_flags(c)
    c.set_defaults(func=cmd_config)

    def node_paths(sp):
        sp.add_argument("--cni-conf-dir", default="/etc/cni/net.d")
        sp.add_argument("--host-root", default=None, metavar="DIR",
                        help="where the node's / is mounted (paths are the node's)")

    u = sub.add_parser("uninstall", help="remove every program, filter, pinned map and file "
                                         "fastpath put on this node, and nothing else")
    add_config_flags(u)
    node_paths(u)
    u.add_argument("--netns", default=None, help="the node's netns (default: this process's)")
    u.add_argument("--keep-cni", action="store_true",
                   help="leave fastpath-cni and the conflist installed")
    u.add_argument("--force", action="store_true", help="even if an agent still answers")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=cmd_uninstall)

    n = sub.add_parser("cni", help="install fastpath-cni and the conflist (the DaemonSet's "
                                   "init step)")
    n.add_argument("verb", choices=["install"])
    n.add_argument("--conflist", required=True, help="the conflist to install (deploy/)")
    n.add_argument("--cni-bin-dir", default="/opt/cni/bin")
    n.add_argument("--python", default="/usr/bin/python3",
                   help="the node's interpreter that runs the plugin")
    node_paths(n)
    n.set_defaults(func=cmd_cni)
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
