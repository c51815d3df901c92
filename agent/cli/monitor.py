"""`fastpath monitor`: a live stream of the datapath's events.

Reads the pinned ring buffer (fp_events_v1) with libbpf's ring_buffer API;
nothing is compiled. Drops are always in the buffer; trace and policy
verdict events are produced only while a monitor asks for them: it sets the
matching bits of fp_monitor.events (a map only monitors write) on start and
clears the bits it set on exit (Ctrl-C, SIGTERM, --count or --duration
reached). One monitor at a time per node: the ring buffer has one consumer
position.
"""
from __future__ import annotations

import ctypes as ct
import json
import signal
import sys
import time

from agent.model import bpfdefs
from agent.cli import bpfobj
from agent.cli.common import EXIT_FAIL, EXIT_USAGE, CliExit, run
from agent.datapath.ringbuf import RingReader
from agent.inspect import decode, events

TYPE_BITS = {"trace": "FP_MON_EV_TRACE", "policy-verdict": "FP_MON_EV_POLICY"}


class EventBits:
    """Set fp_monitor.events bits for the monitor's lifetime."""

    def __init__(self, mon_map, layout, bits: int):
        self.m = mon_map
        self.bits = bits
        self.added = 0
        self.cls = layout.schema.ctype(layout.value)      # struct fp_monitor, from its BTF
        self.key = (0).to_bytes(4, "little")

    def _rw(self, fn) -> None:
        raw = self.m.lookup(self.key)
        if raw is None:
            raise CliExit(EXIT_FAIL, f"{self.m.name}: no entry 0")
        v = self.cls.from_buffer_copy(raw[:ct.sizeof(self.cls)])
        fn(v)
        self.m.update(self.key, bytes(v))

    def __enter__(self):
        def add(v):
            self.added = self.bits & ~v.events
            v.events |= self.bits
        if self.bits:
            self._rw(add)
        return self

    def __exit__(self, *exc):
        if self.added:
            def clear(v):
                v.events &= ~self.added
            self._rw(clear)


def _resolve_endpoints(ctx, specs: list[str]) -> tuple[set[str], set[int]]:
    """--endpoint values -> (addresses, host veth ifindexes of local pods)."""
    from agent.cli import views
    addrs, ifindexes = set(), set()
    rows = views.data_endpoints(ctx) if specs else []
    for s in specs:
        hit = [r for r in rows if s in (r["ip"], r.get("ip6") or None, r["pod"],
                                        r["pod"].split("/")[-1], r["host_ifname"])]
        if not hit and _address(s):
            addrs.add(_address(s))   # a remote address
            continue
        if not hit:
            raise CliExit(EXIT_FAIL, f"--endpoint {s!r}: no such endpoint on this node")
        addrs.update(a for r in hit for a in (r["ip"], r.get("ip6")) if a)
        ifindexes.update(r["host_ifindex"] for r in hit)
    return addrs, ifindexes


def _address(text: str) -> str:
    """An IPv4 or IPv6 address as events print it, or "" for anything else."""
    import ipaddress
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return ""


@run
def cmd_monitor(ctx, args) -> int:
    M = bpfobj.aliases()
    types = set()
    for t in args.type or []:
        for x in t.split(","):
            x = x.strip()
            if x not in ("drop", "trace", "policy-verdict"):
                raise CliExit(EXIT_USAGE, f"--type {x!r}: one of drop, trace, policy-verdict")
            types.add(x)
    addrs, ifindexes = _resolve_endpoints(ctx, args.endpoint or [])
    ring = ctx.maps().get(M["events"])
    if ring is None:
        raise CliExit(EXIT_FAIL, f"no event ring buffer {M['events']} under {ctx.bpffs_root} "
                                 "(an agent of a release without the monitor?)")
    defs = bpfdefs.load().defines
    want = types or {"drop", "trace", "policy-verdict"}
    bits = 0
    for t in want:
        if t in TYPE_BITS:
            bits |= defs[TYPE_BITS[t]]
    links = ctx.links()
    names = {int(k): v for k, v in (ctx.agent("PolicyNames") or {}).items()}
    mon = ctx.map(M["monitor"])
    mon_layout = ctx.layout(M["monitor"], mon)
    schema = ctx.program_schema(M["events"])
    reader = RingReader(ring.fd)
    stop = {"now": False}

    def on_term(*_):
        stop["now"] = True
    old = signal.signal(signal.SIGTERM, on_term)
    seen = 0
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        with EventBits(mon, mon_layout, bits):
            if not ctx.json:
                print(f"listening for {', '.join(sorted(want))} events on {ring.name} "
                      f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
            while not stop["now"]:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                for raw in reader.poll(200):
                    row = events.event_row(events.decode_event(raw, schema), links=links,
                                           policy_names=names)
                    if not events.matches(row, types or None, addrs, ifindexes):
                        continue
                    if ctx.json:
                        print(json.dumps(row, sort_keys=True), flush=True)
                    else:
                        print(events.event_line(row), flush=True)
                    seen += 1
                    if args.count and seen >= args.count:
                        stop["now"] = True
                        break
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        reader.close()
    return 0


__all__ = ["cmd_monitor", "RingReader", "EventBits", "decode"]
