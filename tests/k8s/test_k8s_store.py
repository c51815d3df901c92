"""The store: atomic ChangeSets, immutable snapshots, ordered deltas."""
from __future__ import annotations

import threading

import pytest

from agent.k8s.model import Action, EndpointSlice, Endpoint, FrozenMap, Kind, Namespace, Pod
from agent.k8s.parse import parse_object
from agent.k8s.source import describe, summarize
from agent.k8s.store import Store
from tests.k8s.k8sdata import ALL_VALID, SLICE, clone


def pod(name: str, ip: str = "10.0.0.1", **labels) -> Pod:
    return Pod(namespace="ns", name=name, labels=FrozenMap(labels), ips=(ip,))


def test_upsert_then_modify_then_delete_produce_one_delta_each():
    s = Store()
    sub = s.subscribe()
    s.upsert(pod("a"))
    s.upsert(pod("a", app="x"))
    s.delete(Kind.POD, ("ns", "a"))
    got = [(cs.version, [(d.action, d.key) for d in cs.deltas]) for cs in sub.drain()]
    assert got == [(1, [(Action.ADDED, ("ns", "a"))]),
                   (2, [(Action.MODIFIED, ("ns", "a"))]),
                   (3, [(Action.DELETED, ("ns", "a"))])]


def test_identical_content_makes_no_delta_even_with_a_new_resource_version():
    s = Store()
    s.upsert(Pod(namespace="ns", name="a", resource_version="1"))
    sub = s.subscribe()
    assert s.upsert(Pod(namespace="ns", name="a", resource_version="2")) is None
    assert sub.drain() == [] and s.version == 1
    assert s.get(Kind.POD, ("ns", "a")).resource_version == "2"


def test_deleting_an_unknown_object_is_a_no_op():
    s = Store()
    assert s.delete(Kind.SERVICE, ("ns", "nope")) is None and s.version == 0


def test_snapshot_never_changes_after_it_was_taken():
    s = Store()
    s.upsert(pod("a"))
    snap = s.snapshot()
    s.upsert(pod("b"))
    s.delete(Kind.POD, ("ns", "a"))
    assert set(snap.pods) == {("ns", "a")} and snap.version == 1
    assert set(s.snapshot().pods) == {("ns", "b")}


def test_snapshot_mappings_are_read_only():
    s = Store()
    s.upsert(pod("a"))
    snap = s.snapshot()
    with pytest.raises(TypeError):
        snap.pods[("ns", "z")] = pod("z")  # type: ignore[index]
    with pytest.raises(TypeError):
        snap._maps[Kind.POD] = {}  # type: ignore[index]


def test_unchanged_store_returns_the_same_snapshot_object():
    s = Store()
    s.upsert(pod("a"))
    assert s.snapshot() is s.snapshot()


def test_apply_is_one_change_set_for_many_objects():
    s = Store()
    s.upsert(pod("old"))
    sub = s.subscribe()
    cs = s.apply(upserts=[pod("a"), pod("b")], deletes=[(Kind.POD, ("ns", "old"))], origin="file x")
    assert cs.version == 2 and cs.origin == "file x"
    assert sorted((d.action.value, d.key[1]) for d in cs.deltas) == [
        ("ADDED", "a"), ("ADDED", "b"), ("DELETED", "old")]
    assert sub.drain() == [cs]


def test_replace_emits_only_differences_and_keeps_what_it_is_told_to():
    s = Store()
    s.apply(upserts=[pod("a"), pod("b"), pod("c"), pod("bad")])
    cs = s.replace(Kind.POD, [pod("a"), pod("b", app="new"), pod("d")],
                   keep=lambda key: key == ("ns", "bad"))
    assert sorted((d.action.value, d.key[1]) for d in cs.deltas) == [
        ("ADDED", "d"), ("DELETED", "c"), ("MODIFIED", "b")]
    assert set(k[1] for k in s.snapshot().pods) == {"a", "b", "bad", "d"}


def test_replace_touches_only_its_kind():
    s = Store()
    s.apply(upserts=[pod("a"), Namespace(name="ns")])
    s.replace(Kind.POD, [])
    assert s.snapshot().namespaces and not s.snapshot().pods


def test_subscription_starts_from_a_consistent_snapshot():
    s = Store()
    s.upsert(pod("a"))
    sub = s.subscribe()
    s.upsert(pod("b"))
    assert set(sub.snapshot.pods) == {("ns", "a")}
    (cs,) = sub.drain()
    assert cs.version == sub.snapshot.version + 1 and cs.deltas[0].key == ("ns", "b")


def test_callback_subscribers_see_every_change_in_order_and_can_unsubscribe():
    s = Store()
    seen = []
    sub = s.subscribe(lambda cs: seen.append(cs.version))
    for i in range(5):
        s.upsert(pod(f"p{i}"))
    sub.close()
    s.upsert(pod("after"))
    assert seen == [1, 2, 3, 4, 5]


def test_get_times_out_and_close_wakes_a_waiting_reader():
    s = Store()
    sub = s.subscribe()
    assert sub.get(timeout=0.01) is None
    out = []
    t = threading.Thread(target=lambda: out.append(sub.get(timeout=5)))
    t.start()
    sub.close()
    t.join(2)
    assert not t.is_alive() and out == [None]


def test_readers_never_observe_a_half_applied_change_set():
    """A writer moves 200 pods between two label values in one apply(); a
    concurrent reader must always see all 200 with the same value."""
    s = Store()
    s.apply(upserts=[pod(f"p{i}", v="0") for i in range(200)])
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            vals = {p.labels["v"] for p in s.snapshot().pods.values()}
            if len(vals) != 1:
                bad.append(vals)

    t = threading.Thread(target=reader)
    t.start()
    for gen in range(1, 60):
        s.apply(upserts=[pod(f"p{i}", v=str(gen)) for i in range(200)])
    stop.set()
    t.join()
    assert bad == [] and s.version == 60


def test_follower_rebuilds_the_same_state_from_snapshot_plus_deltas():
    s = Store()
    s.apply(upserts=[pod(f"p{i}") for i in range(10)])
    sub = s.subscribe()
    state = dict(sub.snapshot.pods)
    s.apply(upserts=[pod("p1", app="x"), pod("new")], deletes=[(Kind.POD, ("ns", "p2"))])
    s.replace(Kind.POD, [pod(f"p{i}") for i in range(5)])
    for cs in sub.drain():
        for d in cs.deltas:
            if d.new is None:
                del state[d.key]
            else:
                state[d.key] = d.new
    assert state == dict(s.snapshot().pods)


def test_endpoint_slices_are_grouped_by_service_name_label():
    s = Store()
    a = parse_object(SLICE)
    b = EndpointSlice(namespace="shop", name="web-aaa", address_type="IPv4",
                      endpoints=(Endpoint(("10.0.9.9",)),), service_name="web")
    other = EndpointSlice(namespace="other", name="web-x", address_type="IPv4", service_name="web")
    orphan = EndpointSlice(namespace="shop", name="lost", address_type="IPv4")
    s.apply(upserts=[a, b, other, orphan])
    snap = s.snapshot()
    assert [x.name for x in snap.endpoint_slices_for("shop", "web")] == ["web-aaa", "web-abc"]
    assert snap.endpoint_slices_for("other", "web") == (other,)
    assert snap.endpoint_slices_for("shop", "nothing") == ()


def test_summarize_counts_every_kind_and_describe_names_objects():
    s = Store()
    s.apply(upserts=[parse_object(clone(o)) for o in ALL_VALID])
    line = summarize(s.snapshot())
    assert line == ("cluster state: namespaces=1 nodes=1 pods=1 services=1 "
                    "endpointslices=1 endpoints=4 networkpolicies=1")
    lines = describe(s.snapshot())
    assert "Pod (1): shop/web-1" in lines and "Namespace (1): shop" in lines
    s.apply(upserts=[pod(f"p{i:02d}") for i in range(30)])
    assert any(line.endswith("(+11 more)") for line in describe(s.snapshot(), limit=20))


def test_snapshot_helpers():
    s = Store()
    s.apply(upserts=[parse_object(clone(o)) for o in ALL_VALID])
    snap = s.snapshot()
    assert snap.namespace_labels("shop") == {"team": "payments"}
    assert snap.namespace_labels("missing") == {}
    assert snap.get("Service", ("shop", "web")).name == "web"
    assert snap.of(Kind.NODE) is snap.nodes
    assert snap.counts()[Kind.NETWORK_POLICY] == 1
