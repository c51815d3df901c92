"""IPv6-only pods with real traffic on simulated dual-stack nodes.

    node n1:  o (IPv6 only)  s, b (dual stack)      node n2:  r, d (dual stack)

An IPv6-only pod is laid out as Terway lays out a dual-stack one, without
its IPv4 half (World.add_pod(ipv4=False)); CNI ADD registers it with an
endpoint key (agent/model/endpoint.py) in place of an IPv4 address. Each
scenario proves the fast path by fastpath's counters and by the node's
IPv6 forwarding counter (Ip6OutForwDatagrams), which moves only when the
host stack routes a packet.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from agent.api import wire
from agent.datapath import Datapath
from agent.model.endpoint import is_endpoint_key
from agent.sim.agent import (REPO, AgentProcess, cli_command, private_paths, register_pod,
                             sim_attach)
from agent.sim.traffic import forwarded_datagrams6, tcp_exchange, udp_send
from agent.sim import manifests as m
from agent.sim.agent import node_agent
from agent.sim.world import World
from fastpath_helpers import counters_by, wait_for
from test_policy_ipv6 import CLIENT6, SERVER6, applied, connects, denied_drops


@pytest.fixture
def world6():
    with World(dual_stack=True) as w:
        yield w


def exchange(src, dst, tag: str) -> None:
    src.ping(dst.ip6, count=2)
    assert tcp_exchange(src, dst, ip=dst.ip6, request=f"hi{tag}",
                        reply=f"yo{tag}") == (f"hi{tag}", f"yo{tag}")
    assert udp_send(src, dst, ip=dst.ip6, payload=f"u{tag}") == f"u{tag}"


def test_the_simulated_node_lays_out_an_ipv6_only_pod_without_ipv4(world6):
    n1 = world6.add_node("n1", enis=1)
    o = n1.add_pod("o", ipv4=False)
    assert o.ip == "" and o.ip6
    addrs = json.loads(o.run(["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)[0]
    assert [a["family"] for a in addrs["addr_info"] if a["scope"] == "global"] == ["inet6"]
    assert o.run(["ip", "-4", "route", "show"]).stdout.strip() == ""
    rules = n1.run(["ip", "-6", "rule", "show"]).stdout
    assert f"from {o.ip6} lookup" in rules and f"to {o.ip6} lookup main" in rules


def test_cni_add_registers_an_ipv6_only_pod_and_redirects_it_on_the_node(world6):
    n1 = world6.add_node("n1", enis=1)
    o, s = n1.add_pod("o", ipv4=False), n1.add_pod("s")
    h = n1.add_pod("h", ipv4=False)
    with sim_attach(n1, register=False) as agent:
        # a hostPort on an IPv4 hostIP cannot reach it: refused, naming the
        # pod and the mapping, nothing kept
        from agent.api.server import ApiError
        wait_for(lambda: agent.services is not None and agent.services.synced.is_set(),
                 "the service sync")
        with pytest.raises(ApiError, match=r"pod default/h: hostPort 10\.9\.9\.9:8080/TCP->80: "
                                           "hostIP 10.9.9.9 is IPv4, the pod has no IPv4 "
                                           "address"):
            agent.rpc_EndpointAdd(h.netns_path, "eth0", "sim-h", "default", "h",
                                  port_mappings=[{"hostPort": 8080, "containerPort": 80,
                                                  "hostIP": "10.9.9.9"}])
        assert agent.rpc_EndpointList() == [] and agent.datapath.maps.endpoints6() == []
        view = register_pod(agent, o)
        assert view["ip"] == "" and view["ip6"] == o.ip6
        assert view["endpoint_key"] == "127.255.0.1", "the refused ADD kept no key"
        register_pod(agent, s)
        maps = agent.datapath.maps
        assert {e.ip for e in maps.endpoints()} == {s.ip}, "no IPv4 entry for o"
        assert {e.ip for e in maps.endpoints6()} == {o.ip6, s.ip6}
        assert maps.veths()[o.host_ifindex] == view["endpoint_key"]
        before = forwarded_datagrams6(n1)
        exchange(o, s, "1")
        exchange(s, o, "2")
        assert forwarded_datagrams6(n1) == before, "the node's stack routed pod traffic"
        c = counters_by(maps.counters(), o.host_ifindex)
        assert c[("from-pod", "redirected-local")] >= 8
        assert c[("from-pod", "to-stack")] == 0
        # no IPv4 leaves it: not even from its key as a source
        o.iproute("addr", "add", f"{view['endpoint_key']}/32", "dev", "eth0")
        o.iproute("route", "add", f"{s.ip}/32", "dev", "eth0")
        o.run(["sh", "-c", f"printf x | nc -u -q 0 -w 1 {s.ip} 9"], check=False, timeout=10)
        c = counters_by(maps.counters(), o.host_ifindex)
        assert c[("from-pod", "dropped-source-spoofed")] >= 1
        # CNI DEL: the IPv6 entry and the veth's registration go
        agent.rpc_EndpointDel(container_id="sim-o")
        assert {e.ip for e in maps.endpoints6()} == {s.ip6}
        assert o.host_ifindex not in maps.veths()


def test_an_ipv6_only_pod_talks_across_nodes_by_its_eni(world6):
    n1, n2 = world6.add_node("n1", enis=1), world6.add_node("n2", enis=1)
    o, r = n1.add_pod("o", ipv4=False), n2.add_pod("r")
    with sim_attach(n1) as ag1:
        before = forwarded_datagrams6(n1)
        exchange(o, r, "3")
        exchange(r, o, "4")
        assert forwarded_datagrams6(n1) == before
        c = counters_by(ag1.datapath.maps.counters())
        assert c[("from-pod", "redirected-eni")] >= 8
        assert c[("from-vpc", "redirected-local")] >= 8


def test_an_ipv6_only_pod_keeps_its_key_and_flows_across_kill_and_restart(world6):
    n1 = world6.add_node("n1", enis=1)
    o, s = n1.add_pod("o", ipv4=False), n1.add_pod("s")
    p = n1.add_pod("p", ipv4=False)
    with private_paths() as paths:
        proc = AgentProcess(n1, paths).start()
        try:
            keys = {x.name: register_pod(paths.socket, x)["endpoint_key"] for x in (o, s, p)}
            assert keys["s"] == "" and keys["o"] != keys["p"]
            assert all(is_endpoint_key(keys[k]) for k in ("o", "p"))
            exchange(o, s, "5")
            proc.kill(9)
            reader = Datapath(paths.config(), netns=n1.netns).load(reader=True)
            try:
                before = forwarded_datagrams6(n1)
                exchange(o, s, "6")          # no agent process at all
                assert forwarded_datagrams6(n1) == before
            finally:
                reader.close()
            proc = AgentProcess(n1, paths).start()      # restores from its state dir
            eps = {e["pod"].split("/")[-1]: e for e in wire.call(paths.socket, "EndpointList")}
            assert {k: eps[k]["endpoint_key"] for k in keys} == keys
            assert eps["o"]["ip"] == "" and eps["o"]["ip6"] == o.ip6
            exchange(s, o, "7")
            exchange(p, o, "8")
            reader = Datapath(paths.config(), netns=n1.netns).load(reader=True)
            try:
                assert {e.ip for e in reader.maps.endpoints6()} == {o.ip6, s.ip6, p.ip6}
                assert {e.ip for e in reader.maps.endpoints()} == {s.ip}
                assert reader.maps.veths()[o.host_ifindex] == keys["o"]
            finally:
                reader.close()
            # the CLI's endpoint list shows it: no IPv4, its IPv6 and key
            out = subprocess.run(cli_command(n1, paths, "endpoint", "list", "--json"),
                                 capture_output=True, text=True, check=True, cwd=REPO).stdout
            rows = {r["ip6"]: r for r in json.loads(out)}
            assert (rows[o.ip6]["ip"], rows[o.ip6]["key"]) == ("", keys["o"])
            assert rows[o.ip6]["pod"].endswith("/o")
            assert (rows[s.ip6]["ip"], rows[s.ip6]["key"]) == (s.ip, s.ip)
            # trace from it: IPv6 as its traffic goes, IPv4 refused naming it
            run = lambda *a: subprocess.run(cli_command(n1, paths, "trace", *a), cwd=REPO,
                                            capture_output=True, text=True)
            t = json.loads(run("--from", "default/o", "--to", f"[{s.ip6}]:8080",
                               "--json").stdout)
            assert (t["from"]["ip"], t["reason"], t["redirect"]["ifname"]) == (
                o.ip6, "redirected-local", s.host_ifname)
            bad = run("--from", "default/o", "--to", f"{s.ip}:8080")
            assert bad.returncode != 0 and "is IPv6 only" in bad.stderr, bad.stderr
        finally:
            proc.kill(9)
            for x in (o, s, p):
                subprocess.run(["tc", "-n", n1.netns, "qdisc", "del", "dev", x.host_ifname,
                                "clsact"], check=False)


VIP6 = "fd00:78::10"


def pod6(p, node, labels):
    """The Pod object of a simulated pod (an IPv6-only one: its IPv6 address alone)."""
    return m.pod("default", p.name, p.ip or p.ip6, node, labels, ip6=p.ip6 if p.ip else None)


def via_vip(client) -> bool:
    r = client.run(["sh", "-c", f"printf hi | nc -N -w 1 {VIP6} 80"], check=False, timeout=10)
    return r.stdout == "ok"


def o_in(*allowed) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "default", "name": "o-in"},
            "spec": {"podSelector": {"matchLabels": {"app": "o"}},
                     "ingress": [{"from": [{"ipBlock": {"cidr": f"{p.ip6}/128"}}
                                           for p in allowed],
                                  "ports": [{"protocol": "TCP", "port": 8080},
                                            {"protocol": "TCP", "port": 9000}]}]}}


def web6(o) -> list[dict]:
    """An IPv6 ClusterIP whose one backend is the IPv6-only pod."""
    return [{"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "web6", "namespace": "default"},
             "spec": {"clusterIP": VIP6, "clusterIPs": [VIP6], "ipFamilies": ["IPv6"],
                      "ipFamilyPolicy": "SingleStack",
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                 "protocol": "TCP"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "web6-1", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "web6"}},
             "addressType": "IPv6",
             "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
             "endpoints": [{"addresses": [o.ip6], "conditions": {"ready": True},
                            "nodeName": "n1"}]}]


def test_policy_and_a_clusterip_for_an_ipv6_only_pod_across_kill_and_restart(world6):
    n1, n2 = world6.add_node("n1", enis=1), world6.add_node("n2", enis=1)
    o = n1.add_pod("o", ipv4=False)
    s, b = n1.add_pod("s"), n1.add_pod("b")
    r, d = n2.add_pod("r"), n2.add_pod("d")
    srv = o.popen(["python3", "-c", SERVER6])
    try:
        o.wait_port(8080)
        objs = [m.namespace("default"), pod6(o, "n1", {"app": "o"}),
                *(pod6(p, "n1", {"app": p.name}) for p in (s, b)),
                *(pod6(p, "n2", {"app": p.name}) for p in (r, d)), *web6(o)]
        with node_agent(n1, ["--policy-enforcement", "default"],
                        {"base.yaml": m.dump(objs)}) as agent:
            wait_for(applied(agent.paths, 0), "the first policy plan")
            # not isolated: everyone reaches it, it reaches both kinds of peer
            for p in (s, b, r, d):
                assert connects(p, o.ip6), p.name
            srv_s = s.popen(["python3", "-c", SERVER6])
            try:
                s.wait_port(8080)
                assert connects(o, s.ip6), "an IPv6-only pod to a dual-stack one"
            finally:
                srv_s.kill()
                srv_s.wait()
            # the ClusterIP whose backend is the IPv6-only pod, per packet
            wait_for(lambda: via_vip(s), "web6 to answer")
            translated = sum(c["packets"] for c in agent.call("Counters")
                             if c["ifindex"] == s.host_ifindex
                             and c["reason"] == "service-translated")
            assert translated >= 1
            # isolated, admitted by an IPv6 ipBlock: s (same node), r (across)
            agent.write("policy.yaml", [o_in(s, r)])
            wait_for(applied(agent.paths, 1), "o-in to be programmed")
            before = denied_drops(agent.paths)
            assert connects(s, o.ip6) and connects(r, o.ip6)
            assert not connects(b, o.ip6) and not connects(d, o.ip6)
            assert via_vip(s) and not via_vip(b)
            assert denied_drops(agent.paths) > before
            # kill -9 and restart under an admitted IPv6 connection
            load = s.popen(["python3", "-c", CLIENT6, o.ip6, "8"], stdout=subprocess.PIPE,
                           text=True)
            try:
                time.sleep(1)
                agent.kill(9)
                assert connects(r, o.ip6) and not connects(d, o.ip6)
                agent.start()
                wait_for(applied(agent.paths, 1), "the restarted agent's plan")
                st = wire.call(agent.paths.socket, "PolicyStatus")
                assert st["last_ops"] == 0, st
                eps = {e["pod"].split("/")[-1]: e for e in agent.call("EndpointList")}
                assert eps["o"]["ip"] == "" and is_endpoint_key(eps["o"]["endpoint_key"])
                assert connects(s, o.ip6) and not connects(b, o.ip6)
                assert via_vip(s) and not via_vip(b)
                out, _ = load.communicate(timeout=30)
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait()
            words = out.split()
            assert words[0] == "ok" and int(words[1]) > 100, out
    finally:
        srv.kill()
        srv.wait()


def test_fastpath_cni_adds_and_deletes_an_ipv6_only_pod(world6):
    """The real plugin, as a runtime runs it after Terway's (whose result
    holds the pod's IPv6 address only)."""
    from cni_helpers import cni_node
    with cni_node(world6) as cn:
        o = cn.node.add_pod("o", ipv4=False)
        prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": o.netns_path}],
                "ips": [{"address": f"{o.ip6}/128", "interface": 0}]}
        args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=o"
        add = cn.fastpath("ADD", cn.conf(1, prev), "c-o", o.netns_path, args=args)
        assert add.rc == 0, add.stderr + add.stdout
        assert [ip["address"] for ip in json.loads(add.stdout)["ips"]] == [f"{o.ip6}/128"]
        eps = cn.api("EndpointList")
        assert [(e["ip"], e["ip6"], e["pod"]) for e in eps] == [("", o.ip6, "default/o")]
        assert is_endpoint_key(eps[0]["endpoint_key"])
        assert "which the previous plugin's result does not list" not in open(cn.log_file).read()
        chk = cn.fastpath("CHECK", cn.conf(1, prev), "c-o", o.netns_path, args=args)
        assert chk.rc == 0, chk.stderr + chk.stdout
        assert cn.api("EndpointCheck", {"container_id": "c-o"})["ok"]
        dele = cn.fastpath("DEL", cn.conf(1, prev), "c-o", o.netns_path, args=args)
        assert dele.rc == 0, dele.stderr + dele.stdout
        assert cn.api("EndpointList") == []
