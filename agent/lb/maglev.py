"""Maglev lookup tables: a consistent backend choice for external traffic.

A load balancer in front of the cluster may send the packets of one flow to
different nodes (its own backends change, ECMP rehashes); with a random
choice each node would pick a different backend and the flow would break.
With Maglev (Eisenbud et al., NSDI 2016) every node builds the same table
of M entries from the same set of backend *addresses*, and a flow's packets
pick entry hash(flow) mod M, so every node sends the flow to the same
backend. The table changes little when the set does: a backend leaving
gives up its own entries and very few others move.

The table is a list of backend positions (indexes into the backend list
given); the service compiler maps them to backend ids, which differ from
node to node, so the agreement between nodes rests on the addresses alone.

Table sizes are primes (the permutations below visit every entry only when
M is prime); `TABLE_SIZES` are the ones offered, and M should be well over
100 times the largest number of backends for an even spread (each backend
gets M/N entries, give or take one).

The flow hash the datapath computes (bpf/lib/lb.h, fp_maglev_hash) has a
twin here, `flow_hash`, so tests can say which entry a packet must use.

Pure module: no kernel, kubernetes, grpc or prometheus imports.
"""
from __future__ import annotations

import functools
import hashlib
import socket
import struct
from collections.abc import Sequence

from agent.config.schema import KEYS_BY_NAME, MAGLEV_TABLE_SIZES

__all__ = ["TABLE_SIZES", "DEFAULT_TABLE_SIZE", "build_table", "permutation_seeds",
           "flow_hash", "flow_hash6", "backend_name"]

TABLE_SIZES = MAGLEV_TABLE_SIZES
DEFAULT_TABLE_SIZE = KEYS_BY_NAME["maglev_table_size"].default


def backend_name(ip: str, port: int, protocol: str) -> str:
    """What a backend is hashed by: the same text on every node."""
    return f"{ip}:{port}/{protocol}"


def permutation_seeds(name: str, m: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list: entry j of its list is
    (offset + j * skip) mod m. skip is never 0, and m is prime, so the list
    visits every entry once."""
    d = hashlib.blake2b(name.encode(), digest_size=16).digest()
    h1, h2 = struct.unpack("<QQ", d)
    return h1 % m, h2 % (m - 1) + 1


def build_table(names: Sequence[str], m: int = DEFAULT_TABLE_SIZE) -> tuple[int, ...]:
    """The Maglev table: entry -> position in `names`. Empty for no names.

    Backends take turns claiming their next preferred free entry until every
    entry is taken (the paper's population algorithm). The result depends
    on the set of names, not on their order: names are sorted first, and
    positions refer back to the order given.
    """
    if m not in TABLE_SIZES:
        raise ValueError(f"Maglev table size {m} is not one of {TABLE_SIZES}")
    if not names:
        return ()
    return _build(tuple(names), m)


@functools.lru_cache(maxsize=4096)
def _build(names: tuple[str, ...], m: int) -> tuple[int, ...]:
    # Frontends of one Service port (NodePort on each address, external and
    # load-balancer IPs) share a backend set: build its table once.
    order = sorted(range(len(names)), key=names.__getitem__)
    seeds = [permutation_seeds(names[i], m) for i in order]
    n = len(order)
    offset = [s[0] for s in seeds]
    skip = [s[1] for s in seeds]
    nxt = [0] * n
    table = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            o, s, j = offset[i], skip[i], nxt[i]
            c = (o + j * s) % m
            while table[c] >= 0:
                j += 1
                c = (o + j * s) % m
            table[c] = order[i]
            nxt[i] = j + 1
            filled += 1
            if filled == m:
                return tuple(table)


# ------------------------------------------------------------ flow hash

def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def _jhash_final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol32(b, 14)) & 0xFFFFFFFF
    a ^= c; a = (a - _rol32(c, 11)) & 0xFFFFFFFF
    b ^= a; b = (b - _rol32(a, 25)) & 0xFFFFFFFF
    c ^= b; c = (c - _rol32(b, 16)) & 0xFFFFFFFF
    a ^= c; a = (a - _rol32(c, 4)) & 0xFFFFFFFF
    b ^= a; b = (b - _rol32(a, 14)) & 0xFFFFFFFF
    c ^= b; c = (c - _rol32(b, 24)) & 0xFFFFFFFF
    return c


# Fixed, so that every node hashes a flow alike (bpf/lib/lb.h FP_MAGLEV_SEED).
SEED = 0x6D61676C


def flow_hash(saddr: str, sport: int, dport: int, proto: int) -> int:
    """The datapath's hash of a flow for the Maglev lookup: the client's
    address and port, the frontend's port and the protocol. Not the
    frontend address: a NodePort is reached at a different address on each
    node, and the choice must not depend on which node the packet reached.

    Mirrors fp_maglev_hash: Bob Jenkins' final mix over (client address,
    ports, protocol) with a fixed seed, words as the packet carries them
    (network byte order read as a little-endian __u32, as the BPF program
    sees them)."""
    a = struct.unpack("<I", socket.inet_aton(saddr))[0]
    b = struct.unpack("<I", struct.pack("!HH", sport, dport))[0]
    c = (proto ^ SEED) & 0xFFFFFFFF
    a = (a + 0xDEADBEEF) & 0xFFFFFFFF
    b = (b + 0xDEADBEEF) & 0xFFFFFFFF
    c = (c + 0xDEADBEEF) & 0xFFFFFFFF
    return _jhash_final(a, b, c)


def _jhash_mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & 0xFFFFFFFF; a ^= _rol32(c, 4); c = (c + b) & 0xFFFFFFFF
    b = (b - a) & 0xFFFFFFFF; b ^= _rol32(a, 6); a = (a + c) & 0xFFFFFFFF
    c = (c - b) & 0xFFFFFFFF; c ^= _rol32(b, 8); b = (b + a) & 0xFFFFFFFF
    a = (a - c) & 0xFFFFFFFF; a ^= _rol32(c, 16); c = (c + b) & 0xFFFFFFFF
    b = (b - a) & 0xFFFFFFFF; b ^= _rol32(a, 19); a = (a + c) & 0xFFFFFFFF
    c = (c - b) & 0xFFFFFFFF; c ^= _rol32(b, 4); b = (b + a) & 0xFFFFFFFF
    return a, b, c


def flow_hash6(saddr: str, sport: int, dport: int, proto: int) -> int:
    """`flow_hash` of an IPv6 flow (bpf/lib/lb6.h fp_maglev_hash6): Bob
    Jenkins' hash of six words, the client's four address words as the
    packet carries them, the ports and the protocol, with the same seed.
    Every address word is mixed in by itself, so no two addresses share a
    hash by construction."""
    words = struct.unpack("<4I", socket.inet_pton(socket.AF_INET6, saddr))
    a = b = c = (0xDEADBEEF + (6 << 2) + SEED) & 0xFFFFFFFF
    a, b, c = _jhash_mix((a + words[0]) & 0xFFFFFFFF, (b + words[1]) & 0xFFFFFFFF,
                         (c + words[2]) & 0xFFFFFFFF)
    a = (a + words[3]) & 0xFFFFFFFF
    b = (b + struct.unpack("<I", struct.pack("!HH", sport, dport))[0]) & 0xFFFFFFFF
    c = (c + proto) & 0xFFFFFFFF
    return _jhash_final(a, b, c)
