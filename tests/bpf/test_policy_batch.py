"""Batched policy map writes (PolicyMaps.apply_all) leave the maps exactly as
the same operations written one by one (PolicyMaps.apply) do: after whole
plans, after a plan whose writes a full map refuses half-way, and when a run
names one key twice.

Each side gets maps of its own, made here with the types, flags and key and
value sizes of the datapath's policy maps but room for only a few entries,
so a full map is cheap to reach."""
from __future__ import annotations

import ctypes as ct
import os

import pytest

from agent.datapath import libbpf, mapio
from agent.datapath.maps import MAP
from agent.datapath.policymaps import PolicyMaps
from agent.datapath.tables import Table
from agent.policy import compile_policy, diff
from agent.policy.diff import IpcachePut, RuleDelete, RulePut, UNKNOWN
from agent.policy.state import Direction, MapImage, PolicyKey, RuleValue
from tests.bpf.conftest import ENI_IP, ENI_IP6, POD_A, POD_B
from tests.bpf.test_policy import cluster
from tests.policy.kube import netpol, snapshot

NAMES = ("FP_MAP_IPCACHE", "FP_MAP_POLICY_EP", "FP_MAP_POLICY", "FP_MAP_POLICY_CNT")


def _create(like: Table, max_entries: int) -> Table:
    info = libbpf.map_info(like.map_fd)
    lib = libbpf.lib()
    lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                   ct.c_uint32, ct.c_void_p]

    class Opts(ct.Structure):
        # struct bpf_map_create_opts (libbpf's bpf.h), up to map_flags
        _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32),
                    ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32),
                    ("btf_vmlinux_value_type_id", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                    ("map_flags", ct.c_uint32)]
    opts = Opts(sz=ct.sizeof(Opts), map_flags=info.map_flags)
    fd = lib.bpf_map_create(info.type, b"fp_test_batch", info.key_size, info.value_size,
                            max_entries, ct.byref(opts))
    if fd < 0:
        raise OSError(ct.get_errno(), "bpf_map_create")
    return Table(like.name, fd, like.Key, like.Leaf if not like.percpu else None)


class Pair:
    """Two sets of small policy maps: `batched` written by apply_all,
    `single` by apply, op by op."""

    def __init__(self, dp, rules: int = 512):
        real = dp.policy
        sizes = {"FP_MAP_IPCACHE": 256, "FP_MAP_IPCACHE6": 256, "FP_MAP_POLICY_EP": 64,
                 "FP_MAP_POLICY": rules}
        self.tables = []
        self.batched = self._maps(real, sizes)
        self.single = self._maps(real, sizes)

    def _maps(self, real: PolicyMaps, sizes) -> PolicyMaps:
        made = {}
        for attr, name in (("ipcache", "FP_MAP_IPCACHE"), ("ipcache6", "FP_MAP_IPCACHE6"),
                           ("endpoints", "FP_MAP_POLICY_EP"), ("rules", "FP_MAP_POLICY")):
            t = _create(getattr(real, attr), sizes[name])
            self.tables.append(t)
            made[MAP[name]] = t
        made[MAP["FP_MAP_POLICY_CNT"]] = real.counters     # read only; never written here
        return PolicyMaps(made)

    def apply(self, ops) -> tuple[BaseException | None, BaseException | None]:
        errs = []
        for how in (lambda: self.batched.apply_all(ops),
                    lambda: [self.single.apply(op) for op in ops]):
            try:
                how()
                errs.append(None)
            except OSError as exc:
                errs.append(exc)
        return errs[0], errs[1]

    def contents(self, maps: PolicyMaps) -> dict:
        return {name: sorted(getattr(maps, name).raw_items())
                for name in ("ipcache", "ipcache6", "endpoints", "rules")}

    def same(self) -> bool:
        return self.contents(self.batched) == self.contents(self.single)

    def close(self) -> None:
        for t in self.tables:
            os.close(t.map_fd)


@pytest.fixture
def pair(dp):
    p = Pair(dp)
    try:
        yield p
    finally:
        p.close()


def _states():
    snap = cluster()
    # the node's IPv6 address too: IPv6 ipcache entries go to their own map
    first = compile_policy(snap, "n1", [ENI_IP, ENI_IP6], "default", {"y/c-audit"})
    # a second state: one policy gone, another added, an audit flag off
    objs = [o for o in snap.network_policies.values() if o.name != "b-from-a"]
    objs.append(netpol("x", "b-open", {"podSelector": {"matchLabels": {"app": "b"}},
                                       "ingress": [{}]}))
    snap2 = snapshot([*snap.namespaces.values(), *snap.pods.values(), *objs])
    second = compile_policy(snap2, "n1", [ENI_IP, ENI_IP6], "default", set(), previous=first)
    return first, second


def test_batched_plans_leave_the_maps_as_single_writes_do(pair):
    first, second = _states()
    ops = diff(None, first)
    assert len(ops) > 20 and len({type(op) for op in ops}) >= 3
    assert pair.apply(ops) == (None, None)
    assert pair.same()
    six = sum(1 for k in first.ipcache if ":" in k)
    assert six == 1
    assert pair.batched.usage() == {"ipcache": len(first.ipcache) - six, "ipcache6": six,
                                    "endpoints": len(first.endpoints),
                                    "rules": first.rule_count()}
    # flows counted on every rule, so a rewrite that keeps them shows it
    for maps in (pair.batched, pair.single):
        for k, v in maps.rules.items():
            v.flows = 7
            maps.rules[k] = v
    ops = diff(first, second)
    assert any(isinstance(op, RuleDelete) for op in ops)
    assert any(isinstance(op, RulePut) and op.was is not None for op in ops)
    assert pair.apply(ops) == (None, None)
    assert pair.same()
    kept = [v.flows for _, v in pair.batched.rules.items()]
    assert 7 in kept, "no rewritten or untouched rule kept its flow count"
    # and back to empty: deletes in batches
    assert pair.apply(diff(second, MapImage())) == (None, None)
    assert pair.same()
    assert pair.batched.usage() == {"ipcache": 0, "ipcache6": 0, "endpoints": 0, "rules": 0}


def test_a_full_map_refusing_half_way_leaves_what_single_writes_leave(dp):
    first, _ = _states()
    ops = diff(None, first)
    rules = first.rule_count()
    p = Pair(dp, rules=rules - 3)         # the last rules of the plan do not fit
    try:
        eb, es = p.apply(ops)
        assert eb is not None and es is not None, "the plan fitted a map too small for it"
        assert eb.errno == es.errno
        assert p.same()
        assert p.batched.usage()["rules"] == rules - 3
    finally:
        p.close()


def test_a_key_named_twice_in_a_run_is_written_in_order(pair):
    """The second write of a key sees the first: here a rule the diff takes
    for new (written with no flows) and then rewrites (keeping the flows it
    finds), over an entry planted with flows of its own."""
    k = PolicyKey(Direction.INGRESS, 60000, 6, 4242, 16)
    for maps in (pair.batched, pair.single):
        raw = maps._rule_key(POD_B, k)
        maps.rules[raw] = maps.rules.Leaf(policy_id=9, flags=0, flows=9)
    ops = [IpcachePut("10.9.0.0/16", 300), IpcachePut("10.9.0.0/16", 301),
           IpcachePut("10.9.1.0/24", 302),
           RulePut(POD_B, k, RuleValue((5,), False), None),
           RulePut(POD_A, k, RuleValue((6,), False), None),
           RulePut(POD_B, k, RuleValue((3,), True), UNKNOWN),
           RuleDelete(POD_A, k), RuleDelete(POD_A, k)]
    assert pair.apply(ops) == (None, None)
    assert pair.same()
    got = pair.batched.rules[pair.batched._rule_key(POD_B, k)]
    assert (got.policy_id, got.flags, got.flows) == (3, 1, 0)
    assert pair.batched.identities_of(["10.9.0.0/16"]) == {"10.9.0.0/16": 301}


def test_single_writes_leave_no_garbage_for_the_collector(pair):
    """A write, read or delete makes no ctypes type (a reference cycle only
    the cyclic collector frees) per call."""
    import gc
    m = pair.single
    k = PolicyKey(Direction.INGRESS, 60001, 17, 53, 16)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for i in range(50):
            m.apply(RulePut(POD_B, k, RuleValue((i + 1,), False), UNKNOWN))
            m.apply(IpcachePut(f"10.8.{i}.0/24", 400 + i))
            assert m.rules[m._rule_key(POD_B, k)].policy_id == i + 1
            mapio.lookup(m.rules.map_fd, bytes(m._rule_key(POD_B, k)), m.rules.value_size)
            m.apply(RuleDelete(POD_B, k))
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()
