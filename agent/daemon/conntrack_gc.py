"""The agent's conntrack loops: the periodic sweep of expired entries and
the purge of removed backends' flows. What goes is agent/conntrack's
decision (gc.sweep, purge.purge_backends); these threads run it and report
to the metrics."""
from __future__ import annotations

import logging
import time

from agent.conntrack.gc import sweep
from agent.daemon.worker import Purger
from agent.conntrack.purge import purge_backends
from agent.daemon.worker import Worker
from agent.model.conntrack import Lifetimes

log = logging.getLogger("fastpath.conntrack")


class ConntrackGC(Worker):
    """Sweeps entries past their lifetime every `interval` seconds."""

    def __init__(self, ct, *, interval: float, lifetimes: Lifetimes, metrics=None):
        self.ct = ct
        self.interval = interval
        self.lifetimes = lifetimes
        self.metrics = metrics
        self.runs = 0
        self.removed = 0
        Worker.__init__(self, "conntrack-gc")

    def start(self) -> "ConntrackGC":
        if self.interval > 0:
            self._thread.start()
        return self

    def run_once(self) -> int:
        t0 = time.monotonic()
        n = sweep(self.ct, time.monotonic_ns(), self.lifetimes)
        secs = time.monotonic() - t0
        self.runs += 1
        self.removed += n
        if self.metrics is not None:
            self.metrics.observe_gc(secs, n)
        if n:
            log.info("conntrack GC: removed %d expired entries in %.3fs", n, secs)
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:         # the next sweep tries again
                log.exception("conntrack GC sweep failed")


class ConntrackPurger(Purger):
    """Purges the datagram flows of removed backends (`purge_backends`),
    right after the plan that removed them, off the plan's path.

    Correctness does not wait for it: a UDP packet whose forward entry
    names a backend id that no longer resolves is re-balanced at once, and
    a released id is not reused before many more ids have been allocated
    (the reconciler's quarantine). The walk keeps the tables clean; it
    reads every translated flow, so removals that arrive together are
    purged in one pass."""

    name = "conntrack purge of removed backends"

    def __init__(self, ct, metrics=None, settle: float = 0.02):
        super().__init__(settle)
        self.ct = ct
        self.metrics = metrics
        self.purged = 0

    def _purge(self, ids: set) -> None:
        n = purge_backends(self.ct, ids)
        self.purged += n
        if self.metrics is not None:
            self.metrics.observe_backend_flows_removed(n)
        if n:
            log.info("conntrack: %d entries of %d removed backends' datagram flows deleted",
                     n, len(ids))


__all__ = ["ConntrackGC", "ConntrackPurger"]
