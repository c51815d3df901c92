"""An in-memory stand-in for agent.datapath.maps.LbMaps, with the kernel's
failure modes: a map of bounded size refuses a new key when full (E2BIG, as
a BPF hash map does), and a write can be made to fail on purpose (EIO)."""
from __future__ import annotations

import errno

from agent.lb.compile import Frontend
from agent.lb.reconcile import ServiceEntry


class FakeCt:
    """The conntrack maps object's face the service sync's purger uses."""

    NAT_TABLES = {"established": "FP_MAP_CT", "new": "FP_MAP_CT_NEW"}

    def __init__(self):
        self.purged: list[set] = []

    def nat_entries(self, table):
        return []

    def delete(self, table, keys):
        return 0


class FakeLb:
    def __init__(self, sizes: dict | None = None):
        self.sizes = {"services": 1 << 20, "slots": 1 << 20, "backends": 1 << 20,
                      "maglev": 1 << 20, "ranges": 1 << 20, **(sizes or {})}
        self.svc: dict[Frontend, ServiceEntry] = {}
        self.slot: dict[tuple[int, int], int] = {}
        self.be: dict[int, tuple[str, int, str]] = {}
        self.maglev: dict[int, tuple[int, ...]] = {}
        self.rng: dict[tuple[int, str], int] = {}
        self.svcnet: dict[str, int] = {}
        self.affinity: dict[tuple[int, str], int] = {}    # (svc id, client) -> backend id
        self.ct_named: set[int] = set()
        self.writes = 0
        self.fail_at: int | None = None    # fail the write with this number (1-based)
        self.fail_error = errno.EIO
        self.purged_backends: list[set] = []
        self.draining: set[int] = set()
        self.ct = FakeCt()

    # -- failure injection ------------------------------------------------
    def _write(self, table: dict, key, value, size_key: str) -> None:
        self.writes += 1
        if self.fail_at is not None and self.writes == self.fail_at:
            raise OSError(self.fail_error, f"injected failure of write {self.writes}")
        if key not in table and len(table) >= self.sizes[size_key]:
            raise OSError(errno.E2BIG, f"{size_key} map full ({self.sizes[size_key]} entries)")
        table[key] = value

    # -- writers (LbMaps' interface) --------------------------------------
    def put_backend(self, bid, ip, port, proto, draining=False):
        self._write(self.be, bid, (ip, port, proto), "backends")
        (self.draining.add if draining else self.draining.discard)(bid)

    def put_backends(self, rows):
        for bid, ip, port, proto, *draining in rows:
            self.put_backend(bid, ip, port, proto, bool(draining and draining[0]))

    def delete_backend(self, bid):
        self.be.pop(bid, None)
        self.draining.discard(bid)

    def draining_backends(self):
        return set(self.draining)

    def put_slots(self, sid, ids, first=1):
        for i, b in enumerate(ids, start=first):
            self._write(self.slot, (sid, i), b, "slots")

    def put_slot_runs(self, runs):
        for sid, ids, first in runs:
            self.put_slots(sid, ids, first)

    def delete_slots(self, sid, a, b):
        for i in range(a, b + 1):
            self.slot.pop((sid, i), None)

    def put_service(self, vip, port, proto, sid, count, flags=0, aff=0, scope=0):
        self._write(self.svc, Frontend(vip, port, proto, scope),
                    ServiceEntry(sid, count, aff, flags), "services")

    def put_services(self, rows):
        for vip, port, proto, sid, count, flags, aff, scope in rows:
            self.put_service(vip, port, proto, sid, count, flags, aff, scope)

    def delete_service(self, vip, port, proto, scope=0):
        self.svc.pop(Frontend(vip, port, proto, scope), None)

    def put_maglev(self, sid, table):
        self._write(self.maglev, sid, tuple(table), "maglev")

    def delete_maglev(self, sid):
        self.maglev.pop(sid, None)

    def put_ranges(self, sid, cidrs):
        for c in cidrs:
            self._write(self.rng, (sid, c), 1, "ranges")

    def delete_ranges(self, sid, cidrs):
        for c in cidrs:
            self.rng.pop((sid, c), None)

    def svcnet_set(self, want):
        self.svcnet = dict(want)

    def svcnet_put(self, prefix, flags):
        self.svcnet[prefix] = flags

    def svcnet_delete(self, prefix):
        self.svcnet.pop(prefix, None)

    def conntrack_delete_backend(self, bid):
        return self.conntrack_delete_backends({bid})

    def conntrack_delete_backends(self, ids):
        self.purged_backends.append(set(ids))
        return 0

    def affinity_purge(self, sids, bids, pairs):
        gone = [k for k, b in self.affinity.items()
                if k[0] in sids or b in bids or (k[0], b) in pairs]
        for k in gone:
            del self.affinity[k]
        return len(gone)

    def sockrev_get(self, cookie, addr, port):
        return None

    # -- readers ----------------------------------------------------------
    def services(self):
        return [{"vip": fe.ip, "port": fe.port, "proto": fe.protocol, "scope": fe.scope,
                 "svc_id": e.service_id, "count": e.count, "flags": e.flags,
                 "affinity_timeout": e.affinity_timeout} for fe, e in self.svc.items()]

    def backends(self):
        return dict(self.be)

    def all_slots(self):
        return dict(self.slot)

    def maglev_tables(self):
        return dict(self.maglev)

    def ranges(self):
        out: dict[int, set] = {}
        for sid, c in self.rng:
            out.setdefault(sid, set()).add(c)
        return out

    def named_ids(self):
        return ({k[0] for k in self.affinity},
                set(self.affinity.values()) | self.ct_named)

    # -- what a packet would find ------------------------------------------
    def resolve(self, fe: Frontend):
        e = self.svc.get(fe)
        if e is None:
            return None
        return sorted(self.be[self.slot[(e.service_id, i)]] for i in range(1, e.count + 1))
