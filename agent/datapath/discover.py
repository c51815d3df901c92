"""Learn a pod endpoint from the kernel, not from what a CNI result claims.

Terway's CNI result holds only the pod's eth0 and IP (no host interface), so
the agent looks for itself: in the pod's netns (CNI_NETNS) it finds the
interface, its MAC and IPv4 address and the ifindex of its veth peer; in the
node's netns it finds the host-side peer (checking that it really points
back at the pod's interface) and resolves the pod's ENI from Terway's
policy routing (`from <podIP> lookup <table>` and that table's default
route), by asking the kernel which device it would route the pod's traffic to.
"""
from __future__ import annotations

import os
import socket

from pyroute2 import IPRoute

from agent.datapath.netlink import iproute
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath.errors import DatapathError
from agent.datapath.tc import ifindex_by_name
from agent.model.endpoint import Endpoint


class DiscoveryError(DatapathError):
    pass


def _pod_side(netns_path: str, ifname: str):
    if not netns_path or not os.path.exists(netns_path):
        raise DiscoveryError(f"pod netns {netns_path!r} does not exist")
    try:
        ipr = iproute(netns_path)
    except Exception as exc:
        raise DiscoveryError(f"cannot open pod netns {netns_path}: {exc}") from None
    with ipr:
        idx = ifindex_by_name(ipr, ifname)
        if idx is None:
            raise DiscoveryError(f"interface {ifname} not found in pod netns {netns_path}")
        idx = [idx]
        link = ipr.get_links(idx[0])[0]
        peer = link.get_attr("IFLA_LINK")
        if not peer:
            raise DiscoveryError(f"{ifname} in {netns_path} is not a veth (no peer ifindex)")
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx[0], family=socket.AF_INET)
                 if a["scope"] == 0]
        if not addrs:
            raise DiscoveryError(f"{ifname} in {netns_path} has no IPv4 address")
        # The IPv6 source the anti-spoofing guard lets through besides
        # link-local ones (bpf/lib/guard.h); none on an IPv4-only pod.
        addrs6 = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx[0],
                                                                   family=socket.AF_INET6)
                  if a["scope"] == 0]
        return idx[0], link.get_attr("IFLA_ADDRESS"), peer, addrs[0], (addrs6[0] if addrs6 else "")


# A documentation address (TEST-NET-1): only ever used as the destination of
# a route *lookup*, never of a packet.
PROBE_DST = "192.0.2.1"
NOT_AN_ENI_TABLE = {253, 254, 255}      # default, main, local
RTM_F_LOOKUP_TABLE = 0x1000             # report the table that matched, not "main"


def resolve_eni(ipr: IPRoute, pod_ip: str, host_ifindex: int) -> tuple[str, int]:
    """The device the node's policy routing sends `pod_ip`'s traffic out of:
    the same question the BPF program asks the FIB, asked once here as a
    route lookup (`ip route get <off-node> from <podIP> iif <veth>`), so
    Terway's `from <podIP> lookup <eni table>` rule decides. One netlink
    message, where dumping every rule and route would cost O(pods)."""
    try:
        routes = ipr.route("get", dst=PROBE_DST, src=pod_ip, iif=host_ifindex,
                           flags=RTM_F_LOOKUP_TABLE)
    except NetlinkError:
        return "", 0
    for r in routes:
        oif = r.get_attr("RTA_OIF")
        # An answer from the main (or local/default) table means no policy
        # rule claimed the pod: its traffic leaves by the node's own route,
        # through no ENI of its own.
        if oif and r.get_attr("RTA_TABLE") not in NOT_AN_ENI_TABLE:
            return ipr.get_links(oif)[0].get_attr("IFLA_IFNAME"), oif
    return "", 0


def discover(netns_path: str, ifname: str = "eth0", node_netns: str | None = None,
             **identity) -> Endpoint:
    """Build the Endpoint for the pod interface `ifname` in `netns_path`.
    `identity` carries container_id, pod_namespace, pod_name."""
    pod_idx, pod_mac, peer_idx, pod_ip, pod_ip6 = _pod_side(netns_path, ifname)
    with iproute(node_netns) as ipr:
        try:
            host = ipr.get_links(peer_idx)[0]
        except (NetlinkError, IndexError):
            raise DiscoveryError(f"host-side peer (ifindex {peer_idx}) of {ifname} in "
                                 f"{netns_path} not found in the node netns") from None
        if host.get_attr("IFLA_LINK") != pod_idx:
            raise DiscoveryError(f"ifindex {peer_idx} in the node netns is not the peer of "
                                 f"{ifname} in {netns_path}")
        eni_name, eni_idx = resolve_eni(ipr, pod_ip, peer_idx)
    return Endpoint(ip=pod_ip, host_ifname=host.get_attr("IFLA_IFNAME"), host_ifindex=peer_idx,
                    host_mac=host.get_attr("IFLA_ADDRESS"), pod_mac=pod_mac,
                    eni_name=eni_name, eni_ifindex=eni_idx, ifname=ifname, netns=netns_path,
                    ip6=pod_ip6, **identity)
