"""Helpers for vm-tests that run fastpath on simulated nodes."""
from __future__ import annotations

import sys
from collections import Counter

from agent.sim.traffic import forwarded_datagrams as forwarded_by_stack  # noqa: F401  (tests' name)


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


# Writes raw frames onto a pod's eth0: IPv4 frames shorter than an IP header
# cannot go through BPF_PROG_TEST_RUN, so they are proven on a real veth.
INJECT = r"""
import socket, sys
frame = bytes.fromhex(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for _ in range(5):
    s.send(frame)
"""


def inject_truncated(pod) -> None:
    """Five frames from `pod` whose IPv4 header is cut short."""
    ipv4 = "4500003c0000400040060000" + "".join(f"{int(x):02x}" for x in pod.ip.split("."))
    frame = pod.host_mac.replace(":", "") + pod.mac.replace(":", "") + "0800" + ipv4
    pod.run([sys.executable, "-c", INJECT, frame])
