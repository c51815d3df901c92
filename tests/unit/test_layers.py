"""The agent's layers, as .importlinter states them, hold: kernel code only
in agent.datapath, pure compilers free of the kernel and the cluster API,
no upward import, the CNI plugin on the standard library alone."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def lint_imports() -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency (pyproject.toml [test])"
    return subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_every_layer_contract_is_kept():
    r = lint_imports()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_a_broken_contract_is_reported(tmp_path):
    """The check can fail: a pure module that imports the kernel layer is caught."""
    bad = REPO / "agent" / "lb" / "_layer_probe.py"
    bad.write_text("import agent.datapath.tc  # deliberately against the layers\n")
    try:
        r = lint_imports()
    finally:
        bad.unlink()
    assert r.returncode != 0
    assert "agent.lb is not allowed to import agent.datapath" in r.stdout
