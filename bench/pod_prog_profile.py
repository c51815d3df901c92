"""Program time of pod-to-pod traffic on one node, IPv4 against IPv6, in vivo.

bench.pod_to_pod's fastpath arm measures rates; this one says how much of a
connection or a transaction is fastpath's program time, per family, and
(with --baseline) how a change moves it. Two pods a and b on a dual-stack
node run fprr TCP_CRR (connect, 1-byte request and response, close) and
TCP_RR (1-byte transactions on one connection) over IPv4 and over IPv6,
arms alternated and their order reversed every other round; the kernel's
BPF run-time statistics (BPF_ENABLE_STATS, on while its fd is open: no
sysctl written) give per fastpath program attached on the node the runs
and ns per connection (CRR) or transaction (RR). Tail-called programs
(fp_from_pod6, fp_pod6_route, fp_pod_route) count in their caller's
figures: fp_from_pod is every packet either pod sends.

With --baseline REF a second node runs an agent built from REF's tree (git
archive) in a process of its own, the same pods and arms: both builds' rows
in one run.

    python -m bench.pod_prog_profile [--baseline main] [--rounds 6] [--seconds 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from agent.sim import World
from bench import harness
from bench.harness import Endpoints
from bench.lb_bench import bpf_run_stats, prog_counters
from bench.nodeport_profile import ChildAgent, export_tree, node_programs

COMMAND = "python -m bench.pod_prog_profile"
REPO = Path(__file__).resolve().parents[1]

# An agent of the tree it runs in (cwd), serving one node with its pods:
# attach, register the pods, say so, hold until stdin closes.
CHILD = r"""
import json, sys, types
spec = json.loads(sys.argv[1])
from agent.sim.agent import sim_attach
pods = [types.SimpleNamespace(**p) for p in spec["pods"]]
node = types.SimpleNamespace(name=spec["name"], netns=spec["netns"], pods=pods)
with sim_attach(node):
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()
"""


class TreeAgent(ChildAgent):
    """The agent of `tree` serving `node` in a child process."""

    def __init__(self, tree: str, node):
        super().__init__(tree, CHILD, {
            "name": node.name, "netns": node.netns,
            "pods": [{"name": p.name, "netns_path": p.netns_path, "ifname": p.ifname}
                     for p in node.pods]})

    def wait_ready(self, timeout: float = 900) -> None:
        super().wait_ready(timeout)


def profile(arms: dict, rounds: int, seconds: float, log=print) -> dict:
    """arms: name -> (Endpoints, mode, {program: id}). Per arm: the rate's
    median, and per program runs and ns per unit (connection or
    transaction) over all rounds, and the rounds' ns per unit."""
    acc = {a: {"units": 0.0, "rates": [], "rounds": [], "progs": {n: [0, 0] for n in ids}}
           for a, (_, _, ids) in arms.items()}
    with bpf_run_stats():
        for r in range(rounds):
            for a in (list(arms) if r % 2 == 0 else list(reversed(arms))):
                ep, mode, ids = arms[a]
                before = {n: prog_counters(i) for n, i in ids.items()}
                rate = harness.fprr(ep, mode, seconds)
                after = {n: prog_counters(i) for n, i in ids.items()}
                units = rate * seconds
                ns = 0
                for n in ids:
                    d_ns, d_runs = after[n][0] - before[n][0], after[n][1] - before[n][1]
                    acc[a]["progs"][n][0] += d_ns
                    acc[a]["progs"][n][1] += d_runs
                    ns += d_ns
                acc[a]["units"] += units
                acc[a]["rates"].append(rate)
                acc[a]["rounds"].append(ns / units)
            log(f"pod_prog_profile: round {r + 1}/{rounds}: " + ", ".join(
                f"{a} {acc[a]['rounds'][-1]:.0f}" for a in arms))
    res = {}
    for a, x in acc.items():
        res[a] = {"rate_median": harness.median(x["rates"]),
                  "ns_per_unit_median": harness.median(x["rounds"]),
                  "programs": {n: {"runs_per_unit": runs / x["units"],
                                   "ns_per_run": ns / max(runs, 1),
                                   "ns_per_unit": ns / x["units"]}
                               for n, (ns, runs) in sorted(x["progs"].items())
                               if runs / x["units"] >= 0.05}}
    return res


def run(args, log=print) -> dict:
    started = time.monotonic()
    harness.build_fprr()
    tmp = tempfile.mkdtemp(prefix="fp-podprof-")
    res: dict = {"rounds": args.rounds, "seconds": args.seconds, "baseline": args.baseline}
    try:
        trees = {"tree": str(REPO)}
        if args.baseline:
            res["baseline_commit"] = export_tree(args.baseline, tmp)
            trees["baseline"] = tmp
        with World(dual_stack=True) as w:
            servers, agents, arms = [], {}, {}
            try:
                nodes = {}
                for i, build in enumerate(trees):
                    n = w.add_node(f"n{i + 1}", enis=1)
                    a, b = n.add_pod(f"{n.name}a"), n.add_pod(f"{n.name}b")
                    nodes[build] = (n, a, b)
                    for ep in (Endpoints(a, b, b.ip, a.ip), Endpoints(a, b, b.ip6, a.ip6)):
                        harness.tune_client(ep.client)
                    servers += harness.start_servers(Endpoints(a, b, b.ip, a.ip), lifetime=3600)
                    servers += harness.start_servers(Endpoints(a, b, b.ip6, a.ip6),
                                                     lifetime=3600)
                for build, tree in trees.items():   # one compile at a time on 2 CPUs
                    agents[build] = TreeAgent(tree, nodes[build][0])
                    agents[build].wait_ready()
                for build, (n, a, b) in nodes.items():
                    ids = node_programs(n)
                    if "fp_from_pod" not in ids:
                        raise RuntimeError(f"{build}: fastpath is not attached on {n.name}: {ids}")
                    for fam, ep in (("v4", Endpoints(a, b, b.ip, a.ip)),
                                    ("v6", Endpoints(a, b, b.ip6, a.ip6))):
                        ep.client.ping(ep.server_ip, count=1)
                        harness.fprr(ep, "rr", 0.2)
                        for mode in args.modes:
                            arms[f"{build}.{mode}.{fam}"] = (ep, mode, ids)
                log(f"pod_prog_profile: world {w.tag} ready ({time.monotonic() - started:.0f}s)")
                res["arms"] = profile(arms, args.rounds, args.seconds, log)
            finally:
                for ag in agents.values():
                    ag.stop()
                harness.stop(servers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["elapsed"] = time.monotonic() - started
    return res


def report(res: dict) -> str:
    unit = {"crr": "connection", "rr": "transaction"}
    lines = [f"fastpath program time, pod a -> pod b on one node ({res['rounds']} alternating "
             f"rounds of {res['seconds']:g}s; ns per connection (crr) or transaction (rr); "
             f"baseline {res.get('baseline_commit', '-')[:10]})"]
    lines.append(f"  {'arm':18s} {'rate/s':>9s} {'ns/unit':>8s}  program: runs/unit x ns/run")
    for a, x in res["arms"].items():
        progs = "; ".join(f"{n} {p['runs_per_unit']:.2f} x {p['ns_per_run']:.0f}"
                          for n, p in x["programs"].items())
        lines.append(f"  {a:18s} {x['rate_median']:9.0f} {x['ns_per_unit_median']:8.0f}  {progs}")
    lines.append("  (" + ", ".join(f"{m}: per {u}" for m, u in unit.items()) + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="git ref whose bpf/ a second node runs")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--modes", default="crr,rr", type=lambda s: s.split(","))
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    res = run(args)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
