"""What one insert into an LRU hash map costs, by BPF_PROG_TEST_RUN, for
conntrack's LRU tier (fp_ctnew4: 16-byte keys, 32-byte values, 65,536
entries): with the map filling (free elements left) against full (every
insert evicts), the common LRU list against per-CPU lists
(BPF_F_NO_COMMON_LRU), beside a plain preallocated hash (conntrack's
established tier) and the operations #12's tier moves make.

Each arm is a program run `repeat` times by one BPF_PROG_TEST_RUN on one
CPU; the kernel reports the mean time of a run. Every run makes a new key
from a counter, so an insert never finds its key; a program doing only the
counter and the key (`base`) is subtracted. Arms:

  insert         one new key
  insert2        two new keys (a new flow: forward and reply entry)
  overwrite      the same key written again (an LRU update of a present
                 key takes a fresh element and frees the old one)
  insert_delete  one new key, then deleted (a flow that moves on)
  hash_ins_del   the same into a plain preallocated hash of the established
                 tier's default size (262,144)
  hash_np_ins_del  the same into one made with BPF_F_NO_PREALLOC

    python -m bench.lru_bench [--repeat 20000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import sys
from statistics import median

COMMAND = "python -m bench.lru_bench"
ENTRIES = 65536
BPF_F_NO_COMMON_LRU = 1 << 1

SRC = r"""
#include <uapi/linux/bpf.h>
struct key { __u32 saddr, daddr; __u16 sport, dport; __u8 proto, dir; __u16 pad; };
struct val { __u64 last_seen; __u32 a, b, c, d, e, f; };
BPF_ARRAY(ctr, __u64, 1);
BPF_F_TABLE("lru_hash", struct key, struct val, lru, ENTRIES, LRU_FLAGS);
BPF_TABLE("hash", struct key, struct val, tbl, EST_ENTRIES);
BPF_F_TABLE("hash", struct key, struct val, tbl_np, EST_ENTRIES, BPF_F_NO_PREALLOC);

static __always_inline int next(struct key *k)
{
    int z = 0;
    __u64 *c = ctr.lookup(&z);

    if (!c)
        return -1;
    *c += 1;
    k->saddr = (__u32)*c;
    k->daddr = 0x0a000001;
    k->sport = (__u16)(*c >> 32);
    k->dport = 80;
    k->proto = 6;
    return 0;
}

int base(struct __sk_buff *skb)
{
    struct key k = {};

    return next(&k);
}

int insert(struct __sk_buff *skb)
{
    struct key k = {};
    struct val v = {};

    if (next(&k))
        return 1;
    v.last_seen = k.saddr;
    lru.update(&k, &v);
    return 0;
}

int insert2(struct __sk_buff *skb)
{
    struct key k = {};
    struct val v = {};

    if (next(&k))
        return 1;
    v.last_seen = k.saddr;
    lru.update(&k, &v);
    k.dir = 1;
    lru.update(&k, &v);
    return 0;
}

int overwrite(struct __sk_buff *skb)
{
    struct key k = {}, f = {};
    struct val v = {};

    if (next(&k))
        return 1;
    v.last_seen = k.saddr;
    lru.update(&f, &v);
    return 0;
}

int insert_delete(struct __sk_buff *skb)
{
    struct key k = {};
    struct val v = {};

    if (next(&k))
        return 1;
    lru.update(&k, &v);
    lru.delete(&k);
    return 0;
}

int hash_ins_del(struct __sk_buff *skb)
{
    struct key k = {};
    struct val v = {};

    if (next(&k))
        return 1;
    tbl.update(&k, &v);
    tbl.delete(&k);
    return 0;
}

int hash_np_ins_del(struct __sk_buff *skb)
{
    struct key k = {};
    struct val v = {};

    if (next(&k))
        return 1;
    tbl_np.update(&k, &v);
    tbl_np.delete(&k);
    return 0;
}
"""

ARMS = ("insert", "insert2", "overwrite", "insert_delete", "hash_ins_del", "hash_np_ins_del")
EST_ENTRIES = 262144
PACKET = bytes(14) + bytes(50)


def _load(flags: int):
    from bcc import BPF
    b = BPF(text=SRC, cflags=[f"-DENTRIES={ENTRIES}", f"-DEST_ENTRIES={EST_ENTRIES}", f"-DLRU_FLAGS={flags}"])
    return b, {n: b.load_func(n, BPF.SCHED_CLS).fd for n in ("base",) + ARMS}


def _run(fd: int, repeat: int) -> float:
    from agent.datapath.libbpf import prog_test_run
    return prog_test_run(fd, PACKET, repeat=repeat).duration_ns


def run(repeat: int = 20000, rounds: int = 5, log=print) -> dict:
    """{(flags label, state, arm): median ns per run beyond `base`}. The two
    flag settings are loaded side by side and alternated arm by arm."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    builds = {"common": _load(0), "no_common": _load(BPF_F_NO_COMMON_LRU)}
    rows: dict = {}
    try:
        for r in range(rounds):
            for state in ("filling", "full"):
                for arm in ARMS:
                    for label in (builds if r % 2 == 0 else list(reversed(builds))):
                        b, fds = builds[label]
                        if state == "filling":
                            # an empty map that stays far from full
                            b["lru"].clear()
                            b["tbl"].clear()
                            b["tbl_np"].clear()
                            n = min(repeat, ENTRIES // 8)
                        else:
                            # past twice the map: every insert evicts
                            for _ in range(2 * ENTRIES // 10000 + 1):
                                _run(fds["insert"], 10000)
                            n = repeat
                        base = _run(fds["base"], n)
                        t = _run(fds[arm], n)
                        rows.setdefault((label, state, arm), []).append(t - base)
            log(f"  round {r + 1}/{rounds}")
    finally:
        for b, _ in builds.values():
            b.cleanup()
    out = {k: median(v) for k, v in rows.items()}
    for state in ("filling", "full"):
        log(f"{state}: ns per run beyond the counter (median of {rounds}), common / no_common")
        for arm in ARMS:
            log(f"  {arm:14s} {out[('common', state, arm)]:7.0f} "
                f"{out[('no_common', state, arm)]:7.0f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    run(args.repeat, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
