"""NetworkPolicy for the pods of this node, as pure data.

    state = compile_policy(snapshot, node_name, node_ips, mode, audited, previous=old)
    problems = check_capacity(state, capacities, old)     # refuse before overflowing
    plan = fit(lambda refused: compile_policy(..., refused=refused), capacities, old)
                                                          # what fits, failing closed
    ops = diff(old, state)                                # ordered, never widens/narrows past old|new
    verdict = evaluate(state, src_ip, dst_ip, "TCP", 80)  # the datapath's decision, in Python

The compiler turns Kubernetes objects into the contents of three maps
(ipcache, endpoints, rules) whose per-packet lookups cost the same whatever
the number of policies, pods or CIDRs; `diff` orders the updates between two
such states; `evaluate` performs the programs' lookups on a state or on any
intermediate image. Nothing here touches the kernel or the network: no bcc,
pyroute2, kubernetes client, grpc or prometheus imports.
"""
from agent.policy.capacity import (
    Capacities, Fit, Overflow, check_capacity, fit, pairs_of, peak_usage, refusal_order, usage,
)
from agent.policy.compile import compile_policy
from agent.policy.diff import (
    EndpointDelete, EndpointPut, IpcacheDelete, IpcachePut, Op, RuleDelete, RulePut, apply_ops, diff,
)
from agent.policy.lookup import Decision, Verdict, decide, evaluate
from agent.policy.state import (
    ID_ANY, ID_HOST, ID_WORLD, POLICY_ALWAYS, POLICY_HOST, Direction, DirectionPolicy,
    EndpointConfig, EndpointPolicy, Identity, MapImage, Mode, PolicyKey, PolicyState, RuleValue,
)

__all__ = [
    "Capacities", "Fit", "Overflow", "check_capacity", "fit", "pairs_of", "peak_usage",
    "refusal_order", "usage",
    "compile_policy",
    "EndpointDelete", "EndpointPut", "IpcacheDelete", "IpcachePut", "Op", "RuleDelete", "RulePut",
    "apply_ops", "diff",
    "Decision", "Verdict", "decide", "evaluate",
    "ID_ANY", "ID_HOST", "ID_WORLD", "POLICY_ALWAYS", "POLICY_HOST", "Direction", "DirectionPolicy",
    "EndpointConfig", "EndpointPolicy", "Identity", "MapImage", "Mode", "PolicyKey", "PolicyState",
    "RuleValue",
]
