"""Keep the datapath's NetworkPolicy maps equal to what the cluster state says.

Cluster state (agent/k8s store) -> agent.policy.compile_policy (Kubernetes
semantics, identities kept stable with `previous=`) -> check_capacity (a
state that would overflow a map is refused whole; the old one stays
enforced) -> agent.policy.diff (writes ordered so that no packet is ever
allowed or denied beyond what the old or the new state says) -> the pinned
maps (agent/datapath/policymaps.py).

Start and restart: the first plan waits for the source's initial sync, and
diffs against what the pinned maps hold, so a restarted agent rewrites only
what changed while it was away and never opens or closes a hole on the way.
The maps hold numeric identities and policy ids only, so their names are
kept in the state directory (`ids_file`) and given back to the compiler:
a restarted agent then numbers everything as before.
The datapath's policy switch (FP_CFG_F_POLICY) is turned on only once the
maps hold a complete state; with enforcement `never` it is turned off first
and the maps are emptied after.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from agent.daemon.worker import Worker, settle_gc
from agent.policy import (
    Capacities, Mode, PolicyState, check_capacity, compile_policy, diff,
)

log = logging.getLogger("fastpath.policy")


@dataclass
class PolicyStatus:
    mode: str
    applied_version: int = -1          # store version the maps reflect
    policies: int = 0
    endpoints: int = 0
    rules: int = 0
    ipcache: int = 0
    plans: int = 0
    last_ops: int = 0
    last_seconds: float = 0.0
    errors: int = 0
    refused: list[dict] = field(default_factory=list)   # overflows of the last refused plan
    refused_total: int = 0
    error: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def audited_policies(snapshot) -> frozenset[str]:
    return frozenset(f"{p.namespace}/{p.name}" for p in snapshot.network_policies.values()
                     if p.audited)


class PolicySync(Worker):
    def __init__(self, maps, settings, store, source, node_name: str, mode: str,
                 capacities: Capacities, node_ips: Callable[[], list[str]], *,
                 ids_file: Optional[str] = None, settle: float = 0.02, metrics=None):
        self.maps = maps                  # agent.datapath.policymaps.PolicyMaps
        self.settings = settings          # agent.datapath.maps.ConfigMap
        self.store = store
        self.source = source
        self.node_name = node_name
        self.mode = Mode(mode)
        self.capacities = capacities
        self.node_ips = node_ips
        self.settle = settle
        self.metrics = metrics
        self.state: Optional[PolicyState] = None
        self.ids_file = Path(ids_file) if ids_file else None
        self._saved_ids: Optional[dict] = None
        self.status = PolicyStatus(self.mode.value)
        self.lock = threading.Lock()      # one plan at a time; readers take it too
        Worker.__init__(self, "policy-sync")

    # ----------------------------------------------------------- lifecycle
    def start(self) -> "PolicySync":
        if self.mode == Mode.NEVER:
            self.disable()
            return self
        self._thread.start()
        return self

    def disable(self) -> None:
        """Enforcement `never`: switch the checks off, then empty the maps."""
        self.settings.set_policy(False)
        removed = self.maps.clear()
        if removed:
            log.info("policy: enforcement off, %d stale policy map entries removed", removed)

    # -------------------------------------------------------------- planning
    def sync_once(self) -> int:
        """Compile the current snapshot and bring the maps to it."""
        with self.lock:
            t0 = time.monotonic()
            snap = self.store.snapshot()
            new = compile_policy(snap, self.node_name, self.node_ips(), self.mode,
                                 audited_policies(snap),
                                 previous=self.state if self.state is not None
                                 else self._restored_ids(snap))
            old = self.state if self.state is not None else self.maps.image()
            ops = diff(old, new)
            overflows = check_capacity(new, self.capacities, old, ops)
            st = self.status
            if overflows:
                st.refused = [dict(map=o.map, needed=o.needed, capacity=o.capacity,
                                   policy=o.policy, reason=o.reason) for o in overflows]
                st.refused_total += 1
                for o in overflows:
                    log.error("policy: refused the new state, the old one stays enforced: %s",
                              o.reason)
                self._observe(time.monotonic() - t0, 0, False)
                return 0
            for op in ops:
                self.maps.apply(op)
            # On only once the maps hold a complete state (idempotent).
            self.settings.set_policy(True)
            self.state = new
            self._save_ids(new)
            settle_gc(st.plans + 1)
            st.refused = []
            st.applied_version = snap.version
            st.policies = len(snap.network_policies)
            st.endpoints = len(new.endpoints)
            st.rules = new.rule_count()
            st.ipcache = len(new.ipcache)
            st.plans += 1
            st.last_ops = len(ops)
            st.last_seconds = time.monotonic() - t0
        self._observe(st.last_seconds, len(ops), True)
        if ops:
            log.info("policy: %d map writes in %.1f ms (store v%d, %d rules for %d pods)",
                     len(ops), st.last_seconds * 1e3, snap.version, st.rules, st.endpoints)
        return len(ops)

    def _save_ids(self, state: PolicyState) -> None:
        if self.ids_file is None:
            return
        ids = {"policies": {str(k): v for k, v in state.policies.items()},
               "identities": dict(state.identities)}
        if ids == self._saved_ids:
            return
        tmp = self.ids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ids))
        os.replace(tmp, self.ids_file)
        self._saved_ids = ids

    def _restored_ids(self, snap) -> Optional[PolicyState]:
        """The names behind the ids in the pinned maps, as a state that
        holds nothing but those tables (only ids are taken from `previous`)."""
        if self.ids_file is None or not self.ids_file.exists():
            return None
        try:
            ids = json.loads(self.ids_file.read_text())
            policies = {int(k): v for k, v in ids["policies"].items()}
            identities = {k: int(v) for k, v in ids["identities"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("policy: %s unreadable (%s); ids are allocated afresh", self.ids_file, exc)
            return None
        return PolicyState(self.mode, self.node_name, (), identities, {}, {}, {}, {}, policies)

    def _run(self) -> None:
        # every plan compiles the whole snapshot (incrementally from the
        # last state): which change sets arrived does not matter
        self._follow(self.source, self.store, self.settle, self._guarded,
                     lambda _changes: self._guarded())

    def _observe(self, seconds: float, ops: int, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_sync("NetworkPolicy", seconds, ops, ok)

    def _guarded(self) -> None:
        t0 = time.monotonic()
        try:
            self.sync_once()
        except Exception as exc:      # one bad plan must not stop the loop
            self._observe(time.monotonic() - t0, 0, False)
            self.status.errors += 1
            self.status.error = f"{type(exc).__name__}: {exc}"
            log.exception("policy sync failed; keeping the maps as they are")

    # ----------------------------------------------------------------- views
    def describe_endpoint(self, ip: str) -> Optional[dict]:
        """The effective rules of one pod, each traced to its policies."""
        with self.lock:
            state = self.state
        if state is None:
            return None
        ep = state.endpoints.get(ip)
        if ep is None:
            return None
        flows = self.maps.rule_flows()
        rules = []
        for k, v in sorted(ep.rules.items(), key=lambda kv: (kv[0].direction, kv[0].identity,
                                                             kv[0].protocol, kv[0].port)):
            rules.append({"direction": k.direction.label, "peer_identity": k.identity,
                          "peer": "any" if k.identity == 0 else state.identity_name(k.identity),
                          "match": k.describe().split(" ", 2)[-1],
                          "policies": [state.policy_name(p) for p in v.policies],
                          "audit": v.audit, "flows": flows.get((ip, k), 0)})
        def d(dp):
            return {"enforced": dp.enforced, "audit": dp.audit,
                    "deciding": [state.policy_name(p) for p in dp.deciding]}
        return {"ip": ip, "pod": f"{ep.namespace}/{ep.name}", "ingress": d(ep.ingress),
                "egress": d(ep.egress), "rules": rules}
