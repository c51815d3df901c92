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
The node netns is laid out as bench/ipv6_prog_bench.py's (Terway's routing);
arms alternate, medians over rounds. This is where bench.nodeport_bench's
"program time per connection" comes from, without its traffic noise: use it
to see what a change to bpf/ costs or saves.

    python -m bench.conn_prog_bench [--rounds 9] [--conns 300]
"""
from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import tempfile
from statistics import median

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


def run(rounds: int = 9, conns: int = 300, log=print) -> dict:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from agent.config import Config
    from agent.datapath import Datapath
    from agent.datapath.libbpf import prog_test_run
    from agent.datapath.maps import DEFS
    from agent.datapath.nsenter import in_netns
    from agent.model.endpoint import Endpoint

    ns = f"fpb-conn-{secrets.token_hex(3)}"
    bpffs = tempfile.mkdtemp(prefix="fp-bench-conn-")
    sh(f"ip netns add {ns}")
    sh(f"mount -t bpf bpf {bpffs}")
    dp = None
    try:
        links = node._node(ns)
        # pod b's ENI table, and the node's own default route (the NodePort
        # reply leaves by the node's primary interface, eth1 here)
        sh(f"ip -n {ns} rule add from {POD_B} lookup 1001 pref 2048")
        sh(f"ip -n {ns} route add default via {GW} dev eth1 onlink")
        e1, ca = links["eth1"], links["caliA"]
        dp = Datapath(Config.defaults().replace(bpffs_root=f"{bpffs}/fastpath"), netns=ns).load()
        for ip, cali, mac in ((POD_A, "caliA", POD_A_MAC), (POD_B, "caliB", POD_B_MAC)):
            c = links[cali]
            dp.maps.endpoint_put(Endpoint(ip, cali, c["ifindex"], c["address"], mac, "eth1",
                                          e1["ifindex"]))
        dp.settings.set_node(ENI_IP, e1["ifindex"])
        d = DEFS.defines
        dp.lb.put_backend(1, POD_B, BACKEND_PORT, "TCP")
        dp.lb.put_slots(1, [1])
        dp.lb.put_service(ENI_IP, NODE_PORT, "TCP", 1, 1,
                          d["FP_SVC_F_EXTERNAL"] | d["FP_SVC_F_NODEPORT"])
        arms = {"nodeport": [_connection(links, 10000 + i, ENI_IP, NODE_PORT)
                             for i in range(conns)],
                "direct": [_connection(links, 20000 + i, POD_B, BACKEND_PORT)
                           for i in range(conns)]}
        local = bytes(Ether(src=POD_A_MAC, dst=ca["address"]) / IP(src=POD_A, dst=POD_B)
                      / TCP(sport=40000, dport=BACKEND_PORT, flags="A") / (b"x" * 64))
        fds = {p: dp.prog_fd(p) for p in ("fp_from_vpc", "fp_from_pod")}
        per: dict[str, list[dict]] = {a: [] for a in (*arms, "local")}
        with in_netns(ns):
            for r in range(rounds):
                order = list(per) if r % 2 == 0 else list(reversed(per))
                for arm in order:
                    if arm == "local":
                        t = 0
                        for _ in range(conns * 8):
                            res = prog_test_run(fds["fp_from_pod"], local, ifindex=ca["ifindex"])
                            if res.retval != TC_ACT_REDIRECT:
                                raise RuntimeError(f"local: verdict {res.retval}")
                            t += res.duration_ns
                        per[arm].append({"fp_from_pod": t / (conns * 8)})
                        continue
                    dp.lb.conntrack_flush()
                    tot = {p: 0 for p in fds}
                    for conn in arms[arm]:
                        for prog, pkt, ifindex in conn:
                            res = prog_test_run(fds[prog], pkt, ifindex=ifindex)
                            if res.retval != TC_ACT_REDIRECT:
                                raise RuntimeError(f"{arm}: {prog} verdict {res.retval}")
                            tot[prog] += res.duration_ns
                    per[arm].append({p: v / conns for p, v in tot.items()})
                log(f"  round {r + 1}/{rounds} " + " ".join(
                    f"{a}={sum(per[a][-1].values()):.0f}ns" for a in per))
    finally:
        if dp is not None:
            dp.close()
        subprocess.run(["umount", bpffs], check=False)
        subprocess.run(["rmdir", bpffs], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)
    med = {a: {p: median(x[p] for x in rows) for p in rows[0]} for a, rows in per.items()}
    for arm in ("nodeport", "direct"):
        m = med[arm]
        log(f"{arm:9s} ns per connection: " + ", ".join(f"{p} {v:.0f}" for p, v in m.items())
            + f"; all {sum(m.values()):.0f}")
    gap = sum(med["nodeport"].values()) - sum(med["direct"].values())
    log(f"NodePort - direct: {gap:.0f} ns per connection; local established packet "
        f"{med['local']['fp_from_pod']:.0f} ns")
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--conns", type=int, default=300)
    args = ap.parse_args(argv)
    run(args.rounds, args.conns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
