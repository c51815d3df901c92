"""One compile for both families: IPv6 peers (pods' IPv6 addresses, IPv6
ipBlocks with except, the node's IPv6 addresses) get identities beside
the IPv4 ones, the pod's rules stay keyed by its IPv4 address, and each
family's ipcache is counted against its own map.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from agent.policy import Capacities, apply_ops, check_capacity, compile_policy, diff, evaluate
from agent.policy.capacity import MAP_IPCACHE, MAP_IPCACHE6, usage
from agent.policy.state import ID_HOST
from tests.policy.kube import namespace, netpol, pod, snapshot
from tests.policy.test_incremental import assert_same

NODE, NODE4, NODE6 = "n1", "192.168.0.1", "fd00:1::1"
A4, A6 = "10.1.0.10", "fd00:10::a"
B4, B6 = "10.1.0.11", "fd00:10::b"
R4, R6 = "10.2.0.20", "fd00:20::20"       # a pod on another node
CLIENT6, EXCEPTED6, STRANGER6 = "fd00:30::1", "fd00:30::99", "fd00:40::1"


def dual(ns, name, v4, v6, **kw):
    return replace(pod(ns, name, v4, **kw), ips=(v4, v6) if v6 else (v4,))


def policy_a(*ingress):
    return netpol("x", "a-in", {"podSelector": {"matchLabels": {"app": "a"}},
                                "ingress": list(ingress)})


BLOCK6 = {"ipBlock": {"cidr": "fd00:30::/64", "except": [f"{EXCEPTED6}/128"]}}


def objects(*policies, b6=B6):
    return [namespace("x", ns="x"), namespace("y", ns="y"),
            dual("x", "a", A4, A6, labels={"app": "a"}),
            dual("x", "b", B4, b6, labels={"app": "b"}),
            dual("y", "r", R4, R6, node="n2", labels={"app": "r"}), *policies]


def compiled(objs, previous=None, incremental=True):
    return compile_policy(snapshot(objs), NODE, [NODE4, NODE6], "default", previous=previous,
                          incremental=incremental)


def test_every_address_of_a_pod_has_an_identity_and_the_pods_key_is_its_ipv4():
    st = compiled(objects(policy_a({"from": [{"namespaceSelector": {},
                                               "podSelector": {"matchLabels": {"app": "r"}}}]})))
    for v4, v6 in ((A4, A6), (B4, B6), (R4, R6)):
        assert st.ipcache[f"{v6}/128"] == st.ipcache[f"{v4}/32"]
    assert st.ipcache[f"{NODE6}/128"] == st.ipcache[f"{NODE4}/32"] == ID_HOST
    assert dict(st.endpoints6) == {A6: A4, B6: B4}, "local pods only"
    assert set(st.endpoints) == {A4, B4}
    # peers by selector match both families of the peer, checked at A's key
    assert evaluate(st, R6, A6, "TCP", 80).allowed
    assert evaluate(st, R4, A4, "TCP", 80).allowed
    assert not evaluate(st, B6, A6, "TCP", 80).allowed
    assert evaluate(st, NODE6, A6, "TCP", 80).allowed, "the node reaches its pods"


@pytest.mark.parametrize("src,allowed", [(CLIENT6, True), (EXCEPTED6, False),
                                         (STRANGER6, False), ("10.9.0.1", False)])
def test_an_ipv6_ipblock_with_except(src, allowed):
    st = compiled(objects(policy_a({"from": [BLOCK6], "ports": [{"protocol": "TCP", "port": 80}]})))
    assert evaluate(st, src, A6 if ":" in src else A4, "TCP", 80).allowed is allowed
    assert not evaluate(st, CLIENT6, A6, "TCP", 81).allowed


def test_each_family_has_only_its_own_blocks():
    st = compiled(objects(policy_a({"from": [{"ipBlock": {"cidr": "::/0"}}]},
                                   {"from": [{"ipBlock": {"cidr": "10.9.0.0/16"}}],
                                    "ports": [{"protocol": "UDP", "port": 53}]})))
    assert evaluate(st, STRANGER6, A6, "TCP", 80).allowed
    assert not evaluate(st, "10.8.0.1", A4, "TCP", 80).allowed, "::/0 holds no IPv4 address"
    assert evaluate(st, "10.9.0.1", A4, "UDP", 53).allowed
    st = compiled(objects(policy_a({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})))
    assert evaluate(st, "10.8.0.1", A4, "TCP", 80).allowed
    assert not evaluate(st, STRANGER6, A6, "TCP", 80).allowed, "0.0.0.0/0 holds no IPv6 address"


def test_a_pods_ipv6_address_in_a_block_is_classified_on_its_own():
    # B's IPv6 address is in the block, its IPv4 address is not
    st = compiled(objects(policy_a({"from": [{"ipBlock": {"cidr": "fd00:10::/112"}}],
                                    "ports": [{"protocol": "TCP", "port": 22}]})))
    assert st.ipcache[f"{B6}/128"] != st.ipcache[f"{B4}/32"]
    assert evaluate(st, B6, A6, "TCP", 22).allowed
    assert not evaluate(st, B4, A4, "TCP", 22).allowed


def test_egress_by_ipv6_address():
    eg = netpol("x", "a-out", {"podSelector": {"matchLabels": {"app": "a"}},
                               "policyTypes": ["Egress"],
                               "egress": [{"to": [BLOCK6], "ports": [{"protocol": "TCP",
                                                                       "port": 443}]}]})
    st = compiled(objects(eg))
    assert evaluate(st, A6, CLIENT6, "TCP", 443).allowed
    assert not evaluate(st, A6, EXCEPTED6, "TCP", 443).allowed
    assert not evaluate(st, A6, R6, "TCP", 443).allowed


STEPS = [
    ("pod b gets another IPv6 address", lambda: objects(policy_a({"from": [BLOCK6]}), b6="fd00:10::bb")),
    ("pod b loses its IPv6 address", lambda: objects(policy_a({"from": [BLOCK6]}), b6=None)),
    ("b's IPv6 address lands in a block",
     lambda: objects(policy_a({"from": [BLOCK6]},
                              {"from": [{"ipBlock": {"cidr": "fd00:10::/112"}}]}))),
    ("the block goes", lambda: objects(policy_a({"from": [{"podSelector": {}}]}))),
    ("b relabelled", lambda: [o if getattr(o, "name", "") != "b" else
                              replace(o, labels=type(o.labels)({"app": "z"}))
                              for o in objects(policy_a({"from": [{"podSelector": {
                                  "matchLabels": {"app": "b"}}}]}))]),
]


def test_incremental_compiles_equal_full_ones_for_ipv6_changes():
    prev = compiled(objects(policy_a({"from": [BLOCK6]})))
    img = prev.image()
    for what, objs in STEPS:
        objs = objs()
        inc = compiled(objs, previous=prev)
        full = compiled(objs, previous=prev, incremental=False)
        assert_same(inc, full, what)
        assert dict(inc.endpoints6) == dict(full.endpoints6), what
        apply_ops(img, diff(prev, inc))
        assert img.ipcache == dict(inc.ipcache), what
        prev = inc


def test_each_familys_ipcache_is_counted_against_its_own_map():
    blocks = [{"ipBlock": {"cidr": f"fd00:{i:x}::/64"}} for i in range(0x50, 0x60)]
    big = netpol("x", "v6-blocks", {"podSelector": {"matchLabels": {"app": "a"}},
                                    "ingress": [{"from": blocks}]})
    st = compiled(objects(big))
    used = usage(st)
    assert used[MAP_IPCACHE6] == sum(1 for k in st.ipcache if ":" in k) > used[MAP_IPCACHE]
    # room for every IPv4 entry: only the IPv6 map overflows, and says who fills it
    problems = check_capacity(st, Capacities(used[MAP_IPCACHE], 100, 1000))
    assert [p.map for p in problems] == [MAP_IPCACHE6]
    assert problems[0].policy == "x/v6-blocks"
    assert "IPv6 ipcache entries" in problems[0].reason
    assert check_capacity(st, Capacities(used[MAP_IPCACHE6], 100, 1000)) == []


def test_policy_get_takes_a_pods_ipv6_address():
    from agent.inspect.policy import endpoint_rules
    st = compiled(objects(policy_a({"from": [BLOCK6]})))
    view = endpoint_rules(st, A6)
    assert view["ip"] == A4 and view["pod"] == "x/a" and view["directions"]["ingress"]["enforced"]
