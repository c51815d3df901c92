"""NodePorts from outside the cluster: fastpath vs kube-proxy vs the pod IP.

An external client (agent.sim's client netns on the VPC side) opens short
TCP connections (fprr crr: connect, 1-byte request, reply, close) and runs
TCP_RR (fprr rr) to a NodePort of a node whose backend pod is on that node:

  lb.nodeport_vs_direct          fastpath node n1: client -> n1:NodePort
                                 (fp_from_vpc on eth0 translates, the reply
                                 gets the NodePort back in fp_from_pod) vs the
                                 same client -> the backend pod's IP (through
                                 the VPC and n1's ENI, redirected into the pod)
  lb.nodeport_floor_vs_direct    the floor of the technique, same run: a third
                                 node n3 without fastpath runs the bare NodePort
                                 program (bench/nodeport_profile.NodePortFloor):
                                 client -> n3:NodePort vs client -> n3's pod IP
                                 through the same program's direct path. Its
                                 ratio is what any program doing NodePort this
                                 way reaches; lb.nodeport_vs_direct below it is
                                 the technique's cost, above it fastpath's own
  lb.nodeport_vs_iptables.<N>    the same fastpath arm vs a twin node with no
  lb.nodeport_vs_nftables.<N>    BPF at all and kube-proxy's rules for the same
                                 N NodePort Services (bench/kubeproxy_rules.py:
                                 iptables KUBE-SERVICES -> KUBE-NODEPORTS ->
                                 KUBE-EXT -> KUBE-SVC -> KUBE-SEP; nftables one
                                 verdict map per step), N = 1000, 10000

Services are NodePort, externalTrafficPolicy Cluster, one endpoint each; the
probed one is the last written (the worst case of iptables' linear walks,
over the N ClusterIP rules then the N NodePort rules). N = 10,000 needs more
NodePorts than the default range holds: the Services get 20000 + i, as a
cluster with a wider --service-node-port-range would. kube-proxy masquerades
eTP Cluster traffic from outside (its rules are generated so); fastpath keeps
the client's address for a backend on the node itself (VPC-native routing:
the reply goes back through this node anyway) - that difference is part of
what is measured, and is listed in docs/services.md.

fastpath's agent runs as the DaemonSet runs it, socket-LB on (product_agent).

Method as bench/lb_bench.py: alternating arms per round, medians, client and
server pinned to CPU 0; kube-proxy's rule loads (minutes for 10,000 with
iptables-restore) run on the other CPU before any arm is measured.

    python -m bench.nodeport_bench [--rounds 8] [--sizes 1000 10000] [--no-record]
    python -m bench.nodeport_bench --sizes      (lb.nodeport_vs_direct and the floor)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from agent.sim import World
from bench import harness
from bench import kubeproxy_rules as kp
from bench import lb_cluster as lc
from bench import lb_bench
from bench.lb_bench import (CLUSTER_CIDR, MODES, Client, Loader, assert_no_bpf,
                            assert_no_netfilter, log, own_cgroup, start_server)
from bench.nodeport_profile import NodePortFloor, node_programs

COMMAND = "python -m bench.nodeport_bench"
PORT = harness.FPRR_PORT
NODE_PORT_BASE = 20000
SIZES = (1000, 10000)
UNITS = {"crr": "conn/s", "rr": "trans/s"}
# iptables-restore of 10,000 NodePort Services (twice the chains of as many
# ClusterIPs) takes several minutes here: the loads get more time than
# lb_bench's, and run before any arm is measured
LOAD_TIMEOUT = 1200


def kube_services(n: int, backend_ip: str) -> list[kp.ServicePort]:
    return [kp.ServicePort(lc.namespace_of(i), f"svc-{i}", "p", lc.vip(i), PORT,
                           ((backend_ip if i == n - 1 else lc.endpoint_ip(i), PORT),),
                           node_port=NODE_PORT_BASE + i)
            for i in range(n)]


@contextmanager
def product_agent(node):
    """fastpath on `node` as the DaemonSet runs it: socket-LB on (the
    simulated agent's default is off, so that nothing attaches to the
    machine's own cgroups; with it off the node's interfaces also look for
    replies to the node's own TCP and UDP clients, a conntrack lookup per
    packet to the node). Its hooks go on a cgroup v2 child of our own that
    holds no process: no connection measured here is translated at a
    socket."""
    from agent.sim.agent import sim_attach
    with own_cgroup() as cg, sim_attach(node, socket_lb=True, cgroup_root=cg) as agent:
        if not agent.datapath.settings.socket_lb():
            raise RuntimeError("the agent did not turn socket-LB on")
        yield agent


def program_maps(lb, n: int, node_ip: str, backend_ip: str) -> None:
    """N NodePort Services as the agent writes them: each a ClusterIP and a
    NodePort frontend (one entry serving inside and outside: eTP Cluster,
    random choice), one backend; the last one's is the real pod."""
    from agent.daemon.services import apply_ops
    from agent.lb.compile import KIND_CLUSTER_IP, KIND_NODE_PORT, Backend, Frontend, FrontendState
    from agent.lb.reconcile import Reconciler
    desired = {}
    for i in range(n):
        be = Backend(backend_ip if i == n - 1 else lc.endpoint_ip(i), PORT, "TCP")
        key = (lc.namespace_of(i), f"svc-{i}")
        desired[Frontend(lc.vip(i), PORT, "TCP")] = FrontendState(key, "p", (be,),
                                                                  kind=KIND_CLUSTER_IP)
        desired[Frontend(node_ip, NODE_PORT_BASE + i, "TCP")] = FrontendState(
            key, "p", (be,), kind=KIND_NODE_PORT, sole=True)
    rec = Reconciler()
    apply_ops(lb, rec.plan(desired))


def queue_load(loader: Loader, mode: str, node, n: int, backend_ip: str) -> None:
    svcs = kube_services(n, backend_ip)
    argv = MODES[mode][1]
    if mode == "nftables":
        loader.add(f"{mode}-{n}", node, argv,
                   kp.nft_script(svcs, CLUSTER_CIDR, lc.SERVICE_CIDR, (node.ip,)))
    else:
        loader.add(f"{mode}-{n}", node, argv, kp.iptables_restore(svcs, CLUSTER_CIDR, (node.ip,)))
        loader.add(f"{mode}-jumps-{n}", node, argv, kp.iptables_jumps_restore())


def run(args) -> dict:
    started = time.monotonic()
    harness.build_fprr()
    ncpu = os.cpu_count() or 1
    bg_cpu = ncpu - 1 if ncpu > 1 else 0
    res: dict = {"raw": {}, "medians": {}, "loads": {}, "errors": {}, "rounds": args.rounds,
                 "crr_s": args.crr_seconds, "rr_s": args.rr_seconds}
    modes = ("iptables", "nftables")
    with World() as w:
        n1 = w.add_node("n1", enis=1)
        b = n1.add_pod("b")
        n3 = w.add_node("n3", enis=1)        # the floor's node: no fastpath
        fb = n3.add_pod("n3b")
        twins = {}
        for m in modes:
            for n in args.sizes:
                name = f"{MODES[m][0]}{n // 1000}k"
                node = w.add_node(name, enis=1)
                twins[(m, n)] = (node, node.add_pod(f"{name}b"))
        ext = w.add_client("ext")
        log(f"nodeport_bench: world {w.tag} built ({time.monotonic() - started:.0f}s)")
        lb_bench.LOAD_TIMEOUT = LOAD_TIMEOUT      # the Loader's bound on one load
        loader = Loader(bg_cpu)
        for (m, n), (node, pod) in twins.items():
            queue_load(loader, m, node, n, pod.ip)
        res["loads"] = loader.start().wait_all(time.monotonic() + LOAD_TIMEOUT * len(twins))
        for name, ld in res["loads"].items():
            if ld.error:
                raise RuntimeError(f"kube-proxy rules {name} did not load: {ld.error}")
        servers = ([start_server(b), start_server(fb)]
                   + [start_server(pod) for _, pod in twins.values()])
        try:
            harness.tune_client(ext)
            client = Client(ext, ext.ip)
            with product_agent(n1) as agent, ExitStack() as stack:
                assert_no_netfilter(n1)
                for node, _ in twins.values():
                    assert_no_bpf(node)
                lb = agent.datapath.lb
                # (no kube-proxy twins: --sizes with no value measures the
                # fastpath and direct arms alone, with 1,000 Services)
                top = max(args.sizes, default=1000)
                program_maps(lb, top, n1.ip, b.ip)
                probe = NODE_PORT_BASE + top - 1
                # warm the paths; prove each arm is what it says (a flow
                # opened by the datapath: a closed one leaves no entry)
                created = lb.ct_events()["created"]
                client.run("rr", n1.ip, 0.2, probe)
                if lb.ct_events()["created"] == created:
                    raise RuntimeError("fastpath arm: the NodePort was not translated by fastpath")
                client.run("rr", b.ip, 0.2)
                floor = NodePortFloor(n3, fb, probe, PORT)
                stack.enter_context(floor.attached())
                client.run("rr", n3.ip, 0.2, probe)
                client.run("rr", fb.ip, 0.2)
                if set(node_programs(n3, "npf_")) != {"npf_in", "npf_out"} or node_programs(n3):
                    raise RuntimeError("floor arm: n3 must run the bare NodePort program alone: "
                                       f"{harness.bpf_devices(n3)}")
                arms = {"fastpath": lambda: measure(client, n1.ip, probe, args),
                        "direct": lambda: measure(client, b.ip, PORT, args),
                        "floor": lambda: measure(client, n3.ip, probe, args),
                        "floor-direct": lambda: measure(client, fb.ip, PORT, args)}
                for (m, n), (node, _) in twins.items():
                    p = NODE_PORT_BASE + n - 1
                    client.run("rr", node.ip, 0.2, p)
                    arms[f"{m}.{n}"] = (lambda node=node, p=p: measure(client, node.ip, p, args))
                raw = harness.alternate(arms, args.rounds, log)
                res["raw"] = raw
                res["medians"] = {a: {k: harness.median(v) for k, v in ms.items()}
                                  for a, ms in raw.items()}
                def conns(ip, port=PORT):
                    return lambda: client.run("crr", ip, args.crr_seconds, port) * args.crr_seconds
                fp_ids, floor_ids = node_programs(n1), node_programs(n3, "npf_")
                res["cost"] = program_cost({"fastpath": (fp_ids, conns(n1.ip, probe)),
                                            "direct": (fp_ids, conns(b.ip)),
                                            "floor": (floor_ids, conns(n3.ip, probe)),
                                            "floor-direct": (floor_ids, conns(fb.ip))})
                res["errors"]["client"] = client.errors
                res["services_in_maps"] = top
        finally:
            harness.stop(servers)
    res["elapsed"] = time.monotonic() - started
    return res


def program_cost(arms: dict, reps: int = 3) -> dict:
    """arms: name -> ({program: id}, a function running the arm's CRR and
    returning how many connections it made). The programs' ns per
    connection, per program and in all, under each arm (kernel BPF run-time
    statistics, for this step only): how much of the gap between the arms
    is program time."""
    from bench.lb_bench import bpf_run_stats, prog_counters
    acc = {a: {n: [0, 0] for n in ids} for a, (ids, _) in arms.items()}
    conns = {a: 0.0 for a in arms}
    with bpf_run_stats():
        for _ in range(reps):
            for a, (ids, fn) in arms.items():
                before = {n: prog_counters(i) for n, i in ids.items()}
                conns[a] += fn()
                after = {n: prog_counters(i) for n, i in ids.items()}
                for n in ids:
                    acc[a][n][0] += after[n][0] - before[n][0]
                    acc[a][n][1] += after[n][1] - before[n][1]
    res = {}
    for a in arms:
        per = {n: {"ns_per_conn": ns / conns[a], "runs_per_conn": runs / conns[a],
                   "ns_per_run": ns / max(runs, 1)} for n, (ns, runs) in acc[a].items()
               if runs / conns[a] >= 0.05}    # (not warm-up strays)
        res[a] = {"programs": per, "ns_per_conn": sum(v["ns_per_conn"] for v in per.values())}
        log(f"nodeport_bench: {a}: program time {res[a]['ns_per_conn']:.0f} ns per connection ("
            + ", ".join(f"{n} {v['runs_per_conn']:.1f} x {v['ns_per_run']:.0f} ns"
                        for n, v in sorted(per.items())) + ")")
    return res


def measure(client: Client, ip: str, port: int, args) -> dict[str, float]:
    return {"crr": client.run("crr", ip, args.crr_seconds, port),
            "rr": client.run("rr", ip, args.rr_seconds, port)}


def paired(raw, arm, base, metric) -> float:
    return harness.median([x / y for x, y in zip(raw[arm][metric], raw[base][metric])])


def record_all(res: dict, sizes) -> None:
    from bench import results
    med, raw = res["medians"], res["raw"]
    method = (f"median of {res['rounds']} alternating rounds; client+server pinned to CPU 0; "
              f"fprr 1-byte CRR {res['crr_s']:g}s, RR {res['rr_s']:g}s; an external client "
              f"netns on the VPC side; {res['services_in_maps']} NodePort Services in "
              f"fastpath's maps")
    if res["errors"].get("client"):
        method += f"; client errors {res['errors']['client']}"
    fp, d = med["fastpath"], med["direct"]
    cost_note = ""
    c = res.get("cost")
    if c:
        gap_ns = (1 / fp["crr"] - 1 / d["crr"]) * 1e9
        progs = c["fastpath"]["programs"]
        cost_note = (f"; of the {gap_ns / 1e3:.1f} us a NodePort connection takes longer, the "
                     f"programs account for {(c['fastpath']['ns_per_conn'] - c['direct']['ns_per_conn']) / 1e3:.1f}"
                     f" us (kernel BPF run-time statistics, same run: "
                     + ", ".join(f"{n} {v['runs_per_conn']:.0f} x {v['ns_per_run']:.0f} ns"
                                 for n, v in sorted(progs.items()))
                     + "; the direct arm: " + ", ".join(
                         f"{n} {v['runs_per_conn']:.0f} x {v['ns_per_run']:.0f} ns"
                         for n, v in sorted(c["direct"]["programs"].items())) + ")")
    for metric in ("crr", "rr"):
        sfx = "" if metric == "crr" else ".rr"
        results.record(f"lb.nodeport_vs_direct{sfx}", fp[metric], UNITS[metric], command=COMMAND,
                       baseline=d[metric], ratio=fp[metric] / d[metric],
                       target=">= 0.95" if metric == "crr" else None,
                       notes=f"external client -> NodePort of a fastpath node whose backend pod "
                             f"is on it vs the same client -> the pod IP; per-round paired ratio "
                             f"median {paired(raw, 'fastpath', 'direct', metric):.3f}; {method}"
                             + (cost_note if metric == "crr" else ""))
        fl, fd = med.get("floor"), med.get("floor-direct")
        if fl and fd:
            floor_cost = ""
            if c and metric == "crr":
                floor_cost = (f"; program time per connection, same run: the bare program "
                              f"{c['floor']['ns_per_conn']:.0f} ns to the NodePort, "
                              f"{c['floor-direct']['ns_per_conn']:.0f} ns to the pod IP "
                              f"(fastpath {c['fastpath']['ns_per_conn']:.0f} and "
                              f"{c['direct']['ns_per_conn']:.0f} ns)")
            results.record(f"lb.nodeport_floor_vs_direct{sfx}", fl[metric], UNITS[metric],
                           command=COMMAND, baseline=fd[metric], ratio=fl[metric] / fd[metric],
                           notes=f"the floor of lb.nodeport_vs_direct{sfx}, same run: the same "
                                 f"client -> the NodePort of a node without fastpath running a "
                                 f"bare NodePort program (bench/nodeport_profile.NodePortFloor: "
                                 f"an LRU conntrack lookup per packet, two entries at the SYN, "
                                 f"DNAT and reverse NAT, the same redirects) vs -> that node's "
                                 f"pod IP through the same program; fastpath's ratio in this "
                                 f"run {fp[metric] / d[metric]:.3f}; per-round paired ratio "
                                 f"median {paired(raw, 'floor', 'floor-direct', metric):.3f}; "
                                 f"{method}{floor_cost}")
        for mode, target in (("iptables", ">= 1.5 at 10000"), ("nftables", ">= 1.05")):
            for n in sizes:
                k = med.get(f"{mode}.{n}")
                if not k:
                    continue
                load = res["loads"].get(f"{mode}-{n}")
                results.record(f"lb.nodeport_vs_{mode}.{n}{sfx}", fp[metric], UNITS[metric],
                               command=COMMAND, baseline=k[metric], ratio=fp[metric] / k[metric],
                               target=target if metric == "crr" else None,
                               notes=f"the same fastpath arm vs kube-proxy's {mode} NodePort "
                                     f"rules for {n} Services (eTP Cluster: masqueraded) on a "
                                     f"twin node without BPF, the probed NodePort last; rules "
                                     f"loaded in {load.seconds:.0f}s; per-round paired ratio "
                                     f"median {paired(raw, 'fastpath', f'{mode}.{n}', metric):.3f};"
                                     f" {method}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    ap.add_argument("--crr-seconds", type=float, default=2.0)
    ap.add_argument("--rr-seconds", type=float, default=1.0)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    res = run(args)
    for arm, m in res["medians"].items():
        log(f"  {arm:16s} " + " ".join(f"{k}={v:,.0f}" for k, v in m.items()))
    med = res["medians"]
    fp = med["fastpath"]
    for arm, m in med.items():
        if arm != "fastpath":
            log(f"  fastpath / {arm}: crr {fp['crr'] / m['crr']:.3f}  rr {fp['rr'] / m['rr']:.3f}")
    fl, fd = med["floor"], med["floor-direct"]
    log(f"  floor / floor-direct: crr {fl['crr'] / fd['crr']:.3f}  rr {fl['rr'] / fd['rr']:.3f}"
        f"  (paired crr {paired(res['raw'], 'floor', 'floor-direct', 'crr'):.3f}; fastpath / "
        f"direct paired crr {paired(res['raw'], 'fastpath', 'direct', 'crr'):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if not args.no_record:
        record_all(res, args.sizes)
    log(f"nodeport_bench: done in {res['elapsed']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
