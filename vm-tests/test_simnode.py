"""The simulated Terway node harness (agent.sim), proven with plain stack routing.

Everything fastpath does is later proven on these worlds, so this file checks
that a world (1) carries traffic along the same paths as a real ENIMultiIP
node, (2) reproduces the seed node's layout rule for rule, and (3) leaves
nothing behind however its owner ends. No BPF is attached anywhere here.

      pod a ─cali─┐                      ┌─cali─ pod c
      pod b ─cali─┤ node n1     vpc      ├ node n2
                  ├ eth0 ───────┤├─────── eth0
                  ├ eth1 (ENI) ─┤├─────── eth1 (ENI)
                  └ eth2 (ENI) ─┘
"""
import json
import re
import signal
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest

from agent.sim import World, cleanup_stale, plan
from agent.sim.netns import LOCK_DIR, list_netns
from agent.sim.traffic import forwarded_datagrams, tcp_exchange, udp_send

REPO = Path(__file__).resolve().parent.parent


def _tx_bytes(ns, ifname) -> int:
    return int(ns.run(["cat", f"/sys/class/net/{ifname}/statistics/tx_bytes"]).stdout)


def _route_get(node, dst, src, iif) -> dict:
    return node.ip_json("route", "get", dst, "from", src, "iif", iif)[0]


def _leftovers(tag: str) -> dict:
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    return {
        "netns": [n for n in list_netns() if plan.tag_of(n) == tag],
        "links": [l["ifname"] for l in links if plan.tag_of(l["ifname"]) == tag],
        "lock": (LOCK_DIR / f"{plan.PREFIX}{tag}.lock").exists(),
    }


# -- traffic ------------------------------------------------------------------

def test_pods_on_one_node_talk_icmp_tcp_udp_without_touching_the_vpc(world, node):
    a, b = node.add_pod("a"), node.add_pod("b")
    before = forwarded_datagrams(world.vpc)
    a.ping(b.ip)
    b.ping(a.ip)
    assert tcp_exchange(a, b) == ("ping", "pong")
    assert tcp_exchange(b, a) == ("ping", "pong")
    assert udp_send(a, b) == "dgram"
    assert udp_send(b, a) == "dgram"
    # Rule 512 (to podIP lookup main) must win over the ENI table, so
    # same-node traffic never goes out to the VPC and back.
    assert forwarded_datagrams(world.vpc) == before
    r = _route_get(node, b.ip, a.ip, a.host_ifname)
    assert r["dev"] == b.host_ifname


def test_pods_on_two_nodes_talk_through_their_enis(world):
    n1, n2 = world.add_node("n1", enis=2), world.add_node("n2", enis=1)
    a, b = n1.add_pod("a", eni=1), n1.add_pod("b", eni=2)
    c = n2.add_pod("c", eni=1)
    for src, dst in ((a, c), (c, a), (b, c), (c, b)):
        src.ping(dst.ip)
        assert tcp_exchange(src, dst) == ("ping", "pong"), (src, dst)
        assert udp_send(src, dst) == "dgram", (src, dst)

    # Each pod's egress leaves through its own ENI's table (rule 2048) ...
    r = _route_get(n1, c.ip, a.ip, a.host_ifname)
    assert (r["dev"], r["gateway"]) == ("eth1", n1.eni(1).gateway)
    r = _route_get(n1, c.ip, b.ip, b.host_ifname)
    assert (r["dev"], r["gateway"]) == ("eth2", n1.eni(2).gateway)

    # ... and really does: 20 x 1 KB pings from b leave on eth2, not eth0/eth1
    # (margin for the few IPv6 link-local packets a fresh veth sends).
    tx = {i: _tx_bytes(n1, i) for i in ("eth0", "eth1", "eth2")}
    b.run(["busybox", "ping", "-q", "-c", "20", "-i", "0.05", "-s", "1000", "-w", "5", c.ip])
    delta = {i: _tx_bytes(n1, i) - tx[i] for i in tx}
    assert delta["eth2"] >= 20 * 1000
    assert delta["eth0"] < 5000 and delta["eth1"] < 5000, delta

    # The VPC routes pod IPs via ENI addresses: it resolves ENIs, never pods.
    neigh = {e["dst"] for e in world.vpc.ip_json("neigh", "show") if "." in e["dst"]}
    assert {a.ip, b.ip, c.ip}.isdisjoint(neigh)
    assert {n1.eni(1).ip, n1.eni(2).ip, n2.eni(1).ip} <= neigh


def test_node_and_its_pods_reach_each_other(world, node):
    a = node.add_pod("a")
    node.ping(a.ip)
    a.ping(node.ip)
    assert tcp_exchange(node, a) == ("ping", "pong")
    assert tcp_exchange(a, node, node.ip) == ("ping", "pong")
    assert udp_send(node, a) == "dgram"


def test_nodes_reach_each_other_on_the_node_vswitch(world):
    n1, n2 = world.add_node("n1"), world.add_node("n2")
    n1.ping(n2.ip)
    assert tcp_exchange(n1, n2, n2.ip) == ("ping", "pong")


def test_an_external_client_reaches_nodes_and_pods_through_the_vpc(world):
    #   client ── vpc ══ eth0 n1 (10.240.0.11)
    #                ╚══ eth1 n1 ── pod a
    n1 = world.add_node("n1", enis=1)
    a = n1.add_pod("a")
    c = world.add_client("ext")
    assert c.ip == plan.client_ip(1) and c.netns == plan.client_ns(world.tag, "ext")
    assert tcp_exchange(c, n1, n1.ip) == ("ping", "pong")
    assert tcp_exchange(c, a, a.ip) == ("ping", "pong")
    assert tcp_exchange(a, c, c.ip) == ("ping", "pong")
    # an address the vpc routes to the node (an external or load-balancer
    # IP) arrives on the node's eth0
    n1.iproute("addr", "add", "203.0.113.7/32", "dev", "lo")
    world.route_to_node("203.0.113.7", n1)
    assert tcp_exchange(c, n1, "203.0.113.7", port=7002) == ("ping", "pong")


def test_direct_pair_is_one_veth_with_nothing_in_between(world):
    pair = world.add_direct_pair()
    pair.a.ping(pair.b.ip)
    assert tcp_exchange(pair.a, pair.b) == ("ping", "pong")
    assert udp_send(pair.b, pair.a) == "dgram"
    for end in pair:
        assert [l["ifname"] for l in end.ip_json("link", "show")] == ["lo", "eth0"]
        addrs = end.ip_json("-4", "addr", "show", "dev", "eth0")[0]["addr_info"]
        assert [(x["local"], x["prefixlen"]) for x in addrs] == [(end.ip, 32)]


# -- layout (the seed node, rule for rule) -------------------------------------

def test_node_and_pod_layout_match_the_terway_seed(world):
    node = world.add_node("n1", enis=2)
    a = node.add_pod("a", eni=1)
    b = node.add_pod("b", eni=2)

    # Node NICs: eth0 in a /24 with the default route; ENIs hold a /32 each.
    eth0 = node.ip_json("-4", "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert [(x["local"], x["prefixlen"]) for x in eth0] == [(node.ip, 24)]
    for eni in node.enis:
        addrs = node.ip_json("-4", "addr", "show", "dev", eni.name)[0]["addr_info"]
        assert [(x["local"], x["prefixlen"]) for x in addrs] == [(eni.ip, 32)]
        assert eni.table == 1000 + eni.ifindex == 1000 + node.link(eni.name)["ifindex"]
        assert eni.mac == node.link(eni.name)["address"]
        table = node.ip_json("route", "show", "table", str(eni.table))
        assert len(table) == 1
        assert (table[0]["dst"], table[0]["gateway"], table[0]["dev"]) == ("default", eni.gateway, eni.name)
        assert "onlink" in table[0]["flags"]
    main = node.ip_json("route", "show", "table", "main")
    default = [r for r in main if r["dst"] == "default"]
    assert [(r["gateway"], r["dev"]) for r in default] == [(plan.NODE_GATEWAY, "eth0")]

    # Rules: exactly the seed's shape, one pair per pod.
    rules = node.ip_json("rule", "show")
    for pod in (a, b):
        assert {"priority": 512, "src": "all", "dst": pod.ip, "table": "main"} in \
            [{k: r.get(k) for k in ("priority", "src", "dst", "table")} for r in rules]
        assert any(r["priority"] == 2048 and r.get("src") == pod.ip and r["table"] == str(pod.eni.table)
                   for r in rules)
    assert a.eni.table != b.eni.table

    for pod in (a, b):
        # Host side: Terway-style name, endpoint route, ifindex/MAC as exposed.
        assert re.fullmatch(r"cali[0-9a-f]{11}", pod.host_ifname)
        host = node.link(pod.host_ifname)
        assert (host["ifindex"], host["address"]) == (pod.host_ifindex, pod.host_mac)
        ep = [r for r in main if r["dst"] == pod.ip]
        assert len(ep) == 1 and ep[0]["dev"] == pod.host_ifname and ep[0]["scope"] == "link"
        assert "gateway" not in ep[0]

        # Pod side: eth0 with the /32, default via 169.254.1.1 onlink, and a
        # permanent neighbour entry pointing at the host side's MAC.
        inner = pod.link("eth0")
        assert (inner["ifindex"], inner["address"]) == (pod.ifindex, pod.mac)
        assert inner["link_index"] == pod.host_ifindex   # the peer is our cali
        addrs = pod.ip_json("-4", "addr", "show")
        v4 = [(l["ifname"], x["local"], x["prefixlen"]) for l in addrs for x in l["addr_info"]]
        assert v4 == [("lo", "127.0.0.1", 8), ("eth0", pod.ip, 32)]
        routes = pod.ip_json("route", "show")
        assert len(routes) == 1
        assert (routes[0]["dst"], routes[0]["gateway"], routes[0]["dev"]) == ("default", "169.254.1.1", "eth0")
        assert "onlink" in routes[0]["flags"]
        neigh = pod.ip_json("neigh", "show", "dev", "eth0")
        assert [(n["dst"], n["lladdr"], n["state"]) for n in neigh] == \
            [("169.254.1.1", pod.host_mac, ["PERMANENT"])]
        assert Path(pod.netns_path) == Path("/var/run/netns") / pod.netns
        assert Path(pod.netns_path).exists()

        # Pod IP drawn from its ENI's vSwitch, on this node's slice of it.
        assert pod.ip.startswith(f"10.{240 + pod.eni.index}.{node.index}.")

        # The VPC routes the pod IP via the ENI address, onlink.
        vr = world.vpc.ip_json("route", "show", f"{pod.ip}/32")
        assert [(r["gateway"], r["dev"]) for r in vr] == [(pod.eni.ip, pod.eni.vpc_ifname)]

    # Forwarding on in node and vpc; rp_filter off on the node, whose ENI
    # traffic arrives on interfaces the main table does not route back through.
    assert node.sysctl_get("net.ipv4.ip_forward") == "1"
    assert world.vpc.sysctl_get("net.ipv4.ip_forward") == "1"
    for dev in ("all", "default", "eth0", "eth1", "eth2", a.host_ifname):
        assert node.sysctl_get(f"net.ipv4.conf.{dev}.rp_filter") == "0", dev

    # lo is up in every namespace the world made.
    for ns in [world.vpc, node, a, b]:
        assert "UP" in ns.link("lo")["flags"], ns


def test_every_name_carries_the_world_tag_and_fits_ifnamsiz(world):
    node = world.add_node("n1", enis=3)
    node.add_pod("a")
    world.add_direct_pair()
    for ns in world.netns_names():
        assert plan.tag_of(ns) == world.tag, ns
    for link in world.vpc.ip_json("link", "show"):
        if link["ifname"] != "lo":
            assert plan.tag_of(link["ifname"]) == world.tag
        assert len(link["ifname"]) <= 15
    # A pod of the same name in another world gets a different host-side name.
    other = f"{(int(world.tag, 16) + 1) % 0x10000:04x}"
    assert plan.cali_name(world.tag, "a") != plan.cali_name(other, "a")


def test_remove_pod_undoes_everything_add_pod_did(world, node):
    a, b = node.add_pod("a"), node.add_pod("b")
    server = b.popen(["sleep", "60"])
    node.remove_pod(b)
    assert server.poll() is not None
    assert b.netns not in list_netns()
    assert b.host_ifname not in [l["ifname"] for l in node.ip_json("link", "show")]
    assert not any(b.ip in (r.get("src"), r.get("dst")) for r in node.ip_json("rule", "show"))
    assert not [r for r in node.ip_json("route", "show", "table", "all") if r.get("dst") == b.ip]
    assert not world.vpc.ip_json("route", "show", f"{b.ip}/32")
    assert node.pods == [a]
    # The node keeps working, and a new pod never reuses the removed IP.
    c = node.add_pod("c")
    assert c.ip != b.ip
    assert tcp_exchange(a, c) == ("ping", "pong")


def test_bad_requests_fail_loudly_and_leave_the_world_usable(world, node):
    node.add_pod("a")
    with pytest.raises(ValueError):
        node.add_pod("a")                   # pod names are unique per world
    with pytest.raises(ValueError):
        node.add_pod("z", eni=2)            # the node has one ENI
    with pytest.raises(ValueError):
        world.add_node("Bad_Name")
    b = node.add_pod("b")
    assert tcp_exchange(node.pod("a"), b) == ("ping", "pong")


def test_a_pod_whose_plumbing_fails_leaves_nothing_half_made(world, node, monkeypatch):
    # A host-side name longer than IFNAMSIZ makes the veth creation fail after
    # the pod's netns already exists.
    monkeypatch.setattr(plan, "cali_name", lambda tag, pod: "cali" + "0" * 20)
    with pytest.raises(Exception):
        node.add_pod("broken")
    monkeypatch.undo()
    assert node.pods == [] and plan.pod_ns(world.tag, "broken") not in list_netns()
    assert not [r for r in node.ip_json("rule", "show") if r["priority"] in (512, 2048)]
    pod_routes = [r for r in world.vpc.ip_json("route", "show", "root", node.eni(1).vswitch)
                  if r["dst"] != node.eni(1).ip]
    assert pod_routes == []
    a, b = node.add_pod("a"), node.add_pod("b")
    assert tcp_exchange(a, b) == ("ping", "pong")


# -- cleanup ------------------------------------------------------------------

def _populate(w):
    n1, n2 = w.add_node("n1", enis=2), w.add_node("n2")
    pods = [n1.add_pod("a"), n1.add_pod("b", eni=2), n2.add_pod("c")]
    w.add_direct_pair()
    return [p.popen(["sleep", "120"]) for p in pods]


@pytest.mark.parametrize("how", ["normal exit", "exception"])
def test_world_leaves_nothing_behind(how):
    class Boom(Exception):
        pass

    with pytest.raises(Boom) if how == "exception" else nullcontext():
        with World() as w:
            procs = _populate(w)
            tag, names = w.tag, w.netns_names()
            assert _leftovers(tag)["netns"] and len(names) == 8
            if how == "exception":
                raise Boom()
    assert _leftovers(tag) == {"netns": [], "links": [], "lock": False}
    assert all(p.poll() is not None for p in procs)


# A world in a child process that we then kill: the child prints its tag and
# the pid of a process it started inside a pod once everything is built.
_CHILD = textwrap.dedent("""
    import sys, time
    from agent.sim import World
    with World() as w:
        n = w.add_node("n1", enis=2)
        a, b = n.add_pod("a"), n.add_pod("b", eni=2)
        w.add_node("n2").add_pod("c")
        w.add_direct_pair()
        p = a.popen(["sleep", "120"])
        print(w.tag, p.pid, flush=True)
        time.sleep(120)
""")


def _start_child():
    child = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline().split()
    assert len(line) == 2, child.stderr.read() if child.poll() is not None else line
    tag, pid = line[0], int(line[1])
    assert _leftovers(tag)["netns"], "the child's world should exist before we kill it"
    return child, tag, pid


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_owner_removes_its_world(sig):
    child, tag, pid = _start_child()
    try:
        child.send_signal(sig)
        child.wait(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _leftovers(tag) == {"netns": [], "links": [], "lock": False}
    assert _gone(pid)
    # SIGTERM is re-delivered after cleanup so the parent sees the real cause.
    if sig == signal.SIGTERM:
        assert child.returncode == -signal.SIGTERM


def test_cleanup_stale_sweeps_a_killed_world_and_spares_live_ones(world, node):
    a, b = node.add_pod("a"), node.add_pod("b")
    child, tag, pid = _start_child()
    child.kill()              # SIGKILL: no handler runs, everything is left
    child.wait()
    assert _leftovers(tag)["netns"] and not _gone(pid)

    removed = cleanup_stale()
    assert _leftovers(tag) == {"netns": [], "links": [], "lock": False}
    assert _gone(pid)         # the orphaned server inside the pod was stopped
    assert all(plan.tag_of(n) == tag for n in removed if plan.tag_of(n))
    # Our own live world (held lock) was not touched and still carries traffic.
    assert set(world.netns_names()) <= set(list_netns())
    assert tcp_exchange(a, b) == ("ping", "pong")


def test_close_is_idempotent_and_a_closed_world_refuses_new_objects():
    w = World().start()
    n = w.add_node("n1")
    w.close()
    w.close()
    with pytest.raises(RuntimeError):
        n.add_pod("a")
    assert _leftovers(w.tag) == {"netns": [], "links": [], "lock": False}
