"""The agent freezes its compiled states out of the cyclic collector after
each plan (agent/daemon/worker.py) and runs a full collection only when a
sync loop is idle. That is only safe if a replaced state is freed by
reference counting alone: these tests hold the compiler and the reconciler
to producing no reference cycles, with the collector switched off."""
from __future__ import annotations

import gc
import random
import time
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
    """The collector off, as the agent holds it while it compiles (the
    compilers' own helper), after one collection of what came before."""
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


class Cycle:
    pass


def dead_cycle() -> "weakref.ref[Cycle]":
    """A weak reference to a reference cycle nothing else refers to: only
    the cyclic collector can free it."""
    c = Cycle()
    c.me = c
    return weakref.ref(c)


@pytest.fixture
def fresh_gc_clock(monkeypatch):
    """No full collection due: none for 0 plans, just now."""
    monkeypatch.setattr(worker, "_gc_plans_since_full", 0)
    monkeypatch.setattr(worker, "_gc_last_full", time.monotonic())
    monkeypatch.setattr(worker, "_gc_plans_running", 0)


def test_a_plan_freezes_and_a_full_collection_waits_for_an_idle_loop(fresh_gc_clock):
    """settle_gc never runs the full collection on a change's clock; idle_gc
    runs it once GC_FULL_EVERY plans have passed, frozen garbage included."""
    c = Cycle()
    c.me = c
    ref = weakref.ref(c)
    worker.settle_gc()           # the cycle is alive: frozen with everything else
    del c
    try:
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
    finally:
        gc.unfreeze()


def test_a_loop_that_is_never_idle_still_collects(fresh_gc_clock):
    c = Cycle()
    c.me = c
    ref = weakref.ref(c)
    worker.settle_gc()
    del c
    try:
        for _ in range(worker.GC_FULL_FORCED - 2):
            worker.settle_gc()
        assert ref() is not None
        worker.settle_gc()
        assert ref() is None, "no full collection after GC_FULL_FORCED busy plans"
    finally:
        gc.unfreeze()


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


def test_young_garbage_is_collected_before_it_is_frozen(fresh_gc_clock):
    """A cycle that died before the plan ended (an exception's frame, a
    closed socket) is collected by settle_gc, not frozen until the next full
    collection; the full collection's clock does not move."""
    ref = dead_cycle()
    try:
        worker.settle_gc()
        assert ref() is None, "young garbage frozen with the plan's objects"
        assert worker._gc_plans_since_full == 1
        assert not worker.full_gc_due()
    finally:
        gc.unfreeze()


def test_a_large_plan_is_frozen_without_a_collection(fresh_gc_clock, monkeypatch):
    """More new objects than GC_SETTLE_COLLECT_MAX: collecting would walk
    them all on the plan's clock, so they are frozen as they are; the full
    collection reclaims what died among them."""
    monkeypatch.setattr(worker, "GC_SETTLE_COLLECT_MAX", -1)
    ref = dead_cycle()
    try:
        worker.settle_gc()
        assert ref() is not None
        worker.full_gc()
        assert ref() is None
    finally:
        gc.unfreeze()


def test_a_full_collection_is_due_after_a_while_with_plans(fresh_gc_clock, monkeypatch):
    """A quiet agent (few plans) still reclaims frozen garbage: after
    GC_FULL_SECONDS, if a plan happened since the last full collection."""
    monkeypatch.setattr(worker, "_gc_last_full", time.monotonic() - worker.GC_FULL_SECONDS - 1)
    assert not worker.full_gc_due(), "due without a plan since the last one"
    worker._gc_plans_since_full = 1
    assert worker.full_gc_due()
    try:
        assert worker.idle_gc()
        assert not worker.full_gc_due()
    finally:
        gc.unfreeze()


def test_no_full_collection_starts_while_a_plan_runs(fresh_gc_clock):
    """The full collection holds the GIL for tens of milliseconds: an idle
    loop does not start it while another loop is inside a plan."""
    worker._gc_plans_since_full = worker.GC_FULL_EVERY
    try:
        with worker.planning():
            assert not worker.full_gc_due()
            assert not worker.idle_gc()
        assert worker.full_gc_due()
        assert worker.idle_gc()
    finally:
        gc.unfreeze()


def test_a_failed_plan_leaves_no_plan_running(fresh_gc_clock):
    with pytest.raises(RuntimeError):
        with worker.planning():
            raise RuntimeError("a plan failed")
    assert worker._gc_plans_running == 0


def test_a_large_plan_gives_the_freed_heap_back_and_a_small_one_does_not(fresh_gc_clock,
                                                                           monkeypatch):
    """settle_gc after a plan that left more than GC_SETTLE_COLLECT_MAX
    objects (a start, a full rebuild) hands the C heap's free memory back;
    after a small plan (one change) it does not spend the heap walk."""
    released = []
    monkeypatch.setattr(worker, "release_free_memory", lambda: released.append(1))
    try:
        gc.collect()
        worker.settle_gc()
        assert released == [], "a plan that left few objects walked the heap"
        was = gc.isenabled()
        gc.disable()                     # as under a plan: the objects stay young
        keep = [[i] for i in range(worker.GC_SETTLE_COLLECT_MAX + 1000)]
        try:
            worker.settle_gc()
        finally:
            if was:
                gc.enable()
        assert released == [1], "a large plan left its freed heap resident"
        del keep
    finally:
        gc.unfreeze()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_release_free_memory_returns_freed_heap_pages_to_the_system():
    """What a large plan leaves: many freed allocations of the C heap (over
    pymalloc's 512 bytes, under the mmap threshold) between live ones; glibc
    keeps them resident until release_free_memory trims them."""
    chunks = [bytes(2048) + bytes([i % 256]) for i in range(40_000)]     # about 80 MB
    keep = chunks[::100]          # live blocks all over the heap: nothing shrinks on its own
    del chunks
    before = _rss_kb()
    worker.release_free_memory()
    after = _rss_kb()
    assert len(keep) == 400
    assert before - after > 40_000, f"RSS {before} kB -> {after} kB: the freed heap stayed"
