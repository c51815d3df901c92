"""A slow, obvious reading of networking.k8s.io/v1, written for the tests.

It answers "may this connection happen?" straight from the objects, one rule
at a time, sharing no code with agent/policy (not even label selector
matching) so that the compiled maps are checked against an independent
statement of the rules. The choices Kubernetes leaves to implementations are
made the way README-section.md documents them:

- ipBlock peers match any address in the block, pod addresses included, and
  never by what the address belongs to;
- a named port resolves on the destination pod; towards an address matched
  only by an ipBlock (or not a pod at all) it resolves to nothing;
- host-network pods are not pods for policy: not selected, and their address
  is their node's;
- a node may always open connections to the pods it runs;
- audited policies never change what is enforced.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Optional

from agent.k8s.model import LabelSelector, Namespace, NetworkPolicy, Pod, PolicyRule


def selector_matches(sel: LabelSelector, labels) -> bool:
    for k, v in sel.match_labels.items():
        if k not in labels or labels[k] != v:
            return False
    for req in sel.match_expressions:
        present = req.key in labels
        if req.operator == "In":
            ok = present and labels[req.key] in req.values
        elif req.operator == "NotIn":
            ok = (not present) or labels[req.key] not in req.values
        elif req.operator == "Exists":
            ok = present
        elif req.operator == "DoesNotExist":
            ok = not present
        else:
            raise AssertionError(f"unknown operator {req.operator}")
        if not ok:
            return False
    return True


@dataclass
class Reference:
    namespaces: list[Namespace]
    pods: list[Pod]
    policies: list[NetworkPolicy]
    node_ips: dict[str, list[str]]               # node name -> its addresses
    mode: str = "default"
    audited: frozenset = frozenset()             # (namespace, name) keys
    include_audited: bool = False                # answer as if audited policies were enforced
    _by_ip: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        node_addrs = {a for ips in self.node_ips.values() for a in ips}
        for p in self.pods:
            if p.host_network or p.phase in ("Succeeded", "Failed"):
                continue
            for a in p.ips:
                if a in node_addrs:
                    continue
                cur = self._by_ip.get(a)
                if cur is None or (cur.phase != "Running" and p.phase == "Running"):
                    self._by_ip[a] = p

    # ------------------------------------------------------------------

    def pod_at(self, ip: str) -> Optional[Pod]:
        return self._by_ip.get(ip)

    def ns_labels(self, name: str) -> dict:
        labels = {"kubernetes.io/metadata.name": name}
        for ns in self.namespaces:
            if ns.name == name:
                labels.update(ns.labels)
        return labels

    def counted(self, pol: NetworkPolicy) -> bool:
        return self.include_audited or (pol.namespace, pol.name) not in self.audited

    def policies_for(self, pod: Pod, direction: str) -> list[NetworkPolicy]:
        return [pol for pol in self.policies
                if self.counted(pol) and pol.namespace == pod.namespace
                and direction in pol.policy_types
                and selector_matches(pol.pod_selector, pod.labels)]

    def host_of(self, pod: Pod) -> list[str]:
        return self.node_ips.get(pod.node_name, [])

    # ------------------------------------------------------------------

    def one_side(self, pod: Pod, direction: str, remote_ip: str, proto: str, port: int) -> bool:
        if self.mode == "never":
            return True
        if direction == "Ingress" and remote_ip in self.host_of(pod):
            return True
        pols = self.policies_for(pod, direction)
        if not pols and self.mode != "always":
            return True
        for pol in pols:
            rules = pol.ingress if direction == "Ingress" else pol.egress
            for rule in rules:
                if self.rule_admits(pol, rule, pod, direction, remote_ip, proto, port):
                    return True
        return False

    def rule_admits(self, pol: NetworkPolicy, rule: PolicyRule, pod: Pod, direction: str,
                    remote_ip: str, proto: str, port: int) -> bool:
        remote = self.pod_at(remote_ip)
        as_pod = as_ip = False
        if not rule.peers:
            as_ip = True
            as_pod = remote is not None
        for peer in rule.peers:
            if peer.ip_block is not None:
                net = ipaddress.ip_network(peer.ip_block.cidr)
                addr = ipaddress.ip_address(remote_ip)
                if addr.version == net.version and addr in net and not any(
                        addr in ipaddress.ip_network(e) for e in peer.ip_block.except_):
                    as_ip = True
                continue
            if remote is None or (peer.pod_selector is None and peer.namespace_selector is None):
                continue
            if peer.namespace_selector is None:
                ns_ok = remote.namespace == pol.namespace
            else:
                ns_ok = selector_matches(peer.namespace_selector, self.ns_labels(remote.namespace))
            pod_ok = peer.pod_selector is None or selector_matches(peer.pod_selector, remote.labels)
            if ns_ok and pod_ok:
                as_pod = True
        if not (as_pod or as_ip):
            return False
        if not rule.ports:
            return True
        for pp in rule.ports:
            if pp.protocol != proto:
                continue
            if pp.port is None:
                return True
            if isinstance(pp.port, int):
                if pp.port <= port <= (pp.end_port if pp.end_port is not None else pp.port):
                    return True
                continue
            # Named: the destination pod says which number it is.
            if direction == "Ingress":
                dest = pod
            else:
                dest = remote if as_pod else None
            if dest is not None and any(cp.name == pp.port and cp.protocol == proto
                                        and cp.container_port == port for cp in dest.ports):
                return True
        return False

    def admitting(self, pod: Pod, direction: str, remote_ip: str, proto: str,
                  port: int) -> set[str]:
        """Every policy ("namespace/name") with a rule admitting the flow at
        this pod, and the node's own allow as "reserved:host-allow"."""
        out = set()
        if direction == "Ingress" and remote_ip in self.host_of(pod):
            out.add("reserved:host-allow")
        for pol in self.policies_for(pod, direction):
            rules = pol.ingress if direction == "Ingress" else pol.egress
            if any(self.rule_admits(pol, r, pod, direction, remote_ip, proto, port) for r in rules):
                out.add(f"{pol.namespace}/{pol.name}")
        return out

    def allows(self, src_ip: str, dst_ip: str, proto: str, port: int) -> bool:
        if src_ip == dst_ip:
            return True
        src, dst = self.pod_at(src_ip), self.pod_at(dst_ip)
        if src is not None and not self.one_side(src, "Egress", dst_ip, proto, port):
            return False
        if dst is not None and not self.one_side(dst, "Ingress", src_ip, proto, port):
            return False
        return True


def reference_for(objects: Iterable, node_ips: dict[str, list[str]], mode: str = "default",
                  audited: Iterable = (), include_audited: bool = False) -> Reference:
    objs = list(objects)
    return Reference(
        namespaces=[o for o in objs if isinstance(o, Namespace)],
        pods=[o for o in objs if isinstance(o, Pod)],
        policies=[o for o in objs if isinstance(o, NetworkPolicy)],
        node_ips=node_ips, mode=mode, audited=frozenset(audited),
        include_audited=include_audited)
