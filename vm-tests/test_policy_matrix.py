"""NetworkPolicy with real traffic: the whole reachability matrix, case by case.

    n1: x/a x/c y/b z/a z/c        n2: x/b y/a y/c z/b
        (cali veths, eth1) ═══ vpc ═══ (eth1, cali veths)

Namespaces x, y, z (labelled ns=<name>), pods a, b, c in each (pod=<name>),
every pod serving TCP and UDP on 80 and 81. Two `fastpath agent` processes
(one per node, policy_enforcement default, then always) read the same
manifests from their own directories. Each case rewrites the
NetworkPolicies (and pod labels), waits until both agents report the new
policy in their maps, then probes every (source, destination pod, protocol,
port) with real connections from every pod and from both nodes' own
namespaces (kubelet-style), and compares with tests/policy/reference.py.
A pod's traffic to a pod on the other node is judged at egress on its node
and at ingress from the ENI on the other; same-node traffic at both ends
before delivery.

One world and both agents serve the whole module; the always-mode cases
restart the agents, so they come last.
"""
from __future__ import annotations

import concurrent.futures
import contextlib

import pytest

from agent.api import wire
from agent.sim import World
from agent.sim.agent import AgentProcess, private_paths
from policy_helpers import (
    NAMESPACES, PODS, Cluster, PodInfo, Prober, assert_matrix, deciding_policies,
    drops_by_reason, expected_matrix, netpol, policy_verdicts, probe_matrix, summary,
    verdict_delta, wait_until,
)

DENIED = "dropped-policy-denied"
WOULD_DENY = "policy-audit-would-deny"
CONVERGE_TIMEOUT = 30


class Env:
    def __init__(self, world: World, stack: contextlib.ExitStack):
        self.world = world
        self.nodes = [world.add_node("n1", enis=1), world.add_node("n2", enis=1)]
        self.pods: dict[str, PodInfo] = {}
        i = 0
        for ns in NAMESPACES:
            for name in PODS:
                node = self.nodes[i % 2]
                i += 1
                sim = node.add_pod(f"{ns}-{name}")
                self.pods[f"{ns}/{name}"] = PodInfo(ns, name, {"pod": name}, sim, node.name)
        self.paths = [stack.enter_context(private_paths()) for _ in self.nodes]
        self.cluster = Cluster(self.nodes, self.pods, [p.manifests for p in self.paths])
        self.cluster.write()
        self.probers = {k: Prober(p.sim, k, p.ip) for k, p in self.pods.items()}
        self.probers.update({f"node:{n.name}": Prober(n, f"node:{n.name}") for n in self.nodes})
        self.sources = {k: p.ip for k, p in self.pods.items()}
        self.sources.update({f"node:{n.name}": n.ip for n in self.nodes})
        self.agents: list[AgentProcess] = []
        self.mode = ""
        for pr in self.probers.values():
            pr.wait_ready()

    @property
    def sockets(self) -> list[str]:
        return [p.socket for p in self.paths]

    # -- agents ---------------------------------------------------------------
    def start_agents(self, mode: str) -> None:
        self.stop_agents()
        procs = [AgentProcess(n, p, ["--policy-enforcement", mode])
                 for n, p in zip(self.nodes, self.paths)]
        with concurrent.futures.ThreadPoolExecutor(len(procs)) as ex:
            self.agents = list(ex.map(lambda a: a.start(timeout=120), procs))
        self.mode = mode
        self.wait_converged()
        for node, paths in zip(self.nodes, self.paths):
            have = {e.get("ip") for e in wire.call(paths.socket, "EndpointList")}
            for p in self.pods.values():
                if p.sim.node is node and p.ip not in have:
                    wire.call(paths.socket, "EndpointAdd", {
                        "netns": p.sim.netns_path, "ifname": "eth0",
                        "container_id": f"sim-{p.ns}-{p.name}",
                        "pod_namespace": p.ns, "pod_name": p.name})

    def stop_agents(self) -> None:
        for a in self.agents:
            a.stop()
        self.agents = []

    def agent_logs(self) -> str:
        return "\n".join(f"--- agent on {a.node.name}:\n" + a.log.read_text()[-3000:]
                         for a in self.agents)

    # -- cases -----------------------------------------------------------------
    def apply(self, policies: list[dict], labels: dict[str, dict] | None = None) -> None:
        """Write the case's manifests and wait until both agents enforce them."""
        for k, p in self.pods.items():
            p.labels = (labels or {}).get(k, {"pod": p.name})
        self.cluster.policies = policies
        before = [store_version(wire.call(s, "Status")) for s in self.sockets]
        changed = self.cluster.write()
        self.wait_converged(before if changed else None)

    def wait_converged(self, before: list[int] | None = None) -> None:
        """Wait until each agent's store has taken the last write (its
        version moved past `before`) and its policy maps reflect that
        store version."""
        for i, s in enumerate(self.sockets):
            def done():
                st = wire.call(s, "Status")
                pol = st.get("policy") or {}
                assert pol.get("mode") == self.mode, pol
                assert not pol.get("error") and not pol.get("refused"), pol
                v = store_version(st)
                if not st["source"].get("synced") or (before is not None and v <= before[i]):
                    return False
                return pol.get("applied_version", -1) >= v
            wait_until(done, f"the agent on {self.nodes[i].name} to enforce the manifests",
                       CONVERGE_TIMEOUT)

    def verdicts(self) -> dict:
        """Per-policy verdict counters of both agents, by policy name."""
        out: dict = {}
        for p in self.paths:
            for k, v in policy_verdicts(f"{p.bpffs}/fastpath", f"{p.root}/grpc.sock").items():
                out[k] = out.get(k, 0) + v
        return out

    def check(self, case: str, mode: str = "default") -> tuple:
        """Probe everything; compare with the reference; check that every
        denied probe was counted against a policy that decides it. Returns
        (expected, observed, verdict counter deltas)."""
        exp = expected_matrix(self.cluster, self.sources, mode)
        before = self.verdicts()
        obs = probe_matrix(self.probers, self.cluster)
        delta = verdict_delta(self.verdicts(), before)
        print(f"{case}: expected {summary(exp)}; observed {summary(obs)}; verdicts {delta}")
        try:
            assert_matrix(exp, obs, case)
        except AssertionError as e:
            raise AssertionError(f"{e}\n\n{self.agent_logs()}") from None
        denied = deciding_policies(self.cluster, self.sources, exp, mode)
        counted = sum(v for (_, _, verdict), v in delta.items() if verdict == "deny")
        assert counted >= len(denied), (
            f"{case}: {len(denied)} probes were denied, {counted} denials counted per policy: {delta}")
        named = {(name, side) for (name, side, verdict) in delta if verdict == "deny"}
        allowed_names = {(n, side) for _, side, names in denied for n in names}
        assert named <= allowed_names, (
            f"{case}: denials attributed to policies that decide none of the denied probes: "
            f"{named - allowed_names}")
        for c, side, names in denied:
            assert {(n, side) for n in names} & named, (
                f"{case}: {c} denied at {side}, but no deny was counted against any of {names}: "
                f"{delta}")
        return exp, obs, delta


def store_version(status: dict) -> int:
    return status["source"]["status"]["store_version"]


@pytest.fixture(scope="module")
def env():
    with World() as w, contextlib.ExitStack() as stack:
        e = Env(w, stack)
        try:
            e.start_agents("default")
            yield e
        finally:
            e.stop_agents()
            for pr in e.probers.values():
                pr.stop()


def denied_count(env, reason: str = DENIED) -> int:
    return drops_by_reason(env.sockets).get(reason, 0)


def check_drops_explained(env, before: int, exp) -> None:
    """Every denied probe dropped at least one packet under the policy reason."""
    denied = sum(1 for v in exp.allowed.values() if not v)
    got = denied_count(env) - before
    assert got >= denied, (f"{denied} probes were denied but only {got} packets were counted "
                           f"as {DENIED}")


# -- default mode -------------------------------------------------------------------

def test_no_policy_everything_is_reachable(env):
    env.apply([])
    exp, _, _ = env.check("no policy")
    assert all(exp.allowed.values())


def test_default_deny_ingress_in_x(env):
    before = denied_count(env)
    env.apply([netpol("x", "deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    exp, _, _ = env.check("default-deny ingress in x")
    check_drops_explained(env, before, exp)


def test_allow_from_the_same_namespace(env):
    env.apply([netpol("x", "deny-ingress", {"policyTypes": ["Ingress"]}),
               netpol("x", "allow-same-ns", {"ingress": [{"from": [{"podSelector": {}}]}]})])
    env.check("x: ingress from x only")


def test_namespace_and_pod_selector_in_one_peer_is_and(env):
    env.apply([netpol("x", "and", {"ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}},
         "podSelector": {"matchLabels": {"pod": "b"}}}]}]})])
    env.check("x: from y/b only (AND)")


def test_namespace_and_pod_selector_in_two_peers_is_or(env):
    env.apply([netpol("x", "or", {"ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
        {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In",
                                               "values": ["b", "c"]}]}}]}]})])
    env.check("x: from all of y, or x/b and x/c (OR)")


def test_ipblock_with_except(env):
    xa, yb = env.pods["x/a"].ip, env.pods["y/b"].ip
    cidr = "10.240.0.0/12"          # every pod and node of the world
    env.apply([netpol("z", "from-block", {"ingress": [{"from": [
        {"ipBlock": {"cidr": cidr, "except": [f"{xa}/32", f"{yb}/32"]}}]}]})])
    exp, _, _ = env.check(f"z: from {cidr} except x/a, y/b")
    assert not exp.allowed[("x/a", "z/a", "TCP", 80)] and exp.allowed[("x/b", "z/a", "TCP", 80)]


def test_port_80_only(env):
    env.apply([netpol("x", "tcp-80", {"ingress": [{"ports": [{"port": 80}]}]})])
    env.check("x: TCP 80 only")


def test_named_ports_resolve_on_each_destination(env):
    # "web" is 80 on a and c, 81 on b; serve-81-udp is UDP 81 everywhere
    env.apply([netpol("x", "named", {"ingress": [{"ports": [
        {"port": "web"}, {"port": "serve-81-udp", "protocol": "UDP"}]}]})])
    exp, _, _ = env.check("x: named ports web (TCP 80/81 per pod), serve-81-udp")
    assert exp.allowed[("y/a", "x/b", "TCP", 81)] and not exp.allowed[("y/a", "x/b", "TCP", 80)]


def test_endport_range(env):
    env.apply([netpol("y", "range", {"ingress": [{"from": [{"namespaceSelector": {}}],
                                                  "ports": [{"port": 80, "endPort": 81}]}]})])
    env.check("y: TCP 80-81 from every namespace, no UDP")


def test_egress_deny_to_y(env):
    env.apply([netpol("x", "not-to-y", {"policyTypes": ["Egress"], "egress": [{"to": [
        {"namespaceSelector": {"matchExpressions": [
            {"key": "ns", "operator": "NotIn", "values": ["y"]}]}}]}]})])
    exp, _, _ = env.check("x: egress anywhere but y")
    assert not exp.allowed[("x/a", "y/a", "TCP", 80)] and exp.allowed[("y/a", "x/a", "TCP", 80)]


def test_udp_and_tcp_are_told_apart(env):
    env.apply([netpol("y", "udp-only", {"ingress": [{"ports": [{"protocol": "UDP"}]}]}),
               netpol("z", "tcp-81", {"ingress": [{"ports": [{"protocol": "TCP", "port": 81}]}]})])
    env.check("y: UDP only; z: TCP 81 only")


def test_audited_policy_allows_and_counts_would_be_drops(env):
    before_denied, before_audit = denied_count(env), denied_count(env, WOULD_DENY)
    env.apply([netpol("x", "deny-ingress-audit", {"policyTypes": ["Ingress"]}, audit=True)])
    exp, _, delta = env.check("x: deny ingress, audited")
    assert all(exp.allowed.values())
    would = expected_matrix(env.cluster, env.sources, "default", include_audited=True)
    n_would = sum(1 for v in would.allowed.values() if not v)
    assert n_would > 0
    got = denied_count(env, WOULD_DENY) - before_audit
    assert got >= n_would, f"{n_would} flows would have been denied, {got} counted as {WOULD_DENY}"
    assert delta.get(("x/deny-ingress-audit", "Ingress", "audit-would-deny"), 0) >= n_would, delta
    assert denied_count(env) == before_denied, "an audited policy dropped packets"


def test_a_pod_whose_labels_change(env):
    pol = [netpol("x", "from-clients", {"ingress": [{"from": [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}]}]})]
    env.apply(pol)
    exp1, _, _ = env.check("x: from role=client pods (none yet)")
    env.apply(pol, labels={"y/a": {"pod": "a", "role": "client"}})
    exp2, _, _ = env.check("x: from role=client pods (y/a labelled)")
    assert not exp1.allowed[("y/a", "x/b", "TCP", 80)] and exp2.allowed[("y/a", "x/b", "TCP", 80)]
    env.apply(pol, labels={"y/a": {"pod": "a"}, "z/c": {"pod": "c", "role": "client"}})
    exp3, _, _ = env.check("x: from role=client pods (label moved from y/a to z/c)")
    assert not exp3.allowed[("y/a", "x/b", "TCP", 80)] and exp3.allowed[("z/c", "x/b", "TCP", 80)]


def test_policy_change_with_open_connections(env):
    """Connections open before a policy denies them: new ones are refused at
    once; established ones keep flowing (conntrack: the policy decides when a
    flow starts, as iptables-based implementations do; Kubernetes leaves it
    open)."""
    env.apply([])
    flows = [("x/a", "y/a"), ("x/c", "y/b"), ("z/a", "y/c")]   # cross-node, same node, cross-node
    for i, (s, d) in enumerate(flows):
        pr = env.probers[s]
        got = pr.call({"op": "open", "name": f"c{i}", "ip": env.pods[d].ip, "port": 80,
                       "sport": pr.next_sport(), "timeout": 3})
        assert got.get("ok"), (s, d, got)
        got = pr.call({"op": "ask", "name": f"c{i}", "token": "before", "timeout": 3})
        assert got.get("reply", "").startswith(f"{d} ") and got["reply"].endswith("before"), got
    try:
        env.apply([netpol("y", "deny-ingress", {"policyTypes": ["Ingress"]})])
        exp, _, _ = env.check("y: deny ingress, with connections into y open")
        for s, d in flows:
            assert not exp.allowed[(s, d, "TCP", 80)]
        for i, (s, d) in enumerate(flows):
            got = env.probers[s].call({"op": "ask", "name": f"c{i}", "token": "after",
                                       "timeout": 3})
            assert got.get("reply", "").endswith("after"), (
                f"established {s} -> {d} TCP/80 stopped after the policy change: {got}")
    finally:
        for i, (s, _) in enumerate(flows):
            env.probers[s].call({"op": "close", "name": f"c{i}"})


# -- always mode (agents restarted) -----------------------------------------------------

def test_always_mode_without_policies_only_the_node_reaches_its_pods(env):
    env.cluster.policies = []
    env.cluster.write()
    env.start_agents("always")
    exp, _, _ = env.check("always, no policies", mode="always")
    assert exp.allowed[("node:n1", "x/a", "TCP", 80)]
    assert not exp.allowed[("node:n2", "x/a", "TCP", 80)]
    assert not exp.allowed[("y/a", "x/a", "TCP", 80)]


def test_always_mode_allows_only_what_rules_allow(env):
    if env.mode != "always":
        env.start_agents("always")
    egress_all = [netpol(ns, "egress-all", {"policyTypes": ["Egress"], "egress": [{}]})
                  for ns in NAMESPACES]
    env.apply(egress_all + [netpol("x", "from-y", {"ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})])
    exp, _, _ = env.check("always: egress open everywhere, x from y", mode="always")
    assert exp.allowed[("y/a", "x/b", "UDP", 81)] and not exp.allowed[("z/a", "x/b", "UDP", 81)]
