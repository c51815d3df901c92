"""Conntrack with real traffic on simulated nodes: rolling updates, churn on a
small map, path MTU through a narrower VPC hop, ICMP errors to connected
UDP sockets, fragmented datagrams.

    pod a ── cali ┐                   ┌ eth1 ── node n2 ── cali ── pod c
    pod b ─ cali ─┤ node n1 ── eth1 ══ vpc
    pod d ─ cali ─┘

Every agent here is fastpath's own (agent.sim.agent.sim_attach) reading
Services, EndpointSlices and NetworkPolicies from a manifest directory;
clients and servers are small Python programs in the pods' netns.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.sim import manifests as mf
from agent.sim.agent import sim_attach
from fastpath_helpers import wait_for

VIP = "192.168.95.10"
VIP2 = "192.168.95.11"
PORT = 7400

# TCP echo server: greets each connection with its name, echoes lines; once
# `closefile` exists it closes every connection gracefully (FIN), as a pod
# that is shutting down does.
SERVER = r"""
import os, select, socket, sys, time
name, ip, port, closefile, maxsec = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port))
srv.listen(256)
conns, closing, end = [], False, time.monotonic() + maxsec
while time.monotonic() < end:
    ready, _, _ = select.select([srv] + conns, [], [], 0.05)
    for s in ready:
        if s is srv:
            c, _ = srv.accept()
            c.sendall(name.encode() + b"\n")
            conns.append(c)
            if closing:
                c.shutdown(socket.SHUT_WR)
            continue
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            conns.remove(s)
            s.close()
        elif not closing:
            s.sendall(data)
    if not closing and os.path.exists(closefile):
        closing = True
        for c in conns:
            c.shutdown(socket.SHUT_WR)
"""

# One long-lived connection: a numbered line every 20 ms, each echo checked.
STREAM = r"""
import json, os, socket, sys, time
ip, port, stop, maxsec = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
res = {"banner": "", "sent": 0, "echoed": 0, "end": ""}
t0 = time.monotonic()
s = socket.create_connection((ip, port), timeout=5)
f = s.makefile("rb")
res["banner"] = f.readline().decode().strip()
seq = 0
while True:
    if os.path.exists(stop):
        res["end"] = "stopped"; break
    if time.monotonic() - t0 > maxsec:
        res["end"] = "timeout"; break
    seq += 1
    msg = b"%08d\n" % seq
    try:
        s.sendall(msg)
        res["sent"] += 1
        got = f.readline()
        if not got:
            res["end"] = "eof"; break
        if got != msg:
            res["end"] = "bad echo %r for %r" % (got, msg); break
        res["echoed"] += 1
    except OSError as e:
        res["end"] = "error %s %s" % (e.errno, e.strerror); break
    time.sleep(0.02)
res["seconds"] = round(time.monotonic() - t0, 2)
print(json.dumps(res), flush=True)
"""

# N new connections: which backend greets each.
BANNERS = r"""
import json, socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    try:
        s = socket.create_connection((ip, port), timeout=3)
        out.append(s.makefile("rb").readline().decode().strip())
        s.close()
    except OSError as e:
        out.append("error %s" % e.errno)
print(json.dumps(out))
"""


def in_cgroup(cgroup: str, ns, args: list[str]) -> list[str]:
    """A command joining `cgroup` first, then entering `ns` (ip netns exec
    remounts /sys: the cgroup is joined before)."""
    return ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec ip netns exec {ns.netns} '
                        f'"$@"', "sh", *args]


def web(vip: str, port: int, endpoints: list[tuple[str, str, str]], name: str = "web",
        proto: str = "TCP", svc_port: int = 80) -> list[dict]:
    """A Service and its EndpointSlice; endpoints: (ip, node, condition),
    condition one of ready, terminating (serving, not ready)."""
    return [mf.service("default", name, vip, svc_port, port, "p", proto),
            mf.endpoint_slice("default", name, port, [(ip, c, node) for ip, node, c in endpoints],
                              "p", proto)]


def write(agent, name: str, objects: list[dict]) -> None:
    mf.write(agent.config.source, name, objects)


def backends_of(agent, vip: str, port: int = 80) -> set[str]:
    lb = agent.datapath.lb
    svc = [s for s in lb.services() if (s["vip"], s["port"]) == (vip, port)]
    if not svc:
        return set()
    bes = lb.backends()
    return {bes[b][0] for b in lb.slots(svc[0]["svc_id"], svc[0]["count"])}


# -- rolling update -----------------------------------------------------------

def test_a_rolling_update_keeps_established_connections_until_the_server_closes(world, cgroup):
    """A long-lived TCP stream through a ClusterIP, from a pod (per packet)
    and from the node (socket-LB), while its backend goes ready ->
    terminating -> removed from the EndpointSlice: no byte lost and no reset
    until the old backend closes; new connections meanwhile reach only the
    other backend."""
    n1 = world.add_node("n1", enis=1)
    a, old, new = n1.add_pod("a"), n1.add_pod("old"), n1.add_pod("new")
    tmp = Path(tempfile.mkdtemp(prefix="fp-roll-"))
    close = tmp / "close"
    stop = tmp / "stop"
    try:
        with sim_attach(n1, socket_lb=True, socket_lb_hostns_only=True,
                        cgroup_root=cgroup) as agent:
            for p in (old, new):
                p.popen(["python3", "-c", SERVER, p.name, p.ip, str(PORT), str(close), "120"])
                p.wait_port(PORT)
            write(agent, "web.yaml", web(VIP, PORT, [(old.ip, "n1", "ready")]))
            assert wait_for(lambda: backends_of(agent, VIP) == {old.ip})
            clients = {
                "pod": a.popen(["python3", "-c", STREAM, VIP, "80", str(stop), "90"],
                               stdout=subprocess.PIPE, text=True),
                "node": subprocess.Popen(in_cgroup(cgroup, n1, [
                    sys.executable, "-c", STREAM, VIP, "80", str(stop), "90"]),
                    stdout=subprocess.PIPE, text=True),
            }
            def pod_stream():
                return [(r.nat_addr, r.state, r.table) for r in agent.datapath.lb.conntrack()
                        if r.saddr == a.ip and r.direction == "forward"]
            # (the clients start python first: on a loaded machine, seconds)
            wait_for(lambda: pod_stream() == [(old.ip, "established", "established")],
                     "the pod's stream, per packet, established on the old backend")
            established = time.monotonic()

            # a second backend joins, then the first one starts terminating
            write(agent, "web.yaml", web(VIP, PORT, [(old.ip, "n1", "ready"),
                                                     (new.ip, "n1", "ready")]))
            assert wait_for(lambda: backends_of(agent, VIP) == {old.ip, new.ip})
            time.sleep(1)
            write(agent, "web.yaml", web(VIP, PORT, [(old.ip, "n1", "terminating"),
                                                     (new.ip, "n1", "ready")]))
            assert wait_for(lambda: backends_of(agent, VIP) == {new.ip})
            assert len(agent.datapath.lb.draining_backends()) == 1
            for who, run in (("pod", lambda: a.run(["python3", "-c", BANNERS, VIP, "80", "20"])),
                             ("node", lambda: subprocess.run(in_cgroup(cgroup, n1, [
                                 sys.executable, "-c", BANNERS, VIP, "80", "20"]),
                                 capture_output=True, text=True, check=True))):
                got = json.loads(run().stdout)
                assert got == ["new"] * 20, (who, got)
            time.sleep(2)

            # removed from the slice altogether; the streams still flow
            write(agent, "web.yaml", web(VIP, PORT, [(new.ip, "n1", "ready")]))
            assert wait_for(lambda: agent.datapath.lb.draining_backends() == set())
            time.sleep(2)
            assert all(p.poll() is None for p in clients.values())
            ct = [r for r in agent.datapath.lb.conntrack() if r.saddr == a.ip and
                  r.direction == "forward" and r.nat_addr == old.ip]
            assert len(ct) == 1, "the stream's flow kept its backend"

            # the old pod finally closes its connections
            span = time.monotonic() - established
            close.touch()
            results = {}
            for who, p in clients.items():
                out, _ = p.communicate(timeout=30)
                results[who] = json.loads(out)
            print("streams:", results)
            for who, r in results.items():
                assert r["banner"] == "old", (who, r)
                assert r["end"] == "eof", (who, r)          # a FIN, never a reset
                assert r["echoed"] >= r["sent"] - 1, (who, r)   # the last one met the close
                # each stream lived through the whole update, echoing all along
                assert r["seconds"] >= span and r["echoed"] > 10 * span, (who, r, span)
    finally:
        stop.touch()
        subprocess.run(["rm", "-rf", str(tmp)])


# -- churn -----------------------------------------------------------------------

IDLE = r"""
import json, os, socket, sys, time
ip, port, go, maxsec = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.create_connection((ip, port), timeout=5)
f = s.makefile("rb")
res = {"banner": f.readline().decode().strip()}
s.sendall(b"first\n"); res["first"] = f.readline().decode().strip()
print("ready", flush=True)
end = time.monotonic() + maxsec
while not os.path.exists(go) and time.monotonic() < end:
    time.sleep(0.1)
try:
    s.settimeout(5)
    s.sendall(b"again\n"); res["again"] = f.readline().decode().strip()
except OSError as e:
    res["again"] = "error %s" % e.errno
print(json.dumps(res), flush=True)
"""


def test_thousands_of_short_connections_on_a_small_map_leave_an_idle_one_working(world):
    """The maps of new and established flows hold 1,024 entries each; 3,000
    connections through a ClusterIP open and close while a connection to
    the same ClusterIP sits idle. Closed flows evict only each other: the
    idle connection answers afterwards."""
    from bench.harness import build_fprr
    fprr = str(build_fprr())
    n1 = world.add_node("n1", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    tmp = Path(tempfile.mkdtemp(prefix="fp-churn-"))
    go = tmp / "go"
    try:
        with sim_attach(n1, conntrack_map_size=1024, conntrack_new_map_size=1024) as agent:
            b.popen(["python3", "-c", SERVER, "b", b.ip, str(PORT), str(tmp / "never"), "120"])
            b.popen([fprr, "server", "-H", b.ip, "-p", "7500", "-t", "120"])
            b.wait_port(PORT)
            b.wait_port(7500)
            write(agent, "web.yaml", web(VIP, PORT, [(b.ip, "n1", "ready")]))
            write(agent, "churn.yaml", web(VIP2, 7500, [(b.ip, "n1", "ready")], name="churn"))
            assert wait_for(lambda: backends_of(agent, VIP) and backends_of(agent, VIP2))
            idle = a.popen(["python3", "-c", IDLE, VIP, "80", str(go), "90"],
                           stdout=subprocess.PIPE, text=True)
            assert idle.stdout.readline().strip() == "ready"
            lb = agent.datapath.lb
            assert [(r.table, r.state) for r in lb.conntrack() if r.saddr == a.ip
                    and r.dport == 80] == [("established", "established")]
            before = lb.ct_events()
            out = a.run([fprr, "crr", "-H", VIP2, "-p", "80", "-n", "3000", "-d", "120"],
                        timeout=150).stdout
            crr = json.loads(out)
            assert crr["transactions"] == 3000 and crr["errors"] == 0, crr
            after = lb.ct_events()
            assert after["created"] - before["created"] >= 3000
            assert len(lb.ct.nat_entries("new")) <= 1024
            go.touch()
            res = json.loads(idle.communicate(timeout=20)[0])
            assert res == {"banner": "b", "first": "first", "again": "again"}, res
    finally:
        subprocess.run(["rm", "-rf", str(tmp)])


# -- path MTU ------------------------------------------------------------------

BULK_SERVER = r"""
import hashlib, socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port)); srv.listen(8)
c, _ = srv.accept(); c.settimeout(60)
got = bytearray()
while True:
    d = c.recv(65536)
    if not d:
        break
    got += d
c.sendall(hashlib.sha256(got).hexdigest().encode() + b"\n" + bytes(got))
c.close()
"""

BULK_CLIENT = r"""
import hashlib, json, os, socket, sys, time
ip, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(size)
t0 = time.monotonic()
s = socket.create_connection((ip, port), timeout=60)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
back = bytearray()
while True:
    d = s.recv(65536)
    if not d:
        break
    back += d
digest, _, echo = bytes(back).partition(b"\n")
print(json.dumps({"sent_ok": digest.decode() == hashlib.sha256(data).hexdigest(),
                  "back_ok": echo == data, "seconds": round(time.monotonic() - t0, 2)}))
"""


def nstat(ns, *names: str) -> dict[str, int]:
    """The netns' SNMP counters (absolute values, nothing reset)."""
    out = ns.run(["nstat", "-az", "--json", *names]).stdout
    return {k: int(v) for k, v in json.loads(out)["kernel"].items()}


def test_a_megabyte_through_a_clusterip_crosses_a_narrower_vpc_hop_to_a_default_deny_pod(world):
    """n1's ENI link is 1,400 bytes: the pods' 1,500-byte packets do not fit.
    Outbound (a -> ClusterIP -> c on n2), n1's stack answers "fragmentation
    needed" about the packet after DNAT: fastpath restores the VIP in the
    quote, so a's socket learns the path MTU. Inbound (c's 1 MB answer), the
    VPC router answers c with the same error from its own address: c is
    default-deny ingress with one allow, and the error passes as RELATED to
    the admitted flow. Both transfers complete."""
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, c = n1.add_pod("a"), n2.add_pod("c")
    eni = n1.enis[0]
    world.vpc.iproute("link", "set", "dev", eni.vpc_ifname, "mtu", "1400")
    n1.iproute("link", "set", "dev", "eth1", "mtu", "1400")
    objs = [mf.namespace("default"),
            mf.pod("default", "a", a.ip, "n1", labels={"app": "a"}),
            mf.pod("default", "c", c.ip, "n2", labels={"app": "c"}),
            mf.ingress_policy("default", "c-only-a", {"app": "c"}, {"app": "a"},
                              [(7600, "TCP")])]
    objs += web(VIP, 7600, [(c.ip, "n2", "ready")])
    with sim_attach(n1, policy_enforcement="default") as ag1, \
            sim_attach(n2, policy_enforcement="default") as ag2:
        for ag in (ag1, ag2):
            write(ag, "all.yaml", objs)
        assert wait_for(lambda: backends_of(ag1, VIP) == {c.ip})
        assert wait_for(lambda: ag2.policy is not None and ag2.policy.state is not None and
                        c.ip in ag2.policy.state.endpoints, timeout=30)
        c.popen(["python3", "-c", BULK_SERVER, c.ip, "7600"])
        c.wait_port(7600)
        out = a.run(["python3", "-c", BULK_CLIENT, VIP, "80", str(1 << 20)], timeout=90).stdout
        res = json.loads(out)
        assert res["sent_ok"] and res["back_ok"], res
        # Each end's stack took a "fragmentation needed" for its own socket:
        # an ICMP error whose quote matches no socket counts as IcmpInErrors
        # (before: a's quoted the backend, not the VIP; c's was dropped by
        # c's default-deny ingress). The learned MTU is in the route cache.
        for pod, to in ((a, VIP), (c, a.ip)):
            got = nstat(pod, "IcmpInDestUnreachs", "IcmpInErrors")
            route = pod.run(["ip", "route", "get", to]).stdout
            print(pod.name, got, route)
            assert got["IcmpInDestUnreachs"] >= 1 and got["IcmpInErrors"] == 0, (pod, got)
            assert "mtu 1400" in route, (pod, route)
        assert ag1.datapath.lb.ct_events()["related-icmp"] >= 1
        drops = {(r.direction, r.reason): r.packets for r in ag2.datapath.maps.counters()}
        assert drops.get(("from-vpc", "dropped-policy-denied"), 0) == 0, drops
        # big segments are redirected, not left to the stack: after the first
        # round trip learned the MTU, the ENI takes a's GSO packets whole
        cnt = {(r.ifindex, r.direction, r.reason): r.packets
               for r in ag1.datapath.maps.counters()}
        eni_out = cnt.get((a.host_ifindex, "from-pod", "redirected-eni"), 0)
        to_stack = cnt.get((a.host_ifindex, "from-pod", "to-stack-fib"), 0)
        print("a's packets: redirected to the ENI", eni_out, "to the stack (too big)", to_stack)
        assert eni_out > 10 * to_stack, (eni_out, to_stack)


# -- ICMP errors to connected UDP sockets ---------------------------------------------

UDP_CONNECTED = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
out = []
for i in range(3):
    try:
        s.send(b"hello")
        s.recv(100)
        out.append("answer")
    except ConnectionRefusedError:
        out.append("refused")
    except socket.timeout:
        out.append("timeout")
print(" ".join(out))
"""


def test_a_connected_udp_socket_to_a_clusterip_with_a_closed_backend_port_is_refused(world):
    """The backend's stack answers "port unreachable" about the datagram it
    got (to its own address); fastpath gives it back to the client as an
    answer about the ClusterIP, so its connected socket gets ECONNREFUSED
    (before: a timeout). A backend on this node and one behind the VPC."""
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    c = n2.add_pod("c")
    with sim_attach(n1) as agent:
        write(agent, "local.yaml", web(VIP, 5353, [(b.ip, "n1", "ready")], name="local",
                                       proto="UDP", svc_port=53))
        write(agent, "remote.yaml", web(VIP2, 5353, [(c.ip, "n2", "ready")], name="remote",
                                        proto="UDP", svc_port=53))
        assert wait_for(lambda: backends_of(agent, VIP, 53) and backends_of(agent, VIP2, 53))
        for vip in (VIP, VIP2):
            got = a.run(["python3", "-c", UDP_CONNECTED, vip, "53"], timeout=20).stdout.split()
            # the first send's error is reported by the second call
            assert "refused" in got and "timeout" not in got, (vip, got)
        assert agent.datapath.lb.ct_events()["related-icmp"] >= 2


# -- fragmented datagrams ---------------------------------------------------------

UDP_SERVER = r"""
import socket, sys
ip, ports, log = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], sys.argv[3]
socks = []
for p in ports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, p)); socks.append(s)
import select
with open(log, "a", buffering=1) as f:
    while True:
        r, _, _ = select.select(socks, [], [], 60)
        if not r:
            break
        for s in r:
            data, peer = s.recvfrom(65536)
            f.write("%d %d\n" % (s.getsockname()[1], len(data)))
            s.sendto(data[::-1], peer)
"""

UDP_CLIENT = r"""
import json, socket, sys
ip, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
s.sendto(data, (ip, port))
try:
    back, peer = s.recvfrom(65536)
    print(json.dumps({"peer": list(peer), "ok": back == data[::-1], "size": len(back)}))
except socket.timeout:
    print(json.dumps({"peer": None}))
"""


def test_3000_byte_datagrams_arrive_whole_when_allowed_and_not_at_all_when_denied(world):
    """b admits UDP 7700 from a and nothing else; c, on the other node, is
    not isolated. 3,000-byte datagrams (three fragments on 1,500-byte links)
    to b:7700 arrive and their answers come back, to b:7701 nothing arrives,
    and through ClusterIPs (to b, and to c across the VPC) they are
    translated, answers included."""
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    c = n2.add_pod("c")
    tmp = Path(tempfile.mkdtemp(prefix="fp-frag-"))
    objs = [mf.namespace("default"),
            mf.pod("default", "a", a.ip, "n1", labels={"app": "a"}),
            mf.pod("default", "b", b.ip, "n1", labels={"app": "b"}),
            mf.pod("default", "c", c.ip, "n2", labels={"app": "c"}),
            mf.ingress_policy("default", "b-udp", {"app": "b"}, {"app": "a"}, [(7700, "UDP")])]
    objs += web(VIP, 7700, [(b.ip, "n1", "ready")], name="tob", proto="UDP", svc_port=53)
    objs += web(VIP2, 7700, [(c.ip, "n2", "ready")], name="toc", proto="UDP", svc_port=53)
    try:
        with sim_attach(n1, policy_enforcement="default") as agent:
            write(agent, "all.yaml", objs)
            assert wait_for(lambda: backends_of(agent, VIP, 53) and backends_of(agent, VIP2, 53))
            assert wait_for(lambda: agent.policy is not None and agent.policy.state is not None
                            and b.ip in agent.policy.state.endpoints, timeout=30)
            blog, clog = tmp / "b.log", tmp / "c.log"
            b.popen(["python3", "-c", UDP_SERVER, b.ip, "7700,7701", str(blog)])
            c.popen(["python3", "-c", UDP_SERVER, c.ip, "7700", str(clog)])
            b.wait_port(7700, udp=True)
            c.wait_port(7700, udp=True)

            def send(ip, port):
                return json.loads(a.run(["python3", "-c", UDP_CLIENT, ip, str(port), "3000"],
                                        timeout=20).stdout)
            r = send(b.ip, 7700)
            assert r["peer"] == [b.ip, 7700] and r["ok"] and r["size"] == 3000, r
            r = send(b.ip, 7701)
            assert r["peer"] is None, r
            r = send(VIP, 53)
            assert r["peer"] == [VIP, 53] and r["ok"], r
            r = send(VIP2, 53)
            assert r["peer"] == [VIP2, 53] and r["ok"], r
            time.sleep(0.2)
            got_b = blog.read_text().split("\n")
            assert sorted(l for l in got_b if l) == ["7700 3000", "7700 3000"], got_b
            assert clog.read_text().split() == ["7700", "3000"]
            cnt = {(r.direction, r.reason): r.packets for r in agent.datapath.maps.counters()}
            # the denied datagram: its three fragments dropped under its verdict
            assert cnt.get(("from-pod", "dropped-policy-denied"), 0) == 3, cnt
            assert agent.datapath.lb.ct_events()["fragment-followed"] >= 8
    finally:
        subprocess.run(["rm", "-rf", str(tmp)])
