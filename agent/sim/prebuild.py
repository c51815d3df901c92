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

Most sets are not built at all but reused: the set an agent leaves when
its private paths go (`give_back`) is kept, and handed to a later agent
with the same options once nothing can touch it any more (the netns its
programs were attached in are gone, no other process holds one of its
maps), emptied first to what a build leaves: no entries, zeroed arrays,
empty tail-call slots, nothing unread in the event ring.

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
    # a set an agent used (given back): the netns its programs were
    # attached in; it is emptied and handed out only once they are all gone
    used_in: tuple = ()


def _shape(options):
    """The options with the pin root left out: what must match."""
    return dataclasses.replace(options, pin_root="")


class BuildPool:
    """Keeps up to `depth` pinned program sets ready for the default
    options (most agents'), one build at a time, in a child process at
    nice 19; and keeps the sets agents leave (given back), whatever their
    options, for later agents with the same ones."""

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
        self.hits = self.misses = self.recycled = 0
        self._owners: dict[str, tuple] = {}    # pin root -> (shape, netns) of its agent

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
        # (given-back sets count: they become usable when their test ends)
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
                        self._trim()
                elif not self._closed:
                    self._want = None      # do not retry a failing build forever
                self._cv.notify_all()

    def _build(self, shape) -> _Set | None:
        from agent.datapath.build import BuildProcess
        s = _mount_set()
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

    def _trim(self) -> None:
        """At most depth + 2 sets (each holds its maps' memory, some 300 MB
        preallocated): the oldest of options nobody asks for go first."""
        excess = len(self._ready) - (self.depth + 2)
        for e in sorted(self._ready, key=lambda e: e[0] == self._want)[:max(0, excess)]:
            self._ready.remove(e)
            _remove(e[1])

    # -- the agents' side ------------------------------------------------
    def own(self, options, netns: str) -> None:
        with self._cv:
            self._owners[options.pin_root] = (_shape(options), netns)

    def give_back(self, pin_root: str) -> None:
        """The set an agent leaves under `pin_root` (about to be unmounted),
        kept for a later agent with the same options when it is exactly
        what a build leaves: every map, one complete program set of
        those options, nothing else (no resized or migrated leftovers)."""
        from agent.datapath import loader
        with self._cv:
            owner = self._owners.pop(pin_root, None)
            if owner is None or self._closed:
                return
        shape, netns = owner
        options = dataclasses.replace(shape, pin_root=pin_root)
        key = loader.build_key(options)
        try:
            names = set(os.listdir(pin_root))
            progs = os.listdir(os.path.join(pin_root, loader.PROG_DIR))
            complete = set(os.listdir(loader.prog_set_dir(options, key))) == set(loader.PROGRAMS)
        except OSError:
            return
        if names != set(loader.pinned_map_names()) | {loader.PROG_DIR} or progs != [key] \
                or not complete:
            return
        s = _mount_set()
        try:
            _repin(pin_root, key, s.pin_root,
                   loader.build_key(dataclasses.replace(shape, pin_root=s.pin_root)))
        except OSError as exc:
            log.warning("program set under %s not kept: %s", pin_root, exc)
            _remove(s)
            return
        s.key = loader.build_key(dataclasses.replace(shape, pin_root=s.pin_root))
        s.used_in = (netns,)
        with self._cv:
            if self._closed:
                _remove(s)
                return
            self._ready.append((shape, s))
            self._trim()
            self._cv.notify_all()

    def take(self, options) -> _Set | None:
        """A ready set for `options` (waiting for the one being built for
        them, if any), or None."""
        shape = _shape(options)
        with self._cv:
            while True:
                for e in list(self._ready):
                    if e[0] != shape or not _released(e[1]):
                        continue
                    self._ready.remove(e)
                    if e[1].used_in:
                        try:
                            _empty(e[1])
                        except OSError as exc:
                            log.warning("a given-back program set not reused: %s", exc)
                            _remove(e[1])
                            continue
                        self.recycled += 1
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


def _mount_set() -> _Set:
    root = tempfile.mkdtemp(prefix="fp-simpool-")
    bpffs = f"{root}/bpffs"
    os.makedirs(bpffs)
    subprocess.run(["mount", "-t", "bpf", "bpf", bpffs], check=True)
    return _Set(root, f"{bpffs}/fastpath", "")


def _released(s: _Set) -> bool:
    """No program of a given-back set can run any more, nor any process
    write its maps: the netns it was attached in are gone (their devices,
    filters and the processes the world started with them) and no other
    process holds one of its maps open (an agent process a test left
    running)."""
    if not s.used_in:
        return True
    if any(os.path.exists(f"/run/netns/{ns}") for ns in s.used_in):
        return False
    from agent.datapath import libbpf
    ids = set()
    for n in os.listdir(s.pin_root):
        if n == "progs":
            continue
        fd = libbpf.obj_get(os.path.join(s.pin_root, n))
        try:
            ids.add(libbpf.map_info(fd).id)
        finally:
            os.close(fd)
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = f.read()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith("map_id:") and int(line.split()[1]) in ids:
                    return False
    return True


def _empty(s: _Set) -> None:
    """A given-back set's maps as a build leaves them: no entry in any
    hash, LRU or trie, arrays zeroed, no tail-call slot filled, nothing
    unread in the event ring."""
    import ctypes as ct
    from agent.datapath import libbpf
    from agent.datapath.ringbuf import RingReader
    lib = libbpf.lib()
    for n in os.listdir(s.pin_root):
        if n == "progs":
            continue
        fd = libbpf.obj_get(os.path.join(s.pin_root, n))
        try:
            info = libbpf.map_info(fd)
            if info.type == libbpf.BPF_MAP_TYPE_RINGBUF:
                ring = RingReader(fd)
                try:
                    while ring.poll(0):
                        pass
                finally:
                    ring.close()
                continue
            keys = [k for k, _ in libbpf.map_items_raw(
                fd, info.key_size, libbpf.value_buffer_size(info.type, info.value_size))]
            if info.type in _ARRAYS:
                zero = bytes(libbpf.value_buffer_size(info.type, info.value_size))
                for k in keys:
                    if lib.bpf_map_update_elem(fd, k, zero, 0) != 0:
                        raise OSError(ct.get_errno(), f"{n}: zeroing failed")
            else:
                for k in keys:
                    if lib.bpf_map_delete_elem(fd, k) != 0 and ct.get_errno() != 2:
                        raise OSError(ct.get_errno(), f"{n}: delete failed")
        finally:
            os.close(fd)


_ARRAYS = (2, 6)        # array, percpu_array (uapi enum bpf_map_type)


def _repin(src_root: str, src_key: str, dst_root: str, dst_key: str) -> None:
    """Every map pinned under src_root, and the program set src_key, pinned
    under dst_root (the set as dst_key): the programs last, so a set is
    complete only once every map it uses is there."""
    from agent.datapath import libbpf, loader
    src_progs = os.path.join(src_root, loader.PROG_DIR, src_key)
    dst_progs = os.path.join(dst_root, loader.PROG_DIR, dst_key)
    moves = [(os.path.join(src_root, n), os.path.join(dst_root, n))
             for n in sorted(os.listdir(src_root)) if n != loader.PROG_DIR]
    moves += [(os.path.join(src_progs, n), os.path.join(dst_progs, n))
              for n in sorted(os.listdir(src_progs))]
    os.makedirs(dst_progs)
    for src, dst in moves:
        fd = libbpf.obj_get(src)
        try:
            _pin(fd, dst)
        finally:
            os.close(fd)


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


def adopt(options, netns: str, repo=None) -> bool:
    """Fill the empty pin root of `options` with a prebuilt set, if the
    session has a pool and it has one for these options and sources
    (`repo`: the source tree the agent runs, this one when None). True
    when it did; then the agent opens that set instead of compiling."""
    from agent.datapath import loader
    from agent.sim.agent import REPO
    pool = _POOL
    if pool is None or (repo is not None and os.path.realpath(repo) != str(REPO)):
        return False
    pool.own(options, netns)       # its last options: what it leaves is kept by those
    if os.path.isdir(options.pin_root) and os.listdir(options.pin_root):
        return False          # a restart: what is pinned there is the point
    s = pool.take(options)
    if s is None:
        return False
    try:
        os.makedirs(options.pin_root, exist_ok=True)
        _repin(s.pin_root, s.key, options.pin_root, loader.build_key(options))
        return True
    except BaseException:
        # nothing half-adopted: the agent compiles on an empty root
        shutil.rmtree(options.pin_root, ignore_errors=True)
        raise
    finally:
        _remove(s)


def give_back(pin_root: str) -> None:
    """What an agent left under `pin_root` (its bpffs about to be
    unmounted), to the session's pool if it has one."""
    pool = _POOL
    if pool is not None:
        try:
            pool.give_back(pin_root)
        except Exception as exc:      # not kept: a later agent compiles, nothing worse
            log.warning("program set under %s not kept: %s", pin_root, exc)
