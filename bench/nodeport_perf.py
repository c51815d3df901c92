"""Where a NodePort connection's time goes, the whole system's, by perf.

bench.nodeport_bench says how much longer a short connection to a NodePort
takes than one to the pod's own address, and how much of that is program
time (the kernel's BPF run-time statistics). This says where the rest goes:
the same world (fastpath node n1 with 1,000 NodePort Services and its pod,
its agent as bench.nodeport_bench runs it (socket-LB on);
node n3 running the bare NodePort program, bench/nodeport_profile.NodePortFloor,
and its pod; the external client), the same four arms alternated round by
round (fastpath's NodePort, its pod directly, the floor's NodePort, the
floor's pod directly). Client and servers run on CPU 0 (as in
bench.nodeport_bench), and so does the packets' processing (softirqs run in
their context); during each arm's CRR, on CPU 0:

  - `perf record` (cpu-clock samples) of the client's and servers' time
    (comm fprr, kernel and user, BPF programs included as
    bpf_prog_<name>) and of CPU 0's softirq thread and idle task;
  - their context switches split by the state the client or server was in
    when switched out (S: it waited; R/R+: it was preempted), their wake-ups
    and NET_RX softirqs;
  - and, in one more round of each arm without the sampling (counting slab
    allocations slows each), `perf stat` of CPU 0's packets sent and
    received, slab allocations and packets dropped: whether one arm copies
    or drops what another does not.

It prints, for fastpath's NodePort against its direct path and for the
floor's against its own, the time per connection in all, and the symbols
whose time per connection differs most, both ways. Other work on CPU 0
slows the arms but is not counted in them; read the differences, not the
totals. Needs perf (Debian: linux-perf).

    python -m bench.nodeport_perf [--rounds 3] [--seconds 3] [--top 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from agent.sim import World
from bench import harness
from bench.lb_bench import Client, log, start_server
from bench.nodeport_bench import NODE_PORT_BASE, PORT, product_agent, program_maps
from bench.nodeport_profile import NodePortFloor

COMMAND = "python -m bench.nodeport_perf"
SERVICES = 1000
SAMPLE_HZ = 4999
PAIRS = (("fastpath", "direct"), ("floor", "floor-direct"))
CPU = "0"
COMMS = "fprr,ksoftirqd/0,swapper/0"
EVENTS = "sched:sched_switch,sched:sched_wakeup,irq:softirq_entry"
COUNTED = ("net:net_dev_xmit", "net:netif_receive_skb", "kmem:kmem_cache_alloc",
           "skb:kfree_skb")


def symbol_samples(data: Path) -> Counter:
    """Samples per symbol (self time) in a perf.data file."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "sym",
                          "--stdio", "-g", "none", "-n", "--comms", COMMS],
                         capture_output=True, text=True, check=True).stdout
    counts: Counter = Counter()
    for line in out.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+\[[.k]\]\s+(.+?)\s*$", line)
        if m:
            # a BPF program's tag changes with every build: keep its name
            name = re.sub(r"^bpf_prog_[0-9a-f]+_", "bpf_prog_", m.group(2))
            counts[name] += int(m.group(1))
    return counts


def scheduling(data: Path) -> tuple[Counter, Counter]:
    """The client's and servers' switches out by their state (S, R, R+, ...),
    and their wake-ups and the NET_RX softirqs, from the events recorded."""
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "event,trace"],
                         capture_output=True, text=True, check=True).stdout
    switches: Counter = Counter()
    events: Counter = Counter()
    for line in out.splitlines():
        if "sched_switch" in line:
            m = re.search(r"prev_comm=fprr .*prev_state=(\S+)", line)
            if m:
                switches[m.group(1)] += 1
        elif "sched_wakeup" in line:
            if re.search(r"comm=fprr ", line):
                events["wakeups of fprr"] += 1
        elif "action=NET_RX" in line:
            events["NET_RX softirqs"] += 1
    return switches, events


class Arm:
    """One arm's accumulated connections, samples, events."""

    def __init__(self) -> None:
        self.conns = 0.0
        self.samples: Counter = Counter()
        self.events: Counter = Counter()
        self.switches: Counter = Counter()
        self.counted_conns = 0.0
        self.counted: Counter = Counter()

    def ns_per_conn(self, samples: float) -> float:
        return samples * 1e9 / SAMPLE_HZ / self.conns


def counted(path: Path) -> Counter:
    counts: Counter = Counter()
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2] in COUNTED and parts[0].strip().isdigit():
            counts[parts[2].split(":")[1]] += int(parts[0])
    return counts


def crr_recorded(perfs: list[list[str]], client: Client, ip: str, port: int,
                 seconds: float) -> float:
    """CRR to ip:port for `seconds` while each perf command line (without its
    workload) records: every recorder running before the load, all of it
    covered. Returns the CRR's connections per second."""
    span = str(seconds + 0.6)
    procs = [subprocess.Popen([*cmd, "--", "sleep", span],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for cmd in perfs]
    time.sleep(0.3)
    rate = client.run("crr", ip, seconds, port)
    for p in procs:
        if p.wait(timeout=120) != 0:
            raise RuntimeError(f"perf failed: {p.args}")
    return rate


def count_round(client: Client, ip: str, port: int, seconds: float, tmp: Path,
                arm: Arm) -> float:
    stat = tmp / "stat.csv"
    rate = crr_recorded([["perf", "stat", "-C", CPU, "-x,", "-e", ",".join(COUNTED),
                          "-o", str(stat)]], client, ip, port, seconds)
    arm.counted_conns += rate * seconds
    arm.counted += counted(stat)
    return rate


def profile_round(client: Client, ip: str, port: int, seconds: float, tmp: Path,
                  arm: Arm) -> float:
    data, sched = tmp / "perf.data", tmp / "sched.data"
    rate = crr_recorded([["perf", "record", "-C", CPU, "-F", str(SAMPLE_HZ), "-o", str(data)],
                         ["perf", "record", "-C", CPU, "-e", EVENTS, "-o", str(sched)]],
                        client, ip, port, seconds)
    arm.conns += rate * seconds
    arm.samples += symbol_samples(data)
    switches, events = scheduling(sched)
    arm.switches += switches
    arm.events += events
    return rate


def run(args) -> dict:
    if not shutil.which("perf"):
        raise SystemExit("nodeport_perf needs perf (Debian: apt install linux-perf)")
    harness.build_fprr()
    arms = {name: Arm() for pair in PAIRS for name in pair}
    with World() as w, tempfile.TemporaryDirectory(prefix="fp-npperf-") as tmpdir:
        tmp = Path(tmpdir)
        n1 = w.add_node("n1", enis=1)
        b = n1.add_pod("b")
        n3 = w.add_node("n3", enis=1)       # the floor's node: no fastpath
        fb = n3.add_pod("n3b")
        ext = w.add_client("ext")
        servers = [start_server(b), start_server(fb)]
        try:
            harness.tune_client(ext)
            client = Client(ext, ext.ip)
            with product_agent(n1) as agent, ExitStack() as stack:
                lb = agent.datapath.lb
                program_maps(lb, SERVICES, n1.ip, b.ip)
                probe = NODE_PORT_BASE + SERVICES - 1
                stack.enter_context(NodePortFloor(n3, fb, probe, PORT).attached())
                dest = {"fastpath": (n1.ip, probe), "direct": (b.ip, PORT),
                        "floor": (n3.ip, probe), "floor-direct": (fb.ip, PORT)}
                created = lb.ct_events()["created"]
                for ip, port in dest.values():
                    client.run("crr", ip, 0.5, port)
                if lb.ct_events()["created"] == created:
                    raise RuntimeError("fastpath arm: the NodePort was not translated by fastpath")
                for r in range(args.rounds):
                    for name, (ip, port) in dest.items():
                        rate = profile_round(client, ip, port, args.seconds, tmp, arms[name])
                        log(f"  round {r + 1}/{args.rounds} {name:12s} {rate:,.0f} conn/s")
                for name, (ip, port) in dest.items():
                    rate = count_round(client, ip, port, args.seconds, tmp, arms[name])
                    log(f"  counting {name:12s} {rate:,.0f} conn/s")
        finally:
            harness.stop(servers)
    return summarise(arms, args.top)


def summarise(arms: dict[str, Arm], top: int) -> dict:
    res: dict = {"command": COMMAND, "arms": {}, "pairs": {}}
    for name, a in arms.items():
        total = sum(a.samples.values())
        res["arms"][name] = {
            "connections": a.conns,
            "ns_per_conn": a.ns_per_conn(total),
            "per_conn": {e: v / a.conns for e, v in sorted(a.events.items())},
            "switches_per_conn": {s: v / a.conns for s, v in a.switches.most_common(4)},
            "counted_per_conn": {e: v / a.counted_conns for e, v in sorted(a.counted.items())},
        }
    for np_arm, direct in PAIRS:
        x, y = arms[np_arm], arms[direct]
        diff = {s: x.ns_per_conn(x.samples[s]) - y.ns_per_conn(y.samples[s])
                for s in set(x.samples) | set(y.samples)}
        ranked = sorted(diff.items(), key=lambda kv: kv[1])
        res["pairs"][f"{np_arm}-{direct}"] = {
            "ns_per_conn": res["arms"][np_arm]["ns_per_conn"] - res["arms"][direct]["ns_per_conn"],
            "bpf_programs_ns": sum(v for s, v in diff.items() if s.startswith("bpf_prog_")),
            "more": [(s, round(v)) for s, v in reversed(ranked[-top:])],
            "less": [(s, round(v)) for s, v in ranked[:top]],
        }
    return res


def report(res: dict) -> None:
    for name, a in res["arms"].items():
        ev = ", ".join(f"{k} {v:.2f}" for k, v in a["per_conn"].items())
        sw = ", ".join(f"{k} {v:.2f}" for k, v in a["switches_per_conn"].items())
        cnt = ", ".join(f"{k} {v:.2f}" for k, v in a["counted_per_conn"].items())
        log(f"{name:12s} {a['ns_per_conn']:8,.0f} ns per connection; per connection: {ev}; "
            f"switched out as {sw}; counted: {cnt}")
    for pair, p in res["pairs"].items():
        log(f"{pair}: {p['ns_per_conn']:+,.0f} ns per connection, of it in BPF programs' own "
            f"code {p['bpf_programs_ns']:+,.0f}")
        log("   more: " + ", ".join(f"{s} {v:+}" for s, v in p["more"]))
        log("   less: " + ", ".join(f"{s} {v:+}" for s, v in p["less"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write the summary here too")
    args = ap.parse_args(argv)
    res = run(args)
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
