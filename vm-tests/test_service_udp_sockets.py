"""Connected UDP sockets that socket-LB sent to a backend, when that backend
leaves the Service: the agent closes them (sock_diag SOCK_DESTROY), so the
application's next send() fails instead of going to the dead backend, and a
reconnect to the VIP reaches a live one. Real sockets in the node's netns
and in a pod's netns, socket-LB for all sockets on the test's own cgroup,
the agent's own pipeline from manifests.

    node / pod a (clients, cgroup fp-test-*) --connect(VIP:53/udp)--> b1 | b2 :5353
"""
from __future__ import annotations

import os
import time

from agent.sim import manifests as mf
from agent.sim.agent import sim_attach
from socket_clients import LineClient, send_until_closed

VIP = "192.168.66.53"

# Replies with its name; prints one line per datagram it received.
SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5353))
while True:
    data, peer = s.recvfrom(100)
    print(data.decode(), flush=True)
    s.sendto(sys.argv[2].encode(), peer)
"""

def manifests(*backends: str) -> list[dict]:
    return [mf.service("default", "dns", VIP, 53, 5353, "dns", "UDP"),
            mf.endpoint_slice("default", "dns", 5353, [(ip, "ready", "n1") for ip in backends],
                              "dns", "UDP")]


class Server:
    def __init__(self, pod):
        self.pod = pod
        self.log = open(f"/tmp/fp-udp-{os.getpid()}-{pod.name}.log", "w+")
        pod.popen(["python3", "-c", SERVER, pod.ip, pod.name], stdout=self.log)
        pod.wait_port(5353, udp=True)

    def received(self) -> list[str]:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read().split()

    def close(self):
        self.log.close()
        os.unlink(self.log.name)


def test_connected_udp_sockets_of_a_removed_backend_are_closed(world, cgroup):
    node = world.add_node("n1", enis=1)
    a, b1, b2 = node.add_pod("a"), node.add_pod("b1"), node.add_pod("b2")
    s1, s2 = Server(b1), Server(b2)
    clients = []
    try:
        with sim_attach(node, socket_lb=True, socket_lb_hostns_only=False,
                        cgroup_root=cgroup) as agent:
            mf.write(agent.config.source, "dns.yaml", manifests(b1.ip))
            deadline = time.monotonic() + 15
            while not agent.datapath.lb.services() and time.monotonic() < deadline:
                time.sleep(0.1)
            host, pod, direct = LineClient(node, cgroup), LineClient(a, cgroup), LineClient(node, cgroup)
            # outside the socket-LB cgroup: translated per packet, with conntrack
            packet = LineClient(a, None)
            clients = [host, pod, direct, packet]
            assert packet(f"connect {VIP} 53") == f"ok {VIP} 53"
            assert packet("send k0") == "ok b1"
            lb = agent.datapath.lb
            assert {r.direction for r in lb.conntrack() if b1.ip in (r.saddr, r.nat_addr)} == {
                "forward", "reply"}
            assert host(f"connect {VIP} 53") == f"ok {VIP} 53"
            assert pod(f"connect {VIP} 53") == f"ok {VIP} 53"
            assert direct(f"connect {b1.ip} 5353") == f"ok {b1.ip} 5353"
            assert host("send h0") == "ok b1"
            assert pod("send p0") == "ok b1"
            assert direct("send d0") == "ok b1"
            assert not [r for r in lb.conntrack() if r.saddr not in (a.ip, b1.ip)], \
                "the cgroup's sockets were translated at the socket"

            # b1 leaves the Service; b2 takes over
            mf.write(agent.config.source, "dns.yaml", manifests(b2.ip))
            results = send_until_closed({"h": host, "p": pod}, "ok b1")
            # closed: the next send fails (EDESTADDRREQ: the socket was disconnected)
            assert results == {"h": "err 89", "p": "err 89"}, results
            seen = s1.received()
            for c, tag in ((host, "h"), (pod, "p")):
                assert c(f"send {tag}-after") == "err 89"
            time.sleep(0.3)
            assert s1.received() == seen, "nothing reached the removed backend"
            # per packet: b1's conntrack entries are gone (both directions) and
            # the flow's next datagram goes to b2 on the same socket
            deadline = time.monotonic() + 5
            while [r for r in lb.conntrack() if b1.ip in (r.saddr, r.nat_addr)]:
                assert time.monotonic() < deadline, lb.conntrack()
                time.sleep(0.05)
            assert packet("send k1") == "ok b2"
            # a reconnect to the VIP reaches the surviving backend
            assert host(f"connect {VIP} 53") == f"ok {VIP} 53"
            assert host("send h-new") == "ok b2"
            assert pod(f"connect {VIP} 53") == f"ok {VIP} 53"
            assert pod("send p-new") == "ok b2"
            # a socket the application connected to b1's own address is its business
            assert direct("send d1") == "ok b1"
            agent.datapath.detach_socket_lb(cgroup)
    finally:
        for c in clients:
            c.close()
        s1.close()
        s2.close()
