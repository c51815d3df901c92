"""The agent's metrics without a kernel: what the agent records (syncs,
conntrack GC, restores, CNI results) and what it reads from itself at
scrape time (Services, NetworkPolicy status), through the text exposition
and Prometheus' own parser. The kernel-side families (counters, maps,
conntrack) are checked against a running agent in vm-tests/test_node_agent.py."""
from __future__ import annotations

import threading
import types

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.api.server import ApiError
from agent.daemon.metrics import SYNC_KINDS, AgentMetrics, cni_observed


class FakeAgent:
    def __init__(self):
        self.endpoints = {"c1-eth0": object(), "c2-eth0": object()}
        self.ready = threading.Event()
        self.datapath = types.SimpleNamespace(module=None, maps=None)
        self.services = None
        self.metrics = None


def scrape(metrics: AgentMetrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict, name: str, **labels) -> float:
    for got, v in samples[name]:
        if got == labels:
            return v
    raise LookupError(f"{name} {labels}: {samples.get(name)}")


def test_sync_results_per_kind_and_conntrack_gc_are_counted():
    agent = FakeAgent()
    m = AgentMetrics(agent)
    s = scrape(m)
    # every kind and reason is there from the start, at zero, so rate() and
    # alerts work before the first error
    for kind in SYNC_KINDS:
        assert value(s, "fastpath_sync_errors_total", kind=kind) == 0
    assert value(s, "fastpath_conntrack_gc_runs_total") == 0
    m.observe_sync("Service", 0.003, ops=7)
    m.observe_sync("Service", 0.2, ok=False)
    m.observe_gc(0.05, 12)
    m.observe_gc(0.04, 0)
    m.observe_backend_flows_removed(4)
    s = scrape(m)
    assert value(s, "fastpath_sync_duration_seconds_count", kind="Service") == 2
    assert value(s, "fastpath_sync_duration_seconds_bucket", kind="Service", le="0.005") == 1
    assert value(s, "fastpath_sync_errors_total", kind="Service") == 1
    assert value(s, "fastpath_sync_errors_total", kind="NetworkPolicy") == 0
    assert value(s, "fastpath_sync_map_operations_total", kind="Service") == 7
    assert value(s, "fastpath_conntrack_gc_runs_total") == 2
    assert value(s, "fastpath_conntrack_gc_last_duration_seconds") == 0.04
    assert value(s, "fastpath_conntrack_gc_deleted_entries_total", reason="idle") == 12
    assert value(s, "fastpath_conntrack_gc_deleted_entries_total", reason="backend-removed") == 4


def test_service_counts_come_from_what_the_service_maps_were_synced_to():
    agent = FakeAgent()
    m = AgentMetrics(agent)
    assert "fastpath_services" not in scrape(m), "no service sync: no count, not a zero"
    agent.services = types.SimpleNamespace(reconciler=types.SimpleNamespace(
        frontends=lambda: {"a": 1, "b": 2, "c": 3}, backend_ids=[1, 2, 3, 4, 5]),
        refused={("shop", "big"): None}, conflicts=[], retry_at=None)
    s = scrape(m)
    assert value(s, "fastpath_services") == 3
    assert value(s, "fastpath_service_backends") == 5
    assert value(s, "fastpath_services_refused") == 1
    assert value(s, "fastpath_hostport_conflicts") == 0
    assert value(s, "fastpath_service_sync_failing") == 0
    agent.services.retry_at = 12.5
    assert value(scrape(m), "fastpath_service_sync_failing") == 1


def test_policy_counts_appear_only_with_the_agents_policy_status():
    agent = FakeAgent()
    m = AgentMetrics(agent)
    s = scrape(m)
    assert not {"fastpath_policies", "fastpath_policy_rules", "fastpath_policy_refused"} & set(s)
    agent.policy_status = lambda: {"policies": 4, "rules": 310, "refused": 1}
    s = scrape(m)
    assert (value(s, "fastpath_policies"), value(s, "fastpath_policy_rules"),
            value(s, "fastpath_policy_refused")) == (4, 310, 1)

    # refused policies are named, one series each; pending pods counted
    agent.policy_status = lambda: {"policies": 4, "rules": 310, "refused": 2,
                                   "refused_policies": {"x/web": 1, "y/db": 3}, "pending": 2}
    s = scrape(m)
    assert value(s, "fastpath_policy_refused") == 2
    assert value(s, "fastpath_policy_refused_pods", namespace="x", policy="web") == 1
    assert value(s, "fastpath_policy_refused_pods", namespace="y", policy="db") == 3
    assert value(s, "fastpath_policy_pending_pods") == 2

    def broken():
        raise RuntimeError("policy state being rebuilt")
    agent.policy_status = broken
    s = scrape(m)        # a failing hook costs its families, not the scrape
    assert "fastpath_policies" not in s and value(s, "fastpath_endpoints") == 2


def test_restore_results_and_starts(tmp_path):
    agent = FakeAgent()
    m = AgentMetrics(agent)
    assert m.count_start(tmp_path) == 1
    m2 = AgentMetrics(agent)
    assert m2.count_start(tmp_path) == 2      # kept in the state dir across starts
    m2.record_restore(5, 1, 2, [
        "pinned fp_ep4_v1_old: max 16384 (compiled 32768): migrated 2 entries field by field",
        "pinned fp_ct4_v1: superseded by fp_ct4_v2: migrated 7 entries field by field",
        "pinned fp_cnt_v1_old: layout unknown (no BTF): entries are rebuilt from agent state",
        "removed stale pinned map fp_gone_v1 (no map of its lineage any more)"])
    s = scrape(m2)
    assert value(s, "fastpath_agent_starts_total") == 2
    assert value(s, "fastpath_agent_restored_endpoints", result="restored") == 5
    assert value(s, "fastpath_agent_restored_endpoints", result="removed") == 1
    assert value(s, "fastpath_agent_replayed_cni_deletions") == 2
    for action in ("resized", "migrated", "rebuilt", "removed"):
        assert value(s, "fastpath_agent_map_migrations", action=action) == 1
    assert value(s, "fastpath_agent_ready") == 0
    agent.ready.set()
    assert value(scrape(m2), "fastpath_agent_ready") == 1


def test_cni_requests_are_counted_by_result_and_timed():
    class Api:
        def __init__(self):
            self.metrics = AgentMetrics(FakeAgent())

        @cni_observed("ADD")
        def add(self, fail: str = ""):
            if fail:
                raise ApiError(fail, "no")
            return {"ip": "10.0.0.1"}

        @cni_observed("DEL")
        def delete(self, known: bool):
            return {"deleted": known}

    api = Api()
    api.add()
    with pytest.raises(ApiError):
        api.add(fail="discovery")
    api.delete(True)
    api.delete(False)
    s = scrape(api.metrics)
    assert value(s, "fastpath_cni_requests_total", command="ADD", result="ok") == 1
    assert value(s, "fastpath_cni_requests_total", command="ADD", result="discovery") == 1
    assert value(s, "fastpath_cni_requests_total", command="DEL", result="ok") == 1
    assert value(s, "fastpath_cni_requests_total", command="DEL", result="unknown") == 1
    assert value(s, "fastpath_cni_request_duration_seconds_count", command="ADD") == 2


def test_endpoint_addresses_are_counted_per_family():
    agent = FakeAgent()
    agent.endpoints = {"c1-eth0": types.SimpleNamespace(ip="10.0.0.1", ip6="fd00::1"),
                       "c2-eth0": types.SimpleNamespace(ip="10.0.0.2", ip6="")}
    s = scrape(AgentMetrics(agent))
    assert value(s, "fastpath_endpoint_addresses", family="ipv4") == 2
    assert value(s, "fastpath_endpoint_addresses", family="ipv6") == 1
    assert value(s, "fastpath_endpoints") == 2
