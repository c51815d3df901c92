"""Source plumbing: backoff, open_source, the standalone runner, layering."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import yaml

from agent.k8s.kube import KubernetesSource, make_api_client
from agent.k8s import open_source
from agent.k8s.source import Backoff
from agent.k8s.store import Store
from tests.k8s.k8sdata import ALL_VALID

ROOT = Path(__file__).resolve().parents[2]


def test_backoff_grows_exponentially_is_capped_and_jittered():
    b = Backoff(initial=1.0, cap=8.0, rng=random.Random(1))
    delays = [b.next() for _ in range(8)]
    for n, d in enumerate(delays):
        ceiling = min(8.0, 2 ** n)
        assert ceiling / 2 <= d <= ceiling
    assert len({round(d, 6) for d in delays[4:]}) > 1  # capped, yet not in lockstep
    b.reset()
    assert b.next() <= 1.0


def test_open_source_picks_the_kubernetes_source_by_name(fake, metrics):
    src = open_source("kubernetes", "", Store(), metrics=metrics,
                      api_client=make_api_client(host=fake.url))
    try:
        assert isinstance(src, KubernetesSource) and src.synced.wait(10)
    finally:
        src.stop()


def test_runner_loads_a_directory_and_logs_objects_and_rejections(tmp_path):
    good = [dict(o) for o in ALL_VALID]
    (tmp_path / "good.yaml").write_text(yaml.safe_dump_all(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "x"},
         "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 99999}]}}))
    r = subprocess.run([sys.executable, "-m", "agent.k8s", "--source", str(tmp_path), "--once"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = r.stderr
    assert r.returncode == 2, out
    assert ("cluster state: namespaces=1 nodes=1 pods=1 services=1 endpointslices=1 "
            "endpoints=4 networkpolicies=1") in out
    assert "Pod (1): shop/web-1" in out and "NetworkPolicy (1): shop/db" in out
    assert "rejected: Service x/bad: spec.ports[0].port: 99999 is out of range" in out
    assert "(in bad.yaml)" in out


def test_runner_exits_zero_for_a_clean_directory(tmp_path):
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump_all([dict(o) for o in ALL_VALID]))
    r = subprocess.run([sys.executable, "-m", "agent.k8s", "--source", str(tmp_path), "--once"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_pure_modules_import_no_client_exporter_or_kernel_library():
    code = ("import sys, agent.k8s.model, agent.k8s.parse, agent.k8s.store;"
            "bad = [m for m in ('kubernetes', 'grpc', 'bcc', 'pyroute2', 'prometheus_client')"
            " if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_directory_mode_does_not_import_the_kubernetes_client(tmp_path):
    code = ("import sys; from agent.k8s import Store, open_source;"
            f"s = open_source({str(tmp_path)!r}, '', Store()); s.stop();"
            "print('kubernetes' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "False", r.stdout + r.stderr
