"""Simulated Terway ENIMultiIP nodes, built from network namespaces and veths.

A `World` is a small VPC: one *vpc* netns that routes between nodes (the
vSwitches and their gateways), and any number of nodes laid out exactly like
the seed node (see /work/shared/seeds/ack-terway-modes.md):

     pod netns                node netns                          vpc netns
    +-----------+  veth   +----------------------------+  veth  +-------------------+
    | eth0 /32  |---------| caliXXXXXXXXXXX            |        |                   |
    | default   |         |   podIP dev cali scope link|        |                   |
    | via       |         | eth0  10.240.0.(10+k)/24   |--------| fpw<tag>n<k>e0    |
    | 169.254.  |         | ethj  ENI IP /32           |--------| fpw<tag>n<k>e<j>  |
    | 1.1       |         | 512:  to podIP lookup main |        | podIP via ENI IP  |
    +-----------+         | 2048: from podIP lookup    |        |   onlink          |
                          |       1000+ifindex(ethj)   |        | ip_forward=1      |
                          | ip_forward=1, rp_filter=0  |        +-------------------+
                          +----------------------------+

Pod egress leaves through its own ENI (policy routing), pod ingress arrives on
that ENI (the vpc routes each pod IP via its ENI's address, so the vpc only
ARPs for ENI addresses, as the real VPC's routers do). A pod reaches pods on its
node through the node's main table (rule 512). No masquerade anywhere.

Lifecycle: `with World() as w:` creates the vpc; leaving the block (normally,
by exception, by SIGTERM/SIGINT or at interpreter exit) stops every process
started in the world and deletes every netns it made, veths included. Worlds
killed outright are swept by `cleanup_stale()`, which each new World runs.
The address plan and naming rules are in `agent.sim.plan`.
"""
from __future__ import annotations

import atexit
import os
import secrets
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from . import plan
from .netns import (CommandError, Netns, acquire_lock, cleanup_stale, delete_many,
                    delete_netns, ip_batch, list_netns, release_lock)


@dataclass
class Iface:
    """A node NIC (eth0, or an ENI ethj) and what the vpc side knows of it."""
    name: str
    ifindex: int
    ip: str
    mac: str
    vpc_ifname: str          # its veth peer in the vpc netns
    gateway: str             # the vSwitch gateway it routes through
    prefixlen: int = 32


@dataclass
class Eni(Iface):
    """An ENI (ethj, j >= 1): a /32, its own routing table and vSwitch."""
    index: int = 0           # j in ethj
    table: int = 0           # 1000 + ifindex, as Terway
    vswitch: str = ""        # CIDR pods on this ENI draw their IPs from
    ip6: str = ""            # its IPv6 address, in a dual-stack world
    _next_slot: int = field(default=0, repr=False)


class Endpoint(Netns):
    """A pod-like netns with one interface `eth0` holding a /32."""

    def __init__(self, name: str, netns: str, ip: str):
        super().__init__(netns)
        self.name = name
        self.ip = ip
        self.ip6 = ""              # its IPv6 address, in a dual-stack world
        self.ifname = "eth0"
        self.ifindex = 0
        self.mac = ""


class Pod(Endpoint):
    """A pod as Terway's veth datapath sets it up (see module docstring);
    in a dual-stack world with an IPv6 address too (`ip6`)."""

    def __init__(self, node: "Node", name: str, eni: Eni, ip: str, ip6: str = ""):
        super().__init__(name, plan.pod_ns(node.world.tag, name), ip)
        self.ip6 = ip6
        self.node = node
        self.eni = eni
        self.host_ifname = plan.cali_name(node.world.tag, name)
        self.host_ifindex = 0
        self.host_mac = ""

    def __repr__(self) -> str:
        return f"<Pod {self.name} {self.ip} on {self.node.name}/{self.eni.name} via {self.host_ifname}>"


class Node(Netns):
    """A Kubernetes node: primary NIC eth0, ENIs eth1..ethN, pods on cali veths."""

    def __init__(self, world: "World", name: str, index: int):
        super().__init__(plan.node_ns(world.tag, name))
        self.world = world
        self.name = name
        self.index = index
        self.ip = plan.node_ip(index)
        self.gateway = plan.NODE_GATEWAY
        self.eth0: Iface | None = None
        self.enis: list[Eni] = []
        self.pods: list[Pod] = []

    # -- building --------------------------------------------------------------
    def _build(self, enis: int) -> None:
        w, vpc = self.world, self.world.vpc
        # rp_filter off before any device exists so every device inherits it:
        # ENI-sourced replies arrive on interfaces the main table does not
        # route back through.
        self._create({"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                      "net.ipv4.conf.default.rp_filter": 0, **w._ipv6_sysctls()})
        peer = plan.vpc_ifname(w.tag, self.index, 0)
        # Veths are created inside the vpc netns with their peer placed straight
        # into the node: nothing ever appears in the machine's own namespace.
        ip_batch(vpc.netns, [f"link add {peer} type veth peer name eth0 netns {self.netns}"])
        ip_batch(self.netns, [
            f"addr add {self.ip}/{plan.NODE_PREFIXLEN} dev eth0",
            "link set eth0 up",
            f"route add default via {self.gateway} dev eth0",
        ])
        # The gateway is a /32 on every node-facing veth; proxy ARP lets a node
        # reach another node's IP on its connected /24, as the vSwitch does.
        # (proxy_delay 0: the kernel would otherwise hold each proxied reply
        # for up to 0.8 s, as if the VPC were slow.)
        vpc.sysctl({f"net.ipv4.conf.{peer}.proxy_arp": 1, f"net.ipv4.neigh.{peer}.proxy_delay": 0})
        ip_batch(vpc.netns, [
            f"addr add {self.gateway}/32 dev {peer}",
            f"link set {peer} up",
            f"route add {self.ip}/32 dev {peer} scope link",
        ])
        link = self.link("eth0")
        self.eth0 = Iface("eth0", link["ifindex"], self.ip, link["address"], peer,
                          self.gateway, plan.NODE_PREFIXLEN)
        for j in range(1, enis + 1):
            self._add_eni(j)

    def _add_eni(self, j: int) -> Eni:
        w, vpc = self.world, self.world.vpc
        name, peer = f"eth{j}", plan.vpc_ifname(w.tag, self.index, j)
        ip, gw = plan.eni_ip(self.index, j), plan.eni_gateway(j)
        ip_batch(vpc.netns, [f"link add {peer} type veth peer name {name} netns {self.netns}"])
        link = self.link(name)
        table = plan.eni_table(link["ifindex"])
        ip_batch(self.netns, [
            f"addr add {ip}/32 dev {name}",
            f"link set {name} up",
            f"route add default via {gw} dev {name} onlink table {table}",
        ])
        ip_batch(vpc.netns, [
            f"addr add {gw}/32 dev {peer}",
            f"link set {peer} up",
            f"route add {ip}/32 dev {peer} scope link",
        ])
        eni = Eni(name, link["ifindex"], ip, link["address"], peer, gw, 32,
                  index=j, table=table, vswitch=plan.eni_vswitch(j))
        if w.dual_stack:
            # the IPv6 half: the ENI's /128, its table's default route via
            # the vSwitch's link-local gateway; the vpc reaches the ENI on-link
            eni.ip6 = plan.eni_ip6(self.index, j)
            ip_batch(self.netns, [
                f"addr add {eni.ip6}/128 dev {name} nodad",
                f"route add ::/0 via {plan.ENI_GATEWAY6} dev {name} table {table}",
            ])
            ip_batch(vpc.netns, [
                f"addr add {plan.ENI_GATEWAY6}/64 dev {peer} nodad",
                f"route add {eni.ip6}/128 dev {peer}",
            ])
        self.enis.append(eni)
        return eni

    # -- pods --------------------------------------------------------------------
    def add_pod(self, name: str, eni: int | Eni = 1, ipv4: bool = True) -> Pod:
        """Create pod `name` with an IP from ENI `eni` (its number j, or the Eni);
        `ipv4=False` (a dual-stack world only): an IPv6-only pod, laid out
        as a dual-stack one without any of its IPv4 half."""
        plan.check_name("pod", name)
        if any(p.name == name for p in self.world.pods):
            raise ValueError(f"pod {name!r} already exists in this world")
        e = eni if isinstance(eni, Eni) else next((x for x in self.enis if x.index == eni), None)
        if e is None or e not in self.enis:
            raise ValueError(f"node {self.name} has no ENI {eni!r} (it has {len(self.enis)})")
        if not ipv4 and not self.world.dual_stack:
            raise ValueError(f"pod {name!r}: an IPv6-only pod needs World(dual_stack=True)")
        ip = plan.pod_ip(self.index, e.index, e._next_slot) if ipv4 else ""
        ip6 = plan.pod_ip6(self.index, e.index, e._next_slot) if self.world.dual_stack else ""
        e._next_slot += 1    # never reused within a world: no stale conntrack/neigh surprises
        pod = Pod(self, name, e, ip, ip6)
        self.world._track(pod)
        try:
            self._plumb(pod)
        except BaseException:
            # Leave no half-made pod behind (rules without a netns, a route
            # the vpc would follow into nothing) for the rest of the test.
            self._unplumb(pod)
            raise
        self.pods.append(pod)
        return pod

    def _plumb(self, pod: Pod) -> None:
        """What Terway's CNI ADD does for a shared-ENI pod (veth datapath).

        Four processes per pod (netns, node, pod, vpc), so a world of a
        thousand pods is built in about a minute.
        """
        ip, e, cali = pod.ip, pod.eni, pod.host_ifname
        # (a dual-stack pod's link-local address usable at once, as the node's)
        pod._create({"net.ipv6.conf.default.accept_dad": 0} if pod.ip6 else None, lo=False)
        v4 = [f"route add {ip} dev {cali} scope link",
              f"rule add to {ip} lookup main pref 512",
              f"rule add from {ip} lookup {e.table} pref 2048"] if ip else []
        host = ip_batch(self.netns, [
            f"link add {cali} type veth peer name eth0 netns {pod.netns}",
            f"link set {cali} up",
            *v4,
            f"link show dev {cali}",
        ])[0]
        pod.host_ifindex, pod.host_mac = host["ifindex"], host["address"]
        inner = ip_batch(pod.netns, [
            "link set lo up",
            *([f"addr add {ip}/32 dev eth0"] if ip else []),
            "link set eth0 up",
            *([f"route add default via {plan.POD_GATEWAY} dev eth0 onlink",
               f"neigh replace {plan.POD_GATEWAY} lladdr {pod.host_mac} dev eth0 nud permanent"]
              if ip else []),
            "link show dev eth0",
        ])[0]
        pod.ifindex, pod.mac = inner["ifindex"], inner["address"]
        if ip:
            ip_batch(self.world.vpc.netns,
                     [f"route add {ip}/32 via {e.ip} dev {e.vpc_ifname} onlink"])
        if pod.ip6:
            self._plumb6(pod)

    def _plumb6(self, pod: Pod) -> None:
        """The IPv6 half of a dual-stack pod, as Terway lays it out: a /128 on
        eth0, default via the link-local gateway (local_router_ipv6) with a permanent
        neighbour entry (the host veth's MAC), the host route and the
        policy-routing rules per family; the vpc routes the /128 via the ENI."""
        ip6, e, cali = pod.ip6, pod.eni, pod.host_ifname
        ip_batch(self.netns, [
            f"route add {ip6}/128 dev {cali}",
            f"rule add to {ip6} lookup main pref 512",
            f"rule add from {ip6} lookup {e.table} pref 2048",
        ], family=6)
        ip_batch(pod.netns, [
            f"addr add {ip6}/128 dev eth0 nodad",
            f"route add ::/0 via {self.world.gateway6} dev eth0",
            f"neigh replace {self.world.gateway6} lladdr {pod.host_mac} dev eth0 nud permanent",
        ])
        ip_batch(self.world.vpc.netns, [f"route add {ip6}/128 via {e.ip6} dev {e.vpc_ifname}"])

    def _unplumb(self, pod: Pod) -> None:
        """CNI DEL, then the runtime deleting the netns; tolerates a partial pod."""
        if pod.ip:
            self.iproute(*f"rule del to {pod.ip} lookup main pref 512".split(), check=False)
            self.iproute(*f"rule del from {pod.ip} lookup {pod.eni.table} pref 2048".split(),
                         check=False)
            self.world.vpc.iproute("route", "del", f"{pod.ip}/32", check=False)
        if pod.ip6:
            self.iproute(*f"-6 rule del to {pod.ip6} lookup main pref 512".split(), check=False)
            self.iproute(*f"-6 rule del from {pod.ip6} lookup {pod.eni.table} pref 2048".split(),
                         check=False)
            self.world.vpc.iproute("-6", "route", "del", f"{pod.ip6}/128", check=False)
        # Deleting the veth takes the endpoint route with it; the netns goes last.
        self.iproute("link", "del", pod.host_ifname, check=False)
        if pod.netns in list_netns():
            pod._destroy()
        self.world._untrack(pod)

    def remove_pod(self, pod: Pod) -> None:
        """Undo add_pod: stop the pod's processes, remove its rules, routes, veth and netns."""
        if pod not in self.pods:
            raise ValueError(f"{pod!r} is not on node {self.name}")
        self.pods.remove(pod)
        self._unplumb(pod)

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def eni(self, j: int) -> Eni:
        return next(e for e in self.enis if e.index == j)

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.ip} enis={[e.name for e in self.enis]} pods={len(self.pods)}>"


class Client(Endpoint):
    """A host outside the cluster (a user, a load balancer's health probe)
    that reaches the VPC through its gateway: eth0 holds 10.250.0.(10+c)/24,
    default via the gateway the vpc netns holds. The vpc routes it like any
    subnet, so it reaches node addresses, pod IPs, and whatever external or
    load-balancer IPs `World.route_to_node` sends to a node."""

    def __init__(self, world: "World", name: str, index: int):
        super().__init__(name, plan.client_ns(world.tag, name), plan.client_ip(index))
        self.index = index
        self.vpc_ifname = plan.vpc_client_ifname(world.tag, index)

    def _build(self, world: "World") -> None:
        vpc = world.vpc
        self._create()
        ip_batch(vpc.netns, [f"link add {self.vpc_ifname} type veth peer name eth0 "
                             f"netns {self.netns}"])
        ip_batch(self.netns, [
            f"addr add {self.ip}/{plan.CLIENT_PREFIXLEN} dev eth0",
            "link set eth0 up",
            f"route add default via {plan.CLIENT_GATEWAY} dev eth0",
        ])
        vpc.sysctl({f"net.ipv4.conf.{self.vpc_ifname}.proxy_arp": 1,
                    f"net.ipv4.neigh.{self.vpc_ifname}.proxy_delay": 0})
        ip_batch(vpc.netns, [
            f"addr add {plan.CLIENT_GATEWAY}/32 dev {self.vpc_ifname}",
            f"link set {self.vpc_ifname} up",
            f"route add {self.ip}/32 dev {self.vpc_ifname} scope link",
        ])
        link = self.link("eth0")
        self.ifindex, self.mac = link["ifindex"], link["address"]

    def __repr__(self) -> str:
        return f"<Client {self.name} {self.ip}>"


class DirectPair:
    """Two pod-like netns joined by one plain veth: the physical limit for a
    pod-to-pod path (no node, no routing decision, no BPF)."""

    def __init__(self, world: "World", index: int):
        ip_a, ip_b = plan.direct_ips(index)
        self.index = index
        self.a = Endpoint(f"d{index}a", plan.direct_ns(world.tag, index, "a"), ip_a)
        self.b = Endpoint(f"d{index}b", plan.direct_ns(world.tag, index, "b"), ip_b)
        # in a dual-stack world, an IPv6 address at each end too
        self.a.ip6, self.b.ip6 = plan.direct_ips6(index) if world.dual_stack else ("", "")

    def _build(self, world: "World") -> None:
        a, b = self.a, self.b
        for end in (a, b):
            world._track(end)
            end._create({"net.ipv6.conf.default.accept_dad": 0} if end.ip6 else None)
        ip_batch(a.netns, [f"link add eth0 type veth peer name eth0 netns {b.netns}"])
        for end, peer in ((a, b), (b, a)):
            ip_batch(end.netns, [
                f"addr add {end.ip}/32 dev eth0",
                "link set eth0 up",
                f"route add {peer.ip}/32 dev eth0 scope link",
            ] + ([f"addr add {end.ip6}/128 dev eth0 nodad",
                  f"route add {peer.ip6}/128 dev eth0"] if end.ip6 else []))
            link = end.link("eth0")
            end.ifindex, end.mac = link["ifindex"], link["address"]

    def __iter__(self) -> Iterator[Endpoint]:
        return iter((self.a, self.b))

    def __repr__(self) -> str:
        return f"<DirectPair {self.a.ip} <-> {self.b.ip}>"


# -- process-wide registry, so a signal or exit still cleans up ---------------

_LIVE: set["World"] = set()
_LIVE_LOCK = threading.RLock()
_PREV_HANDLERS: dict[int, object] = {}
_HOOKS_INSTALLED = False


def _close_all_live() -> None:
    # Only worlds this process made: a forked child that exits must not tear
    # down its parent's world.
    with _LIVE_LOCK:
        worlds = [w for w in _LIVE if w._owner_pid == os.getpid()]
    for w in worlds:
        try:
            w.close()
        except Exception as e:     # keep going: the other worlds must still go
            print(f"agent.sim: cleanup of world {w.tag} failed: {e}", file=sys.stderr)


def _on_signal(signum, frame) -> None:
    _close_all_live()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)           # e.g. SIGINT's KeyboardInterrupt
    elif prev != signal.SIG_IGN:
        # Die of the same signal, so the parent sees what really happened.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_close_all_live)
    # Signal handlers can only be set from the main thread; a world made in
    # another thread still gets atexit and cleanup_stale.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            _PREV_HANDLERS[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)


class World:
    """A simulated VPC: `with World() as w: n = w.add_node("n1"); a = n.add_pod("a")`."""

    def __init__(self, dual_stack: bool = False, local_router_ipv6: str = "") -> None:
        # dual stack: every ENI and pod gets an IPv6 address too (plan.py),
        # its default route via local_router_ipv6 (the agent's setting)
        self.dual_stack = dual_stack
        self.gateway6 = local_router_ipv6 or plan.POD_GATEWAY6
        self.tag = ""
        self.vpc: Netns | None = None
        self.vpc_ns = ""
        self.nodes: list[Node] = []
        self.direct_pairs: list[DirectPair] = []
        self.clients: list[Client] = []
        self._ns: list[Netns] = []          # every netns made, in creation order
        self._lock_fd: int | None = None
        self._owner_pid = os.getpid()
        self._closed = False
        self._mutex = threading.RLock()

    # -- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> "World":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise
            # Never hide the failure that brought us here behind a cleanup error.
            import traceback
            traceback.print_exc(file=sys.stderr)

    def start(self) -> "World":
        if os.geteuid() != 0:
            raise PermissionError("agent.sim needs root (network namespaces, veths)")
        _install_hooks()
        self._owner_pid = os.getpid()
        cleanup_stale()
        for _ in range(64):
            tag = secrets.token_hex(2)
            fd = acquire_lock(plan.PREFIX, tag)
            if fd is not None:
                break
        else:
            raise RuntimeError("no free world tag after 64 tries: stale locks in /run/fastpath-sim?")
        self.tag, self._lock_fd = tag, fd
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self.vpc = Netns(plan.vpc_ns(tag))
            self.vpc_ns = self.vpc.netns
            self._track(self.vpc)
            self.vpc._create({"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                              "net.ipv4.conf.default.rp_filter": 0, **self._ipv6_sysctls()})
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop processes, delete every netns (pods, nodes, vpc); idempotent."""
        with self._mutex:
            if self._closed or not self.tag:
                return
            self._closed = True
            errors: list[str] = []
            # Processes we started first (so their return codes stay true),
            # then anything else still inside; then every netns in one go,
            # including any made by a failed step before it was tracked.
            for ns in self._ns:
                ns._stop_procs()
            names = list(dict.fromkeys([ns.netns for ns in self._ns] +
                                       [n for n in list_netns() if plan.tag_of(n) == self.tag]))
            try:
                failed = delete_many(names)
            except (subprocess.SubprocessError, OSError) as e:
                failed, errors = names, [str(e)]
            for n in failed:
                try:
                    delete_netns(n)
                except (CommandError, OSError) as e:
                    errors.append(str(e))
            self._ns.clear()
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self._lock_fd is not None:
                release_lock(plan.PREFIX, self.tag, self._lock_fd)
                self._lock_fd = None
            if errors:
                raise RuntimeError(f"world {self.tag} cleanup: " + "; ".join(errors))

    def _ipv6_sysctls(self) -> dict[str, int]:
        """For a routing netns of a dual-stack world: IPv6 forwarding, and no
        duplicate address detection, so that link-local addresses are
        usable at once rather than after a second or more as tentative."""
        if not self.dual_stack:
            return {}
        return {"net.ipv6.conf.all.forwarding": 1, "net.ipv6.conf.default.accept_dad": 0,
                "net.ipv6.conf.all.accept_dad": 0}

    def _track(self, ns: Netns) -> None:
        with self._mutex:
            if self._closed:
                raise RuntimeError(f"world {self.tag} is closed")
            self._ns.append(ns)

    def _untrack(self, ns: Netns) -> None:
        with self._mutex:
            if ns in self._ns:
                self._ns.remove(ns)

    # -- building ----------------------------------------------------------------
    def add_node(self, name: str, enis: int = 1) -> Node:
        """A node with eth0 and ENIs eth1..eth<enis>, routed by the vpc."""
        plan.check_name("node", name)
        if any(n.name == name for n in self.nodes):
            raise ValueError(f"node {name!r} already exists")
        if not 0 <= enis <= plan.MAX_ENIS:
            raise ValueError(f"enis={enis}: 0..{plan.MAX_ENIS}")
        node = Node(self, name, len(self.nodes) + 1)
        self._track(node)
        node._build(enis)
        self.nodes.append(node)
        return node

    def add_client(self, name: str) -> Client:
        """An external client on the VPC side (outside every node)."""
        plan.check_name("client", name)
        if any(c.name == name for c in self.clients):
            raise ValueError(f"client {name!r} already exists")
        c = Client(self, name, len(self.clients) + 1)
        self._track(c)
        c._build(self)
        self.clients.append(c)
        return c

    def route_to_node(self, ip: str, node: "Node", via_eni: int = 0) -> None:
        """Make the vpc send `ip` (an external or load-balancer IP) to
        `node`: to its primary address, or to ENI `via_eni`'s, as a VPC
        route entry or a load balancer would."""
        nic = node.eth0 if not via_eni else node.eni(via_eni)
        self.vpc.iproute("route", "replace", f"{ip}/32", "via", nic.ip, "dev", nic.vpc_ifname,
                         "onlink")

    def add_direct_pair(self) -> DirectPair:
        pair = DirectPair(self, len(self.direct_pairs) + 1)
        pair._build(self)
        self.direct_pairs.append(pair)
        return pair

    # -- lookups -----------------------------------------------------------------
    @property
    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def netns_names(self) -> list[str]:
        return [ns.netns for ns in self._ns]

    def __repr__(self) -> str:
        return f"<World {self.tag} nodes={[n.name for n in self.nodes]}>"


@contextmanager
def direct_pair() -> Iterator[DirectPair]:
    """A direct pair in a world of its own: `with direct_pair() as pair: ...`.
    Inside an existing world, use `world.add_direct_pair()`."""
    with World() as w:
        yield w.add_direct_pair()


__all__ = ["World", "Node", "Pod", "Eni", "Iface", "Endpoint", "DirectPair", "Client",
           "direct_pair", "cleanup_stale"]
