"""The manifest-directory source: files come, change, move and go; bad ones never
half-apply and never take good state away."""
from __future__ import annotations

import json
import logging
import os

import pytest
import yaml

from agent.k8s.directory import DirectorySource
from agent.k8s.model import Action, Kind
from agent.k8s import open_source
from agent.k8s.store import Store
from tests.k8s.k8sdata import NAMESPACE, POD, POLICY, SERVICE, SLICE, clone, wait_for


def write(path, *docs, raw: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw if raw is not None else yaml.safe_dump_all(list(docs)))


def svc(name: str, port: int = 80, ip: str = "172.16.0.10") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": ip, "ports": [{"port": port}]}}


@pytest.fixture
def src(tmp_path, metrics):
    """A directory source that only scans when the test says so (no timing races)."""
    store = Store()
    s = DirectorySource(str(tmp_path), store, metrics=metrics, interval=3600)
    yield s
    s.stop()


def started(s: DirectorySource) -> DirectorySource:
    s.start()
    assert s.synced.is_set()
    return s


def services(s: DirectorySource) -> dict:
    return {k[1]: v for k, v in s.store.snapshot().services.items()}


def test_loads_every_kind_from_multi_document_yaml_and_json(tmp_path, src):
    write(tmp_path / "a.yaml", NAMESPACE, POD, SERVICE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(json.dumps([SLICE, POLICY]))
    started(src)
    counts = src.store.snapshot().counts()
    assert counts == {Kind.NAMESPACE: 1, Kind.NODE: 0, Kind.POD: 1, Kind.SERVICE: 1,
                      Kind.ENDPOINT_SLICE: 1, Kind.NETWORK_POLICY: 1}
    assert src.store.version == 1  # the whole initial load is one ChangeSet


def test_kind_list_and_unsupported_kinds(tmp_path, src, caplog):
    write(tmp_path / "list.yaml", {"apiVersion": "v1", "kind": "List", "items": [
        svc("a"), {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}]})
    with caplog.at_level(logging.INFO, "fastpath.k8s"):
        started(src)
    assert set(services(src)) == {"a"}
    assert "1 of other kinds ignored" in caplog.text and src.rejected() == []


def test_pods_take_their_ips_from_the_documented_annotation_and_default_namespace(tmp_path, src):
    write(tmp_path / "p.yaml", {"apiVersion": "v1", "kind": "Pod",
                                "metadata": {"name": "p", "annotations": {"fastpath.io/pod-ips": "10.1.2.3"}},
                                "spec": {"containers": [{"name": "c"}]}})
    started(src)
    (pod,) = src.store.snapshot().pods.values()
    assert pod.key == ("default", "p") and pod.ips == ("10.1.2.3",)


def test_file_create_modify_delete_are_applied(tmp_path, src):
    started(src)
    write(tmp_path / "a.yaml", svc("a"))
    assert src.scan() and services(src)["a"].ports[0].port == 80
    write(tmp_path / "a.yaml", svc("a", port=8080), svc("b"))
    assert src.scan()
    assert services(src)["a"].ports[0].port == 8080 and "b" in services(src)
    os.remove(tmp_path / "a.yaml")
    assert src.scan() and services(src) == {}
    assert not src.scan()  # nothing changed since


def test_a_rename_moves_objects_without_any_delta(tmp_path, src):
    write(tmp_path / "a.yaml", svc("a"))
    started(src)
    sub = src.store.subscribe()
    os.rename(tmp_path / "a.yaml", tmp_path / "renamed.yml")
    assert src.scan()
    assert sub.drain() == [] and "a" in services(src)
    assert src._owner[(Kind.SERVICE, ("shop", "a"))] == "renamed.yml"


def test_moving_an_object_between_files_is_one_modification(tmp_path, src):
    write(tmp_path / "a.yaml", svc("a"))
    started(src)
    sub = src.store.subscribe()
    os.remove(tmp_path / "a.yaml")
    write(tmp_path / "b.yaml", svc("a", port=81))
    src.scan()
    (cs,) = sub.drain()
    assert [(d.action, d.key) for d in cs.deltas] == [(Action.MODIFIED, ("shop", "a"))]


def test_a_malformed_file_among_good_ones_is_rejected_alone(tmp_path, src, caplog):
    write(tmp_path / "1.yaml", svc("one"))
    write(tmp_path / "2.yaml", raw="apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n")
    write(tmp_path / "3.yaml", svc("three", ip="172.16.0.13"))
    with caplog.at_level(logging.WARNING, "fastpath.k8s"):
        started(src)
    assert set(services(src)) == {"one", "three"}
    assert "2.yaml" in caplog.text and "cannot decode" in caplog.text
    (err,) = src.rejected()
    assert err.kind == "Manifest" and err.origin == "2.yaml"
    assert src.metrics.rejected.labels(source="directory", kind="Manifest")._value.get() == 1


def test_a_file_that_breaks_keeps_its_last_good_objects(tmp_path, src):
    write(tmp_path / "a.yaml", svc("a"), svc("b", ip="172.16.0.11"))
    started(src)
    write(tmp_path / "a.yaml", raw="{{{ not yaml")
    src.scan()
    assert set(services(src)) == {"a", "b"}
    write(tmp_path / "a.yaml", svc("a"))  # fixed, and b removed on purpose
    src.scan()
    assert set(services(src)) == {"a"} and src.rejected() == []


def test_an_invalid_object_keeps_its_previous_version_and_others_still_apply(tmp_path, src, caplog):
    write(tmp_path / "a.yaml", svc("a", port=80), svc("b", ip="172.16.0.11"))
    started(src)
    with caplog.at_level(logging.WARNING, "fastpath.k8s"):
        write(tmp_path / "a.yaml", svc("a", port=70000), svc("b", port=443, ip="172.16.0.11"))
        src.scan()
    assert services(src)["a"].ports[0].port == 80      # last good version
    assert services(src)["b"].ports[0].port == 443     # the good edit applied
    assert "Service shop/a: spec.ports[0].port: 70000 is out of range" in caplog.text
    assert "(in a.yaml)" in caplog.text and "keeping its previous version" in caplog.text
    assert [e.field for e in src.rejected()] == ["spec.ports[0].port"]


def test_a_new_invalid_object_is_not_loaded(tmp_path, src):
    write(tmp_path / "a.yaml", svc("a", ip="not-an-ip"))
    started(src)
    assert services(src) == {} and src.rejected()[0].field == "spec.clusterIPs[0]"


def test_a_duplicate_in_another_file_is_rejected_naming_both_files(tmp_path, src, caplog):
    write(tmp_path / "a.yaml", svc("dup", port=80))
    started(src)
    with caplog.at_level(logging.WARNING, "fastpath.k8s"):
        write(tmp_path / "b.yaml", svc("dup", port=9999))
        src.scan()
    assert services(src)["dup"].ports[0].port == 80
    line = next(r.getMessage() for r in caplog.records if "dup" in r.getMessage())
    assert "a.yaml" in line and "b.yaml" in line
    # When the first file drops it, the other definition takes over.
    os.remove(tmp_path / "a.yaml")
    src.scan()
    assert services(src)["dup"].ports[0].port == 9999


def test_a_duplicate_inside_one_file_keeps_the_first(tmp_path, src):
    write(tmp_path / "a.yaml", svc("dup", port=80), svc("dup", port=81))
    started(src)
    assert services(src)["dup"].ports[0].port == 80
    assert "defined twice" in src.rejected()[0].message


def test_hidden_files_and_other_extensions_are_ignored(tmp_path, src):
    write(tmp_path / ".a.yaml.swp", svc("swap"))
    write(tmp_path / "..data" / "x.yaml", svc("configmap-link"))
    write(tmp_path / "notes.txt", svc("txt"))
    started(src)
    assert services(src) == {}


def test_a_same_size_rewrite_within_one_clock_tick_is_still_seen(tmp_path, src):
    f = tmp_path / "a.yaml"
    write(f, svc("a", port=81))
    started(src)
    st = os.stat(f)
    write(f, svc("a", port=82))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # identical stat, new content
    assert os.stat(f).st_size == st.st_size
    src.scan()
    assert services(src)["a"].ports[0].port == 82


def test_the_polling_thread_picks_changes_up_by_itself(tmp_path, metrics):
    store = Store()
    src = open_source(str(tmp_path), "node-1", store, metrics=metrics, interval=0.02)
    try:
        assert src.synced.is_set()
        write(tmp_path / "a.yaml", svc("a"))
        wait_for(lambda: store.snapshot().services, timeout=5)
        st = src.status()
        assert st["synced"] and st["connected"] and st["kinds"]["Service"]["last_sync"]
    finally:
        src.stop()


def test_a_missing_directory_is_an_error_at_open(tmp_path, metrics):
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "nope"), "", Store(), metrics=metrics)


def test_metrics_follow_the_store(tmp_path, src):
    write(tmp_path / "a.yaml", svc("a"), clone(NAMESPACE))
    started(src)
    m = src.metrics
    assert m.objects.labels(kind="Service")._value.get() == 1
    assert m.changes.labels(kind="Namespace", action="ADDED")._value.get() == 1
    assert m.files._value.get() == 1 and m.synced._value.get() == 1
