"""The bandwidth manager's maps (bpf/maps.c, struct fp_bw* in fastpath.h).

The agent writes the limits map (struct fp_bw) and creates each pod's state
entry (struct fp_bw_state) with its connection-count generation; after that
the programs alone write the state. Whoever deletes a tracked connection
(struct fp_bw_flow) owns its counts: the programs add them to the state's
closed counters, the agent's idle sweep (`sweep`) to the limits entry's
reaped counters, which only the agent writes. IPv6 connections are kept
in their twin map (FP_MAP_BW_FLOWS6, IPv6 tuples, the same value); both
maps are walked and swept alike.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from agent.bandwidth.encode import LIMIT_FIELDS, Entry
from agent.datapath.maps import DEFS, MAP, be32, ip_from_be32

_LIMITS, _STATE = MAP["FP_MAP_BW"], MAP["FP_MAP_BW_STATE"]
_FLOWS, _COUNTERS = MAP["FP_MAP_BW_FLOWS"], MAP["FP_MAP_BW_COUNTERS"]
_FLOWS6 = MAP["FP_MAP_BW_FLOWS6"]
DIR_EGRESS, DIR_INGRESS = 0, 1           # FP_DIR_FROM_POD, FP_DIR_TO_POD
assert DEFS.dir(DIR_EGRESS) == "from-pod" and DEFS.dir(DIR_INGRESS) == "to-pod"


@dataclass(frozen=True)
class Flow:
    saddr: str
    daddr: str
    sport: int
    dport: int
    last_seen: int
    egress_pod: str           # "" when not counted against its initiator
    ingress_pod: str
    egress_gen: int
    ingress_gen: int
    established: bool
    fins: int                 # FINs seen (0..2)


class BandwidthMaps:
    def __init__(self, tables):
        self._lim = tables[_LIMITS]
        self._st = tables[_STATE]
        self._flows = tables[_FLOWS]
        self._flows6 = tables[_FLOWS6]
        self._cnt = tables[_COUNTERS]

    # -- limits --------------------------------------------------------------
    def entries(self) -> dict[str, Entry]:
        out = {}
        for k, v in self._lim.items():
            minor = v.htb_class & 0xFFFF if v.htb_class else 0
            out[ip_from_be32(k.value)] = Entry({f: getattr(v, f) for f in LIMIT_FIELDS}, minor,
                                               v.conn_gen, v.egress_conns_reaped,
                                               v.ingress_conns_reaped)
        return out

    def write(self, ip: str, entry: Entry, fresh: bool) -> None:
        """The pod's limits; with `fresh`, its state starts over first (new
        generation, empty buckets and counts) so the limits never meet a
        predecessor's state."""
        key = self._lim.Key(be32(ip))
        if fresh:
            self._st[self._st.Key(be32(ip))] = self._st.Leaf(conn_gen=entry.conn_gen)
        v = self._lim.Leaf()
        for f, val in entry.limits.items():
            setattr(v, f, val)
        v.htb_class = entry.htb_class
        v.conn_gen = entry.conn_gen
        v.egress_conns_reaped = entry.egress_reaped
        v.ingress_conns_reaped = entry.ingress_reaped
        self._lim[key] = v

    def delete(self, ip: str) -> None:
        """Limits first (the programs stop limiting), then state and counters."""
        for t in (self._lim, self._st):
            try:
                del t[t.Key(be32(ip))]
            except KeyError:
                pass
        raw = be32(ip)
        for k in [k for k, _ in self._cnt.items() if k.ip4 == raw]:
            try:
                del self._cnt[k]
            except KeyError:
                pass

    def clear(self) -> int:
        n = len(self.entries())
        for t in (self._lim, self._st, self._flows, self._flows6, self._cnt):
            t.clear()
        return n

    # -- state and counters ----------------------------------------------------
    def states(self) -> dict[str, dict]:
        out = {}
        for k, v in self._st.items():
            out[ip_from_be32(k.value)] = {f: getattr(v, f) for f, _ in v._fields_
                                          if not f.startswith("pad")}
        return out

    def counters(self) -> list[dict]:
        """{ip, direction (egress/ingress), reason, packets, bytes}, summed over CPUs."""
        rows = []
        for k, per_cpu in self._cnt.items():
            rows.append({"ip": ip_from_be32(k.ip4),
                         "direction": "egress" if k.dir == DIR_EGRESS else "ingress",
                         "reason": DEFS.reason(k.reason), "drop": DEFS.is_drop(k.reason),
                         "packets": sum(c.packets for c in per_cpu),
                         "bytes": sum(c.bytes for c in per_cpu)})
        return sorted(rows, key=lambda r: (r["ip"], r["direction"], r["reason"]))

    # -- tracked connections ---------------------------------------------------
    def flows(self) -> list[Flow]:
        """Both families' tracked connections (an IPv6 one by its IPv6
        tuple; its pods are named by their keys, as IPv4's are)."""
        from agent.datapath.maps import port_from_be16
        ip6 = lambda raw: socket.inet_ntop(socket.AF_INET6, bytes(raw))     # noqa: E731
        out = []
        for t, addr in ((self._flows, ip_from_be32), (self._flows6, ip6)):
            for k, v in t.items():
                out.append(Flow(addr(k.saddr), addr(k.daddr), port_from_be16(k.sport),
                                port_from_be16(k.dport), v.last_seen,
                                ip_from_be32(v.egress_pod) if v.egress_pod else "",
                                ip_from_be32(v.ingress_pod) if v.ingress_pod else "",
                                v.egress_gen, v.ingress_gen, bool(v.established),
                                int(bool(v.fin_ini)) + int(bool(v.fin_rsp))))
        return out

    def _flow_key(self, f: Flow):
        from agent.datapath.maps import be16
        if ":" in f.saddr:
            t = self._flows6
            k = t.Key(sport=be16(f.sport), dport=be16(f.dport))
            k.saddr[:] = list(socket.inet_pton(socket.AF_INET6, f.saddr))
            k.daddr[:] = list(socket.inet_pton(socket.AF_INET6, f.daddr))
            return t, k
        t = self._flows
        return t, t.Key(saddr=be32(f.saddr), daddr=be32(f.daddr), sport=be16(f.sport),
                        dport=be16(f.dport))

    def sweep(self, now_ns: int, idle_ns: int, opening_ns: int,
              live: dict[str, int]) -> tuple[dict[tuple[str, int], int], int]:
        """Delete tracked connections idle longer than `idle_ns` (`opening_ns`
        while not answered yet), and those no live pod is counted for
        (`live`: pod IP -> its current generation). Returns the counts this
        sweep took over, {(pod IP, DIR_*): n}, and how many entries went."""
        reaped: dict[tuple[str, int], int] = {}
        gone = 0
        for f in self.flows():
            sides = [(p, g, d) for p, g, d in ((f.egress_pod, f.egress_gen, DIR_EGRESS),
                                               (f.ingress_pod, f.ingress_gen, DIR_INGRESS))
                     if p and live.get(p) == g]
            limit = idle_ns if f.established else opening_ns
            if sides and now_ns - f.last_seen < limit:
                continue
            table, key = self._flow_key(f)
            try:
                del table[key]
            except KeyError:
                continue          # the programs closed it meanwhile: theirs to count
            gone += 1
            for p, _, d in sides:
                reaped[(p, d)] = reaped.get((p, d), 0) + 1
        return reaped, gone
