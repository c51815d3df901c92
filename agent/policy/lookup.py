"""The per-packet policy decision, made with exactly the datapath's lookups.

This is the reference the BPF programs are tested against and what the CLI's
packet what-if answers with. For a new flow from `src` to `dst`:

  egress, if src is a pod of this node:  peer = ipcache(dst)
  ingress, if dst is a pod of this node: peer = ipcache(src)
    config = endpoints[pod]            (absent: nothing to enforce)
    neither enforced nor audit -> pass, no rule lookup
    hit = rules[pod, dir, peer, proto, dport] or rules[pod, dir, 0, proto, dport]
          (two longest-prefix matches; protocol and port are the prefix part)
    enforced: hit -> pass (the hit names the policies), miss -> drop, named
              after the direction's deciding policies
    audit:    hit -> pass, miss -> pass, counted as a would-be drop

Both checks run for a flow between two pods of this node (the from-pod program
does egress, then the destination's ingress before the redirect).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from agent.policy.ports import proto_number
from agent.policy.state import ID_ANY, Direction, MapImage, PolicyState

REASON_LOOPBACK = "loopback"                # a pod talking to itself never leaves its netns
REASON_NOT_ISOLATED = "not-isolated"        # no policy selects the pod in this direction
REASON_ALLOWED = "policy-allowed"
REASON_DENIED = "policy-denied"
REASON_AUDIT_ALLOWED = "audit-allowed"      # an audited policy's rule matches
REASON_AUDIT_DENIED = "audit-would-deny"    # audited policies would drop it; forwarded


@dataclass(frozen=True, slots=True)
class Decision:
    """One direction's check at one endpoint."""

    direction: Direction
    endpoint: str
    peer_identity: int
    allowed: bool
    reason: str
    policies: tuple[int, ...] = ()
    matched: tuple = ()              # the PolicyKeys that matched (peer identity, then any)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The flow's fate on this node. `reason` and `policies` come from the
    check that decided: the first one that drops, else the first reporting
    a would-be drop, else the first allowed by a rule (egress before ingress)."""

    allowed: bool
    reason: str
    policies: tuple[int, ...] = ()
    direction: Optional[Direction] = None   # the check the reason comes from
    checks: tuple[Decision, ...] = field(default=())


def decide(image: MapImage, endpoint: str, direction: Direction, peer_ip: str,
           protocol: int, port: int) -> Optional[Decision]:
    """The check of one direction at one endpoint; None if the endpoint is unknown."""
    cfg = image.endpoints.get(endpoint)
    if cfg is None:
        return None
    dp = cfg.of(direction)
    peer = image.identity_of(peer_ip)
    if not dp.isolated:
        return Decision(direction, endpoint, peer, True, REASON_NOT_ISOLATED)
    hits = [h for h in (image.lookup_rule(endpoint, direction, peer, protocol, port),
                        image.lookup_rule(endpoint, direction, ID_ANY, protocol, port)) if h]
    if hits:
        pids = tuple(sorted({p for _, v in hits for p in v.policies}))
        return Decision(direction, endpoint, peer, True,
                        REASON_ALLOWED if dp.enforced else REASON_AUDIT_ALLOWED,
                        pids, tuple(k for k, _ in hits))
    if dp.enforced:
        return Decision(direction, endpoint, peer, False, REASON_DENIED, dp.deciding)
    return Decision(direction, endpoint, peer, True, REASON_AUDIT_DENIED, dp.deciding)


def evaluate(state: Union[PolicyState, MapImage], src_ip: str, dst_ip: str,
             protocol: Union[int, str], dst_port: int) -> Verdict:
    """Whether this node lets a new flow src -> dst (protocol, destination port) pass."""
    image = state.frozen_image() if isinstance(state, PolicyState) else state
    proto = proto_number(protocol)
    if src_ip == dst_ip:
        return Verdict(True, REASON_LOOPBACK)
    # an IPv6 address's checks are its pod's (fp_policy6_pod), by its own identity
    src_ep = image.endpoints6.get(src_ip, src_ip)
    dst_ep = image.endpoints6.get(dst_ip, dst_ip)
    checks = tuple(c for c in (decide(image, src_ep, Direction.EGRESS, dst_ip, proto, dst_port),
                               decide(image, dst_ep, Direction.INGRESS, src_ip, proto, dst_port))
                   if c is not None)
    for c in checks:
        if not c.allowed:
            return Verdict(False, c.reason, c.policies, c.direction, checks)
    for reason in (REASON_AUDIT_DENIED, REASON_ALLOWED, REASON_AUDIT_ALLOWED):
        for c in checks:
            if c.reason == reason:
                return Verdict(True, reason, c.policies, c.direction, checks)
    return Verdict(True, REASON_NOT_ISOLATED, (), None, checks)
