"""Fixtures for the cluster-state tests."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from agent.k8s.metrics import K8sMetrics


@pytest.fixture
def metrics():
    """Metrics on a private registry, so tests never collide on the default one."""
    return K8sMetrics(CollectorRegistry())


@pytest.fixture
def fake():
    """The fake API server on an ephemeral loopback port, with a small cluster."""
    from agent.k8s.testing.fakeapi import FakeAPIServer
    from agent.k8s.testing.objects import populate
    f = FakeAPIServer()
    f.apply_many(populate(services=20, endpoints=200, pods=40, nodes=3, namespaces=4,
                          policies=2, slice_size=50))
    f.start()
    yield f
    f.stop()


@pytest.fixture
def kube(fake, metrics):
    """Factory: a started Kubernetes source on the fake server, driven through
    the official client, with fast backoff so failure tests stay quick."""
    from agent.k8s.kube import KubernetesSource, make_api_client
    from agent.k8s.store import Store
    made = []

    def make(**kw):
        kw.setdefault("backoff_initial", 0.02)
        kw.setdefault("backoff_cap", 0.2)
        src = KubernetesSource(Store(), api_client=make_api_client(host=fake.url),
                               metrics=metrics, **kw)
        made.append(src)
        return src.start()

    yield make
    for s in made:
        s.stop()
