"""IPv4 addresses and prefixes as integers (the datapath is IPv4 only).

Prefixes travel as canonical text ("10.1.0.0/16") in the compiled state, the
way the CLI shows them; lookups work on (prefixlen, network integer) pairs.
"""
from __future__ import annotations

import socket
import struct
from typing import Optional

_unpack = struct.Struct("!I").unpack
_pack = struct.Struct("!I").pack


def is_ip4(text: str) -> bool:
    return ":" not in text


def to_int(ip: str) -> int:
    return _unpack(socket.inet_aton(ip))[0]


def to_text(value: int) -> str:
    return socket.inet_ntoa(_pack(value))


def mask(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


def parse_prefix(text: str) -> Optional[tuple[int, int]]:
    """(prefixlen, network) of an IPv4 CIDR, host bits cleared; None for IPv6."""
    if not is_ip4(text):
        return None
    addr, _, plen = text.partition("/")
    length = int(plen) if plen else 32
    return length, to_int(addr) & mask(length)


def prefix_text(prefixlen: int, network: int) -> str:
    return f"{to_text(network)}/{prefixlen}"


def contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    """Whether prefix `outer` contains prefix `inner` (or equals it)."""
    return outer[0] <= inner[0] and (inner[1] & mask(outer[0])) == outer[1]
