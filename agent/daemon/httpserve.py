"""A small HTTP/1.1 server whose cost per client is bounded, for the agent's
health and metrics endpoints.

The listener may face the node's network (Prometheus scrapes it from the
VPC), so a client that connects and then sends nothing, or one byte now and
then, must not hold a thread or grow memory. Each listener is one thread
running a selector over its connections (non-blocking accept, reads and
writes) plus a fixed pool of `workers` threads that only ever run complete
requests. What a client can cost:

  - a connection slot: at most `max_connections` per listener. At the cap,
    a new connection takes the slot of the oldest one still sending its
    request (a half-sent request is the cheap attack; a complete one is
    already being answered); if every slot holds a complete request, no
    connection is accepted until one is answered (newcomers wait in the
    kernel's accept queue);
  - time: the request line and headers must arrive within `timeout`
    seconds of the accept, the body (if any) within `timeout` of the
    headers, and the answer must be taken within `timeout` of being ready;
    a request that waited longer than `timeout` for a worker is dropped
    unanswered (its client gave up long ago);
  - memory: the request line and headers at most MAX_HEADER_BYTES, a body
    at most MAX_BODY_BYTES (read and discarded: GET and HEAD only).

One request per connection (`Connection: close`): probes and scrapes open a
connection per request anyway.
"""
from __future__ import annotations

import collections
import errno
import logging
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("fastpath.http")

MAX_HEADER_BYTES = 8 << 10
MAX_BODY_BYTES = 4 << 10
# Few accepts per wakeup, so that the reads of connections already accepted
# are served between them: a flood of new connections cannot turn over every
# slot (evicting requests whose bytes wait unread) in one pass.
ACCEPTS_PER_WAKEUP = 8
# The kernel's queue of connections not yet accepted. A burst of connects
# larger than it has SYNs dropped, and a probe caught in one waits a 1 s
# retransmit; queued connections cost kernel memory only (each is
# accepted, and takes a slot by the rules above, within the burst).
LISTEN_BACKLOG = 1024

# (status, content type, body) for a path; the handler may take its time
# (it runs on a worker), and may raise: that is a 500.
Handler = Callable[[str], tuple[int, str, bytes]]

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           411: "Length Required", 413: "Content Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}

RECEIVING, QUEUED, SENDING = "receiving", "queued", "sending"


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    accepted: float
    deadline: float
    state: str = RECEIVING
    buf: bytearray = field(default_factory=bytearray)
    head_end: int = -1          # offset just past the blank line ending the headers
    body_left: int = 0
    method: str = ""
    path: str = ""
    out: bytes = b""
    sent: int = 0


def response(status: int, ctype: str, body: bytes, head_only: bool = False,
             extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             f"Content-Type: {ctype}", f"Content-Length: {len(body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


def _error(status: int, why: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    return response(status, "text/plain; charset=utf-8", f"{why}\n".encode(), extra=extra)


class Listener:
    """One listening socket with its selector thread and worker pool."""

    def __init__(self, sock: socket.socket, handler: Handler, *, name: str,
                 max_connections: int, timeout: float, workers: int = 2):
        self.sock = sock
        self.handler = handler
        self.name = name
        self.max_connections = max_connections
        self.timeout = timeout
        self.conns: dict[socket.socket, _Conn] = {}
        self.stats = collections.Counter()      # what happened to connections, for tests/logs
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._done: collections.deque = collections.deque()
        self._work: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers = workers
        self._paused = False        # every slot holds a complete request: not accepting

    # -- lifecycle --------------------------------------------------------------
    @classmethod
    def bind(cls, host: str, port: int, handler: Handler, **kw) -> "Listener":
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        bound = sock.getsockname()
        shown = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else \
            f"{bound[0]}:{bound[1]}"
        return cls(sock, handler, name=shown, **kw)

    def start(self) -> "Listener":
        self.sock.setblocking(False)
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel.register(self.sock, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._threads = [threading.Thread(target=self._loop, name=f"http-{self.name}",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._work_loop, daemon=True,
                                           name=f"http-{self.name}-w{i}")
                          for i in range(self._workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for _ in range(self._workers):
            self._work.put(None)
        self._wake()
        for t in self._threads:
            t.join(timeout=5)
        for c in list(self.conns.values()):
            self._close(c, "stopped")
        self._sel.close()
        for s in (self.sock, self._wake_r, self._wake_w):
            s.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass        # a wakeup is already pending (or we are closing)

    # -- the selector thread ------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            wait = min([c.deadline for c in self.conns.values() if c.state != QUEUED],
                       default=now + 1.0) - now
            try:
                events = self._sel.select(timeout=max(0.0, min(wait, 1.0)))
            except OSError:
                if self._stop.is_set():
                    return
                raise
            for key, mask in events:
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    try:
                        while self._wake_r.recv(512):
                            pass
                    except BlockingIOError:
                        pass
                elif mask & selectors.EVENT_READ:
                    self._read(key.data)
                elif mask & selectors.EVENT_WRITE:
                    self._write(key.data)
            while self._done:
                conn, data = self._done.popleft()
                if conn.sock not in self.conns:
                    continue
                if data is None:
                    self._close(conn, "timeout-queued")
                else:
                    self._answer(conn, data)
            now = time.monotonic()
            for c in [c for c in self.conns.values() if c.state != QUEUED and c.deadline < now]:
                self._close(c, f"timeout-{c.state}")

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if len(self.conns) >= self.max_connections and not any(
                    c.state == RECEIVING for c in self.conns.values()):
                self._sel.unregister(self.sock)      # resumed when a slot frees
                self._paused = True
                self.stats["paused"] += 1
                return
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # the connection stays queued and the listener readable:
                    # pause rather than spin until descriptors are free again
                    log.warning("http %s: cannot accept: %s", self.name, exc.strerror)
                    time.sleep(0.1)
                    return
                raise
            sock.setblocking(False)
            now = time.monotonic()
            if len(self.conns) >= self.max_connections:
                self._evict()
            peer = addr[0] if isinstance(addr, tuple) else str(addr)
            conn = _Conn(sock, peer, now, now + self.timeout)
            self.conns[sock] = conn
            self.stats["accepted"] += 1
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> None:
        """Free the slot of the oldest connection still sending its request.
        A candidate's socket is read first: a probe whose request already sits
        in the kernel's buffer (sent right after its connect, not yet read
        because accepts came first in this wakeup) is complete, not idle."""
        for c in sorted((c for c in self.conns.values() if c.state == RECEIVING),
                        key=lambda c: c.accepted):
            self._read(c)
            if c.sock in self.conns and c.state == RECEIVING:
                self._close(c, "evicted")
                return
            if c.sock not in self.conns:
                return          # reading found it closed: its slot is free

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn, "client-closed")
            return
        if conn.head_end < 0:
            conn.buf += chunk
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.buf) > MAX_HEADER_BYTES:
                    self._reject(conn, 431, f"request line and headers exceed "
                                            f"{MAX_HEADER_BYTES} bytes")
                return
            if end + 4 > MAX_HEADER_BYTES:
                self._reject(conn, 431, f"request line and headers exceed {MAX_HEADER_BYTES} "
                                        "bytes")
                return
            conn.head_end = end + 4
            problem = self._parse_head(conn)
            if problem:
                self._reject(conn, *problem)
                return
            extra = len(conn.buf) - conn.head_end
            del conn.buf[:]
            conn.body_left -= extra
            conn.deadline = time.monotonic() + self.timeout     # the body's own time
        else:
            conn.body_left -= len(chunk)                         # read and discarded
        if conn.body_left <= 0:
            self._queue(conn)

    def _parse_head(self, conn: _Conn) -> tuple | None:
        lines = conn.buf[:conn.head_end - 4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[1].startswith("/"):
            return 400, "malformed request line"
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            return 505, "HTTP/1.x only"
        length = 0
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                return 400, "malformed header line"
            name = name.strip().lower()
            if name == "transfer-encoding":
                return 411, "chunked bodies are not accepted; send Content-Length"
            if name == "content-length":
                v = value.strip()
                if not v.isdigit():
                    return 400, "malformed Content-Length"
                length = int(v)
        if length > MAX_BODY_BYTES:
            return 413, f"bodies over {MAX_BODY_BYTES} bytes are not accepted"
        if method not in ("GET", "HEAD"):
            return 405, "GET or HEAD only", (("Allow", "GET, HEAD"),)
        conn.method, conn.path, conn.body_left = method, target.split("?", 1)[0], length
        return None

    def _reject(self, conn: _Conn, status: int, why: str, extra=()) -> None:
        self.stats[f"rejected-{status}"] += 1
        self._answer(conn, _error(status, why, extra))

    def _queue(self, conn: _Conn) -> None:
        self._sel.unregister(conn.sock)
        conn.state = QUEUED
        conn.deadline = time.monotonic() + self.timeout      # how long it may wait for a worker
        self._work.put(conn)

    def _answer(self, conn: _Conn, data: bytes) -> None:
        if conn.state == RECEIVING:
            self._sel.unregister(conn.sock)
        conn.state, conn.out, conn.sent = SENDING, data, 0
        conn.deadline = time.monotonic() + self.timeout
        self._write(conn, register=True)

    def _write(self, conn: _Conn, register: bool = False) -> None:
        try:
            conn.sent += conn.sock.send(conn.out[conn.sent:])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(conn, "client-closed")
            return
        if conn.sent >= len(conn.out):
            self.stats["answered"] += 1
            self._close(conn, None)
        elif register:
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)

    def _close(self, conn: _Conn, why: str | None) -> None:
        if why:
            self.stats[why] += 1
        if self.conns.pop(conn.sock, None) is None:
            return
        if conn.state != QUEUED:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
        if self._paused and not self._stop.is_set():
            self._paused = False
            self._sel.register(self.sock, selectors.EVENT_READ, "accept")

    # -- workers --------------------------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            conn = self._work.get()
            if conn is None:
                return
            if time.monotonic() > conn.deadline:
                data = None             # waited past its time: its client has given up
            else:
                try:
                    status, ctype, body = self.handler(conn.path)
                    data = response(status, ctype, body, head_only=conn.method == "HEAD")
                except Exception as exc:       # one request must never end the listener
                    log.exception("http %s: %s %s failed", self.name, conn.method, conn.path)
                    data = _error(500, f"{type(exc).__name__}: {exc}")
            self._done.append((conn, data))
            self._wake()


__all__ = ["Listener", "MAX_BODY_BYTES", "MAX_HEADER_BYTES", "response"]
