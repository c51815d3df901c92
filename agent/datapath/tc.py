"""tc attachment with pyroute2: clsact + direct-action bpf filters.

fastpath's filters sit at one configured priority with handle 1 and are
named after their program (fp_*), which is how we tell ours from foreign
filters: attaching replaces only our own filter (atomically, so no packet
sees the device without a program), detaching deletes only ours, and a
foreign filter already at our priority is an error, not something to
overwrite.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from pyroute2 import IPRoute

from agent.datapath.netlink import iproute, link_names
from agent.datapath.nsenter import in_netns
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath.errors import DatapathError, InterfaceNotFound

DIRECTIONS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
OUR_PREFIX = "fp_"
HANDLE = 1


@dataclass(frozen=True)
class Filter:
    ifname: str
    ifindex: int
    direction: str
    prio: int
    handle: int
    name: str
    prog_id: int

    @property
    def ours(self) -> bool:
        return self.name.startswith(OUR_PREFIX)



def _why(exc: NetlinkError) -> str:
    """A netlink refusal in words: which tc objects, and the capability when
    it is a permission."""
    text = f"its clsact qdisc or bpf filter: {os.strerror(exc.code)}"
    if exc.code == errno.EPERM:
        text += " (tc needs CAP_NET_ADMIN)"
    return text

def ifindex_by_name(ipr: IPRoute, name: str) -> int | None:
    """pyroute2 0.9's link_lookup(ifname=...) intermittently answers [] for
    an existing device in another netns; a full dump filtered here is
    reliable and cheap enough at the scale of one node."""
    for link in ipr.get_links():
        if link.get_attr("IFLA_IFNAME") == name:
            return link["index"]
    return None


def _ifindex(ipr: IPRoute, dev: str | int, netns: str | None) -> tuple[int, str]:
    if isinstance(dev, int):
        links = ipr.get_links(dev) if dev else []
        if not links:
            raise InterfaceNotFound(str(dev), netns)
        return dev, links[0].get_attr("IFLA_IFNAME")
    idx = ifindex_by_name(ipr, dev)
    if idx is None:
        raise InterfaceNotFound(dev, netns)
    return idx, dev


def _filters(ipr: IPRoute, ifindex: int, ifname: str) -> list[Filter]:
    out = []
    for direction, parent in DIRECTIONS.items():
        try:
            msgs = ipr.get_filters(ifindex, parent=parent)
        except NetlinkError as exc:
            if exc.code == errno.EINVAL:     # no clsact on the device
                continue
            raise
        for m in msgs:
            if m.get_attr("TCA_KIND") != "bpf" or not m["handle"]:
                continue
            opts = m.get_attr("TCA_OPTIONS")
            name = (opts.get_attr("TCA_BPF_NAME") if opts else None) or ""
            prog_id = (opts.get_attr("TCA_BPF_ID") if opts else None) or 0
            out.append(Filter(ifname, ifindex, direction, m["info"] >> 16, m["handle"],
                              name, prog_id))
    return out


def _any_filters(ipr: IPRoute, ifindex: int) -> bool:
    for parent in DIRECTIONS.values():
        try:
            if any(m["handle"] for m in ipr.get_filters(ifindex, parent=parent)):
                return True
        except NetlinkError:
            continue
    return False


def list_filters(dev: str | int, netns: str | None = None) -> list[Filter]:
    with iproute(netns) as ipr:
        idx, name = _ifindex(ipr, dev, netns)
        return _filters(ipr, idx, name)


def attach(dev: str | int, direction: str, prog_fd: int, prog_name: str, prio: int,
           netns: str | None = None) -> Filter:
    with iproute(netns) as ipr:
        idx, ifname = _ifindex(ipr, dev, netns)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DatapathError(f"cannot add clsact qdisc on {ifname}: {exc}") from None
        for f in _filters(ipr, idx, ifname):
            if f.direction == direction and f.prio == prio and not f.ours:
                raise DatapathError(
                    f"{ifname} {direction}: tc priority {prio} is taken by a foreign filter "
                    f"({f.name or 'unnamed'}); choose another tc_priority")
        try:
            ipr.tc("replace-filter", "bpf", idx, handle=HANDLE, fd=prog_fd, name=prog_name,
                   parent=PARENT[direction], classid=1, direct_action=True, prio=prio)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise InterfaceNotFound(ifname, netns) from None
            raise DatapathError(f"cannot attach {prog_name} to {ifname} {direction}: {exc}") from None
        for f in _filters(ipr, idx, ifname):
            if f.direction == direction and f.prio == prio and f.name == prog_name:
                return f
        raise DatapathError(f"{prog_name} on {ifname} {direction}: attached but not listed")


def detach(dev: str | int, prio: int | None = None, netns: str | None = None,
           missing_ok: bool = True) -> list[Filter]:
    """Remove fastpath's filters (all priorities, or only `prio`) from `dev`."""
    removed = []
    with iproute(netns) as ipr:
        try:
            idx, ifname = _ifindex(ipr, dev, netns)
        except InterfaceNotFound:
            if missing_ok:
                return []
            raise
        try:
            found = _filters(ipr, idx, ifname)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise DatapathError(f"cannot list tc filters of {ifname}: {exc}") from None
            if missing_ok:
                return []      # the device went away after we found it
            raise InterfaceNotFound(ifname, netns) from None
        for f in found:
            if not f.ours or (prio is not None and f.prio != prio):
                continue
            try:
                ipr.tc("del-filter", "bpf", idx, handle=f.handle, parent=PARENT[f.direction],
                       prio=f.prio)
                removed.append(f)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV):
                    raise DatapathError(f"cannot detach {f.name} from {ifname}: {exc}") from None
        if removed and not _any_filters(ipr, idx):
            # clsact with no filter of any kind left on it is ours to remove
            try:
                ipr.tc("del", "clsact", idx)
            except NetlinkError:
                pass
    return removed


# rtnetlink, for reading filters without pyroute2's per-message decoding
# (a restart checks two directions of a thousand veths): uapi values
RTM_NEWTFILTER, RTM_GETTFILTER = 44, 46
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_NAME, TCA_BPF_ID = 7, 11
_NLMSG = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BxxxiIII")
_RTA = struct.Struct("=HH")


def _attrs(buf: bytes, off: int, end: int) -> dict[int, tuple[int, int]]:
    out = {}
    while off + 4 <= end:
        ln, typ = _RTA.unpack_from(buf, off)
        if ln < 4:
            break
        out[typ & 0x7FFF] = (off + 4, off + ln)
        off += (ln + 3) & ~3
    return out


class FilterReader:
    """Our bpf filters of devices, read with one raw rtnetlink socket in the
    netns: a dump per (device, direction), parsed for kind, name, program
    id, priority and handle only."""

    def __init__(self, netns: str | None = None):
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def filters(self, ifindex: int, ifname: str) -> list[Filter]:
        out = []
        for direction, parent in DIRECTIONS.items():
            out += self._dump(ifindex, ifname, direction, parent)
        return out

    def _dump(self, ifindex: int, ifname: str, direction: str, parent: int) -> list[Filter]:
        self.seq += 1
        req = _TCMSG.pack(0, ifindex, 0, parent, 0)
        self.sock.send(_NLMSG.pack(_NLMSG.size + len(req), RTM_GETTFILTER,
                                   NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0) + req)
        out = []
        while True:
            buf = self.sock.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(buf):
                ln, typ, _, seq, _ = _NLMSG.unpack_from(buf, off)
                if ln < _NLMSG.size:
                    return out
                body, end = off + _NLMSG.size, off + ln
                off += (ln + 3) & ~3
                if seq != self.seq:
                    continue
                if typ == NLMSG_DONE:
                    return out
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", buf, body)[0]
                    if err == 0:
                        continue
                    if err == errno.EINVAL:      # no clsact on the device
                        return out
                    if err == errno.ENODEV:
                        raise InterfaceNotFound(ifname)
                    raise DatapathError(f"cannot list tc filters of {ifname}: "
                                        f"{os.strerror(err)}")
                if typ != RTM_NEWTFILTER:
                    continue
                _, _, handle, _, info = _TCMSG.unpack_from(buf, body)
                a = _attrs(buf, body + _TCMSG.size, end)
                kind = buf[a[TCA_KIND][0]:a[TCA_KIND][1]].rstrip(b"\0") if TCA_KIND in a else b""
                if kind != b"bpf" or not handle:
                    continue
                name, prog_id = "", 0
                if TCA_OPTIONS in a:
                    o = _attrs(buf, *a[TCA_OPTIONS])
                    if TCA_BPF_NAME in o:
                        name = buf[o[TCA_BPF_NAME][0]:o[TCA_BPF_NAME][1]].rstrip(b"\0").decode()
                    if TCA_BPF_ID in o:
                        prog_id = struct.unpack_from("=I", buf, o[TCA_BPF_ID][0])[0]
                out.append(Filter(ifname, ifindex, direction, info >> 16, handle, name, prog_id))


def ensure(devices: list[tuple[int, str, dict[str, tuple[int, str]]]], prio: int,
           netns: str | None = None) -> tuple[int, list[tuple[int, Exception]]]:
    """Make each device (ifindex, name, {direction: (prog fd, program name)})
    run those programs at `prio`: a device whose filter already runs the
    very program (same id, e.g. a restart that reused the pinned programs)
    is left alone, the others are attached as `attach` does. Filters are
    read through one raw netlink socket (FilterReader), written through
    one pyroute2 session opened only if something needs writing. Returns
    (filters written, [(ifindex, error)] of devices that could not be
    handled: gone, or a foreign filter at our priority)."""
    from agent.datapath import libbpf
    ids: dict[int, int] = {}
    written, failed = 0, []
    reader = FilterReader(netns)
    ipr = None
    try:
        for idx, ifname, progs in devices:
            try:
                have = {(f.direction, f.prio): f for f in reader.filters(idx, ifname)}
                todo = []
                for direction, (fd, name) in progs.items():
                    if fd not in ids:
                        ids[fd] = libbpf.prog_info(fd).id
                    f = have.get((direction, prio))
                    if f is not None and not f.ours:
                        raise DatapathError(
                            f"{ifname} {direction}: tc priority {prio} is taken by a foreign "
                            f"filter ({f.name or 'unnamed'}); choose another tc_priority")
                    if f is None or f.name != name or f.prog_id != ids[fd]:
                        todo.append((direction, fd, name))
                if not todo:
                    continue
                if ipr is None:
                    ipr = iproute(netns)
                if not have:
                    try:
                        ipr.tc("add", "clsact", idx)
                    except NetlinkError as exc:
                        if exc.code in (errno.ENODEV, errno.EINVAL) and \
                                idx not in link_names(netns):
                            raise InterfaceNotFound(ifname, netns) from None
                        if exc.code != errno.EEXIST:
                            raise DatapathError(f"cannot add clsact qdisc on {ifname}: "
                                                f"{exc}") from None
                for direction, fd, name in todo:
                    ipr.tc("replace-filter", "bpf", idx, handle=HANDLE, fd=fd, name=name,
                           parent=PARENT[direction], classid=1, direct_action=True, prio=prio)
                    written += 1
            except NetlinkError as exc:
                failed.append((idx, InterfaceNotFound(ifname, netns)
                               if exc.code == errno.ENODEV else
                               DatapathError(f"cannot attach to {ifname}: {_why(exc)}")))
            except DatapathError as exc:
                failed.append((idx, exc))
    finally:
        reader.close()
        if ipr is not None:
            ipr.close()
    return written, failed
