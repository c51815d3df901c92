"""Run a block of code with the calling thread inside another network
namespace (setns), and come back even when the block fails.

BPF_PROG_TEST_RUN resolves the context's ifindex and does FIB lookups in
the caller's netns, so a test run for a simulated node must be made from
inside that node's netns.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/var/run/netns/{netns}"


@contextlib.contextmanager
def in_netns(netns: str | None):
    if netns is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path(netns), os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
