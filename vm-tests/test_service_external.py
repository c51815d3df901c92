"""Services from outside the pod network, with real traffic: NodePorts,
external and load-balancer IPs, from a client outside the cluster, from a
pod on the same node, from a pod on the other node and from the node
itself; externalTrafficPolicy Local keeping the client's address and
dropping where there is no endpoint; Cluster policy SNAT to a backend on
the other node; healthCheckNodePorts; source ranges; reject.

    ext 10.250.0.11 ── vpc ══ eth0 n1 10.240.0.11 ─┬ pod a (client)
                        ║                          └ pod b (backend)
                        ╚════ eth0 n2 10.240.0.12 ─┬ pod c (client)
                                                   └ pod d (backend)
    the vpc sends 203.0.113.10 (external IP) and the load-balancer IPs to n1,
    198.51.100.21 (the Local Service's other load-balancer IP) to n2

Both nodes run the agent (in process) from the same manifests; the nodes'
own sockets get socket-LB through a cgroup v2 child of the test's.
Every backend answers with the address it saw the client at.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from agent.sim.agent import sim_attach
from fastpath_helpers import serve_reply, wait_for

WEB_VIP, LOC_VIP, FW_VIP, NONE_VIP = "192.168.60.10", "192.168.60.11", "192.168.60.12", \
    "192.168.60.13"
EXT_IP = "203.0.113.10"
WEB_LB, LOC_LB, LOC_LB2, FW_LB = "198.51.100.10", "198.51.100.11", "198.51.100.21", \
    "198.51.100.12"


def svc(name, vip, ports, etp="Cluster", lb_ips=(), **spec):
    s = {"type": "LoadBalancer", "clusterIP": vip, "externalTrafficPolicy": etp,
         "ports": [{"name": n, "port": p, "targetPort": t, "protocol": proto, "nodePort": np}
                   for n, p, proto, t, np in ports], **spec}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": s,
            "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}}


def eps(name, endpoints, ports=(("http", 8080, "TCP"),)):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node}
                          for ip, node in endpoints]}


def manifests(b, d) -> str:
    web_ports = [("http", 80, "TCP", 8080, 30080), ("dns", 53, "UDP", 5353, 30053)]
    return yaml.safe_dump_all([
        svc("web", WEB_VIP, web_ports, lb_ips=[WEB_LB], externalIPs=[EXT_IP]),
        eps("web", [(b.ip, "n1"), (d.ip, "n2")], [("http", 8080, "TCP"), ("dns", 5353, "UDP")]),
        svc("loc", LOC_VIP, [("http", 80, "TCP", 8080, 30081)], etp="Local",
            lb_ips=[LOC_LB, LOC_LB2], healthCheckNodePort=32081),
        eps("loc", [(b.ip, "n1")]),
        svc("fw", FW_VIP, [("http", 80, "TCP", 8080, 30082)], lb_ips=[FW_LB],
            loadBalancerSourceRanges=["10.250.0.0/24"]),
        eps("fw", [(b.ip, "n1")]),
        svc("none", NONE_VIP, [("http", 80, "TCP", 8080, 30083)]),
    ], sort_keys=False)


# -- clients ------------------------------------------------------------------------

TCP_CLIENT = r"""
import socket, sys, time
ip, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t = time.monotonic()
try:
    s = socket.create_connection((ip, port), timeout=wait)
    s.sendall(b"hi")
    s.shutdown(socket.SHUT_WR)
    data = s.recv(200).decode()
    print(data or "EMPTY")
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print(f"ERROR {e.errno} {round(time.monotonic() - t, 2)}")
"""

UDP_CLIENT = r"""
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(b"q", (ip, port))
    data, peer = s.recvfrom(200)
    print(data.decode(), f"from {peer[0]}:{peer[1]}")
except OSError as e:
    print("TIMEOUT" if isinstance(e, socket.timeout) else f"ERROR {e.errno}")
"""


def tcp(src, ip, port, wait=2.0, cgroup=None) -> str:
    return _py(src, TCP_CLIENT, [ip, str(port), str(wait)], cgroup)


def udp(src, ip, port, cgroup=None) -> str:
    return _py(src, UDP_CLIENT, [ip, str(port)], cgroup)


def _py(ns, script, args, cgroup) -> str:
    if cgroup is None:
        return ns.run([sys.executable, "-c", script, *args], check=False, timeout=15).stdout.strip()
    # join the cgroup from this mount namespace: `ip netns exec` remounts /sys
    cmd = (f'echo $$ > {cgroup}/cgroup.procs && '
           f'exec ip netns exec {ns.netns} {sys.executable} -c "$0" "$@"')
    return subprocess.run(["sh", "-c", cmd, script, *args], capture_output=True, text=True,
                          timeout=15).stdout.strip()


def who(answer: str) -> tuple[str, str]:
    """(backend, client address it saw) of a reply 'from-x ip:port'."""
    name, seen = answer.split()
    return name, seen.rsplit(":", 1)[0]


def http_get(src, ip, port) -> tuple[int, dict, dict]:
    out = src.run(["curl", "-s", "-m", "3", "-D", "-", f"http://{ip}:{port}/healthz"],
                  check=False, timeout=10).stdout
    # (text mode has turned the CRLFs into newlines)
    head, _, body = out.partition("\n\n")
    lines = head.split("\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_services_are_reached_from_outside_from_pods_and_from_the_nodes(world, cgroup):
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    c, d = n2.add_pod("c"), n2.add_pod("d")
    ext = world.add_client("ext")
    for ip in (EXT_IP, WEB_LB, LOC_LB, FW_LB):
        world.route_to_node(ip, n1)
    world.route_to_node(LOC_LB2, n2)
    for pod, name in ((b, "from-b"), (d, "from-d")):
        serve_reply(pod, 8080, name, peer=True)
        serve_reply(pod, 5353, name, udp=True)
    text = manifests(b, d)
    with sim_attach(n1, service_cidrs="192.168.60.0/24") as ag1, \
            sim_attach(n2, service_cidrs="192.168.60.0/24") as ag2:
        for ag in (ag1, ag2):
            with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
                f.write(text)
        for ag in (ag1, ag2):
            wait_for(lambda ag=ag: ag.services is not None and ag.services.synced.is_set()
                     and len(ag.services.reconciler.frontends()) >= 14, "services programmed")
        ag1.datapath.attach_socket_lb(cgroup, hostns_only=True)

        # -- eTP Cluster: every kind of destination from every kind of client
        dests = [(n1.ip, 30080), (n2.ip, 30080), (EXT_IP, 80), (WEB_LB, 80), (WEB_VIP, 80)]
        clients = [("outside", ext, None), ("pod on n1", a, None), ("pod on n2", c, None),
                   ("node n1", n1, cgroup)]
        for label, src, cg in clients:
            for ip, port in dests:
                if label == "outside" and ip == WEB_VIP:
                    continue        # ClusterIPs are not routed to the nodes by this VPC
                seen = wait_for(lambda: {who(tcp(src, ip, port, cgroup=cg))[0]
                                         for _ in range(12)} >= {"from-b", "from-d"} and True,
                                f"{label} -> {ip}:{port} to reach both backends")
                assert seen
        # outside -> NodePort of n1: b saw the client, d saw n1 (SNAT)
        answers = {}
        for _ in range(20):
            name, seen = who(tcp(ext, n1.ip, 30080))
            answers.setdefault(name, set()).add(seen)
        assert answers.get("from-b") == {ext.ip}, answers
        assert answers.get("from-d") == {n1.ip}, answers
        # pods are not masqueraded: the backend saw the pod itself
        assert {who(tcp(c, n1.ip, 30080))[1] for _ in range(6)} <= {c.ip, n1.ip}
        assert {who(tcp(a, WEB_LB, 80))[1] for _ in range(6)} == {a.ip}
        # UDP NodePort from outside: the answer comes from the NodePort
        got = wait_for(lambda: udp(ext, n1.ip, 30053), "a UDP answer")
        assert got.endswith(f"from {n1.ip}:30053"), got

        # -- eTP Local: the client's address is kept; no endpoint here: dropped
        for _ in range(5):
            assert who(tcp(ext, n1.ip, 30081)) == ("from-b", ext.ip)
            assert who(tcp(ext, LOC_LB, 80)) == ("from-b", ext.ip)
        assert tcp(ext, n2.ip, 30081, wait=1.5) == "TIMEOUT"
        assert tcp(ext, LOC_LB2, 80, wait=1.5) == "TIMEOUT"
        # ... but pods and the nodes use every endpoint (kube-proxy's short-circuit)
        assert who(tcp(c, n2.ip, 30081))[0] == "from-b"
        cnt = {(r.direction, r.reason): r.packets for r in ag2.datapath.maps.counters()}
        assert cnt.get(("from-vpc", "dropped-service-no-local-backend"), 0) >= 2

        # -- healthCheckNodePort: 200 where the endpoint is, 503 where not
        status, headers, body = http_get(ext, n1.ip, 32081)
        assert status == 200 and body == {"service": {"namespace": "shop", "name": "loc"},
                                          "localEndpoints": 1, "serviceProxyHealthy": True}
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "1"
        status, _, body = http_get(ext, n2.ip, 32081)
        assert status == 503 and body["localEndpoints"] == 0

        # -- loadBalancerSourceRanges: the range gets in; a pod and the node do not
        assert who(tcp(ext, FW_LB, 80))[0] == "from-b"
        assert tcp(a, FW_LB, 80, wait=1.5) == "TIMEOUT"
        assert tcp(n1, FW_LB, 80, wait=1.5, cgroup=cgroup) == "TIMEOUT"
        cnt1 = {(r.direction, r.reason): r.packets for r in ag1.datapath.maps.counters()}
        assert cnt1.get(("from-pod", "dropped-source-range"), 0) >= 1
        assert cnt1.get(("to-vpc", "dropped-source-range"), 0) >= 1
        # the ClusterIP of the same Service has no ranges
        assert who(tcp(a, FW_VIP, 80))[0] == "from-b"

        # -- no endpoint: refused at once, from outside, a pod and the node
        for src, cg in ((ext, None), (a, None), (n1, cgroup)):
            out = tcp(src, n1.ip, 30083, cgroup=cg)
            assert out.startswith("ERROR 111"), (src, out)
        ag1.datapath.detach_socket_lb(cgroup)


def test_host_ports_answer_per_packet_and_at_the_socket_and_go_with_the_pod(world, cgroup):
    #   ext ── vpc ══ eth0 n1 ─┬ pod a (client)
    #                          └ pod h (hostPort 8080 -> 80, 5300/UDP -> 53)
    n1 = world.add_node("n1", enis=1)
    a, h = n1.add_pod("a"), n1.add_pod("h")
    ext = world.add_client("ext")
    serve_reply(h, 80, "from-h", peer=True)
    serve_reply(h, 53, "from-h", udp=True)
    with sim_attach(n1, register=False) as ag:
        wait_for(lambda: ag.services is not None and ag.services.synced.is_set(),
                 "the service sync")
        from agent.sim.agent import register_pod
        register_pod(ag, a)
        view = ag.rpc_EndpointAdd(h.netns_path, "eth0", "sim-h", "default", "h",
                                  port_mappings=[
                                      {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                                      {"hostPort": 5300, "containerPort": 53, "protocol": "udp",
                                       "hostIP": n1.ip}])
        assert view["host_ports"] == ["*:8080/TCP->80", f"{n1.ip}:5300/UDP->53"]
        ag.datapath.attach_socket_lb(cgroup, hostns_only=True)
        # per packet: from outside and from a pod of the node, client kept
        assert who(tcp(ext, n1.ip, 8080)) == ("from-h", ext.ip)
        assert who(tcp(a, n1.ip, 8080)) == ("from-h", a.ip)
        assert udp(ext, n1.ip, 5300).endswith(f"from {n1.ip}:5300")
        # at the socket: the node's own connections, loopback included
        assert who(tcp(n1, n1.ip, 8080, cgroup=cgroup))[0] == "from-h"
        assert who(tcp(n1, "127.0.0.1", 8080, cgroup=cgroup))[0] == "from-h"
        # the hostIP-only mapping is not on the other addresses
        assert udp(n1, "127.0.0.1", 5300, cgroup=cgroup) != "from-h"
        # a second pod cannot take the port
        from agent.api.server import ApiError
        b = n1.add_pod("b")
        with pytest.raises(ApiError, match="hostPort 10.240.0.11:8080/TCP of pod default/b is "
                                           "taken by pod default/h"):
            ag.rpc_EndpointAdd(b.netns_path, "eth0", "sim-b", "default", "b",
                               port_mappings=[{"hostPort": 8080, "containerPort": 80}])
        assert not any(e["pod"] == "default/b" for e in ag.rpc_EndpointList())
        # the DEL takes the mapping away: the node itself answers (nothing listens)
        ag.rpc_EndpointDel("sim-h")
        assert tcp(ext, n1.ip, 8080).startswith("ERROR 111")
        assert tcp(n1, "127.0.0.1", 8080, cgroup=cgroup).startswith("ERROR 111")
        ag.datapath.detach_socket_lb(cgroup)


def test_nodeports_on_the_loopback_serve_the_nodes_sockets_and_leave_a_pods_localhost_alone(
        world, cgroup):
    """nodeport_addresses covering 127.0.0.0/8 (as kube-proxy's
    --nodeport-addresses does in iptables mode): the node's own sockets
    reach a NodePort at 127.0.0.1 through socket-LB, TCP and UDP, and see
    127.0.0.1 as their peer. With socket-LB on every socket, a pod's
    127.0.0.1 stays the pod's: its own listener on the same port answers,
    not the Service."""
    n1 = world.add_node("n1", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    serve_reply(b, 8080, "from-b", peer=True)
    serve_reply(b, 5353, "from-b", udp=True)
    serve_reply(a, 30080, "a-itself", peer=True, host="127.0.0.1")
    serve_reply(a, 30053, "a-itself", udp=True, host="127.0.0.1")
    text = yaml.safe_dump_all([
        svc("web", WEB_VIP, [("http", 80, "TCP", 8080, 30080), ("dns", 53, "UDP", 5353, 30053)]),
        eps("web", [(b.ip, "n1")], [("http", 8080, "TCP"), ("dns", 5353, "UDP")])],
        sort_keys=False)
    with sim_attach(n1, service_cidrs="192.168.60.0/24",
                    nodeport_addresses=("127.0.0.0/8", f"{n1.ip}/32")) as ag:
        with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
            f.write(text)
        wait_for(lambda: ag.services is not None and ag.services.synced.is_set()
                 and len(ag.services.reconciler.frontends()) >= 6, "services programmed")
        assert set(ag.services.addresses.nodeport) == {"127.0.0.1", n1.ip}
        ag.datapath.attach_socket_lb(cgroup, hostns_only=False)
        try:
            for _ in range(3):
                assert who(tcp(n1, "127.0.0.1", 30080, cgroup=cgroup))[0] == "from-b"
                got = udp(n1, "127.0.0.1", 30053, cgroup=cgroup)
                assert got.startswith("from-b ") and got.endswith("from 127.0.0.1:30053"), got
                assert who(tcp(a, "127.0.0.1", 30080, cgroup=cgroup)) == ("a-itself", "127.0.0.1")
                got = udp(a, "127.0.0.1", 30053, cgroup=cgroup)
                assert got.startswith("a-itself 127.0.0.1:") and got.endswith(
                    "from 127.0.0.1:30053"), got
            # the same NodePort on the node's address still serves the pod
            assert who(tcp(a, n1.ip, 30080, cgroup=cgroup))[0] == "from-b"
        finally:
            ag.datapath.detach_socket_lb(cgroup)
