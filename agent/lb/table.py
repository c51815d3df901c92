"""The desired frontends, kept current one Service at a time.

A full `compile_services` over 10,000 Services takes the better part of a
second; one endpoint change must reach the maps in milliseconds. ServiceTable
follows the store the way any consumer does (a snapshot, then every
ChangeSet in order), keeps its own index of Services and their
EndpointSlices, recompiles only the Services a ChangeSet touched and returns
exactly the frontends whose state changed, ready for
`Reconciler.plan_changes`, and the healthCheckNodePorts this node serves:

    snap, sub = store.subscribe()
    table = ServiceTable(node_name, node_zone)
    ops = rec.plan_changes(table.rebuild(snap))
    for cs in changesets_from(sub):
        ops = rec.plan_changes(table.apply(cs.deltas))

Its `desired` always equals what compile_services returns for the same
cluster state, including which Service wins a frontend that several claim.
Its cost per ChangeSet does not depend on the number of Services.

Pure module: no kubernetes client, prometheus, grpc or kernel imports.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from agent.k8s.model import EndpointSlice, Key, Kind, Service
from agent.lb.compile import (
    DEFAULT_OPTIONS, SCOPE_INTERNAL, Frontend, FrontendState, HealthCheck, LbOptions,
    compile_service, health_check, kind_rank, no_cyclic_gc, translated, with_sole,
)

__all__ = ["ServiceTable", "touched_services"]


def touched_services(deltas: Iterable) -> set[Key]:
    """The Services whose frontends a batch of store deltas may change.

    A Service's own delta, and every EndpointSlice delta (old and new owner:
    a slice can be relabelled from one Service to another). A change of this
    node's zone (or its NodePort addresses) is not a Service change: the
    caller sets `node_zone` (`options`) and calls rebuild(). ServiceTable.apply() finds these itself; this is for
    callers that compile Services on their own.
    """
    out: set[Key] = set()
    for d in deltas:
        if d.kind == Kind.SERVICE:
            out.add(d.key)
        elif d.kind == Kind.ENDPOINT_SLICE:
            for o in (d.old, d.new):
                if o is not None and o.service_name:
                    out.add((o.namespace, o.service_name))
    return out


def _precedence(key: Key, state: FrontendState) -> tuple:
    # The same order compile_services applies: by kind (a ClusterIP first),
    # then the Service first in (namespace, name) order.
    return (kind_rank(state.kind), key)


class ServiceTable:
    def __init__(self, node_name: str, node_zone: str, proxy_name: str = "",
                 options: LbOptions = DEFAULT_OPTIONS):
        self.node_name = node_name
        self.node_zone = node_zone
        self.proxy_name = proxy_name
        self.options = options
        self.desired: dict[Frontend, FrontendState] = {}
        # healthCheckNodePorts this node serves, by Service
        self.health_checks: dict[Key, HealthCheck] = {}
        # Every Service's ClusterIPs (both families) -> whether fastpath
        # translates it (a ClusterIP of another proxy's Service is allocated,
        # not ours); and which of them the last rebuild/apply changed.
        self.cluster_ips: dict[str, bool] = {}
        self.changed_cluster_ips: set[str] = set()
        self._cluster_ip_of: dict[Key, tuple[str, ...]] = {}
        self._services: dict[Key, Service] = {}
        self._slices: dict[Key, dict[str, EndpointSlice]] = {}   # by owning Service
        self._by_service: dict[Key, dict[Frontend, FrontendState]] = {}
        self._claims: dict[Frontend, set[Key]] = {}

    def rebuild(self, snapshot) -> dict[Frontend, Optional[FrontendState]]:
        """Start over from a snapshot (at start, after a resubscribe, or after
        node_zone changed); the updates take `desired` to the snapshot's."""
        touched = set(self._by_service)
        self._services = dict(snapshot.services)
        self._slices = {}
        for sl in snapshot.endpoint_slices.values():
            if sl.service_name:
                self._slices.setdefault((sl.namespace, sl.service_name), {})[sl.name] = sl
        return self._recompile(touched | set(self._services))

    def apply(self, deltas: Iterable) -> dict[Frontend, Optional[FrontendState]]:
        """Follow one ChangeSet's deltas (in store order)."""
        touched: set[Key] = set()
        for d in deltas:
            if d.kind == Kind.SERVICE:
                if d.new is None:
                    self._services.pop(d.key, None)
                else:
                    self._services[d.key] = d.new
                touched.add(d.key)
            elif d.kind == Kind.ENDPOINT_SLICE:
                # Old owner and new: a slice can be relabelled to another Service.
                if d.old is not None and d.old.service_name:
                    owner = (d.old.namespace, d.old.service_name)
                    group = self._slices.get(owner)
                    if group is not None:
                        group.pop(d.old.name, None)
                        if not group:
                            del self._slices[owner]
                    touched.add(owner)
                if d.new is not None and d.new.service_name:
                    owner = (d.new.namespace, d.new.service_name)
                    self._slices.setdefault(owner, {})[d.new.name] = d.new
                    touched.add(owner)
        return self._recompile(touched)

    def _recompile(self, services: Iterable[Key]) -> dict[Frontend, Optional[FrontendState]]:
        with no_cyclic_gc():
            return self._recompile_gc_off(services)

    def _track_cluster_ip(self, key: Key, svc: Optional[Service]) -> None:
        old = self._cluster_ip_of.pop(key, ())
        ips = svc.cluster_ips if svc else ()
        for ip in old:
            if ip not in ips:
                self.cluster_ips.pop(ip, None)
                self.changed_cluster_ips.add(ip)
        if ips:
            self._cluster_ip_of[key] = ips
            mine = translated(svc, self.proxy_name)
            for ip in ips:
                if self.cluster_ips.get(ip) != mine:
                    self.cluster_ips[ip] = mine
                    self.changed_cluster_ips.add(ip)

    def _recompile_gc_off(self, services: Iterable[Key]) -> dict[Frontend, Optional[FrontendState]]:
        affected: set[Frontend] = set()
        self.changed_cluster_ips = set()
        for key in services:
            self._track_cluster_ip(key, self._services.get(key))
            for fe in self._by_service.pop(key, ()):
                self._claims[fe].discard(key)
                affected.add(fe)
            self.health_checks.pop(key, None)
            svc = self._services.get(key)
            if svc is None:
                continue
            group = self._slices.get(key, {})
            # Slice-name order, as the snapshot gives them: the compiler's
            # tie-breaks must see the same sequence either way.
            slices = [group[n] for n in sorted(group)]
            hc = health_check(svc, slices, self.node_name, self.proxy_name)
            if hc is not None:
                self.health_checks[key] = hc
            compiled = compile_service(svc, slices, self.node_name, self.node_zone,
                                       self.proxy_name, options=self.options)
            if not compiled:
                continue
            self._by_service[key] = compiled
            for fe in compiled:
                self._claims.setdefault(fe, set()).add(key)
                affected.add(fe)

        # An external entry coming or going changes its internal twin's
        # `sole` (compile.with_sole) even when no Service touched the twin.
        twins = {Frontend(fe.ip, fe.port, fe.protocol, SCOPE_INTERNAL)
                 for fe in affected if fe.scope != SCOPE_INTERNAL}
        before = {fe: self.desired.get(fe) for fe in affected | twins}
        for fe in affected:
            claimants = self._claims.get(fe)
            if not claimants:
                self._claims.pop(fe, None)
                self.desired.pop(fe, None)
                continue
            winner = min(claimants, key=lambda k: _precedence(k, self._by_service[k][fe]))
            self.desired[fe] = self._by_service[winner][fe]
        updates: dict[Frontend, Optional[FrontendState]] = {}
        for fe, old in before.items():
            st = self.desired.get(fe)
            if st is not None:
                st = self.desired[fe] = with_sole(fe, st, self.desired)
            if st != old:
                updates[fe] = st
        return updates
