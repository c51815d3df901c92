"""Sets of (protocol, port) and their encoding as power-of-two port prefixes.

The policy map is an LPM trie, so a port range becomes the few aligned blocks
`port/prefixlen` that tile it (at most 2*16 - 2 for any range, never one
entry per port) and "all ports of a protocol" is a single /0 block. "Every
protocol" (a rule without ports, which also admits ICMP and anything else) is
the protocol-wildcard key, which ends the LPM prefix before the protocol byte.

A `PortSet` is the exact set a rule admits, kept as merged inclusive intervals
per IP protocol number; the compiler and the diff intersect, unite and encode
them. Everything here is pure integer arithmetic.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional

PORT_BITS = 16
PORT_MAX = (1 << PORT_BITS) - 1

PROTO_ANY = 0
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}


def proto_number(protocol: int | str) -> int:
    """IP protocol number of a Kubernetes protocol name (or a number as is)."""
    if isinstance(protocol, int):
        return protocol
    try:
        return PROTOCOLS[protocol.upper()]
    except KeyError:
        raise ValueError(f"unknown protocol {protocol!r}") from None


def block_size(prefixlen: int) -> int:
    return 1 << (PORT_BITS - prefixlen)


def range_to_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """The minimal list of aligned (port, prefixlen) blocks covering [lo, hi]."""
    if not 0 <= lo <= hi <= PORT_MAX:
        raise ValueError(f"bad port range {lo}-{hi}")
    out = []
    while lo <= hi:
        # The largest block that starts at lo (alignment) and still fits.
        size = (lo & -lo) or (PORT_MAX + 1)
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, PORT_BITS + 1 - size.bit_length()))
        lo += size
    return out


def prefix_contains(port: int, prefixlen: int, probe: int) -> bool:
    shift = PORT_BITS - prefixlen
    return (probe >> shift) == (port >> shift)


def _merge(intervals: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _intersect(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]):
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


# A key of one bucket of the policy map, without endpoint, direction and
# identity: (protocol, first port, port prefixlen); (0, 0, 0) = every protocol.
PortKey = tuple[int, int, int]
ANY_KEY: PortKey = (PROTO_ANY, 0, 0)


def key_covers(outer: PortKey, inner: PortKey) -> bool:
    """Whether every packet matching `inner` also matches `outer`."""
    if outer[0] == PROTO_ANY:
        return True
    return (outer[0] == inner[0] and outer[2] <= inner[2]
            and prefix_contains(outer[1], outer[2], inner[1]))


def key_ancestors(key: PortKey) -> Iterator[PortKey]:
    """Every key strictly covering `key`, most specific first."""
    proto, port, plen = key
    if proto == PROTO_ANY:
        return
    for l in range(plen - 1, -1, -1):
        yield (proto, port & ~(block_size(l) - 1) & PORT_MAX, l)
    yield ANY_KEY


class PortSet:
    """An immutable set of (protocol, port); `everything` covers all protocols."""

    __slots__ = ("everything", "ranges", "_keys", "_hash")

    def __init__(self, everything: bool = False,
                 ranges: Optional[dict[int, Iterable[tuple[int, int]]]] = None):
        self.everything = everything
        merged = {}
        if not everything and ranges:
            for proto, ivs in ranges.items():
                m = _merge(ivs)
                if m:
                    merged[proto] = m
        self.ranges: dict[int, tuple[tuple[int, int], ...]] = merged
        self._keys: Optional[tuple[PortKey, ...]] = None
        self._hash: Optional[int] = None

    @classmethod
    def all(cls) -> "PortSet":
        return _ALL

    @classmethod
    def none(cls) -> "PortSet":
        return _NONE

    @classmethod
    def of(cls, proto: int, lo: int = 0, hi: int = PORT_MAX) -> "PortSet":
        return cls(ranges={proto: [(lo, hi)]})

    @classmethod
    def from_keys(cls, keys: Iterable[PortKey]) -> "PortSet":
        acc: dict[int, list[tuple[int, int]]] = {}
        for proto, port, plen in keys:
            if proto == PROTO_ANY:
                return _ALL
            acc.setdefault(proto, []).append((port, port + block_size(plen) - 1))
        return cls(ranges=acc)

    def __bool__(self) -> bool:
        return self.everything or bool(self.ranges)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PortSet) and self.everything == other.everything
                and self.ranges == other.ranges)

    def __hash__(self) -> int:
        if self._hash is None:
            # the compiler hashes the same sets again and again (rule memo)
            self._hash = hash((self.everything, tuple(sorted(self.ranges.items()))))
        return self._hash

    def __repr__(self) -> str:
        if self.everything:
            return "PortSet(all)"
        parts = [f"{PROTOCOL_NAMES.get(p, p)}:" + ",".join(
            f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ivs)
            for p, ivs in sorted(self.ranges.items())]
        return f"PortSet({' '.join(parts)})"

    def contains(self, proto: int, port: int) -> bool:
        if self.everything:
            return True
        return any(lo <= port <= hi for lo, hi in self.ranges.get(proto, ()))

    def covers_key(self, key: PortKey) -> bool:
        """Whether the whole block of `key` lies inside this set."""
        if self.everything:
            return True
        proto, port, plen = key
        if proto == PROTO_ANY:
            return False
        hi = port + block_size(plen) - 1
        return any(lo <= port and hi <= h for lo, h in self.ranges.get(proto, ()))

    def union(self, other: "PortSet") -> "PortSet":
        if self.everything or not other:
            return self
        if other.everything or not self:
            return other
        acc = {p: list(v) for p, v in self.ranges.items()}
        for p, v in other.ranges.items():
            acc.setdefault(p, []).extend(v)
        return PortSet(ranges=acc)

    def intersection(self, other: "PortSet") -> "PortSet":
        if self.everything:
            return other
        if other.everything:
            return self
        acc = {}
        for p, v in self.ranges.items():
            w = other.ranges.get(p)
            if w:
                acc[p] = _intersect(v, w)
        return PortSet(ranges=acc)

    def keys(self) -> list[PortKey]:
        """The minimal LPM keys whose union is exactly this set."""
        if self._keys is None:
            # Computed once: the compiler asks the same sets again and again.
            self._keys = (ANY_KEY,) if self.everything else tuple(
                (proto, port, plen)
                for proto, ivs in sorted(self.ranges.items())
                for lo, hi in ivs
                for port, plen in range_to_prefixes(lo, hi))
        return list(self._keys)


_ALL = PortSet(everything=True)
_NONE = PortSet()
