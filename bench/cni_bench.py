"""CNI ADD latency of fastpath-cni, measured from the runtime's side.

Two simulated Terway nodes in one world, each running `fastpath agent`: n1
with NetworkPolicy enforced (`policy_enforcement: default`; the pods'
namespace has a default-deny policy and each pod's Pod object is in the
agent's store, scheduled and without an address, as it is when the kubelet
runs CNI ADD), so every ADD takes the identity step (labels from the store,
a policy plan with the ADD's address, the pod's entries written before ADD
returns); n2 with enforcement `never`, the ADD as it was before the
identity step. A libcni-like runtime (chainer.testing) runs
deploy/10-terway.conflist (the Terway stand-in, then fastpath-cni as a node
installs it) for 200 pods per node, the arms alternating pod by pod, then
rounds of 20 pods at once on each. The figure is fastpath-cni's own ADD:
fork to exit of its process, as the runtime waits for it. In the same loop
Debian's `ptp` with `host-local` adds a pod of its own: the reference for
what a plain veth plugin costs here.

Each ADD is split with the plugin's debug log line (wall-clock times of its
first line and of main(), its round trip to the agent) and the agent's own
timing (discovery, identity, policy plan, attach + map write): start-up =
fork to main(); round trip = the call minus the agent's part; the rest is
reading stdin and writing the result.

Start-up alone is also compared with `python -c "import grpc"` (why the
CNI path does not use gRPC), the launcher in the source tree and the venv's
console script: VERSION runs, alternating, medians.

Run: python -m bench.cni_bench [--pods 200] [--rounds 5] [--concurrency 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.api import wire
from agent.sim import World, plan
from agent.sim.netns import ip_batch, sh
from agent.sim.agent import AgentProcess, private_paths
from bench.results import record
from chainer.testing import (Attachment, CniRuntime, PluginFailed, install_plugins, ptp_conflist,
                             terway_conflist)

COMMAND = "python -m bench.cni_bench"
REPO = Path(__file__).resolve().parent.parent


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def timing_lines(log_file: str) -> dict[str, dict]:
    """container id -> the plugin's ADD timing (debug log line)."""
    out = {}
    for line in Path(log_file).read_text().splitlines():
        if " ADD " in line and " timing " in line:
            cid = line.split(" ADD ", 1)[1].split("/", 1)[0]
            out[cid] = json.loads(line.split(" timing ", 1)[1])
    return out


NAMESPACE = "bench"


def policy_manifests(node: str, names: list[str]) -> str:
    """The enforcing node's cluster state: namespace `bench` with a
    default-deny policy, and a scheduled Pod (no address yet) per name."""
    from agent.sim import manifests as m
    objs = [m.namespace(NAMESPACE),
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"namespace": NAMESPACE, "name": "default-deny"},
             "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}]
    for n in names:
        doc = m.pod(NAMESPACE, n, "0.0.0.0", node, {"app": "bench", "pod": n})
        doc["status"] = {"phase": "Pending"}
        objs.append(doc)
    return m.dump(objs)


class Bench:
    def __init__(self, world, node, paths, bin_dir: str, first: str = "10.241.2.1",
                 last: str = "10.241.3.254"):
        self.world, self.node, self.paths = world, node, paths
        self.log_file = f"{paths.root}/cni.log"
        self.terway = CniRuntime(terway_conflist(
            agent_socket=paths.socket, state_dir=paths.state_dir, log_file=self.log_file,
            ipam_dir=f"{paths.root}/terway-ipam", first=first, last=last,
            log_level="debug"), bin_dir, node.netns)
        ptp = ptp_conflist(agent_socket=paths.socket, state_dir=paths.state_dir,
                           log_file=self.log_file, ipam_dir=f"{paths.root}/ptp-ipam",
                           subnet="10.250.0.0/16")
        ptp["plugins"] = ptp["plugins"][:1]          # the reference: ptp + host-local alone
        self.ptp = CniRuntime(ptp, bin_dir, node.netns)
        self.ours: dict[str, object] = {}      # container id -> fastpath-cni's ADD Invocation
        self.ref: dict[str, object] = {}       # container id -> ptp's ADD Invocation
        self.lock = threading.Lock()

    def netns(self, names: list[str]) -> dict[str, str]:
        ns = {n: plan.pod_ns(self.world.tag, n) for n in names}
        ip_batch(None, [f"netns add {v}" for v in ns.values()])
        return {n: f"/var/run/netns/{v}" for n, v in ns.items()}

    def add_ours(self, cid: str, netns: str) -> None:
        att = self.terway.add(cid, netns, args=self.args(cid))
        with self.lock:
            self.ours[cid] = att.invocations[1]

    @staticmethod
    def args(cid: str) -> str:
        return f"K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={cid}"

    def add_terway_only(self, cid: str, netns: str) -> None:
        inv = self.terway.exec_plugin("terway", "ADD", json.dumps(self.terway.plugin_conf(0)),
                                      cid, netns, "eth0", self.args(cid))
        if inv.rc != 0:
            raise PluginFailed(inv)
        with self.lock:
            self.terway.cache[(cid, "eth0")] = Attachment(cid, netns, "eth0", self.args(cid),
                                                          inv.output)

    def add_fastpath_only(self, cid: str) -> None:
        att = self.terway.cache[(cid, "eth0")]
        inv = self.terway.exec_plugin("fastpath-cni", "ADD",
                                      json.dumps(self.terway.plugin_conf(1, att.result)),
                                      cid, att.netns, "eth0", att.args)
        if inv.rc != 0:
            raise PluginFailed(inv)
        with self.lock:
            att.result = inv.output
            self.ours[cid] = inv

    def add_ref(self, cid: str, netns: str) -> None:
        att = self.ptp.add(cid, netns)
        with self.lock:
            self.ref[cid] = att.invocations[0]

    def concurrently(self, fn, items) -> None:
        errors: list[BaseException] = []

        def run(*args):
            try:
                fn(*args)
            except BaseException as exc:     # re-raised below, not lost in a thread
                errors.append(exc)
        threads = [threading.Thread(target=run, args=a) for a in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def startup_comparison(bin_dir: str, runs: int) -> dict[str, float]:
    """Medians (ms) of VERSION runs (start-up and exit, no agent) and of
    `import grpc`, alternating the arms."""
    venv_py = REPO / ".venv" / "bin" / "python"
    arms = {
        "installed": [f"{bin_dir}/fastpath-cni"],
        "launcher": [str(REPO / "chainer" / "fastpath-cni")],
        "console_script": [str(REPO / ".venv" / "bin" / "fastpath-cni")],
        "python_bare": ["/usr/bin/python3", "-sSE", "-c", "pass"],
        "grpc_import": [str(venv_py), "-c", "import grpc"],
    }
    samples: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(runs):
        for name, cmd in arms.items():
            t = time.perf_counter()
            subprocess.run(cmd, input=b'{"cniVersion": "1.0.0"}', capture_output=True,
                           env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, check=True)
            samples[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def split_of(b: Bench, cids: list[str], timing: dict, p: float = 50) -> dict[str, float]:
    """Split of ADDs (ms): each part's median, or its p-th percentile."""
    split = {"startup": [], "round_trip": [], "agent": [], "agent_discover": [],
             "agent_identity": [], "agent_policy": [], "agent_attach": [], "rest": []}
    for c in cids:
        inv, t = b.ours[c], timing[c]
        startup_ms = (t["t_main"] - inv.t_spawn) * 1e3
        split["startup"].append(startup_ms)
        split["agent"].append(t["agent_total_ms"])
        for k in ("discover", "identity", "policy", "attach"):
            split[f"agent_{k}"].append(t.get(f"agent_{k}_ms") or 0.0)
        split["round_trip"].append(t["rpc_ms"] - t["agent_total_ms"])
        split["rest"].append(inv.elapsed_ms - startup_ms - t["rpc_ms"])
    return {k: statistics.median(v) if p == 50 else pct(v, p) for k, v in split.items()}


def split_text(med: dict[str, float]) -> str:
    return (f"start-up {med['startup']:.1f} ms (fork to main(), interpreter + plugin code), "
            f"agent round trip {med['round_trip']:.1f} ms, agent discovery "
            f"{med['agent_discover']:.1f} ms, identity {med['agent_identity']:.2f} ms, policy "
            f"plan and writes {med['agent_policy']:.1f} ms, attach + map write "
            f"{med['agent_attach']:.1f} ms, rest {med['rest']:.1f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--startup-runs", type=int, default=25)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    seq = [f"s{i:04d}" for i in range(args.pods)]
    conc_names = [[f"c{r}x{i:02d}" for i in range(args.concurrency)] for r in range(args.rounds)]
    with World() as w, private_paths() as p_on, private_paths() as p_off:
        n_on, n_off = w.add_node("n1", enis=1), w.add_node("n2", enis=1)
        bin_dir = str(install_plugins(f"{p_on.root}/bin"))
        with open(f"{p_on.manifests}/bench.yaml", "w") as f:
            f.write(policy_manifests("n1", seq + [c for r in conc_names for c in r]))
        on = AgentProcess(n_on, p_on, ["--policy-enforcement", "default"]).start()
        off = AgentProcess(n_off, p_off).start()
        try:
            b_on = Bench(w, n_on, p_on, bin_dir)
            b_off = Bench(w, n_off, p_off, bin_dir, first="10.242.2.1", last="10.242.3.254")
            startup = startup_comparison(bin_dir, args.startup_runs)
            print("start-up medians (ms): " + ", ".join(f"{k} {v:.1f}"
                                                         for k, v in startup.items()))

            # sequential: both nodes fill up to --pods pods, the arms
            # alternating which goes first
            t0 = time.monotonic()
            ns_on = b_on.netns(seq + [f"r{c}" for c in seq])
            ns_off = b_off.netns([f"o{c}" for c in seq])
            for i, cid in enumerate(seq):
                arms = [(b_on.add_ours, cid, ns_on[cid]), (b_off.add_ours, cid, ns_off[f"o{cid}"]),
                        (b_on.add_ref, cid, ns_on[f"r{cid}"])]
                for fn, c, n in (arms if i % 2 == 0 else arms[::-1]):
                    fn(c, n)
            print(f"{args.pods} sequential pods per arm in {time.monotonic() - t0:.1f}s")
            on_status = wire.call(p_on.socket, "PolicyStatus")
            assert on_status["endpoints"] >= args.pods and not on_status["pending"], on_status
            dels = []
            for cid in seq:
                invs = b_on.terway.delete(cid)
                dels.append(invs[0].elapsed_ms)      # fastpath-cni runs first on DEL
                b_off.terway.delete(cid)
                b_on.ptp.delete(cid)

            # concurrent: rounds of --concurrency pods at once, per arm
            t0 = time.monotonic()
            conc = []
            for r, batch in enumerate(conc_names):
                for b, tag in ((b_on, ""), (b_off, "o")) if r % 2 == 0 else ((b_off, "o"), (b_on, "")):
                    bns = b.netns([f"{tag}{c}" for c in batch])
                    # Terway's part first, so that the fastpath-cni runs
                    # contend with each other (and the agent), not with it
                    b.concurrently(b.add_terway_only, [(c, bns[f"{tag}{c}"]) for c in batch])
                    b.concurrently(b.add_fastpath_only, [(c,) for c in batch])
                    b.concurrently(b.terway.delete, [(c,) for c in batch])
                    sh(["ip", "-force", "-batch", "-"], input="".join(
                        f"netns del {plan.pod_ns(w.tag, n)}\n" for n in bns))
                rbns = b_on.netns([f"r{c}" for c in batch])
                b_on.concurrently(b_on.add_ref, [(c, rbns[f"r{c}"]) for c in batch])
                b_on.concurrently(b_on.ptp.delete, [(c,) for c in batch])
                sh(["ip", "-force", "-batch", "-"], input="".join(
                    f"netns del {plan.pod_ns(w.tag, n)}\n" for n in rbns))
                conc += batch
            print(f"{args.rounds} rounds of {args.concurrency} concurrent pods per arm in "
                  f"{time.monotonic() - t0:.1f}s")
        finally:
            on.stop()
            off.stop()
        t_on, t_off = timing_lines(b_on.log_file), timing_lines(b_off.log_file)

    def fig(b: Bench, cids: list[str]) -> list[float]:
        return [b.ours[c].elapsed_ms for c in cids]
    on_seq, off_seq, ref_seq = fig(b_on, seq), fig(b_off, seq), [b_on.ref[c].elapsed_ms for c in seq]
    on_conc, off_conc = fig(b_on, conc), fig(b_off, conc)
    ref_conc = [b_on.ref[c].elapsed_ms for c in conc]
    figures = {
        "p50": statistics.median(on_seq), "p99": pct(on_seq, 99),
        "off_p50": statistics.median(off_seq), "off_p99": pct(off_seq, 99),
        "ref_p50": statistics.median(ref_seq), "ref_p99": pct(ref_seq, 99),
        "conc_p50": statistics.median(on_conc), "conc_p99": pct(on_conc, 99),
        "off_conc_p99": pct(off_conc, 99), "ref_conc_p99": pct(ref_conc, 99),
        "del_p50": statistics.median(dels), "del_p99": pct(dels, 99),
    }
    med_on, med_off = split_of(b_on, seq, t_on), split_of(b_off, seq, t_off)
    conc_startup = [(t_on[c]["t_main"] - b_on.ours[c].t_spawn) * 1e3 for c in conc]
    conc_agent = [t_on[c]["rpc_ms"] for c in conc]
    # where a concurrent ADD's time goes: each part's median and p99 over the rounds
    conc_med, conc_p99 = split_of(b_on, conc, t_on), split_of(b_on, conc, t_on, 99)
    print(json.dumps({k: round(v, 2) for k, v in figures.items()}))
    print("median split, enforcing node: " + split_text(med_on))
    print("median split, enforcement never: " + split_text(med_off))
    print(f"concurrent medians (enforcing): start-up {statistics.median(conc_startup):.1f} ms, "
          f"call to the agent {statistics.median(conc_agent):.1f} ms")
    print("concurrent split, medians: " + split_text(conc_med))
    print("concurrent split, p99s: " + split_text(conc_p99))
    load = os.getloadavg()[0]
    if args.no_record:
        return 0
    base = (f"{args.pods} sequential pods per node filling up, Terway stand-in chain, "
            f"NetworkPolicy enforced (default-deny namespace, Pod in the store without an "
            f"address: every ADD takes the identity step)")
    record("cni.add_p50_ms", figures["p50"], "ms", command=COMMAND,
           baseline=figures["ref_p50"], ratio=figures["p50"] / figures["ref_p50"],
           target="< 40 ms",
           notes=f"fastpath-cni ADD, fork to exit as the runtime sees it; {base}; baseline: "
                 f"Debian ptp + host-local ADD in the same loop; same loop without enforcement "
                 f"(no identity step, the ADD as before it): p50 {figures['off_p50']:.1f} ms; "
                 f"median split: {split_text(med_on)}")
    record("cni.add_p99_ms", figures["p99"], "ms", command=COMMAND,
           baseline=figures["ref_p99"], ratio=figures["p99"] / figures["ref_p99"],
           target="< 100 ms", notes=f"{base}; baseline: ptp + host-local p99; same loop "
                                    f"without enforcement: p99 {figures['off_p99']:.1f} ms")
    record("cni.add_identity_vs_off_p50", figures["p50"], "ms", command=COMMAND,
           baseline=figures["off_p50"], ratio=figures["p50"] / figures["off_p50"],
           notes=f"ADD p50 with the identity step (enforcing node) against the same ADD on a "
                 f"node with enforcement never, alternating pod by pod in one run; split without "
                 f"enforcement: {split_text(med_off)}")
    record("cni.add_identity_vs_off_p99", figures["p99"], "ms", command=COMMAND,
           baseline=figures["off_p99"], ratio=figures["p99"] / figures["off_p99"],
           notes="the same, p99")
    record("cni.add_concurrent_p99_ms", figures["conc_p99"], "ms", command=COMMAND,
           baseline=figures["ref_conc_p99"], ratio=figures["conc_p99"] / figures["ref_conc_p99"],
           target="<= baseline (ratio <= 1)",
           notes=f"{args.rounds} rounds of {args.concurrency} fastpath-cni ADDs at once "
                 f"against one enforcing agent (identity step), on 2 vCPUs (p50 "
                 f"{figures['conc_p50']:.1f} ms; medians: start-up "
                 f"{statistics.median(conc_startup):.1f} ms, call to the agent "
                 f"{statistics.median(conc_agent):.1f} ms; without enforcement, same rounds: p99 "
                 f"{figures['off_conc_p99']:.1f} ms); split, medians: {split_text(conc_med)}; "
                 f"p99s: {split_text(conc_p99)}; baseline: {args.concurrency} ptp + "
                 f"host-local ADDs at once, same rounds; 1-minute load average {load:.1f} on "
                 f"{os.cpu_count()} vCPUs at the end of the run")
    record("cni.del_p50_ms", figures["del_p50"], "ms", command=COMMAND,
           notes=f"fastpath-cni DEL of the {args.pods} pods of the enforcing node, one after "
                 f"another (p99 {figures['del_p99']:.1f} ms)")
    record("cni.plugin_startup_ms", startup["installed"], "ms", command=COMMAND,
           baseline=startup["grpc_import"], ratio=startup["installed"] / startup["grpc_import"],
           notes=f"VERSION run of the installed plugin (start-up + exit, no agent), median of "
                 f"{args.startup_runs}; baseline: `python -c 'import grpc'` in the venv; same "
                 f"loop: bare `python3 -sSE -c pass` {startup['python_bare']:.1f} ms, source-tree "
                 f"launcher {startup['launcher']:.1f} ms, venv console script "
                 f"{startup['console_script']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
