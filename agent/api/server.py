"""Serve the framed protocol (agent/api/wire.py) on the agent's unix socket.

Each connection gets a thread; each request is dispatched to the handler's
method named `rpc_<Method>` with the params as keyword arguments. Handler
exceptions become error replies with a code, never a dropped connection.
"""
from __future__ import annotations

import logging
import os
import socket
import threading

from agent.api import wire

log = logging.getLogger("fastpath.api")


class ApiError(Exception):
    """Raised by handlers for errors a client can act on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ApiServer:
    def __init__(self, path: str, handler):
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)     # a previous agent's socket; we are its successor
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)
        s.listen(128)
        s.settimeout(0.5)
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, name="api-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        if self._sock:
            self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            try:
                req = wire.recv_frame(conn)
            except (wire.WireError, OSError, ValueError) as exc:
                log.debug("bad request: %s", exc)
                return
            wire.send_frame(conn, self.dispatch(req))

    def dispatch(self, req) -> dict:
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            return {"ok": False, "error": {"code": "bad-request", "message": "no method"}}
        fn = getattr(self.handler, f"rpc_{req['method']}", None)
        if fn is None:
            return {"ok": False, "error": {"code": "unknown-method",
                                           "message": f"unknown method {req['method']}"}}
        params = req.get("params") or {}
        if not isinstance(params, dict):
            return {"ok": False, "error": {"code": "bad-request", "message": "params not an object"}}
        try:
            return {"ok": True, "result": fn(**params)}
        except ApiError as exc:
            return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}
        except TypeError as exc:
            return {"ok": False, "error": {"code": "bad-request", "message": str(exc)}}
        except Exception as exc:  # the agent must survive any one request
            log.exception("request %s failed", req["method"])
            return {"ok": False, "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
