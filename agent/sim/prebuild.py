"""Program sets built ahead of the agents that will use them (vm-tests).

A simulated agent starts on a fresh private bpffs (agent.sim.agent.
private_paths), so each one compiles the programs: some 10 s of one CPU,
and most of an end-to-end test's time. The compile depends on the build
options, and on the pin root only through the paths bcc pins the maps at;
the programs themselves refer to maps by object, never by path. So a set
built and pinned under a pool's own bpffs, with the same options otherwise,
is exactly what the agent's own build would leave under its pin root:
`adopt` pins those fresh maps and programs there (the set under the key
the agent computes for its own pin root), and the agent finds a complete
pinned set, as at a restart. The pool builds the next sets meanwhile, at
the lowest CPU priority, while the tests send their traffic.

Only an empty pin root is ever filled (a restart on the same paths keeps
what its predecessor left), only with a set built from these very sources,
and only for identical options; anything else compiles as before.
Opt-in: `with BuildPool(): ...` (vm-tests/conftest.py holds one for the
session); without one, `adopt` does nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
import threading

log = logging.getLogger("fastpath.sim")

_POOL: "BuildPool | None" = None


@dataclasses.dataclass
class _Set:
    root: str            # the pool's temporary directory, bpffs mounted at root/bpffs
    pin_root: str
    key: str             # its build key (for its own pin root)


def _shape(options):
    """The options with the pin root left out: what must match."""
    return dataclasses.replace(options, pin_root="")


class BuildPool:
    """Keeps up to `depth` pinned program sets ready, for the options the
    last agent asked for (the default ones at first); one build at a
    time, in a child process at nice 19."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._cv = threading.Condition()
        self._ready: list[tuple[object, _Set]] = []
        self._building = None        # the shape being built
        self._want = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._proc = None            # the running agent.datapath.build child
        self._waiting = 0            # agents waiting for it
        self.hits = self.misses = 0

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> "BuildPool":
        global _POOL
        from agent.config import Config
        from agent.datapath.loader import BuildOptions
        self._want = _shape(BuildOptions.from_config(Config.defaults()))
        self._thread = threading.Thread(target=self._run, name="sim-prebuild", daemon=True)
        self._thread.start()
        _POOL = self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        global _POOL
        if _POOL is self:
            _POOL = None
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            proc = self._proc
        if proc is not None:
            proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._cv:
            sets, self._ready = [s for _, s in self._ready], []
        for s in sets:
            _remove(s)

    # -- the builder -----------------------------------------------------
    def _next(self):
        """The shape to build next, or None (enough ready)."""
        have = sum(1 for shape, _ in self._ready if shape == self._want)
        return self._want if have < self.depth else None

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and self._next() is None:
                    self._cv.wait()
                if self._closed:
                    return
                shape = self._building = self._next()
            built = None
            try:
                built = self._build(shape)
            except Exception as exc:      # the agent will compile itself: slower, not wrong
                log.warning("prebuild failed: %s", exc)
            with self._cv:
                self._building = None
                if built is not None:
                    if self._closed:
                        _remove(built)
                    else:
                        self._ready.append((shape, built))
                        # sets for options nobody asks for any more: memory back
                        stale = [e for e in self._ready if e[0] != self._want]
                        for e in stale[:max(0, len(self._ready) - self.depth)]:
                            self._ready.remove(e)
                            _remove(e[1])
                elif not self._closed:
                    self._want = None      # do not retry a failing build forever
                self._cv.notify_all()

    def _build(self, shape) -> _Set | None:
        from agent.datapath.build import BuildProcess
        root = tempfile.mkdtemp(prefix="fp-simpool-")
        bpffs = f"{root}/bpffs"
        os.makedirs(bpffs)
        subprocess.run(["mount", "-t", "bpf", "bpf", bpffs], check=True)
        s = _Set(root, f"{bpffs}/fastpath", "")
        try:
            with self._cv:
                if self._closed:
                    raise RuntimeError("pool closed")
                self._proc = proc = BuildProcess(dataclasses.replace(shape, pin_root=s.pin_root))
                if not self._waiting:
                    # behind every test's own processes (traffic, agents):
                    # the CPU it takes is what they leave idle
                    _nice(proc, 19)
            try:
                s.key = proc.result()["key"]
            finally:
                proc.kill()
                with self._cv:
                    self._proc = None
            return s
        except BaseException:
            _remove(s)
            raise

    # -- the agents' side ------------------------------------------------
    def take(self, options) -> _Set | None:
        """A ready set for `options` (waiting for the one being built for
        them, if any), or None; the pool then works towards these options."""
        shape = _shape(options)
        with self._cv:
            if self._want != shape:
                self._want = shape
                self._cv.notify_all()
            while True:
                for e in self._ready:
                    if e[0] == shape:
                        self._ready.remove(e)
                        self.hits += 1
                        self._cv.notify_all()
                        return e[1]
                if self._closed or self._building != shape:
                    self.misses += 1
                    return None
                # an agent waits for it now: no longer background work
                if self._proc is not None:
                    _nice(self._proc, 0)
                self._waiting += 1
                try:
                    self._cv.wait()
                finally:
                    self._waiting -= 1


def _nice(build, level: int) -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, build.proc.pid, level)


def _remove(s: _Set) -> None:
    subprocess.run(["umount", "-l", f"{s.root}/bpffs"], check=False)
    shutil.rmtree(s.root, ignore_errors=True)


def _pin(fd: int, path: str) -> None:
    import ctypes as ct
    from agent.datapath import libbpf
    lib = libbpf.lib()
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    if lib.bpf_obj_pin(fd, path.encode()) != 0:
        err = ct.get_errno()
        raise OSError(err, f"pin {path}: {os.strerror(err)}")


def active() -> bool:
    return _POOL is not None


def adopt(options, repo=None) -> bool:
    """Fill the empty pin root of `options` with a prebuilt set, if the
    session has a pool and it has one for these options and sources
    (`repo`: the source tree the agent runs, this one when None). True
    when it did; then the agent opens that set instead of compiling."""
    from agent.datapath import libbpf, loader
    from agent.sim.agent import REPO
    pool = _POOL
    if pool is None or (repo is not None and os.path.realpath(repo) != str(REPO)):
        return False
    if os.path.isdir(options.pin_root) and os.listdir(options.pin_root):
        return False          # a restart: what is pinned there is the point
    s = pool.take(options)
    if s is None:
        return False
    try:
        os.makedirs(options.pin_root, exist_ok=True)
        src_progs = os.path.join(s.pin_root, loader.PROG_DIR, s.key)
        dst_progs = loader.prog_set_dir(options, loader.build_key(options))
        moves = [(os.path.join(s.pin_root, n), os.path.join(options.pin_root, n))
                 for n in sorted(os.listdir(s.pin_root)) if n != loader.PROG_DIR]
        # the programs last: a set is complete only once every map it uses is there
        moves += [(os.path.join(src_progs, n), os.path.join(dst_progs, n))
                  for n in sorted(os.listdir(src_progs))]
        os.makedirs(dst_progs)
        for src, dst in moves:
            fd = libbpf.obj_get(src)
            try:
                _pin(fd, dst)
            finally:
                os.close(fd)
        return True
    except BaseException:
        # nothing half-adopted: the agent compiles on an empty root
        shutil.rmtree(options.pin_root, ignore_errors=True)
        raise
    finally:
        _remove(s)
