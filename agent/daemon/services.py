"""Keep the datapath's service maps equal to what the cluster state says.

Cluster state (agent/k8s store) -> agent.lb.compile (kube-proxy's choices)
-> agent.lb.reconcile (ordered minimal map writes) -> the pinned service
maps. The first plan waits for the source's initial sync: an agent that
restarts with an empty store must not withdraw every Service it is still
serving. After that, each change set recompiles only the Services it
touches (agent.lb.table), and bursts are coalesced into one plan; a change
of this node's zone label rebuilds everything (topology hints depend on it).
"""
from __future__ import annotations

import logging
import threading
import time

from agent.lb.compile import Backend, Frontend
from agent.lb.reconcile import (DeleteBackend, DeleteService, DeleteSlots, PutBackend,
                                PutService, PutSlots, Reconciler, ServiceEntry)
from agent.lb.table import ServiceTable
from agent.daemon.worker import Worker, settle_gc

log = logging.getLogger("fastpath.services")


def apply_op(lb, op) -> int:
    """One reconciler operation as one or more map writes. Returns the
    conntrack entries it removed (those of a deleted backend)."""
    if isinstance(op, PutBackend):
        b = op.backend
        lb.put_backend(op.backend_id, b.ip, b.port, b.protocol)
    elif isinstance(op, PutSlots):
        lb.put_slots(op.service_id, op.slots, op.first)
    elif isinstance(op, PutService):
        fe = op.frontend
        lb.put_service(fe.ip, fe.port, fe.protocol, op.service_id, op.count, op.flags,
                       op.affinity_timeout)
    elif isinstance(op, DeleteService):
        fe = op.frontend
        lb.delete_service(fe.ip, fe.port, fe.protocol)
    elif isinstance(op, DeleteSlots):
        lb.delete_slots(op.service_id, op.from_slot, op.to_slot)
    elif isinstance(op, DeleteBackend):
        lb.delete_backend(op.backend_id)
        # its flows must not linger (UDP would keep hitting a dead address)
        return lb.conntrack_delete_backend(op.backend_id)
    else:
        raise TypeError(f"unknown service map operation {op!r}")
    return 0


_BATCHED = (PutBackend, PutSlots, PutService)


def apply_ops(lb, ops) -> list[int]:
    """A plan's operations in order, runs of one kind of write as one
    batched map update (the kernel applies a batch's entries in order, so
    the plan's order holds entry by entry). Returns the removed backends'
    ids (their conntrack entries are for the purger)."""
    removed: list[int] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if isinstance(op, _BATCHED):
            j = i + 1
            while j < len(ops) and type(ops[j]) is type(op):
                j += 1
            if j - i > 1:
                _apply_batch(lb, ops[i:j])
                i = j
                continue
        if isinstance(op, DeleteBackend):
            lb.delete_backend(op.backend_id)
            removed.append(op.backend_id)
        else:
            apply_op(lb, op)
        i += 1
    return removed


def _apply_batch(lb, run) -> None:
    op = run[0]
    if isinstance(op, PutBackend):
        lb.put_backends([(o.backend_id, o.backend.ip, o.backend.port, o.backend.protocol)
                         for o in run])
    elif isinstance(op, PutSlots):
        lb.put_slot_runs([(o.service_id, o.slots, o.first) for o in run])
    else:
        lb.put_services([(o.frontend.ip, o.frontend.port, o.frontend.protocol, o.service_id,
                          o.count, o.flags, o.affinity_timeout) for o in run])


class ConntrackPurger:
    """Deletes the conntrack entries of removed backends, right after the
    plan that removed them, off the plan's path.

    Correctness does not wait for it: a packet whose forward entry names a
    backend id that no longer resolves is re-balanced at once (UDP flows
    move on their next datagram), and a released id is not reused before
    many more ids have been allocated (the reconciler's quarantine). The
    walk keeps the table clean; it reads the whole map (about 1.5 us per
    entry here), so removals that arrive together are purged in one pass."""

    def __init__(self, lb, metrics=None, settle: float = 0.02):
        self.lb = lb
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
                n = self.lb.conntrack_delete_backends(ids)
                self.purged += n
                self.passes += 1
                if self.metrics is not None:
                    self.metrics.observe_backend_flows_removed(n)
                if n:
                    log.info("conntrack: %d entries of %d removed backends deleted", n, len(ids))
            except Exception:      # keep them for another pass a moment later
                log.exception("conntrack purge of removed backends failed")
                with self._cond:
                    self._pending |= ids
                time.sleep(1)
                continue
            with self._cond:
                if not self._pending:
                    self._idle.set()


def restore_reconciler(lb) -> Reconciler:
    """A reconciler owning what the pinned maps already hold."""
    services = {Frontend(s["vip"], s["port"], s["proto"]):
                ServiceEntry(s["svc_id"], s["count"], s["affinity_timeout"], s["flags"])
                for s in lb.services()}
    backends = {bid: Backend(ip, port, proto) for bid, (ip, port, proto) in lb.backends().items()}
    return Reconciler.restore(services, lb.all_slots(), backends)


class ServiceSync(Worker):
    def __init__(self, lb, store, source, node_name: str, *, settle: float = 0.05,
                 metrics=None):
        self.lb = lb
        self.metrics = metrics          # agent.metrics.AgentMetrics, or None
        self.store = store
        self.source = source
        self.node_name = node_name
        self.settle = settle
        self.reconciler = restore_reconciler(lb)
        self.table: ServiceTable | None = None     # None: rebuild on the next change
        self.applied_version = -1
        self.last_plan_ops = 0
        self.plans = 0
        self.errors = 0
        # called with {Frontend: {(ip, port)}} of UDP frontends that lost
        # backends, after the plan is written (see UdpSocketReaper)
        self.on_backends_lost = None
        self.purger = ConntrackPurger(lb, metrics)
        Worker.__init__(self, "service-sync")

    def start(self) -> "ServiceSync":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        self.purger.stop()

    def _zone(self, snap) -> str:
        node = snap.nodes.get(("", self.node_name))
        return node.zone if node is not None else ""

    def _udp_backends(self, fe) -> set[tuple[str, int]]:
        rec = self.reconciler
        return {rec.backend_ids.key_of(b)[:2] for b in rec.slots(fe)}

    def _apply(self, updates, version: int) -> int:
        udp = [fe for fe in updates if fe.protocol == "UDP"] if self.on_backends_lost else []
        before = {fe: self._udp_backends(fe) for fe in udp}
        ops = self.reconciler.plan_changes(updates)
        removed = apply_ops(self.lb, ops)
        if removed:
            self.purger.add(removed)
        lost = {fe: gone for fe in udp if (gone := before[fe] - self._udp_backends(fe))}
        if lost:
            try:
                self.on_backends_lost(lost)
            except Exception:      # the maps are right; sockets are best effort
                log.exception("closing UDP sockets of removed backends failed")
        self.applied_version = version
        self.last_plan_ops = len(ops)
        self.plans += 1
        settle_gc(self.plans)
        if ops:
            log.info("services: %d frontends changed, %d map writes (store v%d)",
                     len(updates), len(ops), version)
        return len(ops)

    def sync_once(self) -> int:
        """Full rebuild from the current snapshot (start, zone change)."""
        snap = self.store.snapshot()
        self.table = ServiceTable(self.node_name, self._zone(snap))
        updates = self.table.rebuild(snap)
        # frontends the maps hold that the cluster no longer has
        for fe in self.reconciler.frontends():
            if fe not in self.table.desired:
                updates.setdefault(fe, None)
        return self._apply(updates, snap.version)

    def _run(self) -> None:
        self._follow(self.source, self.store, self.settle, lambda: self._guarded(self.sync_once),
                     lambda changes: self._guarded(lambda: self._sync_changes(changes)))

    def _sync_changes(self, changes) -> int:
        snap = self.store.snapshot()
        if self.table is None or self._zone(snap) != self.table.node_zone:
            return self.sync_once()
        updates = {}
        for cs in changes:
            updates.update(self.table.apply(cs.deltas))
        return self._apply(updates, changes[-1].version)

    def _guarded(self, fn) -> None:
        t0 = time.monotonic()
        try:
            ops = fn()
        except Exception:      # one bad plan must not stop the loop
            self.errors += 1
            log.exception("service sync failed; keeping the maps as they are")
            self.table = None
            if self.metrics is not None:
                self.metrics.observe_sync("Service", time.monotonic() - t0, ok=False)
        else:
            if self.metrics is not None:
                self.metrics.observe_sync("Service", time.monotonic() - t0, ops)


class SocketLbOptOut(Worker):
    """Keep the socket-LB skip map equal to the local pods that opted out
    (agent.lb.optout): their network namespaces, by cookie.

    Refreshed when an endpoint is added or removed (before the CNI ADD
    returns, so the pod's first socket already sees its choice) and when a
    Pod's or Namespace's annotation changes."""

    def __init__(self, skip_map, store, endpoints_fn, cookie_fn=None):
        from agent.datapath.maps import netns_cookie
        self.skip_map = skip_map
        self.store = store
        self.endpoints_fn = endpoints_fn
        self.cookie_fn = cookie_fn or netns_cookie
        self._cookies: dict[tuple[str, str], int] = {}    # (key, netns) -> cookie
        self._lock = threading.Lock()
        self.problems: list[str] = []
        self.refreshes = 0
        Worker.__init__(self, "socklb-optout")

    def start(self) -> "SocketLbOptOut":
        self._thread.start()
        return self

    def _cookie(self, ep) -> int | None:
        k = (ep.key, ep.netns)
        if k not in self._cookies:
            if not ep.netns:
                return None
            try:
                self._cookies[k] = self.cookie_fn(ep.netns)
            except OSError as exc:
                log.warning("socket-LB opt-out: netns %s of %s unreadable: %s",
                            ep.netns, ep.key, exc)
                return None
        return self._cookies[k]

    def refresh(self) -> dict[int, int]:
        """Recompute and write the map; returns {netns cookie: flags}."""
        from agent.lb.optout import opt_outs
        with self._lock:
            endpoints = list(self.endpoints_fn())
            chosen, problems = opt_outs(self.store.snapshot(), endpoints)
            live = {(ep.key, ep.netns) for ep in endpoints}
            for k in list(self._cookies):
                if k not in live:
                    del self._cookies[k]
            want = {}
            for ep in endpoints:
                if ep.key in chosen:
                    cookie = self._cookie(ep)
                    if cookie is not None:
                        want[cookie] = want.get(cookie, 0) | chosen[ep.key]
            written, removed = self.skip_map.set(want)
            for p in set(problems) - set(self.problems):
                log.warning("socket-LB opt-out: %s", p)
            self.problems = problems
            self.refreshes += 1
            if written or removed:
                log.info("socket-LB opt-out: %d pods bypass socket-LB (%d written, %d removed)",
                         len(want), written, removed)
            return want

    def _run(self) -> None:
        from agent.lb.optout import touches_opt_out
        sub = self.store.subscribe()
        try:
            self._guarded()
            while not self._stop.is_set():
                cs = sub.get(timeout=0.5)
                if cs is None:
                    continue
                batch = [cs] + sub.drain()
                if any(touches_opt_out(c.deltas) for c in batch):
                    self._guarded()
        finally:
            sub.close()

    def _guarded(self) -> None:
        try:
            self.refresh()
        except Exception:      # keep following; the next change retries
            log.exception("socket-LB opt-out refresh failed")


class UdpSocketReaper:
    """Close connected UDP sockets that socket-LB sent to a backend their
    frontend no longer has.

    Such a socket's datagrams carry the backend's address: no map change
    can move them. For each network namespace where socket-LB may have
    translated sockets (the node's, and every local pod's), sock_diag lists
    the connected UDP sockets; one whose destination is a lost backend and
    whose socket-LB record (sockrev map: socket cookie + backend -> VIP)
    names a frontend that lost it is aborted (SOCK_DESTROY). Sockets the
    application connected to the backend address itself are left alone."""

    def __init__(self, lb, netns_fn, diag=None):
        from agent.datapath import sockdiag
        self.lb = lb
        self.netns_fn = netns_fn
        self.diag = diag or sockdiag
        self.closed = 0

    def reap(self, lost) -> int:
        by_backend: dict[tuple[str, int], set[tuple[str, int]]] = {}
        for fe, backends in lost.items():
            for b in backends:
                by_backend.setdefault(b, set()).add((fe.ip, fe.port))
        n = 0
        for ns in self.netns_fn():
            try:
                socks = self.diag.udp_connected(ns)
            except OSError as exc:     # the pod's netns went away meanwhile
                log.debug("UDP sockets of netns %s: %s", ns, exc)
                continue
            for s in socks:
                frontends = by_backend.get((s.dst, s.dport))
                if not frontends:
                    continue
                if self.lb.sockrev_get(s.cookie, s.dst, s.dport) not in frontends:
                    continue
                try:
                    if self.diag.destroy_udp(s, ns):
                        n += 1
                        log.info("closed UDP socket %s:%d -> %s:%d (netns %s): backend removed",
                                 s.src, s.sport, s.dst, s.dport, ns or "node")
                except OSError as exc:
                    log.warning("cannot close UDP socket %s:%d -> %s:%d: %s",
                                s.src, s.sport, s.dst, s.dport, exc)
        self.closed += n
        return n
