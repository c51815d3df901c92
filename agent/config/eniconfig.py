"""Terway's `eni-config` ConfigMap, read for the settings fastpath shares with it.

Terway keeps its node settings in the kube-system/eni-config ConfigMap. Its
data keys that matter here:

  disable_network_policy  "true" / "false": whether NetworkPolicy is off. In
                          Terway's three modes: default and DataPath V2 have
                          it "true" (the policy container enforces nothing:
                          `--enable-policy=never`), DataPath V2 + NetworkPolicy
                          has it "false" (`--enable-policy=default`).
                          It may also sit inside `eni_conf`'s JSON.
  eni_conf                terwayd's JSON configuration.
  10-terway.conf          the CNI configuration Terway writes for its plugin:
                          `eniip_virtual_type` tells the mode ("datapathv2"),
                          `host_stack_cidrs` the destinations handed to the
                          node's stack (node-local DNS).

The ConfigMap reaches the agent as a mounted volume (a directory with one
file per key, the way Terway's own containers read it at /etc/eni), or as a
single file: the ConfigMap manifest itself, or just the `eni_conf` JSON.
`read()` turns it into configuration overrides for agent/config/schema.py, which
applies them above the defaults and below the configuration file and flags.
Pure: reads files, imports nothing of the datapath.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config.schema import parse_document


class EniConfigError(ValueError):
    pass


@dataclass
class EniConfig:
    path: str
    overrides: dict[str, Any] = field(default_factory=dict)
    mode: str = "unknown"          # "default", "datapathv2", or "unknown"
    notes: list[str] = field(default_factory=list)


def _flag(where: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise EniConfigError(f"{where}: {raw!r} is not true or false")


def _json(where: str, text: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EniConfigError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EniConfigError(f"{where}: expected a JSON object")
    return data


def _data_of(path: Path) -> dict[str, str]:
    """The ConfigMap's data keys, from a mounted directory or a single file."""
    if path.is_dir():
        # A mounted ConfigMap also holds ..data and timestamped directories
        # (atomic updates): only regular key files count.
        return {f.name: f.read_text() for f in sorted(path.iterdir())
                if f.is_file() and not f.name.startswith(".")}
    text = path.read_text()
    try:
        doc = parse_document(text)
    except ValueError as exc:
        raise EniConfigError(f"{path}: neither JSON nor YAML: {exc}") from None
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        data = doc.get("data") or {}
        if not isinstance(data, dict):
            raise EniConfigError(f"{path}: the ConfigMap's data is not a mapping")
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    if isinstance(doc, dict):
        return {"eni_conf": text}
    raise EniConfigError(f"{path}: expected the eni-config ConfigMap or its eni_conf JSON")


def read(path: str) -> EniConfig:
    p = Path(path)
    if not p.exists():
        raise EniConfigError(f"{path}: no such file or directory")
    try:
        data = _data_of(p)
    except OSError as exc:
        raise EniConfigError(f"{path}: {exc.strerror}") from None
    out = EniConfig(path)

    # disable_network_policy: the data key, or inside eni_conf; both must agree.
    found: dict[str, bool] = {}
    if "disable_network_policy" in data:
        found["disable_network_policy"] = _flag(f"{path}: disable_network_policy",
                                                data["disable_network_policy"])
    if "eni_conf" in data:
        conf = _json(f"{path}: eni_conf", data["eni_conf"])
        if "disable_network_policy" in conf:
            found["eni_conf.disable_network_policy"] = _flag(
                f"{path}: eni_conf.disable_network_policy", conf["disable_network_policy"])
    if len(set(found.values())) > 1:
        raise EniConfigError(f"{path}: disable_network_policy disagrees between "
                             + " and ".join(f"{k}={v}" for k, v in found.items()))
    if found:
        disabled = next(iter(found.values()))
        out.overrides["policy_enforcement"] = "never" if disabled else "default"

    cni_key = next((k for k in ("10-terway.conf", "10-terway.conflist") if k in data), None)
    if cni_key:
        cni = _json(f"{path}: {cni_key}", data[cni_key])
        # A conflist carries Terway's settings in its "terway" plugin entry.
        entry = next((pl for pl in cni.get("plugins") or [] if isinstance(pl, dict)
                      and pl.get("type") == "terway"), cni)
        vtype = str(entry.get("eniip_virtual_type") or "").lower()
        out.mode = "datapathv2" if vtype == "datapathv2" else "default"
        if out.mode == "default":
            out.notes.append(f"Terway runs in its default mode (eniip_virtual_type "
                             f"{vtype or 'unset'}), not DataPath V2; fastpath accelerates "
                             "the node regardless")
        if "host_stack_cidrs" in entry:
            cidrs = entry["host_stack_cidrs"]
            if not isinstance(cidrs, list):
                raise EniConfigError(f"{path}: {cni_key}: host_stack_cidrs is not a list")
            out.overrides["host_stack_cidrs"] = cidrs
    return out


__all__ = ["EniConfig", "EniConfigError", "read"]
