"""A pod endpoint on this node, as fastpath knows it (pure data).

Created from what the CNI plugin hands over plus what the agent discovers in
the pod's netns and the node's routing; persisted in the agent's state dir so
a restarted agent can restore the datapath without asking anyone.
"""
from __future__ import annotations

import ipaddress
import json
import zlib
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Endpoint:
    ip: str                    # pod IPv4 address ("" for an IPv6-only pod)
    host_ifname: str           # host-side veth (cali*)
    host_ifindex: int
    host_mac: str
    pod_mac: str
    eni_name: str = ""         # ENI the pod's policy routing uses ("" = unresolved)
    eni_ifindex: int = 0
    container_id: str = ""
    ifname: str = "eth0"       # interface inside the pod
    netns: str = ""            # CNI_NETNS at ADD time
    pod_namespace: str = ""
    pod_name: str = ""
    ip6: str = ""              # the pod's global IPv6 address on that interface, if any
    # When this attachment was (last) registered (wall clock, persisted): a
    # CNI DEL queued before it is about an earlier attachment and is dropped.
    added_at: float = 0.0
    # hostPorts from the CNI portMappings capability, validated by the agent:
    # (host port, container port, protocol, host IP or "") each
    port_mappings: tuple[tuple[int, int, str, str], ...] = ()
    # An IPv6-only pod's endpoint key (ENDPOINT_KEYS), allocated by the
    # agent at ADD and persisted here; "" for a pod with an IPv4 address,
    # whose address is its key.
    endpoint_key: str = ""

    @property
    def pod_key(self) -> str:
        """The 32-bit key (dotted) the per-pod maps know the pod by: its
        IPv4 address, or an IPv6-only pod's endpoint key."""
        return self.ip or self.endpoint_key

    @property
    def key(self) -> str:
        """Identity of a CNI attachment: container id + interface name."""
        return f"{self.container_id or self.ip or self.ip6}-{self.ifname}"

    @property
    def ep_id(self) -> int:
        """A stable small id (monitor events, policy), derived from the IP."""
        return zlib.crc32((self.ip or self.ip6).encode()) & 0x7FFFFFFF

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def owner(self) -> tuple[str, str]:
        """The pod this attachment belongs to (namespace, name), or the
        container id when the runtime gave no pod name: what its hostPorts
        are registered under, so a new sandbox of one pod replaces the old."""
        if self.pod_name:
            return (self.pod_namespace, self.pod_name)
        return ("", self.container_id or self.ip or self.ip6)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Endpoint":
        """An endpoint from its state file; ValueError naming the field if
        the text is not one (a file written by hand, or damaged)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            if f.name == "port_mappings":
                values[f.name] = _port_mappings(data[f.name])
                continue
            value, want = data[f.name], _FIELD_TYPES[f.type]
            if isinstance(value, bool) or not isinstance(value, want):
                raise ValueError(f"{f.name} must be {_TYPE_WORDS[f.type]}, not {value!r:.40}")
            values[f.name] = value
        if "ip" not in values:
            raise ValueError("no ip")
        if values["ip"]:
            try:
                ipaddress.IPv4Address(values["ip"])
            except ValueError:
                raise ValueError(f"ip {values['ip']!r:.40} is not an IPv4 address") from None
            if is_endpoint_key(values["ip"]):
                raise ValueError(f"ip {values['ip']} is in the endpoint key range "
                                 f"{ENDPOINT_KEYS}, not a pod address")
        if values.get("ip6"):
            try:
                ipaddress.IPv6Address(values["ip6"])
            except ValueError:
                raise ValueError(f"ip6 {values['ip6']!r:.40} is not an IPv6 address") from None
        key = values.get("endpoint_key", "")
        if values["ip"] and key:
            raise ValueError(f"endpoint_key {key!r:.40} is set on an endpoint with an IPv4 "
                             "address (only an IPv6-only pod has one)")
        if not values["ip"]:
            if not values.get("ip6"):
                raise ValueError("neither ip nor ip6: an endpoint has an address")
            if not is_endpoint_key(key):
                raise ValueError(f"endpoint_key {key!r:.40} is not in the endpoint key range "
                                 f"{ENDPOINT_KEYS} (an IPv6-only endpoint needs one)")
        return cls(**values)


# An IPv6-only pod has no IPv4 address to key it by in the per-pod maps
# (NetworkPolicy isolation and rules, bandwidth limits and state), which
# take a 32-bit key so that the IPv4 path keeps its 4-byte lookups. The agent
# gives it a key from this range instead: part of 127.0.0.0/8 (loopback),
# which is never a pod's address and never the source or destination of a
# packet on a veth or an ENI (the kernel refuses it there as martian). The
# key is written in the veth's registration (fp_ep_if.ip4, flagged
# FP_EPIF_F_KEY: no address) and in the per-pod maps, never in the IPv4
# endpoints or identity maps, so no IPv4 packet to or from it is a pod's.
ENDPOINT_KEYS = ipaddress.IPv4Network("127.255.0.0/16")


def is_endpoint_key(ip: str) -> bool:
    try:
        return ipaddress.IPv4Address(ip) in ENDPOINT_KEYS
    except ValueError:
        return False


def allocate_endpoint_key(taken) -> str:
    """The lowest key of ENDPOINT_KEYS not in `taken` (dotted strings);
    ValueError when all are taken."""
    used = {int(ipaddress.IPv4Address(k)) for k in taken if is_endpoint_key(k)}
    first = int(ENDPOINT_KEYS.network_address) + 1
    for n in range(first, int(ENDPOINT_KEYS.broadcast_address)):
        if n not in used:
            return str(ipaddress.IPv4Address(n))
    raise ValueError(f"every endpoint key of {ENDPOINT_KEYS} is taken")


def _port_mappings(value) -> tuple[tuple[int, int, str, str], ...]:
    shape = "a list of [host port, container port, protocol, host IP]"
    if not isinstance(value, list):
        raise ValueError(f"port_mappings must be {shape}, not {value!r:.40}")
    out = []
    for m in value:
        if (not isinstance(m, list) or len(m) != 4
                or any(isinstance(x, bool) or not isinstance(x, int) for x in m[:2])
                or not all(isinstance(x, str) for x in m[2:])):
            raise ValueError(f"port_mappings must be {shape}, not {m!r:.40}")
        out.append(tuple(m))
    return tuple(out)


_FIELD_TYPES = {"str": str, "int": int, "float": (int, float)}
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number"}
