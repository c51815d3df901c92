"""Where cgroup v2 lives on this host: the root socket-LB attaches to.

`cgroup_root` empty means the cgroup2 mount itself: /sys/fs/cgroup on a
pure cgroup v2 host, /sys/fs/cgroup/unified on a hybrid one (systemd's
layout with v1 controllers beside a v2 tree).
"""
from __future__ import annotations


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


__all__ = ["cgroup2_mounts", "resolve_root"]
