"""The agent's background loops (service and policy sync, conntrack GC,
socket-LB opt-out): each is one daemon thread running `_run` until `stop()`
sets `_stop`; `Agent.stop` joins them before it releases the BPF module."""
from __future__ import annotations

import gc
import threading
import time
from typing import Callable

# A compiled state (10,000 Services, or a node's NetworkPolicy) is hundreds
# of thousands of long-lived objects; a full collection walking them (tens
# of ms) would land on whichever change triggered it. Freezing after each
# plan keeps them out of collections; a full unfrozen collection every
# GC_FULL_EVERY plans reclaims cyclic garbage of old states.
GC_FULL_EVERY = 200


def settle_gc(plans_done: int) -> None:
    """Call after a plan is applied, with the number of plans applied so far
    (this one included)."""
    if plans_done % GC_FULL_EVERY == 1:
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
                wake: threading.Event | None = None) -> None:
        """The sync loops' shape: wait for the source's initial sync (an
        empty store must never withdraw what the maps serve), plan once,
        then once per burst of change sets (after `settle` seconds), and
        once more whenever `wake` is set (checked every 0.1 s). `on_idle`
        runs after each burst and whenever a wait for a change times out
        (a retry timer, a poll). A source of None is synced from the
        start (state that comes only through the agent's API, like hostPorts)."""
        while source is not None and not source.synced.wait(0.5):
            if self._stop.is_set():
                return
        sub = store.subscribe()
        try:
            plan_all()
            while not self._stop.is_set():
                first = sub.get(timeout=0.5 if wake is None else 0.1)
                if first is None:
                    if wake is not None and wake.is_set():
                        wake.clear()
                        plan_changes([])
                    if on_idle is not None:
                        on_idle()
                    continue
                time.sleep(settle)
                if wake is not None:
                    wake.clear()
                plan_changes([first] + sub.drain())
                if on_idle is not None:
                    on_idle()
        finally:
            sub.close()
