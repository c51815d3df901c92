"""The Kubernetes source against the fake API server, through the official client.

    test  --(mutate, compact, drop, down/up)-->  FakeAPIServer (127.0.0.1:ephemeral)
                                                   ^  list / watch (HTTP/1.1, chunked)
    Store <-- KubernetesSource (6 reflectors) -- kubernetes.client

After every disturbance the store must converge to exactly the server's state.
"""
from __future__ import annotations

import logging
import time

from agent.k8s.model import ALL_KINDS, Kind
from agent.k8s.parse import parse_object
from agent.k8s.testing.fakeapi import FakeAPIServer
from tests.k8s.k8sdata import wait_for


def server_state(fake: FakeAPIServer, kind: Kind, pred=lambda o: True) -> dict:
    with fake._cond:
        objs = list(fake._objects[kind.value].values())
    out = {}
    for o in objs:
        if pred(o):
            m = parse_object(o, kind)
            out[m.key] = m
    return out


def converged(fake, src, kinds=ALL_KINDS, preds=None) -> bool:
    """The store holds exactly the server's objects (those matching preds[kind])."""
    snap = src.store.snapshot()
    for k in kinds:
        want = server_state(fake, k, (preds or {}).get(k, lambda o: True))
        if dict(snap.of(k)) != want:
            return False
    return True


def metric(src, name: str, **labels) -> float:
    return src.metrics.registry.get_sample_value(name, labels) or 0.0


def ns(name: str, **labels) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def svc(name: str, port: int = 80, namespace: str = "ns-0") -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": "172.31.0.1", "ports": [{"port": port}]}}


def some_pod(fake, i=0) -> dict:
    key = sorted(fake._objects["Pod"])[i]
    return {"kind": "Pod", **fake.get("Pod", *key)}


def test_initial_sync_lists_every_kind_in_pages(fake, kube):
    src = kube(page_size=7)
    assert src.synced.wait(10)
    assert converged(fake, src)
    snap = src.store.snapshot()
    assert len(snap.pods) == 40 and len(snap.endpoint_slices) == 4 and len(snap.services) == 20
    pod_lists = [r for r in fake.requests if r.startswith("/api/v1/pods?") and "watch" not in r]
    assert len(pod_lists) == 6 and all("limit=7" in r for r in pod_lists)
    assert any("continue=" in r for r in pod_lists)
    assert metric(src, "fastpath_k8s_relists_total", kind="Pod", reason="initial") == 1
    assert metric(src, "fastpath_k8s_synced") == 1


def test_adds_modifications_and_deletions_of_every_kind_converge(fake, kube):
    src = kube()
    assert src.synced.wait(10)
    fake.apply(ns("new-ns", team="x"))
    fake.apply(svc("added"))
    p = some_pod(fake)
    p["metadata"]["labels"]["role"] = "changed"
    fake.apply(p)
    sl = sorted(fake._objects["EndpointSlice"])[0]
    fake.delete("EndpointSlice", *sl)
    fake.delete("NetworkPolicy", *sorted(fake._objects["NetworkPolicy"])[0])
    node = {"kind": "Node", **fake.get("Node", "", sorted(fake._objects["Node"])[0][1])}
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = "moved"
    fake.apply(node)
    wait_for(lambda: converged(fake, src))
    snap = src.store.snapshot()
    assert snap.namespaces[("", "new-ns")].labels == {"team": "x"}
    assert snap.pods[(p["metadata"]["namespace"], p["metadata"]["name"])].labels["role"] == "changed"
    assert sl not in snap.endpoint_slices
    assert any(n.zone == "moved" for n in snap.nodes.values())
    # Watches, not relists, delivered all of that.
    assert metric(src, "fastpath_k8s_relists_total", kind="Pod", reason="initial") == 1
    assert fake.stats["list"] == 6


def test_bookmarks_advance_the_resource_version_of_quiet_kinds(fake, kube):
    fake.bookmark_interval = 0.05
    src = kube()
    assert src.synced.wait(10)
    for i in range(5):
        fake.apply(svc(f"s{i}"))  # only Services change; Namespaces stay quiet
    target = fake.resource_version
    wait_for(lambda: int(src.kinds[Kind.NAMESPACE].resource_version or 0) >= target)
    # A quiet kind that heard bookmarks resumes after compaction without a relist.
    fake.compact()
    fake.drop_connections()
    fake.apply(ns("after-compaction"))
    wait_for(lambda: ("", "after-compaction") in src.store.snapshot().namespaces)
    assert metric(src, "fastpath_k8s_relists_total", kind="Namespace", reason="expired") == 0
    assert fake.stats["bookmarks"] > 0


def test_gone_410_triggers_a_relist_that_also_catches_missed_deletions(fake, kube):
    src = kube()
    assert src.synced.wait(10)
    fake.down()
    wait_for(lambda: not src.status()["connected"])
    # While the agent is away: changes, a deletion, and history compacted.
    gone = sorted(fake._objects["Service"])[0]
    fake.delete("Service", *gone)
    fake.apply(svc("born-while-away"))
    fake.apply(ns("ns-while-away"))
    fake.compact()
    fake.up()
    wait_for(lambda: converged(fake, src))
    assert gone not in src.store.snapshot().services
    assert fake.stats["expired"] >= 1
    assert metric(src, "fastpath_k8s_relists_total", kind="Service", reason="expired") == 1


def test_dropped_connections_resume_from_the_last_resource_version(fake, kube):
    src = kube()
    assert src.synced.wait(10)
    lists = fake.stats["list"]
    for i in range(5):
        fake.drop_connections()
        fake.apply(svc(f"flap-{i}", port=1000 + i))
        p = some_pod(fake, i)
        p["metadata"]["labels"]["flap"] = str(i)
        fake.apply(p)
    wait_for(lambda: converged(fake, src))
    assert fake.stats["list"] == lists  # resumed watches, no relist
    assert fake.stats["dropped"] >= 1 and fake.stats["watch"] > 6
    resumed = [r for r in fake.requests if "watch=true" in r and "resourceVersion=" in r]
    assert resumed


def test_unreachable_api_is_logged_once_counted_and_recovered(fake, kube, caplog):
    src = kube()
    assert src.synced.wait(10)
    before = dict(src.store.snapshot().services)
    with caplog.at_level(logging.INFO, "fastpath.k8s"):
        fake.down()
        wait_for(lambda: not src.status()["connected"])
        wait_for(lambda: sum(src.kinds[k].errors for k in ALL_KINDS) >= 12)
        assert dict(src.store.snapshot().services) == before  # last known state kept
        assert metric(src, "fastpath_k8s_api_up", kind="Service") == 0
        assert metric(src, "fastpath_k8s_api_errors_total", kind="Service", reason="unreachable") >= 1
        fake.apply(svc("during-outage"))
        fake.up()
        wait_for(lambda: converged(fake, src) and src.status()["connected"])
        # the recovery line follows the last kind's reconnection in its own
        # thread, a moment after status() says connected
        wait_for(lambda: any("reachable again" in r.getMessage() for r in caplog.records))
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(unreachable) == 1 and unreachable[0].levelno == logging.WARNING
    assert fake.url in unreachable[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert metric(src, "fastpath_k8s_api_up", kind="Service") == 1
    st = src.status()["kinds"]["Service"]
    assert st["errors"] >= 1 and st["last_error"]


def test_backoff_spaces_out_reconnects_while_the_api_is_down(fake, kube):
    src = kube(backoff_initial=0.05, backoff_cap=0.4)
    assert src.synced.wait(10)
    fake.down()
    time.sleep(1.5)
    errors = src.kinds[Kind.POD].errors
    # Without backoff a reflector would fail thousands of times in 1.5 s; with
    # 0.05 s doubling to a 0.4 s cap (and jitter down to half), at most ~12.
    assert 2 <= errors <= 14, errors
    fake.up()


def test_pods_are_watched_for_this_node_only_and_follow_rescheduling(fake, kube):
    node = sorted(fake._objects["Node"])[0][1]
    other = sorted(fake._objects["Node"])[1][1]
    src = kube(node_name=node)
    assert src.synced.wait(10)
    preds = {Kind.POD: lambda o: o["spec"].get("nodeName") == node,
             Kind.NODE: lambda o: o["metadata"]["name"] == node}
    assert converged(fake, src, preds=preds)
    assert set(src.store.snapshot().nodes) == {("", node)}
    assert 0 < len(src.store.snapshot().pods) < 40
    assert any("fieldSelector=spec.nodeName" in r for r in fake.requests)
    # A pod moved onto this node appears; one moved away disappears.
    def first_on(n):
        key = next(k for k, o in fake._objects["Pod"].items() if o["spec"]["nodeName"] == n)
        return {"kind": "Pod", **fake.get("Pod", *key)}

    incoming, leaving = first_on(other), first_on(node)
    incoming["spec"]["nodeName"] = node
    leaving["spec"]["nodeName"] = other
    fake.apply_many([incoming, leaving])
    wait_for(lambda: converged(fake, src, preds=preds))
    pods = src.store.snapshot().pods
    assert (incoming["metadata"]["namespace"], incoming["metadata"]["name"]) in pods
    assert (leaving["metadata"]["namespace"], leaving["metadata"]["name"]) not in pods
    assert src.status()["kinds"]["Pod"]["scope"] == f"node {node}"


def test_watch_all_pods_for_network_policy(fake, kube):
    src = kube(node_name=sorted(fake._objects["Node"])[0][1], watch_all_pods=True)
    assert src.synced.wait(10)
    assert len(src.store.snapshot().pods) == 40 and len(src.store.snapshot().nodes) == 1


def test_an_invalid_update_keeps_the_previous_version_until_fixed(fake, kube, caplog):
    src = kube()
    assert src.synced.wait(10)
    fake.apply(svc("web", port=80))
    wait_for(lambda: ("ns-0", "web") in src.store.snapshot().services)
    with caplog.at_level(logging.WARNING, "fastpath.k8s"):
        fake.apply(svc("web", port=70000))
        fake.apply(svc("next", port=81))  # later events still flow
        wait_for(lambda: ("ns-0", "next") in src.store.snapshot().services)
    assert src.store.snapshot().services[("ns-0", "web")].ports[0].port == 80
    assert "Service ns-0/web: spec.ports[0].port: 70000 is out of range" in caplog.text
    assert metric(src, "fastpath_k8s_rejected_objects_total", source="kubernetes", kind="Service") == 1
    assert src.status()["rejected"][0]["field"] == "spec.ports[0].port"
    fake.apply(svc("web", port=8080))
    wait_for(lambda: src.store.snapshot().services[("ns-0", "web")].ports[0].port == 8080)
    assert src.status()["rejected"] == []


def test_an_invalid_object_in_a_list_is_skipped_and_its_old_version_kept_on_relist(fake, kube):
    fake.apply(svc("web", port=80))
    src = kube()
    assert src.synced.wait(10)
    fake.down()
    fake.apply(svc("web", port=0))
    fake.compact()
    fake.up()
    wait_for(lambda: metric(src, "fastpath_k8s_relists_total", kind="Service", reason="expired") >= 1)
    wait_for(lambda: src.rejected())
    assert src.store.snapshot().services[("ns-0", "web")].ports[0].port == 80
    assert len(src.store.snapshot().services) == 21


def test_periodic_resync_relists_without_spurious_changes(fake, kube):
    src = kube(resync_seconds=0.3)
    assert src.synced.wait(10)
    sub = src.store.subscribe()
    wait_for(lambda: metric(src, "fastpath_k8s_relists_total", kind="Pod", reason="resync") >= 2)
    assert sub.drain() == []
    assert converged(fake, src)


def test_watches_ended_by_the_server_are_reopened(fake, kube):
    fake.max_watch_seconds = 0.2
    src = kube()
    assert src.synced.wait(10)
    time.sleep(0.5)
    fake.apply(svc("after-timeouts"))
    wait_for(lambda: ("ns-0", "after-timeouts") in src.store.snapshot().services)
    assert fake.stats["watch"] >= 12 and fake.stats["list"] == 6


def test_stop_is_prompt_with_watches_open(fake, kube):
    src = kube()
    assert src.synced.wait(10)
    t0 = time.monotonic()
    src.stop()
    assert time.monotonic() - t0 < 2
    assert not any(r.thread.is_alive() for r in src._reflectors)


def test_status_reports_each_kind(fake, kube):
    src = kube(node_name="cn-hangzhou.192.168.0.1")
    assert src.synced.wait(10)
    st = src.status()
    assert st["source"] == f"kubernetes {fake.url}" and st["synced"] and st["connected"]
    assert set(st["kinds"]) == {k.value for k in ALL_KINDS}
    svc_st = st["kinds"]["Service"]
    assert svc_st["synced"] and svc_st["last_sync"] > 0 and svc_st["resource_version"]
    assert svc_st["scope"] == "all" and st["kinds"]["Node"]["scope"].startswith("node ")
