"""Shared fixtures for end-to-end tests on simulated Terway nodes.

Every test builds its own world (agent.sim.World): namespaces and veths that
exist only for that test and carry its world's tag, so tests from several
engineers run side by side on one machine. These tests need root; they fail,
never skip, without it, because a skipped end-to-end test proves nothing.
"""
import os

import pytest

from agent.sim import World, cleanup_stale


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("vm-tests need root (network namespaces, veths, BPF)")
    # Leftovers of runs that were killed outright (SIGKILL, OOM) would only
    # waste memory, but sweeping them here keeps the machine tidy; live
    # worlds of parallel runs hold their lock and are left alone.
    cleanup_stale()
    sweep_stale_cgroup_mounts()


def sweep_stale_cgroup_mounts() -> None:
    """cgroup2 mounts of test_node_agent.private_cgroup (/tmp/fp-cg2-<pid>-*)
    whose test process is gone: kill what is left in their children, remove
    the children, detach the mounts."""
    import re
    import subprocess
    import time
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f]
    for mnt in mounts:
        m = re.fullmatch(r"/tmp/fp-cg2-(\d+)-\w+", mnt)
        if not m or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        for child in os.listdir(mnt):
            path = f"{mnt}/{child}"
            if not child.startswith("fp-") or not os.path.isdir(path):
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


@pytest.fixture
def world():
    """An empty simulated VPC, removed after the test whatever its outcome."""
    with World() as w:
        yield w


@pytest.fixture
def node(world):
    """One node with one ENI (eth1) and no pods yet."""
    return world.add_node("n1", enis=1)
