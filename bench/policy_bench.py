"""NetworkPolicy: per-packet cost with enforcement on, and the control plane.

Data path (pods a -> b on one node, fastpath attached, fprr CRR and iperf3,
client and server pinned to CPU 0, arms alternated per round, medians):

  policy.vs_off.<N>          N = 0, 1000, 10000 rules
        enforced: N ingress rules for b and N egress rules for a (100 per
        NetworkPolicy; each an ipBlock /24 elsewhere and a port); the probed
        pair is allowed by the last rule of each direction (N = 0: no
        policy at all, enforcement on)
        off: the same node, maps and pods with the datapath's policy switch
        off (what `policy_enforcement: never` runs)
        ratio = enforced / off, connection rate and throughput
  policy.vs_iptables.<N>     N = 1000, 10000
        the same enforced arm vs the same rules as an iptables filter chain
        (bench/policy_bench.py: iptables_filter), the shape iptables-based
        policy agents build without ipsets: FORWARD -> conntrack
        ESTABLISHED accept -> a chain per pod and direction with one rule per
        allowed peer, walked in order, then DROP; loaded into a twin node
        with no BPF at all (host stack routing)

Control plane:

  policy.from_pod_ns_per_packet.<N>   (context, largest N)
        fp_from_pod's own run time per packet, enforced vs off, from the
        kernel's BPF run-time statistics

  policy.compile_seconds     full compile of 1,000 NetworkPolicies over
                             1,000 pods (100 on the node): agent.policy.compile_policy
  policy.change_p99_ms       1,000 changes (one NetworkPolicy edited each) with
                             those present: time from the store update to
                             the last map write, through the agent's policy
                             reconciler on a simulated node's real pinned maps

    python -m bench.policy_bench [--rounds 5] [--sizes 0 1000 10000] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

from agent.sim import World
from bench import harness
from bench.harness import Endpoints

COMMAND = "python -m bench.policy_bench"
SIZES = (0, 1000, 10000)
IPT_SIZES = (1000, 10000)


def _flag_policy() -> int:
    from agent.model.bpfdefs import load
    return load().defines["FP_CFG_F_POLICY"]


FLAG_POLICY = _flag_policy()


def log(msg: str) -> None:
    print(msg, flush=True)


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


# -- control plane -----------------------------------------------------------------------
# The cluster and its day-to-day changes are tests/policy/scale.py's (the
# compiler's own cost workload): 1,000 pods in 50 namespaces, 100 on the
# node, 1,000 NetworkPolicies of the kinds clusters write.

CP_PODS, CP_LOCAL, CP_POLICIES, CP_CHANGES = 1000, 100, 1000, 1000
POLICY_CHANGES = ("policy add", "policy modify", "policy remove")


def compile_figure(reps: int = 3) -> dict:
    from agent.policy import compile_policy, usage
    from tests.policy.scale import NODE as SCALE_NODE, NODE_IPS, Scale
    sc = Scale(1, CP_PODS, CP_LOCAL, CP_POLICIES)
    snap = sc.store.snapshot()
    times, state = [], None
    for _ in range(reps):
        t = time.perf_counter()
        state = compile_policy(snap, SCALE_NODE, NODE_IPS, "default")
        times.append(time.perf_counter() - t)
    u = usage(state)
    log(f"policy_bench: full compile of {len(snap.network_policies)} policies x "
        f"{len(snap.pods)} pods: " + ", ".join(f"{x:.2f}s" for x in times) + f" ({u})")
    return {"seconds": statistics.median(times), "runs": times, "usage": u,
            "policies": len(snap.network_policies), "pods": len(snap.pods),
            "local": len(state.endpoints), "identities": len(state.identity_info)}


def record_compile(c: dict) -> None:
    from bench import results
    u = c["usage"]
    results.record("policy.compile_seconds", c["seconds"], "s", command=COMMAND, target="< 5 s",
                   notes=f"median of {len(c['runs'])} full compiles (agent.policy.compile_policy, "
                         f"no previous state) of {c['policies']:,} NetworkPolicies over "
                         f"{c['pods']:,} pods (tests/policy/scale.py, seed 1), {c['local']} on the "
                         f"node: {u['rules']:,} rules, {u['ipcache']:,} ipcache entries, "
                         f"{c['identities']} identities; runs "
                         + ", ".join(f"{x:.2f}s" for x in c["runs"]))


def change_figure(budget: float = 600.0) -> dict:
    """CP_CHANGES NetworkPolicy changes (add, modify, remove in turn) through
    the agent's reconciler (PolicySync.sync_once: compile with previous=,
    capacity check, ordered diff, writes to the real pinned maps of a
    simulated node): time from the store update to the last map write."""
    from agent.policy import Capacities
    from agent.daemon.policysync import PolicySync
    from agent.sim.agent import sim_attach
    from tests.policy.scale import NODE as SCALE_NODE, NODE_IPS, Scale
    sc = Scale(2, CP_PODS, CP_LOCAL, CP_POLICIES)
    out: dict = {"load": [os.getloadavg()[0]]}
    with World() as w:
        node = w.add_node("cp", enis=0)
        # The agent's own reconciler is off (enforcement never): the maps are
        # this loop's alone.
        with sim_attach(node, register=False) as agent:
            cfg = agent.config
            maps = agent.datapath.policy
            timed = TimedWrites(maps)
            sync = PolicySync(timed, agent.datapath.settings, sc.store, None, SCALE_NODE, "default",
                              Capacities(cfg.ipcache_map_size, cfg.endpoints_map_size,
                                         cfg.policy_map_size), lambda: list(NODE_IPS))
            t = time.perf_counter()
            out["program_ops"] = sync.sync_once()
            out["program_s"] = time.perf_counter() - t
            want = {"ipcache": sync.status.ipcache, "endpoints": sync.status.endpoints,
                    "rules": sync.status.rules}
            if maps.usage() != want or sync.status.refused:
                raise RuntimeError(f"maps hold {maps.usage()}, the reconciler says {want} "
                                   f"(refused: {sync.status.refused})")
            log(f"policy_bench: {want} programmed from empty in {out['program_s']:.2f}s "
                f"({out['program_ops']:,} writes)")
            ms, ops, write_ms, cpu_ms = [], [], [], []
            end = time.monotonic() + budget
            for i in range(CP_CHANGES):
                if time.monotonic() > end:
                    break
                timed.seconds = 0.0
                t, c = time.perf_counter(), time.thread_time()
                sc.change(POLICY_CHANGES[i % len(POLICY_CHANGES)])
                ops.append(sync.sync_once())
                ms.append((time.perf_counter() - t) * 1e3)
                cpu_ms.append((time.thread_time() - c) * 1e3)
                write_ms.append(timed.seconds * 1e3)
            if sync.status.applied_version != sc.store.version or sync.status.refused:
                raise RuntimeError(f"reconciler behind the store: {sync.status.as_dict()}")
            final = {"ipcache": sync.status.ipcache, "endpoints": sync.status.endpoints,
                     "rules": sync.status.rules}
            if maps.usage() != final:
                raise RuntimeError(f"maps hold {maps.usage()}, the reconciler says {final}")
            out.update(ms=ms, ops=ops, write_ms=write_ms, usage=want, final=final, cpu_ms=cpu_ms)
            out["load"].append(os.getloadavg()[0])
    log(f"policy_bench: {len(ms)} NetworkPolicy changes: p50 {statistics.median(ms):.1f} ms, "
        f"p99 {p99(ms):.1f} ms, max {max(ms):.1f} ms (CPU p99 {p99(cpu_ms):.1f} ms); "
        f"writes per change "
        f"{min(ops)}-{max(ops)}; map writes alone p50 {statistics.median(write_ms):.1f} ms, "
        f"p99 {p99(write_ms):.1f} ms")
    return out


class TimedWrites:
    """The policy maps, with the time spent in writes added up."""

    def __init__(self, maps):
        self._maps = maps
        self.seconds = 0.0

    def apply(self, op) -> None:
        t = time.perf_counter()
        self._maps.apply(op)
        self.seconds += time.perf_counter() - t

    def apply_all(self, ops) -> None:
        t = time.perf_counter()
        self._maps.apply_all(ops)
        self.seconds += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self._maps, name)


def record_change(c: dict) -> None:
    from bench import results
    ms, ops, u = c["ms"], c["ops"], c["usage"]
    load = c["load"]
    results.record("policy.change_p99_ms", p99(ms), "ms", command=COMMAND, target="<= 20 ms",
                   notes=f"p99 over {len(ms)} NetworkPolicy changes (add, modify, remove in turn; "
                         f"tests/policy/scale.py, seed 2) with {CP_POLICIES:,} policies and "
                         f"{CP_PODS:,} pods ({u['endpoints']} on the node, {u['rules']:,} rules) "
                         f"present: store update -> PolicySync.sync_once (compile with previous=, "
                         f"capacity check, ordered diff, writes to the real pinned maps of a "
                         f"simulated node) returns; p50 {statistics.median(ms):.1f} ms, max "
                         f"{max(ms):.1f} ms; the thread's CPU time p50 "
                         f"{statistics.median(c['cpu_ms']):.1f} ms, p99 {p99(c['cpu_ms']):.1f} ms, "
                         f"max {max(c['cpu_ms']):.1f} ms; map writes per change {min(ops)}-{max(ops)} (median "
                         f"{statistics.median(ops):g}), of which the map writes alone took p50 "
                         f"{statistics.median(c['write_ms']):.1f} ms, p99 {p99(c['write_ms']):.1f} ms "
                         f"(the rest: compile, capacity check, diff; the writes of a plan go in "
                         f"batches, one per run of one kind of write); programming the maps from "
                         f"empty: {c['program_s']:.2f}s, {c['program_ops']:,} writes; machine load: "
                         f"1-minute load average {min(load):.1f}-{max(load):.1f} during the run on "
                         f"{os.cpu_count()} vCPUs (other runs share them)")


# -- the iptables baseline ----------------------------------------------------------------

def filler(i: int, net: int) -> tuple[str, int]:
    """Peer and port of the i-th rule that does not match the probed pair:
    100 /24 blocks x 100 ports (rule i: block i % 100, port 10000 + i // 100),
    so N rules are N distinct (peer, port) pairs without N distinct CIDRs,
    and rules of one policy (100 consecutive i) never share a port range
    the compiler could merge."""
    return f"10.{net}.{i % 100}.0/24", 10000 + i // 100 % 100


def iptables_filter(n: int, client_ip: str, client_if: str, server_ip: str, server_if: str,
                    ports: str) -> str:
    """The filter table an iptables-based policy agent writes (plain rules,
    no ipsets) for N rules at the server's ingress and N at the client's
    egress, the pair allowed by the last of each; for `iptables-restore
    --noflush`. Established and related packets are accepted first, so only
    a connection's first packet walks the per-pod chains."""
    lines = ["*filter", ":FP-FORWARD - [0:0]", ":FP-EGRESS-A - [0:0]", ":FP-INGRESS-B - [0:0]",
             "-A FORWARD -j FP-FORWARD",
             "-A FP-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
             "-A FP-FORWARD -m conntrack --ctstate INVALID -j DROP",
             f"-A FP-FORWARD -i {client_if} -j FP-EGRESS-A",
             f"-A FP-FORWARD -o {server_if} -j FP-INGRESS-B",
             "-A FP-FORWARD -j ACCEPT"]
    for i in range(n - 1):
        net, port = filler(i, 201)
        lines.append(f"-A FP-EGRESS-A -d {net} -p tcp -m tcp --dport {port} -j RETURN")
    if n:
        lines.append(f"-A FP-EGRESS-A -d {server_ip}/32 -p tcp -m tcp --dport {ports} -j RETURN")
        lines.append("-A FP-EGRESS-A -j DROP")
    for i in range(n - 1):
        net, port = filler(i, 200)
        lines.append(f"-A FP-INGRESS-B -s {net} -p tcp -m tcp --dport {port} -j ACCEPT")
    if n:
        lines.append(f"-A FP-INGRESS-B -s {client_ip}/32 -p tcp -m tcp --dport {ports} -j ACCEPT")
        lines.append("-A FP-INGRESS-B -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


RULES_PER_POLICY = 100


def policy_count(n: int) -> int:
    """NetworkPolicies per direction holding N rules."""
    return -(-n // RULES_PER_POLICY)


def datapath_policies(n: int, port_lo: int, port_hi: int) -> list[dict]:
    """The same rules as NetworkPolicies: N ingress rules for the server
    (app=server) and N egress rules for the client (app=client), 100 per
    policy; the last rule of each direction admits the pair."""
    def rule(i: int, net: int, pair: dict) -> dict:
        if i == n - 1:
            return {"peer": pair, "ports": [{"port": port_lo, "endPort": port_hi,
                                             "protocol": "TCP"}]}
        cidr, port = filler(i, net)
        return {"peer": {"ipBlock": {"cidr": cidr}}, "ports": [{"port": port, "protocol": "TCP"}]}

    out = []
    for p in range(policy_count(n)):
        idx = range(p * RULES_PER_POLICY, min(n, (p + 1) * RULES_PER_POLICY))
        ins = [rule(i, 200, {"podSelector": {"matchLabels": {"app": "client"}}}) for i in idx]
        outs = [rule(i, 201, {"podSelector": {"matchLabels": {"app": "server"}}}) for i in idx]
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"namespace": "bench", "name": f"in-{p:04d}"},
                    "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                             "policyTypes": ["Ingress"],
                             "ingress": [{"from": [r["peer"]], "ports": r["ports"]} for r in ins]}})
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"namespace": "bench", "name": f"out-{p:04d}"},
                    "spec": {"podSelector": {"matchLabels": {"app": "client"}},
                             "policyTypes": ["Egress"],
                             "egress": [{"to": [r["peer"]], "ports": r["ports"]} for r in outs]}})
    return out


# -- data path ---------------------------------------------------------------------------

UNITS = {"crr": "conn/s", "stream": "Gbit/s"}
PORTS = f"{harness.FPRR_PORT}:{harness.IPERF_PORT}"


def bench_objects(node_name: str, pods: dict, n: int) -> list[dict]:
    """Namespace bench, pods a (client), b (server), c (a bystander no rule
    admits), and the N-rule policies."""
    out = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}]
    for name, (ip, app) in pods.items():
        out.append({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"namespace": "bench", "name": name, "labels": {"app": app}},
                    "spec": {"nodeName": node_name, "containers": [{"name": "c"}]},
                    "status": {"phase": "Running", "podIP": ip}})
    return out + datapath_policies(n, harness.FPRR_PORT, harness.IPERF_PORT)


def write_manifests(directory: str, objs: list[dict]) -> None:
    tmp = os.path.join(directory, ".bench.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": objs}, f)
    os.replace(tmp, os.path.join(directory, "bench.json"))


def wait_policy(agent, n: int, before: int, timeout: float = 300) -> dict:
    """Until the agent's source has read the new manifests (store version
    past `before`) and its reconciler has put that state in the maps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        src = agent.source.status()
        st = agent.policy.status
        if (src["synced"] and src["store_version"] > before
                and st.applied_version >= src["store_version"]
                and st.policies == 2 * policy_count(n)):
            if st.error or st.refused:
                raise RuntimeError(f"policy reconciler: {st.error or st.refused}")
            return st.as_dict()
        time.sleep(0.1)
    raise RuntimeError(f"the agent did not apply {2 * policy_count(n)} policies within "
                       f"{timeout}s: store {agent.source.status()['store_version']}, "
                       f"policy {agent.policy.status.as_dict()}")


def reachable(client, server_ip: str, port: int = harness.FPRR_PORT) -> bool:
    r = client.run(["sh", "-c", f"printf x | nc -N -w 1 {server_ip} {port} >/dev/null"],
                   check=False, timeout=10)
    return r.returncode == 0


IPT_FLUSH = ("*filter\n-F FP-FORWARD\n-F FP-EGRESS-A\n-F FP-INGRESS-B\n-D FORWARD -j FP-FORWARD\n"
             "-X FP-FORWARD\n-X FP-EGRESS-A\n-X FP-INGRESS-B\nCOMMIT\n")


def load_iptables(node, text: str, loaded: bool) -> float:
    t = time.monotonic()
    if loaded:
        node.run(["iptables-restore", "--noflush"], input=IPT_FLUSH, timeout=300)
    node.run(["iptables-restore", "--noflush"], input=text, timeout=300)
    return time.monotonic() - t


def data_path(args) -> dict:
    from agent.sim.agent import sim_attach
    from bench.lb_bench import assert_fastpath_on, assert_no_bpf, assert_no_netfilter
    harness.build_fprr()
    res: dict = {"raw": {}, "medians": {}, "setup": {}, "checks": {}}
    started = time.monotonic()
    with World() as w:
        n1 = w.add_node("n1", enis=1)
        a, b, c = n1.add_pod("a"), n1.add_pod("b"), n1.add_pod("c")
        ipt = w.add_node("ipt", enis=1)
        ia, ib = ipt.add_pod("ia"), ipt.add_pod("ib")
        eps = {"fp": Endpoints(a, b, b.ip, a.ip), "ipt": Endpoints(ia, ib, ib.ip, ia.ip)}
        pods = {"a": (a.ip, "client"), "b": (b.ip, "server"), "c": (c.ip, "other")}
        servers: list = []
        try:
            for ep in eps.values():
                harness.tune_client(ep.client)
                servers += harness.start_servers(ep, lifetime=3600)
            with sim_attach(n1, policy_enforcement="default") as agent:
                settings = agent.datapath.settings
                manifests = agent.config.source
                assert_no_netfilter(n1)
                ipt_loaded = False
                for ep in eps.values():
                    ep.client.ping(ep.server_ip, count=1)
                    harness.fprr(ep, "rr", 0.2)
                for n in sorted(args.sizes):
                    t = time.monotonic()
                    before = agent.source.status()["store_version"]
                    write_manifests(manifests, bench_objects(n1.name, pods, n))
                    st = wait_policy(agent, n, before)
                    setup = {"apply_s": time.monotonic() - t, "rules": st["rules"],
                             "ipcache": st["ipcache"]}
                    # conntrack of earlier sizes is not this size's cost
                    agent.datapath.lb.conntrack_flush()
                    settings.set_policy(True)
                    checks = {"c_to_b_enforced": reachable(c, b.ip),
                              "a_to_b_enforced": reachable(a, b.ip)}
                    settings.set_policy(False)
                    checks["c_to_b_off"] = reachable(c, b.ip)
                    if not checks["a_to_b_enforced"] or not checks["c_to_b_off"] or (
                            n and checks["c_to_b_enforced"]):
                        raise RuntimeError(f"N={n}: enforcement is not what it should be: {checks}")
                    arms = {}

                    def fp_arm(on: bool):
                        def arm():
                            settings.set_policy(on)
                            flags = settings.get()["flags"] & FLAG_POLICY
                            if bool(flags) != on:
                                raise RuntimeError(f"policy switch is {bool(flags)}, wanted {on}")
                            assert_fastpath_on(n1, [a, b])
                            return measure(eps["fp"], args)
                        return arm
                    arms["off"] = fp_arm(False)
                    arms["enforced"] = fp_arm(True)
                    if n in args.ipt_sizes:
                        setup["iptables_load_s"] = load_iptables(
                            ipt, iptables_filter(n, ia.ip, ia.host_ifname, ib.ip, ib.host_ifname,
                                                 PORTS), ipt_loaded)
                        ipt_loaded = True
                        if reachable(ia, ib.ip) is not True:
                            raise RuntimeError(f"N={n}: iptables rules block the probed pair")

                        def ipt_arm():
                            assert_no_bpf(ipt)
                            return measure(eps["ipt"], args)
                        arms["iptables"] = ipt_arm
                    log(f"policy_bench: N={n}: {st['rules']} rules, {st['ipcache']} ipcache "
                        f"entries, applied in {setup['apply_s']:.1f}s; checks {checks}; "
                        f"arms {', '.join(arms)}")
                    raw = harness.alternate(arms, args.rounds, log)
                    settings.set_policy(True)
                    if n:
                        # The measured connections were admitted by the last
                        # rule of each direction, as the per-policy counters say.
                        state = agent.policy.state
                        allowed = {state.policy_name(v["policy_id"]): v["flows"]
                                   for v in agent.datapath.policy.verdicts()
                                   if v["verdict"] == "allow" and v["flows"]}
                        p = policy_count(n) - 1
                        last = {f"bench/in-{p:04d}", f"bench/out-{p:04d}"}
                        if not last <= set(allowed):
                            raise RuntimeError(f"N={n}: flows were not admitted by {last}: "
                                               f"{allowed}")
                        setup["admitted"] = {k: allowed[k] for k in sorted(last)}
                    if n == max(args.sizes):
                        res["bpf_cost"] = from_pod_cost(n1, a, b, settings, eps["fp"],
                                                        args.crr_seconds)
                        res["bpf_cost"]["size"] = n
                        settings.set_policy(True)
                    res["raw"][n], res["setup"][n], res["checks"][n] = raw, setup, checks
                    res["medians"][n] = {arm: {m: harness.median(v) for m, v in ms.items()}
                                         for arm, ms in raw.items()}
        finally:
            harness.stop(servers)
    res["elapsed"] = time.monotonic() - started
    return res


def from_pod_cost(n1, a, b, settings, ep: Endpoints, seconds: float) -> dict:
    """fp_from_pod's own run time per packet under CRR, enforcement on vs
    the switch off (kernel BPF run-time statistics, alternated): the
    per-packet price of the checks without the noise of connection rates.
    Same-node traffic is judged there at both ends (egress of a, ingress of
    b before the redirect), replies included (conntrack)."""
    from bench.lb_bench import run_time
    out = json.loads(n1.run(["bpftool", "-j", "net", "show"]).stdout or "[]")
    ids = {p["id"] for sec in out for p in sec.get("tc", [])
           if p.get("devname") == a.host_ifname and p.get("name") == "fp_from_pod"}
    if len(ids) != 1:
        raise RuntimeError(f"fp_from_pod on {a.host_ifname}: {ids}")

    def load(on: bool):
        def run() -> float:
            settings.set_policy(on)
            return harness.fprr(ep, "crr", seconds) * seconds
        return run
    return run_time(ids.pop(), {"off": load(False), "enforced": load(True)})


def measure(ep: Endpoints, args) -> dict[str, float]:
    return {"crr": harness.fprr(ep, "crr", args.crr_seconds),
            "stream": harness.iperf3(ep, args.stream_seconds)}


def paired(raw: dict, arm: str, base: str, metric: str) -> float:
    return harness.median([x / y for x, y in zip(raw[arm][metric], raw[base][metric])])


def record_data_path(res: dict, args) -> None:
    from bench import results
    method = (f"median of {args.rounds} alternating rounds; client+server pinned to CPU 0; "
              f"fprr 1-byte CRR {args.crr_seconds:g}s, iperf3 {args.stream_seconds:g}s")
    for n, med in sorted(res["medians"].items()):
        raw, setup = res["raw"][n], res["setup"][n]
        shape = (f"{n} ingress rules for the server and {n} egress rules for the client "
                 f"(ipBlock /24 + port each, {RULES_PER_POLICY} per NetworkPolicy), the pair "
                 f"admitted by the last rule of each: {setup['rules']:,} rule entries, "
                 f"{setup['ipcache']} ipcache entries"
                 if n else "enforcement on, no NetworkPolicy (no pod isolated)")
        e, o = med["enforced"], med["off"]
        for m in ("crr", "stream"):
            suffix = "" if m == "crr" else ".stream"
            results.record(f"policy.vs_off.{n}{suffix}", e[m], UNITS[m], command=COMMAND,
                           baseline=o[m], ratio=e[m] / o[m], target=">= 0.98",
                           notes=f"{'TCP_CRR' if m == 'crr' else 'TCP stream'}: pod a -> pod b "
                                 f"on one fastpath node, policy enforced vs the same node with "
                                 f"the datapath's policy switch off; {shape}; per-round paired "
                                 f"ratio median {paired(raw, 'enforced', 'off', m):.3f}; {method}")
        if "iptables" in med:
            ip = med["iptables"]
            for m in ("crr", "stream"):
                suffix = "" if m == "crr" else ".stream"
                results.record(f"policy.vs_iptables.{n}{suffix}", e[m], UNITS[m], command=COMMAND,
                               baseline=ip[m], ratio=e[m] / ip[m],
                               target=">= 3.5" if (m == "crr" and n >= 10000) else None,
                               notes=f"{'TCP_CRR' if m == 'crr' else 'TCP stream'}: the enforced "
                                     f"arm vs the same {n}+{n} rules as an iptables filter chain "
                                     f"(iptables-restore, nf_tables backend; conntrack "
                                     f"ESTABLISHED accept, then per-pod chains walked rule by "
                                     f"rule, the pair's rule last; loaded in "
                                     f"{setup.get('iptables_load_s', float('nan')):.1f}s) on a "
                                     f"twin node without BPF; per-round paired ratio median "
                                     f"{paired(raw, 'enforced', 'iptables', m):.3f}; {method}")


# -- main ------------------------------------------------------------------------------------

def record_bpf_cost(res: dict, args) -> None:
    from bench import results
    bc = res.get("bpf_cost")
    if not bc:
        return
    e, o, n = bc["enforced"], bc["off"], bc["size"]
    conn_us = 1e6 / res["medians"][n]["enforced"]["crr"]
    results.record(f"policy.from_pod_ns_per_packet.{n}", e["ns_per_run"], "ns", command=COMMAND,
                   baseline=o["ns_per_run"], ratio=e["ns_per_run"] / o["ns_per_run"],
                   notes=f"context: fp_from_pod's own run time per packet (kernel BPF run-time "
                         f"statistics, enabled through BPF_ENABLE_STATS for this step only) under "
                         f"CRR a -> b with {n}+{n} rules, policy enforced vs the switch off, "
                         f"alternated 3 times x {args.crr_seconds:g}s: {e['runs_per_conn']:.1f} runs "
                         f"per connection, so enforcement adds "
                         f"{e['us_per_conn'] - o['us_per_conn']:.2f} us of program time to a "
                         f"connection that takes about {conn_us:.0f} us in all "
                         f"({(e['us_per_conn'] - o['us_per_conn']) / conn_us:.1%})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--ipt-sizes", type=int, nargs="*", default=list(IPT_SIZES))
    ap.add_argument("--crr-seconds", type=float, default=1.25)
    ap.add_argument("--stream-seconds", type=float, default=2.0)
    ap.add_argument("--no-data-path", dest="data_path", action="store_false")
    ap.add_argument("--no-control-plane", dest="control_plane", action="store_false")
    ap.add_argument("--no-record", action="store_true", help="print only; leave bench/results.* alone")
    args = ap.parse_args(argv)
    if args.control_plane:
        comp = compile_figure()
        chg = change_figure()
        if not args.no_record:
            record_compile(comp)
            record_change(chg)
    if args.data_path:
        res = data_path(args)
        for n, med in sorted(res["medians"].items()):
            log(f"N={n}: " + "; ".join(f"{arm} " + " ".join(f"{m}={v:,.2f}" for m, v in ms.items())
                                       for arm, ms in med.items()))
        bc = res.get("bpf_cost")
        if bc:
            log("policy_bench: fp_from_pod run time: " + "; ".join(
                f"{arm} {c['ns_per_run']:.0f} ns x {c['runs_per_conn']:.1f}/conn"
                for arm, c in bc.items() if isinstance(c, dict)))
        if not args.no_record:
            record_data_path(res, args)
            record_bpf_cost(res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
