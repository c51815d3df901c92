"""Initial sync and event throughput of the Kubernetes source (issue 3).

A cluster of 10,000 Services, 100,000 endpoints (1,000 EndpointSlices of 100)
and 50,000 Pods (plus 100 Nodes, 50 Namespaces, 100 NetworkPolicies) is served
by the fake API server in a child process, so its memory and CPU are not
counted as ours. This process runs the real KubernetesSource through the
official client into a Store, as the agent does (every pod watched, as with
NetworkPolicy on), and measures:

  sync.initial_seconds      start -> every kind listed and in the store
  sync.initial_rss_mb       peak resident memory of this process (VmHWM) by then
  sync.events_per_second    a burst of 10,000 committed changes, first to last
                            delta applied to the store

Baseline for the initial sync: fetching and JSON-decoding the same pages with
the same client and nothing else (the floor any client pays); the ratio is
ours over that. Bounded: every wait has a timeout; the whole run takes about
a minute here.

    python -m bench.sync_bench [--services N --endpoints N --pods N --burst N]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request

from bench.results import record

COMMAND = "python -m bench.sync_bench"


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return 0.0


def _start_server(args) -> tuple[subprocess.Popen, str]:
    spec = (f"services={args.services},endpoints={args.endpoints},pods={args.pods},"
            f"nodes=100,namespaces=50,policies=100")
    proc = subprocess.Popen([sys.executable, "-m", "agent.k8s.testing.fakeapi", "--populate", spec],
                            stdout=subprocess.PIPE, text=True)
    port: list[str] = []

    def read():
        line = proc.stdout.readline()
        if line.startswith("PORT "):
            port.append(line.split()[1])

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(args.timeout)
    if not port:
        proc.kill()
        raise SystemExit("fake API server did not start in time")
    return proc, f"http://127.0.0.1:{port[0]}"


def _raw_list_seconds(api_client) -> float:
    """The floor: page through every kind with the same client, JSON-decode, discard."""
    from agent.k8s.kube import _LIST_FUNCS, _gc_paused
    from kubernetes import client
    t0 = time.monotonic()
    for cls_name, fn_name in _LIST_FUNCS.values():
        fn = getattr(getattr(client, cls_name)(api_client), fn_name)
        cont = None
        while True:
            resp = fn(limit=500, _continue=cont, _preload_content=False)
            data = resp.data
            resp.release_conn()
            with _gc_paused():  # the same collector treatment as the source gets
                doc = json.loads(data)
            cont = doc["metadata"].get("continue")
            if not cont:
                break
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=100_000)
    ap.add_argument("--pods", type=int, default=50_000)
    ap.add_argument("--burst", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=240.0, help="bound on each phase (s)")
    ap.add_argument("--no-record", action="store_true", help="print figures only")
    args = ap.parse_args(argv)

    from prometheus_client import CollectorRegistry

    from agent.k8s.kube import KubernetesSource, make_api_client
    from agent.k8s.metrics import K8sMetrics
    from agent.k8s.source import summarize
    from agent.k8s.store import Store

    proc, url = _start_server(args)
    src = None
    try:
        api = make_api_client(host=url)
        rss_idle_mb = _status_kb("VmRSS") / 1024
        store = Store()
        src = KubernetesSource(store, api_client=api, watch_all_pods=True,
                               metrics=K8sMetrics(CollectorRegistry()))
        t0 = time.monotonic()
        src.start()
        if not src.synced.wait(args.timeout):
            raise SystemExit(f"initial sync did not finish in {args.timeout}s")
        sync_s = time.monotonic() - t0
        peak_mb = _status_kb("VmHWM") / 1024
        rss_mb = _status_kb("VmRSS") / 1024
        snap = store.snapshot()
        n_eps = sum(len(s.endpoints) for s in snap.endpoint_slices.values())
        assert (len(snap.services), len(snap.pods), n_eps) == (args.services, args.pods, args.endpoints), \
            summarize(snap)
        print(f"{summarize(snap)}\ninitial sync {sync_s:.2f}s, RSS {rss_mb:.0f} MB "
              f"(peak {peak_mb:.0f} MB, {rss_idle_mb:.0f} MB before)", flush=True)

        # Burst: count the deltas as the store applies them.
        seen = 0
        first = last = 0.0
        done = threading.Event()

        def on_change(cs):
            nonlocal seen, first, last
            now = time.monotonic()
            if seen == 0:
                first = now
            seen += len(cs.deltas)
            last = now
            if seen >= args.burst:
                done.set()

        sub = store.subscribe(on_change)
        req = urllib.request.Request(f"{url}/fake/burst?n={args.burst}", method="POST")
        urllib.request.urlopen(req, timeout=args.timeout).read()
        if not done.wait(args.timeout):
            raise SystemExit(f"burst: only {seen} of {args.burst} changes applied in time")
        sub.close()
        eps = (seen - 1) / (last - first) if last > first else float("inf")
        print(f"burst of {args.burst}: {eps:,.0f} events/s "
              f"({last - first:.2f}s first to last)", flush=True)

        src.stop()
        src = None
        raw_s = _raw_list_seconds(api)
        print(f"baseline (page + JSON-decode only): {raw_s:.2f}s", flush=True)
    finally:
        if src is not None:
            src.stop()
        proc.kill()
        proc.wait(10)

    scale = f"{args.services} Services, {args.endpoints} endpoints in slices of 100, {args.pods} Pods"
    out = {"sync.initial_seconds": sync_s, "sync.initial_rss_mb": peak_mb,
           "sync.events_per_second": eps, "baseline_seconds": raw_s}
    if not args.no_record:
        record("sync.initial_seconds", sync_s, "s", command=COMMAND, baseline=raw_s,
               ratio=sync_s / raw_s, target="< 20 s",
               notes=f"{scale} from the fake API server (child process) through the official "
                     f"client into the store; baseline = the same paged lists fetched and "
                     f"JSON-decoded only.")
        record("sync.initial_rss_mb", peak_mb, "MB", command=COMMAND, target="< 300 MB",
               notes=f"Peak RSS (VmHWM) of the syncing process, Python and the kubernetes client "
                     f"included ({rss_idle_mb:.0f} MB before the sync); {rss_mb:.0f} MB resident "
                     f"after it.")
        record("sync.events_per_second", eps, "events/s", command=COMMAND,
               notes=f"Burst of {args.burst} changes (60% pod label updates, 20% endpoint "
                     "readiness flips, 10% Service port edits, 5% pod creations, 5% deletions) "
                     "committed at once by the server; rate from first to last delta applied, "
                     "each as its own ChangeSet, all pods watched.")
    return out


if __name__ == "__main__":
    main()
