"""Service map capacity: refuse a Service before it overflows a map (pure).

A full BPF map fails an update in the middle of a plan. The service sync
recovers from that (agent.daemon.services restores from the maps and
retries), but a map that is simply too small would fail every retry, and
whichever Service happened to be written last would be the one missing.
So the sync asks first: every change of a plan, grouped by the Service
(or pod, for hostPorts) it belongs to, must fit on top of what the maps
hold. Groups are admitted in a fixed order (Services already in the maps
first, then new ones, each in namespace/name order); a group that would
overflow a map is refused as a whole, by name, and the maps keep what they
had for it (nothing for a new Service, its previous state for a changed
one). Nothing another Service has is ever taken away to make room.

The count is of the plan's peak: a plan removes the frontends that go
before it adds anything (their entries, slots, tables and ranges are room
for the additions), but deletes backends only after every addition, so a
backend removal frees nothing until the next plan.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from agent.k8s.model import Key
from agent.lb.compile import KIND_HOST_PORT, Frontend, FrontendState
from agent.lb.reconcile import Reconciler

__all__ = ["Capacities", "Refusal", "MAPS", "admit"]

# services6/backends6: the IPv6 twins, sized like the IPv4 maps but full
# on their own; slots, Maglev tables and source ranges are shared.
MAPS = ("services", "slots", "backends", "maglev", "ranges", "services6", "backends6")


@dataclass(frozen=True, slots=True)
class Capacities:
    """max_entries of each service map (the IPv6 twins default to their
    IPv4 map's size, as the programs build them)."""

    services: int
    slots: int
    backends: int
    maglev: int
    ranges: int
    services6: Optional[int] = None
    backends6: Optional[int] = None

    def of(self, m: str) -> int:
        v = getattr(self, m)
        if v is None:           # services6 / backends6 unset
            v = getattr(self, m[:-1])
        return v


@dataclass(frozen=True, slots=True)
class Refusal:
    owner: Key
    kind: str                     # "Service" or "hostPort" (of a pod)
    map: str                      # one of MAPS
    needed: int                   # entries the map would need with this owner
    capacity: int

    def __str__(self) -> str:
        what = "Service" if self.kind == "Service" else "hostPorts of pod"
        return (f"{what} {self.owner[0]}/{self.owner[1]} refused: the {self.map} map would "
                f"need {self.needed} entries (capacity {self.capacity})")


def _services_map(fe: Frontend) -> str:
    return "services6" if ":" in fe.ip else "services"


def _owner(fe: Frontend, st: Optional[FrontendState], rec: Reconciler) -> Optional[tuple]:
    s = st if st is not None else rec.state(fe)
    if s is None:
        return None
    return ("hostPort" if s.kind == KIND_HOST_PORT else "Service", s.service)


def admit(rec: Reconciler, updates: Mapping[Frontend, Optional[FrontendState]],
          caps: Capacities) -> tuple[dict[Frontend, Optional[FrontendState]], list[Refusal]]:
    """The part of `updates` that fits, and the owners refused.

    Removals always pass (they need no room). Each owner's additions are
    counted against what `rec` says the maps hold plus everything admitted
    before it in this call."""
    used = rec.usage()
    cap = {m: caps.of(m) for m in MAPS}
    # A plan removes frontends before it adds any (agent.lb.reconcile):
    # their entries, slots, tables and ranges are room for the additions.
    for fe, st in updates.items():
        if st is None:
            for m, n in rec.freed_first(fe).items():
                used[m] -= n
    held = rec.backend_ids
    groups: dict[tuple, dict[Frontend, FrontendState]] = {}
    out: dict[Frontend, Optional[FrontendState]] = {}
    for fe, st in updates.items():
        if st is None:
            out[fe] = None
            continue
        groups.setdefault(_owner(fe, st, rec), {})[fe] = st
    present = set(rec.frontends())
    # An owner is "in the maps" if any of its frontends is (after a restore
    # the reconciler knows entries, not which Service wrote them).
    existing = {o for o, fes in groups.items() if any(fe in present for fe in fes)}

    new_backends: set[tuple] = set()
    refused: list[Refusal] = []
    for owner in sorted(groups, key=lambda o: (o not in existing, o[1], o[0])):
        need = dict.fromkeys(MAPS, 0)
        backends: set[tuple] = set()
        for fe, st in groups[owner].items():
            live = () if st.reject or st.drop else st.backends[:rec.max_slots]
            old_slots = len(rec.slots(fe))
            if fe not in present:
                need[_services_map(fe)] += 1
            need["slots"] += max(0, len(live) - old_slots)
            for b in live:
                if b.key not in held and b.key not in new_backends:
                    backends.add(b.key)
            if st.maglev and live and not rec.maglev_table(fe):
                need["maglev"] += 1
            old = rec.state(fe)
            old_ranges = set(old.source_ranges) if old is not None else set()
            need["ranges"] += len(set(st.source_ranges) - old_ranges)
        need["backends6"] = sum(1 for k in backends if ":" in k[0])
        need["backends"] = len(backends) - need["backends6"]
        over = next((m for m in MAPS if need[m] and used[m] + need[m] > cap[m]), None)
        if over is not None:
            refused.append(Refusal(owner[1], owner[0], over, used[over] + need[over], cap[over]))
            continue
        for m in MAPS:
            used[m] += need[m]
        new_backends |= backends
        out.update(groups[owner])
    return out, refused
