"""Typed access to fastpath's maps.

Layouts come from bcc's ctypes classes generated from bpf/include/fastpath.h
(`table.Key`, `table.Leaf`); this module only fills them. It is also the one
place where host and network byte order are converted.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from agent import bpfdefs
from agent.endpoints import Endpoint

DEFS = bpfdefs.load()
MAP = DEFS.maps


def be32(ip: str) -> int:
    """IPv4 text -> the integer whose in-memory bytes are the address in
    network order (what a __be32 field declared as a ctypes uint holds)."""
    return struct.unpack("=I", socket.inet_aton(ip))[0]


def ip_from_be32(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def mac_bytes(mac: str) -> bytes:
    b = bytes(int(x, 16) for x in mac.split(":"))
    if len(b) != 6:
        raise ValueError(f"bad MAC {mac!r}")
    return b


def mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


@dataclass(frozen=True)
class EndpointEntry:
    ip: str
    host_ifindex: int
    eni_ifindex: int
    pod_mac: str
    host_mac: str
    flags: int
    ep_id: int


@dataclass(frozen=True)
class CounterRow:
    ifindex: int
    direction: str
    reason: str
    reason_code: int
    packets: int
    bytes: int

    @property
    def is_drop(self) -> bool:
        return DEFS.is_drop(self.reason_code)


class Maps:
    """Operations on the maps of one loaded module (or reopened pins)."""

    def __init__(self, tables):
        self._t = tables   # name -> bcc table

    def endpoint_put(self, ep: Endpoint) -> None:
        t = self._t[MAP["FP_MAP_ENDPOINTS"]]
        k = t.Key(ip4=be32(ep.ip))
        v = t.Leaf()
        v.host_ifindex = ep.host_ifindex
        v.eni_ifindex = ep.eni_ifindex
        v.pod_mac[:] = list(mac_bytes(ep.pod_mac))
        v.host_mac[:] = list(mac_bytes(ep.host_mac))
        v.ep_id = ep.ep_id
        # The flag is written in the same value: a map update is atomic per
        # element, so a reader sees the old entry or the complete new one.
        v.flags = DEFS.defines["FP_EP_F_REGISTERED"]
        t[k] = v

    def endpoint_delete(self, ip: str) -> bool:
        t = self._t[MAP["FP_MAP_ENDPOINTS"]]
        try:
            del t[t.Key(ip4=be32(ip))]
            return True
        except KeyError:
            return False

    def endpoints(self) -> list[EndpointEntry]:
        t = self._t[MAP["FP_MAP_ENDPOINTS"]]
        out = []
        for k, v in t.items():
            out.append(EndpointEntry(ip_from_be32(k.ip4), v.host_ifindex, v.eni_ifindex,
                                     mac_str(v.pod_mac), mac_str(v.host_mac), v.flags, v.ep_id))
        return sorted(out, key=lambda e: ipaddress.ip_address(e.ip))

    def counters(self) -> list[CounterRow]:
        t = self._t[MAP["FP_MAP_COUNTERS"]]
        rows = []
        for k, per_cpu in t.items():
            rows.append(CounterRow(k.ifindex, DEFS.dir(k.dir), DEFS.reason(k.reason), k.reason,
                                   sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)))
        return sorted(rows, key=lambda r: (r.ifindex, r.direction, r.reason_code))

    def counters_clear(self) -> None:
        self._t[MAP["FP_MAP_COUNTERS"]].clear()

    def bypass_set(self, cidrs) -> None:
        """Make the bypass trie hold exactly `cidrs` (adds first, then removals)."""
        t = self._t[MAP["FP_MAP_BYPASS"]]
        want = {}
        for c in cidrs:
            net = ipaddress.ip_network(c)
            if net.version != 4:
                continue
            want[(net.prefixlen, be32(str(net.network_address)))] = 1
        have = {(k.prefixlen, k.addr) for k, _ in t.items()}
        for (plen, addr) in want:
            t[t.Key(prefixlen=plen, addr=addr)] = t.Leaf(1)
        for (plen, addr) in have - set(want):
            del t[t.Key(prefixlen=plen, addr=addr)]

    def bypass(self) -> list[str]:
        t = self._t[MAP["FP_MAP_BYPASS"]]
        return sorted(f"{ip_from_be32(k.addr)}/{k.prefixlen}" for k, _ in t.items())

    def testrec(self):
        t = self._t[MAP["FP_MAP_TESTREC"]]
        rec = t[t.Key(0)]
        return rec
