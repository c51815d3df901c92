"""agent/lb stays pure: importing it pulls in no kernel, API or RPC library."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("bcc", "pyroute2", "kubernetes", "grpc", "prometheus_client", "agent.datapath")
ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_services_compiler_and_reconciler_loads_no_impure_module():
    # A fresh interpreter: this test process has imported everything already.
    code = (
        "import sys, json, agent.lb, agent.lb.compile, agent.lb.reconcile, agent.lb.table\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m in {FORBIDDEN!r}]\n"
        "print(json.dumps(sorted(bad)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == []


def test_no_module_in_agent_lb_names_an_impure_library():
    # Catches a lazy import inside a function, which the import test cannot see.
    for path in sorted((ROOT / "agent" / "lb").glob("*.py")):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                top = words[1].split(".")[0]
                assert top not in FORBIDDEN, f"{path.name}: {line.strip()}"
                assert not words[1].startswith("agent.datapath"), f"{path.name}: {line.strip()}"
