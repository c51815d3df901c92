"""NetworkPolicy end to end through the agent: manifests -> cluster state ->
compiler -> pinned policy maps -> real connections dropped or admitted, with
`fastpath agent` as a real process (enforcement `default`).

    node n1:  x/a (app=a)   x/b (app=b, serves :8080)   y/c (app=c)

Also: the agent's restart keeps enforcing without a gap and rewrites
nothing that did not change; a relabel into a policy whose rules the map
cannot hold leaves the pod isolated and names the policy (log, status text
and --json, metrics, event) until room is freed.
"""
from __future__ import annotations

import json
import os

import pytest

from agent.api import wire
from agent.sim import manifests as m
from agent.sim.agent import node_agent
from fastpath_helpers import serve_reply, wait_for

ALLOW_A_TO_B = m.ingress_policy("x", "b-from-a", {"app": "b"}, {"app": "a"}, [("http", None)])

# Many port ranges towards every pod: more rule entries than a tiny map holds.
WIDE = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: wide, namespace: x}}
spec:
  podSelector: {{}}
  ingress:
  - from: [{{namespaceSelector: {{}}}}]
    ports: [{ports}]
"""


def cluster(pods) -> str:
    """Namespaces x and y, and the pods (pod, namespace), all on n1."""
    return m.dump([m.namespace("x", ns="x"), m.namespace("y", ns="y"),
                   *(m.pod(ns, p.name, p.ip, "n1", {"app": p.name}) for p, ns in pods)])


def connects(client, server_ip: str) -> bool:
    r = client.run(["sh", "-c", f"printf hi | nc -N -w 1 {server_ip} 8080"], check=False,
                   timeout=10)
    return r.stdout == "ok"


def policy_status(paths) -> dict:
    return wire.call(paths.socket, "PolicyStatus")


def applied(paths, policies: int):
    """The agent's maps hold a state with `policies` NetworkPolicies."""
    def ok():
        st = policy_status(paths)
        return st["plans"] > 0 and st["policies"] == policies and not st["refused"]
    return ok


def test_policies_from_manifests_are_enforced_and_follow_changes_and_restarts(world):
    node = world.add_node("n1", enis=1)
    a, b, c = node.add_pod("a"), node.add_pod("b"), node.add_pod("c")
    serve_reply(b, 8080, "ok")
    with node_agent(node, ["--policy-enforcement", "default"],
                    {"base.yaml": cluster(((a, "x"), (b, "x"), (c, "y")))}) as agent:
        paths = agent.paths
        pol = f"{paths.manifests}/policy.yaml"
        wait_for(applied(paths, 0), "the first policy plan")
        # no policy selects b: everyone reaches it
        assert connects(a, b.ip) and connects(c, b.ip)

        agent.write("policy.yaml", [ALLOW_A_TO_B])
        wait_for(applied(paths, 1), "b-from-a to be programmed")
        assert connects(a, b.ip)
        assert not connects(c, b.ip)
        counters = wire.call(paths.socket, "Counters")
        drops = sum(r["packets"] for r in counters if r["reason"] == "dropped-policy-denied")
        assert drops >= 1, counters
        # the pod's effective rules, traced to the policy
        view = wire.call(paths.socket, "PolicyGet", {"endpoint": "x/b"})
        assert view["ip"] == b.ip and view["ingress"]["enforced"]
        assert view["ingress"]["deciding"] == ["x/b-from-a"]
        tcp8080 = [r for r in view["rules"] if r["match"] == "TCP/8080"]
        assert tcp8080 and all(r["policies"] == ["x/b-from-a"] for r in tcp8080)
        assert sum(r["flows"] for r in tcp8080) >= 1

        # kill -9: the pinned maps keep enforcing while the agent is away
        agent.kill()
        assert connects(a, b.ip) and not connects(c, b.ip)
        agent.start()
        wait_for(applied(paths, 1), "the restarted agent's first plan")
        st = policy_status(paths)
        # restored from the maps, ids kept: nothing changed while it was
        # away, so its first plan writes nothing at all
        assert (st["plans"], st["last_ops"]) == (1, 0), st
        assert connects(a, b.ip) and not connects(c, b.ip)
        log = agent.log.read_text()
        assert "stale policy map entries removed" not in log

        # the directory is followed with inotify; PolicyWait answers once
        # the removal is in the maps (and says so when it is not yet)
        st = wire.call(paths.socket, "Status")
        assert st["source"]["status"]["watch"].startswith("inotify"), st["source"]
        before = policy_status(paths)["applied_version"]
        with pytest.raises(wire.RemoteError) as e:
            wire.call(paths.socket, "PolicyWait", {"applied_after": before, "timeout": 0.2})
        assert e.value.code == "timeout"
        os.remove(pol)
        st = wire.call(paths.socket, "PolicyWait", {"applied_after": before, "timeout": 20})
        assert st["applied_version"] > before and st["policies"] == 0
        assert connects(c, b.ip)
        assert st["errors"] == 0
        with pytest.raises(wire.RemoteError) as e:
            wire.call(paths.socket, "PolicyWait", {"applied_after": "1", "timeout": 1})
        assert e.value.code == "invalid-argument"


def node_policy_ips(node) -> list[str]:
    """The node addresses the agent gives the compiler: its netns' IPv4
    addresses and the local router's (agent._node_ips)."""
    ips = {"169.254.10.1"}
    for link in node.ip_json("addr", "show"):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet" and not a["local"].startswith("127."):
                ips.add(a["local"])
    return sorted(ips)


def web_policy(ports: int) -> dict:
    """app=web admits every pod of x on 8080 and `ports` odd ports more."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"podSelector": {}}],
                                  "ports": [{"port": 8080}] + [{"port": 9001 + 2 * i}
                                                               for i in range(ports)]}]}}


def extra_policy(ports: int) -> dict:
    """app=a admits pods of x on `ports` odd ports: rules that take room."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "extra", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                     "ingress": [{"from": [{"podSelector": {}}],
                                  "ports": [{"port": 7001 + 2 * i} for i in range(ports)]}]}}


def capacity_window(node, pods, labels_before, labels_after) -> range:
    """Rule-map sizes at which the agent's own planner (agent.policy.fit, on
    the same objects and node addresses) applies `labels_before` in full,
    refuses exactly (x/web, the relabelled pod) after the relabel, also in
    the plan after that, and applies everything once x/extra is deleted
    (within three plans)."""
    from agent.k8s.parse import parse_object
    from agent.policy import Capacities, compile_policy, fit, pairs_of
    from tests.policy.kube import snapshot
    ips = node_policy_ips(node)

    def objs(labels, extra=True):
        docs = [m.namespace("x", ns="x"), web_policy(30)] + ([extra_policy(30)] if extra else [])
        docs += [m.pod("x", p.name, p.ip, "n1", labels[p.name]) for p in pods]
        return [parse_object(d) for d in docs]

    def plan(o, cap, old):
        snap = snapshot(o)
        applied = pairs_of(old) - old.refused if old is not None else ()
        return fit(lambda r: compile_policy(snap, "n1", ips, "default", previous=old, refused=r),
                   Capacities(65536, 16384, cap), old, applied=applied)

    good = []
    for cap in range(16, 1200, 4):
        f0 = plan(objs(labels_before), cap, None)
        if f0.state is None or f0.refused:
            continue
        f1 = plan(objs(labels_after), cap, f0.state)
        if f1.state is None or f1.refused_policies() != {"x/web": [pods[-1].ip]}:
            continue
        # and still after the plan that follows a refusal (not only the
        # transition's peak, which the agent's next plan no longer has)
        f1 = plan(objs(labels_after), cap, f1.state)
        if f1.state is None or f1.refused_policies() != {"x/web": [pods[-1].ip]}:
            continue
        st = f1.state
        for _ in range(3):
            f2 = plan(objs(labels_after, extra=False), cap, st)
            if f2.state is None:
                break
            st = f2.state
            if not f2.refused:
                good.append(cap)
                break
    assert good, "no rules map size shows the scenario"
    return range(good[0], good[-1] + 1)


def scrape(node, port: int = 9962) -> str:
    """The agent's /metrics, where it serves them by default: the node's
    primary address."""
    r = node.run(["python3", "-c", "import urllib.request,sys; sys.stdout.write(urllib.request."
                  f"urlopen('http://{node.ip}:{port}/metrics', timeout=5).read().decode())"],
                 timeout=20)
    return r.stdout


def cli(agent, *args) -> str:
    r = agent.cli(*args, check=False, timeout=60)
    assert r.stdout, f"fastpath {' '.join(args)}: exit {r.returncode}: {r.stderr}"
    return r.stdout


def test_a_relabel_that_does_not_fit_leaves_the_pod_isolated_and_names_the_policy(world):
    """Small rules map; c is relabelled into x/web, which does not fit for
    it: c is isolated (only the node reaches it) and x/web is named as
    refused for x/c in the log, `fastpath status` (text and --json), the
    metrics and an event; deleting x/extra frees room and c gets x/web's
    rules."""
    node = world.add_node("n1", enis=1)
    a, b, c = node.add_pod("a"), node.add_pod("b"), node.add_pod("c")
    for p in (b, c):
        serve_reply(p, 8080, "ok")
    # c keeps an identity of its own (role=c), so web's rules at c are
    # rules of their own, not shared with b's
    before = {"a": {"app": "a"}, "b": {"app": "web"}, "c": {"app": "c", "role": "c"}}
    after = {"a": {"app": "a"}, "b": {"app": "web"}, "c": {"app": "web", "role": "c"}}
    window = capacity_window(node, [a, b, c], before, after)
    cap = window[len(window) // 2]

    def base(labels):
        return [m.namespace("x", ns="x")] + [
            m.pod("x", p.name, p.ip, "n1", labels[p.name]) for p in (a, b, c)]
    with node_agent(node, ["--policy-enforcement", "default", "--policy-map-size", str(cap)],
                    {"base.yaml": base(before), "web.yaml": [web_policy(30)],
                     "extra.yaml": [extra_policy(30)]}) as agent:
        paths = agent.paths
        wait_for(applied(paths, 2), "web and extra")
        assert connects(a, b.ip) and connects(a, c.ip)      # c is not isolated yet

        agent.write("base.yaml", base(after))
        wait_for(lambda: policy_status(paths)["refused"], "x/web to be refused for x/c")
        st = policy_status(paths)
        assert [(r["policy"], r["pods"]) for r in st["refused"]] == [("x/web", ["x/c"])], st
        assert st["errors"] == 0 and st["refused_total"] >= 1
        # c is isolated, web still admits a at b
        assert not connects(a, c.ip)
        assert connects(a, b.ip)
        # named: in the log and as an event (directory mode: in the log)
        log = agent.log.read_text()
        assert "rules of NetworkPolicy x/web are not written for x/c" in log
        assert "PolicyRefused" in log
        # fastpath status, text and --json
        text = cli(agent, "status")
        assert "REFUSED x/web: rules not written for x/c" in text, text
        assert "1 refused" in text
        shown = json.loads(cli(agent, "status", "--json"))
        assert [(r["policy"], r["pods"]) for r in shown["policy"]["refused"]] == \
            [("x/web", ["x/c"])]
        # policy get names it for the pod
        view = json.loads(cli(agent, "policy", "get", c.ip, "--json"))
        assert view["refused"] == ["x/web"] and view["directions"]["ingress"]["enforced"]
        # metrics
        metrics = scrape(node)
        assert "fastpath_policy_refused 1.0" in metrics
        assert 'fastpath_policy_refused_pods{namespace="x",policy="web"} 1.0' in metrics

        # room again: c gets web's rules
        os.remove(f"{paths.manifests}/extra.yaml")
        wait_for(lambda: (not policy_status(paths)["refused"]
                          and policy_status(paths)["policies"] == 1), "the refusal to lift")
        assert connects(a, c.ip)
        assert "are written in full on node n1 again" in agent.log.read_text()
        assert "fastpath_policy_refused 0.0" in scrape(node)
