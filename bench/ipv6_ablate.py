"""Where IPv6's per-packet time goes: ablation builds of the pod programs,
timed by BPF_PROG_TEST_RUN beside the unchanged build (docs/ipv6.md, "IPv6
per-packet cost: the hand-over and what is left").

Each variant is a copy of bpf/ with one step of the walk removed (or, the
dupep6 variant, one endpoint lookup added), built and loaded with its own
bpffs root in one netns laid out as bench/ipv6_prog_bench.py's; the same
packets are timed through every build, the builds alternating (order
rotated and reversed each round), medians over the rounds. A variant's
difference from `base` is that step's cost; the `fp_from_pod6` row runs the
IPv6 program directly (no fp_from_pod, no tail call). Variants ending in 4
remove IPv4's twin step. A variant whose text no longer matches the sources
stops the run naming it: the patches follow the code they cut.

  python -m bench.ipv6_ablate [--rounds N] [--calls N] [--only a,b] [--paths local,svc]
  python -m bench.ipv6_ablate --dirs main=/path/to/old/bpf,change=bpf --paths local,eni,vpc,svc,reply,syn
      (whole builds side by side instead of variants: a before/after table)
  python -m bench.ipv6_ablate --dirs armed=bpf,unarmed=bpf --unarmed unarmed --paths local,eni,svc,reply
      (the same build with its IPv6 address marks armed, as the agent runs it, and not)

Measurement only: nothing is recorded in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from bench import ipv6_prog_bench as B

POD = "pod.c"
PARSE6 = "lib/parse6.h"

V = {
    "base": [],
    # fp_from_pod6 without its what-if bookkeeping
    "nowhatif6": [(POD, "__u32 prev = fp_whatif_enter(skb);\n\tint verdict = fp_from_pod6_run(skb);"
                   "\n\n\tfp_whatif_exit(prev);",
                   "int verdict = fp_from_pod6_run(skb);")],
    # no extension header walk when TCP or UDP follows the fixed header
    "parsefast": [(PARSE6, "\tif (fp_ip6_walk(skb, out, ETH_HLEN + sizeof(h), h.nexthdr))",
                   "\tif (h.nexthdr == IPPROTO_TCP || h.nexthdr == IPPROTO_UDP) {\n"
                   "\t\tout->proto = h.nexthdr;\n\t\tout->l4_off = ETH_HLEN + sizeof(h);\n"
                   "\t} else if (fp_ip6_walk(skb, out, ETH_HLEN + sizeof(h), h.nexthdr))")],
    # the fixed header read in place (as IPv4's) rather than by bpf_skb_load_bytes
    "parsedirect": [(PARSE6,
                     "\tif (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, "
                     "sizeof(proto)))\n\t\treturn skb->len < ETH_HLEN ? FP_PARSE_INVALID : "
                     "FP_PARSE_OTHER;\n\tif (proto != bpf_htons(ETH_P_IPV6))\n\t\treturn "
                     "FP_PARSE_OTHER;\n\tif (bpf_skb_load_bytes(skb, ETH_HLEN, &h, sizeof(h)))\n"
                     "\t\treturn FP_PARSE_INVALID;",
                     "\tvoid *data = (void *)(long)skb->data;\n"
                     "\tvoid *data_end = (void *)(long)skb->data_end;\n"
                     "\tif (data + ETH_HLEN + sizeof(h) <= data_end) {\n"
                     "\t\tif (((struct ethhdr *)data)->h_proto != bpf_htons(ETH_P_IPV6))\n"
                     "\t\t\treturn FP_PARSE_OTHER;\n"
                     "\t\t__builtin_memcpy(&h, data + ETH_HLEN, sizeof(h));\n"
                     "\t} else {\n"
                     "\tif (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, "
                     "sizeof(proto)))\n\t\treturn skb->len < ETH_HLEN ? FP_PARSE_INVALID : "
                     "FP_PARSE_OTHER;\n\tif (proto != bpf_htons(ETH_P_IPV6))\n\t\treturn "
                     "FP_PARSE_OTHER;\n\tif (bpf_skb_load_bytes(skb, ETH_HLEN, &h, sizeof(h)))\n"
                     "\t\treturn FP_PARSE_INVALID;\n\t}")],
    # without the link's own traffic checks (link-local, multicast, ::, ND)
    "noll": [(POD, "\tif (fp_ip6_is_linklocal(ip.daddr) || fp_ip6_is_multicast(ip.daddr) ||\n"
              "\t    fp_ip6_is_linklocal(ip.saddr) || fp_ip6_is_unspecified(ip.saddr) ||\n"
              "\t    fp_ip6_is_nd(skb, &ip))\n\t\treturn fp_finish_quiet6(skb, FP_DIR_FROM_POD",
              "\tif (0)\n\t\treturn fp_finish_quiet6(skb, FP_DIR_FROM_POD")],
    # the one-program walk without its bypass, frontend, reply lookups
    "nobypass": [(POD, "\tif (fp_bypass6_match(ip->daddr))\n\t\treturn FP_WALK_ON;\n", "")],
    "nofront": [(POD, "\tif (fp_ct6_frontend(ip, l4, 0))\n\t\treturn FP_WALK_SVC6;\n", "")],
    "norev": [(POD, "\trc = fp_ct6_reverse(skb, ip, l4);\n\tif (rc < 0)\n\t\treturn fp_drop6("
               "skb, FP_DROP_CSUM, ip, TC_ACT_SHOT);", "\trc = 0;")],
    # one IPv6 endpoint lookup more
    "dupep6": [(POD, "\tdst = fp_endpoint6_lookup(ip->daddr);\n\tif (dst)\n\t\treturn "
                "fp_deliver_local6(skb, FP_DIR_FROM_POD, ip, dst);",
                "\tdst = fp_endpoint6_lookup(ip->daddr);\n\tif (!fp_endpoint6_lookup(ip->saddr))"
                "\n\t\treturn TC_ACT_SHOT;\n\tif (dst)\n\t\treturn "
                "fp_deliver_local6(skb, FP_DIR_FROM_POD, ip, dst);")],
    # IPv4's established walk without its frontend, bypass, reply lookups
    "nofront4": [(POD, "if (fp_ct_frontend(ip, l4, 0) || fp_bypass_match(ip->daddr))",
                  "if (fp_bypass_match(ip->daddr))")],
    "nobypass4": [(POD, "if (fp_ct_frontend(ip, l4, 0) || fp_bypass_match(ip->daddr))",
                   "if (fp_ct_frontend(ip, l4, 0))")],
    "norev4": [(POD, "\trc = fp_ct_reverse(skb, ip, l4);\n\tif (rc < 0)\n\t\treturn fp_finish_report("
                "skb, FP_DIR_FROM_POD, FP_DROP_CSUM, TC_ACT_SHOT, ip, seen,\n\t\t\t\t\tl4, NULL);",
                "\trc = 0;")],
}


def make_variant(name: str, src: Path, root: Path) -> Path:
    d = root / name
    shutil.copytree(src, d)
    for f, old, new in V[name]:
        p = d / f
        t = p.read_text()
        if t.count(old) != 1:
            raise SystemExit(f"{name}: patch text found {t.count(old)} times in {f}")
        p.write_text(t.replace(old, new))
    return d


class InProc:
    def __init__(self, options):
        from agent.datapath import loader
        t = time.monotonic()
        self.res = loader.build(options)
        self.seconds = time.monotonic() - t

    def result(self, timeout=600):
        return self.res

    def kill(self):
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--only", default="")
    ap.add_argument("--paths", default="local")
    ap.add_argument("--dirs", default="", help="name=bpfdir,... : whole builds instead of variants")
    ap.add_argument("--unarmed", default="", help="name,... : builds whose IPv6 address marks "
                    "(fp_mark6_v1) stay unarmed")
    args = ap.parse_args()
    unarmed = set(filter(None, args.unarmed.split(",")))
    names = [n for n in V if not args.only or n in args.only.split(",") or n == "base"]
    dirs = dict(x.split("=") for x in args.dirs.split(",")) if args.dirs else {}
    if dirs:
        names = list(dirs)
    paths = args.paths.split(",")

    from agent.config import Config
    from agent.datapath import build as buildmod, loader
    from agent.datapath import Datapath
    from agent.datapath.libbpf import prog_test_run
    from agent.datapath.nsenter import in_netns
    from agent.model.endpoint import Endpoint
    buildmod.BuildProcess = InProc

    src = Path(__file__).resolve().parents[1] / "bpf"
    vroot = Path(tempfile.mkdtemp(prefix="fp-abl-"))
    ns = f"fpabl-{secrets.token_hex(3)}"
    bpffs = tempfile.mkdtemp(prefix="fp-abl-bpffs-")
    B.sh(f"ip netns add {ns}")
    B.sh(f"mount -t bpf bpf {bpffs}")
    dps = {}
    try:
        links = B._node(ns)
        for n in names:
            loader.BPF_DIR = Path(dirs[n]) if dirs else make_variant(n, src, vroot)
            t = time.monotonic()
            dp = Datapath(Config.defaults().replace(bpffs_root=f"{bpffs}/{n}"), netns=ns).load()
            print(f"built {n} in {time.monotonic() - t:.1f}s", flush=True)
            dps[n] = dp
            for ip, ip6, cali, mac in ((B.POD_A, B.POD_A6, "caliA", B.POD_A_MAC),
                                       (B.POD_B, B.POD_B6, "caliB", B.POD_B_MAC)):
                c = links[cali]
                dp.maps.endpoint_put(Endpoint(ip, cali, c["ifindex"], c["address"], mac, "eth1",
                                              links["eth1"]["ifindex"], ip6=ip6))
            for bid, slots, ip, vip in ((81, 80, B.POD_B, B.VIP), (82, 90, B.POD_B6, B.VIP6)):
                dp.lb.put_backend(bid, ip, 8080, "TCP")
                dp.lb.put_slots(slots, [bid])
                dp.lb.put_service(vip, 80, "TCP", slots, 1)
            # as the agent does once its programs run (Agent.start): the
            # reverse and frontend lookups are skipped where they cannot hit
            # (--unarmed: a build left as a first start finds it, skipping
            # nothing: the marks' effect, beside the same build armed)
            if n not in unarmed:
                dp.maps.mark6_arm()
        pkts = B._packets(links)
        arms = []
        for n in names:
            for p in paths:
                if not n.endswith("4"):
                    arms.append((n, f"{p}.v6", "fp_from_pod" if p != "vpc" else "fp_from_vpc"))
                if n == "base" or n.endswith("4") or dirs:
                    arms.append((n, f"{p}.v4", None))
        if "base" in names:
            arms.append(("base", "local.v6", "fp_from_pod6"))       # no fp_from_pod, no tail call
        times = {a: [] for a in arms}
        with in_netns(ns):
            for n, dp in dps.items():
                for fam in ("v4", "v6"):
                    for step in ("open", "synack"):
                        prog, pkt, ifindex = pkts[f"{step}.{fam}"]
                        prog_test_run(dp.prog_fd(prog), pkt, ifindex=ifindex)
            for a in arms:
                n, key, prog = a
                p0, pkt, ifx = pkts[key]
                B._mean_ns(prog_test_run, dps[n].prog_fd(prog or p0), pkt, ifx, 200,
                           key.startswith("syn."))
            for i in range(args.rounds):
                k = i % len(arms)
                order = arms[k:] + arms[:k]
                if i % 2:
                    order = order[::-1]
                for a in order:
                    n, key, prog = a
                    p0, pkt, ifx = pkts[key]
                    times[a].append(B._mean_ns(prog_test_run, dps[n].prog_fd(prog or p0), pkt,
                                               ifx, args.calls, key.startswith("syn.")))
                print(f"round {i + 1}/{args.rounds}", flush=True)
    finally:
        for dp in dps.values():
            dp.close()
        subprocess.run(["umount", bpffs], check=False)
        shutil.rmtree(bpffs, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(vroot, ignore_errors=True)
    b0 = names[0]
    base = {k: median(v) for (n, k, p), v in times.items() if n == b0 and p in (None, "fp_from_pod", "fp_from_vpc")}
    print(f"{'variant':12s} {'path':10s} {'prog':14s} {'median ns':>10s} {'vs base':>8s}  all")
    for (n, k, p), v in times.items():
        m = median(v)
        print(f"{n:12s} {k:10s} {p or '-':14s} {m:10.1f} {m - base[k]:+8.1f}  "
              + " ".join(f"{x:.0f}" for x in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
