"""Measurement primitives shared by fastpath's benchmarks.

The method is DESIGN.md's: arms measured side by side in one run, alternated
A B C A B C, medians taken, client and server pinned to the same CPU (so the
figure is the path's cost, not cross-CPU wake-ups). Load comes from the small
C tool bench/tools/fprr.c (request/response, connect/request/response/close)
and from iperf3 (throughput); each run is bounded in time, and every server
binds only the address it is given, inside a namespace of the world.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"
FPRR_SRC = BENCH_DIR / "tools" / "fprr.c"
FPRR = BUILD_DIR / "fprr"
PIN = ["taskset", "-c", "0"]
FPRR_PORT = 9100
IPERF_PORT = 9101


def build_fprr() -> Path:
    """Compile fprr into bench/build/ unless the binary is newer than its source."""
    if FPRR.exists() and FPRR.stat().st_mtime >= FPRR_SRC.stat().st_mtime:
        return FPRR
    BUILD_DIR.mkdir(exist_ok=True)
    tmp = FPRR.with_suffix(".tmp")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(FPRR_SRC)], check=True)
    tmp.replace(FPRR)      # atomic: a parallel run never executes a half-written file
    return FPRR


def tune_client(ns) -> None:
    """Let a CRR client open tens of thousands of connections in seconds.

    Closing first leaves the client's side in TIME_WAIT; reuse and a wide port
    range (even start, odd end, as the kernel prefers) keep it from running
    out of ports. Set inside the world's netns only.
    """
    ns.sysctl({"net.ipv4.tcp_tw_reuse": 1, "net.ipv4.ip_local_port_range": "1024 65535"})


@dataclass
class Endpoints:
    """Where one arm's load runs: client netns -> server netns at `server_ip`."""
    client: object       # an agent.sim Netns (pod, pair end)
    server: object
    server_ip: str
    client_ip: str


def start_servers(ep: Endpoints, lifetime: int = 600) -> list[subprocess.Popen]:
    """fprr and iperf3 servers on the server side, pinned like the clients.

    They live in the world's netns, so the world stops them when it closes;
    the caller also stops them when done.
    """
    fprr = build_fprr()
    procs = [
        ep.server.popen(PIN + [str(fprr), "server", "-H", ep.server_ip, "-p", str(FPRR_PORT),
                               "-t", str(lifetime)]),
        ep.server.popen(PIN + ["iperf3", "-s", "-B", ep.server_ip, "-p", str(IPERF_PORT)]),
    ]
    ep.server.wait_port(FPRR_PORT)
    ep.server.wait_port(IPERF_PORT)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def fprr(ep: Endpoints, mode: str, seconds: float, size: int = 1) -> float:
    """Transactions (rr) or connections (crr) per second for `seconds`."""
    cmd = PIN + [str(build_fprr()), mode, "-H", ep.server_ip, "-p", str(FPRR_PORT),
                 "-b", ep.client_ip, "-s", str(size), "-d", str(seconds)]
    r = ep.client.run(cmd, timeout=seconds + 30)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["transactions"] == 0:
        raise RuntimeError(f"fprr {mode} made no transactions: {r.stdout} {r.stderr}")
    return float(out["rate"])


def iperf3(ep: Endpoints, seconds: float) -> float:
    """TCP throughput in Gbit/s (receiver side) for `seconds`."""
    from agent.sim.traffic import iperf3 as run
    out = run(ep.client, ep.client_ip, ep.server_ip, IPERF_PORT, ["-t", str(seconds)],
              timeout=seconds + 30, prefix=PIN)
    return out["end"]["sum_received"]["bits_per_second"] / 1e9


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def alternate(arms: dict[str, Callable[[], dict[str, float]]], rounds: int,
              log: Callable[[str], None] = print) -> dict[str, dict[str, list[float]]]:
    """Run each arm once per round, in order, for `rounds` rounds.

    Each arm callable returns {metric: value}; the result maps
    arm -> metric -> values in round order.
    """
    results: dict[str, dict[str, list[float]]] = {a: {} for a in arms}
    for i in range(rounds):
        for name, fn in arms.items():
            t = time.monotonic()
            vals = fn()
            for k, v in vals.items():
                results[name].setdefault(k, []).append(v)
            log(f"  round {i + 1}/{rounds} {name:9s} " +
                " ".join(f"{k}={v:,.1f}" for k, v in vals.items()) +
                f"  ({time.monotonic() - t:.1f}s)")
    return results


def bpf_devices(node) -> dict[str, list[str]]:
    """Device -> programs attached to it in `node` (tc, tcx or XDP), as
    bpftool sees them: the check that an arm is what it claims to be."""
    out = json.loads(node.run(["bpftool", "-j", "net", "show"]).stdout or "[]")
    progs: dict[str, list[str]] = {}
    for section in out:
        for kind in ("xdp", "tc"):
            for p in section.get(kind, []):
                progs.setdefault(p.get("devname", "?"), []).append(p.get("name", "?"))
    return progs
