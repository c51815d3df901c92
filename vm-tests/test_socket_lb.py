"""Socket-LB with real sockets: cgroup sock_addr hooks on the test's own
cgroup v2 child (never the root cgroup), clients in a simulated node's netns
and in a pod's netns.

    client (node netns or pod netns, in cgroup fp-test-*)
        connect(VIP:80) --[fp_sock_conn4]--> backend pod b:8080
"""
from __future__ import annotations

import time

from agent.sim.agent import sim_attach
from fastpath_helpers import flows_created, serve_reply
from socket_clients import one_shot

VIP = "192.168.88.10"
FLAGS_REJECT = 2

def serve(pod, port: int, reply: str, udp: bool = False):
    if udp:
        return pod.popen(["sh", "-c", f"while true; do printf {reply} | nc -u -l -W 1 -w 3 {pod.ip} {port}; done"])
    return serve_reply(pod, port, reply)


def program_service(lb, b):
    lb.put_backend(1, b.ip, 8080, "TCP")
    lb.put_backend(2, b.ip, 5353, "UDP")
    lb.put_slots(1, [1])
    lb.put_service(VIP, 80, "TCP", 1, 1)
    lb.put_slots(2, [2])
    lb.put_service(VIP, 53, "UDP", 2, 1)
    lb.put_service(VIP, 81, "TCP", 3, 0, FLAGS_REJECT)
    lb.put_service(VIP, 54, "UDP", 4, 0, FLAGS_REJECT)
    # the VIP is a live ClusterIP: its other ports are refused too
    from agent.lb.svcnet import FLAG_CLUSTER_IP
    lb.svcnet_put(f"{VIP}/32", FLAG_CLUSTER_IP)


def test_host_sockets_reach_a_clusterip_and_still_see_the_vip(world, cgroup):
    node = world.add_node("n1", enis=1)
    b = node.add_pod("b")
    with sim_attach(node) as agent:
        program_service(agent.datapath.lb, b)
        progs = agent.datapath.attach_socket_lb(cgroup, hostns_only=True)
        assert {p.name for p in progs} == {"fp_sock_conn4", "fp_sock_send4",
                                           "fp_sock_recv4", "fp_sock_peer4",
                                           "fp_sock_conn6", "fp_sock_send6",
                                           "fp_sock_recv6", "fp_sock_peer6"}
        serve(b, 8080, "from-b")
        serve(b, 5353, "answer", udp=True)
        b.wait_port(8080)
        b.wait_port(5353, udp=True)
        created = flows_created(agent.datapath.lb)
        assert one_shot(node, cgroup, VIP, "80", "tcp") == f"from-b {VIP} 80"
        assert one_shot(node, cgroup, VIP, "53", "udp") == f"answer {VIP} 53"
        # translated at the socket: no packet needed translating
        assert agent.datapath.lb.conntrack() == []
        assert flows_created(agent.datapath.lb) == created
        # no endpoint: refused at once with ECONNREFUSED, as a rejecting
        # kube-proxy rule is seen (bpf_set_retval; this kernel has it)
        assert agent.datapath.options.set_retval
        for port, proto in (("81", "tcp"), ("54", "udp"), ("9999", "tcp"), ("9999", "udp")):
            t = time.monotonic()
            out = one_shot(node, cgroup, VIP, port, proto)
            assert out == "ERROR 111 Connection refused", (port, proto, out)
            assert time.monotonic() - t < 2.5
        agent.datapath.detach_socket_lb(cgroup)
        from agent.datapath import cgroup as cg
        assert [p for p in cg.attached(cgroup) if p.ours] == []


def test_host_namespace_only_leaves_pod_sockets_to_the_per_packet_path(world, cgroup):
    node = world.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with sim_attach(node) as agent:
        lb = agent.datapath.lb
        program_service(lb, b)
        agent.datapath.attach_socket_lb(cgroup, hostns_only=True)
        serve(b, 8080, "from-b")
        b.wait_port(8080)
        created = flows_created(lb)
        assert one_shot(a, cgroup, VIP, "80", "tcp") == f"from-b {VIP} 80"
        assert flows_created(lb) == created + 1, "the pod's flow was translated per packet"
        lb.conntrack_flush()
        agent.datapath.attach_socket_lb(cgroup, hostns_only=False)   # re-attach: no gap, no double
        from agent.datapath import cgroup as cg
        assert sorted(p.name for p in cg.attached(cgroup) if p.ours) == sorted(
            ["fp_sock_conn4", "fp_sock_send4", "fp_sock_recv4", "fp_sock_peer4",
             "fp_sock_conn6", "fp_sock_send6", "fp_sock_recv6", "fp_sock_peer6"])
        created = flows_created(lb)
        assert one_shot(a, cgroup, VIP, "80", "tcp") == f"from-b {VIP} 80"
        assert flows_created(lb) == created, "socket-LB for all sockets: nothing per packet"
        assert lb.conntrack() == []
        agent.datapath.detach_socket_lb(cgroup)


def test_client_ip_affinity_at_the_socket_keeps_the_nodes_connections_on_one_backend(
        world, cgroup):
    """sessionAffinity: ClientIP for the node's own sockets: every
    connection to the ClusterIP goes to the backend the first one got,
    for as long as the affinity lasts; without affinity both backends
    are used. (Affinity at the socket is per network namespace.)"""
    node = world.add_node("n1", enis=1)
    b, c = node.add_pod("b"), node.add_pod("c")
    from agent.lb.reconcile import FLAG_AFFINITY
    with sim_attach(node) as agent:
        lb = agent.datapath.lb
        lb.put_backend(11, b.ip, 8080, "TCP")
        lb.put_backend(12, c.ip, 8080, "TCP")
        lb.put_slots(7, [11, 12])
        lb.put_service(VIP, 80, "TCP", 7, 2)
        serve(b, 8080, "from-b")
        serve(c, 8080, "from-c")
        b.wait_port(8080)
        c.wait_port(8080)
        agent.datapath.attach_socket_lb(cgroup, hostns_only=True)
        try:
            seen = {one_shot(node, cgroup, VIP, "80", "tcp").split()[0] for _ in range(16)}
            assert seen == {"from-b", "from-c"}, seen
            lb.put_service(VIP, 80, "TCP", 7, 2, FLAG_AFFINITY, affinity_timeout=600)
            seen = [one_shot(node, cgroup, VIP, "80", "tcp").split()[0] for _ in range(10)]
            assert len(set(seen)) == 1 and seen[0] in ("from-b", "from-c"), seen
        finally:
            agent.datapath.detach_socket_lb(cgroup)
