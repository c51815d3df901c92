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
