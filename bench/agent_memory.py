"""Where the agent's memory goes with a cluster behind it (context for `agent.rss_mb`).

The cluster of `python -m bench.agent_bench`'s RSS phase
(bench/agent_bench.py: cluster_objects) goes through the agent's own pieces
in this process, one after the other, and each piece is weighed twice: by
the growth of the resident set, and by walking the objects it keeps
(each object counted once, for the first piece that reaches it):

  imports       the modules the daemon imports (datapath, Kubernetes client,
                gRPC, Prometheus)
  store         the objects parsed (agent.k8s.parse) into the Store, as the
                Kubernetes source leaves them
  services      ServiceSync's table and reconciler after programming a
                simulated node's real maps from that store
  policy        the compiled NetworkPolicy state for the node's pods

Not a recorded figure; it says where the recorded one goes.

    python -m bench.agent_memory [--pods 1000] [--services 10000] [--rules 10000]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
import types
from collections import Counter

from bench.agent_bench import RULES, cluster_objects, rss_mb

# code, modules and threads are shared by everything: not a structure's own
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
           types.MethodType, types.FrameType, types.CodeType, threading.Thread)


def deep_size(root, seen: set[int], by_type: Counter | None = None) -> int:
    """Bytes of every object reachable from `root` not counted before
    (`seen` is shared across calls), code, modules and threads left out."""
    total, stack = 0, [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, _SHARED):
            continue
        seen.add(id(o))
        n = sys.getsizeof(o)
        total += n
        if by_type is not None:
            by_type[type(o).__name__] += n
        stack.extend(gc.get_referents(o))
    return total


def mb(n: float) -> str:
    return f"{n / 2**20:7.1f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--rules", type=int, default=RULES)
    args = ap.parse_args(argv)
    pid = os.getpid()
    rows: list[tuple[str, float, int]] = []
    seen: set[int] = set()
    last = rss_mb(pid)

    def step(name: str, obj, by_type: Counter | None = None) -> None:
        nonlocal last
        gc.collect()
        now = rss_mb(pid)
        rows.append((name, now - last, deep_size(obj, seen, by_type) if obj is not None else 0))
        last = now

    import agent.daemon.agent  # noqa: F401
    import agent.daemon.policysync  # noqa: F401
    import agent.daemon.services  # noqa: F401
    import agent.daemon.metrics  # noqa: F401
    import agent.k8s.kube  # noqa: F401
    import kubernetes.client  # noqa: F401
    import kubernetes.config  # noqa: F401
    import agent.api.inspect  # noqa: F401
    step("imports (daemon, datapath, kubernetes client, gRPC, Prometheus)", None)

    from agent.k8s.parse import parse_object
    from agent.k8s.store import Store
    from agent.sim import World
    from agent.sim.agent import sim_attach

    with World() as w:
        node = w.add_node("n1", enis=0)

        class _Pod:               # the cluster needs the pods' names and addresses only
            def __init__(self, i: int):
                self.name, self.ip = f"p{i}", f"10.{240 + i // 60000}.{i // 250 % 240}.{i % 250 + 2}"
        pods = [_Pod(i) for i in range(args.pods)]
        objs = cluster_objects(node, pods, args.services, 10, args.rules)
        import json
        raw = [json.dumps(o) for o in objs]      # the source decodes JSON, as here
        del objs
        gc.collect()
        last = rss_mb(pid)
        store = Store()
        t = time.monotonic()
        store.apply(upserts=[parse_object(json.loads(r)) for r in raw])
        parse_s = time.monotonic() - t
        del raw
        store_types: Counter = Counter()
        step("store (parsed objects)", store, store_types)

        from agent.daemon.services import ServiceSync
        with sim_attach(node, register=False) as agent:
            last = rss_mb(pid)
            sync = ServiceSync(agent.datapath.lb, store, None, node.name)
            t = time.monotonic()
            sync.sync_once()
            svc_s = time.monotonic() - t
            sync.purger.stop()
            svc_types: Counter = Counter()
            step("services: table (compiled Services)", sync.table, svc_types)
            step("services: reconciler (what the maps hold)", sync.reconciler, svc_types)

            from agent.policy import compile_policy
            t = time.monotonic()
            state = compile_policy(store.snapshot(), node.name, [node.ip], "default")
            pol_s = time.monotonic() - t
            pol_types: Counter = Counter()
            step("policy: compiled state", state, pol_types)
            import ctypes
            gc.collect()
            before = rss_mb(pid)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            print(f"malloc_trim(0): RSS {before:.0f} -> {rss_mb(pid):.0f} MB")
            print(f"parse {parse_s:.1f}s, services {svc_s:.1f}s, policy {pol_s:.1f}s; "
                  f"policy: {state.rule_count()} rules, {len(state.endpoints)} endpoints")

    print(f"{'piece':<60} {'RSS growth':>10} {'objects':>10}")
    for name, grew, size in rows:
        print(f"{name:<60} {grew:7.1f} MB {mb(size)}")
    for title, types_ in (("store", store_types), ("services", svc_types),
                          ("policy", pol_types)):
        print(f"\n{title}: largest object types")
        for k, v in types_.most_common(8):
            print(f"  {mb(v)}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
