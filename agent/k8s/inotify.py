"""Being told when a manifest directory changes: Linux inotify through libc.

The directory source (agent/k8s/directory.py) walks its tree on every scan;
a `Watcher` lets it scan as soon as something in that tree changes instead
of at the next poll. It watches exactly what the last walk visited (every
directory, and every file reached through a symbolic link, whose target may
live outside the tree), re-adding each path after every walk, so a directory
or link that was replaced is watched again under its new inode and one that
went away stops being watched. It never decides what changed: any event
means "scan again", and the walk decides, with all its bounds and checks.

`wait(timeout)` returns once events have come and then stopped for
`quiet` seconds (at most `max_delay` after the first), so a burst of writes
(an editor saving, `kubectl apply` of many files, a ConfigMap update
swapping its `..data` link) costs one scan, not one per event.

Only ctypes and the standard library: no new dependency. Where inotify is
not available (no libc support, the per-user instance limit reached) the
caller keeps polling; where a watch cannot be added (the per-user watch
limit) `problems` says so and polling covers what is not watched.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
import time
from typing import Iterable, Optional

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000

# What changes a manifest or the tree: content, names, links, permissions
# (a file that becomes unreadable), and the watched object itself going.
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
        | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)

_EVENT = struct.Struct("iIII")        # struct inotify_event: wd, mask, cookie, len


class Unavailable(OSError):
    """inotify cannot be used here; the caller polls."""


def _libc():
    lib = ctypes.CDLL(None, use_errno=True)
    for name in ("inotify_init1", "inotify_add_watch", "inotify_rm_watch"):
        if not hasattr(lib, name):
            raise Unavailable(errno.ENOSYS, f"libc has no {name}")
    lib.inotify_init1.argtypes = [ctypes.c_int]
    lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return lib


class Watcher:
    """One inotify instance following a set of paths (see the module docstring)."""

    def __init__(self, quiet: float = 0.005, max_delay: float = 0.05, libc=None):
        self.quiet = quiet
        self.max_delay = max_delay
        self._lib = libc if libc is not None else _libc()
        fd = self._lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise Unavailable(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        # woken by close(), so a waiting thread returns at once
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._wds: dict[str, int] = {}       # path -> watch descriptor
        self.problems: dict[str, str] = {}    # key -> message (watch failures)
        self.events = 0                       # events read, for tests and status
        self.overflows = 0
        self.closed = False

    # ------------------------------------------------------------ watches
    def follow(self, dirs: Iterable[str], files: Iterable[str] = ()) -> None:
        """Watch exactly these paths from now on (absolute): directories
        (refused if the path is no longer one) and files."""
        want = {p: IN_ONLYDIR for p in dirs}
        for p in files:
            want.setdefault(p, 0)
        problems: dict[str, str] = {}
        with self._lock:
            if self.closed:
                return
            new: dict[str, int] = {}
            for path, flags in want.items():
                wd = self._lib.inotify_add_watch(self._fd, os.fsencode(path), MASK | flags)
                if wd < 0:
                    err = ctypes.get_errno()
                    if err in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        continue         # gone or replaced since the walk: the event is coming
                    if err == errno.ENOSPC:
                        problems["limit"] = ("the inotify watch limit is reached (fs.inotify."
                                             "max_user_watches): what is not watched is seen "
                                             "by polling")
                    else:
                        problems[f"watch:{path}"] = (f"cannot watch {path}: {os.strerror(err)}; "
                                                     "its changes are seen by polling")
                    continue
                new[path] = wd
            # a watch whose inode no path of the walk leads to any more
            for wd in set(self._wds.values()) - set(new.values()):
                self._lib.inotify_rm_watch(self._fd, wd)
            self._wds = new
        self.problems = problems

    @property
    def watching(self) -> int:
        return len(set(self._wds.values()))

    # ------------------------------------------------------------- events
    def _drain(self) -> bool:
        """Read every pending event; True if any counts as a change."""
        changed = False
        while True:
            try:
                buf = os.read(self._fd, 64 << 10)
            except BlockingIOError:
                return changed
            except OSError:
                return changed
            if not buf:
                return changed
            off = 0
            while off + _EVENT.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                off += _EVENT.size + length
                self.events += 1
                if mask & IN_Q_OVERFLOW:
                    self.overflows += 1      # events were lost: a scan finds out what
                if mask & IN_IGNORED and not mask & ~IN_IGNORED:
                    continue                  # a watch went (ours removed it, or the
                                              # deletion that ended it came with its own event)
                changed = True

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds for a change; True once one came
        and the tree has been quiet for `quiet` seconds (or `max_delay`
        passed since the first), False on timeout or close."""
        p = select.poll()
        p.register(self._fd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        deadline = time.monotonic() + timeout
        first: Optional[float] = None
        while not self.closed:
            now = time.monotonic()
            if first is None:
                left = deadline - now
                if left <= 0:
                    return False
            else:
                left = min(self.quiet, first + self.max_delay - now)
                if left <= 0:
                    return True
            try:
                ready = p.poll(left * 1e3)
            except InterruptedError:
                continue
            if not ready:
                if first is not None:
                    return True          # quiet since the last event
                continue
            if any(fd == self._wake_r for fd, _ in ready):
                return False
            if self._drain() and first is None:
                first = time.monotonic()
        return False

    def close(self) -> None:
        """Stop: a thread in wait() returns. The descriptors stay open until
        release(), so they are never closed under a waiting thread's feet."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def release(self) -> None:
        """Close the descriptors; call after the waiting thread is gone."""
        for fd in (self._fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = self._wake_r = self._wake_w = -1
