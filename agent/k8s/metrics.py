"""Prometheus metrics of the cluster-state sources and the store.

The store itself stays free of prometheus_client (it is pure); these metrics
follow it through a subscription and are updated by the sources directly.
One `K8sMetrics` per registry: `K8sMetrics.for_registry(None)` returns the
process-wide instance on the default registry, tests pass their own registry.
"""
from __future__ import annotations

import threading
from typing import Optional

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from agent.k8s.store import ChangeSet, Store


class K8sMetrics:
    _by_registry: dict[int, "K8sMetrics"] = {}
    _lock = threading.Lock()

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        r = REGISTRY if registry is None else registry
        self.registry = r
        self.objects = Gauge(
            "fastpath_k8s_objects", "Objects of each kind currently in the store.",
            ["kind"], registry=r)
        self.changes = Counter(
            "fastpath_k8s_changes_total",
            "Object changes applied to the store, by kind and action (ADDED, MODIFIED, DELETED).",
            ["kind", "action"], registry=r)
        self.rejected = Counter(
            "fastpath_k8s_rejected_objects_total",
            "Objects or manifests refused by validation; the previous good version is kept.",
            ["source", "kind"], registry=r)
        self.api_up = Gauge(
            "fastpath_k8s_api_up",
            "1 while the watch of this kind is connected to the Kubernetes API, else 0.",
            ["kind"], registry=r)
        self.api_errors = Counter(
            "fastpath_k8s_api_errors_total",
            "Failed list or watch requests to the Kubernetes API, by kind and reason.",
            ["kind", "reason"], registry=r)
        self.reconnects = Counter(
            "fastpath_k8s_api_reconnects_total",
            "Times a kind's list or watch reached the Kubernetes API again after a failed "
            "request (the API was unreachable or refused, then answered).",
            ["kind"], registry=r)
        self.relists = Counter(
            "fastpath_k8s_relists_total",
            "Full lists of a kind, by reason (initial, expired, resync, error).",
            ["kind", "reason"], registry=r)
        self.last_sync = Gauge(
            "fastpath_k8s_last_sync_timestamp_seconds",
            "Unix time of the last completed list (or directory scan) of a kind.",
            ["kind"], registry=r)
        self.synced = Gauge(
            "fastpath_k8s_synced",
            "1 once the initial list of every kind has been applied to the store.",
            registry=r)
        self.files = Gauge(
            "fastpath_k8s_manifest_files",
            "Manifest files currently read by the directory source.",
            registry=r)
        self.manifest_problems = Gauge(
            "fastpath_k8s_manifest_problems",
            "Problems the last scan of the manifest directory found (symbolic link loops, "
            "other paths to what was already read, entries that are not files, unreadable "
            "directories or files, bounds reached); each is also logged once.",
            registry=r)
        self._attached: set[int] = set()

    @classmethod
    def for_registry(cls, registry: Optional[CollectorRegistry] = None) -> "K8sMetrics":
        key = id(REGISTRY if registry is None else registry)
        with cls._lock:
            m = cls._by_registry.get(key)
            if m is None:
                m = cls._by_registry[key] = cls(registry)
            return m

    def attach(self, store: Store) -> None:
        """Follow `store` so object gauges and change counters stay current."""
        if id(store) in self._attached:
            return
        self._attached.add(id(store))

        # Labelled children looked up once: labels() takes a lock and builds a
        # key on every call, a visible cost at thousands of changes a second.
        changes: dict = {}
        objects: dict = {}

        def on_change(cs: ChangeSet) -> None:
            touched = set()
            for d in cs.deltas:
                c = changes.get((d.kind, d.action))
                if c is None:
                    c = changes[(d.kind, d.action)] = self.changes.labels(
                        kind=d.kind.value, action=d.action.value)
                c.inc()
                touched.add(d.kind)
            # Called under the store's lock: these counts are exactly the
            # state this ChangeSet produced.
            for k in touched:
                g = objects.get(k)
                if g is None:
                    g = objects[k] = self.objects.labels(kind=k.value)
                g.set(store.count(k))

        snap = store.subscribe(on_change).snapshot
        for k, n in snap.counts().items():
            self.objects.labels(kind=k.value).set(n)


__all__ = ["K8sMetrics"]
