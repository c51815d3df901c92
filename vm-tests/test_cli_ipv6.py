"""The `fastpath` CLI and metrics for IPv6, against a running agent on a
dual-stack simulated node (issue #17, inspection).

    pod a (client) ─┐
    pod b, pod d ───┴ node n1 ─ eth1 ═ vpc       every pod: IPv4 /32 + IPv6 /128,
                                                 IPv6 default via local_router_ipv6
    NetworkPolicy default/b-from-a: pod b accepts TCP 8080 from pod a only

The pods' IPv6 gateway is not the default (`--local-router-ipv6 fe80::a:1`,
the simulated node lays the pods out with the same): traffic through it
shows the setting reaches both. The agent enforces NetworkPolicy. The CLI
runs as a process in the node's netns, its `--json` output checked against
the pods and against real IPv6 traffic.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from agent.sim import World
from agent.sim import manifests as mf
from agent.sim.agent import node_agent
from agent.sim.traffic import forwarded_datagrams6
from fastpath_helpers import serve_reply

GW6 = "fe80::a:1"


def cluster(pods) -> list[dict]:
    return [mf.namespace("default"),
            *(mf.pod("default", p.name, p.ip, "n1", {"app": p.name}) for p in pods),
            mf.ingress_policy("default", "b-from-a", {"app": "b"}, {"app": "a"},
                              [(8080, "TCP")])]


class Node:
    def __init__(self, world, agent, a, b, d):
        self.world, self.agent, self.node = world, agent, agent.node
        self.a, self.b, self.d = a, b, d
        self.cli = agent.cli
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.cli_json("status")["policy"].get("compiled"):
                break
            time.sleep(0.3)

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def ask(self, pod, target: str, port: int) -> str:
        return pod.run(["sh", "-c", f"printf hi | nc -N -w 2 {target} {port}"], check=False,
                       timeout=10).stdout

    def metrics(self) -> dict:
        """The agent's /metrics, scraped inside the node (metrics_address node-ip)."""
        from prometheus_client.parser import text_string_to_metric_families
        out = self.node.run(["curl", "-s", "-m", "5", f"http://{self.node.ip}:9962/metrics"]
                            ).stdout
        got: dict = {}
        for fam in text_string_to_metric_families(out):
            for s in fam.samples:
                got.setdefault(s.name, []).append((s.labels, s.value))
        return got


def value(samples: dict, name: str, **labels) -> float:
    hits = [v for lab, v in samples.get(name, []) if all(lab.get(k) == w
                                                         for k, w in labels.items())]
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


@pytest.fixture(scope="module")
def n1():
    with World(dual_stack=True, local_router_ipv6=GW6) as w:
        node = w.add_node("n1", enis=1)
        a, b, d = (node.add_pod(n) for n in ("a", "b", "d"))
        for p in (b, d):
            serve_reply(p, 8080, f"from-{p.name}")
            serve_reply(p, 8080, f"from-{p.name}6", host=p.ip6)
        with node_agent(node, ["--policy-enforcement", "default", "--local-router-ipv6", GW6],
                        {"c.yaml": cluster((a, b, d))}) as agent:
            yield Node(w, agent, a, b, d)


def test_the_pods_ipv6_gateway_is_local_router_ipv6_and_traffic_takes_the_fast_path(n1):
    route = json.loads(n1.a.run(["ip", "-6", "-j", "route", "show", "default"]).stdout)
    assert [r["gateway"] for r in route] == [GW6]
    shown = {r["key"]: r for r in n1.cli_json("config", "show")["keys"]}
    assert shown["local_router_ipv6"]["value"] == GW6
    before = forwarded_datagrams6(n1.node)
    assert n1.ask(n1.a, n1.d.ip6, 8080) == "from-d6"
    assert forwarded_datagrams6(n1.node) == before, "the node's stack routed IPv6"


def test_trace_with_ipv6_addresses_agrees_with_real_traffic_and_changes_nothing(n1):
    a, d = n1.a, n1.d
    counters = lambda: n1.cli_json("metrics")
    passed = lambda rows: [r for r in rows if r["reason"] != "passed"]   # the pods' own ND
    before = passed(counters())
    t = n1.cli_json("trace", "--from", "default/a", "--to", f"[{d.ip6}]:8080")
    assert (t["from"]["ip"], t["to"]["ip"], t["family"]) == (a.ip6, d.ip6, "ipv6")
    assert (t["program"]["name"], t["program"]["interface"]) == ("fp_from_pod", a.host_ifname)
    assert (t["reason"], t["redirect"]["kind"], t["redirect"]["ifname"], t["tc_verdict"]) == (
        "redirected-local", "redirect-peer", d.host_ifname, "TC_ACT_REDIRECT")
    assert passed(counters()) == before, "a what-if run counts nothing"
    # named by its IPv6 address, the pod sends from it; echo requests too
    echo = n1.cli_json("trace", "--from", a.ip6, "--to", d.ip6, "--proto", "icmpv6")
    assert (echo["to"]["proto"], echo["reason"], echo["redirect"]["ifname"]) == (
        "ICMPv6", "redirected-local", d.host_ifname)
    text = n1.cli("trace", "--from", "a", "--to", f"[{d.ip6}]:8080").stdout
    assert f"TCP [{a.ip6}]:43210 -> [{d.ip6}]:8080 from default/a" in text
    assert "redirect-peer" in text
    # from the VPC (an address of no pod here; nothing is sent): the ENI's program
    v = n1.cli_json("trace", "--from", "fd00:99::7", "--to", f"[{d.ip6}]:8080", "--proto", "udp")
    assert (v["program"]["name"], v["reason"], v["redirect"]["ifname"]) == (
        "fp_from_vpc", "redirected-local", d.host_ifname)
    # real traffic goes where the traces said
    assert n1.ask(a, d.ip6, 8080) == "from-d6"
    # wrong input: a usage error naming what is expected
    for args in (("--to", f"{d.ip6}:8080"), ("--to", f"[{d.ip}]:8080"),
                 ("--to", d.ip6, "--proto", "icmp"), ("--from", a.ip, "--to", f"[{d.ip6}]:80")):
        full = ("trace", "--from", "a") + args if args[0] == "--to" else ("trace",) + args
        r = n1.cli(*full, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)


def test_monitor_shows_ipv6_drops_with_their_addresses(n1):
    a, b, d = n1.a, n1.b, n1.d
    # --endpoint d: d's veth, and d's addresses of both families (the spoofed
    # datagram is seen on a's veth, addressed to d's IPv6 address)
    mon = n1.agent.cli_popen("monitor", "--json", "--type", "drop", "--duration", "8",
                             "--endpoint", "default/d",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(2.5)
        # d may not reach b (b admits a only); whatever judges IPv6 of an
        # isolated pod, d's connection is dropped, on d's veth
        assert n1.ask(d, b.ip6, 8080) == ""
        # a sends from b's IPv6 address: the guard drops it, whatever policy says
        a.iproute("-6", "addr", "add", f"{b.ip6}/128", "dev", "eth0", "nodad")
        try:
            a.run(["sh", "-c", f"printf x | nc -u -q 0 -w 1 -s {b.ip6} {d.ip6} 9"],
                  check=False, timeout=10)
        finally:
            a.iproute("-6", "addr", "del", f"{b.ip6}/128", "dev", "eth0", check=False)
        out, _ = mon.communicate(timeout=20)
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
    events = [json.loads(l) for l in out.splitlines()]
    six = [e for e in events if e["family"] == "ipv6"]
    to_b = [e for e in six if (e["saddr"], e["daddr"], e["dport"]) == (d.ip6, b.ip6, 8080)]
    assert to_b and to_b[0]["ifname"] == d.host_ifname and to_b[0]["proto"] == "TCP", events
    assert to_b[0]["reason"] == "dropped-policy-denied", to_b
    spoof = [e for e in six if e["reason"] == "dropped-source-spoofed"]
    assert spoof and (spoof[0]["saddr"], spoof[0]["daddr"], spoof[0]["ifname"],
                      spoof[0]["proto"]) == (b.ip6, d.ip6, a.host_ifname, "UDP"), events
    assert all(e["family"] == "ipv4" for e in events if "." in e["saddr"])


def test_metrics_are_labelled_by_family(n1):
    a, d = n1.a, n1.d
    for ip in (d.ip, d.ip6):
        a.ping(ip, count=3)
    rows = {(r["ifname"], r["direction"], r["reason"], r["family"]): r["packets"]
            for r in n1.cli_json("metrics")}
    v4 = rows[(a.host_ifname, "from-pod", "redirected-local", "ipv4")]
    v6 = rows[(a.host_ifname, "from-pod", "redirected-local", "ipv6")]
    assert v4 >= 3 and v6 >= 3
    m = n1.metrics()
    got6 = value(m, "fastpath_forwarded_packets_total", interface=a.host_ifname,
                 direction="from-pod", reason="redirected-local", family="ipv6")
    got4 = value(m, "fastpath_forwarded_packets_total", interface=a.host_ifname,
                 direction="from-pod", reason="redirected-local", family="ipv4")
    assert got6 >= v6 and got4 >= v4
    assert value(m, "fastpath_endpoint_addresses", family="ipv4") == 3
    assert value(m, "fastpath_endpoint_addresses", family="ipv6") == 3
    spoofed = [lab for lab, _ in m.get("fastpath_dropped_packets_total", [])
               if lab["reason"] == "dropped-source-spoofed"]
    assert all(lab["family"] == "ipv6" for lab in spoofed), spoofed
