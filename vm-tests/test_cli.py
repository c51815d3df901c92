"""The `fastpath` CLI against a running agent on a simulated node.

    pod a (client) ─┐
    pod b, pod d ───┴ node n1 ─ eth1 ═ vpc
    Service shop/web: ClusterIP 192.168.99.10:80 -> :8080 (b ready, d terminating),
    sessionAffinity ClientIP
    NetworkPolicy default/b-from-a: pod b accepts TCP 8080 from pod a only

The agent is a real `fastpath agent` process with a manifest-directory
source; the CLI runs as a process in the node's netns, exactly as an SRE
would run it, and its `--json` output is parsed and checked against what the
test knows (pods, MACs, veths, the Service, the policy) and against real
traffic. The agent enforces NetworkPolicy (`--policy-enforcement default`).
"""
from __future__ import annotations

import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from agent.model import bpfdefs
from agent.api import wire
from agent.sim import World
from agent.sim import manifests as mf
from agent.sim.agent import NodeAgent, node_agent
from fastpath_helpers import inject_truncated, serve_reply
from socket_clients import held

VIP = "192.168.99.10"
DEFS = bpfdefs.load()
M = {k[len("FP_MAP_"):].lower(): v for k, v in DEFS.maps.items()}


def cluster(b, d, pods) -> list[dict]:
    """Service shop/web (ClientIP affinity) with b ready and d terminating,
    the pods (app=<name>), and b's NetworkPolicy."""
    return [mf.namespace("default"),
            mf.service("shop", "web", VIP, 80, 8080, affinity_seconds=600),
            mf.endpoint_slice("shop", "web", 8080, [(b.ip, "ready", "n1"),
                                                    (d.ip, "terminating", "n1")]),
            *(mf.pod("default", p.name, p.ip, "n1", {"app": p.name}) for p in pods),
            mf.ingress_policy("default", "b-from-a", {"app": "b"}, {"app": "a"},
                              [(8080, "TCP")])]


class Node:
    """The agent on n1 with its pods a (client), b and d (servers)."""

    def __init__(self, world, agent: NodeAgent, a, b, d):
        self.world, self.agent, self.node, self.paths = world, agent, agent.node, agent.paths
        self.a, self.b, self.d = a, b, d
        self.root = f"{agent.paths.bpffs}/fastpath"
        self.cli = agent.cli
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = self.cli_json("status")
            if (st.get("services") or {}).get("frontends") and st["policy"].get("compiled"):
                break
            time.sleep(0.3)

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def ask(self, pod, target: str, port: int) -> str:
        return pod.run(["sh", "-c", f"printf hi | nc -N -w 2 {target} {port}"], check=False,
                       timeout=10).stdout


@pytest.fixture(scope="module")
def n1():
    with World() as w:
        node = w.add_node("n1", enis=1)
        a, b, d = (node.add_pod(n) for n in ("a", "b", "d"))
        serve_reply(b, 8080, "from-b")
        serve_reply(d, 8080, "from-d")
        with node_agent(node, ["--policy-enforcement", "default"],
                        {"web.yaml": cluster(b, d, (a, b, d))}) as agent:
            yield Node(w, agent, a, b, d)


def test_prog_net_and_map_list_show_what_is_attached_and_pinned(n1):
    hosts = {p.host_ifname for p in (n1.a, n1.b, n1.d)}
    net = n1.cli_json("net", "show")
    tc = {(r["target"], r["hook"]): r for r in net if r["kind"] == "tc"}
    for veth in hosts:
        assert tc[(veth, "ingress")]["prog_name"] == "fp_from_pod"
        assert tc[(veth, "egress")]["prog_name"] == "fp_to_pod"
        assert tc[(veth, "ingress")]["priority"] == 25000
    assert tc[("eth1", "ingress")]["prog_name"] == "fp_from_vpc"
    assert tc[("eth1", "egress")]["prog_name"] == "fp_to_vpc"
    assert tc[("lo", "egress")]["prog_name"] == "fp_lo"     # the node's SCTP to itself
    assert ("lo", "ingress") not in tc
    progs = {p["name"]: p for p in n1.cli_json("prog", "show")}
    assert progs["fp_lo"]["attached_to"] == ["lo/egress"]
    assert set(progs) >= {"fp_from_pod", "fp_to_pod", "fp_from_vpc", "fp_to_vpc"}
    assert progs["fp_from_pod"]["attached"] == 3
    assert sorted(progs["fp_from_pod"]["attached_to"]) == sorted(f"{h}/ingress" for h in hosts)
    assert progs["fp_from_pod"]["id"] == tc[(n1.a.host_ifname, "ingress")]["prog_id"]
    assert M["endpoints"] in progs["fp_from_pod"]["maps"]
    # the programs reached by tail call only (fp_vpc6_sctp among them) are
    # listed too, attached nowhere
    from agent.datapath.loader import TAIL_CALLS
    assert set(TAIL_CALLS) <= set(progs), set(TAIL_CALLS) - set(progs)
    assert progs["fp_vpc6_sctp"]["attached"] == 0 and progs["fp_vpc6_sctp"]["verified_insns"] > 0
    maps = {m["name"]: m for m in n1.cli_json("map", "list")}
    pinned_names = {v for k, v in M.items() if k != "testrec"}
    assert pinned_names <= set(maps), pinned_names - set(maps)
    ep = maps[M["endpoints"]]
    assert (ep["entries"], ep["key_size"], ep["value_size"], ep["type"]) == (3, 4, 28, "hash")
    assert ep["fill"] == round(3 / ep["max_entries"], 4) and ep["decoded"]
    assert maps[M["events"]]["type"] == "ringbuf" and maps[M["events"]]["entries"] is None
    assert maps[M["config"]]["type"] == "array" and maps[M["config"]]["fill"] is None
    text = n1.cli("map", "list").stdout
    assert text.splitlines()[0].split()[:4] == ["NAME", "ALIAS", "TYPE", "KEY"]


def test_map_dump_decodes_every_map(n1):
    ep = n1.cli_json("map", "dump", "endpoints")
    got = {e["key"]["ip4"]: e["value"] for e in ep["entries"]}
    for p in (n1.a, n1.b, n1.d):
        v = got[p.ip]
        assert (v["pod_mac"], v["host_ifindex"]) == (p.mac, p.host_ifindex), p
        assert v["flags_names"] == ["registered"]
    svc = n1.cli_json("map", "dump", "services")["entries"]
    assert [(e["key"]["vip"], e["key"]["port"], e["key"]["proto_label"]) for e in svc] == [
        (VIP, 80, "TCP")]
    assert svc[0]["value"]["flags_names"] == ["affinity"]
    assert svc[0]["value"]["affinity_timeout"] == 600
    bes = n1.cli_json("map", "dump", "backends")["entries"]
    # d is terminating while b is ready: kept, draining, for the flows on it
    assert sorted((e["value"]["ip"], e["value"]["port"], e["value"]["flags_names"])
                  for e in bes) == [(n1.b.ip, 8080, []), (n1.d.ip, 8080, ["draining"])]
    bypass = n1.cli_json("map", "dump", "bypass")["entries"]
    assert [(e["key"]["addr"], e["key"]["prefixlen"]) for e in bypass] == [("169.254.20.10", 32)]
    for alias in M:
        if alias in ("testrec", "events"):
            continue
        r = n1.cli("map", "dump", alias, "--json")
        assert json.loads(r.stdout)["map"] == M[alias]
    r = n1.cli("map", "dump", "events", check=False)
    assert r.returncode == 1 and "fastpath monitor" in r.stderr
    r = n1.cli("map", "dump", "nosuchmap", check=False)
    assert r.returncode == 1 and "aliases" in r.stderr
    # counters are per CPU in the kernel, summed here: equal to the agent's own sum
    n1.a.ping(n1.d.ip, count=2)        # d is not isolated (b accepts only TCP 8080)
    mine = {(r["key"]["ifindex"], r["key"]["dir_label"], r["key"]["reason_label"]):
            r["value"]["packets"] for r in n1.cli_json("map", "dump", "counters")["entries"]}
    theirs = {(r["ifindex"], r["direction"], r["reason"]): r["packets"]
              for r in wire.call(n1.paths.socket, "Counters")}
    assert mine == theirs and mine[(n1.a.host_ifindex, "from-pod", "redirected-local")] >= 2


def test_endpoints_services_and_status_join_the_agents_names(n1):
    eps = {e["ip"]: e for e in n1.cli_json("endpoint", "list")}
    for p in (n1.a, n1.b, n1.d):
        e = eps[p.ip]
        assert (e["pod"], e["host_ifname"], e["eni"], e["pod_mac"]) == (
            f"default/{p.name}", p.host_ifname, "eth1", p.mac)
    assert eps[n1.b.ip]["policy"]["ingress"].startswith("enforced(")
    assert eps[n1.b.ip]["policy"]["egress"] == "open"
    assert eps[n1.a.ip]["policy"] in ({"state": "not-isolated"},
                                      {"ingress": "open", "egress": "open"})
    one = n1.cli_json("endpoint", "get", "default/b")
    assert one["ip"] == n1.b.ip and one["host_ifindex"] == n1.b.host_ifindex
    assert n1.cli("endpoint", "get", "nope", check=False).returncode == 1
    svc = n1.cli_json("service", "get", "shop/web")
    assert len(svc) == 1
    s = svc[0]
    assert (s["frontend"], s["service"], s["port_name"], s["affinity"], s["traffic_policy"]) == (
        f"{VIP}:80/TCP", "shop/web", "http", "ClientIP", "Cluster")
    # kube-proxy's choice: the ready endpoint only (d is terminating)
    assert [(b["ip"], b["port"], b["state"], b["node"]) for b in s["backends"]] == [
        (n1.b.ip, 8080, "ready", "n1")]
    assert n1.cli_json("bpf", "lb", "list") == n1.cli_json("service", "list")
    assert n1.cli("service", "get", "192.168.99.99", check=False).returncode == 1
    st = n1.cli_json("status")
    assert st["agent"]["reachable"] and st["agent"]["ready"] and st["agent"]["endpoints"] == 3
    assert st["source"]["state"] == "synced" and st["source"]["objects"]["Service"] == 1
    assert st["services"]["frontends"] == 1 and st["services"]["errors"] == 0
    assert st["config"]["bpffs_root"] == n1.root and st["config_sources"]["node_name"] == "flag"
    assert st["kernel"]["helpers"]["redirect_peer"] and st["pressure"] == []
    assert st["policy"]["enforcement"] == "default" and st["policy"]["compiled"]
    assert st["policy"]["policies"] >= 1 and st["policy"]["errors"] == 0
    assert {m["name"] for m in st["maps"]} >= {M["endpoints"], M["ct"]}


def test_conntrack_list_top_and_flush_after_real_connections(n1):
    n1.cli("ct", "flush", "--all")
    with held(n1.a, VIP, 80) as answer:
        assert answer == "from-b"
        listed_while_held(n1)
    # the flow still works: a new SYN makes new entries (affinity keeps b)
    with held(n1.a, VIP, 80) as answer:
        assert answer == "from-b"
        again = n1.cli_json("ct", "list", "--src", n1.a.ip)
        assert len([r for r in again if r["dir"] in ("forward", "reply")]) == 2


def listed_while_held(n1):
    rows = [r for r in n1.cli_json("ct", "list", "--src", n1.a.ip)
            if r["dir"] in ("forward", "reply")]      # policy entries aside
    fwd = [r for r in rows if r["dir"] == "forward"]
    rep = [r for r in rows if r["dir"] == "reply"]
    assert len(fwd) == 1 and len(rep) == 1, rows
    assert (fwd[0]["daddr"], fwd[0]["dport"], fwd[0]["nat_addr"], fwd[0]["nat_port"]) == (
        VIP, 80, n1.b.ip, 8080)
    assert (rep[0]["saddr"], rep[0]["daddr"], rep[0]["nat_addr"]) == (n1.b.ip, n1.a.ip, VIP)
    assert fwd[0]["client_port"] == rep[0]["client_port"] and 0 <= fwd[0]["age_seconds"] < 30
    everything = n1.cli_json("ct", "list")
    assert all(r["client"] == n1.a.ip for r in everything), everything
    assert n1.cli_json("ct", "list", "--src", n1.b.ip) == []

    def same(rs):
        return sorted((r["dir"], r["saddr"], r["sport"], r["daddr"], r["dport"]) for r in rs)
    assert same(n1.cli_json("ct", "list", "--dst", n1.b.ip, "--proto", "tcp")) == same(
        everything)
    assert n1.cli_json("ct", "list", "--proto", "udp") == []
    top = n1.cli_json("ct", "list", "--top", "2")
    n = len(everything)
    assert top["entries"] == n and [(t["ip"], t["entries"]) for t in top["top"]] == sorted(
        [(n1.a.ip, n), (n1.b.ip, n)])
    assert {t["pod"] for t in top["top"]} == {"default/a", "default/b"}
    assert n1.cli("ct", "flush", check=False).returncode == 2
    assert n1.cli_json("ct", "flush", "--src", n1.a.ip) == {"matched": n, "deleted": n}
    assert n1.cli_json("ct", "list") == []


def test_trace_agrees_with_real_traffic_and_changes_nothing(n1):
    n1.cli("ct", "flush", "--all")
    def ipv4_counters():
        # pods send ARP and IPv6 neighbour discovery on their own (counted
        # as "passed"); a what-if run of this trace would count neither
        return [e for e in n1.cli_json("map", "dump", "counters")["entries"]
                if e["key"]["reason_label"] != "passed"]
    before_counters = ipv4_counters()
    t = n1.cli_json("trace", "--from", "default/a", "--to", f"{VIP}:80")
    assert t["service"]["svc_id"] > 0 and t["service"]["service"] == "shop/web"
    assert (t["service"]["nat_daddr"], t["service"]["nat_dport"]) == (n1.b.ip, 8080)
    assert t["redirect"]["kind"] == "redirect-peer"
    assert t["redirect"]["ifname"] == n1.b.host_ifname and t["tc_verdict"] == "TC_ACT_REDIRECT"
    assert t["reason"] == "redirected-local" and not t["dropped"]
    # a what-if run leaves no trace in the maps
    assert n1.cli_json("ct", "list") == []
    assert ipv4_counters() == before_counters
    # and the real packet goes where the trace said
    with held(n1.a, VIP, 80) as answer:
        assert answer == "from-b"
        fwd = [r for r in n1.cli_json("ct", "list") if r["dir"] == "forward"]
    assert [(r["nat_addr"], r["nat_port"]) for r in fwd] == [
        (t["service"]["nat_daddr"], t["service"]["nat_dport"])]
    direct = n1.cli_json("trace", "--from", n1.a.ip, "--to", f"{n1.d.ip}:8080", "--proto", "udp")
    assert direct["service"] is None and direct["redirect"]["ifname"] == n1.d.host_ifname
    text = n1.cli("trace", "--from", "a", "--to", f"{VIP}:80").stdout
    assert "shop/web" in text and "redirect-peer" in text
    assert n1.cli("trace", "--from", "zz", "--to", f"{VIP}:80", check=False).returncode == 1
    assert n1.cli("trace", "--from", "a", "--to", VIP, check=False).returncode == 2


def test_monitor_streams_drops_and_traces_and_clears_its_event_bits(n1):
    # drops nobody reads stay in the ring buffer: the monitor must not
    # report them as if they happened now
    inject_truncated(n1.a)
    started_ns = time.monotonic_ns()
    mon = n1.agent.cli_popen("monitor", "--json", "--duration", "8", "--endpoint", "default/a",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        settings = n1.cli_json("map", "dump", "config")["entries"][0]["value"]
        mon_bits = n1.cli_json("map", "dump", "monitor")["entries"][0]["value"]
        deadline = time.monotonic() + 10
        while not mon_bits["events_names"] and time.monotonic() < deadline:
            time.sleep(0.2)
            mon_bits = n1.cli_json("map", "dump", "monitor")["entries"][0]["value"]
        assert set(mon_bits["events_names"]) == {"trace", "policy"}
        # the agent's settings are not the monitor's to write
        assert n1.cli_json("map", "dump", "config")["entries"][0]["value"] == settings
        assert n1.ask(n1.a, VIP, 80) == "from-b"
        inject_truncated(n1.b)      # not a's: filtered out
        inject_truncated(n1.a)
        out, err = mon.communicate(timeout=20)
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
    events = [json.loads(l) for l in out.splitlines()]
    drops = [e for e in events if e["type"] == "drop"]
    traces = [e for e in events if e["type"] == "trace"]
    assert drops and all(e["ifname"] == n1.a.host_ifname for e in drops), events
    assert {e["reason"] for e in drops} == {"dropped-invalid-packet"}
    assert all(e["ts_ns"] > started_ns for e in events), "events from before the monitor"
    syn = [e for e in traces if e["daddr"] == VIP and e["saddr"] == n1.a.ip]
    assert syn and syn[0]["nat"] and (syn[0]["nat_daddr"], syn[0]["nat_dport"]) == (
        n1.b.ip, 8080)
    assert syn[0]["reason"] == "redirected-local" and syn[0]["ifname"] == n1.a.host_ifname
    mon_bits = n1.cli_json("map", "dump", "monitor")["entries"][0]["value"]
    assert mon_bits["events"] == 0, "the monitor left its event bits set"


def test_policy_verdicts_in_trace_monitor_and_policy_get(n1):
    allowed = n1.cli_json("trace", "--from", "a", "--to", f"{n1.b.ip}:8080")
    denied = n1.cli_json("trace", "--from", "d", "--to", f"{n1.b.ip}:8080")
    ing = allowed["policy"]["ingress"]
    assert (ing["verdict"], ing["policy"]) == ("allow", "default/b-from-a") and ing["policy_id"]
    assert not allowed["dropped"] and allowed["redirect"]["ifname"] == n1.b.host_ifname
    assert denied["dropped"] and denied["reason"] == "dropped-policy-denied"
    ing_d = denied["policy"]["ingress"]
    assert (ing_d["verdict"], ing_d["policy"], ing_d["policy_id"]) == (
        "deny", "default/b-from-a", ing["policy_id"])
    text = n1.cli("trace", "--from", "d", "--to", f"{n1.b.ip}:8080").stdout
    assert "DROP (dropped-policy-denied)" in text and "default/b-from-a" in text
    mon = n1.agent.cli_popen("monitor", "--json", "--type", "drop", "--duration", "8",
                             "--count", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(2.5)
        # real traffic agrees with both traces
        assert n1.ask(n1.a, n1.b.ip, 8080) == "from-b"
        assert n1.ask(n1.d, n1.b.ip, 8080) == ""
        out, _ = mon.communicate(timeout=20)
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
    drop = json.loads(out.splitlines()[0])
    assert (drop["type"], drop["reason"], drop["policy_id"], drop["policy"]) == (
        "drop", "dropped-policy-denied", ing["policy_id"], "default/b-from-a")
    assert (drop["saddr"], drop["daddr"], drop["dport"]) == (n1.d.ip, n1.b.ip, 8080)
    pol = n1.cli_json("policy", "get", "default/b")
    assert pol["pod"] == "default/b" and pol["ip"] == n1.b.ip
    assert pol["directions"]["ingress"]["enforced"] is True
    assert pol["directions"]["ingress"]["deciding"] == ["default/b-from-a"]
    assert pol["directions"]["egress"]["enforced"] is False
    from_a = [r for r in pol["rules"] if r["policies"] == ["default/b-from-a"]]
    assert from_a and all(r["direction"] == "ingress" and r["ports"] == "TCP/8080"
                          for r in from_a), pol["rules"]
    assert all(r["in_map"] for r in pol["rules"]), "a rule of the state is not in the map"
    assert sum(r["flows"] for r in from_a) >= 1      # a's connection was admitted
    assert "default/b-from-a" in n1.cli("policy", "get", n1.b.ip).stdout
    verdicts = {(r["policy"], r["direction"], r["verdict"]): r["flows"]
                for r in n1.cli_json("metrics", "--policy")}
    assert verdicts[("default/b-from-a", "ingress", "deny")] >= 1
    assert verdicts[("default/b-from-a", "ingress", "allow")] >= 1
    assert n1.cli("policy", "get", "nobody", check=False).returncode == 1


def test_trace_from_the_vpc_runs_the_enis_program_and_agrees_with_real_traffic(n1):
    vpc = n1.world.vpc
    src = json.loads(vpc.run(["ip", "-j", "route", "get", n1.d.ip]).stdout)[0]["prefsrc"]
    to_d = n1.cli_json("trace", "--from", src, "--to", f"{n1.d.ip}:8080")
    assert (to_d["program"]["name"], to_d["program"]["interface"]) == ("fp_from_vpc", "eth1")
    assert to_d["redirect"]["ifname"] == n1.d.host_ifname and not to_d["dropped"]
    to_b = n1.cli_json("trace", "--from", src, "--to", f"{n1.b.ip}:8080")
    assert to_b["dropped"] and to_b["reason"] == "dropped-policy-denied"
    assert to_b["policy"]["ingress"]["policy"] == "default/b-from-a"
    assert n1.ask(vpc, n1.d.ip, 8080) == "from-d"
    assert n1.ask(vpc, n1.b.ip, 8080) == ""
    r = n1.cli("trace", "--from", src, "--to", "10.99.0.1:80", check=False)
    assert r.returncode == 2 and "--via" in r.stderr
    via = n1.cli_json("trace", "--from", src, "--to", f"{n1.d.ip}:8080", "--via", "eth1")
    assert via["redirect"] == to_d["redirect"]


def sctp_service(b) -> list[dict]:
    return [mf.service("shop", "sig", "192.168.99.11", 2905, 2906, "sig", "SCTP"),
            mf.endpoint_slice("shop", "sig", 2906, [(b.ip, "ready", "n1")], "sig", "SCTP")]


def test_trace_builds_an_sctp_init_and_shows_its_translation(n1):
    # this kernel has no SCTP module: the trace (an INIT through the live
    # programs) is how an SCTP frontend is checked here
    path = n1.agent.write("sig.yaml", sctp_service(n1.b))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(r["proto"] == "SCTP" for r in n1.cli_json("service", "list")):
                break
            time.sleep(0.3)
        t = n1.cli_json("trace", "--from", "default/a", "--to", "192.168.99.11:2905",
                        "--proto", "sctp")
        assert t["to"]["proto"] == "SCTP" and t["service"]["service"] == "shop/sig"
        assert (t["service"]["nat_daddr"], t["service"]["nat_dport"]) == (n1.b.ip, 2906)
        # b's NetworkPolicy admits TCP 8080 from a, nothing else: the trace
        # shows the SCTP association denied by it, as a real INIT would be
        assert t["dropped"] and t["reason"] == "dropped-policy-denied", t
        # a port the ClusterIP does not have: no translation
        other = n1.cli_json("trace", "--from", "default/a", "--to", "192.168.99.11:2907",
                            "--proto", "sctp")
        assert other["service"] is None
        # echo requests are traced (--proto icmp); a protocol trace cannot build is refused
        assert n1.cli("trace", "--from", "a", "--to", f"{VIP}:80", "--proto", "gre",
                      check=False).returncode == 2
    finally:
        path.unlink()


def test_agent_down_maps_still_read_and_exit_codes_say_so(n1, tmp_path):
    bt = tmp_path / "bt.tar.gz"
    assert n1.cli_json("bugtool", "-o", str(bt))["archive"] == str(bt)
    with tarfile.open(bt) as tar:
        names = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix()
                 for m in tar.getmembers()}
        top = tar.getmembers()[0].name.split("/")[0]
        status = json.load(tar.extractfile(f"{top}/status.json"))
        services = json.load(tar.extractfile(f"{top}/services.json"))
        log = tar.extractfile(f"{top}/agent.log").read().decode()
    assert {"status.json", "services.json", "endpoints.json", "conntrack.json", "metrics.json",
            "config.json", "agent.log", "programs.json", "attachments.json", "maps.json",
            f"map/{M['endpoints']}.json", "errors.json"} <= names
    assert status["agent"]["ready"] and services[0]["service"] == "shop/web"
    assert "endpoint added" in log
    n1.agent.kill(9)
    try:
        eps = n1.cli_json("endpoint", "list")
        assert {e["ip"] for e in eps} == {n1.a.ip, n1.b.ip, n1.d.ip}
        assert all(e["pod"] == "" for e in eps)
        svc = n1.cli_json("service", "list")
        assert svc[0]["service"] == "" and svc[0]["backends"][0]["ip"] == n1.b.ip
        r = n1.cli("service", "list", check=False)
        assert r.returncode == 0 and "agent not reachable" in r.stderr
        r = n1.cli("status", "--json", check=False)
        assert r.returncode == 3
        st = json.loads(r.stdout)
        assert not st["agent"]["reachable"] and len(st["maps"]) >= 10
        pol = n1.cli_json("policy", "get", n1.b.ip)
        assert pol["directions"]["ingress"]["enforced"] and pol["rules"]
        assert all(r["policy_ids"][0] > 0 and r["flows"] is not None for r in pol["rules"])
        r = n1.cli("map", "list", "--bpffs-root", "/nonexistent/fp", check=False)
        assert r.returncode == 1 and "no fastpath maps are pinned" in r.stderr
    finally:
        n1.agent.start()
    assert n1.cli_json("status")["agent"]["ready"]
