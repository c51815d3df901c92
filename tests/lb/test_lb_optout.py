"""Socket-LB opt-out by annotation: which local pods bypass socket-LB, and
how the agent keeps the skip map equal to that choice."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from agent.k8s.parse import parse_object
from agent.k8s.store import Store
from agent.lb.optout import SKIP_NAMESPACE, SKIP_POD, decide, opt_outs, touches_opt_out
from agent.daemon.services import SocketLbOptOut

ANN = "fastpath.io/socket-lb"


def namespace(name: str, value: str | None = None) -> dict:
    md = {"name": name}
    if value is not None:
        md["annotations"] = {ANN: value}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": md}


def pod(name: str, ns: str = "shop", value: str | None = None, ip: str = "") -> dict:
    md = {"name": name, "namespace": ns}
    if value is not None:
        md["annotations"] = {ANN: value}
    d = {"apiVersion": "v1", "kind": "Pod", "metadata": md,
         "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]}}
    if ip:
        d["status"] = {"podIP": ip, "podIPs": [{"ip": ip}]}
    return d


@dataclass(frozen=True)
class Ep:
    ip: str
    pod_namespace: str
    pod_name: str
    netns: str = ""

    @property
    def key(self) -> str:
        return f"c-{self.ip}"


def store_of(*objs) -> Store:
    s = Store()
    s.apply(upserts=[parse_object(o) for o in objs])
    return s


def test_namespace_annotations_are_parsed():
    ns = parse_object(namespace("mesh", "disabled"))
    assert ns.annotations[ANN] == "disabled"
    assert dict(parse_object(namespace("plain")).annotations) == {}


@pytest.mark.parametrize("pod_value, ns_value, flags", [
    (None, None, 0),
    ("disabled", None, SKIP_POD),
    (None, "disabled", SKIP_NAMESPACE),
    ("enabled", "disabled", 0),             # the Pod overrides its Namespace
    ("disabled", "enabled", SKIP_POD),
    ("Disabled ", None, SKIP_POD),           # case and blanks do not matter
    (None, "enabled", 0),
])
def test_decide(pod_value, ns_value, flags):
    p = parse_object(pod("p", value=pod_value))
    n = parse_object(namespace("shop", ns_value))
    d = decide(p, n)
    assert d.flags == flags
    assert d.problems == ()


def test_an_unknown_value_is_reported_and_ignored():
    p = parse_object(pod("p", value="off"))
    d = decide(p, parse_object(namespace("shop", "disabled")))
    assert d.flags == SKIP_NAMESPACE      # the typo is ignored, the namespace decides
    assert d.problems == ("pod shop/p: annotation fastpath.io/socket-lb='off' is not one of "
                          "enabled, disabled; ignored",)
    d = decide(p, None)
    assert d.flags == 0 and len(d.problems) == 1


def test_opt_outs_over_endpoints():
    snap = store_of(namespace("mesh", "disabled"), namespace("shop"),
                    pod("a", "shop"), pod("b", "shop", "disabled"),
                    pod("c", "mesh"), pod("d", "mesh", "enabled"),
                    pod("e", "shop", "disabled", ip="10.0.0.5")).snapshot()
    eps = [Ep("10.0.0.1", "shop", "a"), Ep("10.0.0.2", "shop", "b"),
           Ep("10.0.0.3", "mesh", "c"), Ep("10.0.0.4", "mesh", "d"),
           Ep("10.0.0.5", "", ""),                # no name from the CNI: found by IP
           Ep("10.0.0.6", "mesh", "unknown"),     # Pod not seen yet: its Namespace decides
           Ep("10.0.0.7", "other", "x")]          # neither known: socket-LB applies
    got, problems = opt_outs(snap, eps)
    assert got == {"c-10.0.0.2": SKIP_POD, "c-10.0.0.3": SKIP_NAMESPACE,
                   "c-10.0.0.5": SKIP_POD, "c-10.0.0.6": SKIP_NAMESPACE}
    assert problems == []


def test_touches_opt_out():
    s = store_of(namespace("shop"), pod("a"))
    sub = s.subscribe()
    s.apply(upserts=[parse_object(pod("a", value=None) | {"metadata": {
        "name": "a", "namespace": "shop", "labels": {"x": "y"}}})])
    assert not touches_opt_out(sub.get(1).deltas)           # a label change only
    s.apply(upserts=[parse_object(pod("a", value="disabled"))])
    assert touches_opt_out(sub.get(1).deltas)
    s.apply(upserts=[parse_object(namespace("shop", "disabled"))])
    assert touches_opt_out(sub.get(1).deltas)
    s.apply(upserts=[parse_object(pod("new"))])            # a new pod: its namespace may say
    assert touches_opt_out(sub.get(1).deltas)
    sub.close()


class FakeSkipMap:
    def __init__(self):
        self.entries: dict[int, int] = {}
        self.writes = 0

    def get(self):
        return dict(self.entries)

    def set(self, want):
        w = sum(1 for c, f in want.items() if self.entries.get(c) != f)
        r = len(set(self.entries) - set(want))
        self.writes += w + r
        self.entries = dict(want)
        return w, r


def test_the_skip_map_follows_annotations_and_endpoints():
    store = store_of(namespace("shop"), pod("a"), pod("b"))
    eps = [Ep("10.0.0.1", "shop", "a", "/run/netns/a"), Ep("10.0.0.2", "shop", "b", "/run/netns/b")]
    cookies = {"/run/netns/a": 1001, "/run/netns/b": 1002}
    calls = []

    def cookie(path):
        calls.append(path)
        return cookies[path]

    m = FakeSkipMap()
    opt = SocketLbOptOut(m, store, lambda: list(eps), cookie_fn=cookie).start()
    try:
        def wait(want):
            deadline = time.monotonic() + 5
            while m.entries != want and time.monotonic() < deadline:
                time.sleep(0.02)
            assert m.entries == want
        wait({})
        store.apply(upserts=[parse_object(pod("b", value="disabled"))])
        wait({1002: SKIP_POD})
        store.apply(upserts=[parse_object(namespace("shop", "disabled"))])
        wait({1001: SKIP_NAMESPACE, 1002: SKIP_POD})
        store.apply(upserts=[parse_object(pod("a", value="enabled"))])
        wait({1002: SKIP_POD})
        # the endpoint goes away: its entry with it (the agent refreshes on DEL)
        eps.pop()
        assert opt.refresh() == {}
        assert m.entries == {}
        # each netns cookie was looked up once, not at every refresh
        assert sorted(calls) == ["/run/netns/a", "/run/netns/b"]
    finally:
        opt.stop()


def test_an_unreadable_netns_is_skipped_not_fatal():
    store = store_of(namespace("shop", "disabled"), pod("a"), pod("b"))
    eps = [Ep("10.0.0.1", "shop", "a", "/gone"), Ep("10.0.0.2", "shop", "b", "/run/netns/b")]

    def cookie(path):
        if path == "/gone":
            raise FileNotFoundError(2, "No such file or directory", path)
        return 7

    m = FakeSkipMap()
    opt = SocketLbOptOut(m, store, lambda: eps, cookie_fn=cookie)
    assert opt.refresh() == {7: SKIP_NAMESPACE}
