"""The agent's periodic conntrack sweep (a Worker thread): agent/conntrack.py
decides what is idle; this loop runs it every `conntrack_gc_interval`
seconds and reports to the metrics."""
from __future__ import annotations

import logging
import time

from agent.conntrack import sweep
from agent.daemon.worker import Worker

log = logging.getLogger("fastpath.conntrack")


class ConntrackGC(Worker):
    """The agent's periodic sweep (a daemon thread)."""

    def __init__(self, lb, *, interval: float, tcp_idle: float, other_idle: float,
                 hairpin_ip: str, metrics=None, lock=None):
        self.lb = lb
        self.interval = interval
        self.tcp_idle_ns = int(tcp_idle * 1e9)
        self.other_idle_ns = int(other_idle * 1e9)
        self.hairpin_ip = hairpin_ip
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
        n = sweep(self.lb.conntrack_table(), time.monotonic_ns(), self.tcp_idle_ns,
                  self.other_idle_ns, self.hairpin_ip)
        secs = time.monotonic() - t0
        self.runs += 1
        self.removed += n
        if self.metrics is not None:
            self.metrics.observe_gc(secs, n)
        if n:
            log.info("conntrack GC: removed %d idle entries in %.3fs", n, secs)
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:         # the next sweep tries again
                log.exception("conntrack GC sweep failed")


__all__ = ["ConntrackGC"]
