"""The bandwidth manager for IPv6 with real traffic (iperf3) on dual-stack
simulated nodes, the limits set by Pod annotations through the agent's own
pipeline, as in vm-tests/test_bandwidth.py:

    n1: a (the limited pod), e (a neighbour)       n2: b
    a, e --cali-- n1 --eth1 (fastpath's root qdisc)== vpc ==eth1-- n2 --cali-- b

Every pod has an IPv4 and an IPv6 address (World(dual_stack=True)). A pod's
annotation limits the pod, not a family: IPv6 alone gets the limit (within
the IPv4 test's 10%), and IPv4 and IPv6 at the same time share it (their
sum within it). Rates are receiver goodput with the first second left out,
as in the IPv4 test; IPv6 carries 20 header bytes more per frame than IPv4
(1514-byte frames: 1428 of them TCP payload instead of 1448), so goodput
reads about 94% of the limit. This kernel has no fq: traffic to the VPC is
paced by the ENI's HTB classes (the IPv6 EDT timestamps are proven by
tests/bpf/test_bandwidth_ipv6.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from agent.sim import World
from agent.sim import manifests as M
from agent.sim.traffic import iperf3
from bandwidth_helpers import EGRESS, INGRESS, LIMIT, BandwidthNet, attached, near
from fastpath_helpers import wait_for

PORT4, PORT6 = 5401, 5406
SECONDS = 4


def iperf(client, server, *, six: bool, udp: bool = False, seconds: int = SECONDS) -> float:
    """Receiver goodput in Mbit/s, over the family asked for."""
    src, dst = (client.ip6, server.ip6) if six else (client.ip, server.ip)
    out = iperf3(client, src, dst, PORT6 if six else PORT4,
                 ["-t", str(seconds), "-O", "1"] + (["-u", "-b", "200M"] if udp else []),
                 timeout=seconds + 30)
    return out["end"]["sum_received"]["bits_per_second"] / 1e6


def both(client, server) -> dict[str, float]:
    """IPv4 and IPv6 from `client` to `server` at the same time."""
    res: dict[str, float] = {}
    t = threading.Thread(target=lambda: res.update(v6=iperf(client, server, six=True)))
    t.start()
    res["v4"] = iperf(client, server, six=False)
    t.join()
    return res


class Net(BandwidthNet):
    def __init__(self, w: World):
        super().__init__(w, ("a", "e"), lambda p: [(p.ip, PORT4), (p.ip6, PORT6)])

    def annotate(self, limits: dict[str, dict]) -> None:
        """Every pod's manifest (both addresses) with `limits`, then wait
        until n1's agent holds them."""
        self.write_pods(limits, dual_stack=True)
        want = {getattr(self, name).ip for name in limits}
        ag = self.agents["n1"]
        wait_for(lambda: set(ag.datapath.bandwidth.entries()) == want,
                 f"limits of {sorted(want)} in n1's map")

    def counters(self, pod) -> dict[tuple[str, str], dict]:
        return {(r["direction"], r["reason"]): r
                for r in self.agents["n1"].datapath.bandwidth.counters() if r["ip"] == pod.ip}


@pytest.fixture(scope="module")
def net():
    with World(dual_stack=True) as w, attached(Net(w)) as n:
        yield n


@pytest.fixture
def limited(net):
    yield net
    net.annotate({})


def test_the_pods_are_dual_stack_and_registered_with_both_addresses(net):
    eps6 = {e.ip for e in net.agents["n1"].datapath.maps.endpoints6()}
    assert eps6 == {net.a.ip6, net.e.ip6}


# -- IPv6 alone gets the pod's limit ----------------------------------------------------

@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_ipv6_egress_to_another_node_is_paced_at_the_pods_limit(limited, udp):
    n = limited
    n.annotate({"a": {EGRESS: f"{LIMIT}M"}})
    got = iperf(n.a, n.b, six=True, udp=udp)
    assert near(got, LIMIT), f"a -> b over IPv6: {got:.1f} Mbit/s for a {LIMIT}M limit"
    assert n.counters(n.a)[("egress", "passed")]["bytes"] > LIMIT * 1e6 / 8 * 2, \
        "counted against the pod where it leaves (eth1 egress)"


def test_ipv6_egress_to_the_same_node_is_policed_at_the_pods_limit(limited):
    n = limited
    n.annotate({"a": {EGRESS: f"{LIMIT}M"}})
    got = iperf(n.a, n.e, six=True)
    assert near(got, LIMIT), f"a -> e over IPv6: {got:.1f} Mbit/s for a {LIMIT}M limit"


@pytest.mark.parametrize("sender", ["b", "e"], ids=["from-another-node", "from-the-same-node"])
def test_ipv6_ingress_is_limited_and_its_drops_counted(limited, sender):
    n = limited
    n.annotate({"a": {INGRESS: f"{LIMIT}M"}})
    got = iperf(getattr(n, sender), n.a, six=True)
    assert near(got, LIMIT), f"{sender} -> a over IPv6: {got:.1f} Mbit/s"
    drops = n.counters(n.a).get(("ingress", "dropped-bandwidth-ingress"))
    assert drops and drops["packets"] > 0, "what the bucket refused is counted for the pod"


# -- both families together share one budget --------------------------------------------

def test_ipv4_and_ipv6_egress_together_do_not_exceed_the_limit(limited):
    """Two TCP streams, one per family, from a to b at the same time: the
    pod's HTB class (and its EDT timeline) is the pod's, not a family's,
    and a queue shares fairly."""
    n = limited
    n.annotate({"a": {EGRESS: f"{LIMIT}M"}})
    r = both(n.a, n.b)
    assert near(r["v4"] + r["v6"], LIMIT), r
    assert min(r.values()) > LIMIT * 0.1, f"both families got through: {r}"


def shared_bucket(r: dict[str, float]) -> None:
    """Two TCP streams through one dropping token bucket: their sum is the
    limit, their split is TCP's (a stream that lost a burst backs off and
    the other takes its share), so each only has to get through."""
    assert r["v4"] + r["v6"] <= LIMIT * 1.10, r
    assert r["v4"] + r["v6"] >= LIMIT * 0.80, f"the budget is used: {r}"
    assert min(r.values()) > 0.5, f"both families got through: {r}"


def test_ipv4_and_ipv6_to_a_neighbour_together_do_not_exceed_the_limit(limited):
    n = limited
    n.annotate({"a": {EGRESS: f"{LIMIT}M"}})
    shared_bucket(both(n.a, n.e))


def test_ipv4_and_ipv6_ingress_together_do_not_exceed_the_limit(limited):
    n = limited
    n.annotate({"a": {INGRESS: f"{LIMIT}M"}})
    shared_bucket(both(n.b, n.a))


def test_an_unlimited_neighbour_keeps_its_full_ipv6_rate(limited):
    n = limited
    n.annotate({"a": {EGRESS: f"{LIMIT}M", INGRESS: f"{LIMIT}M"}})
    assert iperf(n.e, n.b, six=True, seconds=2) > 10 * LIMIT


# -- connections: both families against one count -----------------------------------------

LISTEN = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)      # both families
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(128)
def serve(c):                  # closes when the client does: a FIN each way
    while c.recv(1024):
        pass
    c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

HOLD = r"""
import socket, sys
port, held, refused = int(sys.argv[1]), [], 0
for ip in sys.argv[2:]:
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.settimeout(1.5)
    try:
        s.connect((ip, port))
        held.append(s)
    except OSError:
        refused += 1
print(len(held), refused, flush=True)
sys.stdin.readline()          # hold until told
for s in held:
    s.close()
"""


def hold(client, port: int, addrs: list[str]) -> tuple[list[str], callable]:
    """Connect to each address in turn; ([held, refused], release)."""
    p = client.popen([sys.executable, "-c", HOLD, str(port), *addrs], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)

    def release():
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(10)
    return p.stdout.readline().split(), release


def test_ipv4_and_ipv6_connections_count_against_one_limit(limited):
    """a may hold 3 connections, e accept 2, whatever their family; the
    refusals show in the pod's counters and metrics."""
    from prometheus_client import generate_latest
    n = limited
    n.annotate({"a": {"fastpath.io/egressMaxConnections": "3"},
                "e": {"fastpath.io/ingressMaxConnections": "2"}})
    servers = [p.popen([sys.executable, "-c", LISTEN, "7200"]) for p in (n.b, n.e)]
    try:
        for p in (n.b, n.e):
            p.wait_port(7200)
        b4, b6 = n.b.ip, n.b.ip6
        got, release = hold(n.a, 7200, [b4, b6, b6, b4, b6])
        assert got == ["3", "2"], "3 held (IPv4, IPv6, IPv6), the 4th and 5th refused"
        release()
        time.sleep(0.5)            # closed by FINs both ways: a may open 3 again
        got, release = hold(n.a, 7200, [b6, b6, b6])
        assert got == ["3", "0"]
        release()
        got, release = hold(n.b, 7200, [n.e.ip6, n.e.ip, n.e.ip6, n.e.ip])
        assert got == ["2", "2"], "e accepts 2 at once, one of each family"
        release()
        rows = {(r["ip"], r["reason"]): r["packets"]
                for r in n.agents["n1"].datapath.bandwidth.counters()}
        assert rows[(n.a.ip, "dropped-connection-limit-egress")] >= 2
        assert rows[(n.e.ip, "dropped-connection-limit-ingress")] >= 2
        metrics = generate_latest(n.agents["n1"].metrics.registry).decode()
        assert 'fastpath_bandwidth_packets_total{direction="ingress",pod="default/e",' \
               'reason="dropped-connection-limit-ingress"}' in metrics
    finally:
        for s in servers:
            s.kill()


# -- restarts ---------------------------------------------------------------------------------

def test_ipv6_limits_and_connection_counts_hold_after_kill_9_and_a_restart():
    """A real agent process limiting a dual-stack pod (50 Mbit/s, 3
    connections): its IPv6 rate and a held IPv6 connection's count (the
    pinned fp_bwflow6_v1) are kept while the agent is killed, and by the
    agent that starts again. iperf3 uses two connections, closed after."""
    from agent.api import wire
    from agent.sim.agent import AgentProcess, private_paths, register_pod
    with World(dual_stack=True) as w:
        n1, n2 = w.add_node("n1"), w.add_node("n2")
        a, b = n1.add_pod("a"), n2.add_pod("b")
        procs = [b.popen(["iperf3", "-s", "-B", b.ip6, "-p", str(PORT6)]),
                 b.popen([sys.executable, "-c", LISTEN, "7200"])]
        b.wait_port(PORT6)
        b.wait_port(7200)
        release = None

        def others(addrs: list[str]) -> list[str]:
            got, rel = hold(a, 7200, addrs)
            rel()
            time.sleep(0.5)                # FINs both ways: given back
            return got
        try:
            with private_paths() as paths:
                pods = []
                for p, ann in ((a, {EGRESS: f"{LIMIT}M",
                                    "fastpath.io/egressMaxConnections": "3"}), (b, None)):
                    o = M.pod("default", p.name, p.ip, p.node.name, annotations=ann)
                    o["status"]["podIPs"] = [{"ip": p.ip}, {"ip": p.ip6}]
                    pods.append(o)
                with open(os.path.join(paths.manifests, "pods.yaml"), "w") as f:
                    f.write(M.dump(pods))
                agent = AgentProcess(n1, paths).start()
                try:
                    register_pod(paths.socket, a)
                    wait_for(lambda: wire.call(paths.socket, "Status")["bandwidth"]["pods"] == 1,
                             "a limited")
                    assert near(iperf(a, b, six=True, seconds=3), LIMIT)
                    time.sleep(0.5)
                    got, release = hold(a, 7200, [b.ip6])
                    assert got == ["1", "0"]
                finally:
                    agent.kill(9)
                assert near(iperf(a, b, six=True, seconds=3), LIMIT), "the agent is down"
                time.sleep(0.5)
                assert others([b.ip6, b.ip, b.ip6]) == ["2", "1"], \
                    "the held IPv6 connection still counts, against both families"
                again = AgentProcess(n1, paths).start()
                try:
                    time.sleep(2)          # a sync from the manifests
                    assert wire.call(paths.socket, "Status")["bandwidth"]["pods"] == 1
                    assert near(iperf(a, b, six=True, seconds=3), LIMIT)
                    time.sleep(0.5)
                    assert others([b.ip6, b.ip6, b.ip6]) == ["2", "1"]
                    release()
                    release = None
                    time.sleep(0.5)
                    assert others([b.ip6, b.ip6, b.ip6]) == ["3", "0"]
                finally:
                    again.stop()
        finally:
            if release:
                release()
            for p in procs:
                p.terminate()
