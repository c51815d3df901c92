"""Network namespaces for simulated nodes: commands inside them, and cleanup.

A `Netns` is a named namespace created with `ip netns add`, so it has a path
under /var/run/netns/ that a CNI runtime can take as CNI_NETNS. Commands run
through `ip netns exec` (processes) or `ip -n` (iproute2 itself), never by
switching the calling thread's namespace, so the harness is safe to use from
any thread and never leaves the caller in the wrong namespace.

Liveness of a world is a lock, not a pid: each world holds an exclusive flock
on /run/fastpath-sim/<prefix><tag>.lock for its whole life. The kernel drops it
when the owner dies however it dies (even SIGKILL), so `cleanup_stale` can tell
a dead world's leftovers from a live world of a test running in parallel.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import plan

NETNS_DIR = Path("/var/run/netns")
LOCK_DIR = Path("/run/fastpath-sim")
DEFAULT_TIMEOUT = 30.0


class CommandError(subprocess.CalledProcessError):
    """A failed command, with its stderr in the message (iproute2 explains itself there)."""

    def __str__(self) -> str:
        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(map(str, self.cmd))
        err = (self.stderr or "").strip()
        return f"`{cmd}` exited {self.returncode}" + (f": {err}" if err else "")


Cmd = Sequence[str] | str


def _argv(cmd: Cmd) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def sh(cmd: Cmd, *, check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
       input: str | None = None) -> subprocess.CompletedProcess:
    argv = _argv(cmd)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise CommandError(r.returncode, argv, r.stdout, r.stderr)
    return r


def ip_batch(ns: str | None, lines: Sequence[str], family: int = 0) -> list:
    """Run iproute2 commands in one process (a pod takes a dozen of them).

    Output is JSON: end the batch with one `... show` line to get that
    object's state back without another process; returns it parsed ([] if
    the batch shows nothing). `family` 6 runs the batch as `ip -6` (rules
    do not tell the family from their addresses).
    """
    if not lines:
        return []
    argv = (["ip", "-j"] + ([f"-{family}"] if family else []) + (["-n", ns] if ns else [])
            + ["-batch", "-"])
    r = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True,
                       text=True, timeout=DEFAULT_TIMEOUT)
    if r.returncode != 0:
        raise CommandError(r.returncode, argv + ["<<", *lines], r.stdout, r.stderr)
    return json.loads(r.stdout) if r.stdout.strip() else []


def list_netns() -> list[str]:
    r = sh(["ip", "-j", "netns", "list"], check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return [e["name"] for e in json.loads(r.stdout)]


def kill_pids(pids: Sequence[int], grace: float = 1.0) -> None:
    """TERM, then KILL whatever is still there after `grace` seconds."""
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        if pids:
            time.sleep(0.02)
    for p in pids:
        _signal(p, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    # A zombie child of ours still has a /proc entry; reap it if it is ours.
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def pids_in(names: Sequence[str]) -> list[int]:
    """Processes whose network namespace is one of `names` (one pass over /proc)."""
    want = set()
    for n in names:
        try:
            st = os.stat(NETNS_DIR / n)
        except FileNotFoundError:
            continue
        want.add((st.st_dev, st.st_ino))
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = os.stat(f"/proc/{d}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in want:
                pids.append(int(d))
    return pids


def _flush_links(name: str) -> None:
    r = sh(["ip", "-j", "-n", name, "link", "show"], check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return
    links = [l["ifname"] for l in json.loads(r.stdout) if l["ifname"] != "lo"]
    # -force: carry on past misses (deleting one end of a veth removes the
    # other, which may live in this same netns).
    if links:
        subprocess.run(["ip", "-force", "-n", name, "-batch", "-"], capture_output=True,
                       input="".join(f"link del {l}\n" for l in links), text=True,
                       timeout=DEFAULT_TIMEOUT)


def delete_many(names: Sequence[str], *, sync_links: bool = False) -> list[str]:
    """Kill what runs inside `names`, then delete the netns (a few processes
    in all, whatever their number). Returns the names still there after.

    Their links go with them, asynchronously: the kernel tears namespaces down
    on a workqueue, in batches. With `sync_links` the links are deleted first,
    so every veth is gone from both ends (and programs attached to it are
    released) when this returns; that costs ~20 ms per veth (an RCU grace
    period each), which is why a whole world does not ask for it.
    """
    names = [n for n in names if (NETNS_DIR / n).exists()]
    if not names:
        return []
    kill_pids(pids_in(names))
    if sync_links:
        for n in names:
            _flush_links(n)
    subprocess.run(["ip", "-force", "-batch", "-"], capture_output=True, text=True,
                   input="".join(f"netns del {n}\n" for n in names), timeout=DEFAULT_TIMEOUT * 4)
    return [n for n in names if (NETNS_DIR / n).exists()]


def delete_netns(name: str) -> None:
    """One netns, its links deleted synchronously; raises if it is still there after."""
    if delete_many([name], sync_links=True):
        r = sh(["ip", "netns", "del", name], check=False)
        raise CommandError(r.returncode or 1, ["ip", "netns", "del", name], r.stdout, r.stderr)


class Netns:
    """A network namespace this harness created; commands run inside it."""

    def __init__(self, name: str):
        self.netns = name
        self.netns_path = str(NETNS_DIR / name)
        self._procs: list[subprocess.Popen] = []

    # -- creation ----------------------------------------------------------
    def _create(self, sysctls: dict[str, str | int] | None = None, lo: bool = True) -> None:
        sh(["ip", "netns", "add", self.netns])
        if lo:
            ip_batch(self.netns, ["link set lo up"])
        if sysctls:
            self.sysctl(sysctls)

    # -- commands ----------------------------------------------------------
    def run(self, cmd: Cmd, check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` inside the netns; text output captured; raises CommandError if check."""
        return sh(["ip", "netns", "exec", self.netns, *_argv(cmd)],
                  check=check, timeout=timeout, input=input)

    def popen(self, cmd: Cmd, **kwargs) -> subprocess.Popen:
        """Start a long-running process (a server) inside the netns.

        The world stops it on exit; pass stdout/stderr as for subprocess.Popen
        (default: discarded, so an unread pipe never blocks a server).
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(["ip", "netns", "exec", self.netns, *_argv(cmd)], **kwargs)
        self._procs.append(p)
        return p

    def iproute(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`ip -n <netns> ARGS...` (not named `ip`: pods and nodes have an `ip` address)."""
        return sh(["ip", "-n", self.netns, *args], check=check)

    def ip_json(self, *args: str) -> list[dict]:
        out = sh(["ip", "-j", "-n", self.netns, *args]).stdout.strip()
        return json.loads(out) if out else []

    def sysctl(self, values: dict[str, str | int]) -> None:
        self.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    def sysctl_get(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    def link(self, ifname: str) -> dict:
        """iproute2's JSON for one link (ifindex, address, flags, ...)."""
        return self.ip_json("link", "show", "dev", ifname)[0]

    def wait_port(self, port: int, *, udp: bool = False, timeout: float = 5.0) -> None:
        """Block until something listens on `port` in this netns (servers start asynchronously)."""
        flags = "-Hlun" if udp else "-Hltn"
        deadline = time.monotonic() + timeout
        while True:
            if self.run(["ss", flags, f"sport = :{port}"]).stdout.strip():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {'udp' if udp else 'tcp'}/{port} in {self.netns}")
            time.sleep(0.02)

    def ping(self, dst: str, *, count: int = 2, deadline: float = 3.0,
             check: bool = True) -> subprocess.CompletedProcess:
        """ICMP echo to `dst` from this netns. BusyBox's ping, because the
        machine set-up installs busybox-static and no other ping."""
        cmd = ["busybox", "ping", "-c", str(count), "-i", "0.2", "-w", str(int(max(1, deadline))), dst]
        return self.run(cmd, check=check, timeout=deadline + 5)

    def pids(self) -> list[int]:
        return pids_in([self.netns])

    # -- teardown ----------------------------------------------------------
    def _stop_procs(self) -> None:
        # Through the Popen objects (not kill_pids) so their return codes stay true.
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + 1.0
        for p in live:
            try:
                p.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()

    def _destroy(self) -> None:
        self._stop_procs()
        delete_netns(self.netns)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.netns}>"


# -- world locks -------------------------------------------------------------

def lock_path(prefix: str, tag: str) -> Path:
    return LOCK_DIR / f"{prefix}{tag}.lock"


def acquire_lock(prefix: str, tag: str) -> int | None:
    """Take `tag` for this process; None if another world (live or dead) holds the name.

    The file is locked before it becomes visible (flock a temp file, then
    link it into place), so cleanup_stale never sees an unlocked lock of a
    world that is starting.
    """
    LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=LOCK_DIR, prefix=".new-")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            os.link(tmp, lock_path(prefix, tag))
        except FileExistsError:
            os.close(fd)
            return None
        return fd
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.unlink(tmp)


def release_lock(prefix: str, tag: str, fd: int) -> None:
    try:
        os.unlink(lock_path(prefix, tag))
    except FileNotFoundError:
        pass
    os.close(fd)


def _lock_if_dead(path: Path) -> int | None:
    """An fd holding the lock at `path` if its world is dead, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    # The file may have been replaced by a new world between open and flock.
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def cleanup_stale(prefix: str = plan.PREFIX) -> list[str]:
    """Remove what dead worlds left behind; never touches a live world.

    A world is dead when nobody holds its lock (or it has no lock at all: a
    world takes the lock before it creates anything and drops it last). Its
    processes are killed, its namespaces deleted (their veths go with them),
    and any link carrying its tag in the current netns is deleted (a world
    never creates one there; this only guards against a crash mid-move).
    Returns the names removed.
    """
    name_re = plan.world_name_re(prefix)
    removed: list[str] = []
    by_tag: dict[str, list[str]] = {}
    for ns in list_netns():
        m = name_re.match(ns)
        if m:
            by_tag.setdefault(m.group(1), []).append(ns)
    links: dict[str, list[str]] = {}
    r = sh(["ip", "-j", "link", "show"], check=False)
    for link in json.loads(r.stdout or "[]"):
        m = name_re.match(link.get("ifname", ""))
        if m:
            links.setdefault(m.group(1), []).append(link["ifname"])
    lock_tags = set()
    if LOCK_DIR.is_dir():
        for p in LOCK_DIR.glob(f"{prefix}*.lock"):
            tag = p.name[len(prefix):-len(".lock")]
            if plan.TAG_RE.match(tag):
                lock_tags.add(tag)
    for tag in sorted(set(by_tag) | set(links) | lock_tags):
        path = lock_path(prefix, tag)
        fd = None
        if path.exists():
            fd = _lock_if_dead(path)
            if fd is None:
                continue        # a live world (or one just replaced): hands off
        try:
            names = by_tag.get(tag, [])
            failed = delete_many(names)
            removed += [n for n in names if n not in failed]
            for ifname in links.get(tag, []):
                if sh(["ip", "link", "del", ifname], check=False).returncode == 0:
                    removed.append(ifname)
        finally:
            if fd is not None:
                release_lock(prefix, tag, fd)
    return removed
