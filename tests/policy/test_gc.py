"""The agent freezes its compiled states out of the cyclic collector after
each plan (agent/daemon/worker.py) and runs a full collection only when a
sync loop is idle. That is only safe if a replaced state is freed by
reference counting alone: these tests hold the compiler and the reconciler
to producing no reference cycles, with the collector switched off."""
from __future__ import annotations

import gc
import random
import weakref

import pytest

from agent.daemon import worker
from agent.lb.compile import no_cyclic_gc
from agent.policy import compile_policy
from tests.policy.gen import NODES, base_world, mutate, random_policies
from tests.policy.kube import snapshot
from tests.policy.test_policysync import DENY_ALL, WEB, make, pods


@pytest.fixture
def no_collector():
    """The cyclic collector off (as the compilers hold it), from a clean heap."""
    gc.collect()
    with no_cyclic_gc():
        yield


def test_a_replaced_state_is_freed_without_the_collector(no_collector):
    rng = random.Random(3)
    world = base_world(rng, spread=True)
    random_policies(rng, world, 6)
    state = compile_policy(snapshot(world.objects()), "n1", NODES["n1"], "default", world.audited)
    serial = [0]
    for step in range(15):
        mutate(rng, world, serial)
        new = compile_policy(snapshot(world.objects()), "n1", NODES["n1"], "default",
                             world.audited, previous=state)
        gone = [weakref.ref(state), *(weakref.ref(ep) for ep in state.endpoints.values()
                                      if ep not in new.endpoints.values())]
        state = new
        alive = [r for r in gone if r() is not None]
        assert not alive, f"step {step}: {len(alive)} objects of the replaced state kept alive"


def test_the_reconcilers_old_states_are_freed_without_the_collector(no_collector):
    sync, store, maps, _ = make(pods({"a": "web", "b": "db", "c": "web"}) + [WEB])
    sync.sync_once()
    first = weakref.ref(sync.state)
    store.apply(upserts=[DENY_ALL])
    sync.sync_once()
    store.apply(deletes=[(WEB.kind, WEB.key)])
    sync.sync_once()
    assert first() is None, "the first plan's state outlived its successors"


@pytest.fixture
def frozen_garbage(monkeypatch):
    """A weak reference to a reference cycle that was alive at the first
    plan's settle_gc (so frozen with everything else) and is garbage since;
    the plan count starts there. The collector's frozen set is released
    after the test."""
    class Cycle:
        pass
    monkeypatch.setattr(worker, "_gc_plans_since_full", 0)
    c = Cycle()
    c.me = c
    ref = weakref.ref(c)
    worker.settle_gc()           # the cycle is alive: frozen with everything else
    del c
    try:
        yield ref
    finally:
        gc.unfreeze()


def test_a_plan_freezes_and_a_full_collection_waits_for_an_idle_loop(frozen_garbage):
    """settle_gc never collects on a change's clock; idle_gc collects once
    GC_FULL_EVERY plans have passed, frozen garbage included."""
    ref = frozen_garbage
    for _ in range(worker.GC_FULL_EVERY - 2):
        worker.settle_gc()
    gc.collect()             # a young collection does not see frozen objects
    assert ref() is not None
    assert not worker.idle_gc(), "a full collection before GC_FULL_EVERY plans"
    worker.settle_gc()
    assert ref() is not None, "settle_gc collected on the plan's clock"
    assert worker.idle_gc()
    assert ref() is None, "the idle full collection left frozen garbage"
    assert not worker.idle_gc()      # not due again until the next GC_FULL_EVERY plans


def test_a_loop_that_is_never_idle_still_collects(frozen_garbage):
    ref = frozen_garbage
    for _ in range(worker.GC_FULL_FORCED - 2):
        worker.settle_gc()
    assert ref() is not None
    worker.settle_gc()
    assert ref() is None, "no full collection after GC_FULL_FORCED busy plans"


def test_an_idle_sync_loop_runs_the_due_full_collection(monkeypatch):
    import threading
    import time
    from agent.k8s.store import Store
    from tests.policy.test_policysync import FakeSource

    store = Store()
    plans = []

    class Loop(worker.Worker):
        def _run(self):
            self._follow(FakeSource(store), store, 0.0, lambda: plans.append("all"),
                         lambda changes: plans.append(len(changes)),
                         wake=threading.Event())

    monkeypatch.setattr(worker, "_gc_plans_since_full", worker.GC_FULL_EVERY)
    loop = Loop("test-loop")
    loop._thread.start()
    try:
        deadline = time.monotonic() + 5
        while worker.full_gc_due() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not worker.full_gc_due(), "the idle loop did not collect"
        assert plans == ["all"]
    finally:
        loop.stop()
        gc.unfreeze()
