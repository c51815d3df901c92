"""Service address ranges for kube-proxy's nftables-mode checks (pure).

kube-proxy in nftables mode rejects a new connection to a live ClusterIP on
a port or protocol no Service port has ("Reject traffic to invalid ports of
ClusterIPs"), and drops one to an address of the Service CIDRs that no
Service holds ("Drop traffic to unallocated ClusterIPs"). fastpath does the
same in the datapath from one LPM map per family (FP_MAP_SVCNET and
FP_MAP_SVCNET6, fastpath.h): the configured Service CIDRs with FLAG_RANGE,
every ClusterIP as a /32 (/128) with FLAG_CLUSTER_IP, or with no flag when another proxy serves its Service (its
address is allocated, and none of fastpath's business).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from agent.model import bpfdefs

__all__ = ["FLAG_CLUSTER_IP", "FLAG_RANGE", "entries", "entry_of", "host_prefix"]

_DEFS = bpfdefs.load().defines
FLAG_CLUSTER_IP = _DEFS["FP_SVCNET_F_CLUSTER_IP"]
FLAG_RANGE = _DEFS["FP_SVCNET_F_RANGE"]


def host_prefix(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def entry_of(ip: str, translated: bool) -> tuple[str, int]:
    return host_prefix(ip), FLAG_CLUSTER_IP if translated else 0


def entries(cluster_ips: Mapping[str, bool], service_cidrs: Iterable[str]) -> dict[str, int]:
    """prefix -> flags, both families (the map writer puts IPv6 prefixes in
    the IPv6 map, FP_MAP_SVCNET6)."""
    out: dict[str, int] = {}
    for c in service_cidrs:
        out[str(ipaddress.ip_network(c))] = FLAG_RANGE
    for ip, mine in cluster_ips.items():
        p, f = entry_of(ip, mine)
        out[p] = f
    return out
