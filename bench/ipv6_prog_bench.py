"""The cost of fastpath's programs per packet, IPv6 against IPv4, by
BPF_PROG_TEST_RUN: the kernel runs the program on one packet and reports
the time the run took, so the figure is the
program's own work (parsing, lookups, the tail call to the IPv6 program,
the rewrite and the redirect helper), without the veths, the scheduler or
a client around it.

Six paths, each once per family, between the same dual-stack pods of a
node netns laid out as Terway does (the routing of tests/bpf/conftest.py):

  local   pod a -> pod b on the node       fp_from_pod (-> fp_from_pod6), redirect_peer
  eni     pod a -> a pod behind the VPC    fp_from_pod (-> fp_from_pod6), FIB + redirect
  vpc     the VPC -> pod b                 fp_from_vpc (-> fp_from_vpc6), redirect_peer
  svc     pod a -> a ClusterIP whose backend is pod b, a mid-stream segment of
          an established flow (translated to pod b)
  reply   pod b -> pod a, that flow's reply (gets the ClusterIP back)
  syn     pod a -> the ClusterIP, a SYN opening a new flow (a new source
          port each run: a backend picked, the flow's entries written)

Arms alternate IPv4 / IPv6 (order swapped every round), medians over the
rounds. Production build (no decision records), policy off. Each
measurement is the mean of `calls` separate runs of one repeat each: the
kernel's repeat loop reruns the program on the same buffer, whose TTL or
hop limit the previous run already decremented, so after 63 runs it would
time the hop-limit-expired path instead.
"""
from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from statistics import median

COMMAND = "python -m bench.ipv6_prog_bench"

POD_A, POD_B, ENI_IP, GW = "10.0.1.10", "10.0.1.11", "10.0.1.2", "10.0.0.253"
POD_A6, POD_B6, ENI_IP6, GW6 = "fd00:10::1:a", "fd00:10::1:b", "fd00:10::2", "fe80::253"
GW_MAC = "02:00:00:00:02:53"
REMOTE, REMOTE6 = "10.0.2.20", "fd00:20::20"
VIP, VIP6 = "172.16.0.40", "fd00:16::40"
SVC_SPORT, SYN_SPORT0 = 41000, 1024
PATHS = ("local", "eni", "vpc", "svc", "reply", "syn")
POD_A_MAC, POD_B_MAC = "02:00:00:00:0a:0a", "02:00:00:00:0b:0b"


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


def _node(ns: str) -> dict:
    cmds = [
        "link set lo up",
        "link add caliA type veth peer name podA", "link add caliB type veth peer name podB",
        "link add eth1 type veth peer name vpc1",
        "link set caliA up", "link set caliB up", "link set podA up", "link set podB up",
        "link set eth1 up", "link set vpc1 up",
        f"addr add {ENI_IP}/32 dev eth1",
        f"route add {POD_A} dev caliA scope link", f"route add {POD_B} dev caliB scope link",
        f"rule add from {POD_A} lookup 1001 pref 2048",
        f"route add default via {GW} dev eth1 onlink table 1001",
        f"neigh add {GW} lladdr {GW_MAC} dev eth1 nud permanent",
        f"-6 addr add {ENI_IP6}/128 dev eth1 nodad",
        f"-6 route add {POD_A6} dev caliA", f"-6 route add {POD_B6} dev caliB",
        f"-6 rule add from {POD_A6} lookup 1001 pref 2048",
        f"-6 route add default via {GW6} dev eth1 table 1001",
        f"-6 neigh add {GW6} lladdr {GW_MAC} dev eth1 nud permanent",
    ]
    sh(f"ip netns exec {ns} sysctl -qw net.ipv6.conf.all.forwarding=1")
    for c in cmds:
        sh(f"ip -n {ns} {c}")
    sh(f"ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1")
    return {d["ifname"]: d for d in json.loads(sh(f"ip -n {ns} -j link show"))}


def _packets(links: dict) -> dict[str, tuple[str, bytes, int]]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    a, b, e1 = links["caliA"], links["caliB"], links["eth1"]
    seg = TCP(sport=40000, dport=80, flags="A") / (b"x" * 64)
    from_a = Ether(src=POD_A_MAC, dst=a["address"])
    from_b = Ether(src=POD_B_MAC, dst=b["address"])
    from_vpc = Ether(src=GW_MAC, dst=e1["address"])

    def tcp(sport, dport, flags):
        return TCP(sport=sport, dport=dport, flags=flags) / (b"x" * 64)

    svc = {}
    for fam, ipa, ipb, vip, l3 in (("v4", POD_A, POD_B, VIP, IP), ("v6", POD_A6, POD_B6, VIP6,
                                                                    IPv6)):
        svc.update({
            f"svc.{fam}": ("fp_from_pod", bytes(from_a / l3(src=ipa, dst=vip)
                                                / tcp(SVC_SPORT, 80, "A")), a["ifindex"]),
            f"reply.{fam}": ("fp_from_pod", bytes(from_b / l3(src=ipb, dst=ipa)
                                                  / tcp(8080, SVC_SPORT, "A")), b["ifindex"]),
            f"syn.{fam}": ("fp_from_pod", bytes(from_a / l3(src=ipa, dst=vip)
                                                / tcp(SYN_SPORT0, 80, "S")), a["ifindex"]),
            # the flow svc and reply belong to, opened before the timing
            f"open.{fam}": ("fp_from_pod", bytes(from_a / l3(src=ipa, dst=vip)
                                                 / tcp(SVC_SPORT, 80, "S")), a["ifindex"]),
            f"synack.{fam}": ("fp_from_pod", bytes(from_b / l3(src=ipb, dst=ipa)
                                                   / tcp(8080, SVC_SPORT, "SA")), b["ifindex"]),
        })
    return svc | {
        "local.v4": ("fp_from_pod", bytes(from_a / IP(src=POD_A, dst=POD_B) / seg), a["ifindex"]),
        "local.v6": ("fp_from_pod", bytes(from_a / IPv6(src=POD_A6, dst=POD_B6) / seg),
                     a["ifindex"]),
        "eni.v4": ("fp_from_pod", bytes(from_a / IP(src=POD_A, dst=REMOTE) / seg), a["ifindex"]),
        "eni.v6": ("fp_from_pod", bytes(from_a / IPv6(src=POD_A6, dst=REMOTE6) / seg),
                   a["ifindex"]),
        "vpc.v4": ("fp_from_vpc", bytes(from_vpc / IP(src=REMOTE, dst=POD_B) / seg),
                   e1["ifindex"]),
        "vpc.v6": ("fp_from_vpc", bytes(from_vpc / IPv6(src=REMOTE6, dst=POD_B6) / seg),
                   e1["ifindex"]),
    }


_syn_port = [SYN_SPORT0]


def _next_syn(pkt: bytes) -> bytes:
    """The SYN with the next source port: a flow no run opened before (a
    lap of the port range is more flows than a bench run opens)."""
    _syn_port[0] = _syn_port[0] + 1 if _syn_port[0] < 65535 else SYN_SPORT0
    off = 14 + (20 if pkt[12:14] == b"\x08\x00" else 40)
    return pkt[:off] + _syn_port[0].to_bytes(2, "big") + pkt[off + 2:]


def _mean_ns(prog_test_run, fd: int, pkt: bytes, ifindex: int, calls: int,
             fresh: bool = False) -> float:
    total = 0
    for _ in range(calls):
        r = prog_test_run(fd, _next_syn(pkt) if fresh else pkt, ifindex=ifindex)
        if r.retval != 7:                                # TC_ACT_REDIRECT
            raise RuntimeError(f"verdict {r.retval}, not a redirect")
        total += r.duration_ns
    return total / calls


def run(rounds: int = 7, calls: int = 5000, record_results: bool = True, log=print) -> dict:
    from agent.config import Config
    from agent.datapath import Datapath
    from agent.datapath.libbpf import prog_test_run
    from agent.datapath.nsenter import in_netns
    from agent.model.endpoint import Endpoint

    ns = f"fpb-v6-{secrets.token_hex(3)}"
    bpffs = tempfile.mkdtemp(prefix="fp-bench-v6-")
    sh(f"ip netns add {ns}")
    sh(f"mount -t bpf bpf {bpffs}")
    dp = None
    try:
        links = _node(ns)
        dp = Datapath(Config.defaults().replace(bpffs_root=f"{bpffs}/fastpath"), netns=ns).load()
        for ip, ip6, cali, mac in ((POD_A, POD_A6, "caliA", POD_A_MAC),
                                   (POD_B, POD_B6, "caliB", POD_B_MAC)):
            c = links[cali]
            dp.maps.endpoint_put(Endpoint(ip, cali, c["ifindex"], c["address"], mac, "eth1",
                                          links["eth1"]["ifindex"], ip6=ip6))
        # one ClusterIP per family, its backend pod b (port 8080)
        for bid, slots, ip, vip in ((81, 80, POD_B, VIP), (82, 90, POD_B6, VIP6)):
            dp.lb.put_backend(bid, ip, 8080, "TCP")
            dp.lb.put_slots(slots, [bid])
            dp.lb.put_service(vip, 80, "TCP", slots, 1)
        # as the agent does once its programs run (Agent.start): the reverse
        # and frontend lookups are skipped where they cannot hit
        dp.maps.mark6_arm()
        pkts = _packets(links)
        times: dict[str, list[float]] = {f"{p}.{f}": [] for p in PATHS for f in ("v4", "v6")}
        with in_netns(ns):
            # the flow of svc and reply: SYN, SYN-ACK, then established
            # by the warm-up's mid-stream segments
            for fam in ("v4", "v6"):
                for step in ("open", "synack"):
                    prog, pkt, ifindex = pkts[f"{step}.{fam}"]
                    _mean_ns(prog_test_run, dp.prog_fd(prog), pkt, ifindex, 1)
            for name in times:                                   # warm up, check the verdict
                prog, pkt, ifindex = pkts[name]
                try:
                    _mean_ns(prog_test_run, dp.prog_fd(prog), pkt, ifindex, 200,
                             name.startswith("syn."))
                except RuntimeError as e:
                    raise RuntimeError(f"{name}: {e}") from None
            for i in range(rounds):
                for path in PATHS:
                    order = ("v4", "v6") if i % 2 == 0 else ("v6", "v4")
                    for fam in order:
                        prog, pkt, ifindex = pkts[f"{path}.{fam}"]
                        times[f"{path}.{fam}"].append(
                            _mean_ns(prog_test_run, dp.prog_fd(prog), pkt, ifindex, calls,
                                     path == "syn"))
                log(f"  round {i + 1}/{rounds} " + " ".join(
                    f"{k}={v[-1]:.1f}ns" for k, v in times.items()))
    finally:
        if dp is not None:
            dp.close()
        subprocess.run(["umount", bpffs], check=False)
        subprocess.run(["rmdir", bpffs], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)
    med = {k: median(v) for k, v in times.items()}
    log("ns per packet (median):  path     IPv4     IPv6   IPv4/IPv6 (speed of IPv6 vs IPv4)")
    for path in PATHS:
        t4, t6 = med[f"{path}.v4"], med[f"{path}.v6"]
        log(f"                          {path:6s} {t4:8.1f} {t6:8.1f} {t4 / t6:10.3f}")
    if record_results:
        from bench import results
        method = (f"BPF_PROG_TEST_RUN, mean of {calls} runs per measurement, median of {rounds} "
                  f"rounds alternating IPv4/IPv6 (order swapped each round); production build, "
                  f"policy off; a 64-byte TCP segment")
        what = {"local": "pod to pod on the node (redirect_peer)",
                "eni": "pod to the VPC (FIB lookup, redirect out of the pod's ENI)",
                "vpc": "VPC to pod (redirect_peer from the ENI)"}
        for path in ("local", "eni", "vpc"):
            t4, t6 = med[f"{path}.v4"], med[f"{path}.v6"]
            results.record(f"redirect.prog_ns.{path}.v6", t6, "ns/pkt", command=COMMAND,
                           baseline=t4, ratio=t4 / t6, target=">= 0.97",
                           notes=f"{what[path]}: IPv6 program time per packet vs IPv4's "
                                 f"(ratio = IPv4 ns / IPv6 ns: IPv6's speed relative to "
                                 f"IPv4); {method}")
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    run(args.rounds, args.calls, not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
