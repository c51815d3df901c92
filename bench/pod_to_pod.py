"""Pod to pod: fastpath's redirect vs the host stack vs a bare veth, on one
node and across two nodes.

Arms, alternated per round (medians over rounds):

  direct     two pod netns joined by one veth: the physical limit
  stack      pod a -> cali -> node routing (rule 512, endpoint route) -> cali -> pod b
  bare-peer  a program doing nothing but bpf_redirect_peer, on the same veths
             (IPv4 and IPv6: the family difference any program pays)
  fastpath   the same node and pods with fastpath attached (bpf_redirect_peer)
  x-stack    pod a on n1 -> n1's stack -> ENI -> vpc -> ENI -> n2's stack -> pod c
  x-fastpath the same with fastpath on both nodes (FIB lookup + redirect out of
             the pod's ENI on n1, redirect_peer from the ENI on n2)
  x-bare     the floor of that technique: on each node a program doing only
             the FIB lookup and the redirect out of the ENI (the pod's veth)
             and one doing only redirect_peer into the pod (the ENI); IPv4
             and IPv6 (the FIB lookup for AF_INET6), as x-fastpath

       direct:  [a]==veth==[b]
   stack/fp:    [a]--cali--( node n1 )--cali--[b]
   cross-node:  [a]--cali--( n1 )--eth1==( vpc )==eth1--( n2 )--cali--[c]

Each arm measures TCP_RR (1-byte transactions/s on one connection), TCP_CRR
(connect, 1-byte request/response, close: connections/s) with bench/tools/fprr,
and TCP throughput with iperf3, client and server pinned to CPU 0.

The fastpath arms attach with `fastpath_setup(world, node)`, a context
manager that attaches fastpath to the node (and registers its pods) for the
duration of the arm: `agent.sim.agent.sim_attach` unless the caller gives
another. Each round checks with bpftool that the stack arms' nodes carry no
program at all and that fastpath's arms have programs on every pod veth, so
a failed detach or a no-op attach can never pass one arm off as the other.
`--quick` runs fewer and shorter rounds (make bench-quick).
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import Callable, ContextManager

from agent.sim import World
from bench import harness
from bench.harness import Endpoints, median

COMMAND = "python -m bench.pod_to_pod"
FastpathSetup = Callable[[World, object], ContextManager]


def default_fastpath_setup() -> tuple[FastpathSetup, str]:
    from agent.sim.agent import sim_attach
    return (lambda world, node: sim_attach(node)), "agent.sim.agent.sim_attach"


def _assert_no_bpf(node) -> None:
    progs = harness.bpf_devices(node)
    if progs:
        raise RuntimeError(f"stack arm: node still has BPF programs attached: {progs}")


def _assert_bpf_on_pods(node) -> None:
    progs = harness.bpf_devices(node)
    bare = [p.host_ifname for p in node.pods if not progs.get(p.host_ifname)]
    if bare:
        raise RuntimeError(f"fastpath arm: nothing attached to {bare} (attached: {progs})")


def run(fastpath_setup: FastpathSetup | None = None, *, discover: bool = True, rounds: int = 5,
        rr_seconds: float = 2.0, crr_seconds: float = 2.0, stream_seconds: float = 3.0,
        record_results: bool = True, log: Callable[[str], None] = print,
        command: str = COMMAND) -> dict:
    """Measure the arms; record figures (bench/results.py) if `record_results`.

    Without `fastpath_setup`, looks for sim_attach unless `discover` is False.
    Returns {"medians": {arm: {metric: value}}, "raw": ..., "fastpath": source or None}.
    """
    source = "given by the caller" if fastpath_setup else None
    if fastpath_setup is None and not discover:
        log("pod_to_pod: fastpath arms NOT run (asked not to); measuring the baselines only")
    elif fastpath_setup is None:
        fastpath_setup, source = default_fastpath_setup()
    if source:
        log(f"pod_to_pod: fastpath arms attach with {source}")
    harness.build_fprr()

    started = time.monotonic()
    # dual stack: the IPv6 figures come from the same pods, in the same run
    with World(dual_stack=True) as w:
        node = w.add_node("n1", enis=1)
        node2 = w.add_node("n2", enis=1)
        a, b = node.add_pod("a"), node.add_pod("b")
        c = node2.add_pod("c")
        pair = w.add_direct_pair()
        eps = {"direct": Endpoints(pair.a, pair.b, pair.b.ip, pair.a.ip),
               "stack": Endpoints(a, b, b.ip, a.ip),
               "cross": Endpoints(a, c, c.ip, a.ip),
               "direct6": Endpoints(pair.a, pair.b, pair.b.ip6, pair.a.ip6),
               "stack6": Endpoints(a, b, b.ip6, a.ip6),
               "cross6": Endpoints(a, c, c.ip6, a.ip6)}
        servers = []
        try:
            for ep in eps.values():
                harness.tune_client(ep.client)
                # the run outlasts the default lifetime when attaching is slow
                servers += harness.start_servers(ep, lifetime=3600)
                # Resolve neighbours and fault in the path before anything counts.
                ep.client.ping(ep.server_ip, count=1)
                harness.fprr(ep, "rr", 0.2)

            def measure(ep: Endpoints) -> dict[str, float]:
                return {"rr": harness.fprr(ep, "rr", rr_seconds),
                        "crr": harness.fprr(ep, "crr", crr_seconds),
                        "stream": harness.iperf3(ep, stream_seconds)}

            turn = {"direct": 0, "fastpath": 0, "bare": 0, "x-bare": 0, "x-fastpath": 0}

            def measure_both(arm: str, ep4: Endpoints, ep6: Endpoints) -> dict[str, float]:
                """IPv4 and IPv6 between the same two netns, back to back,
                the family that goes first alternating per round: right
                after an attach the agent is still busy on the same CPUs,
                which would otherwise always fall on the same family."""
                turn[arm] += 1
                if turn[arm] % 2:
                    got = measure(ep4)
                    six = measure(ep6)
                else:
                    six = measure(ep6)
                    got = measure(ep4)
                got.update({f"{m}.v6": v for m, v in six.items()})
                return got

            def stack_arm() -> dict[str, float]:
                _assert_no_bpf(node)
                return measure(eps["stack"])

            def fastpath_arm() -> dict[str, float]:
                t = time.monotonic()
                with fastpath_setup(w, node):
                    log(f"  (fastpath attached in {time.monotonic() - t:.1f}s)")
                    _assert_bpf_on_pods(node)
                    harness.fprr(eps["stack"], "rr", 0.2)
                    harness.fprr(eps["stack6"], "rr", 0.2)
                    return measure_both("fastpath", eps["stack"], eps["stack6"])

            bare = BarePeer(a, b)

            def bare_arm() -> dict[str, float]:
                with bare.attached(node):
                    harness.fprr(eps["stack"], "rr", 0.2)
                    harness.fprr(eps["stack6"], "rr", 0.2)
                    return measure_both("bare", eps["stack"], eps["stack6"])

            def x_stack_arm() -> dict[str, float]:
                _assert_no_bpf(node)
                _assert_no_bpf(node2)
                return measure(eps["cross"])

            def x_fastpath_arm() -> dict[str, float]:
                with ExitStack() as on:
                    for n in (node, node2):
                        on.enter_context(fastpath_setup(w, n))
                        _assert_bpf_on_pods(n)
                    harness.fprr(eps["cross"], "rr", 0.2)
                    harness.fprr(eps["cross6"], "rr", 0.2)
                    return measure_both("x-fastpath", eps["cross"], eps["cross6"])

            xbare = CrossBare([(node, a), (node2, c)])

            def x_bare_arm() -> dict[str, float]:
                with xbare.attached():
                    harness.fprr(eps["cross"], "rr", 0.2)
                    harness.fprr(eps["cross6"], "rr", 0.2)
                    return measure_both("x-bare", eps["cross"], eps["cross6"])

            arms = {"direct": lambda: measure_both("direct", eps["direct"], eps["direct6"]),
                    "stack": stack_arm,
                    "bare-peer": bare_arm, "x-stack": x_stack_arm, "x-bare": x_bare_arm}
            if fastpath_setup:
                arms["fastpath"] = fastpath_arm
                arms["x-fastpath"] = x_fastpath_arm
            raw = harness.alternate(arms, rounds, log)
        finally:
            harness.stop(servers)
    elapsed = time.monotonic() - started

    med = {arm: {m: median(v) for m, v in ms.items()} for arm, ms in raw.items()}
    _print_table(med, log)
    log(f"pod_to_pod: {rounds} rounds in {elapsed:.0f}s")
    if record_results:
        _record(med, rounds, rr_seconds, crr_seconds, stream_seconds, source, command)
    return {"medians": med, "raw": raw, "fastpath": source}


class BarePeer:
    """The floor of the technique itself: a program that does nothing but
    bpf_redirect_peer() to the other pod (no lookups, no rewrite, no
    counters), for IPv4 and IPv6 alike. fastpath's distance to direct veth
    minus this arm's is what fastpath's own logic costs; this arm's IPv6
    against its IPv4 is the family difference no program can avoid."""

    SRC = r"""
    #include <uapi/linux/bpf.h>
    #include <uapi/linux/pkt_cls.h>
    #include <uapi/linux/if_ether.h>
    static __always_inline int peer(struct __sk_buff *skb, __u32 ifindex)
    {
        void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) > end ||
            (eth->h_proto != bpf_htons(ETH_P_IP) && eth->h_proto != bpf_htons(ETH_P_IPV6)))
            return TC_ACT_UNSPEC;
        return bpf_redirect_peer(ifindex, 0);
    }
    int bare_to_b(struct __sk_buff *skb) { return peer(skb, TO_B); }
    int bare_to_a(struct __sk_buff *skb) { return peer(skb, TO_A); }
    """

    def __init__(self, a, b):
        from bcc import BPF
        self.a, self.b = a, b
        self.bpf = BPF(text=self.SRC, cflags=[f"-DTO_B={b.host_ifindex}",
                                               f"-DTO_A={a.host_ifindex}"])
        self.fds = {n: self.bpf.load_func(n, BPF.SCHED_CLS).fd for n in ("bare_to_b", "bare_to_a")}

    def attached(self, node):
        return ingress_attached([(node, self.a.host_ifname, self.fds["bare_to_b"], "bare_to_b"),
                                 (node, self.b.host_ifname, self.fds["bare_to_a"], "bare_to_a")])


@contextmanager
def ingress_attached(filters):
    """Bare programs on tc ingress for the duration: (node, device, fd,
    name) each, all taken off again however the arm ends."""
    from agent.datapath import tc
    done = []
    try:
        for node, dev, fd, name in filters:
            tc.attach(dev, "ingress", fd, name, 25000, node.netns)
            done.append((node, dev))
        yield
    finally:
        for node, dev in done:
            node.run(["tc", "filter", "del", "dev", dev, "ingress", "prio", "25000"], check=False)


# The floors' way out by the FIB (C, shared by the bare programs here and in
# bench/nodeport_profile.py): what fastpath's pod-to-VPC path must do at the
# least: the FIB lookup with the packet's length, TTL - 1, the MACs, then
# bpf_redirect, or bpf_redirect_neigh when the FIB has no neighbour yet.
BARE_FIB_OUT4 = r"""
    static long (*redirect_neigh4)(__u32 ifindex, struct bpf_redir_neigh *params,
                                   int plen, __u64 flags) = (void *)BPF_FUNC_redirect_neigh;
    static __always_inline int bare_fib_out4(struct __sk_buff *skb, struct ethhdr *eth,
                                             struct iphdr *ip)
    {
        struct bpf_fib_lookup fib = {};
        int rc;

        fib.family = AF_INET;
        fib.tos = ip->tos;
        fib.l4_protocol = ip->protocol;
        fib.tot_len = bpf_ntohs(ip->tot_len);
        fib.ipv4_src = ip->saddr;
        fib.ipv4_dst = ip->daddr;
        fib.ifindex = skb->ifindex;
        rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
        if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
            return TC_ACT_UNSPEC;
        /* TTL - 1: the checksum's high byte gains 1 (RFC 1624) */
        __u32 csum = ip->check + bpf_htons(0x0100);
        ip->check = csum + (csum >> 16);
        ip->ttl--;
        if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
            __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
            __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
            return bpf_redirect(fib.ifindex, 0);
        }
        struct bpf_redir_neigh nh = {};
        nh.nh_family = AF_INET;
        nh.ipv4_nh = fib.ipv4_dst;
        return redirect_neigh4(fib.ifindex, &nh, sizeof(nh), 0);
    }
"""


# The same for IPv6 (fastpath's fp_redirect_fib6: flow label and next
# header in the FIB lookup, hop limit - 1, no header checksum).
BARE_FIB_OUT6 = r"""
    static __always_inline int bare_fib_out6(struct __sk_buff *skb, struct ethhdr *eth,
                                             struct ipv6hdr *ip6)
    {
        struct bpf_fib_lookup fib = {};
        int rc;

        fib.family = AF_INET6;
        fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0FFFFFFF);
        fib.l4_protocol = ip6->nexthdr;
        __builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
        __builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
        fib.ifindex = skb->ifindex;
        rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
        if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
            return TC_ACT_UNSPEC;
        ip6->hop_limit--;
        if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
            __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
            __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
            return bpf_redirect(fib.ifindex, 0);
        }
        struct bpf_redir_neigh nh = {};
        nh.nh_family = AF_INET6;
        __builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
        return redirect_neigh4(fib.ifindex, &nh, sizeof(nh), 0);
    }
"""


class CrossBare:
    """The floor of the cross-node technique: per node, on the pod's veth a
    program doing only what fastpath's pod-to-VPC path must (the FIB lookup
    by the node's policy routing with the packet's length, TTL and MACs, the
    redirect out of the ENI the FIB names, or redirect_neigh), and on the
    ENIs one doing only bpf_redirect_peer into the pod. No conntrack,
    Services, policy, guards or counters: fastpath's cross-node distance to
    this arm is what its own logic costs."""

    SRC = r"""
    #include <uapi/linux/bpf.h>
    #include <uapi/linux/pkt_cls.h>
    #include <uapi/linux/if_ether.h>
    #include <uapi/linux/ip.h>
    #include <uapi/linux/ipv6.h>
    #include <linux/socket.h>
    """ + BARE_FIB_OUT4 + BARE_FIB_OUT6 + r"""
    /* The frame's Ethernet header and its IPv4 or IPv6 header, bounds
       checked: ETH_P_IP or ETH_P_IPV6, 0 for any other frame or one too
       short for its header. */
    static __always_inline int bare_l3(struct __sk_buff *skb, struct ethhdr **eth,
                                       struct iphdr **ip, struct ipv6hdr **ip6)
    {
        void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
        struct ethhdr *e = data;

        if ((void *)(e + 1) > end)
            return 0;
        *eth = e;
        *ip = (void *)(e + 1);
        *ip6 = (void *)(e + 1);
        if (e->h_proto == bpf_htons(ETH_P_IPV6))
            return (void *)(*ip6 + 1) > end ? 0 : ETH_P_IPV6;
        if (e->h_proto == bpf_htons(ETH_P_IP))
            return (void *)(*ip + 1) > end ? 0 : ETH_P_IP;
        return 0;
    }
    int xbare_out(struct __sk_buff *skb)
    {
        struct ethhdr *eth;
        struct iphdr *ip;
        struct ipv6hdr *ip6;

        switch (bare_l3(skb, &eth, &ip, &ip6)) {
        case ETH_P_IPV6:
            /* the pod's own link traffic (neighbour discovery) stays */
            if (ip6->hop_limit <= 1 ||
                ip6->daddr.in6_u.u6_addr8[0] == 0xff || ip6->daddr.in6_u.u6_addr8[0] == 0xfe)
                return TC_ACT_UNSPEC;
            return bare_fib_out6(skb, eth, ip6);
        case ETH_P_IP:
            if (ip->ttl <= 1)
                return TC_ACT_UNSPEC;
            return bare_fib_out4(skb, eth, ip);
        }
        return TC_ACT_UNSPEC;
    }
    int xbare_in(struct __sk_buff *skb)
    {
        struct ethhdr *eth;
        struct iphdr *ip;
        struct ipv6hdr *ip6;

        switch (bare_l3(skb, &eth, &ip, &ip6)) {
        case ETH_P_IPV6:
            if (ip6->daddr.in6_u.u6_addr32[0] != POD_IP6_0 ||
                ip6->daddr.in6_u.u6_addr32[1] != POD_IP6_1 ||
                ip6->daddr.in6_u.u6_addr32[2] != POD_IP6_2 ||
                ip6->daddr.in6_u.u6_addr32[3] != POD_IP6_3)
                return TC_ACT_UNSPEC;
            return bpf_redirect_peer(POD_IFINDEX, 0);
        case ETH_P_IP:
            if (ip->daddr != POD_IP)
                return TC_ACT_UNSPEC;
            return bpf_redirect_peer(POD_IFINDEX, 0);
        }
        return TC_ACT_UNSPEC;
    }
    """

    def __init__(self, node_pods):
        from bcc import BPF
        from agent.datapath.maps import be32
        self.bpfs, self.filters = [], []
        for node, pod in node_pods:
            six = socket.inet_pton(socket.AF_INET6, pod.ip6)
            words = [f"-DPOD_IP6_{i}={int.from_bytes(six[4 * i:4 * i + 4], sys.byteorder)}U"
                     for i in range(4)]
            bpf = BPF(text=self.SRC, cflags=[f"-DPOD_IP={be32(pod.ip)}U",
                                              f"-DPOD_IFINDEX={pod.host_ifindex}", *words])
            fds = {n: bpf.load_func(n, BPF.SCHED_CLS).fd for n in ("xbare_out", "xbare_in")}
            self.bpfs.append(bpf)
            self.filters.append((node, pod.host_ifname, fds["xbare_out"], "xbare_out"))
            self.filters += [(node, e.name, fds["xbare_in"], "xbare_in") for e in node.enis]

    def attached(self):
        return ingress_attached(self.filters)


UNITS = {"rr": "trans/s", "crr": "conn/s", "stream": "Gbit/s"}


def _print_table(med: dict, log) -> None:
    arms = [a for a in med if not a.startswith("x-")]
    log("pod_to_pod medians: " + "  ".join(f"{a:>12s}" for a in arms) + "   stack/direct"
        + ("  fastpath/direct  fastpath/stack" if "fastpath" in med else ""))
    for m in ("rr", "crr", "stream"):
        row = f"  {m:6s} {UNITS[m]:8s}  " + "  ".join(f"{med[a][m]:12,.1f}" for a in arms)
        row += f"   {med['stack'][m] / med['direct'][m]:12.3f}"
        if "fastpath" in med:
            row += f"  {med['fastpath'][m] / med['direct'][m]:15.3f}"
            row += f"  {med['fastpath'][m] / med['stack'][m]:14.3f}"
        log(row)
    if "rr.v6" in med.get("fastpath", {}):
        log("IPv6 medians:    direct6  fastpath6  fastpath6/direct6  fastpath6/fastpath4"
            "    bare6  bare6/bare4  direct6/direct4")
        for m in ("rr", "crr", "stream"):
            d6, f6, f4 = med["direct"][f"{m}.v6"], med["fastpath"][f"{m}.v6"], med["fastpath"][m]
            b6, b4, d4 = med["bare-peer"][f"{m}.v6"], med["bare-peer"][m], med["direct"][m]
            log(f"  {m:6s} {UNITS[m]:8s} {d6:10,.1f} {f6:10,.1f} {f6 / d6:18.3f} {f6 / f4:20.3f}"
                f" {b6:10,.1f} {b6 / b4:12.3f} {d6 / d4:15.3f}")
    if "x-fastpath" in med:
        log("cross-node medians:   x-stack    x-bare  x-fastpath  x-bare/x-stack  "
            "x-fastpath/x-stack  x-fastpath/x-bare")
        for m in ("rr", "crr", "stream"):
            xs, xb, xf = med["x-stack"][m], med["x-bare"][m], med["x-fastpath"][m]
            log(f"  {m:6s} {UNITS[m]:8s} {xs:10,.1f} {xb:9,.1f} {xf:11,.1f} {xb / xs:15.3f} "
                f"{xf / xs:19.3f} {xf / xb:18.3f}")
        log("cross-node IPv6:      x-bare6  x-fastpath6  x-bare6/x-bare4  x-fastpath6/x-fastpath4")
        for m in ("rr", "crr", "stream"):
            xb, xf = med["x-bare"], med["x-fastpath"]
            log(f"  {m:6s} {UNITS[m]:8s} {xb[m + '.v6']:10,.1f} {xf[m + '.v6']:12,.1f} "
                f"{xb[m + '.v6'] / xb[m]:16.3f} {xf[m + '.v6'] / xf[m]:24.3f}")


def _record(med: dict, rounds: int, rr_s: float, crr_s: float, st_s: float, source,
            command: str) -> None:
    from bench import results
    method = (f"median of {rounds} alternating rounds; client+server pinned to CPU 0; "
              f"fprr 1-byte RR {rr_s:g}s, CRR {crr_s:g}s; iperf3 {st_s:g}s")
    d, s = med["direct"], med["stack"]
    for m in ("rr", "crr", "stream"):
        results.record(f"redirect.stack_vs_direct.{m}", s[m], UNITS[m], command=command,
                       baseline=d[m], ratio=s[m] / d[m],
                       notes=f"context: host-stack routing vs a direct veth pair; {method}")
    bp = med["bare-peer"]
    for m in ("rr", "crr", "stream"):
        results.record(f"redirect.bare_peer_vs_direct.{m}", bp[m], UNITS[m], command=command,
                       baseline=d[m], ratio=bp[m] / d[m],
                       notes=f"context: a program doing only bpf_redirect_peer vs a direct veth pair; {method}")
        results.record(f"redirect.bare_peer.v6_vs_v4.{m}", bp[f"{m}.v6"], UNITS[m],
                       command=command, baseline=bp[m], ratio=bp[f"{m}.v6"] / bp[m],
                       notes=f"context: the floor of redirect.v6_vs_v4: a program doing only "
                             f"bpf_redirect_peer, over IPv6 vs over IPv4, same pods, back to "
                             f"back in each round; {method}")
    if "fastpath" not in med:
        return
    f = med["fastpath"]
    for m in ("rr", "crr", "stream"):
        results.record(f"redirect.vs_bare_peer.{m}", f[m], UNITS[m], command=command,
                       baseline=bp[m], ratio=f[m] / bp[m], target=None if m == "stream" else ">= 0.97",
                       notes=f"fastpath vs the bare redirect_peer program on the same veths; {method}")
    results.record("redirect.pod_to_pod_same_node", f["crr"], "conn/s", command=command,
                   baseline=s["crr"], ratio=f["crr"] / s["crr"], target=">= 1.10",
                   notes=f"TCP_CRR, fastpath vs host stack on the same node; {method}; attach: {source}")
    for m in ("rr", "crr", "stream"):
        results.record(f"redirect.vs_direct_veth.{m}", f[m], UNITS[m], command=command,
                       baseline=d[m], ratio=f[m] / d[m],
                       notes=f"context: fastpath pod-to-pod vs a direct veth pair; {method}")
        v6 = f"{m}.v6"
        results.record(f"redirect.vs_direct_veth.{m}.v6", f[v6], UNITS[m], command=command,
                       baseline=d[v6], ratio=f[v6] / d[v6],
                       notes=f"context: the same over IPv6 (dual-stack pods, fp_from_pod6) vs "
                             f"the direct veth pair over IPv6; {method}")
        results.record(f"redirect.v6_vs_v4.{m}", f[v6], UNITS[m], command=command,
                       baseline=f[m], ratio=f[v6] / f[m],
                       target=None if m == "stream" else ">= 0.97",
                       notes=f"fastpath pod-to-pod over IPv6 vs over IPv4, same pods, same "
                             f"attach, measured back to back in each round; {method}")
    xs, xf = med["x-stack"], med["x-fastpath"]
    for m, target in (("rr", None), ("crr", ">= 1.10"), ("stream", ">= 1.0")):
        results.record(f"redirect.cross_node.{m}", xf[m], UNITS[m], command=command,
                       baseline=xs[m], ratio=xf[m] / xs[m], target=target,
                       notes=f"pod to pod across two nodes through the ENIs and the VPC, fastpath "
                             f"on both nodes vs the same topology routed by the stacks; {method}")
    xb = med["x-bare"]
    for m in ("rr", "crr", "stream"):
        results.record(f"redirect.cross_node_floor.{m}", xb[m], UNITS[m], command=command,
                       baseline=xs[m], ratio=xb[m] / xs[m],
                       notes=f"context: the floor of the technique (bare FIB lookup + redirect "
                             f"out of the ENI, bare redirect_peer in) vs the stacks; {method}")
        results.record(f"redirect.cross_node.vs_floor.{m}", xf[m], UNITS[m], command=command,
                       baseline=xb[m], ratio=xf[m] / xb[m],
                       notes=f"context: fastpath across nodes vs the floor of its technique on the "
                             f"same nodes; {method}")
        v6 = f"{m}.v6"
        results.record(f"redirect.cross_node.v6_vs_v4.{m}", xf[v6], UNITS[m], command=command,
                       baseline=xf[m], ratio=xf[v6] / xf[m],
                       notes=f"context: fastpath across nodes over IPv6 vs over IPv4, same pods, "
                             f"back to back in each round; {method}")
        results.record(f"redirect.cross_node_floor.v6_vs_v4.{m}", xb[v6], UNITS[m],
                       command=command, baseline=xb[m], ratio=xb[v6] / xb[m],
                       notes=f"context: the floor of redirect.cross_node.v6_vs_v4 (bare FIB "
                             f"lookup for AF_INET6 + redirect out of the ENI, bare "
                             f"redirect_peer in) over IPv6 vs over IPv4; {method}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 1 s runs (make bench-quick)")
    ap.add_argument("--no-record", action="store_true", help="print only; leave bench/results.* alone")
    ap.add_argument("--no-fastpath", action="store_true", help="measure direct and stack only")
    args = ap.parse_args(argv)
    if args.quick:
        run(discover=not args.no_fastpath, rounds=3, rr_seconds=1.0, crr_seconds=1.0,
            stream_seconds=1.5, record_results=not args.no_record, command=COMMAND + " --quick")
    else:
        run(discover=not args.no_fastpath, rounds=args.rounds, record_results=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
