"""One Pod asked for now (a new pod's CNI ADD), and Events posted about
objects, against the fake API server through the official client; the
directory source answers from its manifests."""
from __future__ import annotations

import time

import pytest

from agent.k8s.events import KubeEvents, LogEvents, event_body, recorder_for
from agent.k8s.model import Kind
from tests.k8s.k8sdata import wait_for


def pod_doc(ns: str, name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": labels},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Pending"}}


def test_a_pod_is_fetched_by_name_without_touching_the_store(fake, kube):
    src = kube(node_name="n1", watch_all_pods=True)
    wait_for(src.synced.is_set)
    fake.apply(pod_doc("web", "fresh", {"app": "web"}))
    pod = src.lookup_pod("web", "fresh", 2.0)
    assert pod is not None and pod.key == ("web", "fresh")
    assert dict(pod.labels) == {"app": "web"} and pod.ips == ()
    assert any("/namespaces/web/pods/fresh" in r for r in fake.requests)


def test_a_pod_the_api_does_not_have_is_none(fake, kube):
    src = kube(node_name="n1")
    assert src.lookup_pod("web", "nobody", 2.0) is None


def test_a_slow_or_absent_api_raises_within_the_timeout(fake, kube):
    src = kube(node_name="n1")
    fake.apply(pod_doc("web", "slow", {"app": "web"}))
    fake.get_delay = 1.5
    t0 = time.monotonic()
    with pytest.raises(Exception):
        src.lookup_pod("web", "slow", 0.3)
    assert time.monotonic() - t0 < 1.2
    fake.get_delay = 0
    fake.down()
    try:
        with pytest.raises(Exception):
            src.lookup_pod("web", "slow", 0.5)
    finally:
        fake.up()


def test_the_directory_source_rescans_its_manifests_to_answer(tmp_path, metrics):
    import json
    from agent.k8s.directory import DirectorySource
    from agent.k8s.store import Store
    # polls never and watches nothing: only the rescan can find the Pod
    src = DirectorySource(str(tmp_path), Store(), metrics=metrics, interval=3600,
                          watch=False).start()
    try:
        assert src.lookup_pod("web", "late", 1.0) is None
        (tmp_path / "late.json").write_text(json.dumps(pod_doc("web", "late", {"app": "w"})))
        pod = src.lookup_pod("web", "late", 1.0)      # no wait for the next poll
        assert pod is not None and dict(pod.labels) == {"app": "w"}
        assert src.store.get(Kind.POD, ("web", "late")) is pod
    finally:
        src.stop()


def test_events_are_posted_to_the_objects_namespace_once_per_repeat(fake):
    from agent.k8s.kube import make_api_client
    ev = KubeEvents(make_api_client(host=fake.url), "n1", repeat_seconds=60)
    try:
        for _ in range(3):
            ev.record("NetworkPolicy", "x", "web", "Warning", "PolicyRefused", "no room")
        ev.record("NetworkPolicy", "x", "web", "Normal", "PolicyApplied", "room again")
        wait_for(lambda: len(fake.events) == 2)
    finally:
        ev.stop()
    first = fake.events[0]
    assert first["metadata"]["namespace"] == "x"
    assert first["involvedObject"] == {"kind": "NetworkPolicy",
                                       "apiVersion": "networking.k8s.io/v1",
                                       "namespace": "x", "name": "web"}
    assert (first["type"], first["reason"], first["message"]) == ("Warning", "PolicyRefused",
                                                                  "no room")
    assert first["source"] == {"component": "fastpath", "host": "n1"}
    assert ev.posted == 2 and ev.failed == 0


def test_an_unreachable_api_costs_the_event_not_the_caller(fake):
    from agent.k8s.kube import make_api_client
    fake.down()
    ev = KubeEvents(make_api_client(host=fake.url), "n1", timeout=0.5)
    try:
        t0 = time.monotonic()
        ev.record("NetworkPolicy", "x", "web", "Warning", "PolicyRefused", "no room")
        assert time.monotonic() - t0 < 0.1
        wait_for(lambda: ev.failed == 1)
    finally:
        ev.stop()
        fake.up()


def test_without_an_api_events_are_logged(caplog):
    rec = recorder_for(object(), "n1")
    assert isinstance(rec, LogEvents)
    with caplog.at_level("WARNING", logger="fastpath.events"):
        rec.record("NetworkPolicy", "x", "web", "Warning", "PolicyRefused", "no room")
    assert "PolicyRefused" in caplog.text and "x/web" in caplog.text
    assert rec.recorded[0] == event_body("NetworkPolicy", "x", "web", "Warning",
                                         "PolicyRefused", "no room", "n1",
                                         now=None) | {"firstTimestamp": rec.recorded[0][
                                             "firstTimestamp"], "lastTimestamp": rec.recorded[0][
                                             "lastTimestamp"]}
