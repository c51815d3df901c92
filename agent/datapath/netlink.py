"""rtnetlink sockets bound to a chosen network namespace.

A netlink socket belongs to the netns it was created in, whatever thread
uses it later. So we create it with the calling thread briefly inside the
target netns (agent/datapath/nsenter.py) and switch straight back: no
forked helper process, and no other thread is ever moved.
"""
from __future__ import annotations

import os
import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath.nsenter import in_netns


def iproute(netns: str | None = None) -> IPRoute:
    """An IPRoute for `netns` (name or path; None = the caller's netns).
    Use as a context manager."""
    with in_netns(netns):
        return IPRoute()


def link_name(ifindex: int, netns: str | None = None) -> str | None:
    """The name of the link with `ifindex` in `netns`; None when there is none."""
    with iproute(netns) as ipr:
        try:
            links = ipr.get_links(ifindex)
        except NetlinkError:
            return None
    return links[0].get_attr("IFLA_IFNAME") if links else None


def link_names(netns: str | None = None) -> dict[int, str]:
    """ifindex -> name of every link in `netns`. libc's if_nameindex reads
    the same rtnetlink dump in C: with a thousand pod veths it answers in a
    few milliseconds where decoding the dump in Python takes hundreds."""
    with in_netns(netns):
        return dict(socket.if_nameindex())


def interface_addresses(netns: str | None = None,
                        families=(socket.AF_INET,)) -> dict[str, list[str]]:
    """Device name -> its addresses of `families` (IPv4 by default), each
    family in the kernel's order, in `netns`."""
    names = link_names(netns)
    out: dict[str, list[str]] = {}
    with iproute(netns) as ipr:
        for a in (a for f in families for a in ipr.get_addr(family=f)):
            ip = a.get_attr("IFA_ADDRESS")
            if ip:
                out.setdefault(names.get(a["index"], f"if{a['index']}"), []).append(ip)
    return out


def first_ipv4(device: str, netns: str | None = None) -> str | None:
    """The first global IPv4 address of `device` in `netns`; None when the
    device does not exist or has none."""
    with iproute(netns) as ipr:
        idx = ipr.link_lookup(ifname=device)
        if not idx:
            return None
        for a in ipr.get_addr(index=idx[0], family=2):
            if a["scope"] == 0:
                return a.get_attr("IFA_ADDRESS")
    return None


# rtnetlink constants of the kernel's uapi (linux/rtnetlink.h, if_link.h, ip.h)
_RTM_SETLINK = 19
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLMSG_ERROR = 2
_IFLA_AF_SPEC = 26
_IFLA_INET_CONF = 1
_NLA_F_NESTED = 0x8000
IPV4_DEVCONF = {"accept_local": 23}


def _nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def set_ipv4_devconf(ifindex: int, key: str, value: int, netns: str | None = None) -> None:
    """Set one of a device's IPv4 settings (net.ipv4.conf.<dev>.<key>) by
    rtnetlink, which CAP_NET_ADMIN allows where /proc/sys is mounted
    read-only (a container's). Only the named setting is sent, so nothing
    else of the device's changes. Raises OSError with the kernel's errno."""
    conf = _nla(_IFLA_INET_CONF | _NLA_F_NESTED, _nla(IPV4_DEVCONF[key], struct.pack("=I", value)))
    spec = _nla(_IFLA_AF_SPEC | _NLA_F_NESTED, _nla(socket.AF_INET | _NLA_F_NESTED, conf))
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0) + spec
    msg = struct.pack("=IHHII", 16 + len(body), _RTM_SETLINK, _NLM_F_REQUEST | _NLM_F_ACK,
                      1, 0) + body
    with in_netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    with sock:
        sock.bind((0, 0))
        sock.sendto(msg, (0, 0))
        reply = sock.recv(65536)
    (kind,) = struct.unpack_from("=H", reply, 4)
    if kind != _NLMSG_ERROR:
        raise OSError(0, f"unexpected rtnetlink answer {kind}")
    (err,) = struct.unpack_from("=i", reply, 16)
    if err:
        raise OSError(-err, os.strerror(-err))
