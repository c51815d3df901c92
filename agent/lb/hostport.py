"""Pods' hostPorts as frontends (pure): the CNI portMappings capability.

A pod's `hostPort` reaches fastpath the way it reaches the portmap plugin:
the runtime reads the conflist's `"capabilities": {"portMappings": true}`
and hands the pod's mappings to fastpath-cni in `runtimeConfig.portMappings`
(hostPort, containerPort, protocol, hostIP); the plugin passes them to the
agent with the ADD. Each mapping becomes frontends hostIP:hostPort/protocol
-> podIP:containerPort: on hostIP alone when the pod names one (to the
pod's address of hostIP's family), else on every local address of the node
(portmap's `--dst-type LOCAL`) of each family the pod has an address of. They are
translated like any frontend, per packet and at the socket, and go with
the endpoint (CNI DEL).

Conflicts. Two pods cannot own one address:port/protocol, and a Service
frontend (ClusterIP, NodePort, external or load-balancer IP) on the same
address:port/protocol wins over a hostPort. An ADD whose mappings would
lose (`conflicts()`) is refused, naming the owner; a Service that later
takes a pod's port is reported (`HostPorts.combine`), never silently
shadowed. Mappings of the same pod (a new sandbox of one namespace/name)
replace each other.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from agent.k8s.model import Key
from agent.lb.compile import KIND_HOST_PORT, Backend, Frontend, FrontendState

__all__ = ["PortMapping", "PortMappingError", "parse_port_mappings", "frontends_of",
           "family_refusal",
           "Conflict", "HostPorts"]

PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP"}


class PortMappingError(ValueError):
    """A portMappings entry is invalid; the message names the entry and field."""


@dataclass(frozen=True, slots=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "TCP"          # TCP, UDP, SCTP
    host_ip: str = ""              # "" = every local address

    def to_dict(self) -> dict:
        return {"hostPort": self.host_port, "containerPort": self.container_port,
                "protocol": self.protocol.lower(), "hostIP": self.host_ip}

    def __str__(self) -> str:
        host = f"[{self.host_ip}]" if ":" in self.host_ip else (self.host_ip or "*")
        return f"{host}:{self.host_port}/{self.protocol}->{self.container_port}"


def _port(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
        raise PortMappingError(f"{where}: expected a port number 1-65535, not {v!r}")
    return v


def parse_port_mappings(raw: Any, where: str = "runtimeConfig.portMappings"
                        ) -> tuple[tuple[PortMapping, ...], list[str]]:
    """CNI runtimeConfig.portMappings -> (mappings, notes). Raises
    PortMappingError naming the entry and field for anything malformed;
    nothing of a bad list is kept. `notes` is kept for callers (empty
    today: IPv6 hostIPs are served too)."""
    if raw is None:
        return (), []
    if not isinstance(raw, list):
        raise PortMappingError(f"{where}: expected a list, not {type(raw).__name__}")
    out: list[PortMapping] = []
    notes: list[str] = []
    seen: dict[tuple, int] = {}
    for i, e in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise PortMappingError(f"{at}: expected an object, not {type(e).__name__}")
        host = _port(e.get("hostPort"), f"{at}.hostPort")
        cport = _port(e.get("containerPort"), f"{at}.containerPort")
        proto_raw = e.get("protocol", "tcp") or "tcp"
        if not isinstance(proto_raw, str) or proto_raw.lower() not in PROTOCOLS:
            raise PortMappingError(f"{at}.protocol: {proto_raw!r} is not tcp, udp or sctp")
        proto = PROTOCOLS[proto_raw.lower()]
        host_ip = e.get("hostIP", "") or ""
        if not isinstance(host_ip, str):
            raise PortMappingError(f"{at}.hostIP: expected an address, not {host_ip!r}")
        if host_ip:
            try:
                addr = ipaddress.ip_address(host_ip)
            except ValueError:
                raise PortMappingError(f"{at}.hostIP: {host_ip!r} is not an IP address") \
                    from None
            host_ip = "" if addr.is_unspecified else str(addr)
        m = PortMapping(host, cport, proto, host_ip)
        k = (host_ip, host, proto)
        if k in seen:
            raise PortMappingError(f"{at}: {host_ip or '*'}:{host}/{proto} is already mapped "
                                   f"by {where}[{seen[k]}]")
        seen[k] = i
        out.append(m)
    return tuple(out), notes


def family_refusal(mappings: Iterable[PortMapping], pod_ip: str, pod_ip6: str
                   ) -> Optional[str]:
    """Why a pod cannot have these mappings: a hostIP of a family the pod
    has no address of, or a pod without any address."""
    for m in mappings:
        if not m.host_ip:
            if not (pod_ip or pod_ip6):
                return f"hostPort {m} needs a pod address"
            continue
        six = ":" in m.host_ip
        if six and not pod_ip6:
            return f"hostPort {m}: hostIP {m.host_ip} is IPv6, the pod has no IPv6 address"
        if not six and not pod_ip:
            return f"hostPort {m}: hostIP {m.host_ip} is IPv4, the pod has no IPv4 address"
    return None


def frontends_of(owner: Key, pod_ip: str, mappings: Iterable[PortMapping],
                 local_ips: Iterable[str], node_name: str = "", pod_ip6: str = "",
                 local_ips6: Iterable[str] = ()) -> dict[Frontend, FrontendState]:
    """The frontends of one pod's mappings, per family (a family the pod
    has no address of gets none; family_refusal says when that is wrong)."""
    local = tuple(local_ips)
    local6 = tuple(local_ips6)
    out: dict[Frontend, FrontendState] = {}
    for m in mappings:
        for ip6, pod, where in ((False, pod_ip, local), (True, pod_ip6, local6)):
            if not pod:
                continue
            if m.host_ip:
                if (":" in m.host_ip) != ip6:
                    continue
                where = (m.host_ip,)
            st = FrontendState(owner, f"hostport-{m.host_port}",
                               (Backend(pod, m.container_port, m.protocol, False, node_name),),
                               kind=KIND_HOST_PORT)
            for ip in where:
                out.setdefault(Frontend(ip, m.host_port, m.protocol), st)
    return out


@dataclass(frozen=True, slots=True)
class Conflict:
    frontend: Frontend
    loser: Key                     # the pod whose hostPort does not get it
    winner: str                    # "Service ns/name" or "pod ns/name"

    def __str__(self) -> str:
        return (f"hostPort {self.frontend} of pod {self.loser[0]}/{self.loser[1]} is taken "
                f"by {self.winner}")


def _owner_name(st: FrontendState) -> str:
    what = "pod" if st.kind == KIND_HOST_PORT else "Service"
    return f"{what} {st.service[0]}/{st.service[1]}"


class HostPorts:
    """Every local pod's hostPort frontends, and which ones win.

        hp = HostPorts()
        updates = hp.set(owner, frontends)          # an ADD (or a restore)
        updates = hp.remove(owner)                  # a DEL
        ...
        combined = hp.combine(fe, service_state)    # what the maps get

    A frontend claimed by several pods goes to the owner first in
    (namespace, name) order; either way the others are in `conflicts`.
    """

    def __init__(self) -> None:
        self.by_owner: dict[Key, dict[Frontend, FrontendState]] = {}
        self._claims: dict[Frontend, set[Key]] = {}

    def owners(self) -> list[Key]:
        return sorted(self.by_owner)

    def set(self, owner: Key, frontends: Mapping[Frontend, FrontendState]) -> set[Frontend]:
        """Replace `owner`'s frontends; returns the frontends whose winner may
        have changed."""
        touched = set(self.remove(owner))
        if frontends:
            self.by_owner[owner] = dict(frontends)
            for fe in frontends:
                self._claims.setdefault(fe, set()).add(owner)
                touched.add(fe)
        return touched

    def remove(self, owner: Key) -> set[Frontend]:
        old = self.by_owner.pop(owner, {})
        for fe in old:
            claims = self._claims.get(fe)
            if claims is not None:
                claims.discard(owner)
                if not claims:
                    del self._claims[fe]
        return set(old)

    def winner(self, fe: Frontend) -> Optional[FrontendState]:
        claims = self._claims.get(fe)
        if not claims:
            return None
        return self.by_owner[min(claims)][fe]

    def frontends(self) -> set[Frontend]:
        return set(self._claims)

    def combine(self, fe: Frontend, service_state: Optional[FrontendState]
                ) -> Optional[FrontendState]:
        """What `fe` translates to: a Service's frontend beats any hostPort."""
        if service_state is not None:
            return service_state
        return self.winner(fe)

    def conflicts(self, services: Mapping[Frontend, FrontendState]) -> list[Conflict]:
        """Every hostPort frontend some pod does not get, and who has it."""
        out: list[Conflict] = []
        for fe in sorted(self._claims, key=Frontend.sort_key):
            claims = sorted(self._claims[fe])
            svc = services.get(fe)
            winner = _owner_name(svc) if svc is not None else None
            for i, owner in enumerate(claims):
                if winner is None and i == 0:
                    winner = _owner_name(self.by_owner[owner][fe])
                    continue
                out.append(Conflict(fe, owner, winner))
        return out

    def refusal(self, owner: Key, frontends: Mapping[Frontend, FrontendState],
                services: Mapping[Frontend, FrontendState]) -> list[Conflict]:
        """Why an ADD of `owner` with `frontends` must be refused: each of
        its frontends a Service has, or another pod (not `owner` itself)
        already holds."""
        out: list[Conflict] = []
        for fe in sorted(frontends, key=Frontend.sort_key):
            svc = services.get(fe)
            if svc is not None:
                out.append(Conflict(fe, owner, _owner_name(svc)))
                continue
            others = sorted(c for c in self._claims.get(fe, ()) if c != owner)
            if others:
                out.append(Conflict(fe, owner, _owner_name(self.by_owner[others[0]][fe])))
        return out
