"""What happens to the flows of a backend that left its Service.

Connection flows (TCP, SCTP) are kept: they go on to the address their
entry names until the backend (or the client) closes them, as kube-proxy
leaves established connections alone; their entries go when the flow
closes or idles out. A mid-stream packet never picks another backend
(bpf/lib/ct.h). Datagram flows (UDP and the rest) of a removed backend are
deleted, both directions, so that their next datagram picks a live backend
(the datapath re-balances such a flow at once anyway when its backend id no
longer resolves; the purge gives the entries back). Connected UDP sockets
socket-LB sent to a removed backend are closed elsewhere
(agent.daemon.services.UdpSocketReaper).

`plan()` is pure over entries; `purge_backends()` uses the datapath's
conntrack maps object (agent.datapath.maps.CtMaps) it is given; the agent
runs it right after each plan that removed backends
(agent/daemon/conntrack_gc.py ConntrackPurger).
"""
from __future__ import annotations

from agent.model.conntrack import CONNECTION_PROTOCOLS


def plan(nat: dict[str, list[tuple]], backend_ids) -> dict[str, list]:
    """{table: [CtKey]} to delete: both entries of every datagram flow on
    one of `backend_ids`. `nat`: {table: [(CtKey, CtValue)]}."""
    ids = set(backend_ids)
    return {table: [k for k, v in entries
                    if v.backend_id in ids and k.proto not in CONNECTION_PROTOCOLS]
            for table, entries in nat.items()}


def purge_backends(ct, backend_ids) -> int:
    """Delete the datagram flows of removed backends from `ct` (a CtMaps).
    Returns how many entries were deleted."""
    ids = set(backend_ids)
    if not ids:
        return 0
    doomed = plan({t: ct.nat_entries(t) for t in ct.NAT_TABLES}, ids)
    return sum(ct.delete(table, keys) for table, keys in doomed.items())


__all__ = ["plan", "purge_backends"]
