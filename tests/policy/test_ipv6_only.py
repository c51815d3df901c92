"""NetworkPolicy of IPv6-only pods: a local one is compiled under the
endpoint key its CNI ADD was given (the agent places the pod at it, beside
its IPv6 addresses), and the key is in no identity and no ipcache entry:
only the pod's IPv6 addresses are peers.
"""
from __future__ import annotations

from dataclasses import replace

from agent.model.endpoint import allocate_endpoint_key
from agent.policy import compile_policy, evaluate
from tests.policy.kube import namespace, netpol, pod, snapshot
from tests.policy.test_incremental import assert_same

NODE, NODE4, NODE6 = "n1", "192.168.0.1", "fd00:1::1"
KEY = allocate_endpoint_key(())
O6 = "fd00:10::c"                  # the IPv6-only pod
A4, A6 = "10.1.0.10", "fd00:10::a"
B4, B6 = "10.1.0.11", "fd00:10::b"
CLIENT6 = "fd00:30::1"


def objects(*policies, o_labels=None):
    o = replace(pod("x", "o", KEY, labels=o_labels or {"app": "o"}), ips=(KEY, O6))
    return [namespace("x", ns="x"), o,
            replace(pod("x", "a", A4, labels={"app": "a"}), ips=(A4, A6)),
            replace(pod("x", "b", B4, labels={"app": "b"}), ips=(B4, B6)), *policies]


def compiled(objs, previous=None, incremental=True):
    return compile_policy(snapshot(objs), NODE, [NODE4, NODE6], "default", previous=previous,
                          incremental=incremental)


O_IN = netpol("x", "o-in", {"podSelector": {"matchLabels": {"app": "o"}},
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}},
                                                  {"ipBlock": {"cidr": f"{CLIENT6}/128"}}]}]})
A_IN = netpol("x", "a-in", {"podSelector": {"matchLabels": {"app": "a"}},
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "o"}}}]}]})


def test_the_pod_is_selected_under_its_key_and_judged_by_its_ipv6_peers():
    st = compiled(objects(O_IN))
    assert KEY in st.endpoints and st.endpoints[KEY].name == "o"
    assert st.endpoints6[O6] == KEY
    assert f"{KEY}/32" not in st.ipcache, "the key is no address of a peer"
    assert f"{O6}/128" in st.ipcache
    assert evaluate(st, A6, O6, "TCP", 80).allowed
    assert evaluate(st, CLIENT6, O6, "TCP", 80).allowed
    assert not evaluate(st, B6, O6, "TCP", 80).allowed


def test_the_pod_is_a_peer_by_its_ipv6_address():
    st = compiled(objects(A_IN))
    assert evaluate(st, O6, A6, "TCP", 80).allowed
    assert not evaluate(st, B6, A6, "TCP", 80).allowed
    # its key is nobody: an IPv4 packet from it is the world's
    assert not evaluate(st, KEY, A4, "TCP", 80).allowed


def test_an_update_equals_a_full_compile():
    first = compiled(objects(O_IN, A_IN))
    changed = objects(O_IN, A_IN, o_labels={"app": "o", "tier": "x"})
    assert_same(compiled(changed, previous=first),
                compiled(changed, previous=first, incremental=False), "labels added")
    relabelled = objects(O_IN, A_IN, o_labels={"app": "other"})
    st = compiled(relabelled, previous=first)
    assert_same(st, compiled(relabelled, previous=first, incremental=False), "no longer o")
    assert not evaluate(st, O6, A6, "TCP", 80).allowed
    assert f"{KEY}/32" not in st.ipcache


R6 = "fd00:20::7"                  # an IPv6-only pod on another node
FROM_R = netpol("x", "a-from-r", {"podSelector": {"matchLabels": {"app": "a"}},
                                  "ingress": [{"from": [{"podSelector":
                                                         {"matchLabels": {"app": "r"}}}]}]})


def remote(labels=None):
    return replace(pod("x", "r", R6, node="n2", labels=labels or {"app": "r"}), ips=(R6,))


def test_an_ipv6_only_pod_elsewhere_is_a_peer_by_its_ipv6_address():
    st = compiled([*objects(FROM_R), remote()])
    assert evaluate(st, R6, A6, "TCP", 80).allowed
    assert not evaluate(st, B6, A6, "TCP", 80).allowed
    assert f"{R6}/128" in st.ipcache
    assert all(not k.startswith("v6only:") for k in st.endpoints)
    assert all("v6only" not in k for k in st.ipcache)


def test_an_ipv6_only_pod_not_added_yet_is_a_peer_but_no_endpoint():
    """Its Pod names this node, CNI ADD has not given it a key yet."""
    unplaced = replace(pod("x", "o", O6, labels={"app": "r"}), ips=(O6,))
    st = compiled([*objects(FROM_R)[:1], *objects(FROM_R)[2:], unplaced])
    assert set(st.endpoints) == {A4, B4}
    assert evaluate(st, O6, A6, "TCP", 80).allowed


def test_updates_of_ipv6_only_peers_equal_full_compiles():
    first = compiled([*objects(FROM_R), remote()])
    for what, objs in (("relabelled", [*objects(FROM_R), remote({"app": "q"})]),
                       ("gone", objects(FROM_R)),
                       ("back", [*objects(FROM_R), remote()]),
                       ("a new block", [*objects(FROM_R, O_IN), remote()])):
        inc = compiled(objs, previous=first)
        assert_same(inc, compiled(objs, previous=first, incremental=False), what)
        first = inc
    assert evaluate(first, R6, A6, "TCP", 80).allowed
