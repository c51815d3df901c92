"""Traffic from outside the pod network, run through the real programs with
BPF_PROG_TEST_RUN: NodePorts, external and load-balancer IPs, hostPorts;
externalTrafficPolicy, SNAT and its reversal, reject vs drop, source
ranges, Maglev, the Service-CIDR checks, the node's own packets on their
way out. The maps are filled the agent's way: Service objects compiled by
agent.lb, planned by the reconciler, written by apply_ops.

    client 10.250.0.11 ─┐                 ┌─ caliA ── pod A 10.241.1.10
                        └ eth0 ══ node ═══╪─ caliB ── pod B 10.241.1.11 (a backend)
      10.240.0.11/24, default via .253    └─ eth1 (ENI 10.241.1.1, table 1001)
    a backend on another node: 10.242.2.20 (through eth0's default route)
"""
from __future__ import annotations

from collections import Counter

import pytest
from scapy.layers.inet import ICMP, IP, IPerror, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP, SCTPChunkInit

from agent.daemon.services import apply_ops
from agent.datapath.maps import DEFS
from agent.lb.maglev import flow_hash
from tests.bpf.conftest import (NODE_NAME as NODE, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
                                ct_rows, node_datapath, node_netns, node_run as run, node_services,
                                socket_lb_on)
from tests.bpf.test_lb import assert_checksums_valid
from tests.lb.lbdata import ep, eslice, service

NODE_IP, GW, GW_MAC = "10.240.0.11", "10.240.0.253", "02:00:00:00:02:54"
ENI_IP, ENI_GW, ENI_GW_MAC = "10.241.1.1", "10.241.255.253", "02:00:00:00:03:53"
POD_A, POD_B = "10.241.1.10", "10.241.1.11"
REMOTE = "10.242.2.20"
CLIENT, OUTSIDER = "10.250.0.11", "192.0.2.5"
CLIENT_MAC = GW_MAC
EXT_IP, LB_IP = "203.0.113.7", "198.51.100.5"
SERVICE_CIDR = "172.16.0.0/16"


@pytest.fixture(scope="module")
def net():
    with node_netns("fpt-np", [
        f"addr add {NODE_IP}/24 dev eth0",
        f"route add default via {GW} dev eth0",
        f"neigh add {GW} lladdr {GW_MAC} dev eth0 nud permanent",
        f"addr add {ENI_IP}/32 dev eth1",
        f"route add default via {ENI_GW} dev eth1 onlink table 1001",
        f"neigh add {ENI_GW} lladdr {ENI_GW_MAC} dev eth1 nud permanent",
        f"route add {POD_A} dev caliA scope link",
        f"route add {POD_B} dev caliB scope link",
        f"rule add to {POD_A} lookup main pref 512",
        f"rule add to {POD_B} lookup main pref 512",
        f"rule add from {POD_A} lookup 1001 pref 2048",
        f"rule add from {POD_B} lookup 1001 pref 2048",
    ], sysctls=["net.ipv4.ip_forward=1"]) as n:
        yield n


@pytest.fixture(scope="module")
def dp(bpffs, net):
    with node_datapath(bpffs, net, "nodeport", SERVICE_CIDR, NODE_IP,
                       [("A", POD_A, None), ("B", POD_B, None)]) as d:
        yield d


# -- the Services, compiled and written the agent's way ----------------------------

def lb_svc(name, ip, node_port, etp="Cluster", lb_ip=None, ports=None, **spec):
    status = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}} if lb_ip else None
    return service(name, ip=ip, typ="LoadBalancer" if lb_ip else "NodePort", status=status,
                   externalTrafficPolicy=etp,
                   ports=ports or [("http", 80, "TCP", 8080, node_port)], **spec)


OBJECTS = [
    # eTP Cluster: one backend here, one on another node
    lb_svc("both", "172.16.0.10", 30080), eslice("both-1", "both", [
        ep(POD_B, node=NODE), ep(REMOTE, node="node-b")]),
    # only the remote one (SNAT every time)
    lb_svc("far", "172.16.0.11", 30081), eslice("far-1", "far", [ep(REMOTE, node="node-b")]),
    # eTP Local with its endpoint elsewhere: dropped from outside, served inside
    lb_svc("local", "172.16.0.12", 30082, etp="Local"),
    eslice("local-1", "local", [ep(REMOTE, node="node-b")]),
    # no endpoint at all: rejected
    lb_svc("none", "172.16.0.13", 30083),
    # a load balancer reachable from one range only, with an external IP too
    lb_svc("fw", "172.16.0.14", 30084, lb_ip=LB_IP, loadBalancerSourceRanges=["10.250.0.0/24"],
           externalIPs=[EXT_IP]),
    eslice("fw-1", "fw", [ep(POD_B, node=NODE)]),
    # UDP and SCTP NodePorts
    lb_svc("dns", "172.16.0.15", 30053, ports=[("dns", 53, "UDP", 5353, 30053),
                                               ("sig", 2905, "SCTP", 2906, 30905)]),
    eslice("dns-1", "dns", [ep(POD_B, node=NODE)],
           ports=[("dns", 5353, "UDP"), ("sig", 2906, "SCTP")]),
    # Maglev over four remote backends
    lb_svc("mag", "172.16.0.16", 30086),
    eslice("mag-1", "mag", [ep(f"10.242.3.{i}", node="node-c") for i in range(1, 5)]),
]


@pytest.fixture(scope="module")
def svcs(dp):
    # a pod's hostPort (what a CNI ADD with portMappings registers)
    from agent.lb.hostport import PortMapping, frontends_of
    hostport = frontends_of(("web", "h"), POD_A, [PortMapping(8443, 443, "TCP")],
                            [NODE_IP, ENI_IP, "127.0.0.1"], NODE)
    with node_services(dp, OBJECTS, NODE_IP, SERVICE_CIDR, hostport) as rec:
        yield rec


def from_outside(net, dst, dport, sport=40000, src=CLIENT, dev="eth0", proto="tcp", flags="S"):
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=100) if proto == "tcp" else \
        UDP(sport=sport, dport=dport) / b"q"
    return Ether(src=CLIENT_MAC, dst=net.mac(dev)) / IP(src=src, dst=dst, ttl=64) / l4


def from_pod(net, pod, dst, dport, sport=41000):
    return Ether(src=net.pod_mac[pod], dst=net.mac(f"cali{pod}")) / \
        IP(src={"A": POD_A, "B": POD_B}[pod], dst=dst) / TCP(sport=sport, dport=dport, flags="S")


# -- NodePort, eTP Cluster ---------------------------------------------------------

def test_a_node_port_from_outside_reaches_a_local_backend_keeping_the_clients_address(
        dp, net, svcs):
    # Several flows: those that pick the local backend go straight into it.
    local = []
    for sport in range(40000, 40040):
        v, out, reason, kind, idx = run(dp, net, "fp_from_vpc",
                                        from_outside(net, NODE_IP, 30080, sport), "eth0")
        o = Ether(out)
        if o[IP].dst == POD_B:
            local.append(sport)
            assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "redirected-local",
                                              "redirect-peer", net.idx("caliB"))
            assert (o[IP].src, o[TCP].sport, o[TCP].dport) == (CLIENT, sport, 8080)
            assert_checksums_valid(out)
        else:
            assert o[IP].dst == REMOTE
    assert local, "the local backend was never chosen"
    # the reply from the pod: the node's address and NodePort again, out of eth0
    sport = local[0]
    reply = Ether(src=net.pod_mac["B"], dst=net.mac("caliB")) / IP(src=POD_B, dst=CLIENT) / \
        TCP(sport=8080, dport=sport, flags="SA", seq=7, ack=101)
    v, out, reason, kind, idx = run(dp, net, "fp_from_pod", reply, "caliB")
    o = Ether(out)
    assert (o[IP].src, o[TCP].sport, o[IP].dst, o[TCP].dport) == (NODE_IP, 30080, CLIENT, sport)
    assert v == TC_ACT_REDIRECT and idx == net.idx("eth0"), (reason, kind, idx)
    assert o.dst == GW_MAC, "out of the primary NIC, to its gateway"
    assert_checksums_valid(out)



def test_a_client_reusing_its_port_gets_its_new_flows_reply_entry_and_no_old_one(dp, net, svcs):
    """A client outside reopening its tuple (what a connection-heavy client
    does all the time): whichever backend each new connection picks (local,
    or remote behind SNAT), the flow's one reply entry is the new one, and
    the old flow's, when it names another backend or SNAT port, is gone."""
    sport = 45123

    def replies(src, dst, dport):
        return [(r.state, r.table) for r in ct_rows(dp, direction="reply", saddr=src, daddr=dst,
                                                    dport=dport)]

    prev, seen = None, set()
    for _ in range(64):
        v, out, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP, 30080, sport), "eth0")
        o = Ether(out)
        assert v == TC_ACT_REDIRECT
        now = ("local", sport) if o[IP].dst == POD_B else ("remote", o[TCP].sport)
        if now[0] == "local":
            assert replies(POD_B, CLIENT, sport) == [("new", "new")], "the new flow's entry"
        else:
            assert replies(REMOTE, NODE_IP, now[1]) == [("new", "new")]
            assert replies(POD_B, CLIENT, sport) == [], "the old local flow's entry is gone"
        if prev and prev[0] == "remote" and prev != now:
            assert replies(REMOTE, NODE_IP, prev[1]) == [], "the old SNAT flow's entry is gone"
        if prev:
            seen.add((prev[0], now[0]))
        # the client resets it: the tuple is closed, free for the next one
        run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP, 30080, sport, flags="R"), "eth0")
        prev = now
        if {("local", "local"), ("local", "remote"), ("remote", "local")} <= seen:
            break
    assert {("local", "local"), ("local", "remote"), ("remote", "local")} <= seen, seen

def test_a_new_flow_on_a_closed_flows_tuple_to_the_same_backend_is_whole_and_promotes(
        dp, net, svcs):
    """A client reopening the tuple of a closed connection that the same
    (only) backend served, whose last ACK was never seen (a completed close
    leaves no entries): the old flow's two entries, still in the
    established hash under the new flow's keys, give way to the new flow's:
    new state, none of the old FIN flags, a fresh stamp; the handshake is
    un-NATed and promotes both entries, and a FIN of the new flow is its
    first."""
    sport = 46001
    cpod = Ether(src=net.pod_mac["B"], dst=net.mac("caliB"))

    def client(flags):
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         from_outside(net, NODE_IP, 30084, sport, flags=flags), "eth0")
        assert v == TC_ACT_REDIRECT and Ether(out)[IP].dst == POD_B, flags
        return Ether(out)

    def pod(flags):
        v, out, *_ = run(dp, net, "fp_from_pod", cpod / IP(src=POD_B, dst=CLIENT) /
                         TCP(sport=8080, dport=sport, flags=flags), "caliB")
        o = Ether(out)
        assert (o[IP].src, o[TCP].sport) == (NODE_IP, 30084), flags
        return o

    def rows():
        fwd = ct_rows(dp, direction="forward", saddr=CLIENT, sport=sport, dport=30084)
        rep = ct_rows(dp, direction="reply", saddr=POD_B, daddr=CLIENT, dport=sport)
        assert len(fwd) == 1 and len(rep) == 1, (fwd, rep)
        return fwd[0], rep[0]

    for side, f in ((client, "S"), (pod, "SA"), (client, "A"), (client, "FA"), (pod, "FA")):
        side(f)
    old = rows()
    assert [(r.state, r.table) for r in old] == [("closed", "established")] * 2
    assert all(r.flags for r in old), "both FINs are on the closed flow's entries"

    client("S")
    new = rows()
    assert [(r.state, r.table, r.flags) for r in new] == [("new", "new", 0)] * 2
    assert all(n.last_seen_ns >= o.last_seen_ns for n, o in zip(new, old))
    assert [(r.nat_addr, r.nat_port) for r in new] == [(POD_B, 8080), (NODE_IP, 30084)]
    assert_checksums_valid(bytes(pod("SA")))
    client("A")
    assert [(r.state, r.table) for r in rows()] == [("established", "established")] * 2
    client("FA")
    assert [r.state for r in rows()] == ["fin-wait"] * 2, "the new flow's first FIN"


def test_a_node_port_to_a_backend_on_another_node_is_snated_and_its_reply_reversed(dp, net, svcs):
    v, out, reason, kind, idx = run(dp, net, "fp_from_vpc",
                                    from_outside(net, NODE_IP, 30081, 40100), "eth0")
    o = Ether(out)
    assert v == TC_ACT_REDIRECT and idx == net.idx("eth0") and reason == "redirected-eni"
    assert (o[IP].dst, o[TCP].dport) == (REMOTE, 8080)
    snat_port = o[TCP].sport
    assert o[IP].src == NODE_IP and 61000 <= snat_port <= 65535, "SNAT to the node's address"
    assert_checksums_valid(out)
    fwd = ct_rows(dp, direction="forward", saddr=CLIENT, sport=40100)[0]
    rev = ct_rows(dp, direction="reply", saddr=REMOTE, daddr=NODE_IP, dport=snat_port)[0]
    assert fwd.flags & DEFS.defines["FP_CT_F_SNAT"] and rev.flags & DEFS.defines["FP_CT_F_SNAT"]
    # the backend answers the node; the client gets it from NodePort
    back = Ether(src=GW_MAC, dst=net.mac("eth0")) / IP(src=REMOTE, dst=NODE_IP) / \
        TCP(sport=8080, dport=snat_port, flags="SA", seq=9, ack=101)
    v, out, reason, kind, idx = run(dp, net, "fp_from_vpc", back, "eth0")
    o = Ether(out)
    assert (o[IP].src, o[TCP].sport, o[IP].dst, o[TCP].dport) == (NODE_IP, 30081, CLIENT, 40100)
    assert v == TC_ACT_REDIRECT and idx == net.idx("eth0")
    assert_checksums_valid(out)
    # the client's next packet goes the same way, with the same SNAT port
    ack = from_outside(net, NODE_IP, 30081, 40100, flags="A")
    v, out, *_ = run(dp, net, "fp_from_vpc", ack, "eth0")
    assert (Ether(out)[IP].src, Ether(out)[TCP].sport) == (NODE_IP, snat_port)


def close_walk(first, client, backend, tables, table):
    """`first` ("client" or "backend") closes, the other end answers with its
    FIN and `first` ACKs it: both entries stay in `table` (fin-wait, then
    closed) and that last ACK retires them. client/backend(flags) send and
    check the translation; tables() lists (state, table) of the entries."""
    one, two = (client, backend) if first == "client" else (backend, client)
    one("FA")
    assert tables() == [("fin-wait", table)] * 2
    two("FA")
    assert tables() == [("closed", table)] * 2
    one("A")
    assert tables() == [], "the last ACK retired the flow"


@pytest.mark.parametrize("first", ["client", "backend"])
def test_a_snated_node_port_flow_closes_in_the_established_hash_and_its_last_ack_retires_it(
        dp, net, svcs, first):
    """A NodePort flow SNATed to a backend on another node, closed by either
    end: both FINs are translated both ways (the backend's with the client
    put back), the flow stays in the established hash while closing, and the
    last ACK, sent by the end that did not send the second FIN, is still
    translated (the same SNAT port) and then deletes both entries."""
    sport = 40200 if first == "client" else 40201
    out_ = from_outside(net, NODE_IP, 30081, sport, flags="S")
    v, out, *_ = run(dp, net, "fp_from_vpc", out_, "eth0")
    snat_port = Ether(out)[TCP].sport
    assert Ether(out)[IP].src == NODE_IP

    def client(flags):
        v, out, *_ = run(dp, net, "fp_from_vpc",
                         from_outside(net, NODE_IP, 30081, sport, flags=flags), "eth0")
        o = Ether(out)
        assert v == TC_ACT_REDIRECT, flags
        assert (o[IP].src, o[TCP].sport, o[IP].dst, o[TCP].dport) == \
            (NODE_IP, snat_port, REMOTE, 8080), flags
        assert_checksums_valid(out)

    def backend(flags):
        back = Ether(src=GW_MAC, dst=net.mac("eth0")) / IP(src=REMOTE, dst=NODE_IP) / \
            TCP(sport=8080, dport=snat_port, flags=flags)
        v, out, *_ = run(dp, net, "fp_from_vpc", back, "eth0")
        o = Ether(out)
        assert (o[IP].src, o[TCP].sport, o[IP].dst, o[TCP].dport) == \
            (NODE_IP, 30081, CLIENT, sport), flags
        assert_checksums_valid(out)

    def tables():
        fwd = ct_rows(dp, direction="forward", saddr=CLIENT, sport=sport, dport=30081)
        rep = ct_rows(dp, direction="reply", saddr=REMOTE, daddr=NODE_IP, dport=snat_port)
        return [(r.state, r.table) for r in fwd + rep]

    backend("SA")
    client("A")
    assert tables() == [("established", "established")] * 2
    close_walk(first, client, backend, tables, "established")


def test_an_icmp_error_about_a_snated_flow_reaches_the_client_about_its_own_packet(
        dp, net, svcs):
    v, out, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP, 30081, 40200), "eth0")
    sent = Ether(out)
    # a router between the node and the backend says "fragmentation needed"
    err = Ether(src=GW_MAC, dst=net.mac("eth0")) / IP(src="10.242.255.1", dst=NODE_IP) / \
        ICMP(type=3, code=4, nexthopmtu=1400) / bytes(sent[IP])[:28]
    v, out, reason, kind, idx = run(dp, net, "fp_from_vpc", err, "eth0")
    o = Ether(out)
    assert v == TC_ACT_REDIRECT and o[IP].dst == CLIENT
    q = IPerror(bytes(o[ICMP].payload))
    assert (q.src, q.dst) == (CLIENT, NODE_IP)
    assert bytes(o[ICMP].payload)[20:24] == bytes(TCP(sport=40200, dport=30081))[:4]
    fresh = Ether(out)
    del fresh[IP].chksum
    del fresh[ICMP].chksum
    fresh = Ether(bytes(fresh))
    assert (fresh[IP].chksum, fresh[ICMP].chksum) == (o[IP].chksum, o[ICMP].chksum)


def test_udp_and_sctp_node_ports_are_translated_with_valid_checksums(dp, net, svcs):
    v, out, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP, 30053, 40300,
                                                          proto="udp"), "eth0")
    o = Ether(out)
    assert v == TC_ACT_REDIRECT and (o[IP].dst, o[UDP].dport) == (POD_B, 5353)
    assert_checksums_valid(out)
    init = Ether(src=CLIENT_MAC, dst=net.mac("eth0")) / IP(src=CLIENT, dst=NODE_IP) / \
        SCTP(sport=40301, dport=30905, tag=0) / SCTPChunkInit(init_tag=1, a_rwnd=65535,
                                                             n_out_streams=1, n_in_streams=1,
                                                             init_tsn=1)
    v, out, *_ = run(dp, net, "fp_from_vpc", init, "eth0")
    o = Ether(out)
    assert v == TC_ACT_REDIRECT and (o[IP].dst, o[SCTP].dport) == (POD_B, 2906)
    fresh = Ether(out)
    del fresh[SCTP].chksum
    assert Ether(bytes(fresh))[SCTP].chksum == o[SCTP].chksum, "CRC32c after the port change"


# -- externalTrafficPolicy Local, reject vs drop -----------------------------------

def test_local_policy_drops_outside_traffic_on_a_node_without_endpoints_but_serves_pods(
        dp, net, svcs):
    v, _, reason, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP, 30082, 40400),
                           "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-no-local-backend")
    v, out, reason, *_ = run(dp, net, "fp_from_pod", from_pod(net, "A", NODE_IP, 30082),
                             "caliA")
    assert reason == "redirected-eni" and Ether(out)[IP].dst == REMOTE
    assert Ether(out)[IP].src == POD_A, "pods are not masqueraded (VPC-native routing)"


def test_a_node_port_without_endpoints_is_rejected_out_of_the_interface_it_came_in_on(
        dp, net, svcs):
    sent = from_outside(net, NODE_IP, 30083, 40500)
    v, out, reason, kind, idx = run(dp, net, "fp_from_vpc", sent, "eth0")
    assert (v, reason, kind, idx) == (TC_ACT_REDIRECT, "dropped-service-no-backend", "redirect",
                                      net.idx("eth0"))
    o = Ether(out)
    assert (o.dst, o.src) == (CLIENT_MAC, net.mac("eth0"))
    assert (o[IP].src, o[IP].dst, o[ICMP].type, o[ICMP].code) == (NODE_IP, CLIENT, 3, 3)


# -- source ranges, external IPs -------------------------------------------------

def test_load_balancer_source_ranges_drop_whoever_is_outside_them(dp, net, svcs):
    ok = run(dp, net, "fp_from_vpc", from_outside(net, LB_IP, 80, 40600), "eth0")
    assert ok[2] == "redirected-local" and Ether(ok[1])[IP].dst == POD_B
    v, _, reason, *_ = run(dp, net, "fp_from_vpc",
                           from_outside(net, LB_IP, 80, 40601, src=OUTSIDER), "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-source-range")
    # a pod is outside the range too, in-cluster load balancing or not
    v, _, reason, *_ = run(dp, net, "fp_from_pod", from_pod(net, "A", LB_IP, 80), "caliA")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-source-range")
    # the same Service's external IP has no ranges
    v, out, reason, *_ = run(dp, net, "fp_from_vpc",
                             from_outside(net, EXT_IP, 80, 40602, src=OUTSIDER, dev="eth1"),
                             "eth1")
    assert reason == "redirected-local" and Ether(out)[IP].dst == POD_B


# -- Maglev ------------------------------------------------------------------------

def test_maglev_sends_a_flow_to_the_entry_its_hash_names(dp, net, svcs):
    from agent.lb.compile import SCOPE_EXTERNAL, Frontend
    fe = Frontend(NODE_IP, 30086, "TCP", SCOPE_EXTERNAL)
    table = svcs.maglev_table(fe)
    bes = dp.lb.backends()
    picks = Counter()
    for sport in range(42000, 42060):
        want = bes[table[flow_hash(CLIENT, sport, 30086, 6) % dp.lb.maglev_size]][0]
        v, out, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP, 30086, sport),
                         "eth0")
        got = Ether(out)[IP].dst
        assert got == want, sport
        picks[got] += 1
    assert len(picks) == 4, picks


# -- Service CIDRs ----------------------------------------------------------------

def test_an_unknown_port_of_a_live_cluster_ip_is_rejected_and_an_unallocated_address_dropped(
        dp, net, svcs):
    v, out, reason, kind, idx = run(dp, net, "fp_from_pod",
                                    from_pod(net, "A", "172.16.0.10", 9999), "caliA")
    assert (v, reason, kind) == (TC_ACT_REDIRECT, "dropped-service-unknown-port", "redirect-peer")
    assert Ether(out)[ICMP].type == 3 and Ether(out)[IP].src == "172.16.0.10"
    v, _, reason, *_ = run(dp, net, "fp_from_pod", from_pod(net, "A", "172.16.9.9", 80),
                           "caliA")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-unallocated")
    v, _, reason, *_ = run(dp, net, "fp_from_vpc", from_outside(net, "172.16.9.9", 80, 40700),
                           "eth0")
    assert (v, reason) == (TC_ACT_SHOT, "dropped-service-unallocated")


def sctp_init_from(net, who, dst, dport, sport, chunk=None):
    """An SCTP INIT from a pod (`who` "A") or from the outside client (None);
    `chunk`: raw bytes after the common header instead of a whole INIT."""
    l2 = Ether(src=CLIENT_MAC, dst=net.mac("eth0")) if who is None else \
        Ether(src=net.pod_mac[who], dst=net.mac(f"cali{who}"))
    src = CLIENT if who is None else POD_A
    init = chunk if chunk is not None else SCTPChunkInit(
        init_tag=0x5EC7A11, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)
    return Ether(bytes(l2 / IP(src=src, dst=dst) / SCTP(sport=sport, dport=dport, tag=0)
                       / init))


@pytest.mark.parametrize("prog,dev,who", [("fp_from_pod", "caliA", "A"),
                                          ("fp_from_vpc", "eth0", None)])
def test_a_rejected_sctp_init_quotes_its_initiate_tag_and_tcp_udp_still_quote_8_bytes(
        dp, net, svcs, prog, dev, who):
    # An unknown port of a live ClusterIP: rejected for a pod and for a
    # client outside alike. The client's SCTP matches the error to its INIT
    # by the initiate tag, 20 bytes into SCTP: a shorter quote is ignored
    # and the INIT retried until it times out.
    sent = sctp_init_from(net, who, "172.16.0.10", 9999, 41900)
    v, out, reason, _, idx = run(dp, net, prog, sent, dev)
    assert (v, reason, idx) == (TC_ACT_REDIRECT, "dropped-service-unknown-port", net.idx(dev))
    o = Ether(out)
    assert (o[IP].src, o[ICMP].type, o[ICMP].code) == ("172.16.0.10", 3, 3)
    assert bytes(o[ICMP].payload) == bytes(sent[IP])[:40], "IP header + 20 bytes of SCTP"
    assert bytes(o[ICMP].payload)[36:40] == (0x5EC7A11).to_bytes(4, "big"), "initiate tag"
    assert o[IP].len == 20 + 8 + 40
    fresh = o.copy()
    del fresh[IP].chksum
    del fresh[ICMP].chksum
    fresh = Ether(bytes(fresh))
    assert (fresh[IP].chksum, fresh[ICMP].chksum) == (o[IP].chksum, o[ICMP].chksum)
    # an SCTP packet too short for 20 bytes gets the usual quote, not a drop
    short = sctp_init_from(net, who, "172.16.0.10", 9999, 41901, chunk=b"\x01\x00\x00\x14")
    v, out, reason, *_ = run(dp, net, prog, short, dev)
    assert (v, reason) == (TC_ACT_REDIRECT, "dropped-service-unknown-port")
    assert bytes(Ether(out)[ICMP].payload) == bytes(short[IP])[:28]
    # TCP and UDP: the IP header + 8 bytes, as before
    for proto, sport in (("tcp", 41902), ("udp", 41903)):
        pkt = from_outside(net, "172.16.0.10", 9999, sport, proto=proto)
        if who is not None:
            pkt = Ether(src=net.pod_mac[who], dst=net.mac(f"cali{who}")) / \
                pkt[IP].copy()
            pkt[IP].src = POD_A
            pkt = Ether(bytes(pkt))
        v, out, reason, *_ = run(dp, net, prog, pkt, dev)
        assert (v, reason) == (TC_ACT_REDIRECT, "dropped-service-unknown-port"), proto
        o = Ether(out)
        assert bytes(o[ICMP].payload) == bytes(pkt[IP])[:28], proto
        assert o[IP].len == 20 + 8 + 28, proto
    # the node's own traffic is left alone
    v, *_ = run(dp, net, "fp_from_vpc", from_outside(net, NODE_IP, 22, 40701), "eth0")
    assert v == TC_ACT_UNSPEC


def test_the_nodes_own_packets_that_kube_proxy_would_drop_are_dropped_on_the_way_out(
        dp, net, svcs):
    def own(dst, dport, src=NODE_IP):
        return Ether(src=net.mac("eth0"), dst=GW_MAC) / IP(src=src, dst=dst) / \
            TCP(sport=45000, dport=dport, flags="S")
    assert run(dp, net, "fp_to_vpc", own(LB_IP, 80, src="10.240.0.99"), "eth0")[2] == \
        "dropped-source-range"
    assert run(dp, net, "fp_to_vpc", own("172.16.9.9", 80), "eth0")[2] == \
        "dropped-service-unallocated"
    assert run(dp, net, "fp_to_vpc", own(REMOTE, 8080), "eth0")[0] == TC_ACT_UNSPEC
    # (socket-LB off, the node's TCP to a frontend is translated here:
    # tests/bpf/test_node_pkt_lb.py)
    with socket_lb_on(dp):
        assert run(dp, net, "fp_to_vpc", own(LB_IP, 80, src=CLIENT), "eth0")[0] == \
            TC_ACT_UNSPEC


# -- hostPort ------------------------------------------------------------------------

def test_a_host_port_takes_a_packet_from_outside_and_from_a_pod_to_the_pod(dp, net, svcs):
    for dev, dst in (("eth0", NODE_IP), ("eth1", ENI_IP)):
        v, out, reason, kind, idx = run(dp, net, "fp_from_vpc",
                                        from_outside(net, dst, 8443, 40800, dev=dev), dev)
        o = Ether(out)
        assert (v, reason, idx) == (TC_ACT_REDIRECT, "redirected-local", net.idx("caliA"))
        assert (o[IP].src, o[IP].dst, o[TCP].dport) == (CLIENT, POD_A, 443)
        assert_checksums_valid(out)
    v, out, reason, kind, idx = run(dp, net, "fp_from_pod", from_pod(net, "B", NODE_IP, 8443),
                                    "caliB")
    assert (reason, idx) == ("redirected-local", net.idx("caliA"))
    assert (Ether(out)[IP].dst, Ether(out)[TCP].dport) == (POD_A, 443)


def test_an_entry_marked_sole_answers_outside_traffic_without_asking_for_an_external_one(
        dp, net, svcs):
    """FP_SVC_F_SOLE (the agent's mark on a node-facing frontend's only
    entry) spares every packet from outside the external entry's lookup: even
    an external entry written next to it (which the agent never does) is not
    asked; without the mark it is, and it wins."""
    d = DEFS.defines
    flags = d["FP_SVC_F_EXTERNAL"] | d["FP_SVC_F_NODEPORT"]
    lb = dp.lb
    lb.put_backend(900, POD_B, 8080, "TCP")
    lb.put_backend(901, REMOTE, 8080, "TCP")
    lb.put_slots(900, [900])
    lb.put_slots(901, [901])
    try:
        lb.put_service(NODE_IP, 30090, "TCP", 901, 1, flags, scope=1)
        for sport, mark, want in ((40900, d["FP_SVC_F_SOLE"], POD_B), (40901, 0, REMOTE)):
            lb.put_service(NODE_IP, 30090, "TCP", 900, 1, flags | mark)
            v, out, reason, kind, idx = run(dp, net, "fp_from_vpc",
                                            from_outside(net, NODE_IP, 30090, sport), "eth0")
            assert v == TC_ACT_REDIRECT and Ether(out)[IP].dst == want, (mark, reason)
        # the agent's case: marked, no external entry
        lb.delete_service(NODE_IP, 30090, "TCP", scope=1)
        lb.put_service(NODE_IP, 30090, "TCP", 900, 1, flags | d["FP_SVC_F_SOLE"])
        v, out, reason, kind, idx = run(dp, net, "fp_from_vpc",
                                        from_outside(net, NODE_IP, 30090, 40902), "eth0")
        assert (v, reason, Ether(out)[IP].dst) == (TC_ACT_REDIRECT, "redirected-local", POD_B)
    finally:
        lb.delete_service(NODE_IP, 30090, "TCP")
        lb.delete_service(NODE_IP, 30090, "TCP", scope=1)
        lb.delete_slots(900, 1, 1)
        lb.delete_slots(901, 1, 1)
        lb.delete_backend(900)
        lb.delete_backend(901)


def test_the_agent_marks_a_cluster_policy_node_port_sole_and_a_local_one_not(dp, net, svcs):
    sole = DEFS.defines["FP_SVC_F_SOLE"]
    got = {(s["port"], s.get("scope", 0)): s["flags"] & sole for s in dp.lb.services()
           if s["vip"] == NODE_IP and s["port"] in (30080, 30082)}
    assert got == {(30080, 0): sole, (30082, 0): 0, (30082, 1): 0}
