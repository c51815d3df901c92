"""Identities, the ipcache and the rule keys: shaped so that a packet costs
the same few lookups whatever the number of policies, pods or CIDRs."""
from __future__ import annotations

from dataclasses import replace

from agent.k8s.model import FrozenMap, Namespace
from agent.policy import ID_HOST, ID_WORLD, MapImage, compile_policy, evaluate
from agent.policy.state import Direction, PolicyKey
from tests.policy.kube import netpol, pod, snapshot
from tests.policy.test_semantics import HOST1, XA, XB, YA, YB, cluster

NODE = "n1"


def compile_objs(objs, previous=None, mode="default"):
    return compile_policy(snapshot(objs), NODE, [HOST1], mode, previous=previous)


def test_pods_alike_share_one_identity_and_others_do_not():
    objs = cluster() + [pod("x", "a-twin", "10.0.1.5", labels={"app": "a", "tier": "web"}),
                        pod("y", "a-twin", "10.0.2.5", labels={"app": "a"})]
    s = compile_objs(objs)
    ident = {ip: s.ipcache[f"{ip}/32"] for ip in (XA, "10.0.1.5", YA, "10.0.2.5", XB)}
    assert ident[XA] == ident["10.0.1.5"]
    assert ident[YA] == ident["10.0.2.5"]
    assert len({ident[XA], ident[YA], ident[XB]}) == 3
    assert s.ipcache[f"{HOST1}/32"] == ID_HOST
    assert s.identity_info[ident[XA]].namespace_labels["kubernetes.io/metadata.name"] == "x"


def test_a_namespace_label_change_gives_its_pods_a_new_identity():
    s1 = compile_objs(cluster())
    relabelled = [replace(o, labels=FrozenMap({"team": "green"}))
                  if isinstance(o, Namespace) and o.name == "y" else o for o in cluster()]
    s2 = compile_objs(relabelled, previous=s1)
    assert s2.ipcache[f"{YA}/32"] != s1.ipcache[f"{YA}/32"]
    assert s2.ipcache[f"{XA}/32"] == s1.ipcache[f"{XA}/32"]


def test_ids_stay_put_across_changes_and_a_freed_id_is_not_reused_at_once():
    s1 = compile_objs(cluster())
    extra = [pod("x", "new", "10.0.1.6", labels={"app": "aaa"})]
    without_b = [o for o in cluster() if getattr(o, "ips", ()) != (XB,)]
    s2 = compile_objs(without_b + extra, previous=s1)
    for ip in (XA, YA, YB):
        assert s2.ipcache[f"{ip}/32"] == s1.ipcache[f"{ip}/32"]
    freed = s1.ipcache[f"{XB}/32"]
    assert freed not in s2.identity_info
    assert s2.ipcache["10.0.1.6/32"] not in s1.identity_info


def test_policy_ids_are_stable_and_named():
    p1 = netpol("x", "one", {})
    p2 = netpol("x", "two", {})
    s1 = compile_objs(cluster() + [p2])
    s2 = compile_objs(cluster() + [p1, p2], previous=s1)
    assert s2.policy_ids["x/two"] == s1.policy_ids["x/two"]
    assert s2.policy_ids["x/one"] not in s1.policies
    assert s2.policy_name(s2.policy_ids["x/one"]) == "x/one"
    assert s2.policy_name(1) == "reserved:host-allow"


def block_policy(cidr, excepts=(), name="blk"):
    b = {"cidr": cidr}
    if excepts:
        b["except"] = list(excepts)
    return netpol("x", name, {"podSelector": {"matchLabels": {"app": "a"}},
                              "ingress": [{"from": [{"ipBlock": b}]}]})


def test_an_except_costs_one_ipcache_entry_not_the_carved_pieces():
    s = compile_objs(cluster() + [block_policy("172.16.0.0/12", ["172.16.5.0/24", "172.20.0.0/16"])])
    cidr = {p: i for p, i in s.ipcache.items() if not p.endswith("/32")}
    assert set(cidr) == {"172.16.0.0/12", "172.16.5.0/24", "172.20.0.0/16"}
    assert cidr["172.16.5.0/24"] == cidr["172.20.0.0/16"] == ID_WORLD
    assert s.identity_info[cidr["172.16.0.0/12"]].kind == "cidr"
    assert s.ipcache_policies["172.16.0.0/12"] == (s.policy_ids["x/blk"],)


def test_overlapping_blocks_get_one_identity_per_distinct_set_of_blocks():
    objs = cluster() + [block_policy("10.0.0.0/8", name="wide"),
                        block_policy("10.0.0.0/8", ["10.0.2.0/24"], name="carved"),
                        block_policy("10.0.0.0/8", name="wide-again")]
    s = compile_objs(objs)
    cidr = {p: i for p, i in s.ipcache.items() if not p.endswith("/32")}
    # 10/8 is in all three blocks, 10.0.2/24 only in the two without except.
    assert set(cidr) == {"10.0.0.0/8", "10.0.2.0/24"}
    assert cidr["10.0.0.0/8"] != cidr["10.0.2.0/24"]
    assert len(s.identity_info[cidr["10.0.0.0/8"]].blocks) == 2
    assert len(s.identity_info[cidr["10.0.2.0/24"]].blocks) == 1


def test_a_pod_inside_a_block_is_told_apart_from_its_twins_outside():
    twin = pod("y", "a-far", "172.16.0.9", labels={"app": "a"})
    s = compile_objs(cluster() + [twin, block_policy("172.16.0.0/16")])
    inside, outside = s.ipcache["172.16.0.9/32"], s.ipcache[f"{YA}/32"]
    assert inside != outside
    assert s.identity_info[inside].labels == s.identity_info[outside].labels
    assert evaluate(s, "172.16.0.9", XA, "TCP", 1).allowed
    assert not evaluate(s, YA, XA, "TCP", 1).allowed


def test_a_rule_without_peers_is_one_key_for_any_peer():
    s = compile_objs(cluster() + [netpol("x", "web", {"ingress": [{"ports": [{"port": 80}]}]})])
    keys = [k for k in s.endpoints[XA].rules if k.identity != ID_HOST]
    assert keys == [PolicyKey(Direction.INGRESS, 0, 6, 80, 16)]


def test_a_port_range_is_a_handful_of_prefix_keys():
    s = compile_objs(cluster() + [netpol("x", "range", {
        "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 1, "endPort": 65534}]}]})])
    per_identity = {}
    for k in s.endpoints[XA].rules:
        if k.identity != ID_HOST:
            per_identity.setdefault(k.identity, []).append(k)
    assert per_identity and all(len(v) == 30 for v in per_identity.values())


class CountingDict(dict):
    """Counts lookups, to show what a packet costs."""

    def __init__(self, *a):
        super().__init__(*a)
        self.lookups = 0

    def get(self, *a):
        self.lookups += 1
        return super().get(*a)


def lookups_for(n_policies: int) -> tuple[int, bool]:
    """Lookups to decide y/a -> x/a TCP 8080 when only the last of n policies
    (each with its own peers, ports and CIDRs) admits it."""
    pols = []
    for i in range(n_policies - 1):
        pols.append(netpol("x", f"p{i:04d}", {
            "podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": f"100.{i // 250}.{i % 250}.0/24",
                                               "except": [f"100.{i // 250}.{i % 250}.128/25"]}},
                                  {"podSelector": {"matchLabels": {"app": f"n{i}"}}}],
                         "ports": [{"port": 1000 + i, "endPort": 1000 + i + (i % 7)}]}]}))
    pols.append(netpol("x", "zz-last", {"podSelector": {"matchLabels": {"app": "a"}},
                                        "ingress": [{"from": [{"namespaceSelector": {}}],
                                                     "ports": [{"port": 8080}]}]}))
    extra = [pod("z", f"n{i}", f"10.5.{i // 250}.{i % 250 + 1}", node="n2", labels={"app": f"n{i}"})
             for i in range(n_policies)]
    s = compile_objs(cluster() + extra + pols)
    img = s.image()
    counted = MapImage()
    counted.endpoints = img.endpoints
    counted.rules = CountingDict(img.rules)
    for prefix, ident in img.ipcache.items():
        counted.put_ipcache(prefix, ident)
    counted._lpm = {l: CountingDict(m) for l, m in counted._lpm.items()}
    allowed = evaluate(counted, YA, XA, "TCP", 8080).allowed
    return counted.rules.lookups + sum(m.lookups for m in counted._lpm.values()), allowed


def test_a_packet_costs_the_same_lookups_with_one_or_five_hundred_policies():
    few, ok_few = lookups_for(1)
    many, ok_many = lookups_for(500)
    assert ok_few and ok_many
    assert many == few
    # One ipcache lookup per distinct prefix length, two port-prefix walks.
    assert few <= 33 + 2 * 18
