"""Limits -> the values of the datapath's limits map (pure).

struct fp_bw (bpf/include/fastpath.h) holds rates in bytes per second and
every bucket depth as the time the rate needs to fill it (ns), so the
programs never divide by anything but a rate. This module computes those
numbers, keeps what the agent itself owns in an entry (the pod's HTB class,
its connection-count generation, the counts its idle sweep reaped) and
plans the writes from the current entries to the wanted ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from agent.bandwidth.limits import Limits
from agent.model import bpfdefs

__all__ = ["Entry", "Plan", "encode", "limits_of", "plan", "HTB_MAJOR", "NS"]

NS = 1_000_000_000
_DEFS = bpfdefs.load().defines
HTB_MAJOR = _DEFS["FP_BW_HTB_MAJOR"]
F_CONNS = _DEFS["FP_BW_F_CONNS"]
HTB_MINORS = range(1, 0xFFFF)       # 0 and 0xffff are not class minors

# fp_bw's limit fields (everything but the agent's bookkeeping).
LIMIT_FIELDS = ("egress_rate", "egress_burst_ns", "ingress_rate", "ingress_burst_ns",
                "egress_pkt_ns", "egress_pkt_burst_ns", "ingress_pkt_ns",
                "ingress_pkt_burst_ns", "egress_max_conns", "ingress_max_conns", "flags")


def encode(limits: Limits) -> dict[str, int]:
    """The limit fields of struct fp_bw for `limits` (0 = unlimited)."""
    out = dict.fromkeys(LIMIT_FIELDS, 0)
    for d in ("egress", "ingress"):
        bps = getattr(limits, f"{d}_bps")
        if bps:
            rate = max(bps // 8, 1)
            out[f"{d}_rate"] = rate
            out[f"{d}_burst_ns"] = getattr(limits, f"{d}_burst_bits") // 8 * NS // rate
        pps = getattr(limits, f"{d}_pps")
        if pps:
            out[f"{d}_pkt_ns"] = max(NS // pps, 1)
            out[f"{d}_pkt_burst_ns"] = getattr(limits, f"{d}_pkt_burst") * out[f"{d}_pkt_ns"]
        out[f"{d}_max_conns"] = getattr(limits, f"{d}_max_conns") or 0
    if limits.tracks_connections:
        out["flags"] |= F_CONNS
    return out


def limits_of(values: dict[str, int]) -> Limits:
    """What an entry's limit fields mean, for views of the pinned maps."""
    kw: dict[str, Optional[int]] = {}
    for d in ("egress", "ingress"):
        rate = values.get(f"{d}_rate", 0)
        if rate:
            kw[f"{d}_bps"] = rate * 8
            kw[f"{d}_burst_bits"] = values.get(f"{d}_burst_ns", 0) * rate // NS * 8
        pkt = values.get(f"{d}_pkt_ns", 0)
        if pkt:
            kw[f"{d}_pps"] = round(NS / pkt)
            kw[f"{d}_pkt_burst"] = values.get(f"{d}_pkt_burst_ns", 0) // pkt
        if values.get(f"{d}_max_conns"):
            kw[f"{d}_max_conns"] = values[f"{d}_max_conns"]
    return Limits(**kw)


@dataclass(frozen=True)
class Entry:
    """One pod's limits map entry: the encoded limits plus what the agent
    owns in it."""
    limits: dict                        # LIMIT_FIELDS -> value
    htb_minor: int = 0                  # its HTB class fa57:<minor> (0: none)
    conn_gen: int = 0                   # generation of its connection counts
    egress_reaped: int = 0              # connections the agent's idle sweep closed
    ingress_reaped: int = 0
    owner: str = field(default="", compare=False)   # endpoint key it was written for

    @property
    def htb_class(self) -> int:
        return (HTB_MAJOR << 16) | self.htb_minor if self.htb_minor else 0


@dataclass
class Plan:
    writes: dict[str, Entry]            # IP -> entry to write (new or changed)
    deletes: list[str]                  # IPs whose entry goes
    fresh: set[str]                     # IPs whose state starts over (new pod, new generation)


def plan(want: dict[str, tuple[Limits, str]], have: dict[str, Entry], *, htb: bool,
         new_gen: Callable[[], int]) -> Plan:
    """From the entries the map holds (`have`) to the limits wanted for each
    pod IP (`want`: IP -> (limits, endpoint key)). A pod keeps its HTB class
    and connection counts while it stays the same endpoint; a new endpoint
    on an IP (a pod re-created) starts over with a new generation, so flows
    of its predecessor never count against it."""
    used = {e.htb_minor for ip, e in have.items() if ip in want and e.htb_minor}
    free = (m for m in HTB_MINORS if m not in used)
    writes: dict[str, Entry] = {}
    fresh: set[str] = set()
    for ip, (limits, owner) in sorted(want.items()):
        enc = encode(limits)
        old = have.get(ip)
        same_pod = old is not None and (not old.owner or not owner or old.owner == owner)
        if old is None or not same_pod or not old.conn_gen:
            minor = old.htb_minor if old is not None and old.htb_minor else 0
            new = Entry(enc, minor, new_gen(), owner=owner)
            fresh.add(ip)
        else:
            new = replace(old, limits=enc, owner=owner or old.owner)
        if htb and not new.htb_minor:
            new = replace(new, htb_minor=next(free))
        if not htb and new.htb_minor:
            new = replace(new, htb_minor=0)
        if old is None or new != old or ip in fresh:
            writes[ip] = new
    deletes = sorted(ip for ip in have if ip not in want)
    return Plan(writes, deletes, fresh)
