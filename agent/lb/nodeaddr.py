"""Which of this node's addresses serve NodePorts and hostPorts (pure).

kube-proxy's --nodeport-addresses picks the addresses NodePorts answer on:
by default the node's primary address per family ("primary"), or every
address of the node that lies in one of a list of CIDRs. fastpath reads the
same choice from `nodeport_addresses` (agent/config/schema.py): empty means
primary. The primary address of a family is the Node object's first
InternalIP of that family when the cluster state has it, otherwise the
first (global, for IPv6) address of that family on the node's primary
device (eth0), which is the InternalIP Terway nodes report.

The CIDR list covers both families, each on its own, as kube-proxy runs a
proxier per family: a family with CIDRs in the list answers on its
addresses inside them; a family the list has no CIDR of keeps its primary
address (kube-proxy would take every address of that family; a list naming
only IPv4 prefixes is read as being about IPv4, and an IPv6 NodePort on
every address, link-local ones included, is never what it meant). IPv6
link-local addresses never serve NodePorts: they are a link's, no client
reaches them through the VPC.

A hostPort without a hostIP answers on every local address, as the portmap
plugin's `--dst-type LOCAL` match does: the node's interface addresses
(loopback too, for the node's own sockets; link-local ones are the node's
plumbing, not addresses clients use), per family: an IPv4 pod's on the
IPv4 ones, an IPv6 pod's on the global IPv6 ones and ::1.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["NodeAddresses", "nodeport_addresses", "local_addresses", "node_addresses"]

_LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")
_LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    """The node's addresses as the Service compiler needs them (sorted).
    The IPv4 and IPv6 ones apart: the datapath's SNAT source of each
    family reads its own; the health-check server serves both lists."""

    primary: tuple[str, ...] = ()      # the primary IPv4 address (one, or none yet)
    nodeport: tuple[str, ...] = ()     # where IPv4 NodePorts answer
    local: tuple[str, ...] = ()        # where a hostPort without hostIP answers
    primary6: tuple[str, ...] = ()     # the primary IPv6 address (one, or none)
    nodeport6: tuple[str, ...] = ()    # where IPv6 NodePorts answer
    local6: tuple[str, ...] = ()       # where an IPv6 hostPort without hostIP answers


def _version(ip: str) -> int:
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        return 0


def _v4(ip: str) -> bool:
    return _version(ip) == 4


def _global6(ip: str) -> bool:
    return _version(ip) == 6 and ipaddress.ip_address(ip) not in _LINK_LOCAL6


def _sorted(ips: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({str(ipaddress.ip_address(ip)) for ip in ips},
                        key=lambda ip: ipaddress.ip_address(ip).packed))


def nodeport_addresses(cidrs: Sequence[str], interface_ips: Iterable[str],
                       primary: Sequence[str], family: int = 4) -> tuple[str, ...]:
    """kube-proxy's --nodeport-addresses, resolved for one family (4 or 6).
    `cidrs` without a CIDR of the family: its primary address; otherwise
    every interface address of the family in one of them."""
    ok = _v4 if family == 4 else _global6
    nets = [n for n in (ipaddress.ip_network(c) for c in cidrs) if n.version == family]
    if not nets:
        return _sorted(ip for ip in primary[:1] if ok(ip))
    return _sorted(ip for ip in interface_ips
                   if ok(ip) and any(ipaddress.ip_address(ip) in n for n in nets))


def local_addresses(interface_ips: Iterable[str], family: int = 4) -> tuple[str, ...]:
    if family == 6:
        return _sorted(ip for ip in interface_ips if _global6(ip))
    return _sorted(ip for ip in interface_ips
                   if _v4(ip) and ipaddress.ip_address(ip) not in _LINK_LOCAL)


def node_addresses(cidrs: Sequence[str], interface_ips: Iterable[str],
                   node_object_ips: Sequence[str] = (),
                   primary_device_ips: Sequence[str] = ()) -> NodeAddresses:
    """Everything at once. node_object_ips: the Node's InternalIPs in the
    object's order; primary_device_ips: eth0's addresses in the kernel's
    order (the first is the one it was given first); both families."""
    ips = list(interface_ips)
    known = list(node_object_ips) + list(primary_device_ips)
    primary = tuple(ip for ip in known if _v4(ip))[:1]
    primary6 = tuple(str(ipaddress.ip_address(ip)) for ip in known if _global6(ip))[:1]
    return NodeAddresses(primary, nodeport_addresses(cidrs, ips, primary),
                         local_addresses(ips), primary6,
                         nodeport_addresses(cidrs, ips, primary6, family=6),
                         local_addresses(ips, family=6))
