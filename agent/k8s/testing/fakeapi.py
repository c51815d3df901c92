"""A protocol-faithful fake Kubernetes API server for the six resources fastpath watches.

No kube-apiserver can be installed on these machines, so the Kubernetes source
is tested (tests/k8s) and benchmarked (bench/sync_bench.py) against this: a
real HTTP/1.1 server on 127.0.0.1 speaking the wire protocol the official
client and client-go expect:

- list: `{"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion",
  "continue"}, "items": [...]}` with items in key order, `limit`/`continue`
  paging, and `fieldSelector` (spec.nodeName / metadata.name / metadata.namespace);
- watch (`?watch=true`): a chunked stream of one JSON event per line, from the
  requested resourceVersion (replaying history), synthetic ADDED events for
  resourceVersion "" or "0", BOOKMARK events when allowWatchBookmarks is set,
  ERROR with a 410 `Expired` Status when the resourceVersion predates the
  last compaction, a clean end at timeoutSeconds, and field-selector
  transitions (an object that starts or stops matching is ADDED or DELETED);
- one cluster-wide resourceVersion counter, as etcd has.

Also a GET of one namespaced object (`/api/v1/namespaces/<ns>/pods/<name>`
and the like: the object, or a 404 Status), delayed by `get_delay` seconds
when a test wants a slow API, and POSTed core/v1 Events
(`/api/v1/namespaces/<ns>/events`), kept in `events`.

Tests drive it: create/update/delete objects, `compact()` history,
`drop_connections()` (abrupt, mid-stream), `down()`/`up()` (connection
refused, then back on the same port), `bookmark_now()`.

Simplification kept on purpose: pages after the first are served from the
current state (keys after the continue key) rather than a historic read; the
watch from the list's resourceVersion replays anything that changed meanwhile,
so clients still converge, which is what the tests check.

Run standalone for benchmarks: `python -m agent.k8s.testing.fakeapi --populate
services=10000,endpoints=100000,pods=50000` prints `PORT <n>` and serves until
killed; POST /fake/burst?n=N makes N changes, GET /fake/stats reports counters.
"""
from __future__ import annotations

import bisect
import http.server
import json
import socket
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable, Optional

# path -> (kind, apiVersion, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "/api/v1/namespaces": ("Namespace", "v1", False),
    "/api/v1/pods": ("Pod", "v1", True),
    "/api/v1/nodes": ("Node", "v1", False),
    "/api/v1/services": ("Service", "v1", True),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1", True),
    "/apis/networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", "networking.k8s.io/v1", True),
}
KINDS = {kind: (path, av, ns) for path, (kind, av, ns) in RESOURCES.items()}

Key = tuple[str, str]


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _field_predicate(selector: str) -> Callable[[dict], bool]:
    """Field selectors the API server supports for these kinds (=, ==, != ; comma = AND)."""
    if not selector:
        return lambda o: True
    terms = []
    for term in selector.split(","):
        if "!=" in term:
            f, v = term.split("!=", 1)
            neg = True
        else:
            f, v = term.replace("==", "=").split("=", 1)
            neg = False
        terms.append((f.strip(), v.strip(), neg))

    def get(o: dict, path: str) -> str:
        cur: Any = o
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        return "" if cur is None else str(cur)

    return lambda o: all((get(o, f) == v) != neg for f, v, neg in terms)


class _Event:
    __slots__ = ("rv", "kind", "type", "key", "obj", "old")

    def __init__(self, rv, kind, type_, key, obj, old):
        self.rv, self.kind, self.type, self.key, self.obj, self.old = rv, kind, type_, key, obj, old


class FakeAPIServer:
    """The fake server and the knobs a test turns. Thread-safe."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 bookmark_interval: Optional[float] = None,
                 max_watch_seconds: Optional[float] = None):
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[str, dict[Key, dict]] = {k: {} for k in KINDS}
        self._raw: dict[str, dict[Key, bytes]] = {k: {} for k in KINDS}
        self._kind_rv: dict[str, int] = {k: 0 for k in KINDS}
        self._sorted: dict[str, tuple[int, list[Key]]] = {}
        self._history: list[_Event] = []
        self._history_rvs: list[int] = []
        self._floor = 1              # watches from an older resourceVersion get 410
        self._drop_gen = 0
        self._bookmark_gen = 0
        self._down = False
        self._httpd: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.stats = {"list": 0, "watch": 0, "expired": 0, "bookmarks": 0,
                      "events": 0, "dropped": 0, "refused_while_down": 0}
        self.requests: list[str] = []   # request lines, for tests asserting parameters
        self.events: list[dict] = []    # Events POSTed by clients
        self.get_delay = 0.0            # seconds before a single-object GET is answered

    # ------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "FakeAPIServer":
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="fakeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.down()

    def down(self) -> None:
        """Stop listening and cut every open connection: the API is unreachable."""
        # Also refuses requests already accepted but not yet handled.
        self._down = True
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        self.drop_connections()

    def up(self) -> None:
        """Listen again on the same port (after down())."""
        if self._httpd is None:
            self.start()
        self._down = False

    def __enter__(self) -> "FakeAPIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ mutations

    @property
    def resource_version(self) -> int:
        return self._rv

    def _commit(self, kind: str, type_: str, key: Key, obj: Optional[dict],
                old: Optional[dict]) -> int:
        # Caller holds self._cond.
        self._rv += 1
        rv = self._rv
        if obj is not None:
            obj.setdefault("metadata", {})["resourceVersion"] = str(rv)
        if type_ == "DELETED":
            # The DELETED event carries the last state at the deletion's version.
            obj = json.loads(json.dumps(old))
            obj["metadata"]["resourceVersion"] = str(rv)
            self._objects[kind].pop(key, None)
            self._raw[kind].pop(key, None)
        else:
            self._objects[kind][key] = obj
            self._raw[kind][key] = json.dumps(obj, separators=(",", ":")).encode()
        self._kind_rv[kind] = rv
        self._history.append(_Event(rv, kind, type_, key, obj, old))
        self._history_rvs.append(rv)
        return rv

    @staticmethod
    def _key(kind: str, obj: dict) -> Key:
        md = obj.get("metadata") or {}
        ns = md.get("namespace", "") if KINDS[kind][2] else ""
        return (ns, md["name"])

    def apply(self, obj: dict) -> int:
        """Create or replace an object (like a PUT/POST); returns its resourceVersion."""
        return self.apply_many([obj])

    def apply_many(self, objs: list[dict]) -> int:
        with self._cond:
            rv = self._rv
            for o in objs:
                rv = self._apply_locked(o)
            self._cond.notify_all()
            return rv

    def _apply_locked(self, o: dict) -> int:
        o = json.loads(json.dumps(o))
        kind = o.pop("kind")
        o.pop("apiVersion", None)
        key = self._key(kind, o)
        md = o["metadata"]
        old = self._objects[kind].get(key)
        md.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        md.setdefault("creationTimestamp", "2024-01-01T00:00:00Z")
        return self._commit(kind, "MODIFIED" if old else "ADDED", key, o, old)

    def delete(self, kind: str, namespace: str, name: str) -> Optional[int]:
        with self._cond:
            key = (namespace if KINDS[kind][2] else "", name)
            old = self._objects[kind].get(key)
            if old is None:
                return None
            rv = self._commit(kind, "DELETED", key, None, old)
            self._cond.notify_all()
            return rv

    def get(self, kind: str, namespace: str, name: str) -> Optional[dict]:
        with self._cond:
            o = self._objects[kind].get((namespace if KINDS[kind][2] else "", name))
            return json.loads(json.dumps(o)) if o is not None else None

    def compact(self) -> int:
        """Forget history: watches from any older resourceVersion now get 410 Gone."""
        with self._cond:
            self._floor = self._rv
            self._history.clear()
            self._history_rvs.clear()
            return self._floor

    def drop_connections(self) -> None:
        """Cut every open watch mid-stream, without a terminating chunk."""
        with self._cond:
            self._drop_gen += 1
            self._cond.notify_all()

    def bookmark_now(self) -> None:
        with self._cond:
            self._bookmark_gen += 1
            self._cond.notify_all()

    def watchers(self) -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("fakeapi-watch"))

    # ------------------------------------------------------------- serving

    def _sorted_keys(self, kind: str) -> list[Key]:
        cached = self._sorted.get(kind)
        if cached is None or cached[0] != self._kind_rv[kind]:
            cached = (self._kind_rv[kind], sorted(self._objects[kind]))
            self._sorted[kind] = cached
        return cached[1]

    def list_body(self, kind: str, query: dict[str, str]) -> tuple[int, bytes]:
        _, av, _ = KINDS[kind]
        pred = _field_predicate(query.get("fieldSelector", ""))
        limit = int(query.get("limit") or 0)
        cont = query.get("continue", "")
        with self._cond:
            self.stats["list"] += 1
            keys = self._sorted_keys(kind)
            start = 0
            rv = self._rv
            if cont:
                try:
                    tok = json.loads(urllib.parse.unquote(cont))
                    rv = int(tok["rv"])
                    start = bisect.bisect_right(keys, tuple(tok["key"]))
                except (ValueError, KeyError, TypeError):
                    return 400, json.dumps(_status(400, "BadRequest", "invalid continue token")).encode()
                if rv < self._floor:
                    return 410, json.dumps(_status(
                        410, "Expired", "The provided continue parameter is too old")).encode()
            objs, raws = self._objects[kind], self._raw[kind]
            items: list[bytes] = []
            last: Optional[Key] = None
            i = start
            while i < len(keys) and (not limit or len(items) < limit):
                k = keys[i]
                if pred(objs[k]):
                    items.append(raws[k])
                last = k
                i += 1
            more = i < len(keys)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if more and last is not None:
            meta["continue"] = json.dumps({"rv": rv, "key": list(last)}, separators=(",", ":"))
            meta["remainingItemCount"] = len(keys) - i
        head = json.dumps({"kind": kind + "List", "apiVersion": av, "metadata": meta})
        body = head[:-1].encode() + b',"items":[' + b",".join(items) + b"]}"
        return 200, body

    def _event_line(self, type_: str, kind: str, obj: dict) -> bytes:
        _, av, _ = KINDS[kind]
        o = {"kind": kind, "apiVersion": av, **obj}
        return json.dumps({"type": type_, "object": o}, separators=(",", ":")).encode() + b"\n"

    def serve_watch(self, kind: str, query: dict[str, str], write: Callable[[bytes], None],
                    abort: Callable[[], None], drop_gen: Optional[int] = None) -> None:
        """Stream watch events through `write` until timeout, drop or client gone."""
        pred = _field_predicate(query.get("fieldSelector", ""))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(query.get("timeoutSeconds") or 1800)
        if self.max_watch_seconds is not None:
            timeout = min(timeout, self.max_watch_seconds)
        deadline = time.monotonic() + timeout
        rv_param = query.get("resourceVersion", "")
        with self._cond:
            self.stats["watch"] += 1
            if drop_gen is None:
                drop_gen = self._drop_gen
            bm_gen = self._bookmark_gen
            out: list[bytes] = []
            if rv_param in ("", "0"):
                cursor = self._rv
                for k in self._sorted_keys(kind):
                    if pred(self._objects[kind][k]):
                        out.append(self._event_line("ADDED", kind, self._objects[kind][k]))
            else:
                try:
                    cursor = int(rv_param)
                except ValueError:
                    cursor = -1
                if cursor < self._floor:
                    self.stats["expired"] += 1
                    msg = f"too old resource version: {rv_param} ({self._floor})"
                    write(json.dumps({"type": "ERROR", "object": _status(410, "Expired", msg)})
                          .encode() + b"\n")
                    return
        last_bookmark = time.monotonic()
        # Items to send: (type, object) pairs or ready-made lines. Objects are
        # serialised outside the lock and written in small batches, so a burst
        # streams to the client while it is still being encoded.
        todo: list = out
        while True:
            batch: list[bytes] = []
            for item in todo:
                batch.append(item if isinstance(item, bytes) else self._event_line(item[0], kind, item[1]))
                if len(batch) >= 32:
                    write(b"".join(batch))
                    batch = []
            if batch:
                write(b"".join(batch))
            todo = []
            with self._cond:
                while True:
                    if self._drop_gen != drop_gen or self._down:
                        self.stats["dropped"] += 1
                        abort()
                        return
                    i = bisect.bisect_right(self._history_rvs, cursor)
                    pending = self._history[i:] if i < len(self._history) else []
                    now = time.monotonic()
                    bm_due = bookmarks and (
                        self._bookmark_gen != bm_gen or
                        (self.bookmark_interval is not None
                         and now - last_bookmark >= self.bookmark_interval))
                    if pending or bm_due or now >= deadline:
                        break
                    wait = deadline - now
                    if bookmarks and self.bookmark_interval is not None:
                        wait = min(wait, self.bookmark_interval - (now - last_bookmark))
                    self._cond.wait(max(0.0, min(wait, 1.0)))
                for ev in pending:
                    cursor = ev.rv
                    if ev.kind != kind:
                        continue
                    now_match = ev.type != "DELETED" and pred(ev.obj)
                    was_match = ev.old is not None and pred(ev.old)
                    if ev.type == "DELETED":
                        t = "DELETED" if was_match else None
                    elif now_match:
                        t = "MODIFIED" if was_match else "ADDED"
                    else:
                        # Stopped matching the selector: to this watcher it is gone.
                        t = "DELETED" if was_match else None
                    if t is not None:
                        # History objects are never mutated after commit, so
                        # they can be encoded after the lock is released.
                        todo.append((t, ev.obj))
                        self.stats["events"] += 1
                if bm_due:
                    bm_gen = self._bookmark_gen
                    # Under the lock every event up to the current version has
                    # just been handled, so the bookmark may claim all of it.
                    cursor = max(cursor, self._rv)
                    todo.append(self._bookmark_line(kind, cursor))
                    last_bookmark = time.monotonic()
                if not pending and not bm_due and time.monotonic() >= deadline:
                    if bookmarks:
                        # Like the API server, a last bookmark before a watch
                        # ends on its timeout, so the client resumes from here.
                        todo.append(self._bookmark_line(kind, self._rv))
                    if todo:
                        write(b"".join(todo))
                    return

    def _bookmark_line(self, kind: str, rv: int) -> bytes:
        # Caller holds self._cond.
        self.stats["bookmarks"] += 1
        return json.dumps({"type": "BOOKMARK", "object": {
            "kind": kind, "apiVersion": KINDS[kind][1],
            "metadata": {"resourceVersion": str(rv)}}}).encode() + b"\n"

    # ------------------------------------------------------------ benchmarks

    def burst(self, n: int) -> int:
        """Make n changes, each one visible to a store as exactly one delta.

        All changes are prepared first and committed together, so watchers
        receive them as fast as they can read: a benchmark then measures the
        client, not this server's preparation."""
        from agent.k8s.testing.objects import burst_changes
        with self._cond:
            snapshot = {k: dict(v) for k, v in self._objects.items()}
        ops = list(burst_changes(snapshot, n))
        with self._cond:
            for op, payload in ops:
                if op == "apply":
                    self._apply_locked(payload)
                else:
                    kind, ns, name = payload
                    key = (ns if KINDS[kind][2] else "", name)
                    old = self._objects[kind].get(key)
                    if old is not None:
                        self._commit(kind, "DELETED", key, None, old)
            self._cond.notify_all()
        return n


def _single_object(path: str) -> Optional[tuple[str, str, str]]:
    """(kind, namespace, name) of a GET of one namespaced object, else None."""
    parts = path.strip("/").split("/")
    try:
        i = parts.index("namespaces")
    except ValueError:
        return None
    if len(parts) != i + 4:
        return None
    plural = "/" + "/".join(parts[:i] + [parts[i + 2]])
    res = RESOURCES.get(plural)
    if res is None or not res[2]:
        return None
    return res[0], parts[i + 1], parts[i + 3]


def _events_path(path: str) -> Optional[str]:
    """The namespace of a POST of a core/v1 Event, else None."""
    parts = path.strip("/").split("/")
    if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "events":
        return parts[3]
    return None


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, fake: FakeAPIServer):
        self.fake = fake
        super().__init__(addr, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, fmt, *args) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        fake = self.server.fake
        if fake._down:
            self.stats_refused(fake)
            return
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        fake.requests.append(self.path)
        if url.path == "/fake/stats":
            self._send(200, json.dumps({**fake.stats, "resourceVersion": fake._rv}).encode())
            return
        res = RESOURCES.get(url.path.rstrip("/"))
        if res is None:
            one = _single_object(url.path)
            if one is not None:
                kind, ns, name = one
                if fake.get_delay:
                    time.sleep(fake.get_delay)
                obj = fake.get(kind, ns, name)
                if obj is None:
                    self._send(404, json.dumps(_status(
                        404, "NotFound", f'{kind.lower()}s "{name}" not found')).encode())
                    return
                obj = {"kind": kind, "apiVersion": KINDS[kind][1], **obj}
                self._send(200, json.dumps(obj).encode())
                return
            self._send(404, json.dumps(_status(404, "NotFound", f"{url.path} not found")).encode())
            return
        kind = res[0]
        if query.get("watch") in ("true", "1"):
            self._watch(fake, kind, query)
            return
        code, body = fake.list_body(kind, query)
        self._send(code, body)

    def stats_refused(self, fake: FakeAPIServer) -> None:
        fake.stats["refused_while_down"] += 1
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_POST(self) -> None:
        fake = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if url.path == "/fake/burst":
            t0 = time.monotonic()
            fake.burst(int(query.get("n", "1000")))
            self._send(200, json.dumps({"seconds": time.monotonic() - t0,
                                        "resourceVersion": fake._rv}).encode())
        elif url.path == "/fake/apply":
            rv = fake.apply_many(json.loads(body))
            self._send(200, json.dumps({"resourceVersion": rv}).encode())
        elif url.path == "/fake/compact":
            self._send(200, json.dumps({"floor": fake.compact()}).encode())
        elif url.path == "/fake/drop":
            fake.drop_connections()
            self._send(200, b"{}")
        elif _events_path(url.path) is not None:
            if fake._down:
                self.stats_refused(fake)
                return
            ev = json.loads(body)
            ev.setdefault("metadata", {})["namespace"] = _events_path(url.path)
            ev["metadata"].setdefault("name", ev["metadata"].get("generateName", "ev.")
                                      + uuid.uuid4().hex[:8])
            with fake._cond:
                fake.events.append(ev)
            self._send(201, json.dumps(ev).encode())
        else:
            self._send(404, b"{}")

    def _watch(self, fake: FakeAPIServer, kind: str, query: dict[str, str]) -> None:
        threading.current_thread().name = "fakeapi-watch"
        # Taken before the response starts: a drop requested once the client
        # has its headers must reach this stream.
        drop_gen = fake._drop_gen
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        aborted = []

        def write(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def abort() -> None:
            # An abrupt end: no terminating chunk, the TCP connection just goes.
            aborted.append(True)
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        try:
            fake.serve_watch(kind, query, write, abort, drop_gen)
            if not aborted:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True


def main(argv: Optional[list[str]] = None) -> None:
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--populate", default="",
                    help="e.g. services=10000,endpoints=100000,pods=50000,nodes=100")
    ap.add_argument("--bookmark-interval", type=float, default=None)
    args = ap.parse_args(argv)
    fake = FakeAPIServer(port=args.port, bookmark_interval=args.bookmark_interval)
    if args.populate:
        from agent.k8s.testing.objects import populate
        spec = {k: int(v) for k, v in (kv.split("=") for kv in args.populate.split(","))}
        fake.apply_many(populate(**spec))
        fake.compact()  # clients list first; the creation history is not needed
        # The populated cluster lives as long as the process: keep the cyclic
        # collector from re-traversing it, so this server is never the
        # bottleneck of the client it serves.
        import gc
        gc.collect()
        gc.freeze()
    fake.start()
    print(f"PORT {fake.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
        sys.exit(0)


if __name__ == "__main__":
    main()
