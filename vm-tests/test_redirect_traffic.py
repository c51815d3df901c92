"""Fast redirect with real traffic on simulated Terway nodes, IPv4 and IPv6.

    pod a ─ cali ┐                    ┌ cali ─ pod c
    pod b ─ cali ┴ node n1 ─ eth1 ═ vpc ═ eth1 ─ node n2

The scenarios common to both families run once per family (the `family`
fixture): IPv4 on IPv4-only nodes, IPv6 on dual-stack nodes (agent.sim
World(dual_stack=True): each pod has an IPv4 and an IPv6 address, an IPv6
default route via the link-local gateway fe80::1, and the node's host routes
and policy-routing rules per family). Each proves the fast path with two
independent witnesses: fastpath's own counters, and the node's forwarding
counter for the family (ForwDatagrams, Ip6OutForwDatagrams), which only
moves when the host stack routes a packet. The scenarios of one family
follow them.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from agent.datapath import Datapath
from agent.sim.agent import AgentProcess, private_paths, register_pod, sim_attach
from agent.sim.traffic import forwarded_datagrams6, tcp_exchange, udp_send
from agent.sim.world import World
from fastpath_helpers import counters_by, forwarded_by_stack, inject_truncated, inject_truncated6


@dataclass(frozen=True)
class Family:
    name: str
    dual_stack: bool                        # the nodes the family's scenarios run on
    addr: str                               # a pod's attribute holding its address
    forwarded: Callable                     # node -> datagrams its stack routed
    inject_truncated: Callable              # pod -> five cut-short frames from it
    endpoints: str                          # the Maps method listing the endpoints
    tag: str                                # marks the payloads of the family

    def ip(self, pod) -> str:
        return getattr(pod, self.addr)

    def exchange_all(self, src, dst) -> None:
        ip, t = self.ip(dst), self.tag
        src.ping(ip, count=3)
        got_srv, got_cli = tcp_exchange(src, dst, ip=ip, request=f"hello{t}", reply=f"world{t}")
        assert (got_srv, got_cli) == (f"hello{t}", f"world{t}")
        assert udp_send(src, dst, ip=ip, payload=f"dns-ish{t}") == f"dns-ish{t}"

    def endpoint_ips(self, maps) -> set[str]:
        return {e.ip for e in getattr(maps, self.endpoints)()}


IPV4 = Family("ipv4", False, "ip", forwarded_by_stack, inject_truncated, "endpoints", "")
IPV6 = Family("ipv6", True, "ip6", forwarded_datagrams6, inject_truncated6, "endpoints6", "6")


@pytest.fixture(params=[IPV4, IPV6], ids=lambda f: f.name)
def family(request) -> Family:
    return request.param


@pytest.fixture
def fworld(family):
    """The world of `family`'s scenarios."""
    with World(dual_stack=family.dual_stack) as w:
        yield w


@pytest.fixture
def world6():
    with World(dual_stack=True) as w:
        yield w


# -- both families ------------------------------------------------------------

def test_pods_on_one_node_talk_through_redirect_peer_not_the_stack(family, fworld):
    node = fworld.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        before = family.forwarded(node)
        family.exchange_all(a, b)
        family.exchange_all(b, a)
        assert family.forwarded(node) == before, "the node's stack forwarded pod traffic"
        rows = agent.datapath.maps.counters()
        ca, cb = counters_by(rows, a.host_ifindex), counters_by(rows, b.host_ifindex)
        # ping 3 + TCP handshake/data/fin + UDP, each way: well over 10 packets
        assert ca[("from-pod", "redirected-local")] >= 10
        assert cb[("from-pod", "redirected-local")] >= 10
        # nothing at all went to the stack (the pods' neighbour discovery
        # counts as passed, like ARP)
        assert ca[("from-pod", "to-stack")] == 0 and cb[("from-pod", "to-stack")] == 0


def test_pods_on_two_nodes_leave_by_their_eni_and_arrive_by_redirect(family, fworld):
    n1, n2 = fworld.add_node("n1", enis=1), fworld.add_node("n2", enis=1)
    a, c = n1.add_pod("a"), n2.add_pod("c")
    with sim_attach(n1) as ag1, sim_attach(n2) as ag2:
        f1, f2 = family.forwarded(n1), family.forwarded(n2)
        family.exchange_all(a, c)
        family.exchange_all(c, a)
        assert family.forwarded(n1) == f1 and family.forwarded(n2) == f2
        c1 = counters_by(ag1.datapath.maps.counters())
        c2 = counters_by(ag2.datapath.maps.counters())
        for c in (c1, c2):
            assert c[("from-pod", "redirected-eni")] >= 10
            assert c[("from-vpc", "redirected-local")] >= 10


def test_forwarding_survives_the_agent_being_killed_and_restarted(family, fworld):
    node = fworld.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with private_paths() as paths:
        proc = AgentProcess(node, paths).start()
        try:
            for p in (a, b):
                register_pod(paths.socket, p)
            family.exchange_all(a, b)
            proc.kill(9)
            # read the pinned maps the dead agent left, as the CLI would
            reader = Datapath(paths.config(), netns=node.netns).load(reader=True)
            try:
                assert family.endpoint_ips(reader.maps) == {family.ip(a), family.ip(b)}
                seen = counters_by(reader.maps.counters(), a.host_ifindex)
                before = family.forwarded(node)
                family.exchange_all(a, b)    # no agent process at all now
                assert family.forwarded(node) == before
                now = counters_by(reader.maps.counters(), a.host_ifindex)
                key = ("from-pod", "redirected-local")
                assert now[key] - seen[key] >= 8, (seen, now)
            finally:
                reader.close()
            proc = AgentProcess(node, paths).start()   # restores from its state dir
            from agent.api import wire
            eps = wire.call(paths.socket, "EndpointList")
            assert sorted(e["ip"] for e in eps) == sorted([a.ip, b.ip])
            family.exchange_all(b, a)
            reader = Datapath(paths.config(), netns=node.netns).load(reader=True)
            try:
                assert family.endpoint_ips(reader.maps) == {family.ip(a), family.ip(b)}
            finally:
                reader.close()
            from agent.datapath import tc
            progs = [f.name for f in tc.list_filters(a.host_ifname, node.netns)]
            assert sorted(progs) == ["fp_from_pod", "fp_to_pod"], progs
        finally:
            proc.kill(9)
            for p in (a, b):
                subprocess.run(["tc", "-n", node.netns, "qdisc", "del", "dev", p.host_ifname,
                                "clsact"], check=False)


def test_truncated_frames_on_a_real_veth_are_dropped_and_counted(family, fworld):
    """The kernel's test run refuses IPv4 frames shorter than an IP header,
    and IPv6 frames shorter than an IPv6 header, so they are proven here,
    written raw onto a pod's eth0."""
    node = fworld.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        family.inject_truncated(a)
        time.sleep(0.2)
        c = counters_by(agent.datapath.maps.counters(), a.host_ifindex)
        assert c[("from-pod", "dropped-invalid-packet")] == 5
        family.exchange_all(a, b)          # and the pod's real traffic still flows


# -- IPv4 ---------------------------------------------------------------------

FOREIGN_DROP = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
int other_drop9999(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);
    struct udphdr *udp = data + sizeof(*eth) + sizeof(*ip);
    if ((void *)(udp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_UNSPEC;
    if (ip->protocol == 17 /* UDP */ && udp->dest == bpf_htons(9999))
        return TC_ACT_SHOT;
    return TC_ACT_UNSPEC;
}
"""


def test_other_tc_filters_still_run_after_fastpath_passes_a_packet(world):
    """A foreign filter at a later priority sees what fastpath hands on (it
    returns TC_ACT_UNSPEC, not TC_ACT_OK), and it survives fastpath's detach,
    as does the clsact qdisc it needs."""
    from bcc import BPF
    from agent.datapath import tc
    node = world.add_node("n1", enis=1)
    a = node.add_pod("a")
    foreign = BPF(text=FOREIGN_DROP)
    fn = foreign.load_func("other_drop9999", BPF.SCHED_CLS)
    tc.attach(a.host_ifname, "ingress", fn.fd, "other_drop9999", 30000, node.netns)

    def node_receives(port: int) -> str:
        srv = node.popen(["nc", "-u", "-l", "-W", "1", "-w", "3", node.ip, str(port)],
                         stdout=subprocess.PIPE, text=True)
        node.wait_port(port, udp=True)
        a.run(["sh", "-c", f"printf x{port} | nc -u -w 1 {node.ip} {port}"], check=False)
        try:
            out, _ = srv.communicate(timeout=5)
        except subprocess.TimeoutExpired:      # nothing arrived
            srv.kill()
            out, _ = srv.communicate()
        return out

    with sim_attach(node) as agent:
        assert node_receives(9998) == "x9998"      # fastpath hands traffic to the node on
        assert node_receives(9999) == ""           # ... and the foreign filter still runs
        c = counters_by(agent.datapath.maps.counters(), a.host_ifindex)
        assert c[("from-pod", "to-stack-fib")] >= 2
    names = {f.name for f in tc.list_filters(a.host_ifname, node.netns)}
    assert names == {"other_drop9999"}, names


# -- IPv6 (dual-stack nodes) --------------------------------------------------

def test_dual_stack_pods_are_registered_with_both_addresses(world6):
    node = world6.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        eps = {e.ip: e.host_ifindex for e in agent.datapath.maps.endpoints6()}
        assert eps == {a.ip6: a.host_ifindex, b.ip6: b.host_ifindex}
        assert {e.ip for e in agent.datapath.maps.endpoints()} == {a.ip, b.ip}


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


def test_pod_churn_keeps_the_ipv6_endpoints_exact(world6):
    """CNI DEL and ADD while the node carries IPv6 traffic: a deleted pod's
    IPv6 address stops being a destination at once, a new pod's becomes one,
    the other pods' traffic never stops."""
    node = world6.add_node("n1", enis=1)
    a, b, c = node.add_pod("a"), node.add_pod("b"), node.add_pod("c")
    with sim_attach(node) as agent:
        IPV6.exchange_all(a, b)
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
        IPV6.exchange_all(a, d)
        IPV6.exchange_all(c, a)
        assert forwarded_datagrams6(node) == f
