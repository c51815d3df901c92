"""Learn a pod endpoint from the kernel, not from what a CNI result claims.

Terway's CNI result holds only the pod's eth0 and IP (no host interface), so
the agent looks for itself: in the pod's netns (CNI_NETNS) it finds the
interface, its MAC, its IPv4 and IPv6 addresses (either may be missing,
not both) and the ifindex of its veth peer; in the
node's netns it finds the host-side peer (checking that it really points
back at the pod's interface) and resolves the pod's ENI from Terway's
policy routing (`from <podIP> lookup <table>` and that table's default
route), by asking the kernel which device it would route the pod's traffic to.
"""
from __future__ import annotations

import fcntl
import os
import socket
import stat

from pyroute2 import IPRoute

from agent.datapath.netlink import iproute
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath.errors import DatapathError
from agent.datapath.nsenter import CLONE_NEWNET, netns_path as _named_netns
from agent.datapath.tc import ifindex_by_name
from agent.model.endpoint import ENDPOINT_KEYS, Endpoint, is_endpoint_key

NS_GET_NSTYPE = 0xB703          # linux/nsfs.h: _IO(0xb7, 0x3)


class DiscoveryError(DatapathError):
    pass


class InvalidNetns(DiscoveryError):
    """The path handed over as a pod's netns is not one: relative, not a
    network namespace, or the node's own."""


def check_pod_netns(path, node_netns: str | None = None) -> None:
    """Refuse anything but an absolute path to a network namespace other
    than the node's. Asked of the kernel, without entering it: the path is
    stat'ed first and opened only if it is a regular file (nsfs files are),
    so a FIFO or a device is never opened."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidNetns(f"pod netns {path!r} is not an absolute path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DiscoveryError(f"pod netns {path!r} does not exist") from None
    except OSError as exc:
        raise InvalidNetns(f"pod netns {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidNetns(f"pod netns {path} is not a network namespace (not even a file)")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            raise InvalidNetns(f"pod netns {path} is not a network namespace") from None
        if nstype != CLONE_NEWNET:
            raise InvalidNetns(f"pod netns {path} is a namespace, but not a network namespace")
        mine = os.stat(_named_netns(node_netns) if node_netns else "/proc/thread-self/ns/net")
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            raise InvalidNetns(f"pod netns {path} is the node's own network namespace, "
                               "not a pod's")
    finally:
        os.close(fd)


def _pod_side(netns_path: str, ifname: str, node_netns: str | None = None):
    check_pod_netns(netns_path, node_netns)
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
        # The IPv6 source the anti-spoofing guard lets through besides
        # link-local ones (bpf/lib/guard.h); none on an IPv4-only pod.
        addrs6 = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx[0],
                                                                   family=socket.AF_INET6)
                  if a["scope"] == 0]
        if not addrs and not addrs6:
            raise DiscoveryError(f"{ifname} in {netns_path} has neither an IPv4 nor a global "
                                 "IPv6 address")
        if addrs and is_endpoint_key(addrs[0]):
            raise DiscoveryError(f"{ifname} in {netns_path} has IPv4 address {addrs[0]}, "
                                 f"in the endpoint key range {ENDPOINT_KEYS} (loopback), "
                                 "which no pod may use")
        return (idx[0], link.get_attr("IFLA_ADDRESS"), peer, addrs[0] if addrs else "",
                addrs6[0] if addrs6 else "")


# A documentation address (TEST-NET-1): only ever used as the destination of
# a route *lookup*, never of a packet.
PROBE_DST = "192.0.2.1"
PROBE_DST6 = "2001:db8::1"             # the IPv6 documentation prefix, likewise
NOT_AN_ENI_TABLE = {253, 254, 255}      # default, main, local
RTM_F_LOOKUP_TABLE = 0x1000             # report the table that matched, not "main"


def resolve_eni(ipr: IPRoute, pod_ip: str, host_ifindex: int) -> tuple[str, int]:
    """The device the node's policy routing sends `pod_ip`'s traffic out of:
    the same question the BPF program asks the FIB, asked once here as a
    route lookup (`ip route get <off-node> from <podIP> iif <veth>`), so
    Terway's `from <podIP> lookup <eni table>` rule decides. One netlink
    message, where dumping every rule and route would cost O(pods)."""
    six = ":" in pod_ip
    try:
        routes = ipr.route("get", dst=PROBE_DST6 if six else PROBE_DST, src=pod_ip,
                           iif=host_ifindex, flags=RTM_F_LOOKUP_TABLE,
                           family=socket.AF_INET6 if six else socket.AF_INET)
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
    pod_idx, pod_mac, peer_idx, pod_ip, pod_ip6 = _pod_side(netns_path, ifname, node_netns)
    with iproute(node_netns) as ipr:
        try:
            host = ipr.get_links(peer_idx)[0]
        except (NetlinkError, IndexError):
            raise DiscoveryError(f"host-side peer (ifindex {peer_idx}) of {ifname} in "
                                 f"{netns_path} not found in the node netns") from None
        if host.get_attr("IFLA_LINK") != pod_idx:
            raise DiscoveryError(f"ifindex {peer_idx} in the node netns is not the peer of "
                                 f"{ifname} in {netns_path}")
        # (an IPv6-only pod's ENI by its IPv6 rule, as Terway adds one per family)
        eni_name, eni_idx = resolve_eni(ipr, pod_ip or pod_ip6, peer_idx)
    return Endpoint(ip=pod_ip, host_ifname=host.get_attr("IFLA_IFNAME"), host_ifindex=peer_idx,
                    host_mac=host.get_attr("IFLA_ADDRESS"), pod_mac=pod_mac,
                    eni_name=eni_name, eni_ifindex=eni_idx, ifname=ifname, netns=netns_path,
                    ip6=pod_ip6, **identity)
