"""The agent's background loops (service and policy sync, conntrack GC,
socket-LB opt-out): each is one daemon thread running `_run` until `stop()`
sets `_stop`; `Agent.stop` joins them before it releases the BPF module."""
from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("fastpath.worker")

# A compiled state (10,000 Services, or a node's NetworkPolicy) is hundreds
# of thousands of long-lived objects; a full collection walking them (tens
# of ms) would land on whichever change triggered it. Freezing after each
# plan keeps them out of every later collection, and costs nothing.
# Compiled states hold no reference cycles (tests/policy/test_gc.py), so an
# old state is still freed by reference counting, frozen or not. What
# freezing can keep is a cycle that was frozen before it became garbage (a
# young cycle frozen with the plan's objects, or one among long-lived
# objects); a full, unfrozen collection reclaims those every GC_FULL_EVERY
# plans, but only when a sync loop has nothing to do (idle_gc), never on a
# change's clock, unless the loops have not been idle for GC_FULL_FORCED
# plans.
GC_FULL_EVERY = 200
GC_FULL_FORCED = 10 * GC_FULL_EVERY

_gc_lock = threading.Lock()
_gc_plans_since_full = GC_FULL_EVERY    # the first idle moment after start collects


def settle_gc(plans_done: int = 0) -> None:
    """Call after a plan is applied (`plans_done`: kept for the callers;
    the count that matters is every loop's plans since the last full
    collection)."""
    global _gc_plans_since_full
    with _gc_lock:
        _gc_plans_since_full += 1
        forced = _gc_plans_since_full >= GC_FULL_FORCED
    if forced:
        full_gc()
    else:
        gc.freeze()


def full_gc_due() -> bool:
    return _gc_plans_since_full >= GC_FULL_EVERY


def idle_gc() -> bool:
    """A sync loop with nothing to do: run the full collection if it is
    due. Returns whether it ran."""
    if not full_gc_due():
        return False
    full_gc()
    return True


def full_gc() -> None:
    global _gc_plans_since_full
    with _gc_lock:
        _gc_plans_since_full = 0
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Worker:
    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _follow(self, source, store, settle: float, plan_all: Callable[[], None],
                plan_changes: Callable[[list], None],
                on_idle: Callable[[], None] | None = None,
                wake: threading.Event | None = None, leading: bool = False) -> None:
        """The sync loops' shape: wait for the source's initial sync (an
        empty store must never withdraw what the maps serve), plan once,
        then once per burst of change sets (after `settle` seconds), and
        once more whenever `wake` is set (checked every 0.1 s). `leading`:
        a change is planned at once when the last plan ended at least
        `settle` seconds ago, else when it is that old (a burst is still
        planned at most once per `settle`, and what arrives during a plan
        goes into the next one). `on_idle` runs after each burst and
        whenever a wait for a change times out (a retry timer, a poll). A
        source of None is synced from the start (state that comes only
        through the agent's API, like hostPorts)."""
        while source is not None and not source.synced.wait(0.5):
            if self._stop.is_set():
                return
        sub = store.subscribe()
        try:
            plan_all()
            last = time.monotonic()
            while not self._stop.is_set():
                first = sub.get(timeout=0.5 if wake is None else 0.1)
                if first is None:
                    if wake is not None and wake.is_set():
                        wake.clear()
                        plan_changes([])
                        last = time.monotonic()
                    else:
                        idle_gc()
                    if on_idle is not None:
                        on_idle()
                    continue
                time.sleep(max(0.0, last + settle - time.monotonic()) if leading else settle)
                if wake is not None:
                    wake.clear()
                plan_changes([first] + sub.drain())
                last = time.monotonic()
                if on_idle is not None:
                    on_idle()
        finally:
            sub.close()


class Purger:
    """Runs `fn(items)` for items handed in by `add`, right after the plan
    that produced them, off the plan's path; items that arrive together
    share one pass; a failed pass keeps them for another a moment later."""

    name = "purge"

    def __init__(self, settle: float = 0.02):
        self.settle = settle
        self.passes = 0
        self._pending: set = set()
        self._cond = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def _purge(self, items: set) -> None:
        raise NotImplementedError

    def add(self, items) -> None:
        items = set(items)
        if not items:
            return
        with self._cond:
            self._pending |= items
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every item added so far has been purged."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopped)
                if self._stopped and not self._pending:
                    return
            time.sleep(self.settle)           # let the rest of a burst arrive
            with self._cond:
                items, self._pending = self._pending, set()
            try:
                self._purge(items)
                self.passes += 1
            except Exception:      # keep them for another pass a moment later
                log.exception("%s failed", self.name)
                with self._cond:
                    self._pending |= items
                time.sleep(1)
                continue
            with self._cond:
                if not self._pending:
                    self._idle.set()
