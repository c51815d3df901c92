"""`make demo`: fastpath on the built-in simulated Terway node.

Builds two simulated dual-stack nodes (network namespaces laid out as
Terway's ENIMultiIP datapath, every pod with an IPv4 and an IPv6 address),
runs `fastpath agent` on each with NetworkPolicy on, registers the pods the
way the CNI plugin does, sends real traffic over both families, and shows
the counters that prove the fast path: packets redirected by fastpath, per
family, while the nodes' own IP forwarding counters do not move. A ClusterIP
Service is answered by backends on both nodes; a NetworkPolicy then drops
one client, and the monitor, the packet what-if and the effective rules say
which policy did it. Then it kills an agent and shows that the pinned
programs keep forwarding (and enforcing). Everything is removed at the end.
"""
from __future__ import annotations

import subprocess
import sys
import time

from agent.sim import World
from agent.sim import manifests as m
from agent.sim.traffic import (forwarded_datagrams, forwarded_datagrams6, serve_reply,
                               tcp_exchange, udp_send)
from agent.sim.agent import NodeAgent, private_paths
from agent.sim.plan import POD_GATEWAY6

VIP = "192.168.99.10"

# The web backends accept connections only from the shop's frontend pods.
POLICY = m.ingress_policy("shop", "web-from-frontend", {"app": "web"}, {"app": "frontend"},
                          [("http", None)])


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def node_cli(agent: NodeAgent, *args: str, background: bool = False):
    """`fastpath ...` inside the node's netns, on the node's pinned maps."""
    if background:
        return agent.cli_popen(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = agent.cli(*args, check=False)
    print(out.stdout.rstrip() or out.stderr.rstrip())


def ask(pod, target: str) -> str:
    """One short HTTP-style exchange; the reply, or "(no answer)"."""
    got = pod.run(["sh", "-c", f"printf hi | nc -N -w 1 {target}"], check=False, timeout=10).stdout
    return got or "(no answer)"


def wait_policy(agent: NodeAgent, policies: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = agent.call("PolicyStatus")
        if st.get("plans", 0) > 0 and st.get("policies") == policies:
            return
        time.sleep(0.2)
    raise RuntimeError(f"policy state with {policies} policies not applied in {timeout}s")


def traffic(src, dst) -> None:
    for ip in (dst.ip, dst.ip6):
        src.ping(ip, count=3)
        got = tcp_exchange(src, dst, ip=ip, request="GET /", reply="200 OK")
        assert got == ("GET /", "200 OK"), got
        assert udp_send(src, dst, ip=ip, payload="dns?") == "dns?"
    print(f"   {src.name} -> {dst.name} ({dst.ip}, {dst.ip6}): ping ok, TCP ok, UDP ok, "
          "both families")


def fast_path_by_family(agent: NodeAgent) -> str:
    """Packets the node's programs redirected (into a pod or out of an
    ENI), per family, from `fastpath metrics --json`."""
    import json
    rows = json.loads(agent.cli("metrics", "--json").stdout)
    got = {"ipv4": 0, "ipv6": 0}
    for r in rows:
        if r["reason"].startswith("redirected-"):
            got[r["family"]] = got.get(r["family"], 0) + r["packets"]
    return ", ".join(f"{fam} {n}" for fam, n in sorted(got.items()))


def monitor_while(agent: NodeAgent, endpoint: str, attempt) -> str:
    """The first drop `fastpath monitor` sees of `endpoint` while `attempt` runs."""
    mon = node_cli(agent, "monitor", "--type", "drop", "--endpoint", endpoint, "--count", "1",
                   "--duration", "10", background=True)
    time.sleep(1.5)
    attempt()
    out, _ = mon.communicate(timeout=15)
    return out.rstrip()


def main() -> int:
    t0 = time.monotonic()
    # the pods' IPv6 gateway: local_router_ipv6 (its default, as the agents run with)
    gw6 = POD_GATEWAY6
    with World(dual_stack=True, local_router_ipv6=gw6) as w, private_paths() as p1, \
            private_paths() as p2:
        say(f"building two simulated dual-stack Terway nodes (netns + veth, ENIs to a VPC netns; "
            f"pods' IPv6 default route via {gw6})")
        n1, n2 = w.add_node("n1", enis=1), w.add_node("n2", enis=1)
        a, b, d = n1.add_pod("a"), n1.add_pod("b"), n1.add_pod("d")
        c = n2.add_pod("c")
        roles = {a: ("shop", "frontend", "n1"), b: ("shop", "web", "n1"),
                 d: ("lab", "scanner", "n1"), c: ("shop", "web", "n2")}
        for pod in (a, b, d, c):
            ns, app, _ = roles[pod]
            print(f"   {pod} {pod.ip6}   {ns}/{pod.name} app={app}")
        cluster = [
            m.namespace("shop", team="web"), m.namespace("lab", team="research"),
            m.service("shop", "web", VIP, 80, "http"),
            m.endpoint_slice("shop", "web", 8080, [(b.ip, True, "n1"), (c.ip, True, "n2")]),
            *(m.pod(ns, p.name, p.ip, node, {"app": app}) for p, (ns, app, node) in roles.items())]
        agents = [NodeAgent(n, p, ["--policy-enforcement", "default"])
                  for n, p in ((n1, p1), (n2, p2))]
        ag1 = agents[0]
        for agent in agents:
            agent.write("cluster.yaml", cluster)

        say("starting `fastpath agent` on each node (compiles once, pins maps, attaches ENIs; "
            "cluster state from a manifest directory; NetworkPolicy on)")
        try:
            for agent in agents:
                agent.start()
                for pod in agent.node.pods:
                    agent.register(pod, namespace=roles[pod][0])
            say("fastpath endpoint list   (node n1)")
            node_cli(ag1, "endpoint", "list")

            say("traffic over IPv4 and IPv6: same node (redirect_peer) and across nodes "
                "(ENI via FIB + redirect)")
            f1, f2 = forwarded_datagrams(n1), forwarded_datagrams(n2)
            s1, s2 = forwarded_datagrams6(n1), forwarded_datagrams6(n2)
            traffic(a, b)
            traffic(a, c)
            traffic(c, b)
            print(f"   IPv4 datagrams forwarded by the nodes' own stacks meanwhile: "
                  f"n1 {forwarded_datagrams(n1) - f1}, n2 {forwarded_datagrams(n2) - f2}")
            print(f"   IPv6 datagrams forwarded by the nodes' own stacks meanwhile: "
                  f"n1 {forwarded_datagrams6(n1) - s1}, n2 {forwarded_datagrams6(n2) - s2}")
            print(f"   redirected by fastpath on n1 (fastpath metrics, by family): "
                  f"{fast_path_by_family(ag1)}")

            say(f"a ClusterIP Service: shop/web {VIP}:80 -> b and c on :8080 (translated per packet)")
            servers = [serve_reply(b, 8080, "web-b"), serve_reply(c, 8080, "web-c"),
                       serve_reply(b, 8080, "web-b6", host=b.ip6)]
            answers = sorted({ask(a, f"{VIP} 80") for _ in range(12)})
            print(f"   a -> {VIP}:80 answered by: {', '.join(answers)}")
            node_cli(ag1, "service", "list")

            say("NetworkPolicy shop/web-from-frontend: the web pods accept only app=frontend")
            for agent in agents:
                agent.write("policy.yaml", [POLICY])
            for agent in agents:
                wait_policy(agent, 1)
            print(f"   a (shop, frontend) -> b:8080: {ask(a, f'{b.ip} 8080')}")
            mon4 = monitor_while(ag1, "lab/d", lambda: print(
                f"   d (lab, scanner)   -> b:8080: {ask(d, f'{b.ip} 8080')}"))
            print(f"   d (lab, scanner)   -> {VIP}:80 (the Service): {ask(d, f'{VIP} 80')}")
            mon6 = monitor_while(ag1, "lab/d", lambda: print(
                f"   d (lab, scanner)   -> [{b.ip6}]:8080: {ask(d, f'{b.ip6} 8080')}"))
            say("fastpath monitor --type drop --endpoint lab/d   (node n1, while d tried each "
                "family)")
            print(mon4)
            print(mon6)
            say(f"fastpath trace --from lab/d --to {b.ip}:8080   (what-if on the live programs)")
            node_cli(ag1, "trace", "--from", "lab/d", "--to", f"{b.ip}:8080")
            say(f"fastpath trace --from lab/d --to [{b.ip6}]:8080   (the same over IPv6)")
            node_cli(ag1, "trace", "--from", "lab/d", "--to", f"[{b.ip6}]:8080")
            say("fastpath policy get shop/b   (effective rules, traced to their policies)")
            node_cli(ag1, "policy", "get", "shop/b")

            say("kill -9 the agent on n1: pinned programs and maps keep forwarding and enforcing")
            ag1.kill(9)
            f1 = forwarded_datagrams(n1)
            print(f"   a -> b:8080 (same node):  {ask(a, f'{b.ip} 8080')}")
            print(f"   a -> c:8080 (other node): {ask(a, f'{c.ip} 8080')}")
            print(f"   a -> {VIP}:80:     {ask(a, f'{VIP} 80')}")
            print(f"   d -> b:8080 (denied):     {ask(d, f'{b.ip} 8080')}")
            print(f"   n1's stack forwarded {forwarded_datagrams(n1) - f1} datagrams with no agent running")

            say("restart the agent on n1: it restores its endpoints and policy state")
            ag1.start()
            wait_policy(ag1, 1)
            st = ag1.call("PolicyStatus")
            print(f"   first policy plan after restart: {st['last_ops']} map writes "
                  f"({st['rules']} rules for {st['endpoints']} pods kept)")
            node_cli(ag1, "status")
            for srv in servers:
                srv.kill()
        finally:
            for agent in agents:
                agent.stop()
        say("cleaning up: agents stopped, pins unmounted, namespaces deleted")
    print(f"\ndemo finished in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
