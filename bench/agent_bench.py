"""Agent start-to-ready time and resident memory with 1,000 endpoints.

On one simulated node with 1,000 pods: start `fastpath agent` cold (compile
included), register every pod through the API as the CNI plugin would, read
the agent's RSS; then kill -9 it and start it again, which restores all
1,000 endpoints from its state dir, and time that. Terway documents about
512 MB per node for its DataPath V2 agent; that is the baseline for RSS.

With the restarted agent running, time the CLI's everyday reads
(`fastpath endpoint list`, `service list`, `status`) as a user runs them on
the node: a new process each, bytecode compiled as in the image.

Then the agent's memory with a cluster behind it (`agent.rss_mb`): the
agent restarts on the same node with the Kubernetes API as its source (the
fake API server, agent/k8s/testing, listening on the node's loopback),
NetworkPolicy enforced, and the cluster holding 10,000 Services x 10
endpoints (bench/lb_cluster.py, the Services of `lb.program_10k_seconds`),
the node's pods as Pods, and NetworkPolicies of 10,000 ingress and 10,000
egress rules (bench/policy_bench.py's, those of `policy.vs_off.10000`). Its
RSS is read once the Services and the policies are in the maps, and again
after every pod was deleted and added again through the API (the identity
step with the cluster in the store); VmHWM is the peak over all of it.

Run: python -m bench.agent_bench [--pods N] [--services N]
"""
from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agent.api import wire
from agent.sim import World
from agent.sim.agent import AgentProcess, private_paths
from bench.results import record

COMMAND = "python -m bench.agent_bench"
REPO = Path(__file__).resolve().parents[1]
CLI_READS = (("endpoint", "list"), ("service", "list"), ("status",))


def cli_read_ms(node, paths, args: tuple[str, ...], rounds: int = 5) -> float:
    """Median wall time of one CLI command, a fresh process each round."""
    cmd = ["ip", "netns", "exec", node.netns, sys.executable, "-m", "agent.cli.main", *args,
           "--bpffs-root", f"{paths.bpffs}/fastpath", "--socket", paths.socket]
    times = []
    for _ in range(rounds):
        t = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
        times.append(time.monotonic() - t)
        if r.returncode != 0:
            raise RuntimeError(f"fastpath {' '.join(args)} failed: {r.stderr[-500:]}")
    return statistics.median(times) * 1000


def python_floor_ms(node, rounds: int = 5) -> float:
    """The same process start with nothing to do: the floor under every command."""
    cmd = ["ip", "netns", "exec", node.netns, sys.executable, "-c", "pass"]
    times = []
    for _ in range(rounds):
        t = time.monotonic()
        subprocess.run(cmd, check=True, timeout=60)
        times.append(time.monotonic() - t)
    return statistics.median(times) * 1000


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


NAMESPACE = "bench"
RULES = 10_000          # NetworkPolicy rules per direction (bench/policy_bench.py's N)


def cluster_objects(node, pods, services: int, per_service: int, rules: int) -> list[dict]:
    """The cluster of the RSS phase as API objects: the Services and their
    slices, the node's pods (one the policies' server, one their client),
    and the NetworkPolicies."""
    from bench import harness, lb_cluster
    from bench.policy_bench import datapath_policies
    objs: list[dict] = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}}]
    for ns in [NAMESPACE] + sorted({lb_cluster.namespace_of(i) for i in range(services)}):
        objs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}})
    for i, p in enumerate(pods):
        app = {0: "server", 1: "client"}.get(i, f"app-{i % 50}")
        objs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"namespace": NAMESPACE, "name": p.name,
                                  "labels": {"app": app, "pod-template-hash": "7d9f8c6b5"}},
                     "spec": {"nodeName": node.name, "containers": [{"name": "c"}]},
                     "status": {"phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}]}})
    objs += lb_cluster.cluster(services, per_service)
    objs += datapath_policies(rules, harness.FPRR_PORT, harness.IPERF_PORT)
    return objs


def metric_value(node, name: str) -> float | None:
    """One unlabelled sample of the agent's /metrics (inside the node's netns)."""
    r = node.run(["curl", "-s", "-m", "5", f"http://{node.ip}:9962/metrics"], check=False)
    for line in r.stdout.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def wait_cluster_applied(node, paths, services: int, policies: int, timeout: float = 300) -> dict:
    """Until the Services are in the service maps and the policy maps
    reflect the synced store (every policy planned, nothing refused)."""
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        st = wire.call(paths.socket, "Status", timeout=10)
        pol = st["policy"]
        if (st["source"].get("synced") and metric_value(node, "fastpath_services") == services
                and pol.get("policies") == policies and not pol.get("pending")
                and pol.get("applied_version", 0) >= st["source"]["status"].get("store_version", 1)):
            if pol.get("error") or pol.get("refused"):
                raise RuntimeError(f"policy reconciler: {pol.get('error') or pol.get('refused')}")
            return st
        time.sleep(0.5)
    raise RuntimeError(f"cluster not applied in {timeout}s: {st.get('source')}, {st.get('policy')}")


def rss_with_cluster(node, paths, pods, services: int, per_service: int, rules: int) -> dict:
    """The agent restarted on `node` (its state dir restores `pods`) with
    the Kubernetes API as its source and the cluster loaded; RSS once all
    of it is in the maps, and after every pod was deleted and added again."""
    from agent.datapath.nsenter import in_netns
    from agent.k8s.testing.fakeapi import FakeAPIServer
    from bench.policy_bench import policy_count
    fake = FakeAPIServer()
    t = time.monotonic()
    fake.apply_many(cluster_objects(node, pods, services, per_service, rules))
    fake.compact()
    build_s = time.monotonic() - t
    with in_netns(node.netns):          # where the agent's process looks for it
        fake.start()
    kubeconfig = Path(paths.root, "kubeconfig")
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{fake.port}\"}}}}]\n"
        "users: [{name: agent, user: {token: unused}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: agent}}]\n"
        "current-context: fake\n")
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    agent = AgentProcess(node, paths, ["--source", "kubernetes", "--policy-enforcement", "default"])
    out: dict = {"api_build_s": build_s}
    try:
        t = time.monotonic()
        agent.start(timeout=300)
        st = wait_cluster_applied(node, paths, services, 2 * policy_count(rules))
        out["applied_s"] = time.monotonic() - t
        pid = agent.proc.pid
        out["objects"] = st["source"]["objects"]
        out["policy"] = {k: st["policy"].get(k) for k in ("policies", "endpoints", "rules",
                                                          "ipcache")}
        out["endpoints"] = st["endpoints"]
        out["rss_applied"] = rss_mb(pid)
        # every pod deleted and added again, as CNI DEL and ADD do: the
        # identity step finds each Pod in the store and plans its policy
        t = time.monotonic()
        for p in pods:
            wire.call(paths.socket, "EndpointDel", {"container_id": p.name})
            r = wire.call(paths.socket, "EndpointAdd", {
                "netns": p.netns_path, "container_id": p.name, "pod_namespace": NAMESPACE,
                "pod_name": p.name})
            if r["policy"] in ("not-enforced",) or r["policy"].startswith("unknown"):
                raise RuntimeError(f"{p.name}: ADD without its policy: {r['policy']}")
        out["churn_s"] = time.monotonic() - t
        st = wait_cluster_applied(node, paths, services, 2 * policy_count(rules))
        out["endpoints_after"] = st["endpoints"]
        out["rss_churned"] = rss_mb(pid)
        out["hwm"] = rss_mb(pid, "VmHWM")
    finally:
        agent.stop()
        fake.stop()
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--services", type=int, default=10_000,
                    help="Services (10 endpoints each) of the RSS phase")
    ap.add_argument("--rules", type=int, default=RULES,
                    help="NetworkPolicy rules per direction of the RSS phase")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    with World() as w, private_paths() as paths:
        enis = max(1, -(-args.pods // 200))     # Terway-like density: up to 200 pods per ENI
        node = w.add_node("n1", enis=enis)
        t = time.monotonic()
        pods = [node.add_pod(f"p{i}", eni=1 + i % enis) for i in range(args.pods)]
        print(f"built {len(pods)} pods in {time.monotonic() - t:.1f}s")

        t = time.monotonic()
        # a shared machine's load can stretch the compile past the default wait
        agent = AgentProcess(node, paths).start(timeout=600)
        cold = time.monotonic() - t
        cold_programs = wire.call(paths.socket, "Status")["programs"]
        t = time.monotonic()
        for p in pods:
            wire.call(paths.socket, "EndpointAdd", {"netns": p.netns_path, "container_id": p.name,
                                                    "pod_namespace": "bench", "pod_name": p.name})
        per_add_ms = (time.monotonic() - t) / len(pods) * 1000
        rss = rss_mb(agent.proc.pid)
        agent.kill(9)

        t = time.monotonic()
        agent = AgentProcess(node, paths).start()
        warm = time.monotonic() - t
        n = len(wire.call(paths.socket, "EndpointList"))
        warm_programs = wire.call(paths.socket, "Status")["programs"]
        rss_restart = rss_mb(agent.proc.pid)
        # an installed image carries compiled bytecode (deploy/Containerfile)
        compileall.compile_dir(str(REPO / "agent"), quiet=1)
        floor = python_floor_ms(node)
        reads = {" ".join(a): cli_read_ms(node, paths, a) for a in CLI_READS}
        agent.stop()
        assert n == len(pods), f"restored {n} of {len(pods)} endpoints"
        big = rss_with_cluster(node, paths, pods, args.services, 10, args.rules)
        assert big["endpoints"] == big["endpoints_after"] == len(pods), big

    assert cold_programs["built"], "a first start on empty pins must build the programs"
    # absolute seconds depend on what else the machine runs: say how busy it was
    busy = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end of the run"
    compiles = int(warm_programs["built"])
    big_rss = max(big["rss_applied"], big["rss_churned"])
    print(f"with the cluster ({args.services} Services x 10, {big['policy']}): RSS "
          f"{big['rss_applied']:.0f} MB once applied ({big['applied_s']:.1f}s after start), "
          f"{big['rss_churned']:.0f} MB after deleting and adding {len(pods)} pods "
          f"({big['churn_s']:.1f}s); peak (VmHWM) {big['hwm']:.0f} MB")
    print(f"cold start to ready: {cold:.2f}s (of which the program build, in a child process "
          f"overlapping the rest: {cold_programs['build_seconds']:.2f}s); {per_add_ms:.1f} ms "
          f"per endpoint add; RSS {rss:.0f} MB with {len(pods)} endpoints; restart with {n} "
          f"endpoints restored: {warm:.2f}s, {compiles} compiles, RSS {rss_restart:.0f} MB")
    for what, ms in reads.items():
        print(f"fastpath {what}: {ms:.0f} ms (python start floor {floor:.0f} ms)")
    if args.no_record:
        return 0
    record("agent.start_to_ready_seconds", cold, "s", command=COMMAND, target="<= 8 s",
           notes=f"cold start on empty pins: bcc compile in a child process "
                 f"({cold_programs['build_seconds']:.2f}s) while the agent reads its state, "
                 f"then pin, open through libbpf, ENI attach; no endpoints yet; {busy}")
    record("agent.restart_ready_seconds_1000_endpoints", warm, "s", command=COMMAND,
           target="<= 2 s",
           notes=f"restart after kill -9, restoring {n} endpoints from the state dir; "
                 f"{compiles} compiles (the pinned programs of the same build key reused); {busy}")
    record("agent.restart_compiles", compiles, "", command=COMMAND, target="0",
           notes="program builds on a restart whose sources and options are unchanged")
    pol = big["policy"]
    record("agent.rss_mb", big_rss, "MB", command=COMMAND, baseline=512, ratio=big_rss / 512,
           target="<= 128 MB",
           notes=f"the agent's VmRSS with {len(pods):,} endpoints, {args.services:,} Services x 10 "
                 f"endpoints and NetworkPolicies of {args.rules:,} ingress + {args.rules:,} "
                 f"egress rules ({pol['policies']} policies; in the maps: {pol['rules']:,} rule "
                 f"entries, {pol['ipcache']:,} ipcache entries, {pol['endpoints']} policy "
                 f"endpoints), the Kubernetes API (fake server on the node's loopback) as its "
                 f"source, enforcement default: max of {big['rss_applied']:.1f} MB once all is in "
                 f"the maps and {big['rss_churned']:.1f} MB after every pod was deleted and added "
                 f"again; peak (VmHWM) {big['hwm']:.1f} MB; store: {big['objects']}; baseline: "
                 f"Terway's documented ~512 MB per node for its DataPath V2 agent; {busy}")
    record("agent.rss_mb_1000_endpoints", max(rss, rss_restart), "MB", command=COMMAND,
           baseline=512, ratio=max(rss, rss_restart) / 512, target="<= 128 MB",
           notes="max of the agent's VmRSS after 1,000 endpoint adds and after the restart; "
                 "the compiler lives only in the build child; baseline: Terway's documented "
                 "~512 MB per node for its DataPath V2 agent")
    for what, ms in reads.items():
        record(f"cli.read_ms.{what.replace(' ', '_')}", ms, "ms", command=COMMAND, target="<= 150 ms",
               notes=f"agent running with {n} endpoints; a new process per call; "
                     f"python start alone {floor:.0f} ms in the same run; {busy}")
    record("agent.endpoint_add_ms", per_add_ms, "ms", command=COMMAND,
           notes="agent side of a CNI ADD (discovery + attach + map write), sequential")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
