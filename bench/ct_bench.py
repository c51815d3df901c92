"""Conntrack (issue 12): new connections a node sustains through a ClusterIP
while an idle flow survives, and what an established translated flow costs
per packet.

  ct.churn_new_conns_per_s
        node n1, fastpath attached with the default conntrack maps and
        lifetimes; pod a opens short connections (fprr crr: connect, 1-byte
        request, reply, close) to a ClusterIP backed by pod b, while one
        connection from a to the same ClusterIP stays idle; vs the same
        load straight to b's pod IP. Arms alternated, medians. After every
        round the idle connection must still answer, or the bench fails:
        the figure is a rate at which conntrack keeps live flows.
  ct.established_per_packet_ns
        fp_from_pod's own run time per run, from the kernel's BPF run-time
        statistics (enabled through BPF_ENABLE_STATS: on while its fd is
        open, the sysctl is never written), under one TCP connection doing
        request/response (fprr rr: after the handshake every packet is an
        established flow's) to the ClusterIP vs to b's pod IP, alternated.
        Both directions run the same program on the two pods' veths.

Everything lives in a World's namespaces; bounded: about two minutes.

    python -m bench.ct_bench [--rounds 5] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time

from agent.sim import World
from bench import harness
from bench import results
from bench.lb_bench import run_time          # fp_from_pod run time from BPF statistics

COMMAND = "python -m bench.ct_bench"
VIP = "192.168.97.10"
PORT = harness.FPRR_PORT
DIRECT_PORT = PORT + 2          # (as lb_bench: its own server port for the direct arm)

# A connection that idles between checks: one byte out, one back, per line
# read on stdin; answers "ok" or the error.
IDLE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
for line in sys.stdin:
    try:
        s.sendall(b"x")
        print("ok" if s.recv(1) == b"x" else "bad", flush=True)
    except OSError as e:
        print("error %s" % e.errno, flush=True)
"""


def log(msg: str) -> None:
    print(msg, flush=True)


def fprr_rate(client, mode: str, dst: str, port: int, seconds: float) -> tuple[float, int]:
    cmd = harness.PIN + [str(harness.build_fprr()), mode, "-H", dst, "-p", str(port),
                         "-b", client.ip, "-s", "1", "-d", f"{seconds:g}"]
    r = client.run(cmd, check=False, timeout=seconds + 30)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out.get("transactions"):
        raise RuntimeError(f"fprr {mode} -> {dst}: {r.stdout} {r.stderr}")
    return float(out["rate"]), int(out.get("errors", 0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    from agent.sim.agent import sim_attach
    fprr = str(harness.build_fprr())
    with World() as w:
        n1 = w.add_node("n1", enis=1)
        a, b = n1.add_pod("a"), n1.add_pod("b")
        harness.tune_client(a)
        with sim_attach(n1) as agent:
            lb, cfg = agent.datapath.lb, agent.config
            lb.put_backend(1, b.ip, PORT, "TCP")
            lb.put_slots(1, [1])
            lb.put_service(VIP, PORT, "TCP", 1, 1)
            for port in (PORT, DIRECT_PORT):
                b.popen(harness.PIN + [fprr, "server", "-H", b.ip, "-p", str(port), "-t", "600"])
                b.wait_port(port)
            idle = a.popen(["python3", "-c", IDLE, VIP, str(PORT)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)

            def idle_ok() -> str:
                idle.stdin.write("check\n")
                idle.stdin.flush()
                return idle.stdout.readline().strip()
            if idle_ok() != "ok":
                raise RuntimeError("the idle connection does not answer at the start")
            before = lb.ct_events()
            rates: dict[str, list[float]] = {"clusterip": [], "direct": []}
            errors = 0
            for i in range(args.rounds):
                for arm, dst, port in (("direct", b.ip, DIRECT_PORT), ("clusterip", VIP, PORT)):
                    r, e = fprr_rate(a, "crr", dst, port, args.seconds)
                    rates[arm].append(r)
                    errors += e
                    log(f"  round {i + 1}/{args.rounds} {arm:9s} crr={r:,.0f}/s")
                got = idle_ok()
                if got != "ok":
                    raise RuntimeError(f"the idle connection broke in round {i + 1}: {got}")
            after = lb.ct_events()
            entries = {t: len(lb.ct.nat_entries(t)) for t in lb.ct.NAT_TABLES}
            churn = harness.median(rates["clusterip"])
            direct = harness.median(rates["direct"])
            made = sum(rates["clusterip"]) * args.seconds
            log(f"ct_bench: {churn:,.0f} new connections/s through the ClusterIP vs {direct:,.0f} "
                f"direct; the idle connection answered after each of {args.rounds} rounds")

            # per-packet cost of an established translated flow
            out = json.loads(n1.run(["bpftool", "-j", "net", "show"]).stdout or "[]")
            ids = {p["id"] for sec in out for p in sec.get("tc", [])
                   if p.get("devname") == a.host_ifname and p.get("name") == "fp_from_pod"}
            if len(ids) != 1:
                raise RuntimeError(f"fp_from_pod on {a.host_ifname}: {ids}")
            cost = run_time(ids.pop(), {
                "direct": lambda: fprr_rate(a, "rr", b.ip, DIRECT_PORT, 4)[0] * 4,
                "clusterip": lambda: fprr_rate(a, "rr", VIP, PORT, 4)[0] * 4})
            est, dir_ns = cost["clusterip"]["ns_per_run"], cost["direct"]["ns_per_run"]
            log(f"ct_bench: fp_from_pod {est:.0f} ns per run on an established translated flow, "
                f"{dir_ns:.0f} ns direct")
            idle.stdin.close()
            idle.wait(timeout=10)
            if args.no_record:
                return 0
            life = agent.datapath.options.lifetimes()
            results.record(
                "ct.churn_new_conns_per_s", churn, "conn/s", command=COMMAND, baseline=direct,
                ratio=churn / direct,
                notes=f"pod -> ClusterIP short connections (fprr crr, 1-byte request/reply, "
                      f"client and server on CPU 0) at the default maps: established "
                      f"{cfg.conntrack_map_size:,} entries (hash), new/closing "
                      f"{cfg.conntrack_new_map_size:,} (LRU); lifetimes SYN {life.tcp_syn} s, "
                      f"established {life.tcp_established} s, FIN {life.tcp_fin} s, closed "
                      f"{life.tcp_close} s, other {life.other} s; a connection to the same "
                      f"ClusterIP idle throughout answered after each of {args.rounds} "
                      f"alternating {args.seconds:g} s rounds (baseline: the same load to the "
                      f"backend's pod IP); {made:,.0f} connections, {errors} client errors; "
                      f"events: {after['created'] - before['created']:,} created, "
                      f"{after['promoted'] - before['promoted']:,} promoted, "
                      f"{after['promotion-failed-full'] - before['promotion-failed-full']} "
                      f"promotion failures; entries at the end: {entries}")
            results.record(
                "ct.established_per_packet_ns", est, "ns", command=COMMAND, baseline=dir_ns,
                ratio=est / dir_ns,
                notes=f"fp_from_pod run time per run (kernel BPF run-time statistics via "
                      f"BPF_ENABLE_STATS; no sysctl written) under one TCP request/response "
                      f"connection (fprr rr, 3 x 4 s per arm, alternated) to a ClusterIP vs the "
                      f"same to the backend's pod IP; runs per transaction "
                      f"{cost['clusterip']['runs_per_conn']:.3f} vs "
                      f"{cost['direct']['runs_per_conn']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
