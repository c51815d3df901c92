"""Conntrack garbage collection: entries past their lifetime go.

The datapath already treats an entry older than its state's lifetime as
absent (bpf/lib/ct.h); the sweep gives its memory back. That matters most
for the established map, a hash that nothing evicts: an established flow
whose ends vanished without a FIN holds its two entries until swept. In the
LRU maps it keeps dead entries from being what the LRU keeps while it
evicts live ones under pressure. Lifetimes are the agent's configuration
(conntrack_*_timeout), the same the programs were built with.

A translated flow's two entries are refreshed together (each direction
refreshes its partner at most once a second), so each entry is judged on
its own. Every entry chosen is read again just before it is deleted and
kept if a packet refreshed it since the walk (a window of microseconds
remains between that read and the delete).

`plan()` is pure over entries; `sweep()` uses the datapath's conntrack
maps object (agent.datapath.maps.CtMaps) it is given. The agent runs it
every `conntrack_gc_interval` seconds (agent/daemon/conntrack_gc.py).
"""
from __future__ import annotations

from agent.model.conntrack import Lifetimes

FRAG_LIFETIME_NS = 30 * 1_000_000_000      # FP_FRAG_LIFETIME_NS


def plan(nat: dict[str, list[tuple]], policy: list[tuple], now_ns: int,
         lifetimes: Lifetimes, policy6: list[tuple] = ()) -> dict[str, list[tuple]]:
    """{table: [(key, value)]} of the entries past their lifetime at
    `now_ns`. `nat`: {"established": [(CtKey, CtValue)], "new": [...]},
    `policy`: [(CtKey, PolicyValue)], `policy6`: the IPv6 flows policy
    admitted, [(Ct6Key, PolicyValue)] (same lifetimes)."""
    out: dict[str, list[tuple]] = {}
    for table, entries in nat.items():
        out[table] = [(k, v) for k, v in entries
                      if lifetimes.expired(k.proto, v.state, v.last_seen, now_ns)]
    out["policy"] = [(k, v) for k, v in policy
                     if lifetimes.expired(k.proto, v.state, v.last_seen, now_ns)]
    out["policy6"] = [(k, v) for k, v in policy6
                      if lifetimes.expired(k.proto, v.state, v.last_seen, now_ns)]
    return out


def sweep(ct, now_ns: int, lifetimes: Lifetimes, entries=None) -> int:
    """Remove expired entries from the conntrack maps `ct` (a CtMaps).
    `entries`: what a walk returned earlier ({table: [(key, value)]}); read
    now when not given. Returns how many entries were removed."""
    if entries is None:
        entries = {t: ct.nat_entries(t) for t in ct.NAT_TABLES}
        entries["policy"] = ct.policy_entries()
        entries["policy6"] = ct.policy6_entries()
    nat = {t: e for t, e in entries.items() if t not in ("policy", "policy6")}
    doomed = plan(nat, entries.get("policy", []), now_ns, lifetimes, entries.get("policy6", []))
    removed = 0
    for table, items in doomed.items():
        gone = []
        for k, v in items:
            cur = ct.get(table, k)
            # refreshed (or rewritten by a new flow) since the walk: it lives
            if cur is not None and (cur.last_seen != v.last_seen or cur.state != v.state):
                continue
            gone.append(k)
        removed += ct.delete(table, gone)
    removed += ct.delete_frag(k for k, first in ct.frag_entries()
                              if now_ns - first > FRAG_LIFETIME_NS)
    removed += ct.delete_frag((k for k, first in ct.frag_entries(v6=True)
                               if now_ns - first > FRAG_LIFETIME_NS), v6=True)
    return removed


__all__ = ["plan", "sweep"]
