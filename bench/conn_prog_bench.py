"""Program time of whole connections, by BPF_PROG_TEST_RUN: a NodePort
connection against the same connection made straight to the pod, and one
established packet between two pods of the node.

The kernel runs the production programs on each packet of a short TCP
connection from a client behind the VPC (SYN, SYN-ACK, ACK, a request, a
reply, both FINs, the last ACK: fp_from_vpc for the client's packets on the
ENI, fp_from_pod for the pod's on its veth) and reports each run's time;
the sum is the connection's program time, without the veths, the stack, the
scheduler or a client around it. Arms:

  nodeport  client -> the node's address : NodePort -> pod b (conntrack
            creates the flow, promotes it at the handshake's ACK, demotes it
            at the first FIN; every packet is translated)
  direct    the same client -> pod b's address (no translation)
  local     pod a -> pod b, one established TCP packet (fp_from_pod's
            fast case: guards, lookups, reply check, redirect_peer)

Conntrack is flushed before each arm's round, so every connection is new.
With --steady it is not: the LRU tier is first filled with closed flows of
other clients (so an insert evicts, as under real traffic) and each round's
connections reuse the client ports of the round before, whose closed flows
are still there (what a client making many short connections mostly finds).
With --baseline REF the same arms also run on a second node netns whose
programs are compiled from REF's bpf/ (git archive), alternated with this
tree's in one process: per packet and per connection, before and after.
The node netns is laid out as bench/ipv6_prog_bench.py's (Terway's routing);
arms alternate, medians over rounds. This is where bench.nodeport_bench's
"program time per connection" comes from, without its traffic noise: use it
to see what a change to bpf/ costs or saves.

    python -m bench.conn_prog_bench [--rounds 9] [--conns 300] [--baseline main] [--steady] [--swap]
"""
from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Optional

from bench import ipv6_prog_bench as node
from bench.ipv6_prog_bench import (ENI_IP, GW, GW_MAC, POD_A, POD_A_MAC, POD_B, POD_B_MAC,
                                   REMOTE, sh)

COMMAND = "python -m bench.conn_prog_bench"
NODE_PORT = 30080
BACKEND_PORT = 80
TC_ACT_REDIRECT = 7


def _connection(links: dict, cport: int, dst: str, dport: int) -> list[tuple[str, bytes, int]]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    e1, cb = links["eth1"], links["caliB"]
    vpc = Ether(src=GW_MAC, dst=e1["address"])
    pod = Ether(src=POD_B_MAC, dst=cb["address"])

    def c2s(flags, data=b""):
        pkt = vpc / IP(src=REMOTE, dst=dst) / TCP(sport=cport, dport=dport, flags=flags) / data
        return "fp_from_vpc", bytes(pkt), e1["ifindex"]

    def s2c(flags, data=b""):
        pkt = pod / IP(src=POD_B, dst=REMOTE) / TCP(sport=BACKEND_PORT, dport=cport,
                                                    flags=flags) / data
        return "fp_from_pod", bytes(pkt), cb["ifindex"]

    return [c2s("S"), s2c("SA"), c2s("A"), c2s("PA", b"q"), s2c("PA", b"r"), c2s("FA"),
            s2c("FA"), c2s("A")]


PACKETS = ("S>", "<SA", "A>", "PA>", "<PA", "FA>", "<FA", "A>")   # (> client's, < pod's)


@contextlib.contextmanager
def _built_from(tree: Optional[str]):
    """Datapath loads in this block compile `tree`'s bpf/ (None: this tree's).
    The compile runs in a child process started in the tree (agent.datapath.build)."""
    if tree is None:
        yield
        return
    from agent.datapath import build, loader
    old = (loader.BPF_DIR, build.REPO)
    loader.BPF_DIR, build.REPO = Path(tree) / "bpf", Path(tree)
    try:
        yield
    finally:
        loader.BPF_DIR, build.REPO = old


def _node(stack: contextlib.ExitStack, conns: int, tree: Optional[str]) -> dict:
    """A node netns with its programs and one NodePort Service: its arms."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from agent.config import Config
    from agent.datapath import Datapath
    from agent.datapath.maps import DEFS
    from agent.model.endpoint import Endpoint

    ns = f"fpb-conn-{secrets.token_hex(3)}"
    bpffs = tempfile.mkdtemp(prefix="fp-bench-conn-")
    sh(f"ip netns add {ns}")
    stack.callback(subprocess.run, ["ip", "netns", "del", ns], check=False)
    sh(f"mount -t bpf bpf {bpffs}")
    stack.callback(subprocess.run, ["rmdir", bpffs], check=False)
    stack.callback(subprocess.run, ["umount", bpffs], check=False)
    links = node._node(ns)
    # pod b's ENI table, and the node's own default route (the NodePort
    # reply leaves by the node's primary interface, eth1 here)
    sh(f"ip -n {ns} rule add from {POD_B} lookup 1001 pref 2048")
    sh(f"ip -n {ns} route add default via {GW} dev eth1 onlink")
    e1, ca = links["eth1"], links["caliA"]
    with _built_from(tree):
        dp = Datapath(Config.defaults().replace(bpffs_root=f"{bpffs}/fastpath"), netns=ns).load()
    stack.callback(dp.close)
    for ip, cali, mac in ((POD_A, "caliA", POD_A_MAC), (POD_B, "caliB", POD_B_MAC)):
        c = links[cali]
        dp.maps.endpoint_put(Endpoint(ip, cali, c["ifindex"], c["address"], mac, "eth1",
                                      e1["ifindex"]))
    dp.settings.set_node(ENI_IP, e1["ifindex"])
    # socket-LB on, as the DaemonSet runs the agent (off, the node's
    # interfaces also look for replies to the node's own clients; an older
    # tree's --baseline build ignores the flag there)
    dp.settings.set(socket_lb=True, hostns_only=True, host_netns_cookie=0)
    d = DEFS.defines
    dp.lb.put_backend(1, POD_B, BACKEND_PORT, "TCP")
    dp.lb.put_slots(1, [1])
    # as the agent writes an eTP Cluster NodePort (a build that does not
    # know a flag ignores it)
    dp.lb.put_service(ENI_IP, NODE_PORT, "TCP", 1, 1,
                      d["FP_SVC_F_EXTERNAL"] | d["FP_SVC_F_NODEPORT"] | d["FP_SVC_F_SOLE"])
    local = bytes(Ether(src=POD_A_MAC, dst=ca["address"]) / IP(src=POD_A, dst=POD_B)
                  / TCP(sport=40000, dport=BACKEND_PORT, flags="A") / (b"x" * 64))
    return {"ns": ns, "dp": dp, "local": local, "local_ifindex": ca["ifindex"],
            "fds": {p: dp.prog_fd(p) for p in ("fp_from_vpc", "fp_from_pod")},
            "arms": {"nodeport": [_connection(links, 10000 + i, ENI_IP, NODE_PORT)
                                  for i in range(conns)],
                     "direct": [_connection(links, 20000 + i, POD_B, BACKEND_PORT)
                                for i in range(conns)]}}


def _fill_lru(n: dict) -> None:
    """Fill the LRU tier with closed flows of clients no arm uses."""
    from agent.datapath.maps import DEFS
    t = n["dp"].lb.ct.tables["new"]
    closed = next(v for v, c in DEFS.ct_states.items() if c.label == "closed")
    for i in range(n["dp"].config.conntrack_new_map_size):
        k = t.Key(saddr=0x0a640000 + i, daddr=0x0a650001, sport=1000, dport=80, proto=6,
                  dir=i & 1)
        t[k] = t.Leaf(state=closed, last_seen=0)


def _measure(n: dict, arm: str, conns: int, steady: bool = False) -> tuple[dict, list]:
    """One round of an arm: ns per connection per program, and per packet."""
    from agent.datapath.libbpf import prog_test_run
    fds = n["fds"]
    if arm == "local":
        t = 0
        for _ in range(conns * 8):
            res = prog_test_run(fds["fp_from_pod"], n["local"], ifindex=n["local_ifindex"])
            if res.retval != TC_ACT_REDIRECT:
                raise RuntimeError(f"local: verdict {res.retval}")
            t += res.duration_ns
        return {"fp_from_pod": t / (conns * 8)}, []
    if not steady:
        n["dp"].lb.conntrack_flush()
    tot = {p: 0 for p in fds}
    pkt_ns = [0] * len(PACKETS)
    for conn in n["arms"][arm]:
        for k, (prog, pkt, ifindex) in enumerate(conn):
            res = prog_test_run(fds[prog], pkt, ifindex=ifindex)
            if res.retval != TC_ACT_REDIRECT:
                raise RuntimeError(f"{arm}: {prog} verdict {res.retval}")
            tot[prog] += res.duration_ns
            pkt_ns[k] += res.duration_ns
    return {p: v / conns for p, v in tot.items()}, [v / conns for v in pkt_ns]


def run(rounds: int = 9, conns: int = 300, log=print, baseline: Optional[str] = None,
        steady: bool = False, swap: bool = False) -> dict:
    """Per build ("tree", and "baseline" when `baseline` names a git ref)
    and arm: median ns per connection per program and per packet."""
    from agent.datapath.nsenter import in_netns

    with contextlib.ExitStack() as stack:
        builds = {}
        if baseline:
            tmp = tempfile.mkdtemp(prefix="fp-bench-base-")
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            from bench.nodeport_profile import export_tree
            log(f"baseline {baseline}: {export_tree(baseline, tmp)}")
            if swap:
                builds["tree"] = _node(stack, conns, None)
            builds["baseline"] = _node(stack, conns, tmp)
        if "tree" not in builds:
            builds["tree"] = _node(stack, conns, None)
        if steady:
            for b in builds.values():
                with in_netns(b["ns"]):
                    _fill_lru(b)
        runs = [(b, a) for b in builds for a in ("nodeport", "direct", "local")]
        per = {r: [] for r in runs}
        pkts = {r: [] for r in runs}
        for r in range(rounds):
            for b, arm in (runs if r % 2 == 0 else list(reversed(runs))):
                with in_netns(builds[b]["ns"]):
                    progs, by_pkt = _measure(builds[b], arm, conns, steady)
                per[(b, arm)].append(progs)
                pkts[(b, arm)].append(by_pkt)
            log(f"  round {r + 1}/{rounds} " + " ".join(
                f"{b}.{a}={sum(per[(b, a)][-1].values()):.0f}ns" for b, a in runs))
    med = {}
    for (b, arm), rows in per.items():
        m = {p: median(x[p] for x in rows) for p in rows[0]}
        if pkts[(b, arm)][0]:
            m["packets"] = [median(x[k] for x in pkts[(b, arm)]) for k in range(len(PACKETS))]
        med.setdefault(b, {})[arm] = m
    for b in builds:
        for arm in ("nodeport", "direct"):
            m = med[b][arm]
            log(f"{b:8s} {arm:9s} ns per connection: fp_from_vpc {m['fp_from_vpc']:.0f}, "
                f"fp_from_pod {m['fp_from_pod']:.0f}; all "
                f"{m['fp_from_vpc'] + m['fp_from_pod']:.0f}  per packet: "
                + " ".join(f"{n} {v:.0f}" for n, v in zip(PACKETS, m["packets"])))
        gap = sum(med[b]["nodeport"][p] for p in ("fp_from_vpc", "fp_from_pod")) - \
            sum(med[b]["direct"][p] for p in ("fp_from_vpc", "fp_from_pod"))
        log(f"{b:8s} NodePort - direct: {gap:.0f} ns per connection; local established "
            f"packet {med[b]['local']['fp_from_pod']:.0f} ns")
    return med if baseline else med["tree"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--conns", type=int, default=300)
    ap.add_argument("--baseline", help="a git ref whose bpf/ runs beside this tree's, "
                                       "alternated in the same process")
    ap.add_argument("--steady", action="store_true",
                    help="no flush: the LRU tier full, client ports reused round after round")
    ap.add_argument("--swap", action="store_true",
                    help="set the tree's node up before the baseline's (the first node "
                         "set up measured faster in --steady runs)")
    args = ap.parse_args(argv)
    run(args.rounds, args.conns, baseline=args.baseline, steady=args.steady, swap=args.swap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
