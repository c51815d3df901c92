"""The connect hook's own run time (fp_sock_conn4), beside the floor of its technique.

Socket-LB translates a Service at connect(): the hook looks the frontend
up, picks a backend, rewrites the address and remembers the translation
per socket (so recvmsg() and getpeername() can show the VIP again). Its
cost is what the kernel's BPF run-time statistics count per run, for TCP
connections from the node's netns (an fprr CRR client in a cgroup v2 child
of this benchmark's own):

- `clusterip`: fp_sock_conn4, connections to a ClusterIP (translated), with
  1,000 Services in the maps;
- `direct`: fp_sock_conn4, connections to the backend's own address (the
  hook looks, finds no frontend, leaves it);
- `floor`: a connect hook doing only the technique's unavoidable part: the
  per-socket reverse entry written into an LRU hash of the same size;
- `bare`: a connect hook that returns at once (the cost of being called).

Arms alternate, several repetitions each, in one run; the figure is ns per
run (a CPU-time measure, so far less sensitive to a busy machine than
connection rates). Records lb.host_socketlb_conn4_ns (baseline: the floor)
and lb.host_socketlb_conn4_floor_ns.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys

from bench import harness, results
from bench.lb_bench import (DIRECT_PORT, PORT, Client, lc, program_maps, run_times,
                            start_server)

COMMAND = "python -m bench.sockhook_bench"
CGROUP2 = "/sys/fs/cgroup/unified"
SERVICES = 1000
FLOOR_PORT, BARE_PORT = DIRECT_PORT + 1, DIRECT_PORT + 2
BPF_CGROUP_INET4_CONNECT, CGROUP_SOCK_ADDR, BPF_F_ALLOW_MULTI = 10, 18, 2

# The floor: the reverse entry socket-LB must keep for every translated
# socket, keyed and sized as fastpath's (struct fp_sockrev4_key/fp_sockrev4).
FLOOR = r"""
#include <linux/bpf.h>
struct rev_key { __u64 cookie; __be32 addr; __be16 port; __u16 pad; };
struct rev_val { __be32 vip; __be16 vport; __u16 pad; };
BPF_TABLE("lru_hash", struct rev_key, struct rev_val, rev, SIZE);
int floor_conn4(struct bpf_sock_addr *ctx)
{
	struct rev_key key = {};
	struct rev_val val = {};

	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = ctx->user_ip4;
	key.port = (__be16)ctx->user_port;
	val.vip = 1;
	rev.update(&key, &val);
	return 1;
}
"""
BARE = r"""
#include <linux/bpf.h>
int bare_conn4(struct bpf_sock_addr *ctx) { return 1; }
"""


def log(msg: str) -> None:
    print(msg, flush=True)


class OwnCgroup:
    """A cgroup v2 child of the hierarchy's root directory for this run,
    removed on the way out (its processes are gone by then: each client
    exits when its run ends)."""

    def __init__(self, tag: str):
        self.path = f"{CGROUP2}/fp-bench-{tag}-{secrets.token_hex(3)}"

    def __enter__(self) -> str:
        os.mkdir(self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            os.rmdir(self.path)
        except OSError as e:
            log(f"sockhook_bench: cgroup {self.path} not removed: {e}")


def _attached_id(cg: str) -> int:
    out = json.loads(subprocess.run(["bpftool", "-j", "cgroup", "show", cg], capture_output=True,
                                    text=True, check=True).stdout or "[]")
    ids = [p["id"] for p in out if p.get("attach_type") in ("connect4", "cgroup_inet4_connect")]
    if len(ids) != 1:
        raise RuntimeError(f"{cg}: connect4 programs {ids}")
    return ids[0]


class ForeignHook:
    """One of this benchmark's own connect4 programs on its own cgroup."""

    def __init__(self, text: str, fn: str, cg: str):
        from bcc import BPF
        from agent.datapath import libbpf
        self.bpf = BPF(text=text)
        self.fn = self.bpf.load_func(fn, CGROUP_SOCK_ADDR, attach_type=BPF_CGROUP_INET4_CONNECT)
        self.cg_fd = os.open(cg, os.O_RDONLY)
        self.lib = libbpf.lib()
        if self.lib.bpf_prog_attach(self.fn.fd, self.cg_fd, BPF_CGROUP_INET4_CONNECT,
                                    BPF_F_ALLOW_MULTI) != 0:
            raise OSError("bpf_prog_attach failed")
        self.prog_id = _attached_id(cg)

    def close(self) -> None:
        self.lib.bpf_prog_detach2(self.fn.fd, self.cg_fd, BPF_CGROUP_INET4_CONNECT)
        os.close(self.cg_fd)
        self.bpf.cleanup()


def run(reps: int, seconds: float) -> dict:
    from agent.sim.agent import sim_attach
    from agent.sim.world import World
    out: dict = {}
    with World() as w, OwnCgroup("fp") as cg_fp, OwnCgroup("floor") as cg_floor, \
            OwnCgroup("bare") as cg_bare:
        n1 = w.add_node("n1", enis=1)
        b = n1.add_pod("b")
        # (the node netns is this benchmark's own) connect() may reuse a
        # port in TIME_WAIT: tens of thousands of short connections to one
        # backend otherwise make each connect() hunt for a free port, and
        # the hook then runs on cold caches, which measures the hunt
        n1.sysctl({"net.ipv4.tcp_tw_reuse": 1})
        # one server port per arm: arms sharing a 4-tuple space would meet
        # each other's TIME_WAIT sockets, and a connect() hunting for a free
        # port runs the hook on cold caches
        servers = [start_server(b, p) for p in (PORT, DIRECT_PORT, FLOOR_PORT, BARE_PORT)]
        hooks: list[ForeignHook] = []
        try:
            with sim_attach(n1) as agent:
                lb = agent.datapath.lb
                program_maps(lb, SERVICES, 0, b.ip)
                vip = lc.vip(SERVICES - 1)
                progs = agent.datapath.attach_socket_lb(cg_fp, hostns_only=True)
                conn4 = next(p.prog_id for p in progs if p.name == "fp_sock_conn4")
                size = agent.datapath.options.sockrev_max
                hooks.append(ForeignHook(FLOOR.replace("SIZE", str(size)), "floor_conn4", cg_floor))
                hooks.append(ForeignHook(BARE, "bare_conn4", cg_bare))
                fp, floor_c, bare_c = (Client(n1, n1.ip, cgroup=c)
                                       for c in (cg_fp, cg_floor, cg_bare))
                # warm up, and prove each arm is what it claims
                created = lb.ct_events()["created"]
                fp.run("rr", vip, 0.2)
                fp.run("rr", b.ip, 0.2, DIRECT_PORT)
                floor_c.run("rr", b.ip, 0.2, FLOOR_PORT)
                bare_c.run("rr", b.ip, 0.2, BARE_PORT)
                if lb.conntrack() or lb.ct_events()["created"] != created:
                    raise RuntimeError("the ClusterIP arm was translated per packet, not at connect()")
                arms = {
                    "clusterip": (conn4, lambda: fp.run("crr", vip, seconds) * seconds),
                    "direct": (conn4, lambda: fp.run("crr", b.ip, seconds, DIRECT_PORT) * seconds),
                    "floor": (hooks[0].prog_id,
                              lambda: floor_c.run("crr", b.ip, seconds, FLOOR_PORT) * seconds),
                    "bare": (hooks[1].prog_id,
                             lambda: bare_c.run("crr", b.ip, seconds, BARE_PORT) * seconds),
                }
                out.update(run_times(arms, reps))
                out["errors"] = fp.errors + floor_c.errors + bare_c.errors
                out["sockrev_size"] = size
                agent.datapath.detach_socket_lb(cg_fp)
        finally:
            for h in hooks:
                h.close()
            harness.stop(servers)
    out["load"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=6, help="repetitions of each arm (alternated)")
    ap.add_argument("--seconds", type=float, default=1.5, help="CRR seconds per arm run")
    ap.add_argument("--no-record", action="store_true", help="print only; leave bench/results.* alone")
    args = ap.parse_args(argv)
    res = run(args.reps, args.seconds)
    for a in ("clusterip", "direct", "floor", "bare"):
        r = res[a]
        log(f"sockhook_bench: {a:9s} {r['ns_per_run']:7.0f} ns/run ({r['runs']} runs, "
            f"{r['runs_per_conn']:.2f} per connection)")
    log(f"sockhook_bench: load average {res['load']:.1f}, client errors {res['errors']}")
    if args.no_record:
        return 0
    c, d, f, z = (res[a]["ns_per_run"] for a in ("clusterip", "direct", "floor", "bare"))
    method = (f"{args.reps} alternated runs of {args.seconds:g}s TCP CRR per arm (fprr, node netns "
              f"with tcp_tw_reuse, client pinned to CPU 0), kernel BPF run-time statistics for "
              f"this run only; "
              f"{SERVICES} Services in the maps; load average {res['load']:.1f} at the end")
    results.record("lb.host_socketlb_conn4_ns", c, "ns", command=COMMAND, baseline=f,
                   ratio=c / f, target="<= 500 ns",
                   notes=f"fp_sock_conn4's own run time per connect() to a ClusterIP; baseline: "
                         f"the floor, a connect hook doing only the per-socket reverse entry "
                         f"(LRU hash of {res['sockrev_size']:,} entries, as fastpath's); to the "
                         f"backend's own address the hook takes {d:.0f} ns, a hook that returns "
                         f"at once {z:.0f} ns; {method}")
    results.record("lb.host_socketlb_conn4_floor_ns", f, "ns", command=COMMAND, baseline=z,
                   ratio=f / z,
                   notes=f"context: the floor of socket-LB's technique, a connect hook that only "
                         f"writes the reverse entry; baseline: a hook that returns at once; {method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
