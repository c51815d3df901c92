"""A pod endpoint on this node, as fastpath knows it (pure data).

Created from what the CNI plugin hands over plus what the agent discovers in
the pod's netns and the node's routing; persisted in the agent's state dir so
a restarted agent can restore the datapath without asking anyone.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Endpoint:
    ip: str                    # pod IPv4 address
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
    # hostPorts from the CNI portMappings capability, validated by the agent:
    # (host port, container port, protocol, host IP or "") each
    port_mappings: tuple[tuple[int, int, str, str], ...] = ()

    @property
    def key(self) -> str:
        """Identity of a CNI attachment: container id + interface name."""
        return f"{self.container_id or self.ip}-{self.ifname}"

    @property
    def ep_id(self) -> int:
        """A stable small id (monitor events, policy), derived from the IP."""
        return zlib.crc32(self.ip.encode()) & 0x7FFFFFFF

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def owner(self) -> tuple[str, str]:
        """The pod this attachment belongs to (namespace, name), or the
        container id when the runtime gave no pod name: what its hostPorts
        are registered under, so a new sandbox of one pod replaces the old."""
        if self.pod_name:
            return (self.pod_namespace, self.pod_name)
        return ("", self.container_id or self.ip)

    @classmethod
    def from_json(cls, text: str) -> "Endpoint":
        data = json.loads(text)
        if "port_mappings" in data:
            data["port_mappings"] = tuple(tuple(m) for m in data["port_mappings"])
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
