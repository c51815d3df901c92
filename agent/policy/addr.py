"""Addresses and prefixes of both families in one integer space.

The compiler reasons about ipBlocks and peer addresses once for both
families: an IPv4 address is placed where IPv6 keeps IPv4-mapped addresses
(::ffff:a.b.c.d), an IPv4 prefix of length L becomes one of length 96 + L
there, so IPv4 and IPv6 prefixes never overlap by accident and containment
is the same test for both. Texts stay each family's own ("10.1.0.0/16",
"fd00::/64"): that is what the state, the maps and the CLI show.

An IPv6 ipBlock covering the IPv4-mapped range (such as ::/0) does not
contain IPv4 addresses: Kubernetes matches an ipBlock against addresses of
its own family. `V4_RANGE` is what the compiler excepts from such blocks.
"""
from __future__ import annotations

import socket
import struct

_unpack4 = struct.Struct("!I").unpack

V4_BASE = 0xFFFF << 32
V4_BITS = 96                      # an IPv4 prefix of length L has length 96 + L
V4_RANGE = (V4_BITS, V4_BASE)     # every IPv4 address
HOST_BITS = 128
_ALL = (1 << 128) - 1


def is_ip6(text: str) -> bool:
    return ":" in text


def canonical(ip: str) -> str:
    """One spelling per address (IPv6 compressed, lower case)."""
    if ":" not in ip:
        return ip
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip))


def to_int(ip: str) -> int:
    if ":" not in ip:
        return V4_BASE | _unpack4(socket.inet_aton(ip))[0]
    return int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")


def mask(prefixlen: int) -> int:
    return (_ALL << (HOST_BITS - prefixlen)) & _ALL


def is_v4(prefixlen: int, network: int) -> bool:
    return prefixlen >= V4_BITS and (network >> 32) == 0xFFFF


def parse_prefix(text: str) -> tuple[int, int]:
    """(prefixlen, network) of a CIDR of either family, host bits cleared."""
    a, _, plen = text.partition("/")
    if ":" not in a:
        length = V4_BITS + (int(plen) if plen else 32)
    else:
        length = int(plen) if plen else 128
    return length, to_int(a) & mask(length)


def prefix_text(prefixlen: int, network: int) -> str:
    if is_v4(prefixlen, network):
        return f"{socket.inet_ntoa(struct.pack('!I', network & 0xFFFFFFFF))}/{prefixlen - V4_BITS}"
    return f"{socket.inet_ntop(socket.AF_INET6, network.to_bytes(16, 'big'))}/{prefixlen}"


def host_text(ip: str) -> str:
    """The ipcache text of one address: a /32 or a /128."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def floor(prefixlen: int, network: int) -> int:
    """The shortest prefix length of the prefix's own family: an IPv4
    prefix never falls back to an IPv6 one."""
    return V4_BITS if is_v4(prefixlen, network) else 0


def contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    return outer[0] <= inner[0] and (inner[1] & mask(outer[0])) == outer[1]
