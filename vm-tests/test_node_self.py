"""The node's own connection to one of its own addresses through a Service,
with real traffic: the delivery of the replies back into the node's socket
(bpf/lib/lo.h). The packets go out of the node's lo, where fp_lo translates
them to a pod of the node; the pod's replies get the node's own address
back in fp_from_pod / fp_pod_route and can then reach the node's socket only
through lo's ingress with lo's accept_local, which the agent sets.

The production programs take SCTP there; this kernel has no SCTP, so the
agent runs the test build, which takes TCP on lo the same way (bpf/eni.c
FP_LO_PROTO), and socket-LB is not attached, so the node's TCP reaches lo
untranslated as its SCTP does. The SCTP translation itself is proven by BPF
test runs (tests/bpf/test_sctp_node_self.py).

    node n1 10.240.0.11 ─ lo (fp_lo) ─┐
                                      └ cali ── pod b (backend, answers with
                                                the client address it saw and
                                                the bytes it received)
"""
from __future__ import annotations

import os
import sys

import yaml

from agent.datapath import tc
from agent.sim.agent import sim_attach
from fastpath_helpers import wait_for
from socket_clients import NODE_SELF_CLIENT as CLIENT
from socket_clients import NODE_SELF_SERVER as SERVER
from socket_clients import OFFLOADS_OFF

VIP, NODEPORT = "192.168.61.10", 30180


def manifests(backend) -> str:
    return yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"type": "NodePort", "clusterIP": VIP,
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                             "nodePort": NODEPORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "shop",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": [backend.ip], "conditions": {"ready": True},
                        "nodeName": "n1"}]}], sort_keys=False)


def connect(node, ip, port, size, timeout=3) -> str:
    return node.run([sys.executable, "-c", CLIENT, ip, str(port), str(size), str(timeout)],
                    check=False, timeout=timeout * 5).stdout.strip()


def accept_local(node) -> str:
    return node.run(["sysctl", "-n", "net.ipv4.conf.lo.accept_local"]).stdout.strip()


def test_the_nodes_connection_to_its_own_nodeport_gets_its_replies_through_lo(world):
    n1 = world.add_node("n1", enis=1)
    b = n1.add_pod("b")
    b.popen([sys.executable, "-c", SERVER, b.ip, "8080", "from-b"])
    b.wait_port(8080)
    assert accept_local(n1) == "0"
    with sim_attach(n1, service_cidrs="192.168.61.0/24", test_build=True) as ag:
        with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
            f.write(manifests(b))
        wait_for(lambda: ag.services is not None and ag.services.synced.is_set()
                 and len(ag.services.reconciler.frontends()) >= 2, "services programmed")
        assert ag.loopback == "lo"
        assert [(f.direction, f.name) for f in tc.list_filters("lo", n1.netns)
                if f.prio == ag.config.tc_priority] == [("egress", "fp_lo")]
        assert accept_local(n1) == "1"

        # the backend saw the node's own address; the node's socket got its
        # answer from the NodePort it connected to; sizes past lo's GSO
        # segments and the pod's MTU both ways of the stream
        for size in (2, 1400, 300_000):
            assert connect(n1, n1.ip, NODEPORT, size) == f"from-b {n1.ip} {size} {n1.ip}"

        # the replies need lo's accept_local: without it the node's stack
        # drops them as martians and the connection never completes
        n1.run(["sysctl", "-qw", "net.ipv4.conf.lo.accept_local=0"])
        try:
            assert connect(n1, n1.ip, NODEPORT, 2) == "TIMEOUT"
        finally:
            n1.run(["sysctl", "-qw", "net.ipv4.conf.lo.accept_local=1"])
        assert connect(n1, n1.ip, NODEPORT, 2) == f"from-b {n1.ip} 2 {n1.ip}"

        # an agent restart (the same programs, reused) leaves lo as it is
        # and sets the sysctl again
        n1.run(["sysctl", "-qw", "net.ipv4.conf.lo.accept_local=0"])
        before = [f.prog_id for f in tc.list_filters("lo", n1.netns)]
        assert ag.datapath.attach_lo() == "lo"
        assert [f.prog_id for f in tc.list_filters("lo", n1.netns)] == before
        assert accept_local(n1) == "1"
        from agent.daemon.health import readiness
        assert ("programs-attached", True) in [(c[0], c[1]) for c in readiness(ag)]
    # the agent's detach took fp_lo off lo with the rest
    assert [f for f in tc.list_filters("lo", n1.netns) if f.name.startswith("fp_")] == []


def test_the_nodes_packets_to_itself_learn_the_path_mtu_of_the_way_out(world):
    """The node's stack sizes what it sends itself by lo's MTU (65,536): a
    translated packet longer than the pod's link is dropped where fp_lo
    redirects it, unless fp_lo answers "fragmentation needed" and the
    stack's path MTU discovery shrinks what it sends (bpf/lib/lo.h).

    The production case is SCTP, which negotiates no segment size; the
    stand-in here is the test build's TCP, whose segment size the peer's MSS
    would keep within the link, so the backend pod advertises one its link
    cannot carry (advmss 8960 over a 1,500-byte veth), and lo's GSO and TSO
    are off, so the node sends each segment whole. Without the answer the
    300 KB transfer stalls (the connection times out)."""
    from agent.sim import plan
    n1 = world.add_node("n1", enis=1)
    b = n1.add_pod("b")
    b.run(["ip", "route", "change", "default", "via", plan.POD_GATEWAY, "dev", "eth0", "onlink",
           "advmss", "8960"])
    b.popen([sys.executable, "-c", SERVER, b.ip, "8080", "from-b"])
    b.wait_port(8080)
    assert n1.run([sys.executable, "-c", OFFLOADS_OFF]).stdout.split() == ["0", "0"]
    with sim_attach(n1, service_cidrs="192.168.61.0/24", test_build=True) as ag:
        with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
            f.write(manifests(b))
        wait_for(lambda: ag.services is not None and ag.services.synced.is_set()
                 and len(ag.services.reconciler.frontends()) >= 2, "services programmed")
        # (the first large transfer takes seconds: the node's socket to its
        # own address holds a route the kernel does not cache, so the error's
        # new path MTU reaches the socket only when its retransmission timer
        # drops that route; the next connection starts with it)
        for size, timeout in ((2, 3), (300_000, 30), (300_000, 3)):
            assert connect(n1, n1.ip, NODEPORT, size, timeout) == \
                f"from-b {n1.ip} {size} {n1.ip}", size
        # the node's stack learnt the veth's MTU for its own address
        assert "mtu 1500" in n1.run(["ip", "route", "get", n1.ip]).stdout
        told = [r for r in ag.datapath.maps.counters()
                if (r.ifindex, r.direction, r.reason) == (1, "to-vpc",
                                                          "dropped-fragmentation-needed")]
        assert told and told[0].packets >= 1
