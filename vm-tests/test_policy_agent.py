"""NetworkPolicy end to end through the agent: manifests -> cluster state ->
compiler -> pinned policy maps -> real connections dropped or admitted, with
`fastpath agent` as a real process (enforcement `default`).

    node n1:  x/a (app=a)   x/b (app=b, serves :8080)   y/c (app=c)

Also: the agent's restart keeps enforcing without a gap and rewrites
nothing that did not change; a policy that would overflow the rules map is
refused by name while the previous state stays enforced.
"""
from __future__ import annotations

import json
import os
import time

from agent.api import wire
from agent.sim import manifests as m
from agent.sim.agent import AgentProcess, private_paths, register_pod
from fastpath_helpers import serve_reply

ALLOW_A_TO_B = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: http}]
"""

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


def wait_for(cond, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


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
    with private_paths() as paths:
        base = f"{paths.manifests}/base.yaml"
        pol = f"{paths.manifests}/policy.yaml"
        with open(base, "w") as f:
            f.write(cluster(((a, "x"), (b, "x"), (c, "y"))))
        agent = AgentProcess(node, paths, ["--policy-enforcement", "default"]).start()
        try:
            for p in (a, b, c):
                register_pod(paths.socket, p)
            wait_for(applied(paths, 0), "the first policy plan")
            # no policy selects b: everyone reaches it
            assert connects(a, b.ip) and connects(c, b.ip)

            with open(pol, "w") as f:
                f.write(ALLOW_A_TO_B)
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
            agent = AgentProcess(node, paths, ["--policy-enforcement", "default"]).start()
            wait_for(applied(paths, 1), "the restarted agent's first plan")
            st = policy_status(paths)
            # restored from the maps, ids kept: nothing changed while it was
            # away, so its first plan writes nothing at all
            assert (st["plans"], st["last_ops"]) == (1, 0), st
            assert connects(a, b.ip) and not connects(c, b.ip)
            log = agent.log.read_text()
            assert "stale policy map entries removed" not in log

            os.remove(pol)
            wait_for(applied(paths, 0), "the policy's removal")
            assert connects(c, b.ip)
            assert st["errors"] == 0
        finally:
            agent.stop()


def test_a_policy_that_would_overflow_the_rules_map_is_refused_and_the_old_state_kept(world):
    node = world.add_node("n1", enis=1)
    a, b, c = node.add_pod("a"), node.add_pod("b"), node.add_pod("c")
    serve_reply(b, 8080, "ok")
    with private_paths() as paths:
        with open(f"{paths.manifests}/base.yaml", "w") as f:
            f.write(cluster(((a, "x"), (b, "x"), (c, "y"))))
        with open(f"{paths.manifests}/policy.yaml", "w") as f:
            f.write(ALLOW_A_TO_B)
        agent = AgentProcess(node, paths, ["--policy-enforcement", "default",
                                           "--policy-map-size", "64"]).start()
        try:
            for p in (a, b, c):
                register_pod(paths.socket, p)
            wait_for(applied(paths, 1), "b-from-a")
            assert not connects(c, b.ip)
            # 40 odd ports to every pod of x: 80 entries, more than 64
            ports = ", ".join(f"{{port: {9000 + 2 * i}}}" for i in range(40))
            with open(f"{paths.manifests}/wide.yaml", "w") as f:
                f.write(WIDE.format(ports=ports))

            def refused():
                return policy_status(paths)["refused"]
            wait_for(refused, "the wide policy to be refused")
            r = policy_status(paths)["refused"][0]
            assert r["map"] == "rules" and r["policy"] == "x/wide" and r["capacity"] == 64, r
            assert "x/wide" in agent.log.read_text()
            # the previous state is still the one enforced
            assert connects(a, b.ip) and not connects(c, b.ip)
            st = wire.call(paths.socket, "Status")["policy"]
            assert st["policies"] == 1 and st["refused_total"] >= 1, json.dumps(st)
        finally:
            agent.stop()

