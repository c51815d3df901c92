"""IPv6 fast redirect with real traffic on dual-stack simulated Terway nodes
(agent.sim World(dual_stack=True): each pod has an IPv4 and an IPv6
address, an IPv6 default route via the link-local gateway fe80::1, and the
node's host routes and policy-routing rules per family).

    pod a ─ cali ┐                    ┌ cali ─ pod c
    pod b ─ cali ┴ node n1 ─ eth1 ═ vpc ═ eth1 ─ node n2

The IPv4 scenarios of test_redirect_traffic.py, run over IPv6, with the
same two witnesses: fastpath's counters, and the node's IPv6 forwarding
counter (Ip6OutForwDatagrams), which only moves when the host stack routes.
"""
from __future__ import annotations

import subprocess

import pytest

from agent.datapath import Datapath
from agent.sim.agent import AgentProcess, private_paths, register_pod, sim_attach
from agent.sim.traffic import forwarded_datagrams6, tcp_exchange, udp_send
from agent.sim.world import World
from fastpath_helpers import counters_by, forwarded_by_stack, inject_truncated6


@pytest.fixture
def world6():
    with World(dual_stack=True) as w:
        yield w


def exchange_all6(src, dst):
    src.ping(dst.ip6, count=3)
    got_srv, got_cli = tcp_exchange(src, dst, ip=dst.ip6, request="hello6", reply="world6")
    assert (got_srv, got_cli) == ("hello6", "world6")
    assert udp_send(src, dst, ip=dst.ip6, payload="dns-ish6") == "dns-ish6"


def test_dual_stack_pods_are_registered_with_both_addresses(world6):
    node = world6.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        eps = {e.ip: e.host_ifindex for e in agent.datapath.maps.endpoints6()}
        assert eps == {a.ip6: a.host_ifindex, b.ip6: b.host_ifindex}
        assert {e.ip for e in agent.datapath.maps.endpoints()} == {a.ip, b.ip}


def test_ipv6_pods_on_one_node_talk_through_redirect_peer_not_the_stack(world6):
    node = world6.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        before = forwarded_datagrams6(node)
        exchange_all6(a, b)
        exchange_all6(b, a)
        assert forwarded_datagrams6(node) == before, "the node's stack forwarded pod traffic"
        rows = agent.datapath.maps.counters()
        ca, cb = counters_by(rows, a.host_ifindex), counters_by(rows, b.host_ifindex)
        assert ca[("from-pod", "redirected-local")] >= 10
        assert cb[("from-pod", "redirected-local")] >= 10


def test_ipv6_pods_on_two_nodes_leave_by_their_eni_and_arrive_by_redirect(world6):
    n1, n2 = world6.add_node("n1", enis=1), world6.add_node("n2", enis=1)
    a, c = n1.add_pod("a"), n2.add_pod("c")
    with sim_attach(n1) as ag1, sim_attach(n2) as ag2:
        f1, f2 = forwarded_datagrams6(n1), forwarded_datagrams6(n2)
        exchange_all6(a, c)
        exchange_all6(c, a)
        assert forwarded_datagrams6(n1) == f1 and forwarded_datagrams6(n2) == f2
        c1 = counters_by(ag1.datapath.maps.counters())
        c2 = counters_by(ag2.datapath.maps.counters())
        for c in (c1, c2):
            assert c[("from-pod", "redirected-eni")] >= 10
            assert c[("from-vpc", "redirected-local")] >= 10


def test_both_families_of_a_dual_stack_pod_take_the_fast_path_together(world6):
    node = world6.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node):
        f4, f6 = forwarded_by_stack(node), forwarded_datagrams6(node)
        a.ping(b.ip, count=2)
        a.ping(b.ip6, count=2)
        assert tcp_exchange(a, b, ip=b.ip, request="v4", reply="four") == ("v4", "four")
        assert tcp_exchange(a, b, ip=b.ip6, request="v6", reply="six") == ("v6", "six")
        assert (forwarded_by_stack(node), forwarded_datagrams6(node)) == (f4, f6)


def test_a_pod_cannot_send_from_another_pods_ipv6_address(world6):
    node = world6.add_node("n1", enis=1)
    a, b, c = node.add_pod("a"), node.add_pod("b"), node.add_pod("c")
    with sim_attach(node) as agent:
        a.ping(c.ip6, count=1)
        # a claims b's address as its own and tries to reach c with it
        a.iproute("-6", "addr", "add", f"{b.ip6}/128", "dev", "eth0", "nodad")
        r = a.run(["busybox", "ping", "-c", "2", "-w", "2", "-I", b.ip6, c.ip6], check=False)
        assert r.returncode != 0, r.stdout
        c = counters_by(agent.datapath.maps.counters(), a.host_ifindex)
        assert c[("from-pod", "dropped-source-spoofed")] >= 1


def test_ipv6_forwarding_survives_the_agent_being_killed_and_restarted(world6):
    node = world6.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with private_paths() as paths:
        proc = AgentProcess(node, paths).start()
        try:
            for p in (a, b):
                register_pod(paths.socket, p)
            exchange_all6(a, b)
            proc.kill(9)
            reader = Datapath(paths.config(), netns=node.netns).load()
            try:
                assert {e.ip for e in reader.maps.endpoints6()} == {a.ip6, b.ip6}
                seen = counters_by(reader.maps.counters(), a.host_ifindex)
                before = forwarded_datagrams6(node)
                exchange_all6(a, b)          # no agent process at all now
                assert forwarded_datagrams6(node) == before
                now = counters_by(reader.maps.counters(), a.host_ifindex)
                key = ("from-pod", "redirected-local")
                assert now[key] - seen[key] >= 8, (seen, now)
            finally:
                reader.close()
            proc = AgentProcess(node, paths).start()   # restores from its state dir
            exchange_all6(b, a)
            reader = Datapath(paths.config(), netns=node.netns).load()
            try:
                assert {e.ip for e in reader.maps.endpoints6()} == {a.ip6, b.ip6}
            finally:
                reader.close()
        finally:
            proc.kill(9)
            for p in (a, b):
                subprocess.run(["tc", "-n", node.netns, "qdisc", "del", "dev", p.host_ifname,
                                "clsact"], check=False)


def test_truncated_ipv6_frames_on_a_real_veth_are_dropped_and_counted(world6):
    """The kernel's test run refuses IPv6 frames shorter than an IPv6
    header, so they are proven here, written raw onto a pod's eth0."""
    import time
    node = world6.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        inject_truncated6(a)
        time.sleep(0.2)
        c = counters_by(agent.datapath.maps.counters(), a.host_ifindex)
        assert c[("from-pod", "dropped-invalid-packet")] == 5
        exchange_all6(a, b)          # and the pod's real traffic still flows


def test_pod_churn_keeps_the_ipv6_endpoints_exact(world6):
    """CNI DEL and ADD while the node carries IPv6 traffic: a deleted pod's
    IPv6 address stops being a destination at once, a new pod's becomes one,
    the other pods' traffic never stops."""
    node = world6.add_node("n1", enis=1)
    a, b, c = node.add_pod("a"), node.add_pod("b"), node.add_pod("c")
    with sim_attach(node) as agent:
        exchange_all6(a, b)
        agent.rpc_EndpointDel(container_id=f"sim-{b.name}")
        assert {e.ip for e in agent.datapath.maps.endpoints6()} == {a.ip6, c.ip6}
        node.remove_pod(b)
        before = counters_by(agent.datapath.maps.counters(), a.host_ifindex)
        # b's address now belongs to nobody: a's packets to it are not redirected
        a.run(["sh", "-c", f"printf x | nc -u -q 0 -w 1 {b.ip6} 9"], check=False, timeout=10)
        after = counters_by(agent.datapath.maps.counters(), a.host_ifindex)
        key = ("from-pod", "redirected-local")
        assert after[key] == before[key]
        assert after[("from-pod", "redirected-eni")] > before[("from-pod", "redirected-eni")], \
            "it left by the ENI, as to any address not on the node"
        d = node.add_pod("d")
        register_pod(agent, d)
        assert {e.ip for e in agent.datapath.maps.endpoints6()} == {a.ip6, c.ip6, d.ip6}
        f = forwarded_datagrams6(node)
        exchange_all6(a, d)
        exchange_all6(c, a)
        assert forwarded_datagrams6(node) == f
