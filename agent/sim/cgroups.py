"""cgroup v2 children for tests and benchmarks that attach socket-LB: always
a child of their own, never the machine's root cgroup, and removed with
whatever is left in it, also when the test failed."""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import tempfile
import time

CGROUP2 = "/sys/fs/cgroup/unified"
# private_mount's directories: /tmp/fp-cg2-<pid of the test process>-*
MOUNT_PREFIX = "fp-cg2-"


def remove(path: str, timeout: float = 5.0) -> None:
    """Kill what is left in a cgroup and remove it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
        with open(f"{path}/cgroup.kill", "w") as f:     # kernel >= 5.14
            f.write("1")
        time.sleep(0.05)


@contextlib.contextmanager
def child(prefix: str = "fp-test-"):
    """A new child of the machine's cgroup2 hierarchy, for the commands a
    test runs in it (`echo $$ > <path>/cgroup.procs && ...`)."""
    path = f"{CGROUP2}/{prefix}{secrets.token_hex(3)}"
    os.mkdir(path)
    try:
        yield path
    finally:
        remove(path)


@contextlib.contextmanager
def private_mount():
    """A cgroup v2 child of the test's own, reached through a cgroup2 mount
    in a temporary directory: `ip netns exec` mounts a fresh /sys for the
    commands it runs, which hides /sys/fs/cgroup from the agent and the CLI.
    On the way out, whatever happened: processes still in the child are
    killed, the child removed, the mount detached. The mount's name carries
    this process's pid, so a run killed outright is swept by the next one
    (sweep_stale_mounts)."""
    mnt = tempfile.mkdtemp(prefix=f"{MOUNT_PREFIX}{os.getpid()}-")
    try:
        subprocess.run(["mount", "-t", "cgroup2", "none", mnt], check=True)
        path = f"{mnt}/fp-test-{secrets.token_hex(3)}"
        os.mkdir(path)
        try:
            yield path
        finally:
            remove(path)
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
        os.rmdir(mnt)


def sweep_stale_mounts() -> None:
    """private_mount's mounts whose test process is gone: kill what is left
    in their children, remove the children, detach the mounts."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f]
    for mnt in mounts:
        m = re.fullmatch(rf"/tmp/{MOUNT_PREFIX}(\d+)-\w+", mnt)
        if not m or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        for name in os.listdir(mnt):
            path = f"{mnt}/{name}"
            if not name.startswith("fp-") or not os.path.isdir(path):
                continue
            try:
                with open(f"{path}/cgroup.kill", "w") as k:
                    k.write("1")
                time.sleep(0.1)
                os.rmdir(path)
            except OSError:
                pass
        subprocess.run(["umount", "-l", mnt], check=False)
        try:
            os.rmdir(mnt)
        except OSError:
            pass
