"""ServiceSync against the real, pinned service maps of a small datapath:
a map that is really full (the kernel's E2BIG), the capacity check refusing
by name, the failure path restoring from what the kernel holds, the affinity
purge and the ids other state names.
"""
from __future__ import annotations

import pytest

from agent.config import Config
from agent.datapath import Datapath
from agent.daemon.agent import lb_capacities
from agent.daemon.services import ServiceSync, restore_reconciler
from agent.k8s.parse import parse_object
from agent.k8s.store import Store
from agent.lb.reconcile import FLAG_REJECT
from tests.lb.lbdata import ep, eslice, service

SMALL = dict(services_map_size=16, slots_map_size=64, backends_map_size=32,
             source_ranges_map_size=16)


@pytest.fixture(scope="module")
def small(bpffs, bpfnet):
    cfg = Config.defaults().replace(bpffs_root=f"{bpffs}/small", **SMALL)
    d = Datapath(cfg, netns=bpfnet.ns, test_build=True).load()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def lb(small):
    lb = small.lb
    yield lb
    # leave the maps empty for the next test
    rec = restore_reconciler(lb)
    from agent.daemon.services import apply_ops
    apply_ops(lb, rec.plan({}))
    lb.svcnet_set({})
    small.tables[next(n for n in small.tables if n.startswith("fp_aff4"))].clear()


def vip(i):
    return f"172.16.1.{i}"


def svc(name, i, *ips):
    return [service(name, ip=vip(i)), eslice(f"{name}-1", name, [ep(ip) for ip in ips])]


def sync_for(lb, small, store):
    return ServiceSync(lb, store, None, "node-a", capacities=lb_capacities(small.config))


def put(store, *objs):
    return store.apply(upserts=[parse_object(o) for o in objs])


def frontends(lb):
    return {(s["vip"], s["port"], s["proto"]) for s in lb.services()}


def test_services_beyond_the_real_maps_capacity_are_refused_by_name_never_half_written(small, lb):
    store = Store()
    objs = []
    for i in range(1, 21):
        objs += svc(f"s{i:02d}", i, f"10.1.0.{i}")
    put(store, *objs)
    s = sync_for(lb, small, store)
    assert s._guarded(s.sync_once) > 0 and s.errors == 0
    assert len(lb.services()) == 16
    assert sorted(k[1] for k in s.refused) == ["s17", "s18", "s19", "s20"]
    # every entry the kernel holds is whole
    slots, bes = lb.all_slots(), lb.backends()
    for e in lb.services():
        assert all(bes[slots[(e["svc_id"], k)]] for k in range(1, e["count"] + 1))


def test_a_really_full_map_fails_the_write_the_reconciler_believes_the_kernel_and_retries(
        small, lb):
    store = Store()
    put(store, *svc("a", 1, "10.1.0.1"))
    s = sync_for(lb, small, store)
    s._guarded(s.sync_once)
    # someone else fills the service map to the brim behind the agent's back
    for k in range(15):
        lb.put_service(f"192.0.2.{k + 1}", 80, "TCP", 5000 + k, 0, FLAG_REJECT)
    with pytest.raises(Exception, match="Argument list too long"):     # E2BIG: full
        lb.put_service("192.0.2.99", 80, "TCP", 6000, 0, FLAG_REJECT)
    assert s._guarded(lambda: s._sync_changes([put(store, *svc("b", 2, "10.1.0.2"))])) == -1
    assert s.errors == 1 and s.retry_at is not None and not s.healthy()
    # the reconciler was rebuilt from the kernel: it knows the strangers now
    assert len(s.reconciler.frontends()) == 16
    s.retry_at = 0
    s._idle()
    assert s.healthy() and s.errors == 1
    assert frontends(lb) == {(vip(1), 80, "TCP"), (vip(2), 80, "TCP")}
    b = next(e for e in lb.services() if e["vip"] == vip(2))
    assert lb.backends()[lb.all_slots()[(b["svc_id"], 1)]] == ("10.1.0.2", 8080, "TCP")


def test_affinity_entries_are_purged_from_the_real_map_and_their_ids_not_reused(small, lb):
    aff = small.tables[next(n for n in small.tables if n.startswith("fp_aff4"))]
    k1 = aff.Key(svc_id=3, client=0x0a000001)
    k2 = aff.Key(svc_id=4, client=0x0a000002)
    k3 = aff.Key(svc_id=5, client=0x0a000003)
    for k, b in ((k1, 30), (k2, 40), (k3, 50)):
        aff[k] = aff.Leaf(last_seen=1, backend_id=b)
    assert lb.named_ids() == ({3, 4, 5}, {30, 40, 50})
    rec = restore_reconciler(lb)
    # a fresh id never lands on one affinity still names
    assert rec.service_ids.allocate("x") == 6 and rec.backend_ids.allocate("y") == 51
    assert lb.affinity_purge({3}, {40}, {(5, 50)}) == 3
    assert len(list(aff.items())) == 0


def test_svcnet_set_batched_writes_prefixes_and_hosts(lb):
    """svcnet_set writes in one batch: a range, host entries, a changed
    flag and removals end as the map's exact content; a prefix with host
    bits is refused before anything is written."""
    lb.svcnet_set({"172.16.0.0/16": 2, f"{vip(1)}/32": 1, f"{vip(2)}/32": 1})
    assert lb.svcnet() == {"172.16.0.0/16": 2, f"{vip(1)}/32": 1, f"{vip(2)}/32": 1}
    lb.svcnet_set({"172.16.0.0/16": 2, f"{vip(1)}/32": 3, "10.96.0.0/12": 2})
    assert lb.svcnet() == {"172.16.0.0/16": 2, f"{vip(1)}/32": 3, "10.96.0.0/12": 2}
    many = {f"172.16.{i // 250}.{i % 250 + 1}/32": 1 for i in range(12)}
    lb.svcnet_set(many)
    assert lb.svcnet() == many
    with pytest.raises(ValueError):
        lb.svcnet_set({"172.16.0.1/16": 2})
    assert lb.svcnet() == many, "a refused prefix must leave the map as it was"


def _raw(lb) -> dict:
    return {name: sorted(getattr(lb, name).raw_items()) for name in ("_svc", "_slot", "_be")}


def _clear(lb) -> None:
    for name in ("_svc", "_slot", "_be"):
        getattr(lb, name).clear()


def test_batched_service_writes_leave_what_single_writes_leave(lb):
    """apply_ops turns runs of backend, slot and service writes into batches
    packed by the maps' layouts: the maps end byte for byte as with the same
    operations written one by one (apply_op), also when the backend map is
    full half-way through a batch (the kernel's E2BIG after the entries that
    fit, none after)."""
    from agent.daemon.services import apply_op, apply_ops
    from agent.lb.compile import Backend, Frontend
    from agent.lb.reconcile import PutBackend, PutService, PutSlots, ServiceEntry
    backends = [PutBackend(i + 1, Backend(f"10.2.{i // 200}.{i % 200 + 1}", 8000 + i,
                                          "UDP" if i % 3 else "TCP"), draining=i % 5 == 0)
                for i in range(20)]
    ops = (backends
           + [PutSlots(7, (1, 2, 3), 1), PutSlots(8, (4, 5), 2), PutSlots(9, (6,), 1)]
           + [PutService(Frontend(vip(3), 80, "TCP"), ServiceEntry(7, 3, 30, 1)),
              PutService(Frontend(vip(4), 53, "UDP", 1), ServiceEntry(8, 2, 0, FLAG_REJECT))])
    try:
        assert apply_ops(lb, ops) == []
        batched = _raw(lb)
        _clear(lb)
        for op in ops:
            apply_op(lb, op)
        assert _raw(lb) == batched
        assert len(batched["_be"]) == 20 and len(batched["_slot"]) == 6
        # 40 backends into a map of 32: the first 12 fit after the 20 there
        more = [PutBackend(100 + i, Backend(f"10.3.0.{i + 1}", 80, "TCP")) for i in range(40)]
        errors = []
        for how in (lambda: apply_ops(lb, more), lambda: [apply_op(lb, op) for op in more]):
            _clear(lb)
            apply_ops(lb, ops)
            with pytest.raises(OSError) as exc:
                how()
            errors.append(exc.value.errno)
            errors.append(_raw(lb))
        assert errors[0] == errors[2]
        assert errors[1] == errors[3]
        assert len(errors[1]["_be"]) == 32
    finally:
        _clear(lb)


# -- IPv6 and dual-stack Services (v6svc) ---------------------------------------

def dual(name, i, v4_backends, v6_backends):
    return [service(name, ip=[vip(i), f"fd00:16::{i:x}"], ipFamilies=["IPv4", "IPv6"],
                    ipFamilyPolicy="PreferDualStack"),
            eslice(f"{name}-4", name, [ep(ip) for ip in v4_backends]),
            eslice(f"{name}-6", name, [ep(ip) for ip in v6_backends], address_type="IPv6")]


def test_dual_stack_services_go_to_each_familys_maps_and_come_back_from_them(small, lb):
    store = Store()
    objs = []
    for i in range(1, 21):     # each family's map holds 16 frontends
        objs += dual(f"d{i:02d}", i, [f"10.2.0.{i}"], [f"fd00:2::{i:x}"])
    put(store, *objs)
    s = sync_for(lb, small, store)
    assert s._guarded(s.sync_once) > 0 and s.errors == 0
    v4 = {e["vip"] for e in lb.services() if ":" not in e["vip"]}
    v6 = {e["vip"] for e in lb.services() if ":" in e["vip"]}
    assert len(v4) == 16 and len(v6) == 16
    # refused whole, by name: no Service has one family in and not the other
    refused = sorted(k[1] for k in s.refused)
    assert refused == [f"d{i:02d}" for i in range(17, 21)]
    assert all("refused" in str(r) for r in s.refused.values())
    # every entry the kernel holds is whole, each frontend with its family's backend
    slots, bes = lb.all_slots(), lb.backends()
    for e in lb.services():
        for k in range(1, e["count"] + 1):
            ip = bes[slots[(e["svc_id"], k)]][0]
            assert (":" in ip) == (":" in e["vip"]), (e, ip)
    # the Service ranges of both families (the IPv6 map holds the ClusterIPs)
    net = lb.svcnet()
    assert net["fd00:16::1/128"] == 1 and net[f"{vip(1)}/32"] == 1
    # an agent restart reads both families back and has nothing to write
    rec = restore_reconciler(lb)
    assert rec.plan({fe: s.reconciler.state(fe) for fe in s.reconciler.frontends()}) == []
    assert rec.usage()["services6"] == 16 and rec.usage()["backends6"] == 16


def test_the_ipv6_map_full_refuses_ipv6_services_by_name_while_ipv4_ones_still_fit(small, lb):
    store = Store()
    objs = []
    for i in range(1, 19):
        objs += [service(f"six{i:02d}", ip=f"fd00:16::{i:x}", ipFamilies=["IPv6"]),
                 eslice(f"six{i:02d}-6", f"six{i:02d}", [ep(f"fd00:2::{i:x}")],
                        address_type="IPv6")]
    objs += svc("four", 1, "10.1.0.1")
    put(store, *objs)
    s = sync_for(lb, small, store)
    assert s._guarded(s.sync_once) > 0 and s.errors == 0
    assert sorted(k[1] for k in s.refused) == ["six17", "six18"]
    assert "services6 map would need 17 entries (capacity 16)" in str(s.refused[("shop", "six17")])
    assert (vip(1), 80, "TCP") in frontends(lb)
