"""PolicySync without a kernel: the agent's plan loop over in-memory maps that
refuse to overflow, a real store, and a source that says it is synced.

Capacity: a change that does not fit refuses only what does not fit (by
name, in status, log and event), never writes past a map's capacity, keeps
every selected pod isolated, and lets refused rules in once there is room.
New pods (admit, as CNI ADD calls it): the address comes from the ADD, the
labels from the store, a fetched Pod, or nobody (the safe state), and the
pod's entries are in the maps when admit returns.
"""
from __future__ import annotations

import logging
import threading

import pytest

from agent.k8s.model import Kind
from agent.k8s.store import Store
from agent.policy import Capacities, MapImage, evaluate
from agent.policy.capacity import MAP_RULES, usage
from agent.policy.diff import (
    EndpointDelete, EndpointPut, IpcacheDelete, IpcachePut, RuleDelete, RulePut,
)
from agent.daemon.policysync import PolicySync
from tests.policy.kube import namespace, netpol, pod

NODE, HOST = "n1", "192.168.0.1"
A, B, C, D, E = "10.1.0.10", "10.1.0.11", "10.1.0.12", "10.1.0.13", "10.1.0.14"
WEB = netpol("x", "web", {"podSelector": {"matchLabels": {"app": "web"}},
                          "ingress": [{"from": [{"namespaceSelector": {}}],
                                       "ports": [{"port": 1, "endPort": 65534}]}]})
DENY_ALL = netpol("x", "deny-all", {"podSelector": {}, "ingress": []})


class Overflowed(AssertionError):
    pass


class FakeMaps:
    """PolicyMaps in memory, with the kernel's one rule: a full map refuses."""

    def __init__(self, caps: Capacities):
        self.img = MapImage()
        self.caps = caps
        self.writes = 0

    def apply(self, op) -> None:
        self.writes += 1
        op.apply(self.img)
        for n, have, cap in (("ipcache", len(self.img.ipcache), self.caps.ipcache),
                             ("endpoints", len(self.img.endpoints), self.caps.endpoints),
                             ("rules", len(self.img.rules), self.caps.rules)):
            if have > cap:
                raise Overflowed(f"{n} map overflowed by {op}: {have} > {cap}")

    def apply_all(self, ops) -> None:
        for op in ops:
            self.apply(op)

    def image(self) -> MapImage:
        out = MapImage()
        for k, v in self.img.ipcache.items():
            out.put_ipcache(k, v)
        out.endpoints = dict(self.img.endpoints)
        out.rules = dict(self.img.rules)
        return out

    def clear(self) -> int:
        n = len(self.img.rules) + len(self.img.endpoints) + len(self.img.ipcache)
        self.img = MapImage()
        return n

    def identities_of(self, prefixes):
        return {p: self.img.ipcache[p] for p in prefixes if p in self.img.ipcache}

    def rule_flows(self):
        return {}


class FakeSettings:
    def __init__(self):
        self.policy = False

    def set_policy(self, on: bool) -> None:
        self.policy = on


class FakeSource:
    kind_name = "directory"

    def __init__(self, store):
        self.store = store
        self.synced = threading.Event()
        self.synced.set()

    def lookup_pod(self, ns, name, timeout):
        return self.store.get(Kind.POD, (ns, name))


class Events:
    def __init__(self):
        self.got = []

    def record(self, kind, ns, name, type_, reason, message):
        self.got.append((kind, f"{ns}/{name}", type_, reason, message))


def make(objs, caps=Capacities(10_000, 1_000, 100_000), **kw):
    store = Store()
    store.apply(upserts=objs)
    maps, events = FakeMaps(caps), Events()
    sync = PolicySync(maps, FakeSettings(), store, FakeSource(store), NODE, "default", caps,
                      lambda: [HOST], events=events, **kw)
    return sync, store, maps, events


def pods(labels: dict[str, str], ips=None, no_ip=()):
    ips = ips or {"a": A, "b": B, "c": C, "d": D}
    return [pod("x", n, None if n in no_ip else ip, labels={"app": labels[n]})
            for n, ip in ips.items() if n in labels]


def test_a_relabel_that_does_not_fit_isolates_the_pod_and_names_the_policy(caplog):
    base = [namespace("x", ns="x"), WEB]
    sync, store, maps, events = make(base + pods({"a": "web", "b": "db", "c": "db", "d": "db"}))
    sync.sync_once()
    used = len(maps.img.rules)
    # room for the old rules and d's move between identities, not for d's web rules
    cap = Capacities(10_000, 1_000, used + 35)
    sync.capacities = maps.caps = cap
    assert evaluate(maps.img, B, D, "TCP", 80).allowed      # d is not isolated yet
    with caplog.at_level(logging.ERROR, logger="fastpath.policy"):
        store.apply(upserts=pods({"d": "web"}))
        sync.sync_once()
    st = sync.status
    assert [(r["policy"], r["pods"]) for r in st.refused] == [("x/web", ["x/d"])]
    assert "rules map" in st.refused[0]["reason"] and str(cap.rules) in st.refused[0]["reason"]
    assert st.refused_total == 1 and st.errors == 0
    # isolated, and nothing but the node reaches it; web still works at a
    assert maps.img.endpoints[D].ingress.enforced
    assert not evaluate(maps.img, B, D, "TCP", 80).allowed
    assert evaluate(maps.img, HOST, D, "TCP", 80).allowed
    assert evaluate(maps.img, B, A, "TCP", 80).allowed
    assert "x/web" in caplog.text and "x/d" in caplog.text
    assert [e[:4] for e in events.got] == [("NetworkPolicy", "x/web", "Warning", "PolicyRefused")]
    # the same refusal again is not a new event or log line
    caplog.clear()
    sync.sync_once()
    assert len(events.got) == 1 and "x/web" not in caplog.text
    # room again (a leaves web): d gets web's rules, the refusal is lifted
    store.apply(upserts=pods({"a": "db"}))
    for _ in range(3):
        sync.sync_once()
    assert st.refused == []
    assert evaluate(maps.img, B, D, "TCP", 80).allowed
    assert events.got[-1][:4] == ("NetworkPolicy", "x/web", "Normal", "PolicyApplied")


def test_a_new_policy_that_does_not_fit_is_refused_whole_and_the_rest_applied():
    small = netpol("x", "small", {"podSelector": {"matchLabels": {"app": "db"}},
                                  "ingress": [{"ports": [{"port": 5432}]}]})
    sync, store, maps, events = make([namespace("x", ns="x"), small]
                                     + pods({"a": "web", "b": "db", "c": "db", "d": "web"}))
    sync.sync_once()
    sync.capacities = maps.caps = Capacities(10_000, 1_000, len(maps.img.rules) + 20)
    # web (new, too big) and a change to small in the same step
    small2 = netpol("x", "small", {"podSelector": {"matchLabels": {"app": "db"}},
                                   "ingress": [{"ports": [{"port": 5432}, {"port": 5433}]}]})
    store.apply(upserts=[WEB, small2])
    sync.sync_once()
    assert [(r["policy"], r["pods"]) for r in sync.status.refused] == [("x/web", ["x/a", "x/d"])]
    assert evaluate(maps.img, A, B, "TCP", 5433).allowed        # small's change is applied
    assert maps.img.endpoints[A].ingress.enforced                 # web isolates without rules
    assert not evaluate(maps.img, B, A, "TCP", 80).allowed


def test_the_plan_after_a_refusal_uses_the_room_its_change_freed():
    sync, store, maps, events = make([namespace("x", ns="x"), WEB]
                                     + pods({"a": "web", "b": "db", "c": "db", "d": "db"}))
    sync.sync_once()
    sync.capacities = maps.caps = Capacities(10_000, 1_000, len(maps.img.rules) + 35)
    store.apply(upserts=pods({"d": "web"}))
    sync.sync_once()
    assert sync.status.refused
    # one change frees room and needs the room at once: its own plan may
    # refuse again, and asks for the next one, which fits
    store.apply(upserts=pods({"a": "db"}))
    sync.sync_once()
    assert sync._again.is_set() or not sync.status.refused
    sync._again.clear()
    sync.sync_once()
    assert sync.status.refused == []


def test_a_pod_known_without_its_address_is_compiled_at_the_address_cni_gives():
    base = [namespace("x", ns="x"), DENY_ALL]
    sync, store, maps, _ = make(base + pods({"a": "web", "b": "web"}, no_ip=("b",)))
    sync.sync_once()
    assert B not in maps.img.endpoints
    assert sync.admit(B, "x", "b") == "compiled"
    assert maps.img.endpoints[B].ingress.enforced
    assert maps.img.ipcache[f"{B}/32"] == maps.img.ipcache[f"{A}/32"]   # same labels, same id
    assert not evaluate(maps.img, A, B, "TCP", 80).allowed
    assert evaluate(maps.img, HOST, B, "TCP", 80).allowed
    # the store catches up (kubelet reports the IP): the hint is dropped, nothing rewritten
    store.apply(upserts=pods({"b": "web"}))
    before = maps.writes
    sync.sync_once()
    assert B not in sync.hints and maps.writes == before


def test_a_fetched_pod_counts_until_the_store_has_it():
    sync, store, maps, _ = make([namespace("x", ns="x"), DENY_ALL] + pods({"a": "web"}))
    sync.sync_once()
    fetched = pod("x", "e", None, labels={"app": "web"})
    assert sync.admit(E, "x", "e", fetched) == "compiled"
    assert maps.img.endpoints[E].ingress.enforced
    assert sync.status.pending == []


@pytest.mark.parametrize("mode", ["default", "always"])
def test_a_pod_whose_labels_are_unknown_starts_in_the_safe_state_and_converges(mode):
    sync, store, maps, _ = make([namespace("x", ns="x")] + pods({"a": "web"}))
    sync.mode = type(sync.mode)(mode)
    sync.sync_once()
    assert sync.admit(E, "x", "e") == "pending"
    cfg = maps.img.endpoints[E]
    assert cfg.ingress.enforced and cfg.egress.enforced == (mode == "always")
    assert not evaluate(maps.img, A, E, "TCP", 80).allowed
    assert evaluate(maps.img, HOST, E, "TCP", 80).allowed
    assert sync.status.pending == ["x/e"]
    # its Pod arrives: no policy selects it in mode default, so it is open
    store.apply(upserts=[pod("x", "e", E, labels={"app": "web"})])
    sync.sync_once()
    assert sync.status.pending == []
    assert evaluate(maps.img, A, E, "TCP", 80).allowed == (mode == "default")


def test_the_open_setting_leaves_a_pod_with_unknown_labels_open():
    sync, store, maps, _ = make([namespace("x", ns="x")] + pods({"a": "web"}),
                                unknown_pod="open")
    sync.sync_once()
    assert sync.admit(E, "x", "e") == "open"
    assert E not in maps.img.endpoints


def test_a_deleted_pending_pod_leaves_nothing_behind():
    sync, store, maps, _ = make([namespace("x", ns="x")] + pods({"a": "web"}))
    sync.sync_once()
    sync.admit(E, "x", "e")
    assert E in maps.img.endpoints
    sync.forget(E)
    assert sync._again.is_set()
    sync.sync_once()
    assert E not in maps.img.endpoints
    assert not any(ip == E for ip, _ in maps.img.rules)


def test_a_pod_added_before_the_first_plan_gets_the_safe_state_at_once():
    store = Store()
    store.apply(upserts=[namespace("x", ns="x"), DENY_ALL])
    maps = FakeMaps(Capacities(10_000, 1_000, 100_000))
    # what a previous agent left in the pinned maps: the node's identity
    maps.apply(IpcachePut(f"{HOST}/32", 1))
    src = FakeSource(store)
    src.synced.clear()
    sync = PolicySync(maps, FakeSettings(), store, src, NODE, "default",
                      Capacities(10_000, 1_000, 100_000), lambda: [HOST])
    assert sync.admit(E, "x", "e", wait=0.05) == "pending"
    assert maps.img.endpoints[E].ingress.enforced
    assert evaluate(maps.img, HOST, E, "TCP", 80).allowed
    assert not evaluate(maps.img, A, E, "TCP", 80).allowed
    # the first plan takes over from the maps: the pod is compiled (deny-all)
    store.apply(upserts=[pod("x", "e", None, labels={"app": "web"})])
    src.synced.set()
    sync.sync_once()
    assert maps.img.endpoints[E].ingress.deciding != (3,)
    assert sync.state.endpoints[E].ingress.enforced


def test_no_write_ever_overflows_while_refusals_come_and_go():
    """Random relabels and policy edits against a tight rules map: the fake
    maps raise on any write past capacity, and every selected pod stays
    isolated after every plan."""
    import random
    rng = random.Random(5)
    ips = {n: f"10.1.0.{20 + i}" for i, n in enumerate("abcdefgh")}
    labels = {n: rng.choice(["web", "db", "other"]) for n in ips}
    objs = [namespace("x", ns="x"), WEB] + [pod("x", n, ip, labels={"app": labels[n]})
                                             for n, ip in ips.items()]
    sync, store, maps, _ = make(objs, caps=Capacities(10_000, 1_000, 150))
    for step in range(30):
        n = rng.choice(sorted(ips))
        labels[n] = rng.choice(["web", "db", "other"])
        store.apply(upserts=[pod("x", n, ips[n], labels={"app": labels[n]})])
        sync.sync_once()
        for m, ip in ips.items():
            if labels[m] == "web":
                assert maps.img.endpoints[ip].ingress.enforced, (step, m)
        assert len(maps.img.rules) <= 150
    assert sync.status.refused_total > 0, "the map was never tight: the test proves nothing"


def test_a_restarted_agent_keeps_a_pending_pod_in_its_safe_state():
    sync, store, maps, _ = make([namespace("x", ns="x")] + pods({"a": "web"}))
    sync.sync_once()
    sync.admit(E, "x", "e")
    assert maps.img.endpoints[E].ingress.enforced
    # a new PolicySync over the same maps, as after a restart; the endpoint
    # is restored from the state directory
    again = PolicySync(maps, FakeSettings(), store, FakeSource(store), NODE, "default",
                       maps.caps, lambda: [HOST])
    again.remember(E, "x", "e")
    again.sync_once()
    assert maps.img.endpoints[E].ingress.enforced and again.status.pending == ["x/e"]
    # without the restored word it would have been opened
    third = PolicySync(maps, FakeSettings(), store, FakeSource(store), NODE, "default",
                       maps.caps, lambda: [HOST])
    third.sync_once()
    assert E not in maps.img.endpoints


def test_an_unchanged_pod_at_its_add_address_is_not_recompiled_plan_after_plan():
    base = [namespace("x", ns="x"), DENY_ALL]
    sync, store, maps, _ = make(base + pods({"a": "web", "b": "web"}, no_ip=("b",)))
    sync.sync_once()
    sync.admit(B, "x", "b")
    first = sync.state.endpoints[B]
    store.apply(upserts=[namespace("y", ns="y")])      # an unrelated change
    sync.sync_once()
    assert sync.state.endpoints[B] is first


def test_an_add_without_a_pod_name_is_no_kubernetes_pod_and_stays_open():
    sync, store, maps, _ = make([namespace("x", ns="x"), DENY_ALL] + pods({"a": "web"}))
    sync.sync_once()
    assert sync.admit(E, "", "") == "open"
    assert E not in maps.img.endpoints and sync.hints == {}
    assert sync.admit(A, "", "") == "compiled"        # the store knows a pod there


def test_an_address_reused_by_a_new_pod_is_compiled_as_the_new_pod():
    # the old pod's object still claims the address (being deleted, Running)
    old = pod("x", "old", E, labels={"app": "web"}, deleting=True)
    sync, store, maps, _ = make([namespace("x", ns="x"), WEB, old] + pods({"a": "db"}))
    sync.sync_once()
    assert sync.state.endpoints[E].name == "old" and maps.img.endpoints[E].ingress.enforced
    store.apply(upserts=[pod("x", "new", None, labels={"app": "db"})])
    assert sync.admit(E, "x", "new") == "compiled"
    assert sync.state.endpoints[E].name == "new"
    assert E not in maps.img.endpoints or not maps.img.endpoints[E].ingress.enforced
    assert evaluate(maps.img, A, E, "TCP", 80).allowed       # db pods are not isolated


def _audited(p, on: bool = True):
    from dataclasses import replace as _replace
    from agent.k8s.model import ANNOTATION_POLICY_AUDIT, FrozenMap
    ann = dict(p.annotations)
    if on:
        ann[ANNOTATION_POLICY_AUDIT] = "true"
    else:
        ann.pop(ANNOTATION_POLICY_AUDIT, None)
    return _replace(p, annotations=FrozenMap(ann))


def test_audited_and_changed_policies_follow_the_store_object_by_object():
    """What a plan passes the compiler (audited policies) and the refusal
    order (policies added or edited since the last state written), kept
    from one plan to the next by looking only at objects that changed."""
    sync, store, maps, _ = make(pods({"a": "web", "b": "db"}) + [WEB])
    audited, changed = sync._policy_changes(store.snapshot())
    assert (audited, changed) == (frozenset(), frozenset())   # nothing written yet
    sync.sync_once()
    # an edit, an addition and an audit flag, as one ChangeSet
    web2 = netpol("x", "web", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": []})
    store.apply(upserts=[web2, _audited(DENY_ALL)])
    assert sync._policy_changes(store.snapshot()) == (frozenset({"x/deny-all"}),
                                                      frozenset({"x/web", "x/deny-all"}))
    sync.sync_once()
    assert sync._policy_changes(store.snapshot()) == (frozenset({"x/deny-all"}), frozenset())
    # an edit reverted before the next state is written changed nothing
    store.apply(upserts=[WEB])
    store.apply(upserts=[web2])
    assert sync._policy_changes(store.snapshot())[1] == frozenset()
    # audit switched off, then the policy deleted
    store.apply(upserts=[_audited(store.snapshot().network_policies[("x", "deny-all")], False)])
    assert sync._policy_changes(store.snapshot()) == (frozenset(), frozenset({"x/deny-all"}))
    store.apply(deletes=[(DENY_ALL.kind, DENY_ALL.key)])
    assert sync._policy_changes(store.snapshot()) == (frozenset(), frozenset())
    sync.sync_once()
    assert sync.status.policies == 1


def test_a_policy_edited_while_a_state_did_not_fit_still_counts_as_changed():
    """A plan that writes no state (here: more pods than the endpoints map
    holds) leaves what changed since the last state written as changed,
    for the refusal order of the plan that follows."""
    sync, store, maps, _ = make(pods({"a": "web", "b": "db"}) + [DENY_ALL])
    sync.sync_once()
    store.apply(upserts=[WEB, pod("x", "e", E, labels={"app": "web"})])
    sync.capacities = Capacities(10_000, 2, 100_000)
    sync.sync_once()
    assert sync.state is None and sync.status.refused      # nothing written
    assert sync._policy_changes(store.snapshot())[1] == frozenset({"x/web"})
    sync.capacities = Capacities(10_000, 1_000, 100_000)
    sync.sync_once()
    assert sync.state is not None
    assert sync._policy_changes(store.snapshot())[1] == frozenset()


def test_wait_applied_returns_once_a_plan_reflects_a_later_store_version():
    sync, store, maps, _ = make(pods({"a": "web", "b": "db"}) + [WEB])
    sync.sync_once()
    before = sync.status.applied_version
    assert not sync.wait_applied(before, 0.05)          # nothing newer: times out
    store.apply(upserts=[DENY_ALL])
    got = []
    t = threading.Thread(target=lambda: got.append(sync.wait_applied(before, 10)))
    t.start()
    t.join(0.2)
    assert t.is_alive(), "returned before any plan reflected the change"
    sync.sync_once()
    t.join(10)
    assert got == [True] and sync.status.applied_version > before
    assert sync.wait_applied(before, 0)                 # already there: no wait


def test_the_loop_plans_a_lone_change_at_once_and_a_burst_at_most_once_per_settle():
    """The reconciler's loop (leading edge): a change after a quiet spell
    is planned without waiting `settle`; changes arriving while one is
    planned or within `settle` of the last plan are planned together."""
    import time
    sync, store, maps, _ = make(pods({"a": "web", "b": "db"}) + [WEB], settle=2.0)
    sync.start()
    try:
        assert sync.planned.wait(5)
        time.sleep(2.2)                                 # the last plan is older than settle
        plans = sync.status.plans
        before = sync.status.applied_version
        t0 = time.monotonic()
        store.apply(upserts=[DENY_ALL])
        assert sync.wait_applied(before, 5)
        assert time.monotonic() - t0 < 1.5, "a lone change waited for settle"
        # a burst right after: at most one plan per settle for all of it
        before = sync.status.applied_version
        for i in range(5):
            store.apply(upserts=[netpol("x", f"burst{i}", {"podSelector": {}, "ingress": []})])
        assert sync.wait_applied(store.version - 1, 5)
        assert sync.status.applied_version == store.version
        assert sync.status.plans - plans <= 3
    finally:
        sync.stop()
