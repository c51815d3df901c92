"""The manifest directory followed with inotify: a change is read at once,
not at the next poll; a burst of changes is one scan; renames, replaced
directories, files behind links and a ConfigMap's `..data` swap are all
seen; and where inotify is missing or runs out of watches, the poll still
finds everything (and the status says which it is).

The sources here poll once an hour unless a test is about polling, so what
they see in seconds they saw through inotify."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import threading
import time

import pytest
import yaml

from agent.k8s import inotify
from agent.k8s.directory import DirectorySource
from agent.k8s.store import Store
from tests.k8s.k8sdata import wait_for

NEVER = 3600.0


def svc(name: str, port: int = 80, ip: str = "172.16.0.10") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": ip, "ports": [{"port": port}]}}


def write(path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))


def services(src) -> dict:
    return {k[1]: v for k, v in src.store.snapshot().services.items()}


def port_of(src, name):
    s = services(src).get(name)
    return s.ports[0].port if s is not None else None


@pytest.fixture
def watched(tmp_path, metrics):
    made = []

    def make(root=None, **kw):
        kw.setdefault("interval", NEVER)
        s = DirectorySource(str(root or tmp_path), Store(), metrics=metrics, **kw).start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def test_a_change_is_read_at_once_not_at_the_next_poll(tmp_path, watched):
    src = watched()
    assert src.status()["watch"] == f"inotify (1 path), polling every {NEVER:g}s as well"
    from agent.cli.views import render_status
    shown = render_status({
        "agent": {"reachable": True, "ready": True, "started_at": 0, "pid": 1,
                  "endpoints": 0, "enis": []},
        "source": {"state": "synced", "spec": str(tmp_path), "status": src.status()},
        "kernel": {"release": "6.1", "btf": True, "map_types": {}, "helpers": {},
                   "bpf_stats_enabled": False},
        "bpffs_root": "/sys/fs/bpf/fastpath", "maps": [], "pressure": [], "config": {},
        "config_sources": {}, "config_from": "defaults"})
    assert f"  watch: inotify (1 path), polling every {NEVER:g}s as well" in shown
    write(tmp_path / "a.yaml", svc("a"))
    wait_for(lambda: "a" in services(src), timeout=5)
    write(tmp_path / "a.yaml", svc("a", port=81))
    wait_for(lambda: port_of(src, "a") == 81, timeout=5)
    (tmp_path / "a.yaml").unlink()
    wait_for(lambda: not services(src), timeout=5)


def test_a_burst_of_writes_costs_a_few_scans_not_one_per_write(tmp_path, watched):
    src = watched()
    scans, version = src.scans, src.store.version
    for i in range(40):
        write(tmp_path / f"s{i:02d}.yaml", svc(f"s{i:02d}", ip=f"172.16.1.{i + 1}"))
    wait_for(lambda: len(services(src)) == 40, timeout=5)
    time.sleep(0.2)          # nothing more comes of the burst
    assert src.scans - scans <= 8, f"{src.scans - scans} scans for 40 writes"
    assert src.store.version - version <= src.scans - scans


def test_wait_returns_once_events_stop_and_never_later_than_max_delay(tmp_path):
    w = inotify.Watcher(quiet=0.2, max_delay=5.0)
    try:
        w.follow([str(tmp_path)])
        stamps = []

        def writes(n, gap):
            for i in range(n):
                (tmp_path / f"f{len(stamps)}").write_text("x")
                stamps.append(time.monotonic())
                time.sleep(gap)
        t = threading.Thread(target=writes, args=(5, 0.02))
        t.start()
        assert w.wait(5.0)
        returned = time.monotonic()
        t.join()
        assert returned >= stamps[-1], "returned while the burst was still going"
        assert not w.wait(0.1), "events of the burst were left for the next wait"
    finally:
        w.close()
        w.release()

    w = inotify.Watcher(quiet=0.5, max_delay=0.3)
    try:
        w.follow([str(tmp_path)])
        stop = threading.Event()

        def steady():
            while not stop.is_set():
                (tmp_path / "steady").write_text("x")
                time.sleep(0.01)
        t = threading.Thread(target=steady)
        t0 = time.monotonic()
        t.start()
        try:
            assert w.wait(10.0)
            assert time.monotonic() - t0 < 5.0, "a steady stream of events held the scan back"
        finally:
            stop.set()
            t.join()
    finally:
        w.close()
        w.release()


def test_a_file_renamed_into_place_is_read(tmp_path, watched):
    src = watched()
    tmp = tmp_path / ".a.yaml.tmp"
    write(tmp, svc("a"))
    time.sleep(0.1)
    assert not services(src), "a hidden file was read"
    os.replace(tmp, tmp_path / "a.yaml")
    wait_for(lambda: "a" in services(src), timeout=5)
    version = src.store.version
    os.replace(tmp_path / "a.yaml", tmp_path / "b.yaml")      # a rename changes no object
    wait_for(lambda: src._files.keys() == {"b.yaml"}, timeout=5)
    assert src.store.version == version and "a" in services(src)


def test_a_replaced_directory_is_watched_again(tmp_path, watched):
    write(tmp_path / "sub" / "a.yaml", svc("a"))
    src = watched()
    assert "a" in services(src)
    shutil.rmtree(tmp_path / "sub")
    write(tmp_path / "sub" / "b.yaml", svc("b", ip="172.16.0.11"))
    wait_for(lambda: set(services(src)) == {"b"}, timeout=5)
    # the new directory's own changes arrive: its inode is the one watched now
    write(tmp_path / "sub" / "b.yaml", svc("b", port=82, ip="172.16.0.11"))
    wait_for(lambda: port_of(src, "b") == 82, timeout=5)
    write(tmp_path / "sub" / "deeper" / "c.yaml", svc("c", ip="172.16.0.12"))
    wait_for(lambda: "c" in services(src), timeout=5)
    write(tmp_path / "sub" / "deeper" / "c.yaml", svc("c", port=83, ip="172.16.0.12"))
    wait_for(lambda: port_of(src, "c") == 83, timeout=5)
    assert src.status()["watch"].startswith("inotify (3 paths)")


def test_a_file_behind_a_link_is_watched_where_it_lives(tmp_path, watched):
    outside, root = tmp_path / "outside", tmp_path / "m"
    write(outside / "real.yaml", svc("a"))
    root.mkdir()
    (root / "a.yaml").symlink_to(outside / "real.yaml")
    src = watched(root)
    assert "a" in services(src)
    write(outside / "real.yaml", svc("a", port=84))
    wait_for(lambda: port_of(src, "a") == 84, timeout=5)


def test_a_configmap_update_swapping_its_data_link_is_read(tmp_path, watched):
    """How the kubelet updates a mounted ConfigMap: a new timestamped
    directory, a new `..data` link renamed over the old one; the visible
    names are links through `..data`."""
    root = tmp_path / "cm"
    write(root / "..2024_01" / "p.yaml", svc("a"))
    (root / "..data").symlink_to("..2024_01")
    (root / "p.yaml").symlink_to("..data/p.yaml")
    src = watched(root)
    assert port_of(src, "a") == 80
    write(root / "..2024_02" / "p.yaml", svc("a", port=85))
    (root / "..data_tmp").symlink_to("..2024_02")
    os.replace(root / "..data_tmp", root / "..data")
    shutil.rmtree(root / "..2024_01")
    wait_for(lambda: port_of(src, "a") == 85, timeout=5)


def test_without_inotify_the_source_polls_and_says_so_once(tmp_path, watched, monkeypatch,
                                                           caplog):
    def unavailable(*a, **kw):
        raise inotify.Unavailable(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(inotify, "Watcher", unavailable)
    with caplog.at_level(logging.INFO, "fastpath.k8s"):
        src = watched(interval=0.05)
        write(tmp_path / "a.yaml", svc("a"))
        wait_for(lambda: "a" in services(src), timeout=5)
        write(tmp_path / "a.yaml", svc("a", port=86))
        wait_for(lambda: port_of(src, "a") == 86, timeout=5)
    assert src.status()["watch"] == ("polling every 0.05s: inotify is not available "
                                     "(Too many open files)")
    assert caplog.text.count("inotify is not available") == 1


class _FullLibc:
    """libc whose inotify has no watch left (ENOSPC), as with a node's
    fs.inotify.max_user_watches used up; `full` can be turned off."""

    def __init__(self):
        self.real = inotify._libc()
        self.full = True

    def inotify_init1(self, flags):
        return self.real.inotify_init1(flags)

    def inotify_add_watch(self, fd, path, mask):
        if self.full:
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return self.real.inotify_add_watch(fd, path, mask)

    def inotify_rm_watch(self, fd, wd):
        return self.real.inotify_rm_watch(fd, wd)


def test_out_of_watches_the_poll_covers_and_the_status_says_so(tmp_path, watched, monkeypatch,
                                                              caplog):
    libc = _FullLibc()
    real = inotify.Watcher
    monkeypatch.setattr(inotify, "Watcher", lambda: real(libc=libc))
    with caplog.at_level(logging.INFO, "fastpath.k8s"):
        src = watched(interval=0.05)
        write(tmp_path / "a.yaml", svc("a"))
        wait_for(lambda: "a" in services(src), timeout=5)
        time.sleep(0.2)                     # several polls: reported once
    assert "inotify watch limit is reached" in src.status()["watch"]
    assert caplog.text.count("inotify watch limit is reached") == 1
    # new directories change the count of watches, not what is logged
    write(tmp_path / "sub" / "b.yaml", svc("b", ip="172.16.0.11"))
    wait_for(lambda: "b" in services(src), timeout=5)
    assert caplog.text.count("inotify watch limit is reached") == 1
    libc.full = False
    wait_for(lambda: src.status()["watch"] == "inotify (2 paths), polling every 0.05s as well",
             timeout=5)


def test_stopping_the_source_gives_its_inotify_descriptors_back(tmp_path, metrics):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        src = DirectorySource(str(tmp_path), Store(), metrics=metrics, interval=NEVER).start()
        assert src.status()["watch"].startswith("inotify")
        src.stop()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_stopped_source_returns_at_once_from_its_wait(tmp_path, metrics):
    src = DirectorySource(str(tmp_path), Store(), metrics=metrics, interval=NEVER).start()
    t0 = time.monotonic()
    src.stop()
    assert time.monotonic() - t0 < 2.0 and not src._thread.is_alive()
