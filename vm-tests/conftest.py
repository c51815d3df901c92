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


@pytest.fixture
def world():
    """An empty simulated VPC, removed after the test whatever its outcome."""
    with World() as w:
        yield w


@pytest.fixture
def node(world):
    """One node with one ENI (eth1) and no pods yet."""
    return world.add_node("n1", enis=1)
