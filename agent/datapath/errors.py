"""Errors the datapath reports to people: what failed, and how to fix it."""
from __future__ import annotations


class DatapathError(RuntimeError):
    """A failure with a message fit for an operator (no traceback needed)."""


class NotPrivileged(DatapathError):
    pass


class NoBpfSupport(DatapathError):
    pass


class MissingKernelHeaders(DatapathError):
    pass


class VerifierRejected(DatapathError):
    def __init__(self, program: str, log_tail: str):
        self.program = program
        self.log_tail = log_tail
        super().__init__(f"the kernel verifier rejected program {program}:\n{log_tail}")


class InterfaceNotFound(DatapathError):
    def __init__(self, ifname: str, netns: str | None = None):
        where = f" in netns {netns}" if netns else ""
        super().__init__(f"interface {ifname!r} not found{where}")
        self.ifname = ifname


class PinnedMapMismatch(DatapathError):
    pass
