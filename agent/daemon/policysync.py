"""Keep the datapath's NetworkPolicy maps equal to what the cluster state says.

Cluster state (agent/k8s store, plus what CNI ADD told us about pods the
store does not hold with their address yet) -> agent.policy.compile_policy
(Kubernetes semantics, identities kept stable with `previous=`) ->
agent.policy.fit (a state that would overflow a map refuses only the
(policy, pod) pairs that do not fit, failing closed) -> agent.policy.diff
(writes ordered so that no packet is ever allowed or denied beyond what the
old or the new state says) -> the pinned maps (agent/datapath/policymaps.py).

Start and restart: the first plan waits for the source's initial sync, and
diffs against what the pinned maps hold, so a restarted agent rewrites only
what changed while it was away and never opens or closes a hole on the way.
The maps hold numeric identities and policy ids only, so their names are
kept in the state directory (`ids_file`) and given back to the compiler:
a restarted agent then numbers everything as before.
The datapath's policy switch (FP_CFG_F_POLICY) is turned on only once the
maps hold a complete state; with enforcement `never` it is turned off first
and the maps are emptied after.

New pods (`admit`, called by CNI ADD before it returns): the pod's address
comes from the ADD, its labels from the store, or from the Pod the agent
fetched for it (agent.agent: one GET, or a rescan of the manifests), and a
plan is made at once, so the pod's policy entries are in the maps when its
containers start. A pod whose labels could not be had starts in the safe
state of agent/policy/pending.py and converges when its Pod arrives.

Refusals (capacity): what was refused is named in the log (when it
changes), in `status.refused`, in the metrics and as a Kubernetes Event on
the NetworkPolicy (`events`); each plan starts again from nothing refused,
and a plan that wrote something while refusing is followed by another, so
room freed by a change is used.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from agent.daemon.worker import Worker, planning, settle_gc
from agent.k8s.model import Kind, Pod
from agent.k8s.store import Snapshot
from agent.model.endpoint import is_endpoint_key
from agent.policy import addr
from agent.policy import (
    Capacities, Mode, PolicyState, compile_policy, diff, fit, pairs_of,
)
from agent.policy.diff import EndpointPut, RulePut
from agent.policy.pending import DENY_INGRESS, is_pending, pending_endpoint, with_pending

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
    # NetworkPolicies whose rules are left out somewhere for lack of map
    # room: {"policy", "pods", "endpoints", "maps", "reason"} each
    refused: list[dict] = field(default_factory=list)
    refused_total: int = 0             # plans that refused something
    overflow: list[dict] = field(default_factory=list)   # what the unrefused state needed
    pending: list[str] = field(default_factory=list)     # pods in the safe state (ns/name)
    error: str = ""

    def as_dict(self) -> dict:
        return json.loads(json.dumps(self.__dict__))


@dataclass(frozen=True)
class Hint:
    """What CNI ADD said about a pod on this node, until the store agrees."""

    namespace: str
    name: str
    fetched: Optional[Pod] = None      # the Pod the agent fetched for it, if the store lacks it


class PolicySync(Worker):
    def __init__(self, maps, settings, store, source, node_name: str, mode: str,
                 capacities: Capacities, node_ips: Callable[[], list[str]], *,
                 ids_file: Optional[str] = None, settle: float = 0.02, metrics=None,
                 events=None, unknown_pod: str = DENY_INGRESS):
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
        self.events = events              # agent.k8s.events recorder, or None
        self.unknown_pod = unknown_pod
        self.state: Optional[PolicyState] = None
        # the last compiled state when the maps hold something else (only
        # isolate_only's writes went in): ids for the next compile
        self._base: Optional[PolicyState] = None
        self._applied_policies = None     # the NetworkPolicies of the last state written
        # each NetworkPolicy's (object, audit flag) by key, as last read
        self._audit_seen: dict = {}
        self._audited: set[str] = set()
        # key -> the NetworkPolicy object the last state written was made
        # from (None if it had none), for the keys whose object changed since
        self._since_applied: dict = {}
        self.ids_file = Path(ids_file) if ids_file else None
        self._saved_ids: Optional[dict] = None
        self.hints: dict[str, Hint] = {}  # pod IPv4 -> what CNI ADD said
        # pod IPv4 -> (the Pod it was made from, the Pod at the ADD's address):
        # the same object plan after plan, so the compiler sees no change
        self._placed: dict[str, tuple[Pod, Pod]] = {}
        self.status = PolicyStatus(self.mode.value)
        self.lock = threading.Lock()      # one plan at a time; readers take it too
        self.planned = threading.Event()  # a plan has written a state (or tried to)
        self._applied = threading.Condition()   # notified after every plan (wait_applied)
        self._again = threading.Event()   # plan again without a store change
        self._node_ips_seen: Optional[list[str]] = None
        self._refused_named: dict[str, tuple[str, ...]] = {}
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

    # ------------------------------------------------------------- new pods
    def admit(self, ip: str, namespace: str, name: str, fetched: Optional[Pod] = None,
              wait: float = 0.0) -> str:
        """CNI ADD of pod `namespace/name` at `ip`: make its policy entries
        part of the maps before returning. `fetched`: its Pod when the store
        does not hold it; None with no Pod in the store means its labels are
        unknown (the safe state). `wait`: seconds the ADD may still wait for
        the first plan after a start. Returns how the pod is enforced:
        "compiled", "pending" (safe state) or "open"."""
        if self.mode == Mode.NEVER:
            return "open"
        if not namespace or not name:
            # not a Kubernetes pod (no K8S_POD_* in the ADD): no policy
            # selects it, unless the store knows a pod at that address
            with self.lock:
                known = self.state is not None and ip in self.state.endpoints
            return "compiled" if known else "open"
        with self.lock:
            self.hints[ip] = Hint(namespace, name, fetched)
        if not self.planned.is_set():
            self.planned.wait(wait)
        with self.lock:
            if self.state is None and not self.planned.is_set():
                # no state to plan from yet (the source has not synced):
                # the pinned maps are what is enforced; add the safe state
                self._write_pending(ip, namespace, name)
            else:
                ep = self.state.endpoints.get(ip) if self.state is not None else None
                if ep is None or (ep.namespace, ep.name) != (namespace, name) or is_pending(ep):
                    # on the ADD's clock: the node's addresses of the last
                    # plan, and the ids file left to the plan that follows
                    self._plan(node_ips=self._node_ips_seen, persist=False)
                    self._again.set()
            ep = self.state.endpoints.get(ip) if self.state is not None else None
        if ep is None:
            # before any plan the safe state went straight to the maps
            return "pending" if self.state is None and self.unknown_pod == DENY_INGRESS \
                else "open"
        return "pending" if is_pending(ep) else "compiled"

    def wait_applied(self, after: int, timeout: float) -> bool:
        """Block until the maps reflect a store version past `after`, for
        at most `timeout` seconds; whether they do."""
        with self._applied:
            return self._applied.wait_for(lambda: self.status.applied_version > after, timeout)

    def remember(self, ip: str, namespace: str, name: str) -> None:
        """A restored endpoint: what its ADD said counts again (a pod whose
        Pod has no address yet, or none at all, keeps its state)."""
        if self.mode != Mode.NEVER and namespace and name:
            with self.lock:
                self.hints.setdefault(ip, Hint(namespace, name))

    def forget(self, ip: str) -> None:
        """CNI DEL: the pod's word no longer counts; the next plan drops
        what only it kept (e.g. a safe state)."""
        with self.lock:
            if self.hints.pop(ip, None) is not None:
                self._again.set()

    def _write_pending(self, ip: str, namespace: str, name: str) -> None:
        if self.unknown_pod != DENY_INGRESS:
            return
        host_ids = self.maps.identities_of(addr.host_text(a) for a in self.node_ips()).values()
        ep = pending_endpoint(ip, namespace, name, self.mode, sorted(set(host_ids)))
        for k, v in ep.rules.items():
            self.maps.apply(RulePut(ip, k, v))
        self.maps.apply(EndpointPut(ip, ep.config))
        log.warning("policy: %s/%s (%s) added before the first policy plan: only the node "
                    "reaches it until then", namespace, name, ip)

    def _overlay(self, snap: Snapshot) -> tuple[Snapshot, dict[str, tuple[str, str]]]:
        """The snapshot as the compiler should see this node's pods: a pod
        CNI ADD placed here at an address the store does not give it yet
        gets that address; pods with no labels known are pending."""
        pods = None
        pending: dict[str, tuple[str, str]] = {}
        done = []
        for ip, h in self.hints.items():
            cur = snap.pods.get((h.namespace, h.name))
            key = is_endpoint_key(ip)
            if (cur is not None and not key and ip in cur.ips
                    and cur.node_name == self.node_name):
                done.append(ip)          # the store agrees: nothing left to say
                continue
            if cur is None:
                cur = h.fetched
            if cur is None:
                pending[ip] = (h.namespace, h.name)
                continue
            if pods is None:
                pods = dict(snap.pods)
            made = self._placed.get(ip)
            if made is None or made[0] is not cur:
                # the ADD is the word on who holds the address here now: it
                # outranks a Pod object still claiming it (phase Running,
                # as the pod is about to be)
                # (an IPv6-only pod's endpoint key stands for its IPv4
                # address, which the store never gives it: placed for as long
                # as the endpoint lives, its IPv6 addresses kept beside it)
                ips = (ip, *(a for a in cur.ips if ":" in a)) if key else (ip,)
                made = self._placed[ip] = (cur, replace(
                    cur, ips=ips, node_name=self.node_name,
                    phase="Running" if cur.phase in ("", "Pending") else cur.phase))
            pods[cur.key] = made[1]
            was = self.state.endpoints.get(ip) if self.state is not None else None
            if was is not None and (was.namespace, was.name) != cur.key:
                stale = pods.get((was.namespace, was.name))
                if stale is not None and ip in stale.ips:
                    pods[stale.key] = replace(stale, ips=tuple(a for a in stale.ips if a != ip))
        for ip in done:
            del self.hints[ip]
        for ip in [ip for ip in self._placed if ip not in self.hints]:
            del self._placed[ip]
        if pods is None:
            return snap, pending
        maps = {k: snap.of(k) for k in Kind}
        maps[Kind.POD] = types.MappingProxyType(pods)
        return Snapshot(snap.version, types.MappingProxyType(maps)), pending

    # -------------------------------------------------------------- planning
    def sync_once(self) -> int:
        """Compile the current snapshot and bring the maps to it."""
        with self.lock:
            return self._plan()

    def _plan(self, node_ips: Optional[list[str]] = None, persist: bool = True) -> int:
        with planning():
            return self._plan_now(node_ips, persist)

    def _plan_now(self, node_ips: Optional[list[str]], persist: bool) -> int:
        t0 = time.monotonic()
        store_snap = self.store.snapshot()
        snap, pending = self._overlay(store_snap)
        if node_ips is None:
            node_ips = self._node_ips_seen = self.node_ips()
        audited, changed = self._policy_changes(snap)
        previous = self.state if self.state is not None else (
            self._base if self._base is not None else self._restored_ids(snap))
        old = self.state if self.state is not None else self.maps.image()

        def compile_with(refused):
            st = compile_policy(snap, self.node_name, node_ips, self.mode, audited,
                                previous=previous, refused=refused)
            return with_pending(st, pending, self.unknown_pod)

        was = self.state
        applied = (lambda: pairs_of(was) - was.refused) if was is not None else ()
        plan = fit(compile_with, self.capacities, old, changed=changed, applied=applied)
        st = self.status
        self.maps.apply_all(plan.ops)
        if plan.ops or plan.state is not None:
            # on only once the maps hold a complete state, or at least the
            # isolation of a state that does not fit (idempotent)
            self.settings.set_policy(True)
        if plan.state is not None:
            self.state, self._base = plan.state, None
            self._applied_policies = snap.network_policies
            self._since_applied.clear()
        else:
            # isolate_only (or nothing) went in: the maps are neither the
            # old state nor the new one; diff from what they hold next time
            self.state, self._base = None, compile_with(frozenset())
        if persist:
            # (a restart that finds an id the file does not name yet only
            # rewrites those entries: its first plan diffs from the maps)
            self._save_ids(self.state if self.state is not None else self._base)
        settle_gc(st.plans + 1)
        self._report(plan, snap)
        ref = self.state if self.state is not None else self._base
        st.applied_version = store_snap.version
        st.policies = len(snap.network_policies)
        st.endpoints = len(ref.endpoints)
        st.rules = ref.rule_count()
        st.ipcache = len(ref.ipcache)
        st.pending = sorted(f"{ep.namespace}/{ep.name}" for ep in ref.endpoints.values()
                            if is_pending(ep))
        st.plans += 1
        st.last_ops = len(plan.ops)
        st.last_seconds = time.monotonic() - t0
        self.planned.set()
        with self._applied:
            self._applied.notify_all()
        if plan.refused and plan.ops:
            self._again.set()        # room this plan freed may fit more next time
        self._observe(st.last_seconds, len(plan.ops), plan.state is not None)
        if plan.ops:
            log.info("policy: %d map writes in %.1f ms (store v%d, %d rules for %d pods)",
                     len(plan.ops), st.last_seconds * 1e3, store_snap.version, st.rules,
                     st.endpoints)
        return len(plan.ops)

    def _policy_changes(self, snap) -> tuple[frozenset[str], frozenset[str]]:
        """The audited NetworkPolicies, and those added or edited since the
        last state written. One pass that only compares objects: a policy
        is looked into only when it is not the object it was last time."""
        pols = snap.network_policies
        seen, since = self._audit_seen, self._since_applied
        audited = self._audited
        for k, p in pols.items():
            hit = seen.get(k)
            if hit is not None and hit[0] is p:
                continue
            if k not in since:
                # the object the last state written was made from (None: added since)
                since[k] = hit[0] if hit is not None else None
            seen[k] = (p, p.audited)
            name = f"{k[0]}/{k[1]}"
            if p.audited:
                audited.add(name)
            else:
                audited.discard(name)
        if len(seen) != len(pols):
            for k in [k for k in seen if k not in pols]:
                del seen[k]
                audited.discard(f"{k[0]}/{k[1]}")
                since.setdefault(k, None)
        if self._applied_policies is None:
            changed = frozenset()
        else:
            changed = frozenset(f"{k[0]}/{k[1]}" for k, o in since.items()
                                if (p := pols.get(k)) is not None and p is not o and p != o)
        return frozenset(audited), changed

    def _report(self, plan, snap) -> None:
        """Name what this plan refused: status always; log, metric and
        event when it changes."""
        st = self.status
        pods = {ip: f"{ep.namespace}/{ep.name}"
                for ip, ep in (plan.state or self._base).endpoints.items()}
        maps = sorted({o.map for o in plan.overflows})
        need = ", ".join(f"{o.map} map: {o.needed} entries needed, capacity {o.capacity}"
                         for o in plan.overflows)
        refused = plan.refused_policies()
        rows = []
        if plan.state is not None:
            how = "isolated by it without its rules"
        elif plan.ops:
            how = "isolated without any new rule: nothing of the new state fits"
        else:
            how = ("not isolated by it: nothing was written (the endpoints map cannot hold "
                   "every pod), the previous state stays")
        for name, ips in refused.items():
            names = [pods.get(ip, ip) for ip in ips]
            rows.append({"policy": name, "pods": names, "endpoints": ips, "maps": maps,
                         "reason": f"{need}; {len(names)} pod(s) {how}"})
        st.refused = rows
        st.overflow = [dict(map=o.map, needed=o.needed, capacity=o.capacity, reason=o.reason)
                       for o in plan.overflows]
        if rows:
            st.refused_total += 1
        now = {r["policy"]: tuple(r["pods"]) for r in rows}
        if now == self._refused_named:
            return
        for name, pods_now in now.items():
            if self._refused_named.get(name) == pods_now:
                continue
            msg = (f"rules of NetworkPolicy {name} are not written for "
                   f"{', '.join(pods_now)} on node {self.node_name}: {need}. Those pods stay "
                   f"isolated by it and admit nothing it allows until there is room")
            log.error("policy: %s", msg)
            self._event(name, "Warning", "PolicyRefused", msg)
        for name in self._refused_named.keys() - now.keys():
            still = tuple(name.split("/", 1)) in snap.network_policies
            msg = (f"rules of NetworkPolicy {name} are written in full on node "
                   f"{self.node_name} again")
            if still:
                log.info("policy: %s", msg)
                self._event(name, "Normal", "PolicyApplied", msg)
        self._refused_named = now

    def _event(self, policy: str, type_: str, reason: str, message: str) -> None:
        if self.events is None:
            return
        ns, _, name = policy.partition("/")
        try:
            self.events.record("NetworkPolicy", ns, name, type_, reason, message)
        except Exception as exc:      # events are best effort, the plan is not
            log.warning("policy: event for %s not recorded: %s", policy, exc)

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
                     lambda _changes: self._guarded(), wake=self._again, leading=True)

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
                "egress": d(ep.egress), "rules": rules,
                "refused": sorted(n for n, a in state.refused if a == ip),
                "pending": is_pending(ep)}
