"""agent/policy stays pure: it never pulls in the kernel, network or API layers."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "agent" / "policy"
FORBIDDEN = ("bcc", "pyroute2", "kubernetes", "grpc", "prometheus_client", "agent.datapath",
             "agent.api", "agent.k8s.kube")


def test_importing_the_package_loads_none_of_the_forbidden_modules():
    code = ("import json, sys, agent.policy; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parents[1])
    loaded = json.loads(out.stdout)
    assert "agent.policy.compile" in loaded
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []


def test_no_source_file_imports_them_even_lazily():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 5
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for n in names:
                assert not any(n == b or n.startswith(b + ".") for b in FORBIDDEN), f"{f.name}: {n}"
