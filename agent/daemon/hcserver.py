"""healthCheckNodePort: the HTTP answer cloud load balancers steer by.

For a Service of type LoadBalancer with externalTrafficPolicy Local, the API
server allocates a healthCheckNodePort and the cloud load balancer probes
every node on it: a node with local endpoints must say yes, one without
must say no, or the load balancer sends clients to a node that drops them.
kube-proxy answers on that port on each of the node's NodePort addresses,
of both families (a proxier per family); fastpath's agent answers the same
way, on the IPv4 and the IPv6 NodePort addresses (what load balancers parse):

    HTTP 200 when the node has ready local endpoints and the proxy is
    healthy, else 503; headers Content-Type: application/json,
    X-Content-Type-Options: nosniff, X-Load-Balancing-Endpoint-Weight: <n>;
    body {"service": {"namespace", "name"}, "localEndpoints": <n>,
          "serviceProxyHealthy": <bool>}

for any request path. <n> is the number of distinct addresses of ready
endpoints on this node (agent.lb.compile.health_check); the proxy is
healthy once the service maps have been synced and no failed write is
pending (ServiceSync.healthy).

One thread serves every port (a selector over the listening sockets and
their connections); each connection gets one answer and is closed. The
sockets are made in the node's network namespace (`netns`), so the agent
can serve a simulated node from outside it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Optional

from agent.datapath.nsenter import in_netns
from agent.k8s.model import Key
from agent.lb.compile import HealthCheck

log = logging.getLogger("fastpath.healthcheck")

REQUEST_LIMIT = 8192          # bytes of request we read before answering anyway
CONNECTION_TIMEOUT = 5.0      # seconds a client may take to send its request


def answer(service: Key, local_endpoints: int, proxy_healthy: bool) -> bytes:
    """The whole HTTP response for one probe."""
    ok = local_endpoints > 0 and proxy_healthy
    body = json.dumps({"service": {"namespace": service[0], "name": service[1]},
                       "localEndpoints": local_endpoints,
                       "serviceProxyHealthy": proxy_healthy}, indent="\t").encode()
    status = "200 OK" if ok else "503 Service Unavailable"
    head = (f"HTTP/1.1 {status}\r\n"
            "Content-Type: application/json\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            f"X-Load-Balancing-Endpoint-Weight: {local_endpoints}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


class _Conn:
    __slots__ = ("sock", "key", "buf", "deadline", "out")

    def __init__(self, sock: socket.socket, key: Key):
        self.sock = sock
        self.key = key
        self.buf = b""
        self.deadline = time.monotonic() + CONNECTION_TIMEOUT
        self.out = b""


class HealthCheckServer:
    """Listens on each healthCheckNodePort of `sync()`'s checks, on every
    address `addresses_fn()` gives (empty: all addresses)."""

    def __init__(self, addresses_fn: Callable[[], tuple[str, ...]], netns: Optional[str] = None,
                 healthy_fn: Callable[[], bool] = lambda: True):
        self.addresses_fn = addresses_fn
        self.netns = netns
        self.healthy_fn = healthy_fn
        self.checks: dict[Key, HealthCheck] = {}
        self.failed: dict[tuple[str, int], str] = {}   # (address, port) -> why it is not served
        self.answered = 0
        self._lock = threading.Lock()
        self._listeners: dict[tuple[str, int], tuple[socket.socket, Key]] = {}
        self._conns: dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="healthcheck-nodeports",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ control

    def sync(self, checks: Mapping[Key, HealthCheck]) -> None:
        """Serve exactly `checks` (by Service): new ports are opened, gone or
        moved ones closed, counts updated for the next probe. A port that
        cannot be bound (in use) is logged and tried again next time."""
        addrs = tuple(self.addresses_fn()) or ("0.0.0.0",)
        want = {(ip, hc.port): key for key, hc in checks.items() for ip in addrs}
        with self._lock:
            self.checks = dict(checks)
            for where, (sock, key) in list(self._listeners.items()):
                if want.get(where) != key:
                    self._sel.unregister(sock)
                    sock.close()
                    del self._listeners[where]
            failed = {}
            for where, key in want.items():
                if where in self._listeners:
                    continue
                try:
                    sock = self._listen(*where)
                except OSError as exc:
                    failed[where] = exc.strerror or str(exc)
                    if self.failed.get(where) != failed[where]:
                        log.error("healthCheckNodePort %s:%d of %s/%s cannot be served: %s",
                                  where[0], where[1], key[0], key[1], failed[where])
                    continue
                self._listeners[where] = (sock, key)
                self._sel.register(sock, selectors.EVENT_READ, ("listen", key))
                log.info("healthCheckNodePort %s:%d serves %s/%s", where[0], where[1], *key)
            self.failed = failed
        self._wake()

    def ports(self) -> dict[tuple[str, int], Key]:
        with self._lock:
            return {w: k for w, (_, k) in self._listeners.items()}

    def stop(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for sock, _ in self._listeners.values():
                sock.close()
            self._listeners.clear()
            for c in self._conns.values():
                c.sock.close()
            self._conns.clear()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _listen(self, ip: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with in_netns(self.netns):
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" must not take the IPv4 side too: its IPv4 addresses
                # are the IPv4 NodePort list's to serve (or not)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((ip, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    # ------------------------------------------------------------ serving

    def _run(self) -> None:
        while not self._stop:
            try:
                events = self._sel.select(timeout=1.0)
            except OSError:
                continue
            with self._lock:
                for sk, mask in events:
                    kind, key = sk.data
                    if kind == "wake":
                        try:
                            os.read(self._wake_r, 512)
                        except OSError:
                            pass
                    elif kind == "listen":
                        self._accept(sk.fileobj, key)
                    else:
                        self._io(sk.fileobj, mask)
                self._expire()

    def _accept(self, lsock: socket.socket, key: Key) -> None:
        try:
            sock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                log.warning("healthCheckNodePort accept: %s", exc)
            return
        sock.setblocking(False)
        self._conns[sock.fileno()] = _Conn(sock, key)
        self._sel.register(sock, selectors.EVENT_READ, ("conn", key))

    def _io(self, sock: socket.socket, mask: int) -> None:
        c = self._conns.get(sock.fileno())
        if c is None:
            return
        try:
            if mask & selectors.EVENT_READ and not c.out:
                data = sock.recv(4096)
                if not data:
                    self._close(c)
                    return
                c.buf += data
                if b"\r\n\r\n" in c.buf or b"\n\n" in c.buf or len(c.buf) >= REQUEST_LIMIT:
                    hc = self.checks.get(c.key)
                    n = hc.local_endpoints if hc is not None else 0
                    c.out = answer(c.key, n, bool(self.healthy_fn()))
                    self.answered += 1
                    self._sel.modify(sock, selectors.EVENT_WRITE, ("conn", c.key))
            elif mask & selectors.EVENT_WRITE and c.out:
                sent = sock.send(c.out)
                c.out = c.out[sent:]
                if not c.out:
                    self._close(c)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)

    def _expire(self) -> None:
        now = time.monotonic()
        for c in [c for c in self._conns.values() if c.deadline < now]:
            self._close(c)

    def _close(self, c: _Conn) -> None:
        self._conns.pop(c.sock.fileno(), None)
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
