"""Program time per NodePort connection: a baseline tree's programs vs this tree's, one run.

Two fastpath nodes in one simulated world, identical but for the BPF source
their agents compile: n1 runs a baseline git ref's (default `main`), n2 this
working tree's. Each has its backend pod; both hold the same N NodePort
Services (bench/nodeport_bench.py's program_maps, the probed one last). An
external client on the VPC side opens short TCP connections (fprr crr) to
each node's NodePort in turn (and, as the floor, to n2's pod IP), arms alternated and their order reversed every
other round, and the kernel's BPF run-time statistics give, per program
attached on the node, runs per connection and ns per run, so ns per
connection, for each arm. Program time is what a NodePort connection costs
fastpath beyond the direct path (bench/RESULTS.md lb.nodeport_vs_direct: the
rest of the two paths is the same kernel code), and unlike connection rates
it is stable on a loaded machine: it is the figure to compare two versions
of the programs by.

Statistics are switched on with the bpf() command BPF_ENABLE_STATS, which
holds them on only while its fd is open (no sysctl is written). Each agent
runs in a process of its own started in its tree (python -c ..., cwd = the
tree), so each compiles its own bpf/; the baseline tree is `git archive`d
into a temporary directory.

    python -m bench.nodeport_profile [--baseline main] [--rounds 6] [--seconds 2]
                                     [--services 1000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.sim import World
from bench import harness
from bench.lb_bench import Client, bpf_run_stats, log, prog_counters, start_server

COMMAND = "python -m bench.nodeport_profile"
REPO = Path(__file__).resolve().parents[1]
PORT = harness.FPRR_PORT
NODE_PORT_BASE = 20000

# The agent side of one arm, run by the tree's own Python modules: attach to
# the node, write the Services, say so, and hold until stdin closes.
CHILD = r"""
import json, sys, types
spec = json.loads(sys.argv[1])
from agent.sim.agent import sim_attach
from bench.nodeport_bench import program_maps
pod = types.SimpleNamespace(**spec["pod"])
node = types.SimpleNamespace(name=spec["name"], netns=spec["netns"], pods=[pod])
with sim_attach(node) as agent:
    program_maps(agent.datapath.lb, spec["services"], spec["node_ip"], pod.ip)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()
"""


def export_tree(ref: str, dest: str) -> str:
    """`ref` of this repository as plain files under `dest`; its commit."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.Popen(["git", "archive", commit], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return commit


class ArmAgent:
    """An agent from `tree` serving `node` in a child process."""

    def __init__(self, tree: str, node, pod, services: int):
        spec = {"name": node.name, "netns": node.netns, "node_ip": node.ip,
                "services": services,
                "pod": {"name": pod.name, "netns_path": pod.netns_path, "ifname": pod.ifname,
                        "ip": pod.ip}}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=tree,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def wait_ready(self, timeout: float = 600) -> None:
        import select
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else ""
        if '"ready"' not in line:
            self.proc.kill()
            self.log.seek(0)
            raise RuntimeError("agent did not start:\n" + self.log.read().decode()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def node_programs(node) -> dict[str, int]:
    """fastpath's tc programs attached in the node: name -> id (each once,
    whatever it is attached to; tail-called programs count in their caller)."""
    out = json.loads(node.run(["bpftool", "-j", "net", "show"]).stdout or "[]")
    return {p["name"]: p["id"] for sec in out for p in sec.get("tc", [])
            if p.get("name", "").startswith("fp_")}


def profile(arms: dict, rounds: int, seconds: float) -> dict:
    """arms: name -> (client, ip, port, {program: id}). Per arm: per-round ns
    per connection, and per program runs and ns per connection over all rounds."""
    acc = {a: {"rounds": [], "conns": 0.0, "rates": [],
               "progs": {n: [0, 0] for n in ids}} for a, (_, _, _, ids) in arms.items()}
    with bpf_run_stats():
        for r in range(rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for a in order:
                client, ip, port, ids = arms[a]
                before = {n: prog_counters(i) for n, i in ids.items()}
                rate = client.run("crr", ip, seconds, port)
                after = {n: prog_counters(i) for n, i in ids.items()}
                conns = rate * seconds
                ns = 0
                for n in ids:
                    d_ns, d_runs = after[n][0] - before[n][0], after[n][1] - before[n][1]
                    acc[a]["progs"][n][0] += d_ns
                    acc[a]["progs"][n][1] += d_runs
                    ns += d_ns
                acc[a]["rounds"].append(ns / conns)
                acc[a]["conns"] += conns
                acc[a]["rates"].append(rate)
            log(f"nodeport_profile: round {r + 1}/{rounds}: " + ", ".join(
                f"{a} {acc[a]['rounds'][-1]:.0f} ns/conn" for a in arms))
    res = {}
    for a, x in acc.items():
        per = {n: {"runs_per_conn": runs / x["conns"], "ns_per_run": ns / max(runs, 1),
                   "ns_per_conn": ns / x["conns"]}
               for n, (ns, runs) in sorted(x["progs"].items()) if runs / x["conns"] >= 0.05}
        res[a] = {"ns_per_conn_median": harness.median(x["rounds"]),
                  "ns_per_conn_rounds": x["rounds"], "programs": per,
                  "crr_median": harness.median(x["rates"])}
    return res


def run(args) -> dict:
    started = time.monotonic()
    harness.build_fprr()
    tmp = tempfile.mkdtemp(prefix="fp-npprof-")
    res: dict = {"baseline_ref": args.baseline, "services": args.services,
                 "rounds": args.rounds, "seconds": args.seconds}
    try:
        res["baseline_commit"] = export_tree(args.baseline, tmp)
        res["tree"] = str(REPO)
        with World() as w:
            nodes = {"baseline": w.add_node("n1", enis=1), "tree": w.add_node("n2", enis=1)}
            pods = {a: n.add_pod(f"{n.name}b") for a, n in nodes.items()}
            ext = w.add_client("ext")
            servers = [start_server(p) for p in pods.values()]
            agents = {"baseline": ArmAgent(tmp, nodes["baseline"], pods["baseline"],
                                           args.services),
                      "tree": ArmAgent(str(REPO), nodes["tree"], pods["tree"], args.services)}
            try:
                for ag in agents.values():      # (one compile at a time on 2 CPUs)
                    ag.wait_ready()
                harness.tune_client(ext)
                client = Client(ext, ext.ip)
                probe = NODE_PORT_BASE + args.services - 1
                arms = {}
                for a, n in nodes.items():
                    client.run("rr", n.ip, 0.2, probe)        # warm, and prove it answers
                    ids = node_programs(n)
                    if "fp_from_vpc" not in ids:
                        raise RuntimeError(f"{a}: fastpath is not attached on {n.name}: {ids}")
                    arms[a] = (client, n.ip, probe, ids)
                # the same node's programs when the client talks to the pod
                # IP: the floor NodePort's extra work adds to
                client.run("rr", pods["tree"].ip, 0.2)
                arms["direct"] = (client, pods["tree"].ip, PORT, arms["tree"][3])
                log(f"nodeport_profile: world {w.tag} ready ({time.monotonic() - started:.0f}s)")
                res.update(profile(arms, args.rounds, args.seconds))
                res["client_errors"] = client.errors
            finally:
                for ag in agents.values():
                    ag.stop()
                harness.stop(servers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["elapsed"] = time.monotonic() - started
    return res


def report(res: dict) -> str:
    lines = [f"program time per NodePort connection ({res['services']} NodePort Services, "
             f"{res['rounds']} alternating rounds of {res['seconds']:g}s CRR; medians)"]
    names = sorted(set(res["baseline"]["programs"]) | set(res["tree"]["programs"]))
    lines.append(f"  {'program':14s} {'baseline ' + res['baseline_commit'][:10]:>28s}"
                 f" {'this tree':>28s}")
    for n in names:
        cells = []
        for a in ("baseline", "tree"):
            p = res[a]["programs"].get(n)
            cells.append(f"{p['runs_per_conn']:.1f} x {p['ns_per_run']:4.0f} = "
                         f"{p['ns_per_conn']:5.0f} ns" if p else "-")
        lines.append(f"  {n:14s} {cells[0]:>28s} {cells[1]:>28s}")
    b, t = res["baseline"]["ns_per_conn_median"], res["tree"]["ns_per_conn_median"]
    lines.append(f"  {'all':14s} {b:25.0f} ns {t:25.0f} ns   ({t - b:+.0f} ns, {t / b:.3f}x)")
    d = res["direct"]["ns_per_conn_median"]
    lines.append(f"  direct to this tree's pod IP: {d:.0f} ns; NodePort's extra program time: "
                 f"baseline {b - d:.0f} ns, this tree {t - d:.0f} ns")
    lines.append(f"  CRR (noisy, informative): baseline {res['baseline']['crr_median']:,.0f}, "
                 f"this tree {res['tree']['crr_median']:,.0f} conn/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git ref whose bpf/ is the baseline")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0, help="CRR seconds per arm and round")
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, BPF)")
    res = run(args)
    log(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    log(f"nodeport_profile: done in {res['elapsed']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
