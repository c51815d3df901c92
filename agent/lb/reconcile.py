"""Desired frontends -> the ordered map writes that get the datapath there.

The services compiler (`agent.lb.compile`) says what each frontend should
translate to; this module turns a change of that answer into operations on
the three service maps (see bpf/include/fastpath.h):

    service map   frontend (VIP, port, proto, scope) -> service id, count, flags, affinity
    slot map      (service id, slot 1..count) -> backend id
    backend map   backend id                  -> backend address, draining flag
    maglev map    service id -> the Maglev table (backend ids), for MAGLEV entries
    source ranges (service id, prefix) of SRC_RANGE entries

A packet reads them in that order, so the writes go the other way round: new
backends, then slots, Maglev tables and source ranges, then the service
entry that makes them visible; a shrinking service first lowers its count,
then loses its surplus slots and ranges; removed frontends lose their entry,
then their slots, table and ranges, and that comes first in a plan (nothing
else reads them, and a full map gets its room back before the additions); a
backend is deleted only once no slot or table refers to it. After every single operation each service entry a
packet can see is whole. `FakeMaps` and `check_whole` let tests prove that
after each step.

Ids are stable: a frontend keeps its service id and a backend address keeps
its backend id for as long as they exist, so a change to one Service writes
only that Service's entries. A released id is not handed out again before a
quarantine of time has passed (longer than any ClientIP affinity timeout and
conntrack lifetime), and fresh ids are preferred while there are any, so
that no affinity or conntrack entry naming an old id can meet the id with
another meaning. After an agent restart, `Reconciler.restore` rebuilds ids
and layout from what the pinned maps hold (ids that conntrack or affinity
entries still name count as just released), and the next plan writes only
what differs. Each plan also reports which (service id, backend id) pairs
ended and which service ids went, so affinity entries naming them can be
purged (agent.daemon.services).

Pure module: no kubernetes client, prometheus, grpc or kernel imports.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Optional, Union

from agent.model import bpfdefs
from agent.lb.compile import (
    KIND_CLUSTER_IP, KIND_HOST_PORT, KIND_NODE_PORT, Backend, Frontend, FrontendState,
    no_cyclic_gc,
)
from agent.lb.maglev import DEFAULT_TABLE_SIZE, backend_name, build_table

__all__ = [
    "PutBackend", "PutSlots", "PutService", "PutMaglev", "PutRanges", "DeleteService",
    "DeleteSlots", "DeleteMaglev", "DeleteRanges", "DeleteBackend", "Op", "ServiceEntry",
    "IdAllocator", "IdsExhausted", "Reconciler", "FakeMaps", "check_whole", "FLAG_AFFINITY",
    "FLAG_REJECT", "FLAG_LOCAL", "FLAG_EXTERNAL", "FLAG_DROP", "FLAG_MAGLEV",
    "FLAG_SRC_RANGE", "FLAG_NODEPORT", "FLAG_HOSTPORT", "MAX_SLOTS",
    "ID_QUARANTINE_SECONDS",
]

_DEFS = bpfdefs.load().defines
FLAG_AFFINITY = _DEFS["FP_SVC_F_AFFINITY"]
FLAG_REJECT = _DEFS["FP_SVC_F_REJECT"]
FLAG_LOCAL = _DEFS["FP_SVC_F_LOCAL"]
FLAG_EXTERNAL = _DEFS["FP_SVC_F_EXTERNAL"]
FLAG_DROP = _DEFS["FP_SVC_F_DROP"]
FLAG_MAGLEV = _DEFS["FP_SVC_F_MAGLEV"]
FLAG_SRC_RANGE = _DEFS["FP_SVC_F_SRC_RANGE"]
FLAG_NODEPORT = _DEFS["FP_SVC_F_NODEPORT"]
FLAG_HOSTPORT = _DEFS["FP_SVC_F_HOSTPORT"]
FLAG_SOLE = _DEFS["FP_SVC_F_SOLE"]

# fp_svc4.count is a __u16.
MAX_SLOTS = 0xFFFF
# Service and backend ids are __u32 in every map; 0 means "none".
MAX_ID = 0xFFFFFFFF
# How long a released id waits before it may name something else: longer
# than the longest ClientIP affinity timeout the API allows (86,400 s) and
# than a translated TCP flow's default idle lifetime; the agent raises it to
# its configured conntrack lifetimes when those are longer.
ID_QUARANTINE_SECONDS = 86400 + 3600


# ------------------------------------------------------------- operations

@dataclass(frozen=True, slots=True)
class PutBackend:
    """Create or overwrite backend `backend_id`. `draining`: kept for the
    flows already on it; no new connection may choose it."""

    backend_id: int
    backend: Backend
    draining: bool = False


@dataclass(frozen=True, slots=True)
class PutSlots:
    """Write slots first, first+1, ... of `service_id` with these backend ids."""

    service_id: int
    slots: tuple[int, ...]
    first: int = 1


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """What the service map holds for one frontend."""

    service_id: int
    count: int
    affinity_timeout: int
    flags: int


@dataclass(frozen=True, slots=True)
class PutService:
    """Create or overwrite the frontend's service entry."""

    frontend: Frontend
    entry: ServiceEntry


@dataclass(frozen=True, slots=True)
class DeleteService:
    frontend: Frontend


@dataclass(frozen=True, slots=True)
class DeleteSlots:
    """Delete slots from_slot..to_slot (inclusive) of `service_id`."""

    service_id: int
    from_slot: int
    to_slot: int


@dataclass(frozen=True, slots=True)
class DeleteBackend:
    backend_id: int


@dataclass(frozen=True, slots=True)
class PutMaglev:
    """Write the Maglev table of `service_id` (one value: a packet sees the
    old table or the new one, never a mix)."""

    service_id: int
    table: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DeleteMaglev:
    service_id: int


@dataclass(frozen=True, slots=True)
class PutRanges:
    """Add source prefixes (canonical CIDRs) allowed to reach `service_id`."""

    service_id: int
    cidrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeleteRanges:
    service_id: int
    cidrs: tuple[str, ...]


Op = Union[PutBackend, PutSlots, PutService, PutMaglev, PutRanges, DeleteService,
           DeleteSlots, DeleteMaglev, DeleteRanges, DeleteBackend]


def flags_of(state: FrontendState) -> int:
    f = 0
    if state.affinity_timeout:
        f |= FLAG_AFFINITY
    if state.drop and not state.reject:
        f |= FLAG_DROP
    elif state.reject or not state.backends:
        f |= FLAG_REJECT
    if state.local_only:
        f |= FLAG_LOCAL
    if state.kind != KIND_CLUSTER_IP:
        f |= FLAG_EXTERNAL
    if state.kind == KIND_NODE_PORT:
        f |= FLAG_NODEPORT
    elif state.kind == KIND_HOST_PORT:
        f |= FLAG_HOSTPORT
    if state.maglev and state.backends and not (state.reject or state.drop):
        f |= FLAG_MAGLEV
    if state.source_ranges:
        f |= FLAG_SRC_RANGE
    if state.sole:
        f |= FLAG_SOLE
    return f


def _recount(counts: dict[int, int], gained: Iterable[int], lost: Iterable[int],
             gone: Optional[set[int]] = None) -> None:
    """One more reference for each id `gained`, one fewer for each `lost`;
    an id left with none leaves `counts` (and joins `gone`)."""
    for b in gained:
        counts[b] = counts.get(b, 0) + 1
    for b in lost:
        n = counts.get(b, 0) - 1
        if n > 0:
            counts[b] = n
        else:
            counts.pop(b, None)
            if gone is not None:
                gone.add(b)


def _written(b: Backend) -> tuple:
    # The fields the backend map stores; node and zone are for inspection
    # only and never cause a map write (nor can a restart recover them).
    return (b.ip, b.port, b.protocol, b.terminating)


# ------------------------------------------------------------------- ids

class IdsExhausted(RuntimeError):
    pass


class IdAllocator:
    """Numeric ids for hashable keys, from `first` to `limit` inclusive.

    An id belongs to one key from allocate() until release(); it is never
    given to a second key in between. Fresh ids (never handed out) come
    first; a released id is reused, oldest first, only once no fresh id is
    left and `quarantine` seconds have passed since its release, so that
    state naming it (affinity, conntrack) has aged out or been purged.
    `clock` is a monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, limit: int = MAX_ID, first: int = 1,
                 quarantine: float = ID_QUARANTINE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < first <= limit:
            raise ValueError(f"bad id range {first}..{limit}")
        self.first = first
        self.limit = limit
        self.quarantine = quarantine
        self.clock = clock
        self._by_key: dict[Hashable, int] = {}
        self._by_id: dict[int, Hashable] = {}
        self._next = first
        # Released ids as runs [released at, lo, hi], oldest first: a restore
        # releases every gap below the highest id at once, and ids grow to
        # millions over a node's life, so gaps are kept as runs, not one by one.
        self._free: collections.deque[list] = collections.deque()

    def get(self, key: Hashable) -> Optional[int]:
        return self._by_key.get(key)

    def key_of(self, id_: int) -> Optional[Hashable]:
        return self._by_id.get(id_)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def items(self):
        return self._by_key.items()

    def waiting(self) -> int:
        """Released ids still waiting (in quarantine or not yet reused)."""
        return sum(hi - lo + 1 for _, lo, hi in self._free)

    def allocate(self, key: Hashable) -> int:
        """The key's id, allocating one if it has none."""
        id_ = self._by_key.get(key)
        if id_ is not None:
            return id_
        return self.allocate_new(key)

    def allocate_new(self, key: Hashable) -> int:
        """An id for a key the caller knows has none."""
        if self._next <= self.limit:
            id_ = self._next
            self._next += 1
        elif self._free and self.clock() - self._free[0][0] >= self.quarantine:
            run = self._free[0]
            id_ = run[1]
            run[1] += 1
            if run[1] > run[2]:
                self._free.popleft()
        else:
            waiting = (f"; the oldest released id is free again in "
                       f"{self.quarantine - (self.clock() - self._free[0][0]):.0f}s"
                       if self._free else "")
            raise IdsExhausted(f"all ids {self.first}..{self.limit} are in use or in "
                               f"quarantine{waiting}")
        self._by_key[key] = id_
        self._by_id[id_] = key
        return id_

    def release(self, key: Hashable) -> int:
        id_ = self._by_key.pop(key)
        del self._by_id[id_]
        self._free.append([self.clock(), id_, id_])
        return id_

    @classmethod
    def restore(cls, held: Mapping[Hashable, int], limit: int = MAX_ID, first: int = 1,
                quarantine: float = ID_QUARANTINE_SECONDS,
                clock: Callable[[], float] = time.monotonic,
                named: Iterable[int] = ()) -> "IdAllocator":
        """An allocator in which exactly `held` is allocated (key -> id).

        `named`: ids other state still names (conntrack and affinity entries
        of an earlier run). When they were released is not known, so every
        free id up to the highest held or named one counts as released now:
        quarantined from this moment, like an id released by this run.
        Fresh ids continue above them.
        """
        a = cls(limit, first, quarantine, clock)
        for key, id_ in held.items():
            if not first <= id_ <= limit:
                raise ValueError(f"id {id_} of {key!r} is outside {first}..{limit}")
            if id_ in a._by_id:
                raise ValueError(f"id {id_} is held by both {a._by_id[id_]!r} and {key!r}")
            a._by_key[key] = id_
            a._by_id[id_] = key
        top = max(a._by_id, default=first - 1)
        top = max([top] + [i for i in named if first <= i <= limit])
        a._next = top + 1
        now = a.clock()
        lo = first
        for held_id in sorted(a._by_id) + [top + 1]:
            if lo < held_id:
                a._free.append([now, lo, held_id - 1])
            lo = held_id + 1
        return a


# ------------------------------------------------------------ reconciler

MISSING = 0
DANGLING = -1


def _present(slots: tuple[int, ...], start: int) -> list[tuple[int, int]]:
    """Runs (1-based, inclusive) of slots from `start` on that exist in the map."""
    return [(s + 1, e) for s, e in _runs([i for i in range(start - 1, len(slots))
                                          if slots[i] != MISSING])]


class _Applied:
    """What the maps hold for one frontend this reconciler owns."""

    __slots__ = ("entry", "slots", "claims", "state", "draining", "maglev", "ranges")

    def __init__(self, entry: ServiceEntry, slots: tuple[int, ...], claims: frozenset[int],
                 state: Optional[FrontendState], draining: frozenset[int] = frozenset(),
                 maglev: tuple[int, ...] = (), ranges: frozenset[str] = frozenset()):
        self.entry = entry
        # Backend id per slot 1..count. Only after restore: MISSING for a slot
        # the map lacks, DANGLING for one naming no backend.
        self.slots = slots
        self.claims = claims          # backend ids this frontend reports terminating
        self.state = state            # None after restore: compare written form only
        self.draining = draining      # backend ids it keeps only for existing flows
        self.maglev = maglev          # its Maglev table as written (() = none)
        self.ranges = ranges          # its source prefixes as written


def _layout(old: tuple[int, ...], want: list[int]) -> list[int]:
    """New slot contents: survivors keep their slot, newcomers fill the gaps.

    Keeping positions means removing one backend of a 1,000-backend service
    rewrites one slot, not every slot after it.
    """
    n = len(want)
    wanted = set(want)
    out = [0] * n
    placed: set[int] = set()
    for i in range(min(len(old), n)):
        b = old[i]
        if b in wanted and b not in placed:
            out[i] = b
            placed.add(b)
    rest = iter([b for b in want if b not in placed])
    for i in range(n):
        if not out[i]:
            out[i] = next(rest)
    return out


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted 0-based positions -> (start, end_exclusive) runs."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class Reconciler:
    """Remembers what it wrote; plans the next writes from a new desired state.

        rec = Reconciler()
        ops = rec.plan(compile_services(snap, node, zone))   # apply in order
        ...
        ops = rec.plan(compile_services(snap2, node, zone))  # only the changes

    plan() commits its result: the reconciler assumes every returned op gets
    applied, in order. If applying fails part-way, or plan() itself raises
    (IdsExhausted), rebuild with restore() from what the maps hold: the
    service sync (agent.daemon.services) does exactly that and plans again.
    """

    def __init__(self, *, max_services: int = MAX_ID, max_backends: int = MAX_ID,
                 max_slots: int = MAX_SLOTS, quarantine: float = ID_QUARANTINE_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 maglev_size: int = DEFAULT_TABLE_SIZE):
        self.service_ids = IdAllocator(max_services, quarantine=quarantine, clock=clock)
        self.backend_ids = IdAllocator(max_backends, quarantine=quarantine, clock=clock)
        self.max_slots = max_slots
        self.maglev_size = maglev_size
        self._applied: dict[Frontend, _Applied] = {}
        self._backends: dict[int, Backend] = {}     # as last written
        self._backends6: set[int] = set()            # those of them that are IPv6
        self._refs: dict[int, int] = {}             # backend id -> frontends using it
        self._term: dict[int, int] = {}             # ... of which report it terminating
        self._slotrefs: dict[int, int] = {}         # ... of which have it in their slots
        self._drained: set[int] = set()             # written with the draining flag
        # Left behind by an earlier run, found by restore(): service entries
        # whose id another entry owns, slots (Maglev tables, source ranges)
        # no entry can reach, backends no slot names. The next plan removes
        # them.
        self._stale_frontends: set[Frontend] = set()
        self._orphan_slots: dict[int, list[int]] = {}
        self._orphan_maglev: set[int] = set()
        self._orphan_ranges: dict[int, set[str]] = {}
        self._orphan_backends: set[int] = set()
        # Frontends with more backends than a service entry can count:
        # frontend -> how many the compiler offered (only max_slots are used).
        self.truncated: dict[Frontend, int] = {}
        # What the last plan ended, for purging state that names it:
        # (service id, backend id) pairs no longer served, service ids released.
        self.ended_pairs: set[tuple[int, int]] = set()
        self.released_service_ids: set[int] = set()

    # -------------------------------------------------------- inspection

    def service_id(self, frontend: Frontend) -> Optional[int]:
        a = self._applied.get(frontend)
        return a.entry.service_id if a else None

    def backend_id(self, backend: Union[Backend, tuple[str, int, str]]) -> Optional[int]:
        key = backend.key if isinstance(backend, Backend) else tuple(backend)
        return self.backend_ids.get(key)

    def frontends(self) -> dict[Frontend, ServiceEntry]:
        return {fe: a.entry for fe, a in self._applied.items()}

    def slots(self, frontend: Frontend) -> tuple[int, ...]:
        a = self._applied.get(frontend)
        return a.slots if a else ()

    def draining(self, frontend: Frontend) -> frozenset[int]:
        """Backend ids the frontend keeps only for flows already on them."""
        a = self._applied.get(frontend)
        return a.draining if a else frozenset()

    def maglev_table(self, frontend: Frontend) -> tuple[int, ...]:
        a = self._applied.get(frontend)
        return a.maglev if a else ()

    def state(self, frontend: Frontend) -> Optional[FrontendState]:
        """The state last planned for `frontend` (None after restore)."""
        a = self._applied.get(frontend)
        return a.state if a else None

    def usage(self) -> dict[str, int]:
        """Entries each map holds once the next plan has made its first
        removals (agent.lb.capacity): what restore found left behind (stale
        entries, orphan slots, tables, ranges and backends) is deleted
        before anything is added, so it is not counted."""
        services6 = sum(1 for fe in self._applied if ":" in fe.ip)
        backends6 = len(self._backends6) - len(self._backends6 & self._orphan_backends)
        return {
            "services": len(self._applied) - services6,
            "slots": sum(len(a.slots) for a in self._applied.values()),
            "backends": len(self._backends) - len(self._orphan_backends) - backends6,
            "maglev": sum(1 for a in self._applied.values() if a.maglev),
            "ranges": sum(len(a.ranges) for a in self._applied.values()),
            # the IPv6 twins (FP_MAP_SERVICES6, FP_MAP_BACKENDS6)
            "services6": services6,
            "backends6": backends6,
        }

    def freed_first(self, frontend: Frontend) -> dict[str, int]:
        """Entries a plan frees before adding anything when it removes
        `frontend` (its backends are deleted last, so not counted)."""
        a = self._applied.get(frontend)
        if a is None:
            return {}
        return {"services6" if ":" in frontend.ip else "services": 1, "slots": len(a.slots),
                "maglev": 1 if a.maglev else 0, "ranges": len(a.ranges)}

    # --------------------------------------------------------- planning

    def plan(self, desired: Mapping[Frontend, FrontendState]) -> list[Op]:
        """Operations that take the maps from the last plan to `desired`."""
        return self.plan_changes(self.changes(desired))

    def changes(self, desired: Mapping[Frontend, FrontendState]
                ) -> dict[Frontend, Optional[FrontendState]]:
        """The updates that take the last plan to `desired` (for plan_changes)."""
        updates: dict[Frontend, Optional[FrontendState]] = {}
        for fe, st in desired.items():
            a = self._applied.get(fe)
            if a is None or a.state is None or a.state != st:
                updates[fe] = st
        for fe in self._applied:
            if fe not in desired:
                updates[fe] = None
        for fe in self._stale_frontends:
            if fe not in desired:
                updates[fe] = None
        return updates

    def plan_changes(self, updates: Mapping[Frontend, Optional[FrontendState]]) -> list[Op]:
        """Like plan(), for callers that know which frontends changed.

        updates: frontend -> its new state, or None to remove it; frontends
        not mentioned stay as they are. Costs O(size of the change), not of
        the whole service table.
        """
        with no_cyclic_gc():
            return self._plan_changes(updates)

    def _maglev(self, st: FrontendState, want: Iterable[int]) -> tuple[int, ...]:
        """The Maglev table of a frontend: its backends' ids placed by the
        table built from their addresses (the same on every node)."""
        if not (st.maglev and not st.reject and not st.drop):
            return ()
        ids = list(want)
        if not ids:
            return ()
        names = [backend_name(*self.backend_ids.key_of(b)) for b in ids]
        return tuple(ids[i] for i in build_table(names, self.maglev_size))

    def _plan_changes(self, updates: Mapping[Frontend, Optional[FrontendState]]) -> list[Op]:
        stale_ops: list[Op] = []
        service_ops: list[Op] = []
        removal_ops: list[Op] = []
        released_services: list[Frontend] = []
        maybe_unused: set[int] = set(self._orphan_backends)
        ended: set[tuple[int, int]] = set()
        # Backends whose users changed: their record is recomputed below.
        touched: set[int] = set()
        # Records for backends the maps do not hold yet (or hold as orphans).
        records: dict[int, Backend] = {}
        held = self.backend_ids._by_key
        allocate = self.backend_ids.allocate_new     # only for keys `held` lacks
        known = self._backends

        def backend_id(b: Backend, slotted: Mapping[int, None]) -> Optional[int]:
            """b's id (a new one, with its record, for a new backend); None
            when the frontend's `slotted` ids have it already."""
            key = (b.ip, b.port, b.protocol)
            bid = held.get(key)
            if bid is None:
                bid = allocate(key)
                records[bid] = b
            elif bid in slotted:
                return None
            elif bid not in known:
                records.setdefault(bid, b)
            return bid

        # Entries found sharing another's service id go first, so they have
        # their own slots before the owner's slots change under them.
        stale = self._stale_frontends
        for fe in sorted(updates, key=lambda f: (f not in stale, f.sort_key())):
            st = updates[fe]
            a = self._applied.get(fe)
            if st is None:
                if a is not None:
                    sid = a.entry.service_id
                    removal_ops.append(DeleteService(fe))
                    for lo, hi in _present(a.slots, 1):
                        removal_ops.append(DeleteSlots(sid, lo, hi))
                    if a.maglev:
                        removal_ops.append(DeleteMaglev(sid))
                    if a.ranges:
                        removal_ops.append(DeleteRanges(sid, tuple(sorted(a.ranges))))
                    self._account(a.slots, a.claims, (), frozenset(), touched, maybe_unused,
                                  a.draining, frozenset(), a.maglev, ())
                    del self._applied[fe]
                    released_services.append(fe)
                elif fe in self._stale_frontends:
                    # First of all: its slots may belong to another entry
                    # that is about to shrink.
                    stale_ops.append(DeleteService(fe))
                    self._stale_frontends.discard(fe)
                self.truncated.pop(fe, None)
                continue

            # A rejecting (or dropping) frontend has no slots whatever else it says.
            backends = () if st.reject or st.drop else st.backends
            if len(backends) > self.max_slots:
                self.truncated[fe] = len(backends)
                backends = backends[:self.max_slots]
            else:
                self.truncated.pop(fe, None)
            want: dict[int, None] = {}
            term: list[int] = []
            for b in backends:
                bid = backend_id(b, want)
                if bid is None:
                    continue
                want[bid] = None
                if b.terminating:
                    term.append(bid)
            claims = frozenset(term)
            drain: list[int] = []
            for b in st.draining:
                bid = backend_id(b, want)
                if bid is not None:
                    drain.append(bid)
            draining = frozenset(drain)
            claims |= draining          # a draining backend is terminating too

            sid = a.entry.service_id if a else self.service_ids.allocate(fe)
            if a is None:
                # The common case at start-up: nothing to keep in place.
                old: tuple[int, ...] = ()
                new = list(want)
                if new:
                    service_ops.append(PutSlots(sid, tuple(new), 1))
            else:
                old = a.slots
                new = _layout(old, list(want))
                changed = [i for i, b in enumerate(new) if i >= len(old) or old[i] != b]
                for s, e in _runs(changed):
                    service_ops.append(PutSlots(sid, tuple(new[s:e]), s + 1))
            old_table = a.maglev if a else ()
            table = self._maglev(st, want)
            if table and table != old_table:
                service_ops.append(PutMaglev(sid, table))
            old_ranges = a.ranges if a else frozenset()
            ranges = frozenset(st.source_ranges)
            if ranges - old_ranges:
                service_ops.append(PutRanges(sid, tuple(sorted(ranges - old_ranges))))
            entry = ServiceEntry(sid, len(new), st.affinity_timeout, flags_of(st))
            if a is None or a.entry != entry:
                service_ops.append(PutService(fe, entry))
            for lo, hi in _present(old, len(new) + 1):
                service_ops.append(DeleteSlots(sid, lo, hi))
            if old_ranges - ranges:
                service_ops.append(DeleteRanges(sid, tuple(sorted(old_ranges - ranges))))
            if old_table and not table:
                service_ops.append(DeleteMaglev(sid))
            self._stale_frontends.discard(fe)
            if a is not None:
                ended.update((sid, b) for b in set(old) - set(new) if b > 0)
            self._account(old, a.claims if a else frozenset(), new, claims,
                          touched, maybe_unused, a.draining if a else frozenset(), draining,
                          old_table, table)
            self._applied[fe] = _Applied(entry, tuple(new), claims, st, draining, table, ranges)

        # A backend's record is a function of the frontends using it, not of
        # which changed last: it is terminating only if every Service using
        # it says so (two Services may see one pod in different states for
        # a moment while the EndpointSlice controller catches up).
        # Draining: in no frontend's slots. A backend turning draining is
        # written after the slots that named it changed (late); one that
        # stops draining, or is new, before any slot names it (early).
        put_backends: dict[int, tuple[Backend, bool]] = {}
        late: set[int] = set()
        for bid in touched:
            users = self._refs.get(bid, 0)
            if not users:
                continue
            base = records.get(bid) or self._backends[bid]
            term = self._term.get(bid, 0) == users
            rec = base if base.terminating == term else dataclasses.replace(base, terminating=term)
            drained = not self._slotrefs.get(bid, 0)
            cur = self._backends.get(bid)
            was = bid in self._drained
            if cur is None or _written(cur) != _written(rec) or was != drained:
                put_backends[bid] = (rec, drained)
                if drained and cur is not None and not was:
                    late.add(bid)

        # Leftovers from before a restart: no service entry reaches them, so
        # they go with the removals, before anything is added.
        for sid in sorted(set(self._orphan_slots) | self._orphan_maglev
                          | set(self._orphan_ranges)):
            # An interrupted grow leaves slots past the count; if this plan
            # grew the entry over them again they are live now, not orphans.
            owner = self._applied.get(self.service_ids.key_of(sid))
            live = len(owner.slots) if owner is not None else 0
            gone = sorted(p - 1 for p in self._orphan_slots.get(sid, ()) if p > live)
            for s, e in _runs(gone):
                removal_ops.append(DeleteSlots(sid, s + 1, e))
            if sid in self._orphan_maglev and not (owner is not None and owner.maglev):
                removal_ops.append(DeleteMaglev(sid))
            stray = self._orphan_ranges.get(sid, set()) - (owner.ranges if owner else set())
            if stray:
                removal_ops.append(DeleteRanges(sid, tuple(sorted(stray))))
            key = ("orphan", sid)
            if key in self.service_ids:
                self.service_ids.release(key)
                released_services.append(key)
        self._orphan_slots.clear()
        self._orphan_maglev.clear()
        self._orphan_ranges.clear()

        delete_backends = sorted(b for b in maybe_unused if not self._refs.get(b))
        # Backends a restore found unreferenced, and still unreferenced, go
        # first: no slot ever named them, and a map they fill must make room
        # for this plan's additions.
        early_backends = [b for b in delete_backends if b in self._orphan_backends]
        late_backends = [b for b in delete_backends if b not in self._orphan_backends]
        for bid in delete_backends:
            self._refs.pop(bid, None)
            self._term.pop(bid, None)
            self._slotrefs.pop(bid, None)
            self._drained.discard(bid)
            self._backends.pop(bid, None)
            self._backends6.discard(bid)
            self.backend_ids.release(self.backend_ids.key_of(bid))
        # Every orphan is now either deleted or referenced again.
        self._orphan_backends.clear()
        # Ids are released only after the plan is complete, so no id serves
        # two meanings within one plan.
        released_ids: set[int] = set()
        for fe in released_services:
            if isinstance(fe, Frontend):
                released_ids.add(self.service_ids.release(fe))
            else:
                released_ids.add(fe[1])
        self.ended_pairs = ended
        self.released_service_ids = released_ids

        # Removed frontends go before anything is added: each has its own
        # service id, so nothing else reads its entry, slots, table or ranges,
        # and a full map gets the room back before this plan needs it.
        ops: list[Op] = stale_ops + removal_ops
        ops += [DeleteBackend(bid) for bid in early_backends]
        late_ops: list[Op] = []
        for bid in sorted(put_backends):
            rec, drained = put_backends[bid]
            self._backends[bid] = rec
            if ":" in rec.ip:
                self._backends6.add(bid)
            if drained:
                self._drained.add(bid)
            else:
                self._drained.discard(bid)
            (late_ops if bid in late else ops).append(PutBackend(bid, rec, drained))
        ops += _phased(service_ops)
        ops += late_ops
        ops += [DeleteBackend(bid) for bid in late_backends]
        return ops

    def _account(self, old: Iterable[int], old_claims: frozenset[int], new: Iterable[int],
                 new_claims: frozenset[int], touched: set[int], maybe_unused: set[int],
                  old_drain: frozenset[int] = frozenset(),
                 new_drain: frozenset[int] = frozenset(),
                 old_table: Iterable[int] = (), new_table: Iterable[int] = ()) -> None:
        """Move one frontend's references (and terminating claims, and which
        of them new flows may choose) from old to new. A Maglev table only
        names the frontend's own slot backends, but a restored one may name
        others: those count as choosable until the table is rewritten."""
        if not old and not old_claims and not old_drain and not old_table:
            self._account_new(new, new_claims, touched, new_drain, new_table)
            return
        old_slots, new_slots = set(old) | set(old_table), set(new) | set(new_table)
        # Slots a restored entry lacks, or that name nothing, hold no reference.
        old_slots -= {MISSING, DANGLING}
        new_slots -= {MISSING, DANGLING}
        _recount(self._slotrefs, new_slots - old_slots, old_slots - new_slots)
        old_set, new_set = old_slots | old_drain, new_slots | new_drain
        _recount(self._refs, new_set - old_set, old_set - new_set, maybe_unused)
        _recount(self._term, new_claims - old_claims, old_claims - new_claims)
        touched |= old_set ^ new_set
        touched |= old_claims ^ new_claims
        touched |= old_slots ^ new_slots

    def _account_new(self, new: Iterable[int], new_claims: frozenset[int], touched: set[int],
                     new_drain: frozenset[int], new_table: Iterable[int]) -> None:
        """_account for a frontend that held nothing (every frontend of a
        start): each of its backends gains a reference, nothing loses one."""
        new_slots = set(new)
        if new_table:
            new_slots.update(new_table)
        new_slots.discard(MISSING)
        new_slots.discard(DANGLING)
        slotrefs, refs = self._slotrefs, self._refs
        for b in new_slots:
            slotrefs[b] = slotrefs.get(b, 0) + 1
        new_set = new_slots | new_drain if new_drain else new_slots
        for b in new_set:
            refs[b] = refs.get(b, 0) + 1
        if new_claims:
            for b in new_claims:
                self._term[b] = self._term.get(b, 0) + 1
            touched |= new_claims
        touched |= new_set

    # ----------------------------------------------------------- restart

    @classmethod
    def restore(cls, services: Mapping[Frontend, ServiceEntry],
                slots: Mapping[tuple[int, int], int],
                backends: Mapping[int, Backend], draining: Iterable[int] = (),
                maglev: Optional[Mapping[int, tuple[int, ...]]] = None,
                ranges: Optional[Mapping[int, Iterable[str]]] = None,
                named_service_ids: Iterable[int] = (),
                named_backend_ids: Iterable[int] = (), **kw) -> "Reconciler":
        """A reconciler that owns what the maps hold (read at agent start).

        services: frontend -> entry; slots: (service id, slot) -> backend id,
        every slot in the map; backends: backend id -> backend (node and zone
        need not be known); draining: the backend ids flagged draining (no
        frontend is known to list them until the next plan says so, which
        keeps them); maglev: service id -> table; ranges: service id -> its
        source prefixes. named_*: ids that conntrack and affinity entries
        still name (their quarantine starts now). Whatever is inconsistent
        (entries sharing an id, slots, tables or ranges no entry reaches,
        backends nothing names, slots naming missing backends) is repaired by
        the next plan; until then it stays as found.
        """
        r = cls(**kw)
        maglev = maglev or {}
        ranges = {sid: frozenset(v) for sid, v in (ranges or {}).items()}
        held_b: dict[Hashable, int] = {}
        for bid in sorted(backends):
            key = backends[bid].key
            # Two ids for one address can only come from an older agent's
            # bug; the lowest keeps the address, the other ages out as orphan.
            held_b[key if key not in held_b else ("orphan-backend", bid)] = bid
        r.backend_ids = IdAllocator.restore(held_b, r.backend_ids.limit,
                                            quarantine=r.backend_ids.quarantine,
                                            clock=r.backend_ids.clock, named=named_backend_ids)
        r._backends = dict(backends)
        r._backends6 = {bid for bid, b in backends.items() if ":" in b.ip}
        r._drained = set(draining) & set(backends)

        held_s: dict[Hashable, int] = {}
        taken: set[int] = set()
        reached: set[tuple[int, int]] = set()
        owned: set[int] = set()
        for fe in sorted(services, key=Frontend.sort_key):
            e = services[fe]
            if e.service_id in taken or not 0 < e.service_id <= r.service_ids.limit:
                r._stale_frontends.add(fe)
                continue
            taken.add(e.service_id)
            owned.add(e.service_id)
            held_s[fe] = e.service_id
            got = []
            for i in range(1, e.count + 1):
                reached.add((e.service_id, i))
                bid = slots.get((e.service_id, i), MISSING)
                got.append(bid if bid in backends or bid == MISSING else DANGLING)
            claims = frozenset(b for b in got if b > 0 and backends[b].terminating)
            table = tuple(maglev.get(e.service_id, ()))
            if any(b not in backends for b in table):
                table = tuple(b if b in backends else DANGLING for b in table)
            r._applied[fe] = _Applied(e, tuple(got), claims, None, frozenset(), table,
                                      ranges.get(e.service_id, frozenset()))
            r._account((), frozenset(), got, claims, set(), set(), frozenset(), frozenset(),
                       (), table)
        orphans: set[int] = set()
        for (sid, slot) in slots:
            if (sid, slot) not in reached:
                r._orphan_slots.setdefault(sid, []).append(slot)
                orphans.add(sid)
        for sid in maglev:
            if sid not in owned:
                r._orphan_maglev.add(sid)
                orphans.add(sid)
        for sid, prefixes in ranges.items():
            if sid not in owned and prefixes:
                r._orphan_ranges[sid] = set(prefixes)
                orphans.add(sid)
        for sid in sorted(orphans):
            if sid not in taken and 0 < sid <= r.service_ids.limit:
                taken.add(sid)
                held_s[("orphan", sid)] = sid
        r.service_ids = IdAllocator.restore(held_s, r.service_ids.limit,
                                            quarantine=r.service_ids.quarantine,
                                            clock=r.service_ids.clock, named=named_service_ids)
        r._orphan_backends = {b for b in backends if r._refs.get(b, 0) == 0}
        return r


# ------------------------------------------------------------ test maps

class FakeMaps:
    """The service maps as dicts, applying operations like the real ones.

    Strict where the kernel would be lenient: deleting what is not there, or
    a slot write for an id no one allocated, is a reconciler bug and raises.
    """

    def __init__(self) -> None:
        self.services: dict[Frontend, ServiceEntry] = {}
        self.slots: dict[tuple[int, int], int] = {}
        self.backends: dict[int, Backend] = {}
        self.draining: set[int] = set()
        self.maglev: dict[int, tuple[int, ...]] = {}
        self.ranges: dict[int, set[str]] = {}

    def apply(self, op: Op) -> None:
        if isinstance(op, PutBackend):
            self.backends[op.backend_id] = op.backend
            if op.draining:
                self.draining.add(op.backend_id)
            else:
                self.draining.discard(op.backend_id)
        elif isinstance(op, PutSlots):
            if op.first < 1 or any(b <= 0 for b in op.slots):
                raise ValueError(f"bad slots {op}")
            for i, b in enumerate(op.slots, start=op.first):
                self.slots[(op.service_id, i)] = b
        elif isinstance(op, PutService):
            self.services[op.frontend] = op.entry
        elif isinstance(op, DeleteService):
            del self.services[op.frontend]
        elif isinstance(op, DeleteSlots):
            if op.from_slot < 1 or op.to_slot < op.from_slot:
                raise ValueError(f"bad range {op}")
            for i in range(op.from_slot, op.to_slot + 1):
                del self.slots[(op.service_id, i)]
        elif isinstance(op, DeleteBackend):
            del self.backends[op.backend_id]
            self.draining.discard(op.backend_id)
        elif isinstance(op, PutMaglev):
            if not op.table or any(b <= 0 for b in op.table):
                raise ValueError(f"bad Maglev table for {op.service_id}")
            self.maglev[op.service_id] = op.table
        elif isinstance(op, DeleteMaglev):
            del self.maglev[op.service_id]
        elif isinstance(op, PutRanges):
            have = self.ranges.setdefault(op.service_id, set())
            if have & set(op.cidrs):
                raise ValueError(f"{op}: already there: {sorted(have & set(op.cidrs))}")
            have.update(op.cidrs)
        elif isinstance(op, DeleteRanges):
            have = self.ranges.get(op.service_id, set())
            if not set(op.cidrs) <= have:
                raise ValueError(f"{op}: not there: {sorted(set(op.cidrs) - have)}")
            have.difference_update(op.cidrs)
            if not have:
                self.ranges.pop(op.service_id, None)
        else:
            raise TypeError(f"not an operation: {op!r}")

    def apply_all(self, ops: Iterable[Op]) -> None:
        for op in ops:
            self.apply(op)

    def resolve(self, frontend: Frontend) -> Optional[tuple[Backend, ...]]:
        """The backends a packet to `frontend` may reach (() = rejected or
        dropped, None = not a service)."""
        e = self.services.get(frontend)
        if e is None:
            return None
        return tuple(self.backends[self.slots[(e.service_id, i)]]
                     for i in range(1, e.count + 1))

    def restore(self, **kw) -> Reconciler:
        return Reconciler.restore(self.services, self.slots, self.backends, self.draining,
                                  maglev=self.maglev, ranges=self.ranges, **kw)


def check_whole(maps: FakeMaps) -> list[str]:
    """Every way a packet could find a visible service entry incomplete.

    Empty when every entry's count slots exist, each names an existing
    backend of the frontend's protocol that is not draining, an entry
    without slots rejects or drops (a count of 0 without either would
    black-hole unexplained), a Maglev entry's table exists and names only
    such backends, and an entry with source ranges has at least one.
    """
    problems: list[str] = []
    for fe, e in maps.services.items():
        empty_ok = e.flags & (FLAG_REJECT | FLAG_DROP)
        if e.count == 0 and not empty_ok:
            problems.append(f"{fe}: no backends and neither reject nor drop flag")
        if e.count and empty_ok:
            problems.append(f"{fe}: reject or drop flag with {e.count} backends")
        for i in range(1, e.count + 1):
            bid = maps.slots.get((e.service_id, i))
            if bid is None:
                problems.append(f"{fe}: slot {i} of service {e.service_id} missing")
                continue
            b = maps.backends.get(bid)
            if b is None:
                problems.append(f"{fe}: slot {i} names missing backend {bid}")
            elif bid in maps.draining:
                problems.append(f"{fe}: slot {i} names draining backend {bid}")
            elif b.protocol != fe.protocol:
                problems.append(f"{fe}: slot {i} names {b.protocol} backend {bid}")
        if e.flags & FLAG_MAGLEV:
            table = maps.maglev.get(e.service_id)
            if not table:
                problems.append(f"{fe}: Maglev flag without a table")
            else:
                bad = {b for b in table if b not in maps.backends or b in maps.draining
                       or maps.backends[b].protocol != fe.protocol}
                if bad:
                    problems.append(f"{fe}: Maglev table names missing backends {sorted(bad)}")
        if e.flags & FLAG_SRC_RANGE and not maps.ranges.get(e.service_id):
            problems.append(f"{fe}: source-range flag without a range (would drop everyone)")
    return problems


def _phased(service_ops: list[Op]) -> list[Op]:
    """The frontends' writes in phases: every slot write, Maglev table and
    source-range addition, then every service entry, then every removal of
    slots, source ranges and tables the entries no longer use (each phase in
    plan order).

    Each frontend has its own service id, so the only order that matters is
    within one frontend (what an entry counts before the entry, the entry
    before removing what it no longer counts), and the phases keep it. Runs
    of one kind of write are what the applier turns into batched map
    updates: a start-up plan of 10,000 Services becomes a handful of writes."""
    order = (PutSlots, PutMaglev, PutRanges, PutService, DeleteSlots, DeleteRanges, DeleteMaglev)
    phases: dict[type, list[Op]] = {t: [] for t in order}
    for op in service_ops:
        bucket = phases.get(type(op))
        if bucket is None:
            return service_ops      # an op this ordering does not know: keep the plan's
        bucket.append(op)
    return [op for t in order for op in phases[t]]
