"""Helpers for vm-tests that run fastpath on simulated nodes."""
from __future__ import annotations

import sys
import time
from collections import Counter

from agent.sim.traffic import forwarded_datagrams as forwarded_by_stack  # noqa: F401  (tests' name)
from agent.sim.traffic import serve_reply  # noqa: F401  (used by many vm-tests)


def flows_created(lb) -> int:
    """How many translated flows the datapath has opened (the conntrack
    event counter, both families). A TCP flow whose close completed leaves
    no conntrack entry behind, so per-packet translation is proven by this
    count rising and translation at the socket by it staying put."""
    return lb.ct_events()["created"]


def counters_by(rows, ifindex: int | None = None) -> Counter:
    """(direction, reason) -> packets, optionally for one interface."""
    c: Counter = Counter()
    for r in rows:
        if ifindex is None or r.ifindex == ifindex:
            c[(r.direction, r.reason)] += r.packets
    return c


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


def inject_truncated6(pod) -> None:
    """Five frames from `pod` whose IPv6 header is cut short (the source
    address complete, so the guard sees its own pod, the rest missing)."""
    import ipaddress
    head = "6000000000141140" + ipaddress.IPv6Address(pod.ip6).packed.hex()
    frame = pod.host_mac.replace(":", "") + pod.mac.replace(":", "") + "86dd" + head
    pod.run([sys.executable, "-c", INJECT, frame])


def inject_truncated(pod) -> None:
    """Five frames from `pod` whose IPv4 header is cut short."""
    ipv4 = "4500003c0000400040060000" + "".join(f"{int(x):02x}" for x in pod.ip.split("."))
    frame = pod.host_mac.replace(":", "") + pod.mac.replace(":", "") + "0800" + ipv4
    pod.run([sys.executable, "-c", INJECT, frame])


def wait_for(cond, what: str = "a condition", timeout: float = 30.0, step: float = 0.1):
    """Poll `cond` until it returns something true, and return that; fail the
    test naming `what` (and the last value seen) once `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                 f"(last: {got!r})")
        time.sleep(step)


def put_frontend(lb, vip: str, port: int, proto: str, svc_id: int,
                 backends: dict[int, tuple[str, int]]) -> None:
    """A frontend over `backends` {id: (address, port)}, written in the
    agent's order: the backends, the slots, then the service entry (which
    must never count a slot that is not there yet)."""
    for bid, (ip, bport) in backends.items():
        lb.put_backend(bid, ip, bport, proto)
    lb.put_slots(svc_id, list(backends))
    lb.put_service(vip, port, proto, svc_id, len(backends))


def remove_last_backend(lb, vip: str, port: int, proto: str, svc_id: int,
                        backend_ids: list[int]) -> None:
    """Take the last of the frontend's `backend_ids` out as the agent does:
    the service shrinks, the slot goes, then the backend; its datagram
    flows are purged (its open connections would go on to it until they
    end)."""
    from agent.conntrack.purge import purge_backends
    keep, gone = backend_ids[:-1], backend_ids[-1]
    lb.put_slots(svc_id, keep)
    lb.put_service(vip, port, proto, svc_id, len(keep))
    lb.delete_slots(svc_id, len(backend_ids), len(backend_ids))
    lb.delete_backend(gone)
    purge_backends(lb.ct, (gone,))
