"""Cluster state from a directory of Kubernetes manifests (`--source DIR`).

The embedded default for `make demo`, the tests and a node without a cluster:
every *.yaml, *.yml and *.json file under the directory (recursively; names
starting with "." are skipped, which also skips editor swap files and the
"..data" links of a mounted ConfigMap) is read as Kubernetes objects: several
YAML documents per file, a `kind: List` with items, or a JSON array. Kinds
fastpath does not consume (Deployments, ConfigMaps, ...) are ignored.

The directory is polled (mtime, size, then a content hash; portable, no
inotify) and every scan that finds changes is applied to the store as one
ChangeSet, so a rename (old file gone, new file present) or an edit that moves
an object between files never makes it blink.

Bad input never half-applies: a file that does not decode keeps all the
objects it had; an object that fails validation keeps its previous version;
an object defined by two files is taken from the one that defined it first
(the other is rejected, naming both files) until that one drops it.
Namespaced objects without a namespace go to "default", as with kubectl, and
Pods may give their IPs in the fastpath.io/pod-ips annotation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from agent.k8s.model import ALL_KINDS, Key, Kind, Object, object_name
from agent.k8s.parse import UnsupportedKind, ValidationError, kind_of, parse_object
from agent.k8s.source import Source
from agent.k8s.store import Store

log = logging.getLogger("fastpath.k8s")

SUFFIXES = (".yaml", ".yml", ".json")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ObjId = tuple[Kind, Key]
_KINDS = frozenset(k.value for k in Kind)
_RACY_NS = 2_000_000_000


@dataclass
class _FileState:
    stat: tuple[int, int]                       # (mtime_ns, size)
    digest: str
    objects: dict[ObjId, Object] = field(default_factory=dict)
    order: list[ObjId] = field(default_factory=list)
    ignored: int = 0


def _documents(path: str, data: bytes) -> Iterator[Any]:
    """Top-level objects of one manifest file (raises on undecodable content)."""
    if path.endswith(".json"):
        doc = json.loads(data)
        docs = doc if isinstance(doc, list) else [doc]
    else:
        docs = list(yaml.load_all(data, Loader=_Loader))
    for d in docs:
        if d is None:
            continue  # empty document between two "---"
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            yield from d["items"]
        else:
            yield d


class DirectorySource(Source):
    kind_name = "directory"

    def __init__(self, path: str, store: Store, *, metrics=None, interval: float = 1.0,
                 default_namespace: str = "default"):
        super().__init__(store, metrics)
        self.root = os.path.abspath(path)
        self.interval = interval
        self.default_namespace = default_namespace
        self._files: dict[str, _FileState] = {}
        self._owner: dict[ObjId, str] = {}
        self._published: dict[ObjId, Object] = {}
        self._dups_logged: set[tuple[ObjId, str]] = set()
        self._scan_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        for st in self.kinds.values():
            st.scope = "directory"

    def describe_source(self) -> str:
        return f"directory {self.root}"

    # --------------------------------------------------------------- control

    def start(self) -> "DirectorySource":
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"manifest directory {self.root} does not exist")
        # The first scan runs before start() returns: a caller (the agent, the
        # demo, a test) has the directory's content as soon as it has a source.
        self.scan()
        self._thread = threading.Thread(target=self._run, name="k8s-directory", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception:  # never let one bad scan end the source
                log.exception("scanning %s failed; retrying", self.root)

    # ------------------------------------------------------------------ scan

    def _list_files(self) -> dict[str, tuple[int, int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith(".") or not fn.endswith(SUFFIXES):
                    continue
                p = os.path.join(dirpath, fn)
                try:
                    st = os.stat(p)
                except OSError:
                    continue  # vanished between listing and stat
                out[os.path.relpath(p, self.root)] = (st.st_mtime_ns, st.st_size)
        return out

    def scan(self) -> bool:
        """Read what changed since the last scan and apply it; True if anything did."""
        with self._scan_lock:
            return self._scan()

    def _scan(self) -> bool:
        listing = self._list_files()
        touched: list[str] = []
        # File times have coarse (clock-tick) granularity: a same-size rewrite
        # within one tick keeps the same stat. Files modified that recently
        # are hashed again on every scan until their mtime is safely past.
        racy = time.time_ns() - _RACY_NS
        for rel, stat in listing.items():
            prev = self._files.get(rel)
            if prev is not None and prev.stat == stat and stat[0] < racy:
                continue
            try:
                with open(os.path.join(self.root, rel), "rb") as f:
                    data = f.read()
            except OSError as e:
                log.warning("cannot read %s: %s", rel, e)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if prev is not None and prev.digest == digest:
                prev.stat = stat  # touched, not changed
                continue
            self._files[rel] = self._load_file(rel, stat, digest, data, prev)
            touched.append(rel)
        removed = [rel for rel in self._files if rel not in listing]
        for rel in removed:
            del self._files[rel]
            self.forget_origin(rel)
            log.info("manifest %s removed", rel)
        self.metrics.files.set(len(self._files))
        changed = bool(touched or removed)
        if changed:
            self._publish(touched, removed)
        for k in ALL_KINDS:
            self.kinds[k].connected = True
            self._mark_synced(k)
        return changed

    def _load_file(self, rel: str, stat, digest: str, data: bytes,
                   prev: Optional[_FileState]) -> _FileState:
        new = _FileState(stat, digest)
        self.forget_origin(rel)
        try:
            docs = list(_documents(rel, data))
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
            msg = str(e).replace("\n", " ")
            self.reject(ValidationError("Manifest", "?", "", f"cannot decode: {msg}", rel),
                        kept_previous=prev is not None and bool(prev.objects))
            if prev is not None:
                # Keep every object the last good version of this file had.
                new.objects, new.order = dict(prev.objects), list(prev.order)
            return new
        prev_objects = prev.objects if prev is not None else {}
        for i, d in enumerate(docs):
            try:
                kind = kind_of(d) if isinstance(d, dict) else None
                if kind is None:
                    raise ValidationError("Manifest", "?", f"document {i}",
                                          f"expected an object, got {type(d).__name__}", rel)
                obj = parse_object(d, origin=rel, default_namespace=self.default_namespace,
                                   pod_ip_annotation=True)
            except UnsupportedKind as u:
                new.ignored += 1
                log.debug("%s: ignoring %s", rel, u)
                continue
            except ValidationError as e:
                e.origin = rel
                oid = (Kind(e.kind), e.key) if e.key is not None and e.kind in _KINDS else None
                kept = oid is not None and oid in prev_objects and oid not in new.objects
                self.reject(e, kept_previous=kept)
                if kept:
                    new.objects[oid] = prev_objects[oid]
                    new.order.append(oid)
                continue
            oid = (obj.kind, obj.key)
            if oid in new.objects:
                self.reject(ValidationError(
                    obj.kind.value, object_name(obj.kind, obj.key), "metadata.name",
                    f"defined twice in {rel}; the later definition (document {i}) is ignored",
                    rel, key=obj.key), kept_previous=True)
                continue
            new.objects[oid] = obj
            new.order.append(oid)
            self.accepted(obj.kind.value, object_name(obj.kind, obj.key))
        log.info("manifest %s: %d objects%s", rel, len(new.objects),
                 f", {new.ignored} of other kinds ignored" if new.ignored else "")
        return new

    def _publish(self, touched: list[str], removed: list[str]) -> None:
        # Who defines what, now; the current owner keeps an object as long as
        # it still defines it, otherwise the first file (by path) takes over.
        # A re-read file reports its duplicates again (its accepted() calls
        # have just cleared them from the status).
        self._dups_logged = {(o, f) for (o, f) in self._dups_logged if f not in touched}
        defined: dict[ObjId, list[str]] = {}
        for rel in sorted(self._files):
            for oid in self._files[rel].order:
                defined.setdefault(oid, []).append(rel)
        owner: dict[ObjId, str] = {}
        for oid, files in defined.items():
            cur = self._owner.get(oid)
            own = cur if cur in files else files[0]
            owner[oid] = own
            for other in files:
                if other != own and (oid, other) not in self._dups_logged:
                    self._dups_logged.add((oid, other))
                    kind, key = oid
                    self.reject(ValidationError(
                        kind.value, object_name(kind, key), "metadata.name",
                        f"already defined in {own}; this duplicate is ignored", other,
                        key=key), kept_previous=True)
        self._dups_logged = {(o, f) for (o, f) in self._dups_logged
                             if o in owner and f in defined[o] and f != owner[o]}
        self._owner = owner
        desired = {oid: self._files[rel].objects[oid] for oid, rel in owner.items()}
        deletes = [oid for oid in self._published if oid not in desired]
        upserts = [obj for oid, obj in desired.items() if self._published.get(oid) != obj]
        what = ", ".join(touched + [f"-{r}" for r in removed])
        cs = self.store.apply(upserts=upserts, deletes=deletes, origin=f"directory: {what}")
        self._published = desired
        if cs is not None:
            log.info("applied %d changes from %s", len(cs.deltas), what)
