"""The reachability matrix: every (source, destination, protocol, port).

Namespaces x, y, z with pods a, b, c each serving 80 and 81 over TCP and UDP,
a DNS pod in kube-system, both nodes' addresses and two outside addresses.
For each policy set, the verdict of the compiled maps (evaluate, the
datapath's lookups, on every node holding one end of the flow) must equal
the test's reference reading of Kubernetes' rules, for the whole matrix.

    node n1: all pods (one-node layout), or a random half (two-node layout)
    node n2: the other half; a flow passes if both ends' nodes let it
"""
from __future__ import annotations

import random

import pytest

from agent.policy import compile_policy, evaluate
from agent.policy.lookup import REASON_ALLOWED, REASON_AUDIT_DENIED
from agent.policy.state import Direction
from tests.policy.gen import (
    EXTERNAL, NAMESPACES, NODES, PODS, PROBE_PORTS, World, base_world, pod_ip, probe_ips,
    random_policies,
)
from tests.policy.kube import namespace, netpol, pod, snapshot
from tests.policy.reference import reference_for

PORTS = [("serve-80-tcp", 80, "TCP"), ("serve-81-tcp", 81, "TCP"),
         ("serve-80-udp", 80, "UDP"), ("serve-81-udp", 81, "UDP")]


def classic_world(spread: bool) -> World:
    nss = {n: namespace(n, ns=n) for n in NAMESPACES}
    nss["kube-system"] = namespace("kube-system")
    pods = {}
    for i, ns in enumerate(NAMESPACES):
        for j, name in enumerate(PODS):
            node = ("n1", "n2")[(i + j) % 2] if spread else "n1"
            pods[(ns, name)] = pod(ns, name, pod_ip(ns, name), node=node,
                                   labels={"pod": name}, ports=PORTS)
    pods[("kube-system", "dns")] = pod("kube-system", "dns", "10.0.0.53", node="n2" if spread else "n1",
                                       labels={"k8s-app": "dns"},
                                       ports=[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")])
    return World(nss, pods)


SCENARIOS = {
    "deny all ingress in x": [
        ("x", "deny-all", {"policyTypes": ["Ingress"]})],
    "allow from the same namespace": [
        ("x", "same-ns", {"ingress": [{"from": [{"podSelector": {}}]}]})],
    "allow from y/b to x/a port 80": [
        ("x", "yb-to-xa", {"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                                  "podSelector": {"matchLabels": {"pod": "b"}}}],
                                        "ports": [{"port": 80}]}]})],
    "egress deny except DNS": [
        ("x", "dns-only", {"policyTypes": ["Egress"],
                           "egress": [{"to": [{"namespaceSelector": {"matchLabels": {
                               "kubernetes.io/metadata.name": "kube-system"}},
                                                "podSelector": {"matchLabels": {"k8s-app": "dns"}}}],
                                       "ports": [{"protocol": "UDP", "port": 53},
                                                 {"protocol": "TCP", "port": 53}]}]})],
    "ipBlock with except": [
        ("y", "block", {"podSelector": {"matchLabels": {"pod": "c"}},
                        "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                           "except": ["10.1.0.0/16", "10.3.0.11/32"]}}],
                                     "ports": [{"port": 80, "endPort": 81}]}]})],
    "named ports differing per pod": [
        ("x", "named", {"ingress": [{"ports": [{"protocol": "UDP", "port": "serve-81-udp"}]}]}),
        ("y", "out", {"policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})],
    "everything at once": None,   # the union of the sets above
}


def scenario(name: str) -> list:
    if SCENARIOS[name] is None:
        specs = [s for k, v in SCENARIOS.items() if v for s in v]
    else:
        specs = SCENARIOS[name]
    return [netpol(ns, n, spec) for ns, n, spec in specs]


def compare(world: World, mode: str = "default", audited=frozenset()) -> tuple[int, int]:
    """Assert the whole matrix; returns (probes, denied) so callers can check
    the matrix is not trivially all-allowed."""
    objs = world.objects()
    snap = snapshot(objs)
    nodes = sorted({p.node_name for p in world.pods.values()})
    states = [compile_policy(snap, n, NODES[n], mode, audited) for n in nodes]
    ref = reference_for(objs, NODES, mode=mode, audited=audited)
    would = reference_for(objs, NODES, mode=mode, audited=audited, include_audited=True)
    ips = probe_ips(world)
    probes = denied = 0
    for src in ips:
        for dst in ips:
            for proto, port in PROBE_PORTS:
                verdicts = [evaluate(s, src, dst, proto, port) for s in states]
                got = all(v.allowed for v in verdicts)
                want = ref.allows(src, dst, proto, port)
                assert got == want, (f"{src} -> {dst} {proto}/{port}: maps say "
                                     f"{'allow' if got else 'deny'}, Kubernetes says "
                                     f"{'allow' if want else 'deny'}; {verdicts}")
                for state, v in zip(states, verdicts):
                    for c in v.checks:
                        if c.reason == REASON_ALLOWED:
                            # The longest match names every admitting policy.
                            local, remote = (src, dst) if c.direction == Direction.EGRESS else (dst, src)
                            side = "Egress" if c.direction == Direction.EGRESS else "Ingress"
                            assert {state.policy_name(p) for p in c.policies} == ref.admitting(
                                ref.pod_at(local), side, remote, proto, port), (src, dst, proto, port)
                if got:
                    # A would-be drop is reported exactly when enforcing the
                    # audited policies too would drop the flow.
                    reported = any(v.reason == REASON_AUDIT_DENIED for v in verdicts)
                    assert reported == (not would.allows(src, dst, proto, port)), \
                        f"{src} -> {dst} {proto}/{port}: audit report {reported}"
                probes += 1
                denied += not want
    return probes, denied


@pytest.mark.parametrize("spread", [False, True], ids=["one-node", "two-nodes"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_classic_matrix_matches_kubernetes(name, spread):
    world = classic_world(spread)
    for p in scenario(name):
        world.policies[p.key] = p
    probes, denied = compare(world)
    assert probes == len(probe_ips(world)) ** 2 * len(PROBE_PORTS)
    assert 0 < denied < probes


@pytest.mark.parametrize("mode", ["never", "always"])
def test_classic_matrix_in_other_modes(mode):
    world = classic_world(spread=True)
    for p in scenario("everything at once"):
        world.policies[p.key] = p
    probes, denied = compare(world, mode=mode)
    if mode == "never":
        assert denied == 0
    else:
        assert denied > probes // 2


def test_classic_matrix_with_audited_policies():
    world = classic_world(spread=False)
    for p in scenario("everything at once"):
        world.policies[p.key] = p
    audited = frozenset({("x", "deny-all"), ("x", "dns-only"), ("y", "block")})
    compare(world, audited=audited)


@pytest.mark.parametrize("seed", range(40))
def test_random_policies_match_kubernetes(seed):
    rng = random.Random(seed)
    world = base_world(rng, spread=seed % 2 == 1)
    random_policies(rng, world, rng.randint(1, 6))
    audited = frozenset(k for k in world.policies if rng.random() < 0.25)
    mode = ("default", "default", "default", "always")[seed % 4]
    compare(world, mode=mode, audited=audited)


def test_random_policies_are_not_trivial():
    """The fuzz above is only worth something if its matrices hold both verdicts."""
    denied = total = 0
    for seed in range(40):
        rng = random.Random(seed)
        world = base_world(rng, spread=seed % 2 == 1)
        random_policies(rng, world, rng.randint(1, 6))
        ref = reference_for(world.objects(), NODES)
        for src in probe_ips(world):
            for dst in probe_ips(world):
                for proto, port in PROBE_PORTS:
                    total += 1
                    denied += not ref.allows(src, dst, proto, port)
    assert 0.1 < denied / total < 0.9
    assert EXTERNAL[0] in probe_ips(world)
