"""IPv6 node-facing Services with real traffic, on dual-stack
simulated nodes each running the whole agent from the same manifests:
IPv6 NodePorts (on the node's primary IPv6 address, which the agent finds
on eth0), external and load-balancer IPs, from a client outside the
cluster, from a pod and from the node itself; externalTrafficPolicy Local
keeping the client's address and dropping where there is no endpoint;
Cluster policy SNAT to a backend on the other node; source ranges; reject.

    ext fd00:250::11 ── vpc ══ eth0 n1 fd00:240::11 ─┬ pod a (client)
                         ║                           └ pod b (backend)
                         ╚════ eth0 n2 fd00:240::12 ── pod d (backend)
    the vpc sends the external IP and the load-balancer IPs to n1

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
from agent.sim.world import World
from fastpath_helpers import wait_for

NODE6 = {"n1": "fd00:240::11", "n2": "fd00:240::12"}
NODE_GW6, CLIENT6, CLIENT_GW6 = "fd00:240::1", "fd00:250::11", "fd00:250::1"
EXT6, WEB_LB6, FW_LB6 = "fd00:113::10", "fd00:51::10", "fd00:51::12"
SVC_CIDR6 = "fd00:60::/112"

SERVER = r"""
import socket, sys
port, reply = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port)); s.listen(64)
while True:
    c, a = s.accept()
    try:
        c.recv(100); c.sendall(f"{reply} {a[0]}".encode())
    except OSError:
        pass
    c.close()
"""

TCP_CLIENT = r"""
import socket, sys
ip, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    s = socket.create_connection((ip, port), timeout=wait)
    s.sendall(b"hi")
    s.shutdown(socket.SHUT_WR)
    print(s.recv(200).decode() or "EMPTY")
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print(f"ERROR {e.errno}")
"""


def tcp(src, ip, port, wait=2.0, cgroup=None) -> str:
    args = [ip, str(port), str(wait)]
    if cgroup is None:
        return src.run([sys.executable, "-c", TCP_CLIENT, *args], check=False,
                       timeout=15).stdout.strip()
    cmd = (f'echo $$ > {cgroup}/cgroup.procs && '
           f'exec ip netns exec {src.netns} {sys.executable} -c "$0" "$@"')
    return subprocess.run(["sh", "-c", cmd, TCP_CLIENT, *args], capture_output=True, text=True,
                          timeout=15).stdout.strip()


def health(src, ip, port) -> tuple[int, dict]:
    out = src.run(["curl", "-g", "-s", "-m", "3", "-D", "-", f"http://[{ip}]:{port}/healthz"],
                  check=False, timeout=10).stdout
    head, _, body = out.partition("\n\n")
    return int(head.split()[1]), json.loads(body)


def who(answer: str) -> tuple[str, str]:
    name, _, seen = answer.partition(" ")
    return name, seen


def svc(name, vip6, ports, etp="Cluster", lb_ips=(), **spec):
    s = {"type": "LoadBalancer", "clusterIP": vip6, "clusterIPs": [vip6],
         "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack",
         "externalTrafficPolicy": etp,
         "ports": [{"name": n, "port": p, "targetPort": t, "protocol": "TCP", "nodePort": np}
                   for n, p, t, np in ports], **spec}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": s, "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}}


def eps6(name, endpoints):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-6", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv6", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node}
                          for ip, node in endpoints]}


def manifests(b, d) -> str:
    return yaml.safe_dump_all([
        svc("web6", "fd00:60::10", [("http", 80, 8080, 30180)], lb_ips=[WEB_LB6],
            externalIPs=[EXT6]),
        eps6("web6", [(b.ip6, "n1"), (d.ip6, "n2")]),
        svc("loc6", "fd00:60::11", [("http", 80, 8080, 30181)], etp="Local",
            healthCheckNodePort=32181),
        eps6("loc6", [(b.ip6, "n1")]),
        svc("fw6", "fd00:60::12", [("http", 80, 8080, 30182)], lb_ips=[FW_LB6],
            loadBalancerSourceRanges=["fd00:250::/64"]),
        eps6("fw6", [(b.ip6, "n1")]),
        svc("none6", "fd00:60::13", [("http", 80, 8080, 30183)]),
    ], sort_keys=False)


def ipv6_outside(world, nodes, ext):
    """What the simulated VPC lacks for IPv6 outside the pod network: the
    nodes' primary IPv6 addresses on eth0 (default route via the vpc), an
    IPv6 client, and the external and load-balancer IPv6 addresses routed
    to n1."""
    vpc = world.vpc
    for n in nodes:
        n.iproute("-6", "addr", "add", f"{NODE6[n.name]}/128", "dev", "eth0", "nodad")
        n.iproute("-6", "route", "add", NODE_GW6, "dev", "eth0")
        n.iproute("-6", "route", "add", "default", "via", NODE_GW6, "dev", "eth0")
        vpc.iproute("-6", "addr", "add", f"{NODE_GW6}/128", "dev", n.eth0.vpc_ifname, "nodad")
        vpc.iproute("-6", "route", "add", f"{NODE6[n.name]}/128", "dev", n.eth0.vpc_ifname)
    ext.iproute("-6", "addr", "add", f"{CLIENT6}/128", "dev", "eth0", "nodad")
    ext.iproute("-6", "route", "add", CLIENT_GW6, "dev", "eth0")
    ext.iproute("-6", "route", "add", "default", "via", CLIENT_GW6, "dev", "eth0")
    vpc.iproute("-6", "addr", "add", f"{CLIENT_GW6}/128", "dev", ext.vpc_ifname, "nodad")
    vpc.iproute("-6", "route", "add", f"{CLIENT6}/128", "dev", ext.vpc_ifname)
    n1 = nodes[0]
    for ip in (EXT6, WEB_LB6, FW_LB6):
        vpc.iproute("-6", "route", "add", f"{ip}/128", "via", NODE6[n1.name], "dev",
                    n1.eth0.vpc_ifname)


def test_ipv6_services_are_reached_from_outside_from_pods_and_from_the_node(cgroup):
    with World(dual_stack=True) as world:
        n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
        a, b, d = n1.add_pod("a"), n1.add_pod("b"), n2.add_pod("d")
        ext = world.add_client("ext")
        ipv6_outside(world, [n1, n2], ext)
        for pod, name in ((b, "from-b"), (d, "from-d")):
            pod.popen([sys.executable, "-c", SERVER, "8080", name])
            pod.wait_port(8080)
        text = manifests(b, d)
        cidrs = f"192.168.60.0/24,{SVC_CIDR6}"
        with sim_attach(n1, service_cidrs=cidrs) as ag1, \
                sim_attach(n2, service_cidrs=cidrs) as ag2:
            for ag in (ag1, ag2):
                with open(f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml", "w") as f:
                    f.write(text)
            for ag, name in ((ag1, "n1"), (ag2, "n2")):
                # the agent found the node's primary IPv6 address on eth0
                wait_for(lambda ag=ag, name=name: ag.services is not None
                         and ag.services.synced.is_set()
                         and ag.services.addresses.nodeport6 == (NODE6[name],)
                         and any(fe.ip == NODE6[name]
                                 for fe in ag.services.reconciler.frontends()),
                         f"IPv6 NodePorts programmed on {name}")
            assert ag1.datapath.settings.get()["node_ip6"] == NODE6["n1"]
            ag1.datapath.attach_socket_lb(cgroup, hostns_only=True)

            # -- eTP Cluster: each destination from outside, a pod and the node
            dests = [(NODE6["n1"], 30180), (NODE6["n2"], 30180), (EXT6, 80), (WEB_LB6, 80)]
            for label, src, cg in (("outside", ext, None), ("pod a", a, None),
                                   ("node n1", n1, cgroup)):
                for ip, port in dests:
                    wait_for(lambda: {who(tcp(src, ip, port, cgroup=cg))[0]
                                      for _ in range(12)} >= {"from-b", "from-d"},
                             f"{label} -> [{ip}]:{port} to reach both backends")
            # outside -> n1's NodePort: b saw the client, d saw n1 (SNAT)
            answers: dict[str, set] = {}
            for _ in range(20):
                name, seen = who(tcp(ext, NODE6["n1"], 30180))
                answers.setdefault(name, set()).add(seen)
            assert answers.get("from-b") == {CLIENT6}, answers
            assert answers.get("from-d") == {NODE6["n1"]}, answers
            # a pod is not masqueraded
            assert {who(tcp(a, EXT6, 80))[1] for _ in range(6)} == {a.ip6}

            # -- eTP Local: the client's address kept; no endpoint here: dropped
            for _ in range(3):
                assert who(tcp(ext, NODE6["n1"], 30181)) == ("from-b", CLIENT6)
            assert tcp(ext, NODE6["n2"], 30181, wait=1.5) == "TIMEOUT"
            cnt = {(r.direction, r.reason): r.packets for r in ag2.datapath.maps.counters()}
            assert cnt.get(("from-vpc", "dropped-service-no-local-backend"), 0) >= 1

            # -- healthCheckNodePort on the IPv6 NodePort addresses too
            status, body = health(ext, NODE6["n1"], 32181)
            assert status == 200 and body == {"service": {"namespace": "shop", "name": "loc6"},
                                              "localEndpoints": 1, "serviceProxyHealthy": True}
            status, body = health(ext, NODE6["n2"], 32181)
            assert status == 503 and body["localEndpoints"] == 0

            # -- loadBalancerSourceRanges: the client's range gets in; a pod
            # and the node (its primary IPv6 address) do not
            assert who(tcp(ext, FW_LB6, 80))[0] == "from-b"
            assert tcp(a, FW_LB6, 80, wait=1.5) == "TIMEOUT"
            assert tcp(n1, FW_LB6, 80, wait=1.5, cgroup=cgroup) == "TIMEOUT"
            cnt1 = {(r.direction, r.reason): r.packets for r in ag1.datapath.maps.counters()}
            assert cnt1.get(("from-pod", "dropped-source-range"), 0) >= 1
            assert cnt1.get(("to-vpc", "dropped-source-range"), 0) >= 1

            # -- no endpoint: refused at once from outside, a pod and the node
            for src, cg in ((ext, None), (a, None), (n1, cgroup)):
                out = tcp(src, NODE6["n1"], 30183, cgroup=cg)
                assert out == "ERROR 111", (src, out)
            ag1.datapath.detach_socket_lb(cgroup)


def test_ipv6_host_ports_from_outside_from_pods_and_from_the_node(cgroup):
    #   ext ── vpc ══ eth0 n1 ─┬ pod a (client)
    #                          ├ pod h, dual stack (hostPort 8080 -> 8080, both families)
    #                          └ pod o, IPv6 only (hostPort [n1]:9090 -> 8080)
    with World(dual_stack=True) as world:
        n1 = world.add_node("n1", enis=1)
        a, h, o = n1.add_pod("a"), n1.add_pod("h"), n1.add_pod("o", ipv4=False)
        ext = world.add_client("ext")
        ipv6_outside(world, [n1], ext)
        for pod, name in ((h, "from-h"), (o, "from-o")):
            pod.popen([sys.executable, "-c", SERVER, "8080", name])
            pod.wait_port(8080)
        with sim_attach(n1, register=False) as ag:
            wait_for(lambda: ag.services is not None and ag.services.synced.is_set()
                     and NODE6["n1"] in ag.services.addresses.local6,
                     "the service sync with the node's IPv6 address")
            from agent.sim.agent import register_pod
            register_pod(ag, a)
            view = ag.rpc_EndpointAdd(h.netns_path, "eth0", "sim-h", "default", "h",
                                      port_mappings=[{"hostPort": 8080, "containerPort": 8080}])
            assert view["host_ports"] == ["*:8080/TCP->8080"]
            view = ag.rpc_EndpointAdd(o.netns_path, "eth0", "sim-o", "default", "o",
                                      port_mappings=[{"hostPort": 9090, "containerPort": 8080,
                                                      "hostIP": NODE6["n1"]}])
            assert view["host_ports"] == [f"[{NODE6['n1']}]:9090/TCP->8080"]
            ag.datapath.attach_socket_lb(cgroup, hostns_only=True)
            # per packet: from outside and from a pod, the client's address kept
            assert who(tcp(ext, NODE6["n1"], 8080)) == ("from-h", CLIENT6)
            assert who(tcp(a, NODE6["n1"], 8080)) == ("from-h", a.ip6)
            assert who(tcp(ext, NODE6["n1"], 9090)) == ("from-o", CLIENT6)
            # IPv4 as before, for the dual-stack pod
            assert who(tcp(ext, n1.ip, 8080))[0] == "from-h"
            # at the socket: the node's own connections, ::1 included
            assert who(tcp(n1, NODE6["n1"], 8080, cgroup=cgroup))[0] == "from-h"
            assert who(tcp(n1, "::1", 8080, cgroup=cgroup))[0] == "from-h"
            assert who(tcp(n1, NODE6["n1"], 9090, cgroup=cgroup))[0] == "from-o"
            # the hostIP-only mapping is not on the other addresses
            assert not tcp(n1, "::1", 9090, cgroup=cgroup).startswith("from-o")
            # another pod cannot take an IPv6 one
            from agent.api.server import ApiError
            b = n1.add_pod("b", ipv4=False)
            with pytest.raises(ApiError, match=r"hostPort \[fd00:240::11\]:9090/TCP of pod "
                                               "default/b is taken by pod default/o"):
                ag.rpc_EndpointAdd(b.netns_path, "eth0", "sim-b", "default", "b",
                                   port_mappings=[{"hostPort": 9090, "containerPort": 80}])
            # the DEL takes the mappings away: nothing listens on the node
            ag.rpc_EndpointDel("sim-o")
            ag.rpc_EndpointDel("sim-h")
            assert tcp(ext, NODE6["n1"], 9090).startswith("ERROR 111")
            assert tcp(ext, NODE6["n1"], 8080).startswith("ERROR 111")
            assert tcp(n1, "::1", 8080, cgroup=cgroup).startswith("ERROR 111")
            ag.datapath.detach_socket_lb(cgroup)
