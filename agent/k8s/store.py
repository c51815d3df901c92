"""The one store of cluster state, and how consumers follow it.

Sources (the Kubernetes API, a manifest directory) write model objects here;
consumers (the services and NetworkPolicy compilers) read a `Snapshot` and then
follow `ChangeSet`s. Each write is one atomic step: a watch event, a relist of
a kind, or all the objects of a changed manifest file become one ChangeSet,
and a consumer never observes a state in between (no half-applied relist, no
file applied document by document).

    snap, sub = store.subscribe()         # consistent snapshot at version v
    ...build from snap...
    for cs in iter(lambda: sub.get(timeout=1), None):   # v+1, v+2, ... in order
        for d in cs.deltas: ...          # Delta(kind, action, key, old, new)

Snapshots are immutable and cheap: the store hands out read-only views of its
per-kind dicts and copies a dict only on the first write after a snapshot has
been taken of it (copy-on-write), so following deltas costs nothing extra and
taking a snapshot costs at most one dict copy per changed kind.

A write whose object equals the stored one (resourceVersion aside) produces no
delta: pod status heartbeats and resync relists that change nothing fastpath
reads do not wake the compilers.

Pure module: no kubernetes client, prometheus, grpc or kernel imports.
"""
from __future__ import annotations

import collections
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Optional

from agent.k8s.model import (
    ALL_KINDS, Action, EndpointSlice, Key, Kind, Namespace, NetworkPolicy, Node,
    Object, Pod, Service,
)


@dataclass(frozen=True, slots=True)
class Delta:
    kind: Kind
    action: Action
    key: Key
    old: Optional[Object]         # None for ADDED
    new: Optional[Object]         # None for DELETED


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Deltas applied together; `version` is the store version after them."""

    version: int
    deltas: tuple[Delta, ...]
    origin: str = ""


class Snapshot:
    """The store's content at one version; every mapping is read-only.

    Mappings are keyed by (namespace, name), with namespace "" for the
    cluster-scoped kinds (Namespace, Node).
    """

    __slots__ = ("version", "_maps", "_slices_by_service")

    def __init__(self, version: int, maps: Mapping[Kind, Mapping[Key, Object]]):
        self.version = version
        self._maps = maps
        self._slices_by_service: Optional[dict[Key, tuple[EndpointSlice, ...]]] = None

    def of(self, kind: Kind | str) -> Mapping[Key, Object]:
        return self._maps[Kind(kind)]

    def get(self, kind: Kind | str, key: Key) -> Optional[Object]:
        return self._maps[Kind(kind)].get(key)

    @property
    def namespaces(self) -> Mapping[Key, Namespace]:
        return self._maps[Kind.NAMESPACE]

    @property
    def pods(self) -> Mapping[Key, Pod]:
        return self._maps[Kind.POD]

    @property
    def nodes(self) -> Mapping[Key, Node]:
        return self._maps[Kind.NODE]

    @property
    def services(self) -> Mapping[Key, Service]:
        return self._maps[Kind.SERVICE]

    @property
    def endpoint_slices(self) -> Mapping[Key, EndpointSlice]:
        return self._maps[Kind.ENDPOINT_SLICE]

    @property
    def network_policies(self) -> Mapping[Key, NetworkPolicy]:
        return self._maps[Kind.NETWORK_POLICY]

    def endpoint_slices_for(self, namespace: str, service_name: str) -> tuple[EndpointSlice, ...]:
        """The slices labelled kubernetes.io/service-name=<service_name> in that namespace,
        ordered by slice name (stable for compilers that diff their output)."""
        idx = self._slices_by_service
        if idx is None:
            # Built on first use: a snapshot nobody asks this of pays nothing,
            # and a racing second builder just computes the same index.
            acc: dict[Key, list[EndpointSlice]] = collections.defaultdict(list)
            for s in self._maps[Kind.ENDPOINT_SLICE].values():
                if s.service_name:
                    acc[(s.namespace, s.service_name)].append(s)
            idx = {k: tuple(sorted(v, key=lambda s: s.name)) for k, v in acc.items()}
            self._slices_by_service = idx
        return idx.get((namespace, service_name), ())

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        ns = self._maps[Kind.NAMESPACE].get(("", namespace))
        return ns.labels if ns is not None else {}

    def counts(self) -> dict[Kind, int]:
        return {k: len(self._maps[k]) for k in ALL_KINDS}


class Subscription:
    """A consumer's place in the stream: the snapshot it started from, then
    every ChangeSet after it, in order. With a callback, ChangeSets are
    delivered synchronously in the writer's thread (keep it short, never block
    and never write to the store from it); without, they queue until get()."""

    def __init__(self, store: "Store", snapshot: Snapshot,
                 callback: Optional[Callable[[ChangeSet], None]]):
        self._store = store
        self.snapshot = snapshot
        self._callback = callback
        self._queue: collections.deque[ChangeSet] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def _deliver(self, cs: ChangeSet) -> None:
        if self._callback is not None:
            self._callback(cs)
            return
        with self._cond:
            self._queue.append(cs)
            self._cond.notify_all()

    def get(self, timeout: Optional[float] = None) -> Optional[ChangeSet]:
        """The next ChangeSet, or None after `timeout` seconds or once closed."""
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait_for(lambda: self._queue or self.closed, timeout)
            return self._queue.popleft() if self._queue else None

    def drain(self) -> list[ChangeSet]:
        with self._cond:
            out = list(self._queue)
            self._queue.clear()
            return out

    def close(self) -> None:
        self._store._unsubscribe(self)
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Store:
    """Thread-safe; every public write is applied atomically."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._maps: dict[Kind, dict[Key, Object]] = {k: {} for k in ALL_KINDS}
        # Kinds whose current dict is referenced by a published snapshot and
        # must therefore be copied before the next write.
        self._shared: set[Kind] = set()
        self._version = 0
        self._snap: Optional[Snapshot] = None
        self._subs: list[Subscription] = []

    @property
    def version(self) -> int:
        return self._version

    # ---------------------------------------------------------------- read

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snap is None or self._snap.version != self._version:
                self._snap = Snapshot(self._version, types.MappingProxyType(
                    {k: types.MappingProxyType(self._maps[k]) for k in ALL_KINDS}))
                self._shared.update(ALL_KINDS)
            return self._snap

    def get(self, kind: Kind | str, key: Key) -> Optional[Object]:
        with self._lock:
            return self._maps[Kind(kind)].get(key)

    def count(self, kind: Kind | str) -> int:
        with self._lock:
            return len(self._maps[Kind(kind)])

    def keys(self, kind: Kind | str) -> list[Key]:
        with self._lock:
            return list(self._maps[Kind(kind)])

    def subscribe(self, callback: Optional[Callable[[ChangeSet], None]] = None) -> Subscription:
        with self._lock:
            sub = Subscription(self, self.snapshot(), callback)
            self._subs.append(sub)
            return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    # --------------------------------------------------------------- write

    def _writable(self, kind: Kind) -> dict[Key, Object]:
        if kind in self._shared:
            self._maps[kind] = dict(self._maps[kind])
            self._shared.discard(kind)
        return self._maps[kind]

    def _commit(self, deltas: list[Delta], origin: str) -> Optional[ChangeSet]:
        if not deltas:
            return None
        for d in deltas:
            m = self._writable(d.kind)
            if d.new is None:
                m.pop(d.key, None)
            else:
                m[d.key] = d.new
        self._version += 1
        cs = ChangeSet(self._version, tuple(deltas), origin)
        for sub in list(self._subs):
            sub._deliver(cs)
        return cs

    def apply(self, upserts: Iterable[Object] = (),
              deletes: Iterable[tuple[Kind, Key]] = (), origin: str = "") -> Optional[ChangeSet]:
        """Upsert and delete several objects as one ChangeSet (None if nothing changed).

        An object appearing more than once counts once, with its last value.
        """
        with self._lock:
            pending: dict[tuple[Kind, Key], Optional[Object]] = {}
            for kind, key in deletes:
                pending[(Kind(kind), key)] = None
            for obj in upserts:
                pending[(obj.kind, obj.key)] = obj
            deltas = []
            for (kind, key), new in pending.items():
                old = self._maps[kind].get(key)
                if new is None:
                    if old is not None:
                        deltas.append(Delta(kind, Action.DELETED, key, old, None))
                elif old is None:
                    deltas.append(Delta(kind, Action.ADDED, key, None, new))
                elif old != new:
                    deltas.append(Delta(kind, Action.MODIFIED, key, old, new))
                elif old.resource_version != new.resource_version:
                    # Same content: remember the newer version silently.
                    self._writable(kind)[key] = new
            return self._commit(deltas, origin)

    def upsert(self, obj: Object, origin: str = "") -> Optional[ChangeSet]:
        return self.apply(upserts=(obj,), origin=origin)

    def delete(self, kind: Kind | str, key: Key, origin: str = "") -> Optional[ChangeSet]:
        return self.apply(deletes=((Kind(kind), key),), origin=origin)

    def replace(self, kind: Kind | str, objects: Iterable[Object], origin: str = "",
                keep: Optional[Callable[[Key], bool]] = None) -> Optional[ChangeSet]:
        """Make `kind` hold exactly `objects` (a relist), as one ChangeSet.

        Stored objects missing from `objects` are deleted unless keep(key) says
        otherwise (a source uses it to keep the last good version of objects
        whose current version failed validation).
        """
        kind = Kind(kind)
        with self._lock:
            cur = self._maps[kind]
            new_map = {o.key: o for o in objects}
            deltas = []
            for key, new in new_map.items():
                old = cur.get(key)
                if old is None:
                    deltas.append(Delta(kind, Action.ADDED, key, None, new))
                elif old != new:
                    deltas.append(Delta(kind, Action.MODIFIED, key, old, new))
            for key, old in cur.items():
                if key not in new_map and not (keep is not None and keep(key)):
                    deltas.append(Delta(kind, Action.DELETED, key, old, None))
            return self._commit(deltas, origin)
