"""NetworkPolicy on real IPv6 traffic, dual-stack simulated nodes, through
the agent (`fastpath agent` as a real process, enforcement `default`).

    node n1:  x/s (app=s, serves :8080 and echoes on :9000)  x/a  x/b
    node n2:  x/c  x/d          (no fastpath: plain Terway routing)

The policy admits a and c to s by an IPv6 ipBlock of their /128s, on TCP
8080 and 9000; b (same node) and d (across nodes) are denied, and so is
every IPv4 peer (the block is IPv6). Enforcement, and an admitted IPv6
connection, survive the agent being killed with -9 and restarted.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from agent.api import wire
from agent.sim import manifests as m
from agent.sim.agent import node_agent
from agent.sim.world import World
from fastpath_helpers import wait_for

# Answers every connection with "ok" (8080) and echoes (9000), on both families.
SERVER6 = r"""
import socket, sys, threading
def serve(port, echo):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=answer, args=(c, echo), daemon=True).start()
def answer(c, echo):
    with c:
        c.settimeout(30)
        try:
            if not echo:
                c.recv(100); c.sendall(b"ok"); return
            while True:
                d = c.recv(100)
                if not d:
                    return
                c.sendall(d)
        except OSError:
            pass
threading.Thread(target=serve, args=(9000, True), daemon=True).start()
serve(8080, False)
"""

# One IPv6 connection, a message every 20 ms for `secs`: prints how many
# round trips succeeded and "broken" if one failed.
CLIENT6 = r"""
import socket, sys, time
ip, secs = sys.argv[1], float(sys.argv[2])
s = socket.create_connection((ip, 9000), timeout=5)
n, end = 0, time.time() + secs
try:
    while time.time() < end:
        s.sendall(b"x")
        if s.recv(10) != b"x":
            raise OSError("short")
        n += 1
        time.sleep(0.02)
    print("ok", n)
except OSError as e:
    print("broken", n, e)
"""


def dual_pod(ns, p, node, labels):
    obj = m.pod(ns, p.name, p.ip, node, labels)
    obj["status"]["podIPs"].append({"ip": p.ip6})
    return obj


def policy(*allowed) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": "s-in"},
            "spec": {"podSelector": {"matchLabels": {"app": "s"}},
                     "ingress": [{"from": [{"ipBlock": {"cidr": f"{p.ip6}/128"}}
                                           for p in allowed],
                                  "ports": [{"protocol": "TCP", "port": 8080},
                                            {"protocol": "TCP", "port": 9000}]}]}}


def connects(client, ip: str) -> bool:
    r = client.run(["sh", "-c", f"printf hi | nc -N -w 1 {ip} 8080"], check=False, timeout=10)
    return r.stdout == "ok"


def applied(paths, policies: int):
    def ok():
        st = wire.call(paths.socket, "PolicyStatus")
        return st["plans"] > 0 and st["policies"] == policies and not st["refused"]
    return ok


def denied_drops(paths) -> int:
    return sum(r["packets"] for r in wire.call(paths.socket, "Counters")
               if r["reason"] == "dropped-policy-denied")


@pytest.fixture
def world6():
    with World(dual_stack=True) as w:
        yield w


def test_an_ipv6_ipblock_admits_one_client_and_denies_another(world6):
    n1, n2 = world6.add_node("n1", enis=1), world6.add_node("n2", enis=1)
    s, a, b = n1.add_pod("s"), n1.add_pod("a"), n1.add_pod("b")
    c, d = n2.add_pod("c"), n2.add_pod("d")
    srv = s.popen(["python3", "-c", SERVER6])
    try:
        s.wait_port(8080)
        objs = [m.namespace("x", ns="x"),
                *(dual_pod("x", p, "n1", {"app": p.name}) for p in (s, a, b)),
                *(dual_pod("x", p, "n2", {"app": p.name}) for p in (c, d))]
        with node_agent(n1, ["--policy-enforcement", "default"],
                        {"base.yaml": m.dump(objs)}) as agent:
            wait_for(applied(agent.paths, 0), "the first policy plan")
            # nothing isolates s yet: both families, everyone
            for p in (a, b, c, d):
                assert connects(p, s.ip6) and connects(p, s.ip), p.name
            agent.write("policy.yaml", [policy(a, c)])
            wait_for(applied(agent.paths, 1), "s-in to be programmed")
            before = denied_drops(agent.paths)
            assert connects(a, s.ip6), "same node, in the block"
            assert connects(c, s.ip6), "across nodes, in the block"
            assert not connects(b, s.ip6), "same node, not in the block"
            assert not connects(d, s.ip6), "across nodes, not in the block"
            # the block is IPv6: the IPv4 of the same pods is not admitted
            assert not connects(a, s.ip) and not connects(c, s.ip)
            assert denied_drops(agent.paths) > before
            # the policy goes: IPv6 is open again
            agent.write("policy.yaml", [])
            wait_for(applied(agent.paths, 0), "s-in to be removed")
            assert connects(b, s.ip6) and connects(d, s.ip6)
    finally:
        srv.kill()
        srv.wait()


def test_enforcement_and_admitted_ipv6_flows_survive_kill_and_restart(world6):
    n1 = world6.add_node("n1", enis=1)
    s, a, b = n1.add_pod("s"), n1.add_pod("a"), n1.add_pod("b")
    srv = s.popen(["python3", "-c", SERVER6])
    try:
        s.wait_port(9000)
        objs = [m.namespace("x", ns="x"),
                *(dual_pod("x", p, "n1", {"app": p.name}) for p in (s, a, b)), policy(a)]
        with node_agent(n1, ["--policy-enforcement", "default"],
                        {"base.yaml": m.dump(objs)}) as agent:
            wait_for(applied(agent.paths, 1), "s-in to be programmed")
            assert connects(a, s.ip6) and not connects(b, s.ip6)
            # IPv6 load: an admitted connection talking every 20 ms throughout
            load = a.popen(["python3", "-c", CLIENT6, s.ip6, "8"], stdout=subprocess.PIPE,
                           text=True)
            try:
                time.sleep(1)
                agent.kill(9)
                # no agent: the pinned maps and programs keep enforcing
                assert connects(a, s.ip6) and not connects(b, s.ip6)
                agent.start()
                wait_for(applied(agent.paths, 1), "the restarted agent's plan")
                # restored from the maps (the IPv6 ipcache read back as the
                # compiler writes it): its first plan writes nothing at all
                st = wire.call(agent.paths.socket, "PolicyStatus")
                assert (st["plans"], st["last_ops"]) == (1, 0), st
                assert connects(a, s.ip6) and not connects(b, s.ip6)
                out, _ = load.communicate(timeout=30)
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait()
            words = out.split()
            assert words[0] == "ok", out
            assert int(words[1]) > 100, out
    finally:
        srv.kill()
        srv.wait()
