"""Incremental compilation: one Service at a time, always equal to a full compile."""
from __future__ import annotations

import random

import pytest

from agent.k8s.model import Kind
from agent.k8s.parse import parse_object
from agent.k8s.store import Store
from agent.lb.compile import Frontend, compile_services
from agent.lb.reconcile import FakeMaps, Reconciler, check_whole
from agent.lb.table import ServiceTable, touched_services
from tests.lb.lbdata import NODE, ZONE, ep, eslice, service

NAMES = [f"svc-{i}" for i in range(8)]
IPS = [f"10.2.0.{i}" for i in range(1, 30)]


def random_service(rng: random.Random, name: str) -> dict:
    spec = {}
    if rng.random() < 0.4:
        # Few external addresses, so Services often claim the same one.
        spec["externalIPs"] = [f"203.0.113.{rng.randrange(1, 3)}"]
    if rng.random() < 0.2:
        spec["internalTrafficPolicy"] = "Local"
    # Occasionally a ClusterIP that is another Service's external address.
    ip = "203.0.113.1" if rng.random() < 0.05 else f"172.16.0.{NAMES.index(name) + 1}"
    return service(name, ip=ip, **spec)


def random_slice(rng: random.Random, k: int) -> dict:
    eps = [ep(i, ready=rng.random() > 0.2, node=rng.choice([NODE, "node-b"]),
              for_zones=[rng.choice([ZONE, "zone-2"])] if rng.random() < 0.3 else None)
           for i in rng.sample(IPS, rng.randrange(0, 6))]
    return eslice(f"slice-{k}", rng.choice(NAMES), eps,
                  ports=[("http", rng.choice([8080, 8081]), "TCP")])


@pytest.mark.parametrize("seed", range(6))
def test_incremental_updates_always_equal_a_full_compile(seed):
    rng = random.Random(seed)
    store = Store()
    table, rec, maps = ServiceTable(NODE, ZONE), Reconciler(), FakeMaps()
    maps.apply_all(rec.plan_changes(table.rebuild(store.snapshot())))
    for step in range(150):
        r = rng.random()
        if r < 0.3:
            cs = store.upsert(parse_object(random_service(rng, rng.choice(NAMES))))
        elif r < 0.4:
            cs = store.delete(Kind.SERVICE, ("shop", rng.choice(NAMES)))
        elif r < 0.85:
            # Includes a slice moving from one Service to another.
            cs = store.upsert(parse_object(random_slice(rng, rng.randrange(10))))
        else:
            cs = store.delete(Kind.ENDPOINT_SLICE, ("shop", f"slice-{rng.randrange(10)}"))
        snap = store.snapshot()
        if rng.random() < 0.05:
            table.node_zone = rng.choice([ZONE, "zone-2"])
            updates = table.rebuild(snap)
        else:
            updates = table.apply(cs.deltas if cs else ())
        full = compile_services(snap, NODE, table.node_zone)
        assert table.desired == full, f"seed {seed} step {step}"
        for op in rec.plan_changes(updates):
            maps.apply(op)
            assert check_whole(maps) == []
        assert set(maps.services) == set(full)
        assert rec.plan(full) == []


def test_a_shared_external_ip_passes_to_the_next_service_when_its_owner_goes():
    store = Store()
    table = ServiceTable(NODE, ZONE)
    for o in (service("a-web", ip="172.16.0.1", externalIPs=["203.0.113.7"]),
              service("b-web", ip="172.16.0.2", externalIPs=["203.0.113.7"])):
        store.upsert(parse_object(o))
    table.rebuild(store.snapshot())
    ext = Frontend("203.0.113.7", 80, "TCP")
    assert table.desired[ext].service == ("shop", "a-web")
    cs = store.delete(Kind.SERVICE, ("shop", "a-web"))
    updates = table.apply(cs.deltas)
    assert updates[ext].service == ("shop", "b-web")
    assert updates[Frontend("172.16.0.1", 80, "TCP")] is None
    assert set(updates) == {ext, Frontend("172.16.0.1", 80, "TCP")}


def test_an_unrelated_change_yields_no_update():
    store = Store()
    table = ServiceTable(NODE, ZONE)
    store.upsert(parse_object(service("web")))
    store.upsert(parse_object(eslice("web-1", "web", [ep("10.0.0.1")])))
    table.rebuild(store.snapshot())
    # A slice change that leaves the backend set as it was: an endpoint that
    # is not ready yet joins.
    cs = store.upsert(parse_object(eslice("web-1", "web", [ep("10.0.0.1"), ep("10.0.0.2", ready=False)])))
    assert touched_services(cs.deltas) == {("shop", "web")}
    assert table.apply(cs.deltas) == {}


def test_a_slice_relabelled_to_another_service_moves_its_endpoints():
    store = Store()
    for o in (service("web", ip="172.16.0.1"), service("api", ip="172.16.0.2"),
              eslice("s-1", "web", [ep("10.0.0.1")])):
        store.upsert(parse_object(o))
    table = ServiceTable(NODE, ZONE)
    table.rebuild(store.snapshot())
    cs = store.upsert(parse_object(eslice("s-1", "api", [ep("10.0.0.1")])))
    assert touched_services(cs.deltas) == {("shop", "web"), ("shop", "api")}
    updates = table.apply(cs.deltas)
    assert updates[Frontend("172.16.0.1", 80, "TCP")].reject
    assert [b.ip for b in updates[Frontend("172.16.0.2", 80, "TCP")].backends] == ["10.0.0.1"]
