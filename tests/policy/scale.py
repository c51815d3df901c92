"""A cluster of realistic size for the compiler's cost figures, and the
changes it sees day to day (seeded, reproducible).

    python -m tests.policy.scale [--pods 1000] [--local 100] [--policies 1000] [--changes 1000]

prints the cost of a full compile and, per kind of change, p50/p99 of what
the reconciler does for one change: compile with `previous=`, check the
capacity, diff. Not a test (no timing is asserted anywhere); the
correctness of these incremental compiles is what tests/policy/test_incremental.py
checks, on this workload too at a smaller size.

The cluster: namespaces with team/env labels; pods with app/tier/version
labels and named container ports, a tenth of them on this node; policies of
the kinds real clusters write: default deny, allow from an app in the same
namespace, from other teams' namespaces, to DNS, to CIDRs with excepts, on
named ports, port ranges.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from dataclasses import replace

from agent.k8s.model import FrozenMap, Namespace, NetworkPolicy, Pod
from agent.k8s.store import Store
from tests.policy.kube import namespace, netpol, pod

NODE = "n1"
NODE_IPS = ["192.168.0.1"]
TEAMS = ("red", "blue", "green", "gold", "gray")
APPS = tuple(f"app{i}" for i in range(8))
TIERS = ("web", "api", "db", "cache")
CIDRS = [("10.0.0.0/8", ["10.0.0.0/16"]), ("172.16.0.0/12", []), ("0.0.0.0/0", ["10.0.0.0/8"]),
         ("100.64.0.0/10", ["100.64.1.0/24"]), ("8.8.8.0/24", []), ("52.0.0.0/8", []),
         ("10.1.0.0/16", ["10.1.7.0/24"]), ("192.168.100.0/24", [])]


class Scale:
    """The cluster, kept in a Store so every change is a real ChangeSet."""

    def __init__(self, seed: int, pods: int, local: int, policies: int, namespaces: int = 50):
        self.rng = rng = random.Random(seed)
        self.store = Store()
        self.nss = [f"ns{i:02d}" for i in range(namespaces)]
        self.serial = 0
        objs: list = [namespace("kube-system")]
        for n in self.nss:
            objs.append(namespace(n, team=rng.choice(TEAMS), env=rng.choice(["prod", "dev"])))
        # Pods come as replicas of deployments (same labels and ports), four
        # per deployment, so identities are about a quarter of the pods.
        self.deployments: list[tuple[str, dict, list]] = []
        local_set = set(rng.sample(range(pods), local))
        for i in range(pods):
            if i % 4 == 0:
                self.deployments.append(self._deployment(self.nss[(i // 4) % namespaces]))
            ns, labels, ports = self.deployments[-1]
            objs.append(pod(ns, f"p{i}", self._ip(i), labels=labels, ports=ports,
                            node=NODE if i in local_set else f"n{2 + i % 9}"))
        objs.append(pod("kube-system", "dns", "10.96.0.10", node="n2", labels={"k8s-app": "dns"},
                        ports=[("dns", 53, "UDP")]))
        for i in range(policies):
            objs.append(self.policy(rng.choice(self.nss), f"np{i}"))
        self.store.apply(upserts=objs)

    @staticmethod
    def _ip(i: int) -> str:
        return f"10.{20 + i // 250}.{(i // 250) % 4}.{i % 250 + 2}"

    def _deployment(self, ns: str) -> tuple[str, dict, list]:
        rng = self.rng
        labels = {"app": rng.choice(APPS), "tier": rng.choice(TIERS)}
        if rng.random() < 0.5:
            labels["version"] = rng.choice(["v1", "v2"])
        http = rng.choice([8080, 8081, 9000])
        return ns, labels, [("http", http, "TCP"), ("metrics", 9090, "TCP"), ("grpc", 50051, "TCP")]

    # ------------------------------------------------------------ policies

    def _sel(self) -> dict:
        rng = self.rng
        r = rng.random()
        if r < 0.1:
            return {}
        if r < 0.7:
            return {"matchLabels": {"app": rng.choice(APPS)}}
        if r < 0.9:
            return {"matchLabels": {"app": rng.choice(APPS), "tier": rng.choice(TIERS)}}
        return {"matchExpressions": [{"key": "tier", "operator": "In",
                                      "values": rng.sample(TIERS, 2)}]}

    def _ports(self) -> list[dict]:
        rng = self.rng
        r = rng.random()
        if r < 0.15:
            return []
        if r < 0.55:
            return [{"port": rng.choice([80, 443, 8080, 5432, 6379])}]
        if r < 0.75:
            return [{"port": "http"}]
        if r < 0.9:
            return [{"port": 8000, "endPort": rng.choice([8100, 9000])}]
        return [{"port": 53, "protocol": "UDP"}, {"port": 53}]

    def _peer(self) -> dict:
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            return {"podSelector": self._sel()}
        if r < 0.65:
            return {"namespaceSelector": {"matchLabels": {"team": rng.choice(TEAMS)}},
                    "podSelector": self._sel()}
        if r < 0.8:
            return {"namespaceSelector": {"matchLabels": {"env": rng.choice(["prod", "dev"])}}}
        cidr, excepts = rng.choice(CIDRS)
        return {"ipBlock": {"cidr": cidr, **({"except": excepts} if excepts else {})}}

    def policy(self, ns: str, name: str) -> NetworkPolicy:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            return netpol(ns, name, {"podSelector": {}, "policyTypes": ["Ingress"]})
        spec: dict = {"podSelector": self._sel()}
        if r < 0.7:
            spec["ingress"] = [{"from": [self._peer() for _ in range(rng.randint(1, 2))],
                                "ports": self._ports()} for _ in range(rng.randint(1, 2))]
        elif r < 0.85:
            spec["policyTypes"] = ["Egress"]
            spec["egress"] = [{"to": [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "kube-system"}}, "podSelector": {
                "matchLabels": {"k8s-app": "dns"}}}], "ports": [{"port": 53, "protocol": "UDP"}]},
                              {"to": [self._peer()], "ports": self._ports()}]
        else:
            spec["policyTypes"] = ["Ingress", "Egress"]
            spec["ingress"] = [{"from": [self._peer()], "ports": self._ports()}]
            spec["egress"] = [{"to": [self._peer()], "ports": self._ports()}]
        return netpol(ns, name, spec)

    # ------------------------------------------------------------- changes

    CHANGES = ("policy add", "policy remove", "policy modify", "pod relabel", "pod add",
               "pod delete", "namespace relabel")

    def change(self, kind: str) -> None:
        """Apply one change of `kind` to the store."""
        rng, st = self.rng, self.store
        snap = st.snapshot()
        self.serial += 1
        if kind == "policy add":
            st.upsert(self.policy(rng.choice(self.nss), f"new{self.serial}"))
        elif kind == "policy remove":
            st.delete("NetworkPolicy", rng.choice(sorted(snap.network_policies)))
        elif kind == "policy modify":
            k = rng.choice(sorted(snap.network_policies))
            st.upsert(self.policy(k[0], k[1]))
        elif kind == "pod relabel":
            p = snap.pods[rng.choice(sorted(snap.pods))]
            labels = dict(p.labels)
            labels["app" if rng.random() < 0.5 else "tier"] = rng.choice(APPS + TIERS)
            st.upsert(replace(p, labels=FrozenMap(labels)))
        elif kind == "pod add":
            node = NODE if rng.random() < 0.1 else "n3"
            ip = f"10.40.{self.serial // 250 % 250}.{self.serial % 250 + 2}"
            dns, labels, ports = rng.choice(self.deployments)
            st.upsert(pod(dns, f"added{self.serial}", ip, node=node, labels=labels, ports=ports))
        elif kind == "pod delete":
            st.delete("Pod", rng.choice(sorted(k for k in snap.pods if k[0] != "kube-system")))
        elif kind == "namespace relabel":
            n: Namespace = snap.namespaces[("", rng.choice(self.nss))]
            labels = dict(n.labels)
            labels["team"] = rng.choice(TEAMS)
            st.upsert(replace(n, labels=FrozenMap(labels)))
        else:
            raise ValueError(kind)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    from agent.policy import Capacities, check_capacity, compile_policy, diff

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--local", type=int, default=100)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="also time each change as a full compile")
    ap.add_argument("--freeze", action="store_true",
                    help="gc.freeze() after adopting each state (long-lived tables out of "
                         "the cyclic collector's full passes)")
    a = ap.parse_args()
    caps = Capacities(ipcache=1 << 20, endpoints=1 << 16, rules=1 << 22)

    sc = Scale(a.seed, a.pods, a.local, a.policies)
    snap = sc.store.snapshot()
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        state = compile_policy(snap, NODE, NODE_IPS, "default")
        t.append(time.perf_counter() - t0)
    print(f"full compile: {a.policies} policies x {len(snap.pods)} pods ({len(state.endpoints)} on "
          f"the node, {state.rule_count()} rules, {len(state.ipcache)} ipcache entries, "
          f"{len(state.identity_info)} identities): best {min(t):.3f} s, "
          f"median {statistics.median(t):.3f} s")

    per_kind: dict[str, list[float]] = {k: [] for k in Scale.CHANGES}
    full_kind: dict[str, list[float]] = {k: [] for k in Scale.CHANGES}
    cpu_kind: dict[str, list[float]] = {k: [] for k in Scale.CHANGES}
    ops_kind: dict[str, list[int]] = {k: [] for k in Scale.CHANGES}
    nops: list[int] = []
    for i in range(a.changes):
        kind = Scale.CHANGES[i % len(Scale.CHANGES)]
        sc.change(kind)
        snap = sc.store.snapshot()
        t0, c0 = time.perf_counter(), time.process_time()
        new = compile_policy(snap, NODE, NODE_IPS, "default", previous=state)
        problems = check_capacity(new, caps, state, ops := diff(state, new))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        assert not problems
        per_kind[kind].append(dt)
        cpu_kind[kind].append(dc)
        ops_kind[kind].append(len(ops))
        nops.append(len(ops))
        if a.full:
            t0 = time.perf_counter()
            full = compile_policy(snap, NODE, NODE_IPS, "default", previous=state, incremental=False)
            check_capacity(full, caps, state, diff(state, full))
            full_kind[kind].append(time.perf_counter() - t0)
        state = new
        if a.freeze:
            gc.freeze()
    every = [x for v in per_kind.values() for x in v]
    cpu = [x for v in cpu_kind.values() for x in v]
    print(f"one change (compile previous= + check_capacity + diff), {a.changes} changes: "
          f"p50 {_pct(every, .5) * 1e3:.1f} ms, p99 {_pct(every, .99) * 1e3:.1f} ms, "
          f"max {max(every) * 1e3:.1f} ms (CPU time p50 {_pct(cpu, .5) * 1e3:.1f} ms, "
          f"p99 {_pct(cpu, .99) * 1e3:.1f} ms); ops per change p50 {_pct(nops, .5)}, "
          f"max {max(nops)}; load average {os.getloadavg()[0]:.1f}")
    for k, v in per_kind.items():
        c = cpu_kind[k]
        line = (f"  {k:18s} n={len(v):4d} p50 {_pct(v, .5) * 1e3:6.1f} ms  "
                f"p99 {_pct(v, .99) * 1e3:6.1f} ms  max {max(v) * 1e3:6.1f} ms  "
                f"(CPU p50 {_pct(c, .5) * 1e3:6.1f} p99 {_pct(c, .99) * 1e3:6.1f})  "
                f"writes p50 {_pct(ops_kind[k], .5)} max {max(ops_kind[k])}")
        if a.full:
            f = full_kind[k]
            line += f"   full compile instead: p50 {_pct(f, .5) * 1e3:6.1f} ms"
        print(line)


if __name__ == "__main__":
    main()
