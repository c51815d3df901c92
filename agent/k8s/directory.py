"""Cluster state from a directory of Kubernetes manifests (`--source DIR`).

The embedded default for `make demo`, the tests and a node without a cluster:
every *.yaml, *.yml and *.json file under the directory (recursively; names
starting with "." are skipped, which also skips editor swap files and the
"..data" links of a mounted ConfigMap) is read as Kubernetes objects: several
YAML documents per file, a `kind: List` with items, or a JSON array. Kinds
fastpath does not consume (Deployments, ConfigMaps, ...) are ignored.

The directory is scanned (mtime, size, then a content hash) as soon as
inotify says something in it changed (agent/k8s/inotify.py: a burst of
events is one scan), and polled every `interval` seconds whatever inotify
says: the poll alone covers what inotify cannot see (a filesystem that does
not report, a watch limit, no inotify at all, the root directory itself
replaced), and `status()["watch"]` says which it is. Every scan that finds
changes is applied to the store as one ChangeSet, so a rename (old file
gone, new file present) or an edit that moves an object between files never
makes it blink.

A scan costs what the directory holds, whatever its links do: symbolic links
are followed, but each real directory and file (by device and inode) is read
once, so a link back to a parent (`a -> .`) or a second path to a directory
already read is skipped and reported, once, as a problem of the source. So
are entries that are not regular files (a FIFO is never opened), unreadable
directories, files larger than MAX_FILE_BYTES, and a tree beyond MAX_DIRS
directories, MAX_FILES files or MAX_DEPTH levels. A scan that could not list
everything removes nothing it did not see: a directory that vanished or
cannot be read keeps the objects it had, and the source says it is degraded
until the problem is gone (`problems()`, `fastpath status`).

Bad input never half-applies: a file that does not decode keeps all the
objects it had; an object that fails validation keeps its previous version;
an object defined by two files is taken from the one that defined it first
(the other is rejected, naming both files) until that one drops it.
Namespaced objects without a namespace go to "default", as with kubectl, and
Pods may give their IPs in the fastpath.io/pod-ips annotation.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
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

# Bounds of one scan. A node's manifests are tens of files; these only stop
# a mistaken mount (a whole filesystem, a huge file) from costing the agent
# its memory or its poll: the tree beyond them is not read, and said so.
MAX_DIRS = 10_000
MAX_FILES = 50_000
MAX_DEPTH = 64
MAX_FILE_BYTES = 16 << 20


@dataclass
class _Listing:
    files: dict[str, tuple[int, int]] = field(default_factory=dict)   # rel -> (mtime_ns, size)
    # what the walk visited, for the watcher: every directory listed, and
    # every file reached through a link (its target may be outside the tree)
    dirs: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)            # what -> message
    # directories (rel, "" for the root) whose content could not be listed:
    # their files keep what they had, as if unchanged
    unlisted: list[str] = field(default_factory=list)
    complete: bool = True       # False: a bound was reached, nothing is removed


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
                 default_namespace: str = "default", watch: bool = True):
        super().__init__(store, metrics)
        self.root = os.path.abspath(path)
        self.interval = interval
        self.watch = watch
        self._watcher = None              # agent.k8s.inotify.Watcher while watching
        self._watch_state = "off (watch: false)" if not watch else "not started"
        self._watch_logged = ""
        self.scans = 0
        self.default_namespace = default_namespace
        self._files: dict[str, _FileState] = {}
        self._owner: dict[ObjId, str] = {}
        self._published: dict[ObjId, Object] = {}
        self._dups_logged: set[tuple[ObjId, str]] = set()
        self._problems: dict[str, str] = {}
        self._scan_failure = ""
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
        if self.watch:
            from agent.k8s.inotify import Unavailable, Watcher
            try:
                self._watcher = Watcher()
            except (Unavailable, OSError) as exc:
                self._set_watch_state(f"polling every {self.interval:g}s: inotify is not "
                                      f"available ({exc.strerror or exc})")
        # The first scan runs before start() returns: a caller (the agent, the
        # demo, a test) has the directory's content as soon as it has a source.
        self.scan()
        self._thread = threading.Thread(target=self._run, name="k8s-directory", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.close()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._watcher is not None and not (self._thread and self._thread.is_alive()):
            self._watcher.release()

    def _set_watch_state(self, state: str, logged: Optional[str] = None) -> None:
        """What follows the directory between polls, for the status; logged
        when `logged` (the state without its counts) changes."""
        self._watch_state = state
        logged = state if logged is None else logged
        if logged == self._watch_logged:
            return
        self._watch_logged = logged
        healthy = state.startswith("inotify") and not (self._watcher and self._watcher.problems)
        (log.info if healthy else log.warning)("manifest directory %s: %s", self.root, state)

    def status(self) -> dict:
        out = super().status()
        out["watch"] = self._watch_state
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._watcher is not None:
                # early on a change, at the poll interval at the latest
                self._watcher.wait(self.interval)
            elif self._stop.wait(self.interval):
                break
            if self._stop.is_set():
                break
            try:
                self.scan()
                self._scan_failure = ""
            except Exception as exc:  # never let one bad scan end the source
                what = f"{type(exc).__name__}: {exc}"
                if what != self._scan_failure:      # once per distinct failure, not per poll
                    log.exception("scanning %s failed; retrying every %gs", self.root,
                                  self.interval)
                self._scan_failure = what

    def problems(self) -> list[str]:
        out = sorted(self._problems.values())
        if self._scan_failure:
            out.append(f"scanning failed: {self._scan_failure}")
        return out

    # ------------------------------------------------------------------ scan

    def _list_files(self) -> _Listing:
        """Every manifest file under the root, each real directory and file
        visited once (by device and inode) in a sorted depth-first walk. What
        is reached through a symbolic link is taken only after everything
        reached without one, so a link never takes a name from its target."""
        out = _Listing()
        seen_dirs: dict[tuple[int, int], str] = {}
        seen_files: dict[tuple[int, int], str] = {}
        try:
            st = os.stat(self.root)
        except OSError as exc:
            out.problems["root"] = f"cannot read {self.root}: {exc.strerror}; keeping its objects"
            out.unlisted.append("")
            return out
        seen_dirs[(st.st_dev, st.st_ino)] = "."
        # (path, rel, ancestors' (dev, ino)); popped in sorted order, links last
        stack = [(self.root, "", ((st.st_dev, st.st_ino),))]
        linked_dirs: list = []
        linked_files: list = []
        dirs = 0
        while stack or linked_dirs:
            if stack:
                path, rel, ancestors = stack.pop()
            else:
                path, rel, ancestors = linked_dirs.pop()
                first = seen_dirs.get(ancestors[-1])
                if first is not None:
                    kind = "a loop back to" if ancestors[-1] in ancestors[:-1] else \
                        "another path to"
                    out.problems[f"alias:{rel}"] = f"{rel} is {kind} {first}, already read; skipped"
                    continue
                seen_dirs[ancestors[-1]] = rel
            dirs += 1
            if dirs <= MAX_DIRS and len(ancestors) <= MAX_DEPTH:
                out.dirs.append(path)
            if dirs > MAX_DIRS or len(ancestors) > MAX_DEPTH:
                bound = (f"more than {MAX_DIRS} directories" if dirs > MAX_DIRS
                         else f"deeper than {MAX_DEPTH} levels at {rel}")
                out.problems["bound"] = (f"{self.root} holds {bound}: the rest is not read and "
                                         f"nothing is removed until it is within bounds")
                out.complete = False
                if dirs > MAX_DIRS:
                    break
                continue
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                out.problems[f"dir:{rel}"] = (f"cannot list {rel or self.root}: {exc.strerror}; "
                                              "keeping the objects of its files")
                out.unlisted.append(rel)
                continue
            subdirs = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                erel = f"{rel}/{e.name}" if rel else e.name
                try:
                    link = e.is_symlink()
                    est = e.stat()              # follows links: what the name leads to
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        out.problems[f"link:{erel}"] = f"{erel} is a symbolic link loop; skipped"
                    continue                    # dangling, or gone since the listing
                ident = (est.st_dev, est.st_ino)
                if stat.S_ISDIR(est.st_mode):
                    if link:
                        linked_dirs.append((e.path, erel, ancestors + (ident,)))
                    elif ident not in seen_dirs:    # a bind mount may repeat one
                        seen_dirs[ident] = erel
                        subdirs.append((e.path, erel, ancestors + (ident,)))
                    continue
                if not e.name.endswith(SUFFIXES):
                    continue
                if not stat.S_ISREG(est.st_mode):
                    out.problems[f"notfile:{erel}"] = f"{erel} is not a regular file; skipped"
                elif link:
                    linked_files.append((erel, est))
                else:
                    self._take_file(out, seen_files, erel, est)
            stack.extend(reversed(subdirs))
            # links found in this directory wait until no real directory is left
            if not stack:
                linked_dirs.reverse()
        for erel, est in linked_files:
            if self._take_file(out, seen_files, erel, est):
                out.linked.append(os.path.join(self.root, erel))
        return out

    @staticmethod
    def _take_file(out: _Listing, seen: dict, rel: str, st: os.stat_result) -> bool:
        ident = (st.st_dev, st.st_ino)
        first = seen.get(ident)
        if first is not None:
            out.problems[f"alias:{rel}"] = f"{rel} is another path to {first}, already read; skipped"
        elif len(out.files) >= MAX_FILES:
            out.problems["bound-files"] = (f"more than {MAX_FILES} manifest files: the rest is not "
                                           "read and nothing is removed until it is within bounds")
            out.complete = False
        else:
            seen[ident] = rel
            out.files[rel] = (st.st_mtime_ns, st.st_size)
            return True
        return False

    def _report(self, problems: dict[str, str]) -> None:
        """Log each problem when it appears and when it is gone; never per poll."""
        for key in problems.keys() - self._problems.keys():
            log.warning("manifest directory %s: %s", self.root, problems[key])
        for key in self._problems.keys() - problems.keys():
            log.info("manifest directory %s: no longer: %s", self.root, self._problems[key])
        self._problems = problems
        self.metrics.manifest_problems.set(len(problems))

    def _read(self, rel: str) -> bytes:
        """A manifest's content, never opening anything but a regular file
        and never reading more than MAX_FILE_BYTES."""
        fd = os.open(os.path.join(self.root, rel), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than the "
                              f"{MAX_FILE_BYTES} read")
            chunks, left = [], MAX_FILE_BYTES + 1
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            if len(data) > MAX_FILE_BYTES:
                raise OSError(errno.EFBIG, f"more than the {MAX_FILE_BYTES} bytes read")
            return data
        finally:
            os.close(fd)

    def scan(self) -> bool:
        """Read what changed since the last scan and apply it; True if anything did."""
        with self._scan_lock:
            return self._scan()

    def _scan(self) -> bool:
        self.scans += 1
        found = self._list_files()
        listing = found.files
        problems = dict(found.problems)
        w = self._watcher
        if w is not None and not w.closed:
            # watched from before the files are read: a write from now on
            # is either read by this scan or wakes the next one
            w.follow(found.dirs, found.linked)
            n = w.watching
            also = (f", polling every {self.interval:g}s as well"
                    + (f"; {'; '.join(sorted(w.problems.values()))}" if w.problems else ""))
            self._set_watch_state(f"inotify ({n} {'path' if n == 1 else 'paths'}){also}",
                                  f"inotify{also}")
        # files the listing could not judge keep what they had, as if unchanged
        carried = {rel for rel in self._files if rel not in listing and (not found.complete or any(
            d == "" or rel.startswith(d + "/") for d in found.unlisted))}
        touched: list[str] = []
        # File times have coarse (clock-tick) granularity: a same-size rewrite
        # within one tick keeps the same stat. Files modified that recently
        # are hashed again on every scan until their mtime is safely past.
        racy = time.time_ns() - _RACY_NS
        for rel, st in listing.items():
            prev = self._files.get(rel)
            if prev is not None and prev.stat == st and st[0] < racy:
                continue
            try:
                data = self._read(rel)
            except FileNotFoundError:
                continue        # gone since the listing: the next scan removes it
            except OSError as e:
                problems[f"read:{rel}"] = (f"cannot read {rel}: {e.strerror or e}"
                                           + ("; keeping its objects" if prev else ""))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if prev is not None and prev.digest == digest:
                prev.stat = st  # touched, not changed
                continue
            self._files[rel] = self._load_file(rel, st, digest, data, prev)
            touched.append(rel)
        removed = [rel for rel in self._files if rel not in listing and rel not in carried]
        for rel in removed:
            del self._files[rel]
            self.forget_origin(rel)
            log.info("manifest %s removed", rel)
        self.metrics.files.set(len(self._files))
        self._report(problems)
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
