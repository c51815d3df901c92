"""Reading a pinned ring buffer with libbpf's ring_buffer API (the monitor,
tests): nothing compiled, nothing of bcc."""
from __future__ import annotations

import ctypes as ct

from agent.datapath import libbpf

SAMPLE_FN = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


class RingReader:
    def __init__(self, fd: int):
        lib = libbpf.lib()
        lib.ring_buffer__new.argtypes = [ct.c_int, SAMPLE_FN, ct.c_void_p, ct.c_void_p]
        lib.ring_buffer__new.restype = ct.c_void_p
        lib.ring_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
        lib.ring_buffer__free.argtypes = [ct.c_void_p]
        self.records: list[bytes] = []

        def on_sample(_ctx, data, size):
            self.records.append(ct.string_at(data, size))
            return 0
        self._cb = SAMPLE_FN(on_sample)     # keep a reference for the C side
        self._rb = lib.ring_buffer__new(fd, self._cb, None, None)
        if not self._rb:
            err = ct.get_errno()
            raise OSError(err, "ring_buffer__new failed")

    def poll(self, timeout_ms: int) -> list[bytes]:
        libbpf.lib().ring_buffer__poll(self._rb, timeout_ms)
        out, self.records = self.records, []
        return out

    def close(self) -> None:
        if self._rb:
            libbpf.lib().ring_buffer__free(self._rb)
            self._rb = None
