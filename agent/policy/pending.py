"""Endpoints whose identity is not known yet: the safe state they start in.

A CNI ADD registers a pod before its labels may be known to the agent (the
Pod object has not reached its store, the API did not answer in time, the
manifests do not hold it). Such a pod is neither selected nor left out by
any policy; compiling it as a pod without labels would be a guess. So it
gets a state of its own, written like any compiled endpoint (same diff,
same capacity check) until its Pod arrives and the compiler takes over:

  deny-ingress  ingress isolated: only the node's addresses (kubelet probes)
                reach it, attributed to `reserved:identity-pending`;
                egress open in mode `default`, isolated in mode `always`
                (where every pod is);
  open          nothing is written: it is not isolated.

As a peer it has no identity (no ipcache entry): other pods' policies see it
as an address outside the cluster (only an ipBlock can admit it).

Pure: PolicyState in, PolicyState out.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from agent.policy import addr
from agent.policy.state import (
    OPEN, POLICY_HOST, POLICY_PENDING, Direction, DirectionPolicy, EndpointConfig, EndpointPolicy,
    Mode, PolicyKey, PolicyState, RuleValue,
)
from agent.policy.ports import ANY_KEY

DENY_INGRESS = "deny-ingress"
OPEN_STATE = "open"
UNKNOWN_POD_STATES = (DENY_INGRESS, OPEN_STATE)


def pending_config(mode: Mode) -> EndpointConfig:
    deny = DirectionPolicy(True, False, (POLICY_PENDING,))
    return EndpointConfig(ingress=deny, egress=deny if mode == Mode.ALWAYS else OPEN)


def host_identities(state: PolicyState) -> list[int]:
    """The identities this node's own addresses have in `state`'s ipcache."""
    return sorted({i for ip in state.node_ips if (i := state.ipcache.get(addr.host_text(ip))) is not None})


def pending_endpoint(ip: str, namespace: str, name: str, mode: Mode,
                     host_ids: list[int]) -> EndpointPolicy:
    rules = {PolicyKey(Direction.INGRESS, h, *ANY_KEY): RuleValue((POLICY_HOST,))
             for h in host_ids}
    return EndpointPolicy(ip, namespace, name, pending_config(mode), rules)


def with_pending(state: PolicyState, pending: Mapping[str, tuple[str, str]],
                 unknown_pod: str = DENY_INGRESS) -> PolicyState:
    """`state` plus the safe state of each pending endpoint (IPv4 ->
    (namespace, name)) that the compiled state does not already hold (an
    address the store knows as a pod of this node is the compiler's)."""
    if unknown_pod not in UNKNOWN_POD_STATES:
        raise ValueError(f"unknown pod state {unknown_pod!r}: one of {UNKNOWN_POD_STATES}")
    todo = {ip: v for ip, v in pending.items() if ip not in state.endpoints}
    if not todo or unknown_pod == OPEN_STATE or state.mode == Mode.NEVER:
        return state
    host_ids = host_identities(state)
    endpoints = dict(state.endpoints)
    for ip, (ns, name) in todo.items():
        endpoints[ip] = pending_endpoint(ip, ns, name, state.mode, host_ids)
    out = dataclasses.replace(state, endpoints=endpoints, _cache={})
    # what the compiler keeps with its states (incremental compiles start
    # from them) and what diff asks for, pending rules included
    if "compiler" in state._cache:
        out._cache["compiler"] = state._cache["compiler"]
    out._cache["enforced_ids"] = state.enforced_identities() | frozenset(host_ids)
    return out


def is_pending(ep: EndpointPolicy) -> bool:
    return POLICY_PENDING in ep.config.ingress.deciding
