"""`python -m agent.datapath.build`: compile, reconcile the pinned maps, load
and pin fastpath's programs, in a process of its own.

The agent runs this only when no complete pinned program set matches its
sources and build options (loader.build_key), and goes on preparing its
state meanwhile. The compiler (bcc and LLVM, some 100 MB resident) lives and
dies with this process; the agent then opens the pinned programs and maps
through libbpf. Options come as JSON on stdin; the result ({"key", "aside"},
or {"error", "message"} naming the failure) as JSON on stdout, everything the
compiler prints on stderr.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from agent.datapath import errors

REPO = Path(__file__).resolve().parents[2]


class BuildProcess:
    """A build running in a child process; `result()` waits for it and
    returns what loader.build returned, or raises the error it met."""

    def __init__(self, options):
        self.options = options
        self.started = time.monotonic()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.datapath.build"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=str(REPO))
        # a few hundred bytes: the pipe takes them without blocking
        self.proc.stdin.write(json.dumps(dataclasses.asdict(options)).encode())
        self.proc.stdin.close()
        self.proc.stdin = None      # communicate() must not flush it

    def result(self, timeout: float = 600) -> dict:
        # both pipes at once: the compiler may print more than a pipe holds
        out, err = self.proc.communicate(timeout=timeout)
        self.seconds = time.monotonic() - self.started
        try:
            res = json.loads(out.decode() or "{}")
        except ValueError:
            res = {}
        if self.proc.returncode == 0 and "key" in res:
            return res
        if "error" in res:
            cls = getattr(errors, res["error"], errors.DatapathError)
            if cls is errors.VerifierRejected:
                raise cls(res["program"], res["log_tail"])
            raise cls(res["message"])
        tail = "\n".join(err.decode(errors="replace").rstrip().splitlines()[-25:])
        raise errors.DatapathError(f"building fastpath's BPF programs failed (build process "
                                   f"exit status {self.proc.returncode}):\n{tail}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    from agent.datapath import loader
    # stdout carries the result only: whatever the compiler prints goes to stderr
    result_fd = os.dup(1)
    os.dup2(2, 1)
    opts = loader.BuildOptions(**json.loads(sys.stdin.read()))
    try:
        res = loader.build(opts)
        code = 0
    except errors.DatapathError as exc:
        res = {"error": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, errors.VerifierRejected):
            res.update(program=exc.program, log_tail=exc.log_tail)
        code = 1
    with os.fdopen(result_fd, "w") as f:
        json.dump(res, f)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
