"""Per-packet IPv6 ClusterIP translation with real traffic on dual-stack
simulated nodes (World(dual_stack=True)).

    pod a ─┐                       ┌─ pod c (backend on n2)
    pod b ─┴ n1 ═ eth1 ═ vpc ═ eth1 ┴ n2
    (b: backend on n1)

The pods are not in any socket-LB cgroup: their IPv6 packets to the
ClusterIP are translated on their veth (fp_from_pod6), the replies restored
in fp_from_pod6 (local backend) or fp_from_vpc6 (remote backend). Clients
accept answers only from the ClusterIP (TCP would never complete otherwise;
the UDP client checks the source of the reply).
"""
from __future__ import annotations

import errno
import json
import subprocess

import pytest

from agent.sim.agent import FASTPATH, REPO, sim_attach
from agent.sim.world import World
from fastpath_helpers import counters_by, put_frontend, remove_last_backend, serve_reply

VIP6 = "fd00:77::10"
VIP4 = "192.168.77.10"

CLIENT = r"""
import socket, sys
dst, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
try:
    if kind == "udp":
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3)
        s.sendto(b"q", (dst, port))
        data, addr = s.recvfrom(2048)
        print(data.decode(), "from", addr[0], addr[1])
    else:
        s = socket.create_connection((dst, port), timeout=3)
        s.sendall(b"hi")
        print(s.recv(200).decode(), "from", *s.getpeername()[:2])
except OSError as e:
    print("ERROR", e.errno)
"""


@pytest.fixture
def world6():
    with World(dual_stack=True) as w:
        yield w


def serve(pod, host: str, port: int, reply: str, kind: str = "tcp"):
    return serve_reply(pod, port, reply, peer=True, udp=kind == "udp", host=host)


def ask(client, dst: str, port: int, kind: str = "tcp") -> list[str]:
    """The answer: the server's reply, the client's address as the server
    saw it (its port, the client's own choice, left out), "from", the
    address and port the answer came from; or "ERROR" and the errno."""
    out = client.run(["python3", "-c", CLIENT, dst, str(port), kind], check=False,
                     timeout=15).stdout.split()
    if out and out[0] != "ERROR":
        out[1] = out[1].rsplit(":", 1)[0]
    return out


def test_pods_reach_an_ipv6_clusterip_with_backends_on_this_and_another_node(world6):
    n1, n2 = world6.add_node("n1", enis=1), world6.add_node("n2", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    c = n2.add_pod("c")
    with sim_attach(n1) as ag1, sim_attach(n2):
        lb = ag1.datapath.lb
        put_frontend(lb, VIP6, 80, "TCP", 1, {1: (b.ip6, 8080), 2: (c.ip6, 8080)})
        put_frontend(lb, VIP6, 53, "UDP", 2, {3: (c.ip6, 5353), 4: (b.ip6, 5353)})
        serve(b, b.ip6, 8080, "from-b")
        serve(c, c.ip6, 8080, "from-c")
        serve(b, b.ip6, 5353, "udp-b", "udp")
        serve(c, c.ip6, 5353, "udp-c", "udp")
        tcp = [ask(a, VIP6, 80) for _ in range(12)]
        # answered from the ClusterIP; the backend saw the client's own address
        assert {tuple(t) for t in tcp} == {("from-b", a.ip6, "from", VIP6, "80"),
                                           ("from-c", a.ip6, "from", VIP6, "80")}, tcp
        udp = [ask(a, VIP6, 53, "udp") for _ in range(12)]
        assert {tuple(u) for u in udp} == {("udp-b", a.ip6, "from", VIP6, "53"),
                                           ("udp-c", a.ip6, "from", VIP6, "53")}, udp
        cnt = counters_by(ag1.datapath.maps.counters(), a.host_ifindex)
        assert cnt[("from-pod", "service-translated")] >= 24
        ct = ag1.datapath.lb.conntrack()
        assert any(r.direction == "reply" and r.nat_addr == VIP6 and r.table.endswith("6")
                   for r in ct)

        # metrics: the IPv6 maps' fill and their entries by protocol and direction
        from agent.daemon.metrics import DatapathCollector
        from agent.datapath.maps import MAP
        fams = {f.name: f for f in DatapathCollector(ag1).collect()}

        def sample(family, **labels):
            return sum(s.value for s in fams[family].samples if s.name == family
                       and all(s.labels.get(k) == v for k, v in labels.items()))

        ct = ag1.datapath.lb.conntrack()
        six = [r for r in ct if r.table.endswith("6")]
        assert sum(sample("fastpath_map_entries", map=MAP[m])
                   for m in ("FP_MAP_CT6", "FP_MAP_CT_NEW6")) == len(six) > 0
        # (the UDP flows, established; the TCP ones closed and were retired)
        assert sample("fastpath_map_pressure_ratio", map=MAP["FP_MAP_CT6"]) > 0
        # (the UDP flows stay; each TCP one was retired by its close's last ACK)
        for proto, least in (("TCP", 0), ("UDP", 12)):
            assert sample("fastpath_conntrack_entries", protocol=proto, direction="forward") == \
                sum(1 for r in ct if r.proto == proto and r.direction == "forward") >= least

        # the CLI's conntrack view shows the IPv6 flows and flushes them
        def cli(*args):
            cmd = ["ip", "netns", "exec", n1.netns, *FASTPATH, *args, "--json",
                   "--bpffs-root", ag1.config.bpffs_root]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        rows = cli("ct", "list", "--src", a.ip6)
        fwd = [r for r in rows if r["dir"] == "forward"]
        assert len(fwd) >= 12 and {r["frontend"] for r in fwd} == {VIP6}
        assert {r["backend"] for r in fwd} == {b.ip6, c.ip6}
        assert {r["table"] for r in rows} <= {"established6", "new6"}
        assert any(r["dir"] == "reply" and r["client"] == a.ip6 for r in rows)
        out = cli("ct", "flush", "--src", a.ip6)
        assert out["matched"] == len(rows) and out["deleted"] == len(rows)
        assert cli("ct", "list", "--src", a.ip6) == []


def test_a_dual_stack_service_is_reached_over_both_families(world6):
    n1 = world6.add_node("n1", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    with sim_attach(n1) as ag:
        lb = ag.datapath.lb
        put_frontend(lb, VIP4, 80, "TCP", 1, {1: (b.ip, 8080)})
        put_frontend(lb, VIP6, 80, "TCP", 2, {2: (b.ip6, 8080)})
        serve(b, b.ip, 8080, "four")
        serve(b, b.ip6, 8080, "six")
        assert ask(a, VIP4, 80) == ["four", a.ip, "from", VIP4, "80"]
        assert ask(a, VIP6, 80) == ["six", a.ip6, "from", VIP6, "80"]


def test_ipv6_backend_removal_refusal_and_hairpin(world6):
    n1 = world6.add_node("n1", enis=1)
    a, b, d = n1.add_pod("a"), n1.add_pod("b"), n1.add_pod("d")
    with sim_attach(n1) as ag:
        lb = ag.datapath.lb
        put_frontend(lb, VIP6, 80, "TCP", 1, {1: (b.ip6, 8080), 2: (d.ip6, 8080)})
        serve(b, b.ip6, 8080, "from-b")
        serve(d, d.ip6, 8080, "from-d")
        assert {ask(a, VIP6, 80)[0] for _ in range(10)} == {"from-b", "from-d"}
        remove_last_backend(lb, VIP6, 80, "TCP", 1, [1, 2])     # d
        assert {ask(a, VIP6, 80)[0] for _ in range(10)} == {"from-b"}

        # an unknown port of the live ClusterIP, and a frontend without
        # endpoints: refused at once (ICMPv6 port unreachable)
        lb.svcnet_put(f"{VIP6}/128", 1)
        assert ask(a, VIP6, 81) == ["ERROR", str(errno.ECONNREFUSED)]
        lb.put_service("fd00:77::11", 80, "TCP", 9, 0, 2)
        assert ask(a, "fd00:77::11", 80) == ["ERROR", str(errno.ECONNREFUSED)]

        # a pod reaching itself through its IPv6 Service
        put_frontend(lb, "fd00:77::12", 80, "TCP", 3, {3: (a.ip6, 8080)})
        serve(a, a.ip6, 8080, "myself")
        assert ask(a, "fd00:77::12", 80) == ["myself", ag.config.hairpin_source_ipv6, "from",
                                             "fd00:77::12", "80"]
