"""networking.k8s.io/v1 semantics, one construct per case.

Each case is a few policies (as manifests) over the same small cluster and
the probes whose outcome the construct decides, with the verdict the
Kubernetes documentation gives. Every probe is checked twice: against the
compiled maps (evaluate, which does the datapath's lookups) and against the
test's own reference reading of the rules, so a case can neither pass by a
compiler bug nor by a mistaken expectation of the reference.

    node n1 (192.168.0.10): x/a x/b y/a y/b (+ extras per case)
    node n2 (192.168.0.11): z/c
    outside: 8.8.8.8
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from agent.policy import POLICY_ALWAYS, POLICY_HOST, compile_policy, evaluate
from agent.policy.lookup import (
    REASON_ALLOWED, REASON_AUDIT_ALLOWED, REASON_AUDIT_DENIED, REASON_DENIED, REASON_NOT_ISOLATED,
)
from tests.policy.kube import namespace, netpol, pod, snapshot
from tests.policy.reference import reference_for

XA, XB, YA, YB, ZC = "10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.2.2", "10.0.3.3"
YA2 = "10.0.2.3"
HOST1, HOST2, EXT = "192.168.0.10", "192.168.0.11", "8.8.8.8"
NODE_IPS = {"n1": [HOST1], "n2": [HOST2]}


def cluster() -> list:
    return [
        namespace("x", team="blue"), namespace("y", team="red"), namespace("z"),
        pod("x", "a", XA, labels={"app": "a", "tier": "web"},
            ports=[("http", 8080, "TCP"), ("dns", 53, "UDP")]),
        pod("x", "b", XB, labels={"app": "b"}, ports=[("http", 9090, "TCP")]),
        pod("y", "a", YA, labels={"app": "a"}, ports=[("http", 8080, "TCP")]),
        pod("y", "b", YB, labels={"app": "b", "tier": "db"}, ports=[("http", 7070, "TCP")]),
        pod("z", "c", ZC, node="n2", labels={"app": "c"}, ports=[("http", 8080, "TCP")]),
    ]


@dataclass
class Case:
    description: str
    policies: list[tuple[str, str, dict]]
    probes: list[tuple[str, str, str, int, bool]]   # src, dst, protocol, port, allowed
    mode: str = "default"
    extra: list = field(default_factory=list)

    def __str__(self) -> str:
        return self.description


def P(ns: str, name: str, **spec) -> tuple[str, str, dict]:
    return (ns, name, spec)


ANY_NS = {}  # an empty namespaceSelector: every namespace


CASES = [
    Case("with no policy every pod is reachable and reaches anything", [],
         [(YA, XA, "TCP", 8080, True), (XA, EXT, "UDP", 53, True), (ZC, YB, "TCP", 1, True)]),

    Case("a policy without rules or policyTypes isolates ingress only",
         [P("x", "deny", podSelector={"matchLabels": {"app": "a"}})],
         [(YA, XA, "TCP", 8080, False), (XB, XA, "TCP", 8080, False),
          (XA, EXT, "TCP", 443, True), (XA, YA, "TCP", 8080, True), (YA, XB, "TCP", 9090, True)]),

    Case("egress rules without policyTypes isolate both directions (API defaulting)",
         [P("x", "eg", podSelector={"matchLabels": {"app": "a"}},
            egress=[{"to": [{"podSelector": {}}]}])],
         [(XA, XB, "TCP", 9090, True), (XA, YA, "TCP", 8080, False), (XA, EXT, "UDP", 53, False),
          (YA, XA, "TCP", 8080, False), (XB, XA, "TCP", 8080, False)]),

    Case("policyTypes [Egress] alone leaves ingress open",
         [P("x", "eg", podSelector={"matchLabels": {"app": "a"}}, policyTypes=["Egress"])],
         [(XA, XB, "TCP", 9090, False), (XA, EXT, "TCP", 80, False), (YA, XA, "TCP", 8080, True)]),

    Case("policyTypes [Ingress] ignores egress rules written next to it",
         [P("x", "ing", podSelector={"matchLabels": {"app": "a"}}, policyTypes=["Ingress"],
            egress=[{"to": [{"ipBlock": {"cidr": "1.1.1.1/32"}}]}])],
         [(XA, EXT, "TCP", 80, True), (YA, XA, "TCP", 8080, False)]),

    Case("an empty podSelector peer is every pod of the policy's namespace",
         [P("x", "same-ns", ingress=[{"from": [{"podSelector": {}}]}])],
         [(XB, XA, "TCP", 8080, True), (XA, XB, "UDP", 5, True), (YA, XA, "TCP", 8080, False),
          (EXT, XA, "TCP", 8080, False)]),

    Case("an empty namespaceSelector peer is every pod everywhere, and only pods",
         [P("x", "all-pods", ingress=[{"from": [{"namespaceSelector": ANY_NS}]}])],
         [(YA, XA, "TCP", 8080, True), (ZC, XA, "TCP", 8080, True), (EXT, XA, "TCP", 8080, False),
          (HOST2, XA, "TCP", 8080, False)]),

    Case("namespaceSelector and podSelector in one peer must both match (AND)",
         [P("x", "and", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}},
                                "podSelector": {"matchLabels": {"app": "b"}}}]}])],
         [(YB, XA, "TCP", 8080, True), (YA, XA, "TCP", 8080, False), (XB, XA, "TCP", 8080, False)]),

    Case("two peers of one rule are alternatives (OR)",
         [P("x", "or", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}},
                               {"podSelector": {"matchLabels": {"app": "b"}}}]}])],
         [(YA, XA, "TCP", 8080, True), (XB, XA, "TCP", 8080, True), (ZC, XA, "TCP", 8080, False)]),

    Case("matchExpressions In matches listed values only",
         [P("x", "in", podSelector={"matchLabels": {"app": "b"}},
            ingress=[{"from": [{"namespaceSelector": ANY_NS, "podSelector": {"matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["web", "db"]}]}}]}])],
         [(XA, XB, "TCP", 9090, True), (YB, XB, "TCP", 9090, True), (YA, XB, "TCP", 9090, False)]),

    Case("matchExpressions NotIn also matches pods without the key",
         [P("x", "notin", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": ANY_NS, "podSelector": {"matchExpressions": [
                {"key": "tier", "operator": "NotIn", "values": ["db"]}]}}]}])],
         [(YA, XA, "TCP", 8080, True), (XB, XA, "TCP", 8080, True), (YB, XA, "TCP", 8080, False)]),

    Case("matchExpressions Exists needs the key, whatever its value",
         [P("x", "exists", podSelector={"matchLabels": {"app": "b"}},
            ingress=[{"from": [{"namespaceSelector": ANY_NS, "podSelector": {"matchExpressions": [
                {"key": "tier", "operator": "Exists"}]}}]}])],
         [(XA, XB, "TCP", 9090, True), (YB, XB, "TCP", 9090, True), (YA, XB, "TCP", 9090, False)]),

    Case("matchExpressions DoesNotExist needs the key absent",
         [P("x", "dne", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": ANY_NS, "podSelector": {"matchExpressions": [
                {"key": "tier", "operator": "DoesNotExist"}]}}]}])],
         [(YA, XA, "TCP", 8080, True), (ZC, XA, "TCP", 8080, True), (YB, XA, "TCP", 8080, False)]),

    Case("namespaces carry their name label even when the object lacks it",
         [P("x", "by-name", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": "z"}}}]}])],
         [(ZC, XA, "TCP", 8080, True), (YA, XA, "TCP", 8080, False)]),

    Case("ipBlock with except matches addresses in the block, pod addresses included",
         [P("x", "block", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}},
                               {"ipBlock": {"cidr": "8.8.8.0/24"}}]}])],
         [(XB, XA, "TCP", 8080, True), (ZC, XA, "TCP", 1, True), (YA, XA, "TCP", 8080, False),
          (YB, XA, "TCP", 8080, False), (EXT, XA, "UDP", 53, True), ("9.9.9.9", XA, "TCP", 1, False)]),

    Case("ipBlock never matches by what the address belongs to",
         [P("x", "one-ip", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"ipBlock": {"cidr": f"{YA}/32"}}]}])],
         [(YA, XA, "TCP", 8080, True), (YA2, XA, "TCP", 8080, False)],
         extra=[pod("y", "a2", YA2, labels={"app": "a"}, ports=[("http", 8080, "TCP")])]),

    Case("a named port resolves on the selected pod for ingress",
         [P("x", "named-in", ingress=[{"ports": [{"port": "http"}]}])],
         [(YA, XA, "TCP", 8080, True), (YA, XA, "TCP", 9090, False), (YA, XB, "TCP", 9090, True),
          (YA, XB, "TCP", 8080, False), (YA, XA, "UDP", 8080, False), (YA, XA, "UDP", 53, False)]),

    Case("a named port resolves on the destination pod for egress",
         [P("x", "named-out", podSelector={"matchLabels": {"app": "a"}}, policyTypes=["Egress"],
            egress=[{"to": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}],
                     "ports": [{"port": "http"}]}])],
         [(XA, YA, "TCP", 8080, True), (XA, YA, "TCP", 7070, False), (XA, YB, "TCP", 7070, True),
          (XA, YB, "TCP", 8080, False)]),

    Case("a named egress port towards an ipBlock matches nothing; numbers still do",
         [P("x", "named-block", podSelector={"matchLabels": {"app": "a"}}, policyTypes=["Egress"],
            egress=[{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                     "ports": [{"port": "http"}, {"port": 7070}]}])],
         [(XA, YA, "TCP", 8080, False), (XA, YB, "TCP", 7070, True), (XA, YA, "TCP", 7070, True)]),

    Case("a named egress port without peers resolves per destination pod, never off-cluster",
         [P("x", "named-any", podSelector={"matchLabels": {"app": "a"}}, policyTypes=["Egress"],
            egress=[{"ports": [{"port": "http"}]}])],
         [(XA, YB, "TCP", 7070, True), (XA, YB, "TCP", 8080, False), (XA, ZC, "TCP", 8080, True),
          (XA, EXT, "TCP", 8080, False)]),

    Case("endPort admits the whole range and nothing past either end",
         [P("x", "range", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"ports": [{"port": 8000, "endPort": 8100}]}])],
         [(YA, XA, "TCP", 8000, True), (YA, XA, "TCP", 8080, True), (YA, XA, "TCP", 8100, True),
          (YA, XA, "TCP", 8101, False), (YA, XA, "TCP", 7999, False), (YA, XA, "UDP", 8050, False)]),

    Case("protocols match exactly, SCTP included",
         [P("x", "protos", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "SCTP", "port": 9000}]}])],
         [(YA, XA, "UDP", 53, True), (YA, XA, "TCP", 53, False), (YA, XA, "SCTP", 9000, True),
          (YA, XA, "UDP", 9000, False)]),

    Case("a port entry without a number admits every port of its protocol",
         [P("x", "all-udp", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"ports": [{"protocol": "UDP"}]}])],
         [(YA, XA, "UDP", 12345, True), (YA, XA, "UDP", 1, True), (YA, XA, "TCP", 12345, False)]),

    Case("a rule without ports admits every protocol, ICMP included",
         [P("x", "any-proto", ingress=[{"from": [{"podSelector": {}}]}])],
         [(XB, XA, 1, 0, True), (XB, XA, "SCTP", 7, True), (YA, XA, 1, 0, False)]),

    Case("rules of several policies add up",
         [P("x", "from-y", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}],
                      "ports": [{"port": 8080}]}]),
          P("x", "from-z", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}],
                      "ports": [{"protocol": "UDP"}]}])],
         [(YA, XA, "TCP", 8080, True), (ZC, XA, "UDP", 53, True), (YA, XA, "UDP", 53, False),
          (ZC, XA, "TCP", 8080, False)]),

    Case("the node reaches its pods whatever the policies say; other nodes do not",
         [P("x", "deny-all", policyTypes=["Ingress", "Egress"])],
         [(HOST1, XA, "TCP", 10250, True), (HOST1, XB, "UDP", 1, True), (HOST2, XA, "TCP", 10250, False),
          (XA, HOST1, "TCP", 10250, False)]),

    Case("an ipBlock covering node addresses admits them like any address",
         [P("x", "nodes", ingress=[{"from": [{"ipBlock": {"cidr": "192.168.0.0/24"}}]}])],
         [(HOST2, XA, "TCP", 22, True), (HOST1, XA, "TCP", 22, True), (YA, XA, "TCP", 22, False)]),

    Case("host-network pods are neither selected nor pods as peers",
         [P("x", "to-a", podSelector={"matchLabels": {"app": "b"}}, policyTypes=["Egress"],
            egress=[{"to": [{"podSelector": {"matchLabels": {"app": "a"}}}]}])],
         [(XB, XA, "TCP", 8080, True), (XB, HOST1, "TCP", 8080, False)],
         extra=[pod("x", "hostnet", HOST1, labels={"app": "a"}, host_network=True)]),

    Case("finished pods and pods without an address are skipped",
         [P("x", "from-b", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}])],
         [(XB, XA, "TCP", 8080, True), ("10.0.1.9", XA, "TCP", 8080, False)],
         extra=[pod("x", "done", "10.0.1.9", labels={"app": "b"}, phase="Succeeded"),
                pod("x", "pending", None, labels={"app": "b"}, phase="Pending")]),

    Case("a pod being deleted keeps its identity and its policy until it is gone",
         [P("x", "from-b", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}])],
         [("10.0.1.8", XA, "TCP", 8080, True), (YA, "10.0.1.7", "TCP", 8080, False)],
         extra=[pod("x", "leaving", "10.0.1.8", labels={"app": "b"}, deleting=True),
                pod("x", "leaving-a", "10.0.1.7", labels={"app": "a"}, deleting=True)]),

    Case("mode never enforces nothing",
         [P("x", "deny-all", policyTypes=["Ingress", "Egress"])],
         [(YA, XA, "TCP", 8080, True), (XA, EXT, "TCP", 443, True)], mode="never"),

    Case("mode always isolates every pod; only rules and the node get through",
         [P("x", "from-y", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}])],
         [(YA, XA, "TCP", 8080, False), (XA, YB, "TCP", 7070, False), (HOST1, YB, "TCP", 7070, True),
          (XB, XA, "TCP", 8080, False), (XA, EXT, "TCP", 443, False), (ZC, XB, "TCP", 9090, False)],
         mode="always"),

    Case("mode always with allows on both sides",
         [P("x", "from-y", podSelector={"matchLabels": {"app": "a"}},
            ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]),
          P("y", "to-x", egress=[{"to": [{"namespaceSelector": {}}]}], policyTypes=["Egress"])],
         [(YA, XA, "TCP", 8080, True), (YB, XA, "UDP", 5, True), (YA, XB, "TCP", 9090, False)],
         mode="always"),
]


def compiled(case: Case):
    objs = cluster() + case.extra + [netpol(ns, name, spec) for ns, name, spec in case.policies]
    snap = snapshot(objs)
    states = [compile_policy(snap, n, ips, case.mode) for n, ips in NODE_IPS.items()]
    return objs, states


def verdict(states, src, dst, proto, port) -> bool:
    # Each node checks its own pods: the flow passes if every node lets it.
    return all(evaluate(s, src, dst, proto, port).allowed for s in states)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_semantics(case: Case):
    objs, states = compiled(case)
    ref = reference_for(objs, NODE_IPS, mode=case.mode)
    for src, dst, proto, port, expected in case.probes:
        proto_name = proto if isinstance(proto, str) else "ICMP"
        assert ref.allows(src, dst, proto_name, port) == expected, \
            f"reference disagrees with the case: {src} -> {dst} {proto}/{port}"
        assert verdict(states, src, dst, proto, port) == expected, \
            f"{case.description}: {src} -> {dst} {proto}/{port} should be " \
            f"{'allowed' if expected else 'denied'}"


def test_policy_types_defaulting_comes_from_the_api_server_rules():
    only_egress = netpol("x", "e", {"egress": [{"to": [{"podSelector": {}}]}]})
    no_rules = netpol("x", "n", {})
    explicit = netpol("x", "i", {"policyTypes": ["Egress"]})
    assert only_egress.policy_types == ("Ingress", "Egress")
    assert no_rules.policy_types == ("Ingress",)
    assert explicit.policy_types == ("Egress",)
    snap = snapshot(cluster() + [only_egress])
    ep = compile_policy(snap, "n1", [HOST1], "default").endpoints[XA]
    assert ep.ingress.enforced and ep.egress.enforced


def test_pods_without_address_host_network_or_finished_are_not_endpoints():
    objs = cluster() + [pod("x", "done", "10.0.1.9", phase="Failed"),
                        pod("x", "pending", None, phase="Pending"),
                        pod("x", "hostnet", HOST1, host_network=True)]
    state = compile_policy(snapshot(objs), "n1", [HOST1], "default")
    assert sorted(state.endpoints) == sorted([XA, XB, YA, YB])
    assert "10.0.1.9/32" not in state.ipcache


# ----------------------------------------------------------- attribution

def state_of(policies, mode="default", audited=(), extra=()):
    objs = cluster() + list(extra) + [netpol(ns, name, spec) for ns, name, spec in policies]
    return compile_policy(snapshot(objs), "n1", [HOST1], mode, audited)


def names(state, pids):
    return sorted(state.policy_name(p) for p in pids)


def test_a_drop_names_every_policy_whose_default_deny_applies():
    s = state_of([P("x", "deny-1", podSelector={"matchLabels": {"app": "a"}}),
                  P("x", "deny-2", podSelector={"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
                  P("x", "other", podSelector={"matchLabels": {"app": "b"}})])
    v = evaluate(s, YA, XA, "TCP", 8080)
    assert not v.allowed and v.reason == REASON_DENIED
    assert names(s, v.policies) == ["x/deny-1", "x/deny-2"]
    assert names(s, s.endpoints[XA].deciding_policies(0)) == ["x/deny-1", "x/deny-2"]


def test_an_allow_names_every_policy_that_admits_the_packet():
    s = state_of([P("x", "wide", podSelector={"matchLabels": {"app": "a"}},
                    ingress=[{"ports": [{"port": 8000, "endPort": 8100}]}]),
                  P("x", "narrow", podSelector={"matchLabels": {"app": "a"}},
                    ingress=[{"from": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}])])
    both = evaluate(s, YA, XA, "TCP", 8080)
    one = evaluate(s, YA, XA, "TCP", 8081)
    outside = evaluate(s, EXT, XA, "TCP", 8080)
    assert both.reason == REASON_ALLOWED and names(s, both.policies) == ["x/narrow", "x/wide"]
    assert names(s, one.policies) == ["x/wide"]
    assert names(s, outside.policies) == ["x/wide"]


def test_mode_always_drops_are_named_after_the_mode_and_node_allows_after_the_node():
    s = state_of([], mode="always")
    drop = evaluate(s, YA, XA, "TCP", 8080)
    probe = evaluate(s, HOST1, XA, "TCP", 8080)
    assert not drop.allowed and drop.policies == (POLICY_ALWAYS,)
    assert s.policy_name(POLICY_ALWAYS) == "reserved:mode-always"
    assert probe.allowed and probe.policies == (POLICY_HOST,)


def test_unselected_pods_are_not_isolated_and_need_no_lookup():
    s = state_of([P("x", "deny", podSelector={"matchLabels": {"app": "a"}})])
    v = evaluate(s, YA, XB, "TCP", 9090)
    assert v.allowed and v.reason == REASON_NOT_ISOLATED
    assert not s.endpoints[XB].rules


# ----------------------------------------------------------------- audit

def test_an_audited_policy_alone_counts_would_be_drops_and_forwards_them():
    s = state_of([P("x", "deny", podSelector={"matchLabels": {"app": "a"}},
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}])],
                 audited=[("x", "deny")])
    ep = s.endpoints[XA]
    assert not ep.ingress.enforced and ep.ingress.audit
    miss = evaluate(s, YA, XA, "TCP", 8080)
    hit = evaluate(s, XB, XA, "TCP", 8080)
    assert miss.allowed and miss.reason == REASON_AUDIT_DENIED and names(s, miss.policies) == ["x/deny"]
    assert hit.allowed and hit.reason == REASON_AUDIT_ALLOWED
    assert all(v.audit for v in ep.rules.values())
    assert evaluate(s, HOST1, XA, "TCP", 1).reason == REASON_AUDIT_ALLOWED


def test_an_enforced_policy_governs_a_pod_an_audited_one_also_selects():
    # The audited policy would admit y/a; enforcing it would only ever add
    # allows to an isolated pod, so it neither opens nor closes anything, and
    # its rules are not written.
    s = state_of([P("x", "enforced", podSelector={"matchLabels": {"app": "a"}},
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]),
                  P("x", "audited", podSelector={"matchLabels": {"app": "a"}},
                    ingress=[{"from": [{"namespaceSelector": {}}]}])],
                 audited=["x/audited"])
    ep = s.endpoints[XA]
    assert ep.ingress.enforced and not ep.ingress.audit
    assert names(s, ep.ingress.deciding) == ["x/enforced"]
    denied = evaluate(s, YA, XA, "TCP", 8080)
    allowed = evaluate(s, XB, XA, "TCP", 8080)
    assert not denied.allowed and names(s, denied.policies) == ["x/enforced"]
    assert allowed.allowed and names(s, allowed.policies) == ["x/enforced"]
    audited_id = s.policy_ids["x/audited"]
    assert not any(audited_id in v.policies for v in ep.rules.values())


def test_audited_policies_leave_enforcement_exactly_as_without_them():
    policies = [P("x", "deny", podSelector={"matchLabels": {"app": "a"}}, policyTypes=["Ingress", "Egress"]),
                P("y", "from-x", ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}])]
    with_audit = state_of(policies, audited=["x/deny"])
    without = state_of(policies[1:])
    ips = [XA, XB, YA, YB, ZC, HOST1, EXT]
    for src in ips:
        for dst in ips:
            for proto, port in (("TCP", 8080), ("UDP", 53)):
                assert evaluate(with_audit, src, dst, proto, port).allowed == \
                    evaluate(without, src, dst, proto, port).allowed
    assert evaluate(with_audit, XA, EXT, "TCP", 443).reason == REASON_AUDIT_DENIED
