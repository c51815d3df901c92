"""Program sets passed from one simulated agent to the next (vm-tests).

A simulated agent starts on a fresh private bpffs (agent.sim.agent.
private_paths), so each one compiles the programs: some 10 s of one CPU,
and most of an end-to-end test's time. The compile depends on the build
options, and on the pin root only through the paths bcc pins the maps at;
the programs themselves refer to maps by object, never by path. So the set
an agent leaves when its private paths go (`give_back`: every map and its
complete program set, nothing resized or migrated beside them) is kept by
the session's pool, and a later agent with the very same options otherwise
and these sources gets it (`adopt`): pinned under its own, still empty,
pin root (under the key it computes for that root), it finds a complete
pinned set, as at a restart, instead of compiling.

A kept set is handed on only once nothing can touch it any more (the netns
its programs were attached in are gone, with their devices and filters, and
no other process holds one of its maps), and emptied first to what a build
leaves: no entries, zeroed arrays, empty tail-call slots, nothing unread in
the event ring. Only an empty pin root is ever filled (a restart on the same
paths keeps what its predecessor left); anything else compiles as before.
Opt-in: `with SetPool(): ...` (vm-tests/conftest.py holds one for the
session); without one, `adopt` and `give_back` do nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
import threading

log = logging.getLogger("fastpath.sim")

_POOL: "SetPool | None" = None


@dataclasses.dataclass
class _Set:
    root: str            # the pool's temporary directory, bpffs mounted at root/bpffs
    pin_root: str
    key: str             # its build key (for its own pin root)
    # the netns its programs were attached in: it is emptied and handed
    # on only once they are all gone
    used_in: tuple = ()


def _shape(options):
    """The options with the pin root left out: what must match."""
    return dataclasses.replace(options, pin_root="")


class SetPool:
    """The sets agents left, whatever their options, for later agents with
    the same ones; at most `keep` (each holds its maps' memory, some 300 MB
    preallocated with the default sizes)."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._lock = threading.Lock()
        self._ready: list[tuple[object, _Set]] = []
        self._closed = False
        self.hits = self.misses = 0
        self._owners: dict[str, tuple] = {}    # pin root -> (shape, netns) of its agent

    def __enter__(self) -> "SetPool":
        global _POOL
        _POOL = self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        global _POOL
        if _POOL is self:
            _POOL = None
        with self._lock:
            self._closed = True
            sets, self._ready = [s for _, s in self._ready], []
        for s in sets:
            _remove(s)

    def _trim(self) -> None:
        """The oldest sets go beyond `keep`."""
        while len(self._ready) > self.keep:
            _remove(self._ready.pop(0)[1])

    # -- the agents' side ------------------------------------------------
    def own(self, options, netns: str) -> None:
        with self._lock:
            self._owners[options.pin_root] = (_shape(options), netns)

    def give_back(self, pin_root: str) -> None:
        """The set an agent leaves under `pin_root` (about to be unmounted),
        kept for a later agent with the same options when it is exactly
        what a build leaves: every map, one complete program set of
        those options, nothing else (no resized or migrated leftovers)."""
        from agent.datapath import loader
        with self._lock:
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
        s.key = loader.build_key(dataclasses.replace(shape, pin_root=s.pin_root))
        s.used_in = (netns,)
        try:
            _repin(pin_root, key, s.pin_root, s.key)
        except OSError as exc:
            log.warning("program set under %s not kept: %s", pin_root, exc)
            _remove(s)
            return
        with self._lock:
            if self._closed:
                _remove(s)
                return
            self._ready.append((shape, s))
            self._trim()

    def take(self, options) -> _Set | None:
        """A kept set for `options` that nothing can touch any more,
        emptied; or None."""
        shape = _shape(options)
        with self._lock:
            for e in list(self._ready):
                if e[0] != shape or not _released(e[1]):
                    continue
                self._ready.remove(e)
                try:
                    _empty(e[1])
                except OSError as exc:
                    log.warning("a kept program set not reused: %s", exc)
                    _remove(e[1])
                    continue
                self.hits += 1
                return e[1]
            self.misses += 1
            return None


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
            loader.pin_fd(fd, dst)
        finally:
            os.close(fd)


def _remove(s: _Set) -> None:
    subprocess.run(["umount", "-l", f"{s.root}/bpffs"], check=False)
    shutil.rmtree(s.root, ignore_errors=True)


def active() -> bool:
    return _POOL is not None


def adopt(options, netns: str, repo=None) -> bool:
    """Fill the empty pin root of `options` with a kept set, if the
    session has a pool and it has one for these options and sources
    (`repo`: the source tree the agent runs, this one when None). True
    when it did; then the agent opens that set instead of compiling. The
    agent's set is the pool's to keep when its paths go (give_back)."""
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
