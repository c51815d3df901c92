"""Load cluster state on its own: `python -m agent.k8s --source DIR|kubernetes [--once]`.

Prints what the agent would log at startup (one summary line, the objects per
kind, every rejected object) and, without --once, keeps following changes
until interrupted. Exit status with --once: 0 when loaded, 1 when the initial
sync did not complete in time, 2 when objects were rejected.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from agent.k8s import open_source
from agent.k8s.source import describe, summarize
from agent.k8s.store import Store

log = logging.getLogger("fastpath.k8s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.k8s", description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="kubernetes",
                    help="'kubernetes' or a directory of manifests (default: kubernetes)")
    ap.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                    help="this node (default: $NODE_NAME); limits the pods and nodes watched")
    ap.add_argument("--all-pods", action="store_true",
                    help="watch every pod (what NetworkPolicy enforcement needs)")
    ap.add_argument("--once", action="store_true", help="load, report and exit")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for the initial sync (default 60)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    store = Store()
    try:
        src = open_source(args.source, args.node_name, store, watch_all_pods=args.all_pods)
    except (OSError, ValueError) as e:
        log.error("cannot open source %s: %s", args.source, e)
        return 1
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        if not src.synced.wait(args.timeout):
            log.error("initial sync from %s did not complete in %.0fs", src.describe_source(),
                      args.timeout)
            if args.once:
                return 1
        snap = store.snapshot()
        log.info("%s (from %s)", summarize(snap), src.describe_source())
        for line in describe(snap):
            log.info("  %s", line)
        rejected = src.rejected()
        for err in rejected:
            log.warning("  rejected: %s", err)
        if args.once:
            return 2 if rejected else 0
        sub = store.subscribe()
        while not done.is_set():
            cs = sub.get(timeout=0.5)
            if cs is not None:
                log.info("v%d %s: %s", cs.version, cs.origin, ", ".join(
                    f"{d.action.value} {d.kind.value} {d.key[0] + '/' if d.key[0] else ''}{d.key[1]}"
                    for d in cs.deltas[:10]) + (f" (+{len(cs.deltas) - 10})" if len(cs.deltas) > 10 else ""))
        return 0
    finally:
        src.stop()


if __name__ == "__main__":
    sys.exit(main())
