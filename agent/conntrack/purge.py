"""What happens to the flows of a backend that left its Service.

Connection flows (TCP, SCTP) are kept: they go on to the address their
entry names until the backend (or the client) closes them, as kube-proxy
leaves established connections alone; their entries go when the flow
closes or idles out. A mid-stream packet never picks another backend
(bpf/lib/ct.h). Datagram flows (UDP and the rest) of a removed backend are
deleted, both directions, so that their next datagram picks a live backend
(the datapath re-balances such a flow at once anyway when its backend id no
longer resolves; the purge gives the entries back). Connected UDP sockets
socket-LB sent to a removed backend are closed elsewhere
(agent.services.UdpSocketReaper).

`plan()` is pure over entries; `purge_backends()` and `ConntrackPurger`
use the datapath's conntrack maps object (agent.datapath.maps.CtMaps).
"""
from __future__ import annotations

import logging
import threading
import time

from agent.conntrack.model import CONNECTION_PROTOCOLS

log = logging.getLogger("fastpath.conntrack")


def plan(nat: dict[str, list[tuple]], backend_ids) -> dict[str, list]:
    """{table: [CtKey]} to delete: both entries of every datagram flow on
    one of `backend_ids`. `nat`: {table: [(CtKey, CtValue)]}."""
    ids = set(backend_ids)
    return {table: [k for k, v in entries
                    if v.backend_id in ids and k.proto not in CONNECTION_PROTOCOLS]
            for table, entries in nat.items()}


def purge_backends(ct, backend_ids) -> int:
    """Delete the datagram flows of removed backends from `ct` (a CtMaps).
    Returns how many entries were deleted."""
    ids = set(backend_ids)
    if not ids:
        return 0
    doomed = plan({t: ct.nat_entries(t) for t in ct.NAT_TABLES}, ids)
    return sum(ct.delete(table, keys) for table, keys in doomed.items())


class ConntrackPurger:
    """Purges the datagram flows of removed backends (`purge_backends`),
    right after the plan that removed them, off the plan's path.

    Correctness does not wait for it: a UDP packet whose forward entry
    names a backend id that no longer resolves is re-balanced at once, and
    a released id is not reused before many more ids have been allocated
    (the reconciler's quarantine). The walk keeps the tables clean; it
    reads every translated flow, so removals that arrive together are
    purged in one pass."""

    def __init__(self, ct, metrics=None, settle: float = 0.02):
        self.ct = ct
        self.metrics = metrics
        self.settle = settle
        self.purged = 0
        self.passes = 0
        self._pending: set[int] = set()
        self._cond = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, backend_ids) -> None:
        with self._cond:
            self._pending.update(backend_ids)
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ct-purge", daemon=True)
                self._thread.start()
            self._cond.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every backend added so far has been purged."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopped)
                if self._stopped and not self._pending:
                    return
            time.sleep(self.settle)           # let the rest of a burst arrive
            with self._cond:
                ids, self._pending = self._pending, set()
            try:
                n = purge_backends(self.ct, ids)
                self.purged += n
                self.passes += 1
                if self.metrics is not None:
                    self.metrics.observe_backend_flows_removed(n)
                if n:
                    log.info("conntrack: %d entries of %d removed backends' datagram flows "
                             "deleted", n, len(ids))
            except Exception:      # keep them for another pass a moment later
                log.exception("conntrack purge of removed backends failed")
                with self._cond:
                    self._pending |= ids
                time.sleep(1)
                continue
            with self._cond:
                if not self._pending:
                    self._idle.set()


__all__ = ["ConntrackPurger", "plan", "purge_backends"]
