"""`make demo`: fastpath on the built-in simulated Terway node.

Builds two simulated nodes (network namespaces laid out as Terway's
ENIMultiIP datapath), runs `fastpath agent` on each, registers the pods the
way the CNI plugin does, sends real traffic, and shows the counters that
prove the fast path: packets redirected by fastpath while the nodes' own IP
forwarding counter does not move. Then it kills an agent and shows that the
pinned programs keep forwarding. Everything is removed at the end.
"""
from __future__ import annotations

import subprocess
import sys
import time

from agent.api import wire
from agent.sim import World
from agent.sim.traffic import forwarded_datagrams, tcp_exchange, udp_send
from agent.simagent import AgentProcess, private_paths


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def cli(sock: str, *args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli.main", *args, "--socket", sock],
                         capture_output=True, text=True)
    print(out.stdout.rstrip() or out.stderr.rstrip())


def traffic(src, dst) -> None:
    src.ping(dst.ip, count=3)
    got = tcp_exchange(src, dst, request="GET /", reply="200 OK")
    assert got == ("GET /", "200 OK"), got
    assert udp_send(src, dst, payload="dns?") == "dns?"
    print(f"   {src.name} -> {dst.name} ({dst.ip}): ping ok, TCP ok, UDP ok")


def main() -> int:
    t0 = time.monotonic()
    with World() as w, private_paths() as p1, private_paths() as p2:
        say("building two simulated Terway nodes (netns + veth, ENIs to a VPC netns)")
        n1, n2 = w.add_node("n1", enis=1), w.add_node("n2", enis=1)
        a, b = n1.add_pod("a"), n1.add_pod("b")
        c = n2.add_pod("c")
        for pod in (a, b, c):
            print(f"   {pod}")

        say("starting `fastpath agent` on each node (compiles once, pins maps, attaches ENIs)")
        agents = [AgentProcess(n1, p1).start(), AgentProcess(n2, p2).start()]
        try:
            for node, paths in ((n1, p1), (n2, p2)):
                for pod in node.pods:
                    wire.call(paths.socket, "EndpointAdd", {
                        "netns": pod.netns_path, "ifname": "eth0", "container_id": f"demo-{pod.name}",
                        "pod_namespace": "default", "pod_name": pod.name})
            say("fastpath endpoint list   (node n1)")
            cli(p1.socket, "endpoint", "list")

            say("traffic: same node (redirect_peer) and across nodes (ENI via FIB + redirect)")
            f1, f2 = forwarded_datagrams(n1), forwarded_datagrams(n2)
            traffic(a, b)
            traffic(a, c)
            traffic(c, b)
            print(f"   IP datagrams forwarded by the nodes' own stacks meanwhile: "
                  f"n1 {forwarded_datagrams(n1) - f1}, n2 {forwarded_datagrams(n2) - f2}")

            say("fastpath metrics   (node n1; ifindex -> device: "
                + ", ".join(f"{x.host_ifindex}={x.host_ifname}" for x in n1.pods)
                + f", {n1.enis[0].ifindex}={n1.enis[0].name})")
            cli(p1.socket, "metrics")

            say("kill -9 the agent on n1: pinned programs and maps keep forwarding")
            agents[0].kill(9)
            f1 = forwarded_datagrams(n1)
            traffic(a, b)
            traffic(b, c)
            print(f"   n1's stack forwarded {forwarded_datagrams(n1) - f1} datagrams with no agent running")

            say("restart the agent on n1: it restores its endpoints from its state dir")
            agents[0] = AgentProcess(n1, p1).start()
            cli(p1.socket, "status")
        finally:
            for ag in agents:
                ag.stop()
        say("cleaning up: agents stopped, pins unmounted, namespaces deleted")
    print(f"\ndemo finished in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
