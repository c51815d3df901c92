"""Which of this node's addresses serve NodePorts and hostPorts (pure).

kube-proxy's --nodeport-addresses picks the addresses NodePorts answer on:
by default the node's primary address per family ("primary"), or every
address of the node that lies in one of a list of CIDRs. fastpath reads the
same choice from `nodeport_addresses` (agent/config/schema.py): empty means
primary. The primary IPv4 address is the Node object's first InternalIP
when the cluster state has it, otherwise the first address of the node's
primary device (eth0), which is the InternalIP Terway nodes report.

A hostPort without a hostIP answers on every local address, as the portmap
plugin's `--dst-type LOCAL` match does: the node's interface addresses
(loopback too, for the node's own sockets; link-local ones are the node's
plumbing, not addresses clients use).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["NodeAddresses", "nodeport_addresses", "local_addresses", "node_addresses"]

_LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    """The node's addresses as the Service compiler needs them (IPv4, sorted)."""

    primary: tuple[str, ...] = ()      # the primary address (one, or none yet)
    nodeport: tuple[str, ...] = ()     # where NodePorts answer
    local: tuple[str, ...] = ()        # where a hostPort without hostIP answers


def _v4(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).version == 4
    except ValueError:
        return False


def _sorted(ips: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(ips), key=lambda ip: ipaddress.ip_address(ip).packed))


def nodeport_addresses(cidrs: Sequence[str], interface_ips: Iterable[str],
                       primary: Sequence[str]) -> tuple[str, ...]:
    """kube-proxy's --nodeport-addresses, resolved. `cidrs` empty: the
    primary address; otherwise every interface address in one of them."""
    if not cidrs:
        return _sorted(ip for ip in primary[:1] if _v4(ip))
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return _sorted(ip for ip in interface_ips
                   if _v4(ip) and any(ipaddress.ip_address(ip) in n for n in nets
                                      if n.version == 4))


def local_addresses(interface_ips: Iterable[str]) -> tuple[str, ...]:
    return _sorted(ip for ip in interface_ips
                   if _v4(ip) and ipaddress.ip_address(ip) not in _LINK_LOCAL)


def node_addresses(cidrs: Sequence[str], interface_ips: Iterable[str],
                   node_object_ips: Sequence[str] = (),
                   primary_device_ips: Sequence[str] = ()) -> NodeAddresses:
    """Everything at once. node_object_ips: the Node's InternalIPs in the
    object's order; primary_device_ips: eth0's addresses in the kernel's
    order (the first is the one it was given first)."""
    ips = list(interface_ips)
    primary = tuple(ip for ip in list(node_object_ips) + list(primary_device_ips)
                    if _v4(ip))[:1]
    return NodeAddresses(primary, nodeport_addresses(cidrs, ips, primary),
                         local_addresses(ips))
