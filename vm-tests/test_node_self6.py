"""The node's own IPv6 connection to one of its own addresses through a
Service, with real traffic (vm-tests/test_node_self.py's IPv6 twin, on a
dual-stack simulated node): the packets go out of the node's lo, where
fp_lo's IPv6 half translates them to a pod of the node (bpf/eni.c
fp_lo6_run, fp_to_vpc6_node); the pod's replies get the node's address
back in fp_from_pod6 and go up the stack where they arrive (IPv6 input
takes a packet from the node's own address on any device: no turn
through lo, and no sysctl for it).

The production programs take SCTP there; this kernel has no SCTP, so the
agent runs the test build, which takes TCP on lo the same way in both
families (bpf/eni.c FP_LO_PROTO; tests/bpf/test_sctp_node_self.py proves
the production build lets TCP pass), and socket-LB is not attached, so
the node's TCP reaches lo untranslated as its SCTP does.

    node n1 fd00:240::11 (eth0) ─ lo (fp_lo) ─┐
                                              └ cali ── pod b (backend, IPv6;
                                                answers with the client address
                                                it saw and the bytes it received)
"""
from __future__ import annotations

import os
import sys

import yaml

from agent.datapath import tc
from agent.sim.agent import sim_attach
from agent.sim.world import World
from fastpath_helpers import wait_for
from socket_clients import NODE_SELF_CLIENT as CLIENT
from socket_clients import NODE_SELF_SERVER as SERVER
from socket_clients import OFFLOADS_OFF

NODE6, NODE_GW6 = "fd00:240::11", "fd00:240::1"
VIP6, SVC_CIDR6, NODEPORT = "fd00:61::10", "fd00:61::/112", 30190


def manifests(backend) -> str:
    return yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web6", "namespace": "shop"},
         "spec": {"type": "NodePort", "clusterIP": VIP6, "clusterIPs": [VIP6],
                  "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack",
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                             "nodePort": NODEPORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web6-1", "namespace": "shop",
                      "labels": {"kubernetes.io/service-name": "web6"}},
         "addressType": "IPv6", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": [backend.ip6], "conditions": {"ready": True},
                        "nodeName": "n1"}]}], sort_keys=False)


def node_ipv6(n1) -> None:
    """The node's primary IPv6 address on eth0 (the simulated VPC gives
    the node none), where the agent finds its IPv6 NodePort address."""
    n1.iproute("-6", "addr", "add", f"{NODE6}/128", "dev", "eth0", "nodad")
    n1.iproute("-6", "route", "add", NODE_GW6, "dev", "eth0")
    n1.iproute("-6", "route", "add", "default", "via", NODE_GW6, "dev", "eth0")


def connect(node, ip, port, size, timeout=3) -> str:
    return node.run([sys.executable, "-c", CLIENT, ip, str(port), str(size), str(timeout)],
                    check=False, timeout=timeout * 5).stdout.strip()


def programmed(ag) -> bool:
    return (ag.services is not None and ag.services.synced.is_set()
            and ag.services.addresses.nodeport6 == (NODE6,)
            and any(fe.ip == NODE6 and fe.port == NODEPORT
                    for fe in ag.services.reconciler.frontends()))


def lo_counted(ag, reason) -> int:
    return sum(r.packets for r in ag.datapath.maps.counters(by_family=True)
               if (r.ifindex, r.direction, r.reason, r.family) == (1, "to-vpc", reason, "ipv6"))


def test_the_nodes_ipv6_connection_to_its_own_nodeport_is_served_by_a_pod():
    with World(dual_stack=True) as world:
        n1 = world.add_node("n1", enis=1)
        b = n1.add_pod("b")
        node_ipv6(n1)
        b.popen([sys.executable, "-c", SERVER, b.ip6, "8080", "from-b"])
        b.wait_port(8080)
        cidrs = f"192.168.61.0/24,{SVC_CIDR6}"
        # without fastpath nothing listens on the node's NodePort
        assert connect(n1, NODE6, NODEPORT, 2).startswith("ERROR 111")
        with sim_attach(n1, service_cidrs=cidrs, test_build=True) as ag:
            with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
                f.write(manifests(b))
            wait_for(lambda: programmed(ag), "the IPv6 NodePort programmed")
            assert [(f.direction, f.name) for f in tc.list_filters("lo", n1.netns)
                    if f.prio == ag.config.tc_priority] == [("egress", "fp_lo")]
            translated = lo_counted(ag, "service-translated")

            # the backend saw the node's own address; the node's socket got
            # its answer from the NodePort it connected to; sizes past lo's
            # GSO segments and the pod's MTU both ways of the stream
            for size in (2, 1400, 300_000):
                assert connect(n1, NODE6, NODEPORT, size) == \
                    f"from-b {NODE6} {size} {NODE6}", size
            # by fp_lo's IPv6 half: three connections' packets counted there
            assert lo_counted(ag, "service-translated") >= translated + 3 * 3
            # IPv6 needs no turn through lo for the pod's replies, so none of
            # lo's accept_local either (IPv4's needs it: test_node_self.py)
            n1.run(["sysctl", "-qw", "net.ipv4.conf.lo.accept_local=0"])
            assert connect(n1, NODE6, NODEPORT, 1400) == f"from-b {NODE6} 1400 {NODE6}"
            n1.run(["sysctl", "-qw", "net.ipv4.conf.lo.accept_local=1"])
        # the agent's detach took fp_lo off lo with the rest: refused again
        assert [f for f in tc.list_filters("lo", n1.netns) if f.name.startswith("fp_")] == []
        assert connect(n1, NODE6, NODEPORT, 2).startswith("ERROR 111")


def test_the_nodes_ipv6_packets_to_itself_learn_the_path_mtu_of_the_way_out():
    """The node's stack sizes what it sends itself by lo's MTU (65,536): a
    translated packet longer than the pod's link is dropped where fp_lo
    redirects it, unless fp_lo answers ICMPv6 Packet Too Big and the
    stack's path MTU discovery shrinks what it sends (bpf/lib/lo.h).

    As in test_node_self.py, the backend pod advertises a segment size its
    link cannot carry (advmss 8960 over a 1,500-byte veth) and lo's GSO and
    TSO are off, so the node sends each segment whole. Without the answer
    (or with one the node's stack does not take) the 300 KB transfer
    stalls: the connection times out."""
    with World(dual_stack=True) as world:
        n1 = world.add_node("n1", enis=1)
        b = n1.add_pod("b")
        node_ipv6(n1)
        b.run(["ip", "-6", "route", "change", "::/0", "via", world.gateway6, "dev", "eth0",
               "advmss", "8960"])
        b.popen([sys.executable, "-c", SERVER, b.ip6, "8080", "from-b"])
        b.wait_port(8080)
        assert n1.run([sys.executable, "-c", OFFLOADS_OFF]).stdout.split() == ["0", "0"]
        with sim_attach(n1, service_cidrs=f"192.168.61.0/24,{SVC_CIDR6}",
                        test_build=True) as ag:
            with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
                f.write(manifests(b))
            wait_for(lambda: programmed(ag), "the IPv6 NodePort programmed")
            told = lo_counted(ag, "dropped-fragmentation-needed")
            for size, timeout in ((2, 3), (300_000, 30), (300_000, 3)):
                assert connect(n1, NODE6, NODEPORT, size, timeout) == \
                    f"from-b {NODE6} {size} {NODE6}", size
            # the node's stack learnt a path MTU for its own address from
            # fp_lo's Packet Too Big: 8 bytes below the veth's 1,500, as it
            # takes none at or above eth0's 1,500 (lib/lo.h FP_LO6_TOLD_MTU;
            # telling 1,500 itself, the transfer stalled)
            assert "mtu 1492" in n1.run(["ip", "-6", "route", "get", NODE6]).stdout
            assert lo_counted(ag, "dropped-fragmentation-needed") >= told + 1
