"""The world of the bandwidth tests with real traffic (test_bandwidth.py over
IPv4, test_bandwidth_ipv6.py over both families): two simulated nodes with
agents, iperf3 servers in the pods, limits written as Pod annotations into
every agent's manifest directory. Each test file keeps its own traffic,
waits and assertions.
"""
from __future__ import annotations

import contextlib
import os

from agent.sim import World
from agent.sim import manifests as M
from agent.sim.agent import sim_attach

EGRESS, INGRESS = "kubernetes.io/egress-bandwidth", "kubernetes.io/ingress-bandwidth"
LIMIT = 50                      # Mbit/s


def near(got: float, want: float, tol: float = 0.10) -> bool:
    return abs(got - want) <= want * tol


class BandwidthNet:
    """n1 with the pods named `n1_pods` (a, the limited one, and e, a
    neighbour, among them), n2 with b; an iperf3 server in a, b and e on
    every (address, port) listen(pod) names. `agents` is set by attached()."""

    def __init__(self, w: World, n1_pods, listen):
        self.w = w
        self.n1, self.n2 = w.add_node("n1"), w.add_node("n2")
        for name in n1_pods:
            setattr(self, name, self.n1.add_pod(name))
        self.b = self.n2.add_pod("b")
        self.servers = []
        for p in (self.a, self.b, self.e):
            for ip, port in listen(p):
                self.servers.append(p.popen(["iperf3", "-s", "-B", ip, "-p", str(port)]))
                p.wait_port(port)
        self.agents = {}

    def write_pods(self, limits: dict[str, dict], dual_stack: bool = False) -> list[dict]:
        """Every pod's manifest with `limits` {pod name: annotations} (and
        with `dual_stack` both addresses in status.podIPs, as a dual-stack
        kubelet reports them), in every agent's manifest directory."""
        objs = []
        for p in self.w.pods:
            o = M.pod("default", p.name, p.ip, p.node.name, annotations=limits.get(p.name))
            if dual_stack:
                o["status"]["podIPs"] = [{"ip": p.ip}, {"ip": p.ip6}]
            objs.append(o)
        for ag in self.agents.values():
            path = os.path.join(ag.config.source, "pods.yaml")
            with open(path + ".tmp", "w") as f:
                f.write(M.dump(objs))
            os.replace(path + ".tmp", path)
        return objs


@contextlib.contextmanager
def attached(n: BandwidthNet):
    """Agents on both nodes for the duration; the iperf3 servers stopped
    after, however it ends."""
    try:
        with sim_attach(n.n1) as ag1, sim_attach(n.n2) as ag2:
            n.agents = {"n1": ag1, "n2": ag2}
            yield n
    finally:
        for s in n.servers:
            s.terminate()
