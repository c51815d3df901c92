"""The agent's background loops (service and policy sync, conntrack GC,
socket-LB opt-out): each is one daemon thread running `_run` until `stop()`
sets `_stop`; `Agent.stop` joins them before it releases the BPF module."""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Callable

log = logging.getLogger("fastpath.worker")

# A compiled state (10,000 Services, or a node's NetworkPolicy) is hundreds
# of thousands of long-lived objects; a full collection walking them (35-80
# ms at 1,000 policies, more with 10,000 Services) lands on whatever runs
# meanwhile: another loop's plan waits for the GIL until it is over. So the
# collector never walks them on a schedule of its own. After each plan the
# objects it left are frozen (out of every later collection; compiled states
# hold no reference cycles, tests/policy/test_gc.py, so a replaced state is
# still freed by reference counting). A plan that left few objects first
# collects the young generations (young cycles: an exception's frame, a
# closed socket), which walks only those (microseconds), so garbage is
# rarely frozen. What can still be frozen is a cycle among objects that were
# alive when frozen and died later (a netlink socket closed after use), or
# the garbage of a large plan (a start or a full rebuild, frozen without a
# collection, which would walk all of it): a full, unfrozen collection
# reclaims those when a sync loop has nothing to do (idle_gc), once
# GC_FULL_EVERY plans or GC_FULL_SECONDS with a plan have passed; on a
# change's clock only after GC_FULL_FORCED plans without an idle moment.
GC_FULL_EVERY = 2000
GC_FULL_SECONDS = 600.0
GC_FULL_FORCED = 10 * GC_FULL_EVERY
# A plan that left more new objects than this is frozen without collecting
# them first (a collection walks every object it left).
GC_SETTLE_COLLECT_MAX = 20000

_gc_lock = threading.Lock()
# Not due at start: the first plan of a starting agent (10,000 Services) is
# its longest, and the other loops are idle while it runs.
_gc_plans_since_full = 0
_gc_last_full = time.monotonic()
_gc_plans_running = 0


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """Around a plan: no loop starts the full collection while any plan
    runs (it would hold the GIL for its whole length)."""
    global _gc_plans_running
    with _gc_lock:
        _gc_plans_running += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_plans_running -= 1


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
        return
    # gc.get_count()[0]: objects allocated (less those freed) since the last
    # collection; the plan ran with the collector off, so they are its own
    # and whatever other threads made meanwhile, all young. The two young
    # generations only: a collection of the oldest one cost a fixed 0.7 ms
    # here however little it found (it also empties the free lists).
    if gc.get_count()[0] <= GC_SETTLE_COLLECT_MAX:
        gc.collect(1)
        gc.freeze()
        return
    gc.freeze()
    release_free_memory()


def release_free_memory() -> None:
    """Give the C heap's free memory back to the system. A large plan (a
    start, a full rebuild) and the initial sync before it leave tens of
    megabytes of freed temporaries (decoded API pages, the plan's rows and
    ops) in glibc's heap, which keeps them resident until it reuses them;
    measured with 10,000 Services x 10 and 20,000 policy rules: bench/
    agent_memory.py. Only after large plans: the walk over the heap costs
    a few milliseconds. A no-op where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    try:
        fn = ctypes.CDLL(None).malloc_trim       # the C library the interpreter runs on
    except AttributeError:
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def full_gc_due() -> bool:
    plans = _gc_plans_since_full
    if _gc_plans_running:
        return False
    return plans >= GC_FULL_EVERY or (
        plans > 0 and time.monotonic() - _gc_last_full >= GC_FULL_SECONDS)


def idle_gc() -> bool:
    """A sync loop with nothing to do: run the full collection if it is
    due. Returns whether it ran."""
    if not full_gc_due():
        return False
    full_gc()
    return True


def full_gc() -> None:
    global _gc_plans_since_full, _gc_last_full
    with _gc_lock:
        _gc_plans_since_full = 0
        _gc_last_full = time.monotonic()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    release_free_memory()


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
