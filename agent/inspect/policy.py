"""`fastpath policy get`: a pod's effective rules, traced to their policies.

Two sources, joined by rule key: the agent's compiled PolicyState (which
NetworkPolicies, by namespace/name, admit each key; identities by name), and
the pinned rule map (per-rule hit counters: new flows admitted by that
entry). Either works alone: from the maps, policies are shown by id.
"""
from __future__ import annotations

from agent.inspect.decode import PROTOCOLS, policy_dir


def _port_text(proto: int, port: int, plen: int) -> str:
    if proto == 0:
        return "any"
    name = PROTOCOLS.get(proto, str(proto))
    if plen == 0 and port == 0:
        return f"{name}/any"
    last = port + (1 << (16 - plen)) - 1
    return f"{name}/{port}" + (f"-{last}" if last != port else "")


def rule_key(direction: str, identity: int, proto: int, port: int, plen: int) -> tuple:
    return (direction, identity, proto, port, plen)


def endpoint_rules(state, endpoint: str, snapshot=None) -> dict:
    """From a PolicyState (agent/policy): the endpoint's isolation per
    direction and every rule with the policies admitting it."""
    ep = state.endpoints.get(getattr(state, "endpoints6", {}).get(endpoint, endpoint))
    if ep is None:
        for e in state.endpoints.values():
            if endpoint in (f"{e.namespace}/{e.name}", e.name):
                ep = e
                break
    if ep is None:
        raise KeyError(f"no endpoint {endpoint!r} in the compiled policy state "
                       "(by IP, namespace/pod or pod)")
    dirs = {}
    for d, cfg in (("ingress", ep.config.ingress), ("egress", ep.config.egress)):
        dirs[d] = {"enforced": cfg.enforced, "audit": cfg.audit,
                   "deciding": [state.policy_name(p) for p in cfg.deciding],
                   "deciding_ids": list(cfg.deciding)}
    rules = []
    for k, v in sorted(ep.rules.items(), key=lambda kv: (int(kv[0].direction), kv[0].identity,
                                                         kv[0].protocol, kv[0].port)):
        rules.append({
            "direction": k.direction.label, "identity": k.identity,
            "peer": "any" if k.identity == 0 else state.identity_name(k.identity),
            "proto": k.protocol, "port": k.port, "port_prefixlen": k.prefixlen,
            "ports": _port_text(k.protocol, k.port, k.prefixlen),
            "policy_ids": list(v.policies),
            "policies": [state.policy_name(p) for p in v.policies],
            "audit": v.audit,
        })
    return {"ip": ep.ip, "pod": f"{ep.namespace}/{ep.name}", "mode": str(state.mode),
            "directions": dirs, "rules": rules,
            # policies isolating it whose rules the maps had no room for
            "refused": sorted(n for n, ip in getattr(state, "refused", ()) if ip == ep.ip),
            "policy_names": {str(k): v for k, v in state.policies.items()}}


def map_rules(ep_entries: list[dict], rule_entries: list[dict], ip: str,
              fixed_bits: int) -> dict:
    """From the pinned maps alone: the endpoint's isolation and its rules,
    with hit counters (`flows`)."""
    dirs = {}
    for e in ep_entries:
        if e["key"] == ip:
            for d, v in e["value"]["dir"].items():
                if d.endswith("_label"):
                    continue
                names = v.get("flags_names", [])
                dirs[d] = {"enforced": "enforced" in names, "audit": "audit" in names,
                           "deciding_ids": [v["policy_id"]] if v["policy_id"] else []}
    rules = []
    for e in rule_entries:
        k, v = e["key"], e["value"]
        if k["ep_ip4"] != ip:
            continue
        plen = k["prefixlen"]
        proto = k["proto"] if plen > fixed_bits else 0
        pplen = max(0, plen - fixed_bits - 8) if proto else 0
        rules.append({
            "direction": k.get("dir_label", policy_dir(k["dir"])), "identity": k["identity"],
            "proto": proto, "port": k["dport"] if proto else 0, "port_prefixlen": pplen,
            "ports": _port_text(proto, k["dport"] if proto else 0, pplen),
            "policy_ids": [v["policy_id"]], "audit": "audit" in v.get("flags_names", []),
            "flows": v["flows"]})
    rules.sort(key=lambda r: (r["direction"], r["identity"], r["proto"], r["port"]))
    return {"ip": ip, "directions": dirs, "rules": rules}


def merge(agent_view: dict | None, maps_view: dict | None) -> dict:
    """The agent's rules (names) with the maps' hit counters; either alone."""
    if agent_view is None:
        return maps_view
    out = dict(agent_view)
    flows = {}
    if maps_view is not None:
        for r in maps_view["rules"]:
            flows[rule_key(r["direction"], r["identity"], r["proto"], r["port"],
                           r["port_prefixlen"])] = r["flows"]
    out["rules"] = []
    for r in agent_view["rules"]:
        r = dict(r)
        key = rule_key(r["direction"], r["identity"], r["proto"], r["port"], r["port_prefixlen"])
        r["flows"] = flows.get(key)
        r["in_map"] = key in flows if maps_view is not None else None
        out["rules"].append(r)
    return out
