"""Shared fixtures for end-to-end tests on simulated Terway nodes.

Every test builds its own world (agent.sim.World): namespaces and veths that
exist only for that test and carry its world's tag, so tests from several
engineers run side by side on one machine. These tests need root; they fail,
never skip, without it, because a skipped end-to-end test proves nothing.

The harness, shared with the demo and the benchmarks, lives in agent/sim:
nodes and pods (World, Node.add_pod), an agent in process (agent.sim.agent.
sim_attach) or as a process with its manifest directory and the CLI beside
it (node_agent, NodeAgent), the cluster's objects (agent.sim.manifests:
Namespaces, Pods, Services with affinity and several ports, EndpointSlices
with ready, not-ready and terminating endpoints, annotations, ingress
NetworkPolicies; `write` replaces a file at once), real traffic
(agent.sim.traffic) and cgroup v2 children (agent.sim.cgroups, the `cgroup`
fixture below). The program sets agents leave are kept for later agents
with the same options (agent.sim.setpool, the `program_sets` fixture
below), so that most agents open a set instead of compiling one. fastpath_helpers holds what only the vm-tests read
(counters by reason, truncated frames, wait_for).
"""
import os

import pytest

from agent.sim import World, cgroups, cleanup_stale


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("vm-tests need root (network namespaces, veths, BPF)")
    # Leftovers of runs that were killed outright (SIGKILL, OOM) would only
    # waste memory, but sweeping them here keeps the machine tidy; live
    # worlds of parallel runs hold their lock and are left alone.
    cleanup_stale()
    cgroups.sweep_stale_mounts()


@pytest.fixture(scope="session", autouse=True)
def program_sets():
    """The program sets agents leave, kept for later agents with the same
    options (agent.sim.setpool): an agent on a fresh bpffs opens one, empty,
    instead of compiling ~10 s itself."""
    from agent.sim.setpool import SetPool
    with SetPool() as pool:
        _POOLS.append(pool)
        yield pool


_POOLS = []


def pytest_terminal_summary(terminalreporter):
    for pool in _POOLS:
        terminalreporter.write_line(f"program sets: {pool.hits} agents opened one an earlier "
                                    f"agent left, {pool.misses} compiled their own")


@pytest.fixture
def world():
    """An empty simulated VPC, removed after the test whatever its outcome."""
    with World() as w:
        yield w


@pytest.fixture
def node(world):
    """One node with one ENI (eth1) and no pods yet."""
    return world.add_node("n1", enis=1)


@pytest.fixture
def cgroup():
    """A cgroup v2 child of the test's own (socket-LB attaches there, never
    to the root), removed with whatever is left in it after the test."""
    with cgroups.child() as path:
        yield path
