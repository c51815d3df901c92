"""Random clusters and policy sets (seeded) for the fuzz and diff-ordering tests.

The world is the classic one: namespaces x, y, z, pods a, b, c in each,
serving 80 and 81 over TCP and UDP, plus a DNS pod. Policies are drawn from
every construct the semantics cover (selectors with each operator, empty vs
absent, AND/OR peers, ipBlocks with except, named ports that differ per pod,
endPort, protocols, policyTypes present or defaulted), written as manifests.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from agent.k8s.model import FrozenMap, Namespace, NetworkPolicy, Pod
from tests.policy.kube import namespace, netpol, pod

NODES = {"n1": ["192.168.0.1"], "n2": ["192.168.0.2"]}
EXTERNAL = ["8.8.8.8", "10.9.1.7"]
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PROBE_PORTS = (("TCP", 80), ("TCP", 81), ("UDP", 80), ("UDP", 53))


def pod_ip(ns: str, name: str) -> str:
    return f"10.{NAMESPACES.index(ns) + 1}.0.{PODS.index(name) + 10}"


@dataclass
class World:
    namespaces: dict[str, Namespace]
    pods: dict[tuple[str, str], Pod]
    policies: dict[tuple[str, str], NetworkPolicy] = field(default_factory=dict)
    audited: set = field(default_factory=set)

    def objects(self) -> list:
        return [*self.namespaces.values(), *self.pods.values(), *self.policies.values()]

    def copy(self) -> "World":
        return World(dict(self.namespaces), dict(self.pods), dict(self.policies), set(self.audited))


def base_world(rng: random.Random, spread: bool) -> World:
    nss = {n: namespace(n, ns=n, **({"team": rng.choice(["red", "blue"])} if rng.random() < 0.7 else {}))
           for n in NAMESPACES}
    pods = {}
    for ns in NAMESPACES:
        for name in PODS:
            # "serve" is 80 on some pods and 81 on others: named ports must
            # resolve per destination pod.
            serve = rng.choice([80, 81])
            ports = [("serve", serve, "TCP"), ("serve-udp", rng.choice([80, 81]), "UDP")]
            labels = {"pod": name}
            if rng.random() < 0.5:
                labels["tier"] = rng.choice(["web", "db"])
            pods[(ns, name)] = pod(ns, name, pod_ip(ns, name),
                                   node=rng.choice(["n1", "n2"]) if spread else "n1",
                                   labels=labels, ports=ports)
    pods[("kube-system", "dns")] = pod("kube-system", "dns", "10.0.0.53",
                                       node="n2" if spread else "n1",
                                       labels={"k8s-app": "dns"}, ports=[("dns", 53, "UDP")])
    nss["kube-system"] = namespace("kube-system")
    return World(nss, pods)


def probe_ips(world: World) -> list[str]:
    ips = [p.ips[0] for p in world.pods.values() if p.ips and not p.host_network]
    return sorted(set(ips) | {a for v in NODES.values() for a in v} | set(EXTERNAL))


# ------------------------------------------------------------------ policies

def _selector(rng: random.Random, keys: list[tuple[str, list[str]]]) -> dict:
    r = rng.random()
    if r < 0.25:
        return {}
    k, values = rng.choice(keys)
    if r < 0.55:
        return {"matchLabels": {k: rng.choice(values)}}
    op = rng.choice(["In", "NotIn", "Exists", "DoesNotExist"])
    e = {"key": k, "operator": op}
    if op in ("In", "NotIn"):
        e["values"] = rng.sample(values, rng.randint(1, len(values)))
    return {"matchExpressions": [e]}


POD_KEYS = [("pod", list(PODS)), ("tier", ["web", "db"])]
NS_KEYS = [("ns", list(NAMESPACES)), ("team", ["red", "blue"]),
           ("kubernetes.io/metadata.name", ["x", "y", "kube-system"])]
BLOCKS = [("10.0.0.0/8", ["10.2.0.0/16"]), ("10.1.0.0/16", []), ("10.2.0.0/16", ["10.2.0.11/32"]),
          ("10.3.0.10/31", []), ("0.0.0.0/0", ["10.0.0.0/8"]), ("8.8.8.0/24", []),
          ("192.168.0.0/24", ["192.168.0.2/32"])]


def _peer(rng: random.Random) -> dict:
    r = rng.random()
    if r < 0.3:
        return {"podSelector": _selector(rng, POD_KEYS)}
    if r < 0.5:
        return {"namespaceSelector": _selector(rng, NS_KEYS)}
    if r < 0.75:
        return {"podSelector": _selector(rng, POD_KEYS), "namespaceSelector": _selector(rng, NS_KEYS)}
    cidr, excepts = rng.choice(BLOCKS)
    b = {"cidr": cidr}
    if excepts and rng.random() < 0.7:
        b["except"] = excepts
    return {"ipBlock": b}


def _port(rng: random.Random) -> dict:
    r = rng.random()
    proto = rng.choice(["TCP", "TCP", "UDP", "SCTP"]) if r < 0.9 else None
    p: dict = {} if proto is None else {"protocol": proto}
    r = rng.random()
    if r < 0.35:
        p["port"] = rng.choice([80, 81, 53])
    elif r < 0.55:
        p["port"] = rng.choice(["serve", "serve-udp", "dns"])
    elif r < 0.75:
        p["port"] = 80
        p["endPort"] = rng.choice([81, 1024])
    return p


def _rules(rng: random.Random, peers_key: str) -> list[dict]:
    out = []
    for _ in range(rng.choice([0, 1, 1, 2])):
        r: dict = {}
        if rng.random() < 0.75:
            r[peers_key] = [_peer(rng) for _ in range(rng.randint(1, 2))]
        if rng.random() < 0.7:
            r["ports"] = [_port(rng) for _ in range(rng.randint(1, 2))]
        out.append(r)
    return out


def random_policy(rng: random.Random, name: str) -> NetworkPolicy:
    ns = rng.choice(NAMESPACES)
    spec: dict = {"podSelector": _selector(rng, POD_KEYS)}
    types = rng.choice([None, None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]])
    if types is not None:
        spec["policyTypes"] = types
    if types is None or "Ingress" in types:
        spec["ingress"] = _rules(rng, "from")
    if types is None or "Egress" in types or rng.random() < 0.2:
        spec["egress"] = _rules(rng, "to")
    if not spec.get("ingress"):
        spec.pop("ingress", None)
    if not spec.get("egress"):
        spec.pop("egress", None)
    return netpol(ns, name, spec)


def random_policies(rng: random.Random, world: World, n: int) -> None:
    for i in range(n):
        p = random_policy(rng, f"p{i}")
        world.policies[p.key] = p


def mutate(rng: random.Random, world: World, serial: list[int]) -> str:
    """One change a cluster can see; returns what it was."""
    r = rng.random()
    if r < 0.3 or not world.policies:
        serial[0] += 1
        p = random_policy(rng, f"q{serial[0]}")
        world.policies[p.key] = p
        return f"add policy {p.key}"
    if r < 0.45:
        k = rng.choice(sorted(world.policies))
        del world.policies[k]
        world.audited.discard(k)
        return f"delete policy {k}"
    if r < 0.55:
        k = rng.choice(sorted(world.policies))
        p = random_policy(rng, k[1])
        world.policies[k] = replace(p, namespace=k[0])
        return f"replace policy {k}"
    if r < 0.7:
        k = rng.choice(sorted(world.pods))
        p = world.pods[k]
        labels = dict(p.labels)
        if "tier" in labels and rng.random() < 0.5:
            del labels["tier"]
        else:
            labels["tier"] = rng.choice(["web", "db"])
        world.pods[k] = replace(p, labels=FrozenMap(labels))
        return f"relabel pod {k}"
    if r < 0.78:
        k = rng.choice(sorted(world.namespaces))
        n = world.namespaces[k]
        labels = dict(n.labels)
        labels["team"] = rng.choice(["red", "blue"])
        world.namespaces[k] = replace(n, labels=FrozenMap(labels))
        return f"relabel namespace {k}"
    if r < 0.86:
        k = rng.choice(sorted(world.pods))
        if k[1] in PODS and rng.random() < 0.5:
            del world.pods[k]
            return f"delete pod {k}"
        serial[0] += 1
        ns = rng.choice(NAMESPACES)
        name = f"new{serial[0]}"
        world.pods[(ns, name)] = pod(ns, name, f"10.{NAMESPACES.index(ns) + 1}.7.{serial[0] % 250}",
                                     node=rng.choice(["n1", "n2"]),
                                     labels={"pod": rng.choice(PODS)},
                                     ports=[("serve", rng.choice([80, 81]), "TCP")])
        return f"add pod {(ns, name)}"
    if r < 0.94:
        k = rng.choice(sorted(world.policies))
        if k in world.audited:
            world.audited.discard(k)
            return f"enforce {k}"
        world.audited.add(k)
        return f"audit {k}"
    for i in range(rng.randint(1, 3)):
        serial[0] += 1
        p = random_policy(rng, f"q{serial[0]}")
        world.policies[p.key] = p
    return "add several policies"
