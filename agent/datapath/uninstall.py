"""Remove everything fastpath put into the kernel of one node, and nothing else.

What is fastpath's, and how it is recognised:
  pinned maps    the `fp_<name>_v<N>` entries under bpffs_root (the directory
                 is removed too once empty; anything else in it stays);
  tc filters     on every device of the node's netns, at any priority: bpf
                 filters whose program is one of ours by name (the loader's
                 PROGRAMS) or is named fp_* and uses one of our pinned maps
                 (a program of an older release, renamed since). A foreign
                 filter, even one named fp_*, is left in place, and so is the
                 clsact qdisc while any filter remains on it;
  cgroup hooks   programs attached to cgroup_root, recognised the same way;
  root qdiscs    the bandwidth manager's (handle fa57:, agent/datapath/qdisc.py)
                 on the ENIs: deleted, so the kernel puts back the default
                 root it had replaced (fastpath only ever replaces a default).
Programs are not pinned: once no filter or cgroup holds them (and no agent
runs) the kernel frees them. Order: hooks first, so nothing runs that still
expects the maps, then the pins.

The agent must not be running: it would re-attach. `fastpath uninstall`
(agent/cli) checks that and also removes the files (agent/daemon/nodeinstall.py).
"""
from __future__ import annotations

import ctypes as ct
import errno
import json
import os
import re
import subprocess
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath import libbpf, tc
from agent.datapath.loader import PROG_DIR, PROGRAMS
from agent.datapath.netlink import iproute
from agent.datapath.nsenter import in_netns

# current pins, and pins set aside by an interrupted migration (loader.ASIDE)
PIN_PATTERN = re.compile(r"fp_\w+_v\d+(_old\d*)?")
OUR_PREFIX = "fp_"
# enum bpf_attach_type (uapi) runs from 0 to a little over 50 today; types a
# kernel does not know are answered with EINVAL and skipped.
ATTACH_TYPES = range(0, 64)


@dataclass
class Report:
    filters: list[str] = field(default_factory=list)
    cgroup_programs: list[str] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)
    qdiscs: list[str] = field(default_factory=list)    # root qdiscs given back to the kernel
    kept: list[str] = field(default_factory=list)      # ours by place, left with the reason

    def as_dict(self) -> dict:
        return {"filters": self.filters, "cgroup_programs": self.cgroup_programs,
                "pins": self.pins, "qdiscs": self.qdiscs, "kept": self.kept}


def prog_identity(prog_id: int) -> tuple[str, set[int]]:
    """(name, ids of the maps it uses) of a loaded program; ("", set()) if gone."""
    fd = libbpf.lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return "", set()
    try:
        try:
            info = libbpf.prog_info(fd)
        except OSError:
            return "", set()
        name, count = info.name.decode(errors="replace"), info.nr_map_ids
        if not count:
            return name, set()
        ids = (ct.c_uint32 * count)()
        want = libbpf.ProgInfo()
        want.nr_map_ids = count
        want.map_ids = ct.addressof(ids)
        try:
            got = libbpf.prog_info(fd, want)
        except OSError:
            return name, set()
        return name, set(ids[:min(count, got.nr_map_ids)])
    finally:
        os.close(fd)


def pinned_map_ids(bpffs_root: str) -> dict[int, str]:
    """Map id -> pin name of fastpath's pins under bpffs_root."""
    out = {}
    if not os.path.isdir(bpffs_root):
        return out
    for entry in sorted(os.listdir(bpffs_root)):
        if not PIN_PATTERN.fullmatch(entry):
            continue
        try:
            fd = libbpf.obj_get(os.path.join(bpffs_root, entry))
        except OSError:
            continue
        try:
            out[libbpf.map_info(fd).id] = entry
        except OSError:
            pass                  # a pinned program or link, not a map
        finally:
            os.close(fd)
    return out


def is_ours(prog_id: int, our_maps: set[int]) -> bool:
    name, maps = prog_identity(prog_id)
    return name in PROGRAMS or (name.startswith(OUR_PREFIX) and bool(maps & our_maps))


def filter_prog_ids(ifname: str, netns: str | None) -> dict[tuple[str, int, int], int]:
    """(direction, prio, handle) -> id of the program of each bpf filter on
    a device. From iproute2's JSON: the netlink library in use does not
    decode the program id attribute (TCA_BPF_ID)."""
    out = {}
    for direction in tc.DIRECTIONS:
        # A process forked by a thread inside the netns starts inside it.
        with in_netns(netns):
            r = subprocess.run(["tc", "-j", "filter", "show", "dev", ifname, direction],
                               capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or not r.stdout.strip():
            continue        # no clsact on the device, or it just went away
        for f in json.loads(r.stdout):
            opts = f.get("options") or {}
            prog = opts.get("prog") or {}
            if f.get("kind") == "bpf" and "handle" in opts and "id" in prog:
                out[(direction, f["pref"], int(opts["handle"], 16))] = prog["id"]
    return out


def remove_filters(netns: str | None, our_maps: set[int], report: Report) -> None:
    with iproute(netns) as ipr:
        links = [(l["index"], l.get_attr("IFLA_IFNAME")) for l in ipr.get_links()]
        for idx, name in links:
            filters = tc._filters(ipr, idx, name)
            ids = filter_prog_ids(name, netns) if filters else {}
            removed = 0
            for f in filters:
                if not is_ours(ids.get((f.direction, f.prio, f.handle), 0), our_maps):
                    continue
                try:
                    ipr.tc("del-filter", "bpf", idx, handle=f.handle, parent=tc.PARENT[f.direction],
                           prio=f.prio)
                except NetlinkError as exc:
                    if exc.code not in (errno.ENOENT, errno.ENODEV):
                        raise
                removed += 1
                report.filters.append(f"{name} {f.direction} prio {f.prio} {f.name}")
            if removed and not tc._any_filters(ipr, idx):
                # the clsact qdisc fastpath added for its filters, now empty
                try:
                    ipr.tc("del", "clsact", idx)
                except NetlinkError:
                    pass


def remove_cgroup_programs(cgroup_root: str, our_maps: set[int], report: Report) -> None:
    if not os.path.isdir(cgroup_root):
        return
    lib = libbpf.lib()
    cg = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attach_type in ATTACH_TYPES:
            ids = (ct.c_uint32 * 64)()
            cnt = ct.c_uint32(64)
            flags = ct.c_uint32(0)
            if lib.bpf_prog_query(cg, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)) != 0:
                continue
            for prog_id in list(ids[:cnt.value]):
                if not is_ours(prog_id, our_maps):
                    continue
                name, _ = prog_identity(prog_id)
                fd = lib.bpf_prog_get_fd_by_id(prog_id)
                if fd < 0:
                    continue
                try:
                    if lib.bpf_prog_detach2(fd, cg, attach_type) != 0:
                        err = ct.get_errno()
                        report.kept.append(f"cgroup {cgroup_root} attach type {attach_type} "
                                           f"{name}: detach failed: {os.strerror(err)}")
                        continue
                finally:
                    os.close(fd)
                report.cgroup_programs.append(f"{cgroup_root} attach type {attach_type} {name}")
    finally:
        os.close(cg)


def remove_pins(bpffs_root: str, report: Report) -> None:
    if not os.path.isdir(bpffs_root):
        return
    for entry in sorted(os.listdir(bpffs_root)):
        path = os.path.join(bpffs_root, entry)
        if entry == PROG_DIR and os.path.isdir(path):
            # the pinned program sets (agent/datapath/loader.py): <key>/<program>
            for key in sorted(os.listdir(path)):
                for prog in sorted(os.listdir(os.path.join(path, key))):
                    os.unlink(os.path.join(path, key, prog))
                    report.pins.append(os.path.join(path, key, prog))
                os.rmdir(os.path.join(path, key))
            os.rmdir(path)
            report.pins.append(path + "/")
        elif PIN_PATTERN.fullmatch(entry):
            os.unlink(path)
            report.pins.append(path)
        else:
            report.kept.append(f"{path}: not a fastpath pin")
    try:
        os.rmdir(bpffs_root)
        report.pins.append(bpffs_root + "/")
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise


def uninstall(bpffs_root: str, cgroup_root: str | None, netns: str | None = None) -> Report:
    """Detach fastpath's tc filters and cgroup programs, give the ENIs their
    default root qdisc back, then unpin its maps."""
    from agent.datapath import qdisc
    report = Report()
    ours = set(pinned_map_ids(bpffs_root))
    remove_filters(netns, ours, report)
    report.qdiscs.extend(qdisc.restore_all(netns))
    if cgroup_root:
        remove_cgroup_programs(cgroup_root, ours, report)
    remove_pins(bpffs_root, report)
    return report


__all__ = ["Report", "uninstall", "pinned_map_ids", "prog_identity", "is_ours"]
