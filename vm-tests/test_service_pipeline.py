"""Services end to end: manifests -> cluster state -> kube-proxy semantics ->
service maps -> real connections, with `fastpath agent` as a real process.

    pod a (client) ─┐
    pod b, pod d ───┴ node n1     Service web: ClusterIP 192.168.99.10:80 -> :8080
"""
from __future__ import annotations

import time

from agent.sim import manifests as mf
from agent.sim.agent import node_agent
from fastpath_helpers import serve_reply, wait_for

VIP = "192.168.99.10"


def manifests(endpoints: list[tuple[str, bool]]) -> list[dict]:
    return [mf.service("shop", "web", VIP, 80, "http"),
            mf.endpoint_slice("shop", "web", 8080, [(ip, ready, "n1") for ip, ready in endpoints])]


def serve(pod, reply: str):
    serve_reply(pod, 8080, reply)


def ask(pod) -> str:
    return pod.run(["sh", "-c", f"printf hi | nc -N -w 2 {VIP} 80"], check=False, timeout=10).stdout


def test_service_manifests_become_translated_connections_and_follow_changes(world):
    node = world.add_node("n1", enis=1)
    a, b, d = node.add_pod("a"), node.add_pod("b"), node.add_pod("d")
    serve(b, "from-b")
    serve(d, "from-d")
    with node_agent(node, manifests={"web.yaml": manifests([(b.ip, True), (d.ip, True)])}) \
            as agent:
        wait_for(lambda: {ask(a) for _ in range(8)} == {"from-b", "from-d"},
                 "both endpoints to answer through the ClusterIP")
        # d stops being ready: kube-proxy stops sending it new connections
        agent.write("web.yaml", manifests([(b.ip, True), (d.ip, False)]))
        wait_for(lambda: {ask(a) for _ in range(8)} == {"from-b"}, "d to be withdrawn")
        # no endpoints at all: the Service refuses instead of hanging
        agent.write("web.yaml", manifests([]))

        def refused():
            t = time.monotonic()
            out = a.run(["sh", "-c", f"printf hi | nc -N -w 3 {VIP} 80; echo rc=$?"],
                        check=False, timeout=10).stdout
            return "rc=1" in out and time.monotonic() - t < 1.5
        wait_for(refused, "the Service to refuse connections")
        status = agent.call("Status")
        assert status["source"]["objects"]["Service"] == 1
