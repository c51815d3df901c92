"""Where cluster state comes from, chosen by one string, and how it is reported.

`open_source(spec, node_name, store)` is what the agent calls:

    spec == "kubernetes"  list+watch the API server (in-cluster config, else kubeconfig)
    spec == a directory   read Kubernetes manifests from it and follow its changes

Both return a started `Source` that fills the same `Store` with the same
events; `.synced` is set once every kind has been loaded the first time,
`.status()` is what `fastpath status` shows, `.stop()` ends it. `summarize()`
and `describe()` are the log lines the agent prints once synced.

This module does not import the kubernetes client unless the kubernetes
source is asked for, so a directory-mode agent starts quickly without it.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Optional

from agent.k8s.model import ALL_KINDS, Kind, object_name
from agent.k8s.parse import ValidationError
from agent.k8s.store import Snapshot, Store

log = logging.getLogger("fastpath.k8s")


class Backoff:
    """Capped exponential backoff with jitter.

    The n-th consecutive failure waits a random time in [d/2, d] with
    d = min(cap, initial * 2**n): growing, bounded, and spread out so that the
    agents of a whole cluster do not reconnect to a recovering API server in
    lockstep.
    """

    def __init__(self, initial: float = 0.5, cap: float = 30.0,
                 rng: Optional[random.Random] = None):
        self.initial = initial
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        d = min(self.cap, self.initial * (2 ** min(self.failures, 62)))
        self.failures += 1
        return d / 2 + self._rng.random() * d / 2

    def reset(self) -> None:
        self.failures = 0


class KindStatus:
    __slots__ = ("last_sync", "errors", "connected", "last_error", "resource_version",
                 "scope", "synced")

    def __init__(self, scope: str = "all"):
        self.last_sync: Optional[float] = None
        self.errors = 0
        self.connected = False
        self.last_error = ""
        self.resource_version = ""
        self.scope = scope
        self.synced = False

    def as_dict(self) -> dict:
        return {"last_sync": self.last_sync, "errors": self.errors,
                "connected": self.connected, "last_error": self.last_error,
                "resource_version": self.resource_version, "scope": self.scope,
                "synced": self.synced}


class Source:
    """What both sources share: sync state, rejections, status, stop."""

    kind_name = "source"

    def __init__(self, store: Store, metrics=None):
        from agent.k8s.metrics import K8sMetrics
        self.store = store
        self.metrics = metrics if metrics is not None else K8sMetrics.for_registry(None)
        self.metrics.attach(store)
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.kinds: dict[Kind, KindStatus] = {k: KindStatus() for k in ALL_KINDS}
        # (kind, name or file) -> the error that currently keeps it out (or stale).
        self._rejected: dict[tuple[str, str], ValidationError] = {}

    # ------------------------------------------------------------ rejections

    def reject(self, err: ValidationError, kept_previous: bool) -> None:
        """Count and log a refused object once per distinct error."""
        self.metrics.rejected.labels(source=self.kind_name, kind=err.kind).inc()
        ident = (err.kind, err.name if err.name != "?" else f"?{err.origin}")
        with self._lock:
            prev = self._rejected.get(ident)
            self._rejected[ident] = err
        if prev is None or str(prev) != str(err):
            what = ("keeping its previous version" if kept_previous
                    else "not loaded")
            log.warning("rejected %s; %s", err, what)

    def accepted(self, kind: str, name: str) -> None:
        """A version of this object passed: forget its earlier rejection."""
        if self._rejected:
            with self._lock:
                if self._rejected.pop((kind, name), None) is not None:
                    log.info("%s %s is valid again", kind, name)

    def forget(self, kind: str, name: str) -> None:
        """The object is gone: its rejection no longer applies."""
        if self._rejected:
            with self._lock:
                self._rejected.pop((kind, name), None)

    def forget_origin(self, origin: str) -> None:
        """A file is re-read or gone: its earlier rejections no longer apply."""
        if self._rejected:
            with self._lock:
                for ident in [i for i, e in self._rejected.items() if e.origin == origin]:
                    del self._rejected[ident]

    def rejected(self) -> list[ValidationError]:
        with self._lock:
            return list(self._rejected.values())

    # ---------------------------------------------------------------- sync

    def _mark_synced(self, kind: Kind) -> None:
        st = self.kinds[kind]
        st.last_sync = time.time()
        st.synced = True
        self.metrics.last_sync.labels(kind=kind.value).set(st.last_sync)
        if not self.synced.is_set() and all(s.synced for s in self.kinds.values()):
            self.synced.set()
            self.metrics.synced.set(1)

    # -------------------------------------------------------------- control

    def start(self) -> "Source":
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def problems(self) -> list[str]:
        """What is wrong with the source itself (not with an object), now."""
        return []

    def status(self) -> dict:
        return {
            "source": self.describe_source(),
            "synced": self.synced.is_set(),
            "problems": self.problems(),
            "connected": all(s.connected for s in self.kinds.values()),
            "store_version": self.store.version,
            "kinds": {k.value: s.as_dict() for k, s in self.kinds.items()},
            "rejected": [e.as_dict() for e in self.rejected()],
        }

    def describe_source(self) -> str:
        return self.kind_name

    def lookup_pod(self, namespace: str, name: str, timeout: float):
        """One Pod asked for now, not waited for (a new pod's CNI ADD needs
        its labels before its Pod may have reached the store): the Pod, or
        None if the source says there is none; raises if it cannot answer.
        The store is left to the source's own flow. A manifest directory
        is read again (`scan`, when the source has it) and answers from it."""
        rescan = getattr(self, "scan", None)
        if callable(rescan):
            rescan()
        return self.store.get(Kind.POD, (namespace, name))

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- reporting

_PLURAL = {
    Kind.NAMESPACE: "namespaces", Kind.NODE: "nodes", Kind.POD: "pods",
    Kind.SERVICE: "services", Kind.ENDPOINT_SLICE: "endpointslices",
    Kind.NETWORK_POLICY: "networkpolicies",
}


def summarize(snapshot: Snapshot) -> str:
    """One line with the count of each kind, e.g. for the agent's startup log."""
    counts = snapshot.counts()
    parts = [f"{_PLURAL[k]}={counts[k]}" for k in ALL_KINDS]
    n_eps = sum(len(s.endpoints) for s in snapshot.endpoint_slices.values())
    parts.insert(ALL_KINDS.index(Kind.ENDPOINT_SLICE) + 1, f"endpoints={n_eps}")
    return "cluster state: " + " ".join(parts)


def describe(snapshot: Snapshot, limit: int = 20) -> list[str]:
    """One line per kind naming the objects loaded (the first `limit` of them)."""
    out = []
    for k in ALL_KINDS:
        keys = sorted(snapshot.of(k))
        if not keys:
            continue
        names = ", ".join(object_name(k, key) for key in keys[:limit])
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        out.append(f"{k.value} ({len(keys)}): {names}{more}")
    return out
