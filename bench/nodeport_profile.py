"""Program time per NodePort connection: a baseline tree's programs vs this tree's, one run.

Two fastpath nodes in one simulated world, identical but for the BPF source
their agents compile: n1 runs a baseline git ref's (default `main`), n2 this
working tree's. Each has its backend pod; both hold the same N NodePort
Services (bench/nodeport_bench.py's program_maps, the probed one last). An
external client on the VPC side opens short TCP connections (fprr crr) to
each node's NodePort in turn (and, as the floor, to n2's pod IP), arms alternated and their order reversed every
other round, and the kernel's BPF run-time statistics give, per program
attached on the node, runs per connection and ns per run, so ns per
connection, for each arm. Program time is what a NodePort connection costs
fastpath beyond the direct path (bench/RESULTS.md lb.nodeport_vs_direct: the
rest of the two paths is the same kernel code), and unlike connection rates
it is stable on a loaded machine: it is the figure to compare two versions
of the programs by.

A third node, n3, runs no fastpath but the floor of the technique
(NodePortFloor: DNAT with one conntrack insert at the SYN and one lookup per
packet each way, reverse NAT of the reply, the same redirects); the same
client's connections to its NodePort and to its pod's address say how much
of NodePort's extra program time any program doing it must spend, and so
how much is fastpath's own.

Statistics are switched on with the bpf() command BPF_ENABLE_STATS, which
holds them on only while its fd is open (no sysctl is written). Each agent
runs in a process of its own started in its tree (python -c ..., cwd = the
tree), so each compiles its own bpf/; the baseline tree is `git archive`d
into a temporary directory.

    python -m bench.nodeport_profile [--baseline main] [--rounds 6] [--seconds 2]
                                     [--services 1000] [--swap] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from agent.sim import World
from bench import harness
from bench.lb_bench import Client, bpf_run_stats, log, own_cgroup, prog_counters, start_server
from bench.pod_to_pod import BARE_FIB_OUT4

COMMAND = "python -m bench.nodeport_profile"
REPO = Path(__file__).resolve().parents[1]
PORT = harness.FPRR_PORT
NODE_PORT_BASE = 20000

# The agent side of one arm, run by the tree's own Python modules: attach to
# the node, write the Services, say so, and hold until stdin closes.
CHILD = r"""
import json, sys, types
spec = json.loads(sys.argv[1])
from agent.sim.agent import sim_attach
from bench.nodeport_bench import program_maps
pod = types.SimpleNamespace(**spec["pod"])
node = types.SimpleNamespace(name=spec["name"], netns=spec["netns"], pods=[pod])
# socket-LB on, as the DaemonSet runs it (bench.nodeport_bench.product_agent),
# its hooks on an empty cgroup child of the parent's
with sim_attach(node, socket_lb=True, cgroup_root=spec["cgroup"]) as agent:
    program_maps(agent.datapath.lb, spec["services"], spec["node_ip"], pod.ip)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()
"""


def export_tree(ref: str, dest: str) -> str:
    """`ref` of this repository as plain files under `dest`; its commit."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.Popen(["git", "archive", commit], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return commit


class ChildAgent:
    """An agent from `tree` in a child process running `child` (Python
    source given `spec` as JSON in argv[1]; it prints a line with "ready"
    once attached and stops when its stdin closes)."""

    def __init__(self, tree: str, child: str, spec: dict):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", child, json.dumps(spec)], cwd=tree,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def wait_ready(self, timeout: float = 600) -> None:
        import select
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else ""
        if '"ready"' not in line:
            self.proc.kill()
            self.log.seek(0)
            raise RuntimeError("agent did not start:\n" + self.log.read().decode()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ArmAgent(ChildAgent):
    """An agent from `tree` serving `node` and its backend `pod`, with
    `services` NodePort Services."""

    def __init__(self, tree: str, node, pod, services: int, cgroup: str):
        super().__init__(tree, CHILD, {
            "name": node.name, "netns": node.netns, "node_ip": node.ip, "services": services,
            "cgroup": cgroup,
            "pod": {"name": pod.name, "netns_path": pod.netns_path, "ifname": pod.ifname,
                    "ip": pod.ip}})


def node_programs(node, prefix: str = "fp_") -> dict[str, int]:
    """The tc programs named `prefix`... attached in the node (fastpath's by
    default): name -> id (each once, whatever it is attached to;
    tail-called programs count in their caller)."""
    out = json.loads(node.run(["bpftool", "-j", "net", "show"]).stdout or "[]")
    return {p["name"]: p["id"] for sec in out for p in sec.get("tc", [])
            if p.get("name", "").startswith(prefix)}


class NodePortFloor:
    """The floor of the NodePort technique, on a node of its own without
    fastpath: on the node's interfaces a program that looks the packet's
    tuple up in an LRU conntrack map, and for the opening SYN to the NodePort
    finds the frontend in a map, picks its one backend and inserts the flow's
    two entries (forward and reply); each packet to the NodePort is DNATed
    (address, port, both checksums) and redirected into the pod's netns; on
    the pod's veth, one that looks the reply tuple up, puts the NodePort back
    as the source and sends the packet out by the FIB. Packets to the pod's
    own address are only redirected (the direct floor). A flow's two entries
    are deleted by the ACK that ends its close (each FIN marks both entries),
    as fastpath's are: a floor that let closed flows wait for eviction would
    pay an evicting insert at every SYN of a busy client, which fastpath
    does not (until 2026-12-05 it did: docs/benchmarks.md). No other TCP
    state, tiers, guards, policy, counters, reports or fragments:
    fastpath's NodePort increment over its direct path, less this one's, is
    what its own logic adds to the technique."""

    SRC = r"""
    #include <uapi/linux/bpf.h>
    #include <uapi/linux/pkt_cls.h>
    #include <uapi/linux/if_ether.h>
    #include <uapi/linux/ip.h>
    #include <uapi/linux/in.h>
    #include <uapi/linux/tcp.h>
    #include <linux/socket.h>
    struct ct_key { __be32 saddr, daddr; __be16 sport, dport; __u32 proto; };
    /* fin: which ends sent a FIN, kept in both entries */
    struct ct_val { __be32 addr; __be16 port; __u16 fin; };
    #define FIN_CLIENT 1
    #define FIN_SERVER 2
    #define FIN_BOTH (FIN_CLIENT | FIN_SERVER)
    BPF_TABLE("lru_hash", struct ct_key, struct ct_val, npf_ct, 65536);
    BPF_TABLE("hash", __u32, struct ct_val, npf_svc, 16);
    """ + BARE_FIB_OUT4 + r"""
    #define L4_CSUM (ETH_HLEN + sizeof(struct iphdr) + offsetof(struct tcphdr, check))

    /* address and port rewritten in place, checksums by the kernel's
     * helpers (as fastpath does: offloaded checksums) */
    static __always_inline int nat(struct __sk_buff *skb, int src, __be32 oa, __be32 na,
                                   __be16 op, __be16 np)
    {
        void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
        struct iphdr *ip = data + ETH_HLEN;
        struct tcphdr *th = (void *)(ip + 1);
        __u32 c;

        if ((void *)(th + 1) > end)
            return -1;
        c = (__u16)~ip->check;
        c += (__u16)~(oa & 0xffff) + (__u16)~(oa >> 16) + (na & 0xffff) + (na >> 16);
        c = (c & 0xffff) + (c >> 16);
        c = (c & 0xffff) + (c >> 16);
        ip->check = ~c;
        if (src) { ip->saddr = na; th->source = np; }
        else { ip->daddr = na; th->dest = np; }
        if (bpf_l4_csum_replace(skb, L4_CSUM, oa, na, BPF_F_PSEUDO_HDR | 4))
            return -1;
        return bpf_l4_csum_replace(skb, L4_CSUM, op, np, 2);
    }

    /* A packet of a known flow: a FIN marks both entries; the packet
     * after both FINs that carries neither SYN, FIN nor RST (the ACK of the
     * second FIN) deletes both. `mine` is the packet's own entry. */
    static __always_inline void close_seen(struct tcphdr *th, struct ct_val *mine,
                                           struct ct_key *k, struct ct_key *other, __u16 fin)
    {
        struct ct_val *o;

        if (th->fin) {
            mine->fin |= fin;
            o = npf_ct.lookup(other);
            if (o)
                o->fin = mine->fin;
        } else if (mine->fin == FIN_BOTH && !th->syn && !th->rst) {
            npf_ct.delete(k);
            npf_ct.delete(other);
        }
    }

    int npf_in(struct __sk_buff *skb)
    {
        void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
        struct ethhdr *eth = data;
        struct iphdr *ip = (void *)(eth + 1);
        struct tcphdr *th = (void *)(ip + 1);
        struct ct_key k = {}, rk = {};
        struct ct_val *v, nv = {}, rv = {};
        __u32 port;
        int found;

        if ((void *)(th + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
            return TC_ACT_UNSPEC;
        if (ip->daddr == POD_IP) {
            /* a connection straight to the pod on a tuple a NodePort
             * flow had: its reply entry must go (what fastpath does too) */
            if (ip->protocol == IPPROTO_TCP && th->syn && !th->ack) {
                rk.saddr = ip->daddr;
                rk.daddr = ip->saddr;
                rk.sport = th->dest;
                rk.dport = th->source;
                rk.proto = IPPROTO_TCP;
                if (npf_ct.lookup(&rk))
                    npf_ct.delete(&rk);
            }
            return bpf_redirect_peer(POD_IFINDEX, 0);
        }
        if (ip->daddr != NODE_IP || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
            return TC_ACT_UNSPEC;
        k.saddr = ip->saddr;
        k.daddr = ip->daddr;
        k.sport = th->source;
        k.dport = th->dest;
        k.proto = IPPROTO_TCP;
        /* a SYN opens a connection: its entries are (re)written, as a
         * reply entry of an earlier one on the tuple may be gone */
        v = th->syn && !th->ack ? NULL : npf_ct.lookup(&k);
        found = v != NULL;
        if (!found) {
            if (!th->syn || th->ack)
                return TC_ACT_UNSPEC;
            port = th->dest;
            v = npf_svc.lookup(&port);
            if (!v)
                return TC_ACT_UNSPEC;
        }
        nv = *v;
        /* the reply entry's key: backend -> client */
        rk.saddr = nv.addr;
        rk.daddr = k.saddr;
        rk.sport = nv.port;
        rk.dport = k.sport;
        rk.proto = IPPROTO_TCP;
        if (found) {
            close_seen(th, v, &k, &rk, FIN_CLIENT);
        } else {
            rv.addr = k.daddr;
            rv.port = k.dport;
            npf_ct.update(&k, &nv);
            npf_ct.update(&rk, &rv);
        }
        if (nat(skb, 0, k.daddr, nv.addr, k.dport, nv.port))
            return TC_ACT_SHOT;
        return bpf_redirect_peer(POD_IFINDEX, 0);
    }

    int npf_out(struct __sk_buff *skb)
    {
        void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
        struct ethhdr *eth = data;
        struct iphdr *ip = (void *)(eth + 1);
        struct tcphdr *th = (void *)(ip + 1);
        struct ct_key k = {};
        struct ct_val *v;

        if ((void *)(th + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ttl <= 1)
            return TC_ACT_UNSPEC;
        if (ip->protocol == IPPROTO_TCP && ip->ihl == 5) {
            k.saddr = ip->saddr;
            k.daddr = ip->daddr;
            k.sport = th->source;
            k.dport = th->dest;
            k.proto = IPPROTO_TCP;
            v = npf_ct.lookup(&k);
            if (v) {
                struct ct_val nv = *v;
                struct ct_key fk = {};

                fk.saddr = k.daddr;
                fk.daddr = nv.addr;
                fk.sport = k.dport;
                fk.dport = nv.port;
                fk.proto = IPPROTO_TCP;
                close_seen(th, v, &k, &fk, FIN_SERVER);
                if (nat(skb, 1, k.saddr, nv.addr, k.sport, nv.port))
                    return TC_ACT_SHOT;
            }
            data = (void *)(long)skb->data;
            end = (void *)(long)skb->data_end;
            eth = data;
            ip = (void *)(eth + 1);
            if ((void *)(ip + 1) > end)
                return TC_ACT_SHOT;
        }
        return bare_fib_out4(skb, eth, ip);
    }
    """

    def __init__(self, node, pod, node_port: int, pod_port: int):
        import socket
        from bcc import BPF
        from agent.datapath.maps import be32
        self.node = node
        self.bpf = BPF(text=self.SRC, cflags=[f"-DPOD_IP={be32(pod.ip)}U",
                                               f"-DNODE_IP={be32(node.ip)}U",
                                               f"-DPOD_IFINDEX={pod.host_ifindex}"])
        svc = self.bpf["npf_svc"]
        val = svc.Leaf()
        val.addr = be32(pod.ip)
        val.port = socket.htons(pod_port)
        svc[svc.Key(socket.htons(node_port))] = val
        fds = {n: self.bpf.load_func(n, BPF.SCHED_CLS).fd for n in ("npf_in", "npf_out")}
        self.filters = [(node, pod.host_ifname, fds["npf_out"], "npf_out")]
        self.filters += [(node, nic, fds["npf_in"], "npf_in")
                         for nic in ["eth0"] + [e.name for e in node.enis]]

    def attached(self):
        from bench.pod_to_pod import ingress_attached
        return ingress_attached(self.filters)


def profile(arms: dict, rounds: int, seconds: float) -> dict:
    """arms: name -> (client, ip, port, {program: id}). Per arm: per-round ns
    per connection, and per program runs and ns per connection over all rounds."""
    acc = {a: {"rounds": [], "conns": 0.0, "rates": [],
               "progs": {n: [0, 0] for n in ids}} for a, (_, _, _, ids) in arms.items()}
    with bpf_run_stats():
        for r in range(rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for a in order:
                client, ip, port, ids = arms[a]
                before = {n: prog_counters(i) for n, i in ids.items()}
                rate = client.run("crr", ip, seconds, port)
                after = {n: prog_counters(i) for n, i in ids.items()}
                conns = rate * seconds
                ns = 0
                for n in ids:
                    d_ns, d_runs = after[n][0] - before[n][0], after[n][1] - before[n][1]
                    acc[a]["progs"][n][0] += d_ns
                    acc[a]["progs"][n][1] += d_runs
                    ns += d_ns
                acc[a]["rounds"].append(ns / conns)
                acc[a]["conns"] += conns
                acc[a]["rates"].append(rate)
            log(f"nodeport_profile: round {r + 1}/{rounds}: " + ", ".join(
                f"{a} {acc[a]['rounds'][-1]:.0f} ns/conn" for a in arms))
    res = {}
    for a, x in acc.items():
        per = {n: {"runs_per_conn": runs / x["conns"], "ns_per_run": ns / max(runs, 1),
                   "ns_per_conn": ns / x["conns"]}
               for n, (ns, runs) in sorted(x["progs"].items()) if runs / x["conns"] >= 0.05}
        res[a] = {"ns_per_conn_median": harness.median(x["rounds"]),
                  "ns_per_conn_rounds": x["rounds"], "programs": per,
                  "crr_median": harness.median(x["rates"])}
    return res


def run(args) -> dict:
    started = time.monotonic()
    harness.build_fprr()
    tmp = tempfile.mkdtemp(prefix="fp-npprof-")
    res: dict = {"baseline_ref": args.baseline, "services": args.services, "swap": args.swap,
                 "rounds": args.rounds, "seconds": args.seconds}
    try:
        res["baseline_commit"] = export_tree(args.baseline, tmp)
        res["tree"] = str(REPO)
        with World() as w:
            first, second = w.add_node("n1", enis=1), w.add_node("n2", enis=1)
            # the two nodes are not alike (the same programs on both measure
            # ~200 ns apart): --swap puts each build on the other node
            nodes = ({"baseline": second, "tree": first} if args.swap else
                     {"baseline": first, "tree": second})
            floor_node = w.add_node("n3", enis=1)
            pods = {a: n.add_pod(f"{n.name}b") for a, n in sorted(nodes.items(),
                                                                 key=lambda x: x[1].name)}
            floor_pod = floor_node.add_pod("n3b")
            ext = w.add_client("ext")
            # torn down in reverse, also when a step fails: the agents, then
            # their cgroups (after the agents let go of them), then the servers
            with ExitStack() as stack:
                servers = [start_server(p) for p in [*pods.values(), floor_pod]]
                stack.callback(harness.stop, servers)
                agents = {}
                for a, tree in (("baseline", tmp), ("tree", str(REPO))):
                    cg = stack.enter_context(own_cgroup())
                    agents[a] = ArmAgent(tree, nodes[a], pods[a], args.services, cg)
                    stack.callback(agents[a].stop)
                for ag in agents.values():      # (one compile at a time on 2 CPUs)
                    ag.wait_ready()
                harness.tune_client(ext)
                client = Client(ext, ext.ip)
                probe = NODE_PORT_BASE + args.services - 1
                arms = {}
                for a, n in nodes.items():
                    client.run("rr", n.ip, 0.2, probe)        # warm, and prove it answers
                    ids = node_programs(n)
                    if "fp_from_vpc" not in ids:
                        raise RuntimeError(f"{a}: fastpath is not attached on {n.name}: {ids}")
                    arms[a] = (client, n.ip, probe, ids)
                # the same node's programs when the client talks to the pod
                # IP: the floor NodePort's extra work adds to
                client.run("rr", pods["tree"].ip, 0.2)
                arms["direct"] = (client, pods["tree"].ip, PORT, arms["tree"][3])
                floor = NodePortFloor(floor_node, floor_pod, probe, PORT)
                with floor.attached():
                    ids = node_programs(floor_node, "npf_")
                    if set(ids) != {"npf_in", "npf_out"}:
                        raise RuntimeError(f"the floor is not attached on n3: {ids}")
                    for dst, port in ((floor_node.ip, probe), (floor_pod.ip, PORT)):
                        client.run("rr", dst, 0.2, port)
                    arms["floor"] = (client, floor_node.ip, probe, ids)
                    arms["floor-direct"] = (client, floor_pod.ip, PORT, ids)
                    log(f"nodeport_profile: world {w.tag} ready "
                        f"({time.monotonic() - started:.0f}s)")
                    res.update(profile(arms, args.rounds, args.seconds))
                res["client_errors"] = client.errors
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["elapsed"] = time.monotonic() - started
    return res


def report(res: dict) -> str:
    lines = [f"program time per NodePort connection ({res['services']} NodePort Services, "
             f"{res['rounds']} alternating rounds of {res['seconds']:g}s CRR; medians; "
             f"this tree on {'n1' if res.get('swap') else 'n2'})"]
    names = sorted(set(res["baseline"]["programs"]) | set(res["tree"]["programs"]))
    lines.append(f"  {'program':14s} {'baseline ' + res['baseline_commit'][:10]:>28s}"
                 f" {'this tree':>28s}")
    for n in names:
        cells = []
        for a in ("baseline", "tree"):
            p = res[a]["programs"].get(n)
            cells.append(f"{p['runs_per_conn']:.1f} x {p['ns_per_run']:4.0f} = "
                         f"{p['ns_per_conn']:5.0f} ns" if p else "-")
        lines.append(f"  {n:14s} {cells[0]:>28s} {cells[1]:>28s}")
    b, t = res["baseline"]["ns_per_conn_median"], res["tree"]["ns_per_conn_median"]
    lines.append(f"  {'all':14s} {b:25.0f} ns {t:25.0f} ns   ({t - b:+.0f} ns, {t / b:.3f}x)")
    d = res["direct"]["ns_per_conn_median"]
    lines.append(f"  direct to this tree's pod IP: {d:.0f} ns; NodePort's extra program time: "
                 f"baseline {b - d:.0f} ns, this tree {t - d:.0f} ns")
    f, fd = res["floor"]["ns_per_conn_median"], res["floor-direct"]["ns_per_conn_median"]
    lines.append(f"  the technique's floor (bare NodePort program, node n3): NodePort {f:.0f} ns, "
                 f"direct {fd:.0f} ns: {f - fd:.0f} ns inherent; beyond it: baseline "
                 f"{b - d - (f - fd):.0f} ns, this tree {t - d - (f - fd):.0f} ns")
    lines.append(f"  CRR (noisy, informative): baseline {res['baseline']['crr_median']:,.0f}, "
                 f"this tree {res['tree']['crr_median']:,.0f} conn/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git ref whose bpf/ is the baseline")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0, help="CRR seconds per arm and round")
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--swap", action="store_true",
                    help="the baseline on node n2, this tree on n1 (average a run with and "
                         "one without: the nodes differ by about 200 ns per connection)")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, BPF)")
    res = run(args)
    log(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    log(f"nodeport_profile: done in {res['elapsed']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
