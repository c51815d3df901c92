"""The node's own TCP and UDP to Services with socket-LB off, with real
traffic: nothing translates them at connect(), so the production programs
do per packet (bpf/eni.c fp_to_vpc_node on the way out of the node's
interface, fp_lo for the node's own addresses; the replies get the frontend
back in fp_from_vpc and fp_from_pod).

    node n1 ── cali ── pod b (backend of `near`, and of the NodePort)
       └ eth1 ═ vpc ═ eth1 ─ n2 ── pod c (backend of `far`)

and in IPv6 on a dual-stack node, with a local backend.
"""
from __future__ import annotations

import os
import sys

import yaml

from agent.sim.agent import sim_attach
from fastpath_helpers import counters_by, wait_for
from socket_clients import NODE_SELF_CLIENT as CLIENT
from socket_clients import NODE_SELF_SERVER as SERVER

NEAR, FAR, NONE = "192.168.62.10", "192.168.62.11", "192.168.62.12"
NODEPORT = 30182

# a connected UDP socket's question and the answer it gets (or the errno
# the node's stack reports for it: ICMP port unreachable, ECONNREFUSED)
UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
size = int(sys.argv[3]) if len(sys.argv) > 3 else 8
try:
    s.send(b"q" * size)
    print(s.recv(2048).decode(), s.getpeername()[0])
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print(f"ERROR {e.errno}")
"""

UDP_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, addr = s.recvfrom(65536)
    s.sendto(f"{sys.argv[3]} {addr[0]} {len(data)}".encode(), addr)
"""

# a TCP connect's errno and how long it took
REFUSE = r"""
import socket, sys, time
t = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print("connected")
except OSError as e:
    print(e.errno, round(time.monotonic() - t, 2))
"""


def manifests(b, c) -> str:
    def svc(name, ip, typ="ClusterIP", nodeport=None):
        ports = [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                 {"name": "udp", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
        if nodeport:
            ports[0]["nodePort"] = nodeport
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"type": typ, "clusterIP": ip, "ports": ports}}

    def eps(name, pod, node):
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-1", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"},
                          {"name": "udp", "port": 5353, "protocol": "UDP"}],
                "endpoints": [{"addresses": [pod.ip], "conditions": {"ready": True},
                               "nodeName": node}]}
    return yaml.safe_dump_all([svc("near", NEAR, "NodePort", NODEPORT), eps("near", b, "n1"),
                               svc("far", FAR), eps("far", c, "n2"), svc("none", NONE)],
                              sort_keys=False)


def tcp(node, ip, port, size):
    return node.run([sys.executable, "-c", CLIENT, ip, str(port), str(size), "5"],
                    check=False, timeout=30).stdout.strip()


def udp(node, ip, port=53, size=8):
    return node.run([sys.executable, "-c", UDP_CLIENT, ip, str(port), str(size)], check=False,
                    timeout=15).stdout.strip()


def test_the_nodes_own_tcp_and_udp_reach_services_with_socket_lb_off(world):
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    b, c = n1.add_pod("b"), n2.add_pod("c")
    for pod, name in ((b, "from-b"), (c, "from-c")):
        pod.popen([sys.executable, "-c", SERVER, pod.ip, "8080", name])
        pod.popen([sys.executable, "-c", UDP_SERVER, pod.ip, "5353", name])
        pod.wait_port(8080)
        pod.wait_port(5353, udp=True)
    with sim_attach(n1, socket_lb=False, service_cidrs="192.168.62.0/24") as ag, \
            sim_attach(n2, socket_lb=False):
        assert not ag.config.socket_lb and not ag.datapath.options.test_build
        with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
            f.write(manifests(b, c))
        wait_for(lambda: ag.services is not None and ag.services.synced.is_set()
                 and len(ag.services.reconciler.frontends()) >= 7, "services programmed")

        # TCP: the backend saw the node's own address, the node's socket
        # its answer from the ClusterIP it connected to; a stream longer
        # than a segment both ways
        for size in (2, 300_000):
            assert tcp(n1, NEAR, 80, size) == f"from-b {n1.ip} {size} {NEAR}", size
            assert tcp(n1, FAR, 80, size) == f"from-c {n1.ip} {size} {FAR}", size
        # UDP: a connected socket takes the answer only from the ClusterIP
        assert udp(n1, NEAR) == f"from-b {n1.ip} 8 {NEAR}"
        assert udp(n1, FAR) == f"from-c {n1.ip} 8 {FAR}"
        # a datagram the node's stack sends in fragments: each follows the
        # first one's translation, the backend gets it whole
        for vip, who in ((NEAR, "from-b"), (FAR, "from-c")):
            assert udp(n1, vip, size=4000) == f"{who} {n1.ip} 4000 {vip}", vip
        # the node's own NodePort, through lo
        assert tcp(n1, n1.ip, NODEPORT, 1000) == f"from-b {n1.ip} 1000 {n1.ip}"

        # no endpoints: refused at once, a TCP connect and a UDP socket
        import errno
        out = n1.run([sys.executable, "-c", REFUSE, NONE, "80"], check=False,
                     timeout=15).stdout.split()
        assert int(out[0]) == errno.ECONNREFUSED, out
        assert float(out[1]) < 1.0, "refused at once"
        assert udp(n1, NONE) == f"ERROR {errno.ECONNREFUSED}"

        cnt = counters_by(ag.datapath.maps.counters(), n1.eth0.ifindex)
        assert cnt[("to-vpc", "service-translated")] >= 4
        assert cnt[("to-vpc", "dropped-service-no-backend")] >= 2


# -- IPv6, on a dual-stack node ---------------------------------------------------

NODE6, NODE_GW6 = "fd00:240::11", "fd00:240::1"
NEAR6, NONE6, SVC_CIDR6, NODEPORT6 = "fd00:62::10", "fd00:62::12", "fd00:62::/112", 30183

UDP6_CLIENT = UDP_CLIENT.replace("socket.AF_INET,", "socket.AF_INET6,")
UDP6_SERVER = UDP_SERVER.replace("socket.AF_INET,", "socket.AF_INET6,")


def manifests6(b) -> str:
    ports = [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP",
              "nodePort": NODEPORT6},
             {"name": "udp", "port": 53, "targetPort": 5353, "protocol": "UDP"}]

    def svc(name, ip, typ):
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name,
                                                                   "namespace": "shop"},
                "spec": {"type": typ, "clusterIP": ip, "clusterIPs": [ip],
                         "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack",
                         "ports": ports if typ == "NodePort" else
                         [dict(p, nodePort=None) for p in ports]}}
    near, none = svc("near6", NEAR6, "NodePort"), svc("none6", NONE6, "ClusterIP")
    for p in none["spec"]["ports"]:
        p.pop("nodePort")
    return yaml.safe_dump_all([
        near, none,
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "near6-1", "namespace": "shop",
                      "labels": {"kubernetes.io/service-name": "near6"}},
         "addressType": "IPv6",
         "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"},
                   {"name": "udp", "port": 5353, "protocol": "UDP"}],
         "endpoints": [{"addresses": [b.ip6], "conditions": {"ready": True},
                        "nodeName": "n1"}]}], sort_keys=False)


def test_the_nodes_own_ipv6_tcp_and_udp_reach_services_with_socket_lb_off():
    import errno
    from agent.sim.world import World
    with World(dual_stack=True) as world:
        n1 = world.add_node("n1", enis=1)
        b = n1.add_pod("b")
        # the node's primary IPv6 address (the simulated VPC gives it none)
        n1.iproute("-6", "addr", "add", f"{NODE6}/128", "dev", "eth0", "nodad")
        n1.iproute("-6", "route", "add", NODE_GW6, "dev", "eth0")
        n1.iproute("-6", "route", "add", "default", "via", NODE_GW6, "dev", "eth0")
        # (nothing on the VPC side answers for that gateway: a neighbour of
        # its own, or the node's packets would wait for one and never meet
        # eth0's egress program)
        n1.iproute("-6", "neigh", "add", NODE_GW6, "lladdr", "02:00:00:00:02:54", "dev", "eth0",
                   "nud", "permanent")
        b.popen([sys.executable, "-c", SERVER, b.ip6, "8080", "from-b"])
        b.popen([sys.executable, "-c", UDP6_SERVER, b.ip6, "5353", "from-b"])
        b.wait_port(8080)
        with sim_attach(n1, socket_lb=False,
                        service_cidrs=f"192.168.62.0/24,{SVC_CIDR6}") as ag:
            assert not ag.datapath.options.test_build
            with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
                f.write(manifests6(b))
            wait_for(lambda: ag.services is not None and ag.services.synced.is_set()
                     and any(fe.ip == NODE6 and fe.port == NODEPORT6
                             for fe in ag.services.reconciler.frontends()),
                     "the IPv6 services programmed")
            for size in (2, 300_000):
                assert tcp(n1, NEAR6, 80, size) == f"from-b {NODE6} {size} {NEAR6}", size
            got = n1.run([sys.executable, "-c", UDP6_CLIENT, NEAR6, "53", "4000"],
                         check=False, timeout=15).stdout.strip()
            assert got == f"from-b {NODE6} 4000 {NEAR6}"
            # the node's own IPv6 NodePort, through lo
            assert tcp(n1, NODE6, NODEPORT6, 1000) == f"from-b {NODE6} 1000 {NODE6}"
            # no endpoints: refused, not left to time out; TCP at its first
            # SYN retransmission (the ICMPv6 error reaches the stack while
            # connect() still holds the socket, and IPv6 TCP only notes it
            # then; IPv4 refuses at once, above)
            out = n1.run([sys.executable, "-c", REFUSE, NONE6, "80"], check=False,
                         timeout=15).stdout.split()
            assert int(out[0]) == errno.ECONNREFUSED, out
            assert float(out[1]) < 2.0, "refused at the first retransmission"
            got = n1.run([sys.executable, "-c", UDP6_CLIENT, NONE6, "53"], check=False,
                         timeout=15).stdout.strip()
            assert got == f"ERROR {errno.ECONNREFUSED}"
