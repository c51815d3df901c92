"""Socket-LB for IPv6 and dual-stack Services with real sockets, on a
dual-stack simulated node: the hooks on the test's own cgroup v2 child
(never the root cgroup), clients in the node's netns and in a pod's.

The Services are written the agent's way: Service and EndpointSlice objects
-> agent.lb.table -> the reconciler's plan -> agent.daemon.services.apply_ops
into the real maps, both families in one plan.

    client (cgroup fp-test-*)  connect([VIP6]:80) --[fp_sock_conn6]--> [b6]:8080
                               connect(::ffff:VIP4) --[fp_sock_conn6, IPv4 maps]--> ::ffff:b4
"""
from __future__ import annotations

import time

from agent.daemon.services import apply_ops
from agent.datapath.maps import netns_cookie
from agent.lb.reconcile import Reconciler
from agent.lb.svcnet import entries as svcnet_entries
from agent.lb.table import ServiceTable
from agent.sim import manifests as mf
from agent.sim.agent import AgentProcess, private_paths, sim_attach
from agent.sim.cgroups import private_mount as private_cgroup
from agent.sim.world import World
from fastpath_helpers import flows_created, wait_for
from socket_clients import LineClient, Load, one_shot, send_until_closed

from tests.lb.lbdata import ep, eslice, service, snapshot

VIP4, VIP6 = "192.168.66.10", "fd00:66::10"
NOAFF6, EMPTY6 = "fd00:66::11", "fd00:66::12"

# TCP and UDP on one dual-stack socket each (IPv4 clients arrive mapped):
# each answer is `reply` and the client's address as the server saw it.
SERVER = r"""
import socket, sys, threading
port, reply = int(sys.argv[1]), sys.argv[2]
def tcp():
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64)
    while True:
        c, a = s.accept()
        c.recv(100); c.sendall(f"{reply} {a[0]}".encode()); c.close()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port + 1))
    while True:
        d, a = s.recvfrom(100); s.sendto(f"{reply} {a[0]}".encode(), a)
threading.Thread(target=udp, daemon=True).start()
tcp()
"""

def serve(pod, reply: str):
    p = pod.popen(["python3", "-c", SERVER, "8080", reply])
    pod.wait_port(8080)
    pod.wait_port(8081, udp=True)
    return p


def web_objects(b, c, *, affinity: bool = False, v6_backends=None):
    """web: dual-stack (VIP4, VIP6), TCP 80 and UDP 53 -> 8080 / 8081 on b
    (and c); noaff6: IPv6 only; empty6: IPv6 only without endpoints."""
    ports = (("http", 80, "TCP", 8080), ("dns", 53, "UDP", 8081))
    sports = (("http", 8080, "TCP"), ("dns", 8081, "UDP"))
    extra = {"sessionAffinity": "ClientIP"} if affinity else {}
    pods = [b, c] if c is not None else [b]
    six = v6_backends if v6_backends is not None else [p.ip6 for p in pods]
    return [
        service("web", ip=[VIP4, VIP6], ports=ports, ipFamilies=["IPv4", "IPv6"],
                ipFamilyPolicy="RequireDualStack", **extra),
        eslice("web-4", "web", [ep(p.ip, node="n1") for p in pods], ports=sports),
        eslice("web-6", "web", [ep(ip, node="n1") for ip in six], ports=sports,
               address_type="IPv6"),
        service("empty6", ip=[EMPTY6], ports=ports, ipFamilies=["IPv6"]),
    ]


def program(lb, objs, rec=None, table=None):
    """The agent's pipeline into the real maps; returns (reconciler, table)."""
    rec = rec or Reconciler()
    table = table or ServiceTable("n1", "")
    apply_ops(lb, rec.plan_changes(table.rebuild(snapshot(*objs))))
    lb.svcnet_set(svcnet_entries(table.cluster_ips, ["192.168.66.0/24", "fd00:66::/112"]))
    return rec, table


def test_ipv6_and_dual_stack_clusterips_at_the_socket(cgroup):
    with World(dual_stack=True) as world:
        node = world.add_node("n1", enis=1)
        b = node.add_pod("b")
        serve(b, "from-b")
        with sim_attach(node) as agent:
            lb = agent.datapath.lb
            program(lb, web_objects(b, None))
            # both families' entries in their own maps, one id space
            got = {(s["vip"], s["port"], s["proto"]) for s in lb.services()}
            assert {(VIP4, 80, "TCP"), (VIP6, 80, "TCP"), (VIP6, 53, "UDP"),
                    (EMPTY6, 80, "TCP")} <= got
            assert sorted(ip for ip, _, _ in lb.backends().values()) == sorted(
                [b.ip, b.ip, b.ip6, b.ip6])
            agent.datapath.attach_socket_lb(cgroup, hostns_only=True)
            created = flows_created(lb)
            # TCP and UDP to the IPv6 ClusterIP: the backend answers, the
            # application sees the ClusterIP (getpeername6, recvmsg6)
            out = one_shot(node, cgroup, VIP6, "80", "tcp", "6").split()
            assert out[0] == "from-b" and out[2:] == [VIP6, "80"], out
            out = one_shot(node, cgroup, VIP6, "53", "udp", "6").split()
            assert out[0] == "from-b" and out[2:] == [VIP6, "53"], out
            out = one_shot(node, cgroup, VIP6, "53", "udp-connected", "6").split()
            assert out[0] == "from-b" and out[2:] == [VIP6, "53"], out
            # the same dual-stack Service over IPv4
            out = one_shot(node, cgroup, VIP4, "80", "tcp", "4").split()
            assert out[0] == "from-b" and out[2:] == [VIP4, "80"], out
            # an IPv6 socket talking IPv4 (::ffff:VIP4): through the IPv4
            # maps, the backend's IPv4 address reached, the ClusterIP seen
            for proto, port in (("tcp", "80"), ("udp", "53"), ("udp-connected", "53")):
                out = one_shot(node, cgroup, VIP4, port, proto, "mapped").split()
                assert out[0] == "from-b" and out[2:] == [f"::ffff:{VIP4}", port], (proto, out)
            # translated at the socket: no packet needed translating
            assert lb.conntrack() == [] and flows_created(lb) == created
            # no endpoint, and an unknown port of a live IPv6 ClusterIP:
            # refused at once with ECONNREFUSED, as for IPv4
            for vip, port, proto in ((EMPTY6, "80", "tcp"), (EMPTY6, "53", "udp"),
                                     (VIP6, "9999", "tcp"), (VIP6, "9999", "udp")):
                t = time.monotonic()
                out = one_shot(node, cgroup, vip, port, proto, "6")
                assert out == "ERROR 111 Connection refused", (vip, port, proto, out)
                assert time.monotonic() - t < 2.5
            agent.datapath.detach_socket_lb(cgroup)


def test_ipv6_affinity_opt_out_and_backend_change_at_the_socket(cgroup):
    with World(dual_stack=True) as world:
        node = world.add_node("n1", enis=1)
        a, b, c = node.add_pod("a"), node.add_pod("b"), node.add_pod("c")
        serve(b, "from-b")
        serve(c, "from-c")
        with sim_attach(node) as agent:
            lb = agent.datapath.lb
            rec, table = program(lb, web_objects(b, c))
            agent.datapath.attach_socket_lb(cgroup, hostns_only=False)
            created = flows_created(lb)
            # without affinity both IPv6 backends are used (from pod a's netns:
            # all sockets mode)
            seen = {one_shot(a, cgroup, VIP6, "80", "tcp", "6").split()[0]
                    for _ in range(16)}
            assert seen == {"from-b", "from-c"}, seen
            # ClientIP affinity: every connection of the netns on one backend
            program(lb, web_objects(b, c, affinity=True), rec, table)
            seen = [one_shot(a, cgroup, VIP6, "80", "tcp", "6").split()[0]
                    for _ in range(8)]
            assert len(set(seen)) == 1 and seen[0] in ("from-b", "from-c"), seen
            # the IPv6 slice loses b: new connections go to c only (the
            # affinity entries of the ended (service, backend) pairs purged
            # as the agent's AffinityPurger does)
            program(lb, web_objects(b, c, v6_backends=[c.ip6]), rec, table)
            lb.affinity_purge(set(rec.released_service_ids), set(),
                              set(rec.ended_pairs))
            seen = {one_shot(a, cgroup, VIP6, "80", "tcp", "6").split()[0]
                    for _ in range(8)}
            assert seen == {"from-c"}, seen
            # until now pod a's IPv6 connections were translated at the
            # socket: the datapath opened no flow for them
            assert flows_created(lb) == created
            assert not [r for r in lb.conntrack() if r.table.endswith("6")]
            # the socket-LB opt-out: pod a's netns listed, its IPv6 socket is
            # left alone at the socket and its packets are translated on its
            # veth instead (the datapath opens a flow for it; the socket
            # still sees the ClusterIP), while the node's sockets are still
            # translated at the socket
            agent.datapath.socklb_skip.set({netns_cookie(a.netns): 1})
            out = one_shot(a, cgroup, VIP6, "80", "tcp", "6").split()
            assert out[0] == "from-c" and out[2:] == [VIP6, "80"], out
            assert flows_created(lb) == created + 1
            out = one_shot(node, cgroup, VIP6, "80", "tcp", "6").split()
            assert out[0] == "from-c" and out[2:] == [VIP6, "80"], out
            assert flows_created(lb) == created + 1
            agent.datapath.detach_socket_lb(cgroup)


def test_the_agent_serves_a_dual_stack_service_from_manifests_and_follows_its_slices(cgroup):
    """The whole agent (manifests -> cluster state -> ServiceSync -> both
    families' maps -> socket-LB), with the IPv6 slice changing under it."""
    with World(dual_stack=True) as world:
        node = world.add_node("n1", enis=1)
        b, c = node.add_pod("b"), node.add_pod("c")
        serve(b, "from-b")
        serve(c, "from-c")
        with sim_attach(node, socket_lb=True, socket_lb_hostns_only=True,
                        cgroup_root=cgroup) as agent:
            lb = agent.datapath.lb

            def write(six):
                mf.write(agent.config.source, "cluster.yaml",
                         [mf.namespace("shop"), *web_objects(b, None, v6_backends=six)])

            def v6_backends():
                return {ip for ip, _, _ in lb.backends().values() if ":" in ip}

            write([b.ip6])
            wait_for(lambda: v6_backends() == {b.ip6}, "the IPv6 backend in the maps")
            for fam, vip in (("6", VIP6), ("4", VIP4), ("mapped", VIP4)):
                out = one_shot(node, cgroup, vip, "80", "tcp", fam).split()
                want = f"::ffff:{vip}" if fam == "mapped" else vip
                assert out[0] == "from-b" and out[2:] == [want, "80"], (fam, out)
            write([c.ip6])
            wait_for(lambda: v6_backends() == {c.ip6}, "the IPv6 backend replaced")
            out = one_shot(node, cgroup, VIP6, "80", "tcp", "6").split()
            assert out[0] == "from-c" and out[2:] == [VIP6, "80"], out
            # the IPv4 family of the same Service did not move
            out = one_shot(node, cgroup, VIP4, "80", "tcp", "4").split()
            assert out[0] == "from-b", out
            agent.datapath.detach_socket_lb(cgroup)


def test_connected_ipv6_and_mapped_udp_sockets_of_a_removed_backend_are_closed(cgroup):
    """The UDP socket reaper for both families: an IPv6 socket connected to
    the IPv6 ClusterIP and an IPv6 socket connected to the IPv4 one through
    a mapped address; their backend leaves both slices, and the agent
    closes both sockets (sock_diag of AF_INET6), so nothing more reaches the
    dead backend and a reconnect reaches the live one."""
    with World(dual_stack=True) as world:
        node = world.add_node("n1", enis=1)
        b, c = node.add_pod("b"), node.add_pod("c")
        serve(b, "from-b")
        serve(c, "from-c")
        clients = []
        with sim_attach(node, socket_lb=True, socket_lb_hostns_only=True,
                        cgroup_root=cgroup) as agent:
            lb = agent.datapath.lb
            try:
                def write(pod):
                    objs = web_objects(pod, None)
                    mf.write(agent.config.source, "cluster.yaml", [mf.namespace("shop"), *objs])

                def client():
                    clients.append(LineClient(node, cgroup, family=6))
                    return clients[-1]

                write(b)
                wait_for(lambda: {ip for ip, _, _ in lb.backends().values()} == {b.ip, b.ip6},
                         "b's addresses in the maps")
                six, mapped = client(), client()
                assert six(f"connect {VIP6} 53") == f"ok {VIP6} 53"
                assert mapped(f"connect ::ffff:{VIP4} 53") == f"ok ::ffff:{VIP4} 53"
                assert six("send s0") == "ok from-b"
                assert mapped("send m0") == "ok from-b"
                write(c)
                results = send_until_closed({"s": six, "m": mapped}, "ok from-b")
                # closed: the next send fails (EDESTADDRREQ: disconnected)
                assert results == {"s": "err 89", "m": "err 89"}, results
                assert six(f"connect {VIP6} 53") == f"ok {VIP6} 53"
                assert six("send s-new") == "ok from-c"
                assert mapped(f"connect ::ffff:{VIP4} 53") == f"ok ::ffff:{VIP4} 53"
                assert mapped("send m-new") == "ok from-c"
            finally:
                for p in clients:
                    p.close()
                agent.datapath.detach_socket_lb(cgroup)


# Echo servers of both families (TCP per connection, UDP per datagram).
ECHO = r"""
import socket, sys, threading
port = int(sys.argv[1])
def conn(c):
    while True:
        d = c.recv(64)
        if not d:
            return
        c.sendall(d)
def tcp():
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port + 1))
    while True:
        d, a = s.recvfrom(64); s.sendto(d, a)
threading.Thread(target=udp, daemon=True).start()
tcp()
"""

def test_ipv6_socket_lb_flows_survive_an_agent_kill9_and_restart():
    """An IPv6 TCP connection and a connected UDP socket of the node, sent to
    a two-backend IPv6 ClusterIP by socket-LB, carry on through a SIGKILL of
    the agent and its restart: the pinned maps of both families are read
    back (nothing re-picked, the same service ids), getpeername keeps
    showing the ClusterIP (fp_sockrev6_v1 is pinned), and new connections
    are translated by the restarted agent's programs."""
    def services6(paths):
        from agent.datapath import pinned
        maps = pinned.open_maps(f"{paths.bpffs}/fastpath")
        try:
            m = maps["fp_svc6_v1"]
            return sorted((bytes(k).hex(), bytes(v).hex()) for k, v in m.items())
        finally:
            pinned.close_all(maps)

    with World(dual_stack=True) as w6:
        n1 = w6.add_node("n1", enis=1)
        b, c = n1.add_pod("b"), n1.add_pod("c")
        for p in (b, c):
            p.popen(["python3", "-c", ECHO, "7400"])
            p.wait_port(7400)
            p.wait_port(7401, udp=True)
        ports = (("tcp", 80, "TCP", 7400), ("udp", 53, "UDP", 7401))
        sports = (("tcp", 7400, "TCP"), ("udp", 7401, "UDP"))
        objs = [mf.namespace("shop"),
                service("web", ip=[VIP4, VIP6], ports=ports, ipFamilies=["IPv4", "IPv6"],
                        ipFamilyPolicy="PreferDualStack"),
                eslice("web-4", "web", [ep(p.ip, node="n1") for p in (b, c)], ports=sports),
                eslice("web-6", "web", [ep(p.ip6, node="n1") for p in (b, c)], ports=sports,
                       address_type="IPv6")]
        with private_cgroup() as cgroup, private_paths() as paths, Load(90) as load:
            mf.write(paths.manifests, "web.yaml", objs)
            args = ["--socket-lb", "true", "--cgroup-root", cgroup]
            agent = AgentProcess(n1, paths, args).start()
            try:
                wait_for(lambda: len(services6(paths)) == 2, "the IPv6 frontends pinned")
                before = services6(paths)
                load.add("node", n1, VIP6, 80, 53, cgroup)
                time.sleep(2)
                agent.kill(9)                  # crash: pins and cgroup programs stay
                time.sleep(2)
                agent = AgentProcess(n1, paths, args).start()
                time.sleep(2)
                assert services6(paths) == before, "the IPv6 frontends were rewritten"
                # a new connection through the restarted agent's programs
                # (the echo server answers with what it got: "hi")
                out = one_shot(n1, cgroup, VIP6, "80", "tcp", "6").split()
                assert out == ["hi", VIP6, "80"], out
                assert load.running() == ["node"], "the load client ended early"
                res = load.results(timeout=30)["node"]
                print("load:", res)
                assert res["tcp_error"] == "" and res["udp_lost"] == 0, res
                assert res["tcp_ok"] > 100 and res["udp_ok"] > 100, res
                assert res["peers"] == [VIP6], res
            finally:
                agent.kill(9)
