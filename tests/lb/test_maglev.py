"""The Maglev table builder, apart from BPF: spread, stability, agreement."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.lb.maglev import TABLE_SIZES, backend_name, build_table, flow_hash, flow_hash6


def names(n: int, port: int = 8080) -> list[str]:
    return [backend_name(f"10.{i // 250}.{i % 250}.7", port, "TCP") for i in range(n)]


@pytest.mark.parametrize("m", [251, 1021, 16381])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_every_entry_names_a_backend_and_each_backend_gets_its_share(m, n):
    t = build_table(names(n), m)
    assert len(t) == m and set(t) == set(range(n))
    counts = Counter(t)
    # The population algorithm hands out entries in turns: shares differ by one at most.
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_no_backend_gives_an_empty_table():
    assert build_table([], 1021) == ()


def test_a_size_that_is_not_an_offered_prime_is_refused():
    with pytest.raises(ValueError, match="1000"):
        build_table(names(3), 1000)
    assert all(all(m % d for d in range(2, int(m ** 0.5) + 1)) for m in TABLE_SIZES)


def test_the_table_depends_on_the_set_of_backends_not_their_order():
    ns = names(20)
    t = build_table(ns, 1021)
    shuffled = ns[:]
    random.Random(7).shuffle(shuffled)
    t2 = build_table(shuffled, 1021)
    # positions refer to the order given: compare by name
    assert [ns[i] for i in t] == [shuffled[i] for i in t2]


def test_two_nodes_build_the_same_table_whatever_ids_their_backends_have():
    # Node 1 and node 2 learn the backends in different orders and give them
    # different ids; mapped through their own ids, the entries name the same
    # addresses.
    ns = names(12)
    ids1 = {n: 100 + i for i, n in enumerate(ns)}
    order2 = list(reversed(ns))
    ids2 = {n: 7000 + i for i, n in enumerate(order2)}
    t1 = [ids1[ns[i]] for i in build_table(ns, 2039)]
    t2 = [ids2[order2[i]] for i in build_table(order2, 2039)]
    back1 = {v: k for k, v in ids1.items()}
    back2 = {v: k for k, v in ids2.items()}
    assert [back1[i] for i in t1] == [back2[i] for i in t2]


def test_removing_one_backend_moves_its_own_entries_and_few_others():
    ns = names(10)
    m = 16381
    before = build_table(ns, m)
    gone = ns[3]
    rest = [n for n in ns if n != gone]
    after = build_table(rest, m)
    moved_elsewhere = sum(1 for a, b in zip(before, after)
                          if ns[a] != gone and ns[a] != rest[b])
    taken_over = sum(1 for a in before if ns[a] == gone)
    assert taken_over == Counter(before)[3]
    # The paper's bound is loose; in practice a few percent of the table.
    assert moved_elsewhere < 0.05 * m, moved_elsewhere


def test_adding_a_backend_takes_entries_mostly_from_the_others_evenly():
    ns = names(9)
    m = 16381
    before = build_table(ns, m)
    grown = ns + [backend_name("10.9.9.9", 8080, "TCP")]
    after = build_table(grown, m)
    changed = sum(1 for a, b in zip(before, after) if ns[a] != grown[b])
    new_share = Counter(after)[9]
    assert new_share in (m // 10, m // 10 + 1)
    assert changed < new_share * 1.2, (changed, new_share)


def test_flow_hash_is_stable_and_spreads_flows():
    assert flow_hash("10.0.0.1", 40000, 80, 6) == flow_hash("10.0.0.1", 40000, 80, 6)
    assert flow_hash("10.0.0.1", 40000, 80, 6) != flow_hash("10.0.0.1", 40001, 80, 6)
    assert flow_hash("10.0.0.1", 40000, 80, 6) != flow_hash("10.0.0.1", 40000, 80, 17)
    t = build_table(names(4), 1021)
    picks = Counter(t[flow_hash("192.0.2.10", p, 80, 6) % 1021] for p in range(30000, 34000))
    assert set(picks) == {0, 1, 2, 3}
    assert min(picks.values()) > 700, picks


# flow_hash6("2001:db8::11", 40000, 80, 6); the datapath computes what
# flow_hash6 does (tests/bpf/test_nodeport6.py, test_sctp6_outside.py)
GOLDEN6 = 0x103F53B8

# Addresses whose four words XOR alike: the same words in another order, and
# two words each changed by the same bits. A hash of the XOR fold gave each
# set one value; every word mixed in by itself, they are all apart.
XOR_ALIKE = [("2001:db8:0:1::", "0:1:2001:db8::", "::2001:db8:0:1", "0:1::2001:db8"),
             ("2001:db8:250::11", "2001:db8:250:ff::ee", "2001:db8:250::ff:0:ee")]


def test_an_ipv6_flow_hashes_every_word_of_its_address_by_itself():
    import socket
    import struct

    def fold(a):
        w = struct.unpack("<4I", socket.inet_pton(socket.AF_INET6, a))
        return w[0] ^ w[1] ^ w[2] ^ w[3]

    for group in XOR_ALIKE:
        assert len({fold(a) for a in group}) == 1, group
        for sport, dport, proto in ((40000, 80, 6), (40001, 80, 17), (40000, 2905, 132)):
            assert len({flow_hash6(a, sport, dport, proto) for a in group}) == len(group), group
    # an IPv4-mapped or -compatible address is not hashed as the IPv4 one
    assert flow_hash6("::10.1.2.3", 40000, 80, 6) != flow_hash("10.1.2.3", 40000, 80, 6)
    assert flow_hash6("2001:db8::11", 40000, 80, 6) != flow_hash6("2001:db9::11", 40000, 80, 6)
    assert flow_hash6("2001:db8::11", 40000, 80, 6) != flow_hash6("2001:db8::11", 40001, 80, 6)
    assert flow_hash6("2001:db8::11", 40000, 80, 6) != flow_hash6("2001:db8::11", 40000, 80, 17)
    # fixed values: every node, and every release, hashes a flow alike
    assert flow_hash6("2001:db8::11", 40000, 80, 6) == GOLDEN6
    # spread over a table as IPv4's is
    t = build_table(names(4), 1021)
    picks = Counter(t[flow_hash6(f"2001:db8::{i:x}", 40000, 80, 6) % 1021] for i in range(4000))
    assert set(picks) == {0, 1, 2, 3}
    assert min(picks.values()) > 700, picks
