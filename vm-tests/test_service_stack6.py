"""An IPv6 ClusterIP whose backend is the node itself (a host-network pod's
address), reached by a pod per packet, on a dual-stack simulated node.

    pod a ─ cali ─ node n1 (the backend: a server on its ENI's IPv6 address)

Pod a's packet is translated on its veth (fp_from_pod6) and delivered by
the node's stack; the node's answer reaches the pod through the stack as
well, out of a's veth, where fp_to_pod6 must put the ClusterIP back: a TCP
connection would never complete otherwise, and the UDP client checks the
source of its answer.
"""
from __future__ import annotations

from agent.sim.agent import sim_attach
from agent.sim.world import World
from fastpath_helpers import counters_by
from test_service_traffic6 import ask, serve

VIP6 = "fd00:78::10"


def test_a_pod_reaches_an_ipv6_clusterip_served_by_the_node_itself():
    with World(dual_stack=True) as w:
        n1 = w.add_node("n1", enis=1)
        a = n1.add_pod("a")
        host6 = n1.eni(1).ip6
        with sim_attach(n1) as ag:
            lb = ag.datapath.lb
            lb.put_backend(1, host6, 8080, "TCP")
            lb.put_backend(2, host6, 5353, "UDP")
            lb.put_slots(1, [1])
            lb.put_service(VIP6, 80, "TCP", 1, 1)
            lb.put_slots(2, [2])
            lb.put_service(VIP6, 53, "UDP", 2, 1)
            serve(n1, host6, 8080, "from-node")
            serve(n1, host6, 5353, "udp-node", "udp")
            for _ in range(3):
                # the server saw the pod's own address; the pod, the ClusterIP
                assert ask(a, VIP6, 80) == ["from-node", a.ip6, "from", VIP6, "80"]
                assert ask(a, VIP6, 53, "udp") == ["udp-node", a.ip6, "from", VIP6, "53"]
            cnt = counters_by(ag.datapath.maps.counters(), a.host_ifindex)
            assert cnt[("from-pod", "service-translated")] >= 6
            assert cnt[("to-pod", "service-reply-restored")] >= 6
