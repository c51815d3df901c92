"""`make bench`: run every benchmark module, then print bench/RESULTS.md.

`make bench-quick` (`--quick`) runs only the hot-path figures, with fewer
and shorter rounds, in a few minutes, and records nothing: its figures are
for a developer's loop, never a replacement for the recorded full runs.

Each module in MODULES has a `main()` that measures its figures and records
them with bench.results.record(). A module that is listed but missing, or that
fails, is reported by name (and makes the exit status non-zero): a benchmark
that silently did not run would leave an old figure looking current.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback

from bench import results

# Add a benchmark here when its module exists; keep the cheap ones first.
# Each entry: module, or (module, its arguments).
MODULES = [
    "bench.sync_bench",
    "bench.agent_bench",
    "bench.cni_bench",
    "bench.pod_to_pod",
    "bench.ipv6_prog_bench",
    "bench.lb_bench",
    "bench.sockhook_bench",
    "bench.ct_bench",
    "bench.nodeport_bench",
    "bench.policy_bench",
    "bench.policy_dir_bench",
    "bench.bw_bench",
]
QUICK = [
    ("bench.pod_to_pod", ["--quick", "--no-record"]),
    ("bench.ipv6_prog_bench", ["--rounds", "3", "--calls", "1000", "--no-record"]),
    ("bench.lb_bench", ["--rounds", "3", "--sizes", "1", "10000", "--kp-sizes",
                        "--no-control-plane", "--no-record"]),
    ("bench.ct_bench", ["--rounds", "2", "--no-record"]),
]


def _run_one(name: str, args: list[str]) -> str:
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return "missing"
        raise
    argv = sys.argv
    sys.argv = [name, *args]   # each main() parses its own command line
    try:
        rc = mod.main()
    finally:
        sys.argv = argv
    # main() may return an exit status or its figures; only a non-zero status fails.
    failed = isinstance(rc, int) and not isinstance(rc, bool) and rc != 0
    return f"exit {rc}" if failed else "ok"


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    outcome: dict[str, str] = {}
    for entry in QUICK if quick else MODULES:
        name, args = (entry, []) if isinstance(entry, str) else entry
        print(f"== {name}", flush=True)
        t = time.monotonic()
        try:
            outcome[name] = _run_one(name, args)
        except Exception:
            traceback.print_exc()
            outcome[name] = "failed"
        print(f"== {name}: {outcome[name]} ({time.monotonic() - t:.0f}s)", flush=True)
    print()
    print("benchmarks: " + ", ".join(f"{n} {o}" for n, o in outcome.items()))
    print()
    if quick:
        return 0 if all(o == "ok" for o in outcome.values()) else 1
    if results.RESULTS_MD.exists():
        print(results.RESULTS_MD.read_text())
    else:
        print("(no bench/RESULTS.md yet: nothing was recorded)")
    return 0 if all(o == "ok" for o in outcome.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
