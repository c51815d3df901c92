"""The rule lookup of `evaluate` is the lookup of the proposed map layout.

The rules map is meant to be an LPM trie over a 96-bit key, most significant
first: endpoint IPv4 (32), peer identity (32), direction (8), protocol (8),
destination port (16), with `PolicyKey.lpm_prefixlen` significant bits. Here
that trie is a plain bitwise longest-prefix match over every key, and must
pick the same entry as MapImage.lookup_rule for any packet.
"""
from __future__ import annotations

import random

from agent.policy import ID_ANY, compile_policy
from agent.policy.ip4 import to_int
from agent.policy.state import RULE_FIXED_BITS, Direction, PolicyKey
from tests.policy.kube import netpol, snapshot
from tests.policy.test_semantics import HOST1, XA, YA, cluster

KEY_BITS = 96


def encode(ep: str, ident: int, direction: int, proto: int, port: int) -> int:
    return (to_int(ep) << 64) | (ident << 32) | (direction << 24) | (proto << 16) | port


def trie_lookup(entries, probe: int):
    best = None
    for value, plen, key in entries:
        mask = ((1 << plen) - 1) << (KEY_BITS - plen)
        if probe & mask == value & mask and (best is None or plen > best[0]):
            best = (plen, key)
    return best[1] if best else None


def test_the_python_lookup_is_a_longest_prefix_match_over_the_key_layout():
    policies = [
        netpol("x", "ranges", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [
            {"from": [{"namespaceSelector": {}}],
             "ports": [{"port": 1000, "endPort": 1999}, {"protocol": "UDP"}, {"port": 8080}]},
            {"ports": [{"protocol": "SCTP", "port": 7, "endPort": 300}]},
            {"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
        netpol("x", "more", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [
            {"from": [{"namespaceSelector": {}}], "ports": [{"port": 1500, "endPort": 1600}]}]}),
    ]
    state = compile_policy(snapshot(cluster() + policies), "n1", [HOST1], "default")
    img = state.image()
    rules = state.endpoints[XA].rules
    assert len(rules) > 20
    entries = [(encode(XA, k.identity, k.direction, k.protocol, k.port), k.lpm_prefixlen, k)
               for k in rules]
    assert {k.lpm_prefixlen for k in rules} >= {RULE_FIXED_BITS, RULE_FIXED_BITS + 8 + 16}
    idents = sorted({k.identity for k in rules} | {state.ipcache[f"{YA}/32"]})
    rng = random.Random(5)
    ports = [0, 1, 7, 300, 301, 999, 1000, 1500, 1600, 1601, 1999, 2000, 8080, 65535]
    ports += [rng.randrange(65536) for _ in range(40)]
    for ident in idents:
        for proto in (1, 6, 17, 132):
            for port in ports:
                want = trie_lookup(entries, encode(XA, ident, Direction.INGRESS, proto, port))
                got = img.lookup_rule(XA, Direction.INGRESS, ident, proto, port)
                assert (got[0] if got else None) == want, (ident, proto, port)
    described = {k.describe() for k in rules if k.identity == ID_ANY}
    assert "ingress id=0 SCTP/8-15" in described
    assert state.identity_name(state.ipcache[f"{YA}/32"]).startswith("pod ns=y labels={app=a}")


def test_a_wildcard_protocol_key_stops_before_the_protocol_byte():
    any_proto = PolicyKey(Direction.EGRESS, 7, 0, 0, 0)
    one_port = PolicyKey(Direction.EGRESS, 7, 6, 443, 16)
    all_tcp = PolicyKey(Direction.EGRESS, 7, 6, 0, 0)
    assert any_proto.lpm_prefixlen == RULE_FIXED_BITS
    assert all_tcp.lpm_prefixlen == RULE_FIXED_BITS + 8
    assert one_port.lpm_prefixlen == KEY_BITS
