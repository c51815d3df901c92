"""Per-packet ClusterIP translation with real traffic on simulated nodes.

    pod a ─┐                       ┌─ pod c (backend on n2)
    pod b ─┴ n1 ═ eth1 ═ vpc ═ eth1 ┴ n2
    (b: backend on n1)

The service maps are written through the datapath's LbMaps in the order
the agent uses (backends, slots, service entry). Clients connect to the VIP
and must get answers that come back *from the VIP* (nc would reject a reply
from the backend's own address for UDP, and TCP would never complete).
"""
from __future__ import annotations

import subprocess

from agent.sim.agent import sim_attach
from fastpath_helpers import counters_by, put_frontend, remove_last_backend, serve_reply

VIP = "192.168.77.10"


def serve_tcp(pod, port: int, reply: str):
    return serve_reply(pod, port, reply)


def tcp_to_vip(client, port: int = 80) -> str:
    return client.run(["sh", "-c", f"printf hi | nc -N -w 3 {VIP} {port}"], check=False,
                      timeout=10).stdout


def test_pods_reach_a_clusterip_whose_backends_are_on_this_and_another_node(world):
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    c = n2.add_pod("c")
    with sim_attach(n1) as ag1, sim_attach(n2):
        lb = ag1.datapath.lb
        # TCP service with one backend on each node; UDP service on n2's pod
        put_frontend(lb, VIP, 80, "TCP", 1, {1: (b.ip, 8080), 2: (c.ip, 8080)})
        put_frontend(lb, VIP, 53, "UDP", 2, {3: (c.ip, 5353)})
        serve_tcp(b, 8080, "from-b")
        serve_tcp(c, 8080, "from-c")
        b.wait_port(8080)
        c.wait_port(8080)
        answers = {tcp_to_vip(a) for _ in range(12)}
        assert answers == {"from-b", "from-c"}, answers

        # UDP request/response: the client only accepts a reply from the VIP
        srv = c.popen(["sh", "-c", f"printf answer | nc -u -l -W 1 -w 5 {c.ip} 5353"],
                      stdout=subprocess.PIPE, text=True)
        c.wait_port(5353, udp=True)
        got = a.run(["sh", "-c", f"printf question | nc -u -W 1 -w 3 {VIP} 53"], check=False,
                    timeout=10).stdout
        out, _ = srv.communicate(timeout=10)
        assert out == "question" and got == "answer", (out, got)

        cnt = counters_by(ag1.datapath.maps.counters(), a.host_ifindex)
        assert cnt[("from-pod", "service-translated")] >= 12
        ct = ag1.datapath.lb.conntrack()
        assert any(r.direction == "reply" and r.nat_addr == VIP for r in ct)


def test_a_backend_removed_under_load_gets_no_new_connections(world):
    n1 = world.add_node("n1", enis=1)
    a, b, d = n1.add_pod("a"), n1.add_pod("b"), n1.add_pod("d")
    with sim_attach(n1) as ag:
        lb = ag.datapath.lb
        put_frontend(lb, VIP, 80, "TCP", 1, {1: (b.ip, 8080), 2: (d.ip, 8080)})
        serve_tcp(b, 8080, "from-b")
        serve_tcp(d, 8080, "from-d")
        b.wait_port(8080)
        d.wait_port(8080)
        assert {tcp_to_vip(a) for _ in range(10)} == {"from-b", "from-d"}
        remove_last_backend(lb, VIP, 80, "TCP", 1, [1, 2])      # d
        assert {tcp_to_vip(a) for _ in range(10)} == {"from-b"}


REFUSE = r"""
import socket, sys, time
t = time.monotonic()
try:
    socket.create_connection((sys.argv[1], 80), timeout=5)
    print("connected")
except OSError as e:
    print(e.errno, round(time.monotonic() - t, 2))
"""


def test_a_service_without_endpoints_is_refused_at_once_not_black_holed(world):
    n1 = world.add_node("n1", enis=1)
    a = n1.add_pod("a")
    with sim_attach(n1) as ag:
        ag.datapath.lb.put_service(VIP, 80, "TCP", 9, 0, 2)     # no slots: reject
        out = a.run(["python3", "-c", REFUSE, VIP], check=False, timeout=15).stdout.split()
        import errno
        assert int(out[0]) == errno.ECONNREFUSED, out
        assert float(out[1]) < 1.0, "refused at once"
        cnt = counters_by(ag.datapath.maps.counters(), a.host_ifindex)
        assert cnt[("from-pod", "dropped-service-no-backend")] >= 1


def test_a_pod_reaches_itself_through_its_own_service(world):
    n1 = world.add_node("n1", enis=1)
    a = n1.add_pod("a")
    with sim_attach(n1) as ag:
        lb = ag.datapath.lb
        put_frontend(lb, VIP, 80, "TCP", 1, {1: (a.ip, 8080)})
        serve_tcp(a, 8080, "myself")
        a.wait_port(8080)
        assert tcp_to_vip(a) == "myself"


SAME_PORT = r"""
import socket, sys
dst, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 47123)); s.settimeout(3)
try:
    s.connect((dst, port)); s.sendall(b"hi"); print(s.recv(100).decode(), s.getpeername()[0])
except OSError as e:
    print("ERROR", e)
finally:
    s.close()
"""


def test_a_direct_connection_after_a_service_one_on_the_same_ports_is_not_hijacked(world):
    n1 = world.add_node("n1", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    with sim_attach(n1) as ag:
        lb = ag.datapath.lb
        put_frontend(lb, VIP, 80, "TCP", 1, {1: (b.ip, 8080)})
        serve_tcp(b, 8080, "from-b")
        assert a.run(["python3", "-c", SAME_PORT, VIP, "80"], timeout=15).stdout.split() == ["from-b", VIP]
        a.sysctl({"net.ipv4.tcp_tw_reuse": 1})
        # same source port, straight to the backend: its SYN-ACK must stay "from b"
        out = a.run(["python3", "-c", SAME_PORT, b.ip, "8080"], timeout=15).stdout.split()
        assert out == ["from-b", b.ip], out
