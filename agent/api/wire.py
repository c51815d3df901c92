"""The agent's framed request/response protocol on its unix socket.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON. A request is {"method": str, "params": {...}}; a reply is
{"ok": true, "result": ...} or {"ok": false, "error": {"code": str,
"message": str}}. Stdlib only: the CNI plugin imports this module on every
pod start and must stay cheap (no grpc, no bcc, no pyroute2).
"""
from __future__ import annotations

import json
import socket
import struct

MAX_FRAME = 4 << 20
PROTOCOL_VERSION = 1


class WireError(Exception):
    pass


class RemoteError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireError("connection closed mid-frame" if buf else "connection closed")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, obj) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_frame(sock: socket.socket):
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise WireError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    try:
        return json.loads(_recv_exact(sock, n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed frame: {exc}") from None
    except RecursionError:
        raise WireError("malformed frame: nested too deeply") from None


def call(socket_path: str, method: str, params: dict | None = None, timeout: float = 30.0):
    """One request on a fresh connection; raises OSError when the agent is
    unreachable and RemoteError when it answers with an error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        send_frame(s, {"method": method, "params": params or {}, "version": PROTOCOL_VERSION})
        reply = recv_frame(s)
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise RemoteError(err.get("code", "internal"), err.get("message", "unknown error"))
    return reply.get("result")
