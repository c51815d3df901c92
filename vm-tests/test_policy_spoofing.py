"""Forged sources cannot get around NetworkPolicy: real traffic, raw sockets.

    n1: a (app=a)  b (app=b, UDP 5353 protected)  c (app=c, no egress at all)
    n2: r (app=r, UDP 5353)
    policies (x): b admits only a and r on UDP 5353; c may send nothing.

Both nodes run `fastpath agent` (enforcement default) and forward with
rp_filter off, as Terway nodes do. The attacks send from raw sockets
(IP_HDRINCL) inside the pods, so the kernel puts on the wire exactly the
source the attacker wrote:
  1. c forges r's address (which b's policy admits) towards b:5353;
  2. c, denied all egress, writes to r from an address nobody has;
  3. the VPC side delivers a packet claiming a's address (admitted by b)
     to b, through n1's ENI.
Controls in the same run show the sinks, the policy and raw sending work,
and that without the veth's registration attack 1 gets through, as it did
before anti-spoofing: the test can tell.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

from agent.api import wire
from agent.datapath.maps import MAP
from agent.sim import manifests as m
from agent.sim.agent import node_agent

PORT = 5353
SPOOFED = "dropped-source-spoofed"

SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    print(peer[0], data.decode(errors="replace"), flush=True)
"""

# One UDP datagram per token, from a raw socket: IPv4 + UDP headers written
# by hand, any source address.
RAW = r"""
import socket, struct, sys
src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for i, token in enumerate(sys.argv[4:]):
    payload = token.encode()
    sport = 40000 + i
    ulen = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    udp = udp[:6] + struct.pack("!H", csum(pseudo + udp) or 0xffff) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0x1000 + i, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s.sendto(ip + udp, (dst, 0))
"""


class Sink:
    """A UDP server in a pod that records (peer address, payload) of
    everything it receives."""

    def __init__(self, pod):
        self.pod = pod
        self.proc = pod.popen([sys.executable, "-u", "-c", SINK, pod.ip, str(PORT)],
                              stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.got: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            peer, _, data = line.strip().partition(" ")
            with self._lock:
                self.got.append((peer, data))

    def received(self, tokens, wait: float = 1.5) -> list[str]:
        """Which of `tokens` arrived (waiting up to `wait` seconds for all)."""
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                seen = {d for _, d in self.got}
            hit = [t for t in tokens if t in seen]
            if len(hit) == len(tokens) or time.monotonic() > deadline:
                return hit
            time.sleep(0.05)


_serial = [0]


def tokens(what: str, n: int = 3) -> list[str]:
    _serial[0] += 1
    return [f"{what}-{_serial[0]}-{i}" for i in range(n)]


def raw_send(ns, src: str, dst: str, toks: list[str]) -> None:
    ns.run([sys.executable, "-c", RAW, src, dst, str(PORT), *toks])


def udp_send(pod, dst: str, toks: list[str]) -> None:
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "for t in sys.argv[2:]: s.sendto(t.encode(),(sys.argv[1],%d))\n" % PORT)
    pod.run([sys.executable, "-c", code, dst, *toks])


def manifests(pods) -> str:
    objs = [m.namespace("x", ns="x")]
    objs += [m.pod("x", p.name, p.ip, node, {"app": p.name}) for p, node in pods]
    objs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"namespace": "x", "name": "b-from-a-and-r"},
                 "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                          "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                              {"key": "app", "operator": "In", "values": ["a", "r"]}]}}],
                                       "ports": [{"protocol": "UDP", "port": PORT}]}]}})
    objs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"namespace": "x", "name": "c-no-egress"},
                 "spec": {"podSelector": {"matchLabels": {"app": "c"}},
                          "policyTypes": ["Egress"]}})
    return m.dump(objs)


def drops(socket_path: str, reason: str, ifindex: int | None = None,
          direction: str | None = None) -> int:
    return sum(int(r["packets"]) for r in wire.call(socket_path, "Counters")
               if r["reason"] == reason and (ifindex is None or r["ifindex"] == ifindex)
               and (direction is None or r["direction"] == direction))


def wait_applied(paths, policies: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = wire.call(paths.socket, "PolicyStatus")
        if st["plans"] > 0 and st["policies"] == policies:
            return
        time.sleep(0.2)
    raise AssertionError(f"policies not applied: {st}")


def test_forged_sources_from_pods_and_from_the_vpc_never_reach_a_protected_pod(world):
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, b, c = n1.add_pod("a"), n1.add_pod("b"), n1.add_pod("c")
    r = n2.add_pod("r")
    for node in (n1, n2):
        assert node.sysctl_get("net.ipv4.conf.all.rp_filter") == "0"
    text = manifests([(a, "n1"), (b, "n1"), (c, "n1"), (r, "n2")])
    args = ["--policy-enforcement", "default"]
    with node_agent(n1, args, {"cluster.yaml": text}, register=False) as ag1, \
            node_agent(n2, args, {"cluster.yaml": text}, register=False) as ag2:
        p1, p2 = ag1.paths, ag2.paths
        ag1.register(a, b, c)
        ag2.register(r)
        wait_applied(p1, 2)
        wait_applied(p2, 2)
        sink_b, sink_r = Sink(b), Sink(r)

        # controls: the policy admits a and r, refuses c; c may not send
        t = tokens("a-to-b")
        udp_send(a, b.ip, t)
        assert sink_b.received(t) == t
        t = tokens("r-to-b")
        udp_send(r, b.ip, t)
        assert sink_b.received(t) == t
        t = tokens("c-to-b")
        udp_send(c, b.ip, t)
        assert sink_b.received(t, wait=1) == []
        t = tokens("c-to-r")
        udp_send(c, r.ip, t)
        assert sink_r.received(t, wait=1) == []
        # a raw socket with the pod's own source is delivered: raw sending works
        t = tokens("a-raw-own")
        raw_send(a, a.ip, b.ip, t)
        assert sink_b.received(t) == t

        eps = {e["ip"]: e for e in wire.call(p1.socket, "EndpointList")}
        c_veth = eps[c.ip]["host_ifindex"]
        eth1 = n1.link("eth1")["ifindex"]
        before = drops(p1.socket, SPOOFED, c_veth, "from-pod")

        # 1. c forges r's address towards b
        t = tokens("c-as-r")
        raw_send(c, r.ip, b.ip, t)
        assert sink_b.received(t, wait=1.5) == [], "a forged source reached b"
        # 2. c, with no egress at all, sends to r from a made-up address
        t = tokens("c-as-nobody")
        raw_send(c, "10.99.0.7", r.ip, t)
        assert sink_r.received(t, wait=1.5) == [], "c's egress policy was bypassed"
        assert drops(p1.socket, SPOOFED, c_veth, "from-pod") == before + 6
        # 3. from the VPC, a's address (which b admits) through n1's ENI
        before_eni = drops(p1.socket, SPOOFED, eth1, "from-vpc")
        t = tokens("vpc-as-a")
        raw_send(world.vpc, a.ip, b.ip, t)
        assert sink_b.received(t, wait=1.5) == [], "a local pod's address came from the VPC"
        assert drops(p1.socket, SPOOFED, eth1, "from-vpc") == before_eni + 3
        # ... while the VPC still delivers what it should
        t = tokens("r-to-b-again")
        udp_send(r, b.ip, t)
        assert sink_b.received(t) == t

        # the control that proves the test can fail: without c's veth
        # registration (the behaviour before anti-spoofing) attack 1
        # reaches b
        pin = f"{p1.bpffs}/fastpath/{MAP['FP_MAP_EP_IFINDEX']}"
        key = [f"0x{x:02x}" for x in c_veth.to_bytes(4, sys.byteorder)]
        subprocess.run(["bpftool", "map", "delete", "pinned", pin, "key", *key], check=True)
        t = tokens("c-as-r-unguarded")
        raw_send(c, r.ip, b.ip, t)
        assert sink_b.received(t) == t, "the unguarded veth should let the forgery through"
