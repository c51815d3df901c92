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
from dataclasses import dataclass

from pyroute2 import IPRoute

from agent.datapath.netlink import iproute
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


def ensure(devices: list[tuple[int, dict[str, tuple[int, str]]]], prio: int,
           netns: str | None = None) -> tuple[int, list[tuple[int, Exception]]]:
    """Make each device (ifindex, {direction: (prog fd, program name)}) run
    those programs at `prio`, in one netlink session: a device whose filter
    already runs the very program (same id, e.g. a restart that reused the
    pinned programs) is left alone, the others are attached as `attach`
    does. Returns (filters written, [(ifindex, error)] of devices that
    could not be handled: gone, or a foreign filter at our priority)."""
    from agent.datapath import libbpf
    ids: dict[int, int] = {}
    written, failed = 0, []
    with iproute(netns) as ipr:
        for idx, progs in devices:
            try:
                names = ipr.get_links(idx)
                if not names:
                    raise InterfaceNotFound(str(idx), netns)
                ifname = names[0].get_attr("IFLA_IFNAME")
                have = {(f.direction, f.prio): f for f in _filters(ipr, idx, ifname)}
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
                if todo and not have:
                    try:
                        ipr.tc("add", "clsact", idx)
                    except NetlinkError as exc:
                        if exc.code != errno.EEXIST:
                            raise DatapathError(f"cannot add clsact qdisc on {ifname}: "
                                                f"{exc}") from None
                for direction, fd, name in todo:
                    ipr.tc("replace-filter", "bpf", idx, handle=HANDLE, fd=fd, name=name,
                           parent=PARENT[direction], classid=1, direct_action=True, prio=prio)
                    written += 1
            except NetlinkError as exc:
                failed.append((idx, InterfaceNotFound(str(idx), netns)
                               if exc.code == errno.ENODEV else
                               DatapathError(f"cannot attach to ifindex {idx}: {exc}")))
            except DatapathError as exc:
                failed.append((idx, exc))
    return written, failed
