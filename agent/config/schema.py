"""fastpath's configuration: one schema, one place for every default.

Each key is declared once below with its type, default and meaning. The
agent, the CLI and the datapath read a `Config`; nothing else holds a
default. Values come from defaults, then Terway's eni-config ConfigMap (when
`eni_config` names it: agent/config/eniconfig.py), then a file (YAML/JSON, the
ConfigMap key mounted into the pod), then command-line overrides;
`Config.origin` records where each value came from (for `fastpath config
show`). Keys whose feature is not built yet say so in `Key.pending`.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _cidrs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    out = []
    for v in value:
        out.append(str(ipaddress.ip_network(str(v).strip(), strict=True)))
    return tuple(out)


def _ipv4(value: str) -> None:
    ipaddress.IPv4Address(value)


def _ipv6_link_local(value: str) -> None:
    if not ipaddress.IPv6Address(value).is_link_local:
        raise ValueError("expected a link-local IPv6 address (fe80::/10): pods reach their "
                         "gateway on their own link")


def _ipv6_global(value: str) -> None:
    a = ipaddress.IPv6Address(value)
    if a.is_link_local or a.is_multicast or a.is_unspecified or a.is_loopback:
        raise ValueError("expected an IPv6 unicast address of global scope")


def _abs_path_or_empty(value: str) -> None:
    if value and not value.startswith("/"):
        raise ValueError("expected an absolute path (or empty)")


def _listen_address(value: str) -> None:
    """host:port, [v6]:port, node-ip:port, or empty (endpoint off)."""
    if value:
        parse_address(value)


# The host part of a listen address that stands for the node's own IPv4
# address: the first one of `primary_device`, looked up when the agent starts.
NODE_IP = "node-ip"


def parse_address(value: str) -> tuple[str, int]:
    """(host, port) of a listen address; host is an IP address or NODE_IP."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected host:port with a port 0-65535")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host != NODE_IP:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address or {NODE_IP}") from None
    return host, int(port)


# Maglev table sizes offered (agent/lb/maglev.py): primes, so each backend's
# preference list visits every entry; the largest below 2^16.
MAGLEV_TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521)


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    minimum: int | None = None
    maximum: int | None = None
    why: str = ""              # why only `choices` are allowed
    pending: str = ""          # accepted and validated, but not yet in effect: why
    check: Callable[[Any], None] | None = None   # raises ValueError on a bad value


KEYS: tuple[Key, ...] = (
    Key("bpffs_root", str, "/sys/fs/bpf/fastpath", "directory on a bpffs where maps are pinned"),
    Key("state_dir", str, "/var/run/fastpath", "agent state (endpoints, queued CNI deletions)"),
    Key("api_socket", str, "/var/run/fastpath/agent.sock", "unix socket of the agent's API"),
    Key("grpc_socket", str, "", "unix socket of the agent's gRPC inspection service (the CLI) "
        "(empty: grpc.sock next to api_socket)", check=_abs_path_or_empty),
    Key("tc_priority", int, 25000, "tc filter priority of fastpath's programs", minimum=1, maximum=65535),
    Key("host_stack_cidrs", tuple, ("169.254.20.10/32",),
        "destinations always handed to the host stack (node-local DNS)"),
    Key("service_cidrs", tuple, (),
        "the cluster's Service CIDRs: a new flow to an address in them that no Service holds is "
        "dropped, one to a ClusterIP's unknown port rejected (kube-proxy's nftables mode); "
        "addresses fastpath does not translate (kube_proxy_replacement false, another proxy's "
        "Services) are handed to the host stack"),
    Key("eni_pattern", str, "eth*", "glob of ENI device names (the primary device is excluded)"),
    Key("primary_device", str, "eth0", "the node's primary NIC, never an ENI"),
    Key("pod_device_pattern", str, "cali*", "glob of host-side pod veth names",
        pending="pods are learned from the CNI plugin; no device is matched by name"),
    Key("endpoints_map_size", int, 16384, "max local endpoints", minimum=16, maximum=1 << 20),
    Key("counters_map_size", int, 16384, "max (interface, direction, reason) counters",
        minimum=64, maximum=1 << 20),
    Key("bypass_map_size", int, 256, "max host-stack bypass prefixes", minimum=1, maximum=65536),
    Key("services_map_size", int, 65536, "max service frontends (VIP, port, protocol)",
        minimum=16, maximum=1 << 22),
    Key("backends_map_size", int, 131072, "max service backends", minimum=16, maximum=1 << 22),
    Key("slots_map_size", int, 524288, "max backend slots over all services",
        minimum=16, maximum=1 << 24),
    Key("conntrack_map_size", int, 262144, "max entries (two per flow) of established "
        "translated flows, the conntrack map nothing evicts (allocated as flows arrive; "
        "also sizes socket-LB's per-socket table)", minimum=1024, maximum=1 << 24),
    Key("conntrack_new_map_size", int, 65536, "max entries (two per flow) of new, half-open "
        "and reset translated flows (LRU: under pressure they evict only each other)",
        minimum=1024, maximum=1 << 24),
    Key("conntrack_policy_map_size", int, 262144, "max flows NetworkPolicy admitted (LRU)",
        minimum=1024, maximum=1 << 24),
    Key("affinity_map_size", int, 65536, "max ClientIP affinity entries (LRU)",
        minimum=16, maximum=1 << 22),
    Key("conntrack_gc_interval", int, 60, "seconds between sweeps that remove conntrack "
        "entries past their lifetime (0: off; the datapath ignores them anyway, but the "
        "established map then fills up)", minimum=0, maximum=86400),
    Key("conntrack_tcp_idle_timeout", int, 21600, "lifetime in seconds of an established TCP "
        "flow without a packet", minimum=10, maximum=1 << 22),
    Key("conntrack_tcp_syn_timeout", int, 60, "lifetime in seconds of a TCP flow whose "
        "handshake has not completed", minimum=5, maximum=3600),
    Key("conntrack_tcp_fin_timeout", int, 60, "lifetime in seconds of a TCP flow one end "
        "has closed (the other may still send)", minimum=5, maximum=86400),
    Key("conntrack_tcp_close_timeout", int, 10, "lifetime in seconds of a TCP flow both ends "
        "closed, or one reset", minimum=1, maximum=3600),
    Key("conntrack_idle_timeout", int, 120, "lifetime in seconds of a UDP, SCTP or other "
        "flow without a packet", minimum=10, maximum=1 << 22),
    Key("source", str, "kubernetes", "cluster state: 'kubernetes' or a manifest directory"),
    Key("source_watch", bool, True, "manifest directory: scan as soon as inotify reports a "
        "change (a burst of changes is one scan), besides polling every second; false: poll only"),
    Key("node_name", str, "", "this node's Kubernetes name (default: hostname)"),
    Key("log_level", str, "info", "log level", choices=("debug", "info", "warning", "error")),
    # DataPath V2's agent settings (the policy container's flags in Terway's
    # DaemonSet), with its values as defaults. Keys whose feature the datapath
    # does not implement yet are validated like any other and carry `pending`,
    # which `fastpath config show` prints: setting them changes nothing yet.
    Key("routing_mode", str, "native", "how pod traffic leaves the node",
        choices=("native",), why="pods hold VPC-routable ENI addresses; there is no tunnel mode"),
    Key("masquerade", bool, False, "source-NAT pod traffic leaving the node",
        choices=(False,), why="pod IPs are routable in the VPC; fastpath never masquerades"),
    Key("endpoint_routes", bool, True, "pods are reached through Terway's per-pod routes "
        "(podIP dev cali*)", choices=(True,),
        why="the datapath finds local pods through the routes and rules Terway installs"),
    Key("kube_proxy_replacement", bool, True, "translate Services in the datapath instead of kube-proxy"),
    Key("socket_lb", bool, True,
        "translate Services at connect()/sendmsg() (cgroup hooks); off, the node's own TCP "
        "and UDP to Services (ClusterIPs, external and load-balancer IPs, its own NodePorts) "
        "are translated per packet on its interfaces and lo instead, as its SCTP always is"),
    Key("socket_lb_hostns_only", bool, True,
        "socket-LB for the node's own sockets only; pods get per-packet translation at tc"),
    Key("node_port", bool, True, "serve NodePort Services"),
    Key("nodeport_addresses", tuple, (),
        "CIDRs selecting the node addresses NodePorts (and healthCheckNodePorts) answer on, "
        "like kube-proxy's --nodeport-addresses, per family (empty, or no CIDR of a family: "
        "that family's primary address; a CIDR covering 127.0.0.1 serves the node's own "
        "sockets there, through socket-LB)"),
    Key("host_port", bool, True, "serve pods' hostPort mappings (the conflist's portMappings "
        "capability, passed on by fastpath-cni)"),
    Key("external_ips", bool, True, "serve Services' externalIPs"),
    Key("session_affinity", bool, True, "honour sessionAffinity: ClientIP"),
    Key("service_topology", bool, True, "honour topology-aware routing hints of EndpointSlices"),
    Key("in_cluster_lb", bool, True, "load-balance LoadBalancer Service IPs inside the cluster "
        "(pods and the node reach them in eBPF) instead of sending them to the cloud load "
        "balancer; traffic arriving from outside is translated either way"),
    Key("lb_external_algorithm", str, "random", "how a new flow from outside the node picks "
        "a backend: random, or maglev (the same backend on every node for a flow)",
        choices=("random", "maglev")),
    Key("maglev_table_size", int, 1021, "entries of each Maglev table (keep it over 100 times "
        "the largest backend count)", choices=MAGLEV_TABLE_SIZES,
        why="Maglev's permutations need a prime table size"),
    Key("source_ranges_map_size", int, 16384, "max loadBalancerSourceRanges prefixes over "
        "all load-balancer frontends", minimum=16, maximum=1 << 22),
    Key("bandwidth_manager", bool, True, "per-pod limits from pod annotations: egress and "
        "ingress bandwidth (kubernetes.io/*-bandwidth), packet rate and connections "
        "(fastpath.io/*); see docs/bandwidth.md"),
    Key("bandwidth_egress", str, "auto", "how traffic to the VPC is paced: edt (timestamps, "
        "fq on the ENIs), htb (per-pod HTB classes on the ENIs, for kernels without fq), "
        "auto (edt when the kernel has fq, else htb)", choices=("auto", "edt", "htb")),
    Key("bandwidth_bbr", bool, False, "make BBR the TCP congestion control of every pod's "
        "network namespace (new sockets; needs a kernel with tcp_bbr)"),
    Key("bandwidth_flows_map_size", int, 65536, "max TCP connections tracked for pods with a "
        "connection limit", minimum=1024, maximum=1 << 22),
    Key("policy_enforcement", str, "never",
        "NetworkPolicy enforcement: never (DataPath V2), default (as Kubernetes: pods selected "
        "by a policy are isolated), always (deny unless allowed)",
        choices=("never", "default", "always")),
    Key("local_router_ipv4", str, "169.254.10.1", "the node-side router address DataPath V2 "
        "gives its host device; fastpath sources hairpinned Service traffic from it", check=_ipv4),
    Key("local_router_ipv6", str, "fe80::1", "the link-local gateway address of pods' IPv6 "
        "default route (Terway's --local-router-ipv6), answered by the host veth; the "
        "simulated node lays pods out with it, and fastpath leaves link-local traffic to the "
        "stack", check=_ipv6_link_local),
    Key("hairpin_source_ipv6", str, "fd00::a9fe:a01", "the address fastpath sources "
        "hairpinned IPv6 Service traffic from (a pod reaching itself through an IPv6 ClusterIP): one no "
        "pod, node or Service uses, of global scope (a pod answers a link-local source from "
        "its own link-local address)", check=_ipv6_global),
    Key("policy_map_size", int, 65536, "max NetworkPolicy rule entries (pod, peer identity, "
        "direction, protocol, port block) on this node", minimum=16, maximum=1 << 22),
    Key("ipcache_map_size", int, 65536, "max NetworkPolicy peer prefixes (pod and node /32s, "
        "ipBlock boundaries)", minimum=16, maximum=1 << 22),
    Key("policy_pod_lookup_timeout_ms", int, 2000, "how long a CNI ADD waits for a new pod's "
        "labels when the agent's store does not hold its Pod (one GET of the Pod, or a rescan "
        "of the manifest directory, retried while unanswered) before the pod starts in "
        "policy_unknown_pod's state", minimum=0, maximum=60000),
    Key("policy_unknown_pod", str, "deny-ingress", "NetworkPolicy state of a new pod whose "
        "labels are not known when its CNI ADD returns, until its Pod arrives: deny-ingress "
        "(only the node reaches it; egress as the mode says) or open",
        choices=("deny-ingress", "open")),
    Key("cgroup_root", str, "", "cgroup v2 directory where socket-LB programs attach "
        "(empty: the cgroup2 mount of this host)", check=_abs_path_or_empty),
    Key("metrics_address", str, f"{NODE_IP}:9962",
        f"host:port of the Prometheus endpoint /metrics; host `{NODE_IP}` (the first IPv4 "
        "address of primary_device: what Prometheus scrapes, reachable from the VPC and the "
        "node's pods), `127.0.0.1` (the node alone), an explicit address, or `0.0.0.0` (every "
        "address of the node) (empty: off; port 0: any free port)",
        check=_listen_address),
    Key("health_address", str, "127.0.0.1:9099",
        "host:port of /healthz (liveness) and /readyz (readiness), for the kubelet's probes; "
        "the same choices as metrics_address (empty: off; port 0: any free port)",
        check=_listen_address),
    Key("http_max_connections", int, 64, "open connections each HTTP listener (health, "
        "metrics) keeps; beyond, the oldest one still sending its request is closed",
        minimum=1, maximum=4096),
    Key("http_timeout", int, 5, "seconds an HTTP client has to send its request headers, "
        "then its body, and to take the answer", minimum=1, maximum=300),
    Key("eni_config", str, "", "Terway's eni-config ConfigMap, mounted (a directory) or as a file: "
        "disable_network_policy selects policy_enforcement never/default (file and flags win)",
        check=_abs_path_or_empty),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}


@dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    origin: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()     # what a source said beyond values (eni-config's mode)

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
        return Config(values, org, self.notes)

    def with_file(self, path: str | Path) -> "Config":
        data = read_file(path)
        try:
            return self.with_values(data, f"file {path}")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def with_eni_config(self, path: str) -> "Config":
        """Apply what Terway's eni-config says (agent/config/eniconfig.py)."""
        from agent.config import eniconfig
        try:
            eni = eniconfig.read(path)
            cfg = self.with_values(eni.overrides, f"eni-config {path}")
        except (eniconfig.EniConfigError, ConfigError) as exc:
            raise ConfigError(f"eni_config: {exc}") from None
        notes = [f"eni-config {path}: Terway mode {eni.mode}"] + [
            f"eni-config {path}: {n}" for n in eni.notes]
        return Config(cfg.values, cfg.origin, self.notes + tuple(notes))

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.values.items()}

    def replace(self, **kw: Any) -> "Config":
        return self.with_values(kw, "override")


def parse_document(text: str) -> Any:
    """A JSON or YAML document: JSON first (the common case, and no YAML
    import for it), then YAML; ValueError with YAML's complaint when
    neither parses (the caller names the file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import yaml
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(str(exc)) from None


def read_file(path: str | Path) -> dict:
    """A configuration file's mapping of keys (YAML or JSON), unvalidated."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data = parse_document(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid YAML or JSON: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of configuration keys")
    return data


def load(file: str | Path | None = None, flags: Mapping[str, Any] | None = None) -> Config:
    """The configuration in force: defaults, then Terway's eni-config (when
    `eni_config` names one), then the file, then flags. The file and flags
    come last so an operator's explicit choice wins over what Terway says."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    data = read_file(file) if file else {}
    eni_path = flags.get("eni_config", data.get("eni_config", KEYS_BY_NAME["eni_config"].default))
    cfg = Config.defaults()
    if eni_path:
        coerce("eni_config", eni_path)
        cfg = cfg.with_eni_config(eni_path)
    if file:
        cfg = cfg.with_file(file)
    return cfg.with_values(flags, "flag")


def describe(cfg: Config) -> list[dict]:
    """One row per key for `fastpath config show`: value, where it came from,
    and whether the datapath acts on it yet."""
    rows = []
    for k in KEYS:
        value = cfg.values[k.name]
        rows.append({"key": k.name, "value": list(value) if isinstance(value, tuple) else value,
                     "source": cfg.origin.get(k.name, "default"),
                     "in_effect": not k.pending, "pending": k.pending})
    return rows


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
            value = _bool(raw)
        else:
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            value = raw
        if key.check is not None:
            key.check(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: invalid value {raw!r}: {exc}") from None
    if key.choices and value not in key.choices:
        allowed = ", ".join(show(c) for c in key.choices)
        why = f" ({key.why})" if key.why else ""
        raise ConfigError(f"{name}: {show(value)!r} is not one of {allowed}{why}")
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{name}: {value} is below the minimum {key.minimum}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(f"{name}: {value} is above the maximum {key.maximum}")
    return value


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _bool(raw: Any) -> bool:
    """Booleans are typed: YAML/JSON true/false, or those words in a flag.
    Anything else (a number, "enabled", a list) is an error, never truthy."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError("expected true or false")


def show(value: Any) -> str:
    """A value as the configuration file would spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)


def field_names() -> list[str]:
    return [k.name for k in KEYS]


__all__ = ["Config", "ConfigError", "KEYS", "coerce", "describe", "field_names", "load"]


def docs_rows() -> list[str]:
    """The configuration reference's table rows (docs/configuration.md), made
    from the schema so the docs cannot drift from it (tests/unit/test_docs.py
    checks, and prints the table to paste when it differs)."""
    rows = []
    for k in KEYS:
        default = ", ".join(k.default) if isinstance(k.default, tuple) else k.default
        text = k.help
        if k.choices and len(k.choices) == 1:
            text += "; the only supported value"
        if k.pending:
            text += " — **not yet in effect**"
        rows.append(f"| `{k.name}` | `{default}` | {text} |")
    return rows


def readme_rows() -> list[str]:
    """The same rows as docs_rows(); the README keeps a few of them."""
    return docs_rows()


def grpc_socket_path(cfg: Config) -> str:
    """Where the gRPC inspection service listens: grpc_socket, or
    grpc.sock in api_socket's directory."""
    import os
    return cfg.grpc_socket or os.path.join(os.path.dirname(cfg.api_socket) or ".", "grpc.sock")

