"""Keep the datapath's service maps equal to what the cluster state says.

Cluster state (agent/k8s store) -> agent.lb.compile (kube-proxy's choices)
-> agent.lb.reconcile (ordered minimal map writes) -> the pinned service
maps. The first plan waits for the source's initial sync: an agent that
restarts with an empty store must not withdraw every Service it is still
serving. After that, each change set recompiles only the Services it
touches (agent.lb.table), and bursts are coalesced into one plan; a change
of this node's zone label or of its addresses (NodePorts and hostPorts
answer on them) rebuilds everything.

Besides Services, the maps carry local pods' hostPorts (agent.lb.hostport),
set and removed by CNI ADD and DEL through `set_host_ports`, which returns
only once the mapping is in the maps (or says why it cannot be).

A plan is transactional. Before it is written, agent.lb.capacity admits
what fits, refusing whole Services (by name) that would overflow a map; if a
write still fails (a kernel error, a map filled behind the agent's back),
the reconciler is rebuilt from what the maps really hold (nothing is
believed written that is not) and the whole desired state is planned again
after a backoff (0.5 s doubling to 30 s), until it goes through. Each plan
ends the (service, backend) pairs and service ids it retired; their ClientIP
affinity entries are purged off the plan's path (AffinityPurger), so an
affinity client is never sent to a backend its Service no longer has.
"""
from __future__ import annotations

import logging
import threading
import time

from agent.k8s.model import Key, Kind
from agent.lb.capacity import Capacities, Refusal, admit
from agent.lb.compile import (DEFAULT_OPTIONS, Backend, Frontend, FrontendState, LbOptions,
                              no_cyclic_gc)
from agent.lb.hostport import Conflict, HostPorts, PortMapping, frontends_of
from agent.lb.nodeaddr import NodeAddresses
from agent.lb.reconcile import (DeleteBackend, DeleteMaglev, DeleteRanges, DeleteService,
                                DeleteSlots, PutBackend, PutMaglev, PutRanges, PutService,
                                PutSlots, Reconciler, ServiceEntry)
from agent.lb.svcnet import entries as svcnet_entries
from agent.lb.svcnet import entry_of as svcnet_entry
from agent.lb.svcnet import host_prefix as svcnet_host_prefix
from agent.lb.table import ServiceTable
from agent.daemon.worker import Purger, Worker, planning, settle_gc

log = logging.getLogger("fastpath.services")


def apply_op(lb, op) -> int:
    """One reconciler operation as one or more map writes. Returns the
    conntrack entries it removed (those of a deleted backend)."""
    if isinstance(op, PutBackend):
        b = op.backend
        lb.put_backend(op.backend_id, b.ip, b.port, b.protocol, op.draining)
    elif isinstance(op, PutSlots):
        lb.put_slots(op.service_id, op.slots, op.first)
    elif isinstance(op, PutService):
        fe, e = op.frontend, op.entry
        lb.put_service(fe.ip, fe.port, fe.protocol, e.service_id, e.count, e.flags,
                       e.affinity_timeout, fe.scope)
    elif isinstance(op, DeleteService):
        fe = op.frontend
        lb.delete_service(fe.ip, fe.port, fe.protocol, fe.scope)
    elif isinstance(op, DeleteSlots):
        lb.delete_slots(op.service_id, op.from_slot, op.to_slot)
    elif isinstance(op, PutMaglev):
        lb.put_maglev(op.service_id, op.table)
    elif isinstance(op, DeleteMaglev):
        lb.delete_maglev(op.service_id)
    elif isinstance(op, PutRanges):
        lb.put_ranges(op.service_id, op.cidrs)
    elif isinstance(op, DeleteRanges):
        lb.delete_ranges(op.service_id, op.cidrs)
    elif isinstance(op, DeleteBackend):
        lb.delete_backend(op.backend_id)
        # its datagram flows must not linger (UDP would keep hitting a dead
        # address); its connections finish on their own
        from agent.conntrack.purge import purge_backends
        return purge_backends(lb.ct, (op.backend_id,))
    else:
        raise TypeError(f"unknown service map operation {op!r}")
    return 0


_BATCHED = (PutBackend, PutSlots, PutService)


def apply_ops(lb, ops) -> list[int]:
    """A plan's operations in order, runs of one kind of write as one
    batched map update (the kernel applies a batch's entries in order, so
    the plan's order holds entry by entry). Returns the removed backends'
    ids (their conntrack entries are for the purger). Raises on the first
    write that fails: what came before it is in the maps, nothing after."""
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
        lb.put_backends([(o.backend_id, o.backend.ip, o.backend.port, o.backend.protocol,
                          o.draining) for o in run])
    elif isinstance(op, PutSlots):
        lb.put_slot_runs([(o.service_id, o.slots, o.first) for o in run])
    else:
        lb.put_services([(o.frontend.ip, o.frontend.port, o.frontend.protocol,
                          o.entry.service_id, o.entry.count, o.entry.flags,
                          o.entry.affinity_timeout, o.frontend.scope) for o in run])


class AffinityPurger(Purger):
    """Deletes ClientIP affinity entries that name what a plan ended: a
    released service id, a deleted backend, or a backend its frontend no
    longer has (the backend may live on for another Service, so the
    datapath's "does the backend still exist" check alone would keep the
    client on it). Items: ("svc", id), ("backend", id), ("pair", sid, bid)."""

    name = "affinity-purge"

    def __init__(self, lb, settle: float = 0.02):
        super().__init__(settle)
        self.lb = lb
        self.purged = 0

    def _purge(self, items: set) -> None:
        sids = {i[1] for i in items if i[0] == "svc"}
        bids = {i[1] for i in items if i[0] == "backend"}
        pairs = {(i[1], i[2]) for i in items if i[0] == "pair"}
        n = self.lb.affinity_purge(sids, bids, pairs)
        self.purged += n
        if n:
            log.info("affinity: %d entries of retired services and backends deleted", n)


def restore_reconciler(lb, **kw) -> Reconciler:
    """A reconciler owning what the pinned maps already hold."""
    services = {Frontend(s["vip"], s["port"], s["proto"], s.get("scope", 0)):
                ServiceEntry(s["svc_id"], s["count"], s["affinity_timeout"], s["flags"])
                for s in lb.services()}
    backends = {bid: Backend(ip, port, proto) for bid, (ip, port, proto) in lb.backends().items()}
    named_sids, named_bids = lb.named_ids()
    return Reconciler.restore(services, lb.all_slots(), backends, lb.draining_backends(),
                              maglev=lb.maglev_tables(), ranges=lb.ranges(),
                              named_service_ids=named_sids, named_backend_ids=named_bids, **kw)


class ServiceSync(Worker):
    RETRY_FIRST = 0.5
    RETRY_MAX = 30.0
    ADDRESS_POLL = 5.0

    def __init__(self, lb, store, source, node_name: str, *, settle: float = 0.05,
                 metrics=None, options: LbOptions = DEFAULT_OPTIONS, addresses_fn=None,
                 capacities: Capacities | None = None, service_cidrs=(),
                 reconciler_kw: dict | None = None, health=None):
        self.lb = lb
        self.metrics = metrics          # agent.metrics.AgentMetrics, or None
        self.store = store
        self.source = source
        self.node_name = node_name
        self.settle = settle
        self.base_options = options
        # () -> NodeAddresses; None: no NodePort address known (tests)
        self.addresses_fn = addresses_fn
        self.addresses = NodeAddresses()
        # called with the new NodeAddresses whenever they change (the agent
        # writes the primary address into the datapath's settings)
        self.on_addresses = None
        self.capacities = capacities
        self.service_cidrs = tuple(service_cidrs)
        self.reconciler_kw = dict(reconciler_kw or {})
        self.health = health            # agent.daemon.hcserver.HealthCheckServer, or None
        self._lock = threading.RLock()  # the loop and CNI ADD/DEL (hostPorts) both plan
        self.reconciler = restore_reconciler(lb, **self.reconciler_kw)
        self.table: ServiceTable | None = None     # None: rebuild on the next change
        self.hostports = HostPorts()
        self._pods: dict[Key, tuple[str, tuple[PortMapping, ...]]] = {}
        self._pods6: dict[Key, str] = {}   # the IPv6 address of a pod in _pods, if any
        self.refused: dict[Key, Refusal] = {}
        self.conflicts: list[Conflict] = []
        self.applied_version = -1
        self.last_plan_ops = 0
        self.plans = 0
        self.errors = 0
        self.failures = 0               # consecutive failed writes
        self.last_error = ""
        self.retry_at: float | None = None
        self._retry_wait = self.RETRY_FIRST
        self._next_poll = 0.0
        self.synced = threading.Event()  # the first full plan went through
        # called with {Frontend: {(ip, port)}} of UDP frontends that lost
        # backends, after the plan is written (see UdpSocketReaper)
        self.on_backends_lost = None
        from agent.daemon.conntrack_gc import ConntrackPurger
        self.purger = ConntrackPurger(lb.ct, metrics)
        self.affinity_purger = AffinityPurger(lb)
        Worker.__init__(self, "service-sync")

    def start(self) -> "ServiceSync":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        self.purger.stop()
        self.affinity_purger.stop()

    # ------------------------------------------------------------ state

    @property
    def options(self) -> LbOptions:
        import dataclasses
        return dataclasses.replace(self.base_options,
                                   nodeport_ips=self.addresses.nodeport + self.addresses.nodeport6)

    def healthy(self) -> bool:
        """What kube-proxy's health checks call the proxy's health: the
        maps have been synced once and no failed write is pending."""
        return self.synced.is_set() and self.retry_at is None

    def status(self) -> dict:
        return {"plans": self.plans, "errors": self.errors, "failing": self.retry_at is not None,
                "last_error": self.last_error,
                "refused": [str(r) for r in self.refused.values()],
                "hostport_conflicts": [str(c) for c in self.conflicts]}

    def _zone(self, snap) -> str:
        node = snap.nodes.get(("", self.node_name))
        return node.zone if node is not None else ""

    def _read_addresses(self) -> bool:
        """Re-read the node's addresses; True when they changed."""
        if self.addresses_fn is None:
            return False
        try:
            addrs = self.addresses_fn()
        except Exception as exc:
            log.warning("node addresses unreadable, keeping %s: %s", self.addresses, exc)
            return False
        if addrs == self.addresses:
            return False
        log.info("node addresses: primary %s, NodePorts on %s, hostPorts on %s",
                 ", ".join(addrs.primary + addrs.primary6) or "(none)",
                 ", ".join(addrs.nodeport + addrs.nodeport6) or "(none)",
                 ", ".join(addrs.local) or "(none)")
        self.addresses = addrs
        if self.on_addresses is not None:
            try:
                self.on_addresses(addrs)
            except Exception:
                log.exception("node addresses not written to the datapath")
        return True

    def _udp_backends(self, fe) -> set[tuple[str, int]]:
        """Where a UDP frontend's flows may be: its backends, and the
        draining ones (their sockets live until the backend is gone)."""
        rec = self.reconciler
        return {rec.backend_ids.key_of(b)[:2] for b in (*rec.slots(fe), *rec.draining(fe))
                if b > 0}

    def _desired(self, fe: Frontend):
        svc = self.table.desired.get(fe) if self.table is not None else None
        return self.hostports.combine(fe, svc)

    def _owned_by(self, owner: Key) -> set[Frontend]:
        out = set(self.hostports.by_owner.get(owner, ()))
        if self.table is not None:
            out |= set(self.table._by_service.get(owner, ()))
        return out

    # ------------------------------------------------------------ plans

    def _apply(self, updates, version: int) -> int:
        """Plan and write `updates` (frontend -> combined state or None).
        Raises if a write fails (the caller restores and retries)."""
        # Refused owners are asked again every time: room may have been freed.
        for owner in list(self.refused):
            for fe in self._owned_by(owner):
                updates.setdefault(fe, self._desired(fe))
        if self.capacities is not None:
            updates, refused = admit(self.reconciler, updates, self.capacities)
        else:
            refused = []
        now_refused = {r.owner: r for r in refused}
        for owner, r in now_refused.items():
            if owner not in self.refused:
                log.error("services: %s; the maps keep what they had for it", r)
        for owner in set(self.refused) - set(now_refused):
            log.info("services: %s/%s fits again and is programmed", *owner)
        self.refused = now_refused
        udp = [fe for fe in updates if fe.protocol == "UDP"] if self.on_backends_lost else []
        before = {fe: self._udp_backends(fe) for fe in udp}
        ops = self.reconciler.plan_changes(updates)
        removed = apply_ops(self.lb, ops)
        rec = self.reconciler
        if removed:
            self.purger.add(removed)
        retired = ({("svc", s) for s in rec.released_service_ids}
                   | {("backend", b) for b in removed}
                   | {("pair", s, b) for s, b in rec.ended_pairs})
        self.affinity_purger.add(retired)
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

    def _after_plan(self) -> None:
        if self.table is None:
            return
        conflicts = self.hostports.conflicts(self.table.desired)
        for c in set(map(str, conflicts)) - set(map(str, self.conflicts)):
            log.warning("hostPort conflict: %s", c)
        self.conflicts = conflicts
        if self.health is not None:
            try:
                self.health.sync(self.table.health_checks)
            except Exception:
                log.exception("health-check node ports not updated")

    def _svcnet_full(self) -> None:
        self.lb.svcnet_set(svcnet_entries(self.table.cluster_ips, self.service_cidrs))

    def _svcnet_changes(self) -> None:
        for ip in self.table.changed_cluster_ips:
            if ip in self.table.cluster_ips:
                prefix, flags = svcnet_entry(ip, self.table.cluster_ips[ip])
                self.lb.svcnet_put(prefix, flags)
            else:
                self.lb.svcnet_delete(svcnet_host_prefix(ip))

    def sync_once(self) -> int:
        """Full rebuild from the current snapshot (start, zone or address
        change, retry after a failed write)."""
        # The whole plan, writes included, with the cyclic collector held
        # off: the ops and map rows of 10,000 Services would otherwise set
        # off collections that walk the compiled state (most of the time
        # the writes took).
        with self._lock, planning(), no_cyclic_gc():
            self._read_addresses()
            snap = self.store.snapshot()
            self.table = ServiceTable(self.node_name, self._zone(snap), options=self.options)
            self.table.rebuild(snap)
            self._rebuild_host_ports()
            desired = {fe: self._desired(fe)
                       for fe in set(self.table.desired) | self.hostports.frontends()}
            updates = self.reconciler.changes(desired)
            n = self._apply(updates, snap.version)
            self._svcnet_full()
            self._after_plan()
            self.synced.set()
            return n

    def _sync_changes(self, changes) -> int:
        with self._lock, planning(), no_cyclic_gc():
            if self.retry_at is not None:
                return 0          # the pending retry plans the whole state, these included
            # The node alone, not a snapshot: a snapshot makes the store's
            # next write copy every object of the kind it writes (all
            # EndpointSlices), half the time of a one-endpoint change.
            node = self.store.get(Kind.NODE, ("", self.node_name))
            zone = node.zone if node is not None else ""
            if self.table is None or zone != self.table.node_zone:
                return self.sync_once()
            updates = {}
            for cs in changes:
                updates.update(self.table.apply(cs.deltas))
            combined = {fe: self._desired(fe) for fe in updates}
            n = self._apply(combined, changes[-1].version)
            self._svcnet_changes()
            self._after_plan()
            return n

    def _run(self) -> None:
        self._follow(self.source, self.store, self.settle, lambda: self._guarded(self.sync_once),
                     lambda changes: self._guarded(lambda: self._sync_changes(changes)),
                     on_idle=self._idle)

    def _idle(self) -> None:
        now = time.monotonic()
        if self.retry_at is not None and now >= self.retry_at:
            log.info("services: retrying the failed plan from the maps' real state")
            self._guarded(self.sync_once)
        elif now >= self._next_poll:
            self._next_poll = now + self.ADDRESS_POLL
            if self.addresses_fn is not None and self._addresses_changed():
                self._guarded(self.sync_once)

    def _addresses_changed(self) -> bool:
        with self._lock:
            old = self.addresses
            return self._read_addresses() and old != self.addresses

    def _guarded(self, fn) -> int:
        t0 = time.monotonic()
        try:
            ops = fn()
        except Exception as exc:      # one bad plan must not stop the loop
            self._failed(exc)
            if self.metrics is not None:
                self.metrics.observe_sync("Service", time.monotonic() - t0, ok=False)
            return -1
        self.failures = 0
        self.retry_at = None
        self._retry_wait = self.RETRY_FIRST
        if self.metrics is not None:
            self.metrics.observe_sync("Service", time.monotonic() - t0, ops)
        return ops

    def _failed(self, exc: Exception) -> None:
        """A plan failed part-way (or could not be made): believe only the
        maps, and plan everything again after a backoff."""
        self.errors += 1
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("service sync failed (%s); the maps keep what was written, the reconciler "
                  "is rebuilt from them and the plan retried in %.1fs", self.last_error,
                  self._retry_wait, exc_info=exc)
        with self._lock:
            try:
                self.reconciler = restore_reconciler(self.lb, **self.reconciler_kw)
            except Exception:
                log.exception("reading the service maps back failed; retrying later")
            self.table = None
        self.retry_at = time.monotonic() + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, self.RETRY_MAX)

    # -------------------------------------------------------- hostPorts

    def _rebuild_host_ports(self) -> None:
        for owner, (pod_ip, mappings) in self._pods.items():
            self.hostports.set(owner, self._frontends(owner, pod_ip, mappings,
                                                      self._pods6.get(owner, "")))

    def _frontends(self, owner: Key, pod_ip: str, mappings, pod_ip6: str):
        return frontends_of(owner, pod_ip, mappings, self.addresses.local, self.node_name,
                            pod_ip6, self.addresses.local6)

    def set_host_ports(self, owner: Key, pod_ip: str, mappings, pod_ip6: str = "") -> list[str]:
        """Make `owner`'s hostPorts these (an ADD: empty `mappings` for a pod
        without any; a DEL: remove_host_ports). Written before it returns.
        Raises HostPortRefused naming the conflict or the full map; the
        previous mappings of `owner` then stay as they were."""
        mappings = tuple(mappings)
        with self._lock:
            if not mappings and owner not in self._pods:
                return []
            fes = self._frontends(owner, pod_ip, mappings, pod_ip6)
            services = self.table.desired if self.table is not None else {}
            refusal = self.hostports.refusal(owner, fes, services)
            if refusal:
                raise HostPortRefused("; ".join(map(str, refusal)))
            old = self._pods.get(owner)
            old6 = self._pods6.get(owner, "")
            if mappings:
                self._pods[owner] = (pod_ip, mappings)
                self._pods6[owner] = pod_ip6
            else:
                self._pods.pop(owner, None)
                self._pods6.pop(owner, None)
            touched = self.hostports.set(owner, fes)
            updates = {fe: self._desired(fe) for fe in touched}
            if self.capacities is not None:
                ok, refused = admit(self.reconciler, updates, self.capacities)
                mine = [r for r in refused if r.owner == owner]
                if mine:
                    self._undo_host_ports(owner, old, old6)
                    raise HostPortRefused(str(mine[0]))
            if not self.synced.is_set():
                return [str(m) for m in mappings]  # the first full plan writes them
            if self.retry_at is not None:
                raise HostPortRefused(f"the service maps are failing ({self.last_error}); "
                                      "the mapping is kept and written by the next retry")
            try:
                with planning():
                    self._apply(updates, self.applied_version)
            except Exception as exc:
                self._failed(exc)
                raise
            self._after_plan()
            return [str(m) for m in mappings]

    def _undo_host_ports(self, owner: Key, old, old6: str = "") -> None:
        if old is None:
            self._pods.pop(owner, None)
            self._pods6.pop(owner, None)
            self.hostports.remove(owner)
        else:
            self._pods[owner] = old
            self._pods6[owner] = old6
            self.hostports.set(owner, self._frontends(owner, old[0], old[1], old6))

    def remove_host_ports(self, owner: Key) -> None:
        self.set_host_ports(owner, "", ())

    def host_ports(self) -> dict[Key, tuple[str, tuple[PortMapping, ...]]]:
        with self._lock:
            return dict(self._pods)


class HostPortRefused(Exception):
    """A pod's hostPorts cannot be programmed (a conflict, or no room)."""


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
