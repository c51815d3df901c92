"""BPF program tests: the real programs (test build), maps filled through the
agent's own code, packets built with scapy, run with BPF_PROG_TEST_RUN.

The test world is one netns holding the devices whose ifindexes the packets
claim to arrive on, plus the routing a Terway node has, so that FIB lookups
made by the programs give real answers:

    podA --- caliA \\                      (10.0.1.10, ENI eth1)
    podB --- caliB  >  node netns --- eth1 === vpc1   (gw 10.0.0.253)
    podC --- caliC /                  (10.0.1.2/32, table 1001)
    podD --- caliD    (a veth whose pod fastpath was never told about)
"""
from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from dataclasses import dataclass

import pytest

from agent.config import Config
from agent.datapath import Datapath
from agent.datapath.libbpf import prog_test_run
from agent.datapath.nsenter import in_netns
from agent.model.endpoint import Endpoint
from tests.conftest import BPF_SERVICE_CIDR, bpf_config

TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = -1, 0, 2, 7

POD_A, POD_B, POD_C = "10.0.1.10", "10.0.1.11", "10.0.1.12"
ENI_IP, GW = "10.0.1.2", "10.0.0.253"
GW_MAC = "02:00:00:00:02:53"
REMOTE = "10.0.2.20"          # a pod on another node, behind the VPC
REMOTE_NO_NEIGH = "10.0.3.30"  # reached via a gateway with no neighbour entry
GW2 = "10.0.0.254"
BYPASS_IP = "169.254.20.10"
SERVICE_CIDR, SERVICE_VIP = BPF_SERVICE_CIDR, "192.168.0.10"
# IPv6 (dual-stack pods A, B and C; Terway's ENI tables have a link-local
# gateway, the vSwitch's)
POD_A6, POD_B6, POD_C6 = "fd00:10::1:a", "fd00:10::1:b", "fd00:10::1:c"
ENI_IP6, GW6, GW6_NO_NEIGH = "fd00:10::2", "fe80::253", "fe80::254"
REMOTE6 = "fd00:20::20"
REMOTE6_NO_NEIGH = "fd00:30::30"
NODE_NAME = "node-a"  # the node of the node-facing Service tests (node_services)
NOT_RECORDED = 0xFFFF         # decision reason before a run: "program recorded nothing"


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout



class NodeNet:
    """A node of its own for the node-facing Service tests (test_nodeport.py,
    test_nodeport6.py): eth0 (the primary NIC) and eth1 (an ENI) with their
    VPC-side peers, pods A and B behind caliA and caliB; each test module
    adds its family's addresses, routes and rules (node_netns)."""

    POD_MAC = {"A": "02:00:00:00:0a:0a", "B": "02:00:00:00:0b:0b"}

    def __init__(self, ns):
        self.ns = ns
        self.dev = {}
        for name in ("eth0", "eth1", "caliA", "caliB"):
            info = json.loads(sh(f"ip -n {ns} -j link show {name}"))[0]
            self.dev[name] = (info["ifindex"], info["address"])
        self.pod_mac = dict(self.POD_MAC)

    def idx(self, name):
        return self.dev[name][0]

    def mac(self, name):
        return self.dev[name][1]


@contextlib.contextmanager
def node_netns(prefix: str, ip_commands, sysctls=()):
    """NodeNet in a netns named prefix-<random>, removed also on failure:
    the links, then `ip <command>` for each of ip_commands, then each
    sysctl (key=value) inside the netns."""
    ns = f"{prefix}-{secrets.token_hex(3)}"
    sh(f"ip netns add {ns}")
    try:
        links = ["link set lo up",
                 "link add eth0 type veth peer name vpc0",
                 "link add eth1 type veth peer name vpc1",
                 "link add caliA type veth peer name podA",
                 "link add caliB type veth peer name podB",
                 *[f"link set {d} up" for d in ("eth0", "vpc0", "eth1", "vpc1", "caliA",
                                                 "podA", "caliB", "podB")]]
        for sysctl in sysctls:
            sh(f"ip netns exec {ns} sysctl -qw {sysctl}")
        for c in [*links, *ip_commands]:
            sh(f"ip -n {ns} {c}")
        yield NodeNet(ns)
    finally:
        subprocess.run(f"ip netns del {ns}", shell=True)


def routed_node(prefix: str, node_ip: str, gw: str, gw_mac: str, eni_ip: str, eni_gw: str,
                eni_gw_mac: str, pod_b: str):
    """node_netns laid out as a Terway node that forwards: the node's address
    on eth0 with the default route to the VPC gateway, an ENI (eth1) with
    the route to the other ENIs' pods (10.243.0.0/16), pod B's veth; both
    gateways' neighbours permanent. The node walks' tests
    (test_sctp_node.py, test_node_pkt_lb.py) send through it."""
    return node_netns(prefix, [
        f"addr add {node_ip}/24 dev eth0",
        f"route add default via {gw} dev eth0",
        f"neigh add {gw} lladdr {gw_mac} dev eth0 nud permanent",
        f"addr add {eni_ip}/32 dev eth1",
        f"route add 10.243.0.0/16 via {eni_gw} dev eth1 onlink",
        f"neigh add {eni_gw} lladdr {eni_gw_mac} dev eth1 nud permanent",
        f"route add {pod_b} dev caliB scope link",
    ], sysctls=["net.ipv4.ip_forward=1"])


@contextlib.contextmanager
def node_services(dp, objects, node_ip: str, service_cidr: str, extra=None):
    """objects compiled, planned and written the agent's way with node_ip as
    the NodePort address, Maglev for ("shop", "mag")'s outside traffic (the
    option is per node; the table and flag per frontend), plus the extra
    frontends (e.g. hostPorts); yields the Reconciler, then removes it all
    and flushes conntrack."""
    from agent.daemon.services import apply_ops
    from agent.lb.compile import LbOptions, compile_services
    from agent.lb.reconcile import Reconciler
    from agent.lb.svcnet import entries as svcnet_entries
    from agent.lb.table import ServiceTable
    from tests.lb.lbdata import snapshot

    snap = snapshot(*objects)
    desired = compile_services(snap, NODE_NAME, "", options=LbOptions(nodeport_ips=(node_ip,)))
    maglev = compile_services(snap, NODE_NAME, "", options=LbOptions(nodeport_ips=(node_ip,),
                                                               maglev=True))
    desired.update({fe: st for fe, st in maglev.items() if st.service == ("shop", "mag")})
    desired.update(extra or {})
    rec = Reconciler(maglev_size=dp.lb.maglev_size)
    apply_ops(dp.lb, rec.plan(desired))
    table = ServiceTable(NODE_NAME, "")
    table.rebuild(snap)
    dp.lb.svcnet_set(svcnet_entries(table.cluster_ips, [service_cidr]))
    try:
        yield rec
    finally:
        apply_ops(dp.lb, rec.plan({}))
        dp.lb.svcnet_set({})
        dp.lb.conntrack_flush()


@contextlib.contextmanager
def node_datapath(bpffs: str, net, name: str, service_cidrs: str, node_ip: str, pods,
                  node_ip6: str = ""):
    """The test build loaded in net's netns under its own bpffs root `name`,
    pods ((letter, IPv4, IPv6 or None), ...) registered behind caliX on the
    ENI eth1, the node's addresses set on eth0; closed afterwards."""
    cfg = Config.defaults().replace(bpffs_root=f"{bpffs}/{name}", service_cidrs=service_cidrs)
    d = Datapath(cfg, netns=net.ns, test_build=True).load()
    try:
        for pod, ip, ip6 in pods:
            d.maps.endpoint_put(Endpoint(ip, f"cali{pod}", net.idx(f"cali{pod}"),
                                         net.mac(f"cali{pod}"), net.pod_mac[pod], "eth1",
                                         net.idx("eth1"), ip6=ip6))
        if node_ip6:
            d.settings.set_node(node_ip, net.idx("eth0"), node_ip6)
        else:
            d.settings.set_node(node_ip, net.idx("eth0"))
        yield d
    finally:
        d.close()


@contextlib.contextmanager
def socket_lb_on(dp):
    """dp's FP_CFG_F_SOCKLB set, as the agent sets it while its cgroup
    programs are attached (the node's TCP and UDP are then the sockets'
    to translate, not fp_to_vpc's and fp_lo's); cleared again after."""
    dp.settings.set(socket_lb=True, hostns_only=True, host_netns_cookie=0)
    assert dp.settings.socket_lb()       # (what the benchmarks check they run with)
    try:
        yield
    finally:
        dp.settings.set(socket_lb=False, hostns_only=False, host_netns_cookie=0)
        assert not dp.settings.socket_lb()


def counters(dp, by_family: bool = False) -> dict:
    """Packets per (ifindex, direction, reason[, family])."""
    return {(c.ifindex, c.direction, c.reason, c.family)[:4 if by_family else 3]: c.packets
            for c in dp.maps.counters(by_family=by_family)}


def ct_rows(dp, **match):
    """dp's conntrack rows (both families) whose fields equal match's."""
    return [r for r in dp.lb.conntrack()
            if all(getattr(r, k) == v for k, v in match.items())]


def node_run(dp, net, prog, pkt, dev):
    """prog run on pkt arriving on net's dev: (retval, data, reason,
    redirect kind, redirect ifindex) from the program's decision record."""
    return _run_at(dp, net, prog, pkt, net.idx(dev))


def lo_run(dp, net, pkt):
    """node_run of fp_lo on pkt leaving the node's lo (ifindex 1 in any
    netns)."""
    return _run_at(dp, net, "fp_lo", pkt, 1)


def _run_at(dp, net, prog, pkt, ifindex):
    from agent.datapath.maps import DEFS
    dp.maps.decision_reset(NOT_RECORDED)
    with in_netns(net.ns):
        res = prog_test_run(dp.prog_fd(prog), bytes(pkt), ifindex=ifindex)
    rec = dp.maps.decision()
    return res.retval, res.data, DEFS.reason(rec.reason), DEFS.redirect_kinds[rec.kind].label, \
        rec.ifindex

@dataclass
class Dev:
    name: str
    ifindex: int
    mac: str


@dataclass
class BpfNet:
    ns: str
    cali_a: Dev
    cali_b: Dev
    cali_c: Dev
    eth1: Dev
    cali_d: Dev = None
    pod_a_mac: str = "02:00:00:00:0a:0a"
    pod_b_mac: str = "02:00:00:00:0b:0b"
    pod_c_mac: str = "02:00:00:00:0c:0c"


def _dev(ns: str, name: str) -> Dev:
    import json
    info = json.loads(sh(f"ip -n {ns} -j link show {name}"))[0]
    return Dev(name, info["ifindex"], info["address"])


@pytest.fixture(scope="session")
def bpfnet():
    ns = f"fpt-bpf-{secrets.token_hex(3)}"
    sh(f"ip netns add {ns}")
    try:
        cmds = [
            "link set lo up",
            "link add caliA type veth peer name podA",
            "link add caliB type veth peer name podB",
            "link add caliC type veth peer name podC",
            "link add caliD type veth peer name podD",
            "link add eth1 type veth peer name vpc1",
            "link set caliA up", "link set caliB up", "link set caliC up", "link set caliD up",
            "link set podA up", "link set podB up", "link set podC up", "link set podD up",
            "link set eth1 up", "link set vpc1 up",
            f"addr add {ENI_IP}/32 dev eth1",
            f"route add {POD_A} dev caliA scope link",
            f"route add {POD_B} dev caliB scope link",
            f"route add {POD_C} dev caliC scope link",
            f"rule add to {POD_A} lookup main pref 512",
            f"rule add from {POD_A} lookup 1001 pref 2048",
            f"rule add from {POD_C} lookup 1001 pref 2048",
            f"route add default via {GW} dev eth1 onlink table 1001",
            f"route add {REMOTE_NO_NEIGH}/32 via {GW2} dev eth1 onlink table 1001",
            f"neigh add {GW} lladdr {GW_MAC} dev eth1 nud permanent",
            # the same node's IPv6 half, as Terway lays it out per family
            f"-6 addr add {ENI_IP6}/128 dev eth1 nodad",
            f"-6 route add {POD_A6} dev caliA",
            f"-6 route add {POD_B6} dev caliB",
            f"-6 route add {POD_C6} dev caliC",
            f"-6 rule add to {POD_A6} lookup main pref 512",
            f"-6 rule add from {POD_A6} lookup 1001 pref 2048",
            f"-6 rule add from {POD_C6} lookup 1001 pref 2048",
            f"-6 route add default via {GW6} dev eth1 table 1001",
            f"-6 route add {REMOTE6_NO_NEIGH}/128 via {GW6_NO_NEIGH} dev eth1 table 1001",
            f"-6 neigh add {GW6} lladdr {GW_MAC} dev eth1 nud permanent",
        ]
        sh(f"ip netns exec {ns} sysctl -qw net.ipv6.conf.all.forwarding=1")
        for c in cmds:
            sh(f"ip -n {ns} {c}")
        sh(f"ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1")
        yield BpfNet(ns, _dev(ns, "caliA"), _dev(ns, "caliB"), _dev(ns, "caliC"), _dev(ns, "eth1"),
                     _dev(ns, "caliD"))
    finally:
        subprocess.run(f"ip netns del {ns}", shell=True)


def put_pods(d: Datapath, n: BpfNet) -> None:
    """The endpoints of pods A, B (on ENI eth1) and C (ENI unresolved: fastpath
    must not guess a way out for it)."""
    d.maps.endpoint_put(Endpoint(POD_A, "caliA", n.cali_a.ifindex, n.cali_a.mac, n.pod_a_mac,
                                 "eth1", n.eth1.ifindex))
    d.maps.endpoint_put(Endpoint(POD_B, "caliB", n.cali_b.ifindex, n.cali_b.mac, n.pod_b_mac,
                                 "eth1", n.eth1.ifindex))
    d.maps.endpoint_put(Endpoint(POD_C, "caliC", n.cali_c.ifindex, n.cali_c.mac, n.pod_c_mac))


@contextlib.contextmanager
def loaded(cfg: Config, n: BpfNet):
    """A datapath built for the tests in bpfnet's netns with pods A, B, C;
    closed on the way out."""
    d = Datapath(cfg, netns=n.ns, test_build=True).load()
    try:
        put_pods(d, n)
        yield d
    finally:
        d.close()


@pytest.fixture(scope="session")
def dp(bpffs, bpfnet):
    with loaded(bpf_config(bpffs), bpfnet) as d:
        yield d


def put_frontend(lb, vip: str, port: int, proto: str, slots_id: int, backend_ids: list[int],
                 *flags) -> None:
    """A Service frontend over `backend_ids`: the slots first, so the
    frontend never counts slots that are not there yet."""
    if backend_ids:
        lb.put_slots(slots_id, backend_ids)
    lb.put_service(vip, port, proto, slots_id, len(backend_ids), *flags)


@contextlib.contextmanager
def frontends(lb, backends: dict[int, tuple], services: list[tuple], flush: bool = False):
    """A test module's Services: `backends` {id: (ip, port, proto)}, then
    `services` (put_frontend's arguments); the frontends deleted on the way
    out. `flush`: conntrack flushed after they are written and after they
    are gone, so no flow of another module is seen or left behind."""
    for bid, backend in backends.items():
        lb.put_backend(bid, *backend)
    for service in services:
        put_frontend(lb, *service)
    if flush:
        lb.conntrack_flush()
    try:
        yield lb
    finally:
        for vip, port, proto, *_ in services:
            lb.delete_service(vip, port, proto)
        if flush:
            lb.conntrack_flush()


def pods_abc() -> list:
    """Namespace x with pods A, B and C (labels app=a, b, c): the cluster
    objects a module's policies select from."""
    from tests.policy.kube import namespace, pod
    return [namespace("x", ns="x"), *(pod("x", n, ip, labels={"app": n})
                                      for n, ip in (("a", POD_A), ("b", POD_B), ("c", POD_C)))]


@contextlib.contextmanager
def enforced(d: Datapath, snap, audited=frozenset(), *, flush_first: bool = False,
             flush_last: bool = False):
    """`snap`'s NetworkPolicy state for node n1, compiled and written as the
    agent writes it (compile_policy -> diff -> apply), with policy checks on,
    for a test module; yields the state. On the way out the checks are off
    and the policy maps empty. flush_first / flush_last: conntrack flushed
    once the state is on / once it is gone."""
    from agent.policy import compile_policy, diff
    state = compile_policy(snap, "n1", [ENI_IP], "default", set(audited))
    for op in diff(d.policy.image(), state):
        d.policy.apply(op)
    d.settings.set_policy(True)
    if flush_first:
        d.lb.conntrack_flush()
    try:
        yield state
    finally:
        d.settings.set_policy(False)
        d.policy.clear()
        if flush_last:
            d.lb.conntrack_flush()


@dataclass
class Run:
    verdict: int
    out: bytes
    reason: str
    redirect_kind: str
    redirect_ifindex: int
    nexthop: str
    record: object = None     # the whole fp_decision (service and policy decisions)


def run_prog(dp: Datapath, netns: str, prog: str, packet: bytes, ifindex: int,
             mark: int = 0, gso_size: int = 0) -> Run:
    from agent.datapath.maps import DEFS, ip_from_be32
    dp.maps.decision_reset(NOT_RECORDED)
    with in_netns(netns):
        res = prog_test_run(dp.prog_fd(prog), packet, ifindex=ifindex, mark=mark,
                            gso_size=gso_size, gso_segs=2 if gso_size else 0)
    rec = dp.maps.decision()
    return Run(res.retval, res.data, DEFS.reason(rec.reason),
               DEFS.redirect_kinds[rec.kind].label, rec.ifindex, ip_from_be32(rec.nexthop), rec)


# Conntrack lifetimes of the `ct_dp` datapath: short, and each state's its
# own, so a test can tell which one the programs applied.
CT_LIFETIMES = dict(conntrack_tcp_syn_timeout=40, conntrack_tcp_idle_timeout=300,
                    conntrack_tcp_fin_timeout=25, conntrack_tcp_close_timeout=7,
                    conntrack_idle_timeout=55)
CT_SMALL = 1024           # entries of each conntrack map of `ct_dp`


@pytest.fixture(scope="session")
def ct_dp(bpffs, bpfnet):
    """A second datapath (its own pins) with the lifetimes above and the
    smallest conntrack maps the configuration allows."""
    cfg = Config.defaults().replace(bpffs_root=f"{bpffs}/ct", service_cidrs=SERVICE_CIDR,
                                    conntrack_map_size=CT_SMALL,
                                    conntrack_new_map_size=CT_SMALL,
                                    conntrack_policy_map_size=CT_SMALL, **CT_LIFETIMES)
    with loaded(cfg, bpfnet) as d:
        yield d


class Events:
    """The monitor's ring buffer, read through libbpf from its pin (one
    reader per datapath: the ring has one consumer position), its records
    decoded with the BTF of the programs that write them (as the CLI does)."""

    def __init__(self, dp):
        import os
        from agent.datapath import libbpf, tables
        from agent.datapath.maps import MAP
        from agent.datapath.ringbuf import RingReader
        fd = libbpf.obj_get(os.path.join(dp.options.pin_root, MAP["FP_MAP_EVENTS"]))
        self.reader = RingReader(fd)
        self.schema = tables.program_schema(dp.prog_fd("fp_from_pod"))

    def poll(self):
        return self.reader.poll(0)

    def decoded(self) -> list[dict]:
        """The records since the last poll: addresses and ports as text and
        numbers, `reason` as its label."""
        from agent.inspect.events import decode_event
        out = []
        for raw in self.poll():
            ev = decode_event(raw, self.schema)
            out.append(dict(ifindex=ev["ifindex"], reason=ev["reason_label"], type=ev["type"],
                            saddr=ev["saddr"], daddr=ev["daddr"], sport=ev["sport"],
                            dport=ev["dport"], proto=ev["proto"], flags=ev["flags"],
                            policy_id=ev["policy_id"], peer_id=ev["peer_id"]))
        return out


@pytest.fixture(scope="session")
def events(dp):
    return Events(dp)


# -- pods A, B and C dual stack (the IPv6 tests) ---------------------------------------

@contextlib.contextmanager
def dual_stack(dp: Datapath, n: BpfNet, pods: str = "ABC", c_on_eni: bool = False):
    """`pods` registered dual stack (POD_A6, ...) as discovery finds them:
    A and B on ENI eth1, C on it only with `c_on_eni`. put_pods'
    IPv4-only registrations again afterwards (its unresolved C is what
    other modules' tests rely on)."""
    addrs = {"A": (POD_A, POD_A6), "B": (POD_B, POD_B6), "C": (POD_C, POD_C6)}
    eps = []
    for p in pods:
        dev, mac = getattr(n, f"cali_{p.lower()}"), getattr(n, f"pod_{p.lower()}_mac")
        eni = ("eth1", n.eth1.ifindex) if p != "C" or c_on_eni else ()
        eps.append(Endpoint(addrs[p][0], dev.name, dev.ifindex, dev.mac, mac, *eni,
                            ip6=addrs[p][1]))
    for ep in eps:
        dp.maps.endpoint_put(ep)
    try:
        yield eps
    finally:
        put_pods(dp, n)
