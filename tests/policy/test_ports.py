"""Port ranges as LPM prefixes, and the port-set algebra the diff relies on,
checked against brute-force enumeration."""
from __future__ import annotations

import random

import pytest

from agent.policy.ports import (
    ANY_KEY, PORT_MAX, PortSet, block_size, key_ancestors, key_covers, range_to_prefixes,
)


def ports_of(prefixes) -> set[int]:
    return {p for port, plen in prefixes for p in range(port, port + block_size(plen))}


def minimal_count(lo: int, hi: int) -> int:
    """Fewest aligned blocks tiling [lo, hi], by dynamic programming over ports."""
    best = {lo: 0}
    for start in range(lo, hi + 1):
        if start not in best:
            continue
        size = 1
        while start % size == 0 and start + size - 1 <= hi:
            nxt = start + size
            best[nxt] = min(best.get(nxt, 1 << 30), best[start] + 1)
            size *= 2
    return best[hi + 1]


@pytest.mark.parametrize("lo,hi", [(80, 80), (0, PORT_MAX), (1, PORT_MAX), (8000, 8100),
                                   (1024, 2047), (1, 65534), (32767, 32768)])
def test_a_range_is_tiled_exactly_by_aligned_blocks(lo, hi):
    prefixes = range_to_prefixes(lo, hi)
    assert ports_of(prefixes) == set(range(lo, hi + 1))
    assert sum(block_size(l) for _, l in prefixes) == hi - lo + 1
    assert all(port % block_size(l) == 0 for port, l in prefixes)
    assert len(prefixes) <= 2 * 16 - 2


def test_random_ranges_use_the_fewest_blocks():
    rng = random.Random(7)
    for _ in range(60):
        lo = rng.randrange(0, 4000)
        hi = rng.randrange(lo, min(PORT_MAX, lo + 3000) + 1)
        prefixes = range_to_prefixes(lo, hi)
        assert ports_of(prefixes) == set(range(lo, hi + 1))
        assert len(prefixes) == minimal_count(lo, hi)


def test_the_worst_range_needs_thirty_blocks_not_sixty_five_thousand():
    assert len(range_to_prefixes(1, PORT_MAX - 1)) == 30


def random_set(rng: random.Random) -> PortSet:
    if rng.random() < 0.1:
        return PortSet.all()
    ranges = {}
    for proto in rng.sample([6, 17, 132], rng.randint(0, 3)):
        ivs = []
        for _ in range(rng.randint(1, 3)):
            lo = rng.randrange(0, 200)
            ivs.append((lo, min(lo + rng.randrange(0, 60), 199)))
        ranges[proto] = ivs
    return PortSet(ranges=ranges)


def members(ps: PortSet) -> set[tuple[int, int]]:
    return {(proto, port) for proto in (1, 6, 17, 132) for port in range(0, 200)
            if ps.contains(proto, port)}


def test_set_algebra_and_encoding_agree_with_enumeration():
    rng = random.Random(3)
    for _ in range(150):
        a, b = random_set(rng), random_set(rng)
        assert members(a.union(b)) == members(a) | members(b)
        assert members(a.intersection(b)) == members(a) & members(b)
        assert PortSet.from_keys(a.keys()) == a
        for k in a.keys():
            assert a.covers_key(k)


def test_key_cover_and_ancestors():
    k = (6, 8080, 16)
    anc = list(key_ancestors(k))
    assert anc[0] == (6, 8080, 15) and anc[-2] == (6, 0, 0) and anc[-1] == ANY_KEY
    assert all(key_covers(a, k) for a in anc)
    assert not key_covers((17, 8080, 16), k) and not key_covers((6, 8081, 16), k)
    assert list(key_ancestors(ANY_KEY)) == []
