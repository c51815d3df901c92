"""Fast redirect with real traffic on simulated Terway nodes.

    pod a ─ cali ┐                    ┌ cali ─ pod c
    pod b ─ cali ┴ node n1 ─ eth1 ═ vpc ═ eth1 ─ node n2

Each test proves the fast path with two independent witnesses: fastpath's
own counters, and the node's IP forwarding counter (ForwDatagrams), which
only moves when the host stack routes a packet.
"""
from __future__ import annotations

import subprocess
import time

from agent.datapath import Datapath
from agent.sim.agent import AgentProcess, private_paths, register_pod, sim_attach
from agent.sim.traffic import tcp_exchange, udp_send
from fastpath_helpers import counters_by, forwarded_by_stack, inject_truncated


def exchange_all(src, dst):
    src.ping(dst.ip, count=3)
    got_srv, got_cli = tcp_exchange(src, dst, request="hello", reply="world")
    assert (got_srv, got_cli) == ("hello", "world")
    assert udp_send(src, dst, payload="dns-ish") == "dns-ish"


def test_pods_on_one_node_talk_through_redirect_peer_not_the_stack(world):
    node = world.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        before = forwarded_by_stack(node)
        exchange_all(a, b)
        exchange_all(b, a)
        assert forwarded_by_stack(node) == before, "the node's stack forwarded pod traffic"
        rows = agent.datapath.maps.counters()
        ca, cb = counters_by(rows, a.host_ifindex), counters_by(rows, b.host_ifindex)
        # ping 3 + TCP handshake/data/fin + UDP, each way: well over 10 packets
        assert ca[("from-pod", "redirected-local")] >= 10
        assert cb[("from-pod", "redirected-local")] >= 10
        assert ca[("from-pod", "to-stack")] == 0 and cb[("from-pod", "to-stack")] == 0


def test_pods_on_two_nodes_leave_by_their_eni_and_arrive_by_redirect(world):
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, c = n1.add_pod("a"), n2.add_pod("c")
    with sim_attach(n1) as ag1, sim_attach(n2) as ag2:
        f1, f2 = forwarded_by_stack(n1), forwarded_by_stack(n2)
        exchange_all(a, c)
        exchange_all(c, a)
        assert forwarded_by_stack(n1) == f1 and forwarded_by_stack(n2) == f2
        c1 = counters_by(ag1.datapath.maps.counters())
        c2 = counters_by(ag2.datapath.maps.counters())
        for c in (c1, c2):
            assert c[("from-pod", "redirected-eni")] >= 10
            assert c[("from-vpc", "redirected-local")] >= 10


def test_forwarding_survives_the_agent_being_killed_and_restarted(world):
    node = world.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with private_paths() as paths:
        proc = AgentProcess(node, paths).start()
        try:
            for p in (a, b):
                register_pod(paths.socket, p)
            exchange_all(a, b)
            proc.kill(9)
            # read the pinned maps the dead agent left, as the CLI would
            reader = Datapath(paths.config(), netns=node.netns).load(reader=True)
            try:
                assert {e.ip for e in reader.maps.endpoints()} == {a.ip, b.ip}
                seen = counters_by(reader.maps.counters(), a.host_ifindex)
                before = forwarded_by_stack(node)
                exchange_all(a, b)           # no agent process at all now
                assert forwarded_by_stack(node) == before
                now = counters_by(reader.maps.counters(), a.host_ifindex)
                key = ("from-pod", "redirected-local")
                assert now[key] - seen[key] >= 8, (seen, now)
            finally:
                reader.close()
            proc = AgentProcess(node, paths).start()   # restores from its state dir
            from agent.api import wire
            eps = wire.call(paths.socket, "EndpointList")
            assert sorted(e["ip"] for e in eps) == sorted([a.ip, b.ip])
            exchange_all(b, a)
            from agent.datapath import tc
            progs = [f.name for f in tc.list_filters(a.host_ifname, node.netns)]
            assert sorted(progs) == ["fp_from_pod", "fp_to_pod"], progs
        finally:
            proc.kill(9)
            subprocess.run(["tc", "-n", node.netns, "qdisc", "del", "dev", a.host_ifname,
                            "clsact"], check=False)


def test_truncated_ipv4_frames_on_a_real_veth_are_dropped_and_counted(world):
    """The kernel's test run refuses IPv4 frames shorter than an IP header,
    so they are proven here, written raw onto a pod's eth0."""
    node = world.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        inject_truncated(a)
        time.sleep(0.2)
        c = counters_by(agent.datapath.maps.counters(), a.host_ifindex)
        assert c[("from-pod", "dropped-invalid-packet")] == 5


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
