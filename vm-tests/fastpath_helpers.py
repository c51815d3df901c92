"""Helpers for vm-tests that run fastpath on simulated nodes."""
from __future__ import annotations

from collections import Counter


def forwarded_by_stack(node) -> int:
    """IP datagrams the node's own stack forwarded (Ip: ForwDatagrams).
    Packets fastpath redirects never reach the node's IP layer, so this
    number staying put is the proof that the fast path was taken."""
    lines = [l.split() for l in node.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if l.startswith("Ip:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))["ForwDatagrams"])


def counters_by(rows, ifindex: int | None = None) -> Counter:
    """(direction, reason) -> packets, optionally for one interface."""
    c: Counter = Counter()
    for r in rows:
        if ifindex is None or r.ifindex == ifindex:
            c[(r.direction, r.reason)] += r.packets
    return c


# A TCP server that answers every connection with a fixed text and never
# stops listening: a `while true; do nc -l; done` loop has a gap between
# connections in which a client is refused, which would make tests flaky.
REPLY_SERVER = r"""
import socket, sys, threading
host, port, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128)
def answer(c):
    with c:
        c.settimeout(3)
        try:
            c.recv(100)
            c.sendall(reply)
        except OSError:
            pass
while True:
    c, _ = s.accept()
    threading.Thread(target=answer, args=(c,), daemon=True).start()
"""


def serve_reply(pod, port: int, reply: str):
    """Start the reply server in `pod` and wait until it listens."""
    p = pod.popen(["python3", "-c", REPLY_SERVER, pod.ip, str(port), reply])
    pod.wait_port(port)
    return p
