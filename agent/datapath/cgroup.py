"""Socket-LB attachment to a cgroup v2 directory.

Programs are attached with BPF_F_ALLOW_MULTI so that they coexist with
other tools' programs on the same cgroup. An agent restart attaches its new
programs first and only then detaches the previous agent's (found by name
with BPF_PROG_QUERY), so sockets are never without translation in between.

Where cgroup v2 lives on this host (the root socket-LB attaches to):
`cgroup_root` empty means the cgroup2 mount itself: /sys/fs/cgroup on a
pure cgroup v2 host, /sys/fs/cgroup/unified on a hybrid one (systemd's
layout with v1 controllers beside a v2 tree).
"""
from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass

from agent.datapath import libbpf
from agent.datapath.errors import DatapathError
from agent.datapath.loader import PROGRAMS

BPF_F_ALLOW_MULTI = 2
SOCK_PROGRAMS = {n: spec[2] for n, spec in PROGRAMS.items() if spec[0] == "sock.c"}
OUR_PREFIX = "fp_sock_"


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    out = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                out.append(fields[4])
    return out


def resolve_root(cgroup_root: str) -> str:
    """The configured cgroup root, or the (first) cgroup2 mount."""
    if cgroup_root:
        return cgroup_root
    mounts = cgroup2_mounts()
    if not mounts:
        raise FileNotFoundError("no cgroup2 filesystem is mounted: mount one "
                                "(mount -t cgroup2 none /sys/fs/cgroup) or set cgroup_root")
    return mounts[0]


@dataclass(frozen=True)
class CgroupProg:
    attach_type: int
    prog_id: int
    name: str

    @property
    def ours(self) -> bool:
        return self.name.startswith(OUR_PREFIX)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise DatapathError(f"cgroup {path} cannot be opened: {exc.strerror}") from None


def _prog_name(prog_id: int) -> tuple[int, str]:
    fd = libbpf.lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return -1, ""
    try:
        return fd, libbpf.prog_info(fd).name.decode()
    except OSError:
        return fd, ""


def _prog_id(fd: int) -> int:
    try:
        return libbpf.prog_info(fd).id
    except OSError:
        raise DatapathError(f"program fd {fd}: cannot read its info") from None


def attached(path: str) -> list[CgroupProg]:
    out = []
    cg = _open(path)
    try:
        for attach_type in sorted(set(SOCK_PROGRAMS.values())):
            ids = (ct.c_uint32 * 64)()
            cnt = ct.c_uint32(64)
            flags = ct.c_uint32(0)
            if libbpf.lib().bpf_prog_query(cg, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)) != 0:
                continue
            for i in range(cnt.value):
                fd, name = _prog_name(ids[i])
                if fd >= 0:
                    os.close(fd)
                out.append(CgroupProg(attach_type, ids[i], name))
    finally:
        os.close(cg)
    return out


def _detach_ids(cg: int, progs: list[CgroupProg]) -> None:
    for p in progs:
        fd, _ = _prog_name(p.prog_id)
        if fd < 0:
            continue
        try:
            libbpf.lib().bpf_prog_detach2(fd, cg, p.attach_type)
        finally:
            os.close(fd)


def attach(path: str, prog_fds: dict[str, int]) -> list[CgroupProg]:
    """Attach fastpath's socket programs to cgroup `path`, replacing those of
    an earlier agent without a gap."""
    before = [p for p in attached(path) if p.ours]
    present = {p.prog_id for p in before}
    keep = set()
    cg = _open(path)
    try:
        for name, attach_type in SOCK_PROGRAMS.items():
            pid = _prog_id(prog_fds[name])
            if pid in present:          # this very program is attached already
                keep.add(pid)
                continue
            if libbpf.lib().bpf_prog_attach(prog_fds[name], cg, attach_type, BPF_F_ALLOW_MULTI) != 0:
                err = ct.get_errno()
                raise DatapathError(f"cannot attach {name} to cgroup {path}: {os.strerror(err)}")
        _detach_ids(cg, [p for p in before if p.prog_id not in keep])
    finally:
        os.close(cg)
    return [p for p in attached(path) if p.ours]


def detach(path: str) -> list[CgroupProg]:
    if not os.path.isdir(path):
        return []
    ours = [p for p in attached(path) if p.ours]
    cg = _open(path)
    try:
        _detach_ids(cg, ours)
    finally:
        os.close(cg)
    return ours
