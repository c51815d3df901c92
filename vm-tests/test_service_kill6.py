"""IPv6 ClusterIP flows translated per packet survive a kill -9 of the agent
and its restart: the IPv6 twin of test_node_agent.py's kill -9 test, on a
dual-stack simulated node.

    pod a ─ cali ┐                    ┌ eth1 ─ node n2 (no fastpath) ─ cali ─ pod c
    pod b ─ cali ┴ node n1 ─ eth1 ═ vpc

Pod a is in no socket-LB cgroup: its IPv6 TCP connection and connected UDP
socket to the ClusterIP are translated on its veth (fp_from_pod6), the
replies restored in fp_pod6_route (b, on n1) or fp_from_vpc6 (c, on n2).
Two backends: a flow that lost its conntrack entry would be sent to a
random one mid-connection and break. The load client (socket_clients.Load)
sends a numbered message every 20 ms on each and checks every echo.
"""
from __future__ import annotations

import ipaddress
import json
import sys
import time

from agent.api import wire
from agent.datapath.maps import DEFS, MAP, mark6_slot
from agent.sim import manifests as mf
from agent.sim.agent import AgentProcess, private_paths
from agent.sim.world import World
from fastpath_helpers import wait_for
from socket_clients import Load
from test_socket_lb6 import ECHO

from tests.lb.lbdata import ep, eslice, service

VIP6 = "fd00:67::10"
TCP_PORT, UDP_PORT = 7400, 7401
LOAD_MAX_SECONDS = 120


def pinned(paths, *names: str) -> list[list[dict]]:
    """Decoded entries of pinned maps, read through the pins as the CLI does."""
    from agent.datapath import libbpf, pinned as pins, tables
    from agent.inspect import decode
    maps = pins.open_maps(f"{paths.bpffs}/fastpath")
    try:
        out = []
        for name in names:
            m = maps[name]
            schema, key, value = tables.map_schema(m.fd)
            layout = decode.Layout.of_schema(m.name, key, value, schema)
            ncpu = libbpf.possible_cpus() if m.percpu else 1
            out.append([decode.decode_entry(layout, k, v, m.percpu, ncpu) for k, v in m.items()])
        return out
    finally:
        pins.close_all(maps)


def flows6(paths, client: str) -> dict:
    """client's translated IPv6 flows to VIP6: (sport, dport, proto) ->
    (backend id, backend address, port, last seen), from either tier."""
    est, new = pinned(paths, MAP["FP_MAP_CT6"], MAP["FP_MAP_CT_NEW6"])
    out = {}
    for e in est + new:
        k, v = e["key"], e["value"]
        if k["dir_label"] == "forward" and k["saddr"] == client and k["daddr"] == VIP6:
            out[(k["sport"], k["dport"], k["proto_label"])] = (
                v["backend_id"], v["nat_addr"], v["nat_port"], v["last_seen"])
    return out


def translated6(paths) -> int:
    from agent.model.bpfdefs import load
    defs = load()
    reason = defs.reason_value("service-translated")
    counters, = pinned(paths, MAP["FP_MAP_COUNTERS"])
    return sum(c["value"]["packets"] for c in counters
               if c["key"]["reason"] == reason and c["key"]["family"] == 1)


defs = DEFS.defines


def slot6(ip: str) -> int:
    return mark6_slot(ipaddress.IPv6Address(ip).packed)


def marks6(paths) -> set[int]:
    """The marked entries of the IPv6 address marks (fastpath.h
    FP_MAP_MARK6), read through the pin."""
    from agent.datapath import pinned as pins
    maps = pins.open_maps(f"{paths.bpffs}/fastpath")
    try:
        return {int.from_bytes(bytes(k)[:4], sys.byteorder)
                for k, v in maps[MAP["FP_MAP_MARK6"]].items() if bytes(v)[0]}
    finally:
        pins.close_all(maps)


def test_ipv6_clusterip_flows_translated_per_packet_survive_kill9_and_restart():
    with World(dual_stack=True) as w:
        n1, n2 = w.add_node("n1", enis=1), w.add_node("n2", enis=1)
        a, b, c = n1.add_pod("a"), n1.add_pod("b"), n2.add_pod("c")
        for p in (b, c):
            p.popen(["python3", "-c", ECHO, str(TCP_PORT)])
            p.wait_port(TCP_PORT)
            p.wait_port(UDP_PORT, udp=True)
        objs = [mf.namespace("shop"),
                service("web", ip=[VIP6], ports=(("tcp", 80, "TCP", TCP_PORT),
                                                 ("udp", 53, "UDP", UDP_PORT)),
                        ipFamilies=["IPv6"]),
                eslice("web-6", "web", [ep(b.ip6, node="n1"), ep(c.ip6, node="n2")],
                       ports=(("tcp", TCP_PORT, "TCP"), ("udp", UDP_PORT, "UDP")),
                       address_type="IPv6")]
        with private_paths() as paths, Load(LOAD_MAX_SECONDS) as load:
            mf.write(paths.manifests, "web.yaml", objs)
            agent = AgentProcess(n1, paths).start()
            try:
                for p in (a, b):
                    wire.call(paths.socket, "EndpointAdd", {
                        "netns": p.netns_path, "container_id": f"c-{p.name}",
                        "pod_name": p.name})
                t0 = time.monotonic()
                load.add("a->svc6", a, VIP6, 80, 53)
                assert wait_for(lambda: {f[2] for f in flows6(paths, a.ip6)} == {"TCP", "UDP"})
                time.sleep(2)
                before = flows6(paths, a.ip6)
                count = translated6(paths)
                # the agent armed the marks (docs/ipv6.md "lookups only
                # where they can hit"): every backend a's flows went to
                # (b on this node or c on the other: the choice is
                # random) marked as a reply source, the frontend's address
                # marked; a, the client, not (its replies skip the reverse
                # lookup)
                chosen = {f[1] for f in before.values()}
                assert chosen and chosen <= {b.ip6, c.ip6}
                want = {defs["FP_MARK6_ARMED"], defs["FP_MARK6_FRONTEND"] + slot6(VIP6)} | \
                    {defs["FP_MARK6_REPLY_SRC"] + slot6(ip) for ip in chosen}
                assert want <= marks6(paths)
                assert defs["FP_MARK6_REPLY_SRC"] + slot6(a.ip6) not in marks6(paths) or \
                    slot6(a.ip6) in {slot6(ip) for ip in chosen}

                agent.kill(9)                   # crash: pins and filters stay
                time.sleep(3)                   # traffic on the pinned programs alone
                agent = AgentProcess(n1, paths).start()
                time.sleep(3)
                after = flows6(paths, a.ip6)
                # nothing flushed or re-picked: the same flows on the same
                # backends, still refreshed and translated per packet
                assert {f: v[:3] for f, v in after.items()} == \
                    {f: v[:3] for f, v in before.items()}
                assert all(after[f][3] > before[f][3] for f in before)
                assert translated6(paths) > count
                # the restarted agent found them armed and marked, the
                # flows' replies still restored (the load's peers: VIP6)
                assert want <= marks6(paths)
                running = load.running()
                results = load.results()
                seconds = time.monotonic() - t0
            finally:
                agent.kill(9)
    print("load:", json.dumps(results, sort_keys=True))
    assert running == ["a->svc6"], f"the load client ended early: {results}"
    r = results["a->svc6"]
    assert r["tcp_error"] == "" and r["udp_lost"] == 0, r
    assert seconds - 3 <= r["seconds"] < LOAD_MAX_SECONDS, r
    assert r["tcp_ok"] >= 10 * r["seconds"] and r["udp_ok"] >= 10 * r["seconds"], r
    assert r["peers"] == [VIP6], r
