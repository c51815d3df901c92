"""The manifest-directory source: files come, change, move and go; bad ones never
half-apply and never take good state away."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

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
    s = DirectorySource(str(tmp_path), store, metrics=metrics, interval=3600, watch=False)
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
    src = open_source(str(tmp_path), "node-1", store, metrics=metrics, interval=0.02,
                      directory_watch=False)
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


# -- a directory that fights back: link loops, aliases, FIFOs, bounds ----------------------

def _loops_in_a_child(root: str, conn) -> None:
    """Runs in a forked child (the parent kills it if it does not finish):
    the source on `root`, polling every 0.1 s, with every file open and
    every log record counted."""
    import builtins
    import resource
    from prometheus_client import CollectorRegistry
    from agent.k8s.metrics import K8sMetrics
    # a runaway walk must not take the machine's memory with it
    vsz = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsz + (768 << 20), vsz + (768 << 20)))
    reads: dict[str, int] = {}
    real_open, real_os_open = builtins.open, os.open

    def count(path):
        p = os.path.realpath(path)
        if isinstance(path, (str, bytes, os.PathLike)) and p.startswith(root):
            reads[p] = reads.get(p, 0) + 1

    def counting_open(path, *a, **kw):
        count(path)
        return real_open(path, *a, **kw)

    def counting_os_open(path, *a, **kw):
        count(path)
        return real_os_open(path, *a, **kw)

    builtins.open, os.open = counting_open, counting_os_open
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))

    k8s_log = logging.getLogger("fastpath.k8s")
    k8s_log.addHandler(Keep())
    k8s_log.setLevel(logging.INFO)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = Store()
    t0 = time.monotonic()
    src = DirectorySource(root, store, metrics=K8sMetrics(CollectorRegistry()), interval=0.1)
    src.start()
    first = time.monotonic() - t0
    time.sleep(1.0)                                         # ten polls
    builtins.open, os.open = real_open, real_os_open
    settled = dict(reads)
    write(Path(root) / "sub" / "new.yaml", svc("new", ip="172.16.0.99"))
    t1 = time.monotonic()
    while ("shop", "new") not in store.snapshot().services and time.monotonic() - t1 < 10:
        time.sleep(0.01)
    applied = time.monotonic() - t1
    time.sleep(0.5)
    src.stop()
    conn.send({"first_scan_s": first, "new_service_s": applied, "reads": settled,
               "rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0,
               "records": records, "status": src.status(),
               "services": sorted(k[1] for k in store.snapshot().services),
               "files": src.metrics.files._value.get(),
               "problems_metric": src.metrics.manifest_problems._value.get()})
    conn.close()


def test_link_loops_and_aliases_cost_one_read_per_file_and_one_report_each(tmp_path):
    """Two loops to the root (a -> ., b -> .), one to a parent (sub/up -> ..),
    a second path to a directory (c -> sub), a second path to a file and a
    FIFO named like a manifest: every real file is read once, each problem
    is logged once, a new Service is applied on the next poll, memory and
    log stay bounded, and the status says degraded, not synced."""
    import multiprocessing
    from agent.daemon.agent import source_state
    root = tmp_path / "m"
    write(root / "a.yaml", svc("a"))
    write(root / "sub" / "b.yaml", svc("b", ip="172.16.0.11"))
    write(root / "sub" / "deeper" / "c.yaml", svc("c", ip="172.16.0.12"))
    (root / "a").symlink_to(".")
    (root / "b").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    (root / "c").symlink_to("sub")
    (root / "same.yaml").symlink_to("a.yaml")
    os.mkfifo(root / "pipe.yaml")
    for f in (root / "a.yaml", root / "sub" / "b.yaml", root / "sub" / "deeper" / "c.yaml"):
        os.utime(f, (time.time() - 60, time.time() - 60))     # written a while ago
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_loops_in_a_child, args=(str(root), child))
    p.start()
    child.close()
    got = parent.recv() if parent.poll(30) else None
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    assert got is not None, "the scan did not finish within 30 s"
    print({k: v for k, v in got.items() if k not in ("records", "status")})
    real = {str(root / "a.yaml"), str(root / "sub" / "b.yaml"),
            str(root / "sub" / "deeper" / "c.yaml")}
    assert {p: n for p, n in got["reads"].items() if p in real} == {p: 1 for p in real}
    assert got["first_scan_s"] < 2.0
    assert got["new_service_s"] < 1.0, "a new Service waits for the next poll, no longer"
    assert got["services"] == ["a", "b", "c", "new"]
    assert got["rss_growth_kib"] < 20 << 10
    warnings = [m for lvl, m in got["records"] if lvl == "WARNING"]
    expected = {"a is a loop back to .", "b is a loop back to .", "sub/up is a loop back to .",
                "c is another path to sub", "same.yaml is another path to a.yaml",
                "pipe.yaml is not a regular file"}
    for words in expected:
        assert sum(words in w for w in warnings) == 1, (words, warnings)
    assert len(warnings) == len(expected), warnings
    assert len(got["records"]) < 20, got["records"]
    st = got["status"]
    assert st["synced"] and len(st["problems"]) == len(expected) == got["problems_metric"]
    assert source_state({"synced": st["synced"], "status": st}) == "degraded"
    assert got["files"] == 4


def test_a_directory_that_vanishes_keeps_its_objects_and_the_source_says_so(tmp_path, metrics,
                                                                          caplog):
    from agent.daemon.agent import source_state
    root = tmp_path / "m"
    write(root / "a.yaml", svc("a"))
    write(root / "sub" / "b.yaml", svc("b", ip="172.16.0.11"))
    src = started(DirectorySource(str(root), Store(), metrics=metrics, interval=3600,
                                  watch=False))
    try:
        state = lambda: source_state({"synced": src.synced.is_set(), "status": src.status()})
        assert state() == "synced"
        os.rename(root, tmp_path / "elsewhere")
        with caplog.at_level(logging.INFO, "fastpath.k8s"):
            for _ in range(5):
                src.scan()
        assert set(services(src)) == {"a", "b"}, "a vanished directory deleted its objects"
        assert state() == "degraded"
        assert src.status()["problems"] == [f"cannot read {root}: No such file or directory; "
                                            "keeping its objects"]
        assert caplog.text.count("cannot read") == 1, "reported once, not per poll"
        # what `fastpath status` prints of it
        from agent.cli.views import render_status
        shown = render_status({
            "agent": {"reachable": True, "ready": True, "started_at": 0, "pid": 1,
                      "endpoints": 0, "enis": []},
            "source": {"state": state(), "spec": str(root), "status": src.status()},
            "kernel": {"release": "6.1", "btf": True, "map_types": {}, "helpers": {},
                       "bpf_stats_enabled": False},
            "bpffs_root": "/sys/fs/bpf/fastpath", "maps": [], "pressure": [], "config": {},
            "config_sources": {}, "config_from": "defaults"})
        assert f"source:   degraded ({root}" in shown
        assert f"  problem: cannot read {root}: No such file or directory" in shown
        os.rename(tmp_path / "elsewhere", root)
        (root / "a.yaml").unlink()
        with caplog.at_level(logging.INFO, "fastpath.k8s"):
            src.scan()
        assert set(services(src)) == {"b"} and state() == "synced"
        assert "no longer: cannot read" in caplog.text
    finally:
        src.stop()


def test_scan_bounds_stop_the_walk_without_removing_anything(tmp_path, metrics, monkeypatch):
    from agent.k8s import directory
    root = tmp_path / "m"
    for i in range(6):
        write(root / f"d{i}" / "x.yaml", svc(f"s{i}", ip=f"172.16.0.{20 + i}"))
    write(root / "big.yaml", svc("big", ip="172.16.0.40"))
    src = started(DirectorySource(str(root), Store(), metrics=metrics, interval=3600,
                                  watch=False))
    try:
        assert len(services(src)) == 7
        monkeypatch.setattr(directory, "MAX_DIRS", 3)
        monkeypatch.setattr(directory, "MAX_FILE_BYTES", 64)
        (root / "big.yaml").write_text(yaml.safe_dump(svc("big", ip="172.16.0.41")) + "#" * 100)
        src.scan()
        probs = src.status()["problems"]
        assert any("more than 3 directories" in p for p in probs), probs
        assert any("cannot read big.yaml" in p and "keeping its objects" in p for p in probs)
        # nothing the bounded walk did not see is removed; the big file keeps its version
        assert len(services(src)) == 7
        assert services(src)["big"].cluster_ips == ("172.16.0.40",)
        monkeypatch.undo()
        src.scan()
        assert src.status()["problems"] == []
        assert services(src)["big"].cluster_ips == ("172.16.0.41",)
    finally:
        src.stop()
