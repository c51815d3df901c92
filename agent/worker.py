"""The agent's background loops (service and policy sync, conntrack GC,
socket-LB opt-out): each is one daemon thread running `_run` until `stop()`
sets `_stop`; `Agent.stop` joins them before it releases the BPF module."""
from __future__ import annotations

import threading


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
