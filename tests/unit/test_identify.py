"""CNI ADD's identity step (Agent._identify): a new pod's labels from the
store, else from its source asked for that one Pod, for a bounded time."""
from __future__ import annotations

import time
from types import SimpleNamespace

from agent.daemon.agent import Agent
from agent.config import Config
from agent.k8s.store import Store
from agent.policy import Mode
from tests.policy.kube import pod


class Source:
    kind_name = "kubernetes"

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    def lookup_pod(self, ns, name, timeout):
        self.calls.append((ns, name, timeout))
        a = self.answers.pop(0) if self.answers else None
        if isinstance(a, Exception):
            raise a
        if callable(a):
            return a()
        return a


def agent_with(source, store=None, timeout_ms=500, mode="default"):
    a = Agent.__new__(Agent)
    a.config = Config.defaults().replace(policy_pod_lookup_timeout_ms=timeout_ms,
                                         policy_enforcement=mode)
    a.store = store or Store()
    a.source = source
    a.policy = SimpleNamespace(mode=Mode(mode))
    return a


def test_the_store_answers_without_asking_the_source():
    store = Store()
    store.apply(upserts=[pod("x", "web", None, labels={"app": "web"})])
    src = Source([])
    assert agent_with(src, store)._identify("x", "web") == (None, "store")
    assert src.calls == []


def test_a_pod_the_store_lacks_is_fetched():
    p = pod("x", "web", None, labels={"app": "web"})
    src = Source([p])
    fetched, how = agent_with(src)._identify("x", "web")
    assert fetched is p and how == "kubernetes" and len(src.calls) == 1
    assert 0 < src.calls[0][2] <= 0.5


def test_a_source_without_the_pod_gives_the_safe_state_at_once():
    src = Source([None])
    t0 = time.monotonic()
    fetched, how = agent_with(src, timeout_ms=5000)._identify("x", "web")
    assert fetched is None and how.startswith("unknown (kubernetes has no Pod x/web")
    assert time.monotonic() - t0 < 0.5 and len(src.calls) == 1


def test_an_unanswered_lookup_is_asked_again_while_time_is_left():
    p = pod("x", "web", None, labels={"app": "web"})
    src = Source([OSError("connection refused"), TimeoutError("read timed out"), p])
    fetched, how = agent_with(src, timeout_ms=2000)._identify("x", "web")
    assert fetched is p and len(src.calls) == 3


def test_the_wait_is_bounded_by_the_configured_timeout():
    src = Source([OSError("down")] * 1000)
    t0 = time.monotonic()
    fetched, how = agent_with(src, timeout_ms=300)._identify("x", "web")
    took = time.monotonic() - t0
    assert fetched is None and "OSError: down" in how
    assert 0.29 <= took < 0.6, took


def test_a_rescan_that_puts_the_pod_in_the_store_is_the_store_answering():
    store = Store()
    p = pod("x", "web", None, labels={"app": "web"})

    def rescan():
        store.apply(upserts=[p])
        return p
    assert agent_with(Source([rescan]), store)._identify("x", "web") == (None, "store")


def test_no_lookup_without_a_pod_name_or_without_enforcement():
    src = Source([])
    assert agent_with(src)._identify("", "")[0] is None
    assert agent_with(src, mode="never")._identify("x", "web") == (None, "not needed")
    assert src.calls == []
