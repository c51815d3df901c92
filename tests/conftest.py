"""Shared fixtures for tests/: a private bpffs and throwaway network namespaces.

Nothing here touches the machine's own interfaces, root cgroup or root-netns
sysctls: every device lives in a netns the fixture creates and deletes.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import tempfile

import pytest


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True)


@pytest.fixture(scope="session")
def bpffs():
    """A private bpf filesystem for pinned maps, unmounted at the end."""
    d = tempfile.mkdtemp(prefix="fp-bpffs-")
    sh(f"mount -t bpf bpf {d}")
    try:
        yield d
    finally:
        sh(f"umount {d}", check=False)
        os.rmdir(d)


@pytest.fixture
def netns():
    """Factory for throwaway netns, all deleted at teardown."""
    made = []

    def make(label: str = "t") -> str:
        name = f"fpt-{label}-{secrets.token_hex(3)}"
        sh(f"ip netns add {name}")
        made.append(name)
        sh(f"ip -n {name} link set lo up")
        return name

    try:
        yield make
    finally:
        for name in made:
            sh(f"ip netns del {name}", check=False)


# Where the program tests (tests/bpf) build and pin the datapath: also the
# build every decoding test reads the compiled layouts from (`compiled`).
BPF_SERVICE_CIDR = "192.168.0.0/16"


def bpf_config(bpffs: str):
    from agent.config import Config
    return Config.defaults().replace(bpffs_root=f"{bpffs}/fastpath",
                                     service_cidrs=BPF_SERVICE_CIDR)


@pytest.fixture(scope="session")
def compiled(bpffs):
    """The layouts of the compiled programs: a schema (agent/datapath/
    tables.py) over their BTF, which the CLI decodes with too. Built once
    a session with tests/bpf's options and pin root, so whichever of the
    two comes first compiles and the other opens the pinned programs."""
    from agent.datapath import Datapath, tables
    d = Datapath(bpf_config(bpffs), test_build=True).load(reader=True)
    try:
        return tables.program_schema(d.prog_fd("fp_to_vpc"))
    finally:
        d.close()
