"""fastpath's configuration: one schema, one place for every default.

Each key is declared once below with its type, default and meaning. The
agent, the CLI and the datapath read a `Config`; nothing else holds a
default. Values come from defaults, then a file (YAML/JSON, the ConfigMap key
mounted into the pod), then command-line overrides; `Config.origin` records
where each value came from (for `fastpath config show`).
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _cidrs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    out = []
    for v in value:
        out.append(str(ipaddress.ip_network(str(v).strip(), strict=True)))
    return tuple(out)


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    minimum: int | None = None
    maximum: int | None = None


KEYS: tuple[Key, ...] = (
    Key("bpffs_root", str, "/sys/fs/bpf/fastpath", "directory on a bpffs where maps are pinned"),
    Key("state_dir", str, "/var/run/fastpath", "agent state (endpoints, queued CNI deletions)"),
    Key("api_socket", str, "/var/run/fastpath/agent.sock", "unix socket of the agent's API"),
    Key("tc_priority", int, 25000, "tc filter priority of fastpath's programs", minimum=1, maximum=65535),
    Key("host_stack_cidrs", tuple, ("169.254.20.10/32",),
        "destinations always handed to the host stack (node-local DNS)"),
    Key("service_cidrs", tuple, (),
        "Service VIP ranges handed to the host stack (kube-proxy's) while fastpath does not translate them"),
    Key("eni_pattern", str, "eth*", "glob of ENI device names (the primary device is excluded)"),
    Key("primary_device", str, "eth0", "the node's primary NIC, never an ENI"),
    Key("pod_device_pattern", str, "cali*", "glob of host-side pod veth names"),
    Key("endpoints_map_size", int, 16384, "max local endpoints", minimum=16, maximum=1 << 20),
    Key("counters_map_size", int, 16384, "max (interface, direction, reason) counters",
        minimum=64, maximum=1 << 20),
    Key("bypass_map_size", int, 256, "max host-stack bypass prefixes", minimum=1, maximum=65536),
    Key("services_map_size", int, 65536, "max service frontends (VIP, port, protocol)",
        minimum=16, maximum=1 << 22),
    Key("backends_map_size", int, 131072, "max service backends", minimum=16, maximum=1 << 22),
    Key("slots_map_size", int, 524288, "max backend slots over all services",
        minimum=16, maximum=1 << 24),
    Key("conntrack_map_size", int, 262144, "max tracked translated flows (LRU)",
        minimum=1024, maximum=1 << 24),
    Key("affinity_map_size", int, 65536, "max ClientIP affinity entries (LRU)",
        minimum=16, maximum=1 << 22),
    Key("source", str, "kubernetes", "cluster state: 'kubernetes' or a manifest directory"),
    Key("node_name", str, "", "this node's Kubernetes name (default: hostname)"),
    Key("log_level", str, "info", "log level", choices=("debug", "info", "warning", "error")),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}


@dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    origin: Mapping[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def defaults(cls) -> "Config":
        return cls({k.name: k.default for k in KEYS}, {k.name: "default" for k in KEYS})

    def with_values(self, overrides: Mapping[str, Any], origin: str) -> "Config":
        """A new Config with `overrides` applied and validated, all or nothing."""
        values = dict(self.values)
        org = dict(self.origin)
        for name, raw in overrides.items():
            if raw is None:
                continue
            values[name] = coerce(name, raw)
            org[name] = origin
        return Config(values, org)

    def with_file(self, path: str | Path) -> "Config":
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            import yaml
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML or JSON: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of configuration keys")
        try:
            return self.with_values(data, f"file {path}")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.values.items()}

    def replace(self, **kw: Any) -> "Config":
        return self.with_values(kw, "override")


def coerce(name: str, raw: Any) -> Any:
    key = KEYS_BY_NAME.get(name)
    if key is None:
        close = [k for k in KEYS_BY_NAME if k.split("_")[0] == name.split("_")[0]]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown configuration key {name!r}{hint}")
    try:
        if key.type is tuple:
            value = _cidrs(raw)
        elif key.type is int:
            if isinstance(raw, bool):
                raise ValueError("a boolean is not an integer")
            value = int(raw)
        elif key.type is bool:
            if isinstance(raw, str):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                value = raw.lower() in ("true", "1", "yes")
            else:
                value = bool(raw)
        else:
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            value = raw
    except ValueError as exc:
        raise ConfigError(f"{name}: invalid value {raw!r}: {exc}") from None
    if key.choices and value not in key.choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, key.choices))}")
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{name}: {value} is below the minimum {key.minimum}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(f"{name}: {value} is above the maximum {key.maximum}")
    return value


def field_names() -> list[str]:
    return [k.name for k in KEYS]


__all__ = ["Config", "ConfigError", "KEYS", "coerce", "field_names"]
