"""The benchmarks' kube-proxy baseline works: the generated iptables and
nftables rules really serve ClusterIPs and NodePorts on a simulated node
with no fastpath on it (the same traffic the lb benchmarks measure).

    client (outside) ── vpc ══ eth0 n1 ── pod b (backend)
                                      └── pod a (in-cluster client)
"""
from __future__ import annotations

import pytest

from agent.sim.traffic import serve_reply
from bench import kubeproxy_rules as kp

VIP, NODE_PORT, PORT = "192.168.90.10", 30090, 8080


def services(backend_ip: str) -> list[kp.ServicePort]:
    filler = [kp.ServicePort("bench", f"f{i}", "http", f"192.168.91.{i}", 80,
                             ((f"10.200.0.{i}", 8080),), "tcp", 31000 + i) for i in range(1, 20)]
    return filler + [kp.ServicePort("bench", "web", "http", VIP, 80, ((backend_ip, PORT),),
                                    "tcp", NODE_PORT)]


def load(node, mode: str, backend_ip: str) -> None:
    sps = services(backend_ip)
    if mode == "iptables":
        node.run(["iptables-restore", "--noflush"], input=kp.iptables_restore(
            sps, "10.240.0.0/12", (node.ip,)))
        node.run(["iptables-restore", "--noflush"], input=kp.iptables_jumps_restore())
    else:
        node.run(["nft", "-f", "-"], input=kp.nft_script(sps, "10.240.0.0/12",
                                                         "192.168.0.0/16", (node.ip,)))


def ask(src, ip: str, port: int) -> str:
    return src.run(["sh", "-c", f"printf hi | nc -N -w 3 {ip} {port}"], check=False,
                   timeout=10).stdout


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_kube_proxy_rules_serve_node_ports_from_outside_and_cluster_ips_from_pods(world, mode):
    n1 = world.add_node("n1", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    client = world.add_client("ext")
    load(n1, mode, b.ip)
    serve_reply(b, PORT, "from-b", peer=True)
    # eTP Cluster masquerades: the backend sees the node, not the client
    who, seen = ask(client, n1.ip, NODE_PORT).split()
    assert who == "from-b" and seen.split(":")[0] != client.ip, seen
    # a pod is in the cluster CIDR: not masqueraded
    who, seen = ask(a, VIP, 80).split()
    assert who == "from-b" and seen.split(":")[0] == a.ip
