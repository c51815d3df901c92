"""Read-only views of what fastpath left in the kernel, for the CLI.

Everything here works from the pins under bpffs_root and the kernel's own
object ids: no compile, no agent. Maps are opened by their pin; programs are
fastpath's when they use at least one of the maps pinned under that root
(several fastpath instances, e.g. simulated nodes, can share one kernel);
attachments come from tc (iproute2's JSON, which carries the program id)
and from BPF_PROG_QUERY on the cgroup root.
"""
from __future__ import annotations

import ctypes as ct
import errno
import json
import os
import subprocess
import time
from dataclasses import dataclass, field

from agent.datapath import libbpf

BPF_PROG_TYPES = {3: "sched_cls", 18: "cgroup_sock_addr", 8: "cgroup_skb", 9: "cgroup_sock"}
# enum bpf_attach_type values of the cgroup hooks fastpath uses (uapi)
CGROUP_HOOKS = {10: "connect4", 14: "sendmsg4", 19: "recvmsg4", 29: "getpeername4"}


class NoPins(Exception):
    """No fastpath map is pinned under the root."""


class ProgInfoStats(libbpf.ProgInfo):
    # struct bpf_prog_info continues after `name` (uapi): up to the run stats.
    _fields_ = [("ifindex", ct.c_uint32), ("gpl_compatible", ct.c_uint32),
                ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
                ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
                ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
                ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32),
                ("func_info", ct.c_uint64), ("nr_func_info", ct.c_uint32),
                ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
                ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
                ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
                ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64),
                ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64),
                ("recursion_misses", ct.c_uint64), ("verified_insns", ct.c_uint32)]


@dataclass
class PinnedMap:
    name: str
    path: str
    fd: int
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int

    @property
    def type_name(self) -> str:
        return libbpf.MAP_TYPE_NAMES.get(self.type, f"type-{self.type}")

    @property
    def percpu(self) -> bool:
        return self.type in libbpf.PERCPU_MAP_TYPES

    def items(self):
        """(key bytes, value bytes); per-CPU values hold one aligned slot per
        possible CPU."""
        from agent.datapath import mapio
        vsize = libbpf.value_buffer_size(self.type, self.value_size)
        try:
            return mapio.items(self.fd, self.key_size, vsize)
        except OSError as exc:
            # LPM tries and program arrays have no batch operations
            if exc.errno not in mapio.NO_BATCH:
                raise
        return libbpf.map_items_raw(self.fd, self.key_size, vsize)

    def count(self) -> int:
        if self.type == 27:            # ring buffer: no entries to count
            return 0
        key = ct.create_string_buffer(max(self.key_size, 1))
        nxt = ct.create_string_buffer(max(self.key_size, 1))
        n, prev = 0, None
        while libbpf.lib().bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            n += 1
            ct.memmove(key, nxt, self.key_size)
            prev = key
        return n

    def lookup(self, key: bytes) -> bytes | None:
        vsize = libbpf.value_buffer_size(self.type, self.value_size)
        kb = ct.create_string_buffer(key, len(key))
        vb = ct.create_string_buffer(vsize)
        if libbpf.lib().bpf_map_lookup_elem(self.fd, kb, vb) != 0:
            return None
        return vb.raw

    def update(self, key: bytes, value: bytes) -> None:
        kb = ct.create_string_buffer(key, len(key))
        vb = ct.create_string_buffer(value, len(value))
        if libbpf.lib().bpf_map_update_elem(self.fd, kb, vb, 0) != 0:
            err = ct.get_errno()
            raise OSError(err, f"{self.name}: update: {os.strerror(err)}")

    def delete(self, key: bytes) -> bool:
        lib = libbpf.lib()
        lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
        kb = ct.create_string_buffer(key, len(key))
        if lib.bpf_map_delete_elem(self.fd, kb) == 0:
            return True
        if ct.get_errno() == errno.ENOENT:
            return False
        err = ct.get_errno()
        raise OSError(err, f"{self.name}: delete: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise PermissionError("reading fastpath's BPF objects needs root (CAP_BPF and "
                              "CAP_SYS_ADMIN): run with sudo, or in the agent's container")


def pin_names(root: str) -> list[str]:
    import re
    if not os.path.isdir(root):
        return []
    return sorted(e for e in os.listdir(root) if re.fullmatch(r"fp_\w+_v\d+", e))


def open_map(root: str, name: str) -> PinnedMap:
    path = os.path.join(root, name)
    fd = libbpf.obj_get(path)
    try:
        info = libbpf.map_info(fd)
    except OSError:
        os.close(fd)
        raise
    return PinnedMap(name, path, fd, info.id, info.type, info.key_size, info.value_size,
                     info.max_entries, info.map_flags)


def open_maps(root: str) -> dict[str, PinnedMap]:
    """Every fastpath pin under root, opened; NoPins if there is none."""
    check_privileges()
    names = pin_names(root)
    if not names:
        why = "does not exist" if not os.path.isdir(root) else "holds no fastpath map"
        raise NoPins(f"{root} {why}: no fastpath maps are pinned (is the agent installed "
                     f"on this node? is --bpffs-root right?)")
    out = {}
    for n in names:
        try:
            out[n] = open_map(root, n)
        except OSError:
            continue                     # not a map (a pinned program or link)
    if not out:
        raise NoPins(f"{root}: pins present but none is a readable BPF map")
    return out


def close_all(maps: dict[str, PinnedMap]) -> None:
    for m in maps.values():
        m.close()


# -- programs ---------------------------------------------------------------

@dataclass
class Prog:
    id: int
    name: str
    type: str
    tag: str
    loaded_at: float          # unix time
    map_ids: list[int]
    xlated_bytes: int
    jited_bytes: int
    verified_insns: int
    run_cnt: int
    run_time_ns: int
    maps: list[str] = field(default_factory=list)


def _boot_time() -> float:
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def prog_by_id(prog_id: int) -> Prog | None:
    lib = libbpf.lib()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = libbpf.prog_info(fd, ProgInfoStats())
        count = info.nr_map_ids
        ids: list[int] = []
        if count:
            buf = (ct.c_uint32 * count)()
            want = ProgInfoStats()
            want.nr_map_ids = count
            want.map_ids = ct.addressof(buf)
            got = libbpf.prog_info(fd, want)
            ids = list(buf[:min(count, got.nr_map_ids)])
        return Prog(info.id, info.name.decode(errors="replace"),
                    BPF_PROG_TYPES.get(info.type, f"type-{info.type}"),
                    bytes(info.tag).hex(), _boot_time() + info.load_time / 1e9, ids,
                    info.xlated_prog_len, info.jited_prog_len, info.verified_insns,
                    info.run_cnt, info.run_time_ns)
    except OSError:
        return None
    finally:
        os.close(fd)


def all_prog_ids() -> list[int]:
    lib = libbpf.lib()
    lib.bpf_prog_get_next_id.argtypes = [ct.c_uint32, ct.POINTER(ct.c_uint32)]
    out, cur = [], ct.c_uint32(0)
    while lib.bpf_prog_get_next_id(cur.value, ct.byref(cur)) == 0:
        out.append(cur.value)
    return out


def our_programs(maps: dict[str, PinnedMap]) -> list[Prog]:
    """Loaded programs that use a map pinned under our root."""
    by_id = {m.id: n for n, m in maps.items()}
    out = []
    for pid in all_prog_ids():
        p = prog_by_id(pid)
        if p is None or not p.name.startswith("fp_"):
            continue
        names = sorted(by_id[i] for i in p.map_ids if i in by_id)
        if not names:
            continue
        p.maps = names
        out.append(p)
    return out


# -- attachments ------------------------------------------------------------

@dataclass
class Attachment:
    kind: str                # "tc" or "cgroup"
    target: str              # interface name or cgroup path
    ifindex: int
    hook: str                # ingress, egress, connect4, ...
    priority: int
    handle: int
    prog_id: int
    prog_name: str


def _links() -> list[tuple[int, str]]:
    """(ifindex, name) of every link in this netns (libc's if_nameindex)."""
    import socket
    return sorted(socket.if_nameindex())


def tc_attachments() -> list[Attachment]:
    """Every bpf tc filter of this netns (ingress and egress of clsact)."""
    out = []
    for ifindex, ifname in _links():
        for hook in ("ingress", "egress"):
            r = subprocess.run(["tc", "-j", "filter", "show", "dev", ifname, hook],
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0 or not r.stdout.strip():
                continue
            for f in json.loads(r.stdout):
                opts = f.get("options") or {}
                prog = opts.get("prog") or {}
                if f.get("kind") != "bpf" or "handle" not in opts or "id" not in prog:
                    continue
                out.append(Attachment("tc", ifname, ifindex, hook, f.get("pref", 0),
                                      int(opts["handle"], 16), prog["id"],
                                      prog.get("name", "") or opts.get("bpf_name", "")))
    return out


def cgroup_attachments(cgroup_root: str) -> list[Attachment]:
    out = []
    if not cgroup_root or not os.path.isdir(cgroup_root):
        return out
    lib = libbpf.lib()
    cg = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attach_type, hook in CGROUP_HOOKS.items():
            ids = (ct.c_uint32 * 64)()
            cnt = ct.c_uint32(64)
            flags = ct.c_uint32(0)
            if lib.bpf_prog_query(cg, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)) != 0:
                continue
            for pid in ids[:cnt.value]:
                p = prog_by_id(pid)
                out.append(Attachment("cgroup", cgroup_root, 0, hook, 0, 0, pid,
                                      p.name if p else ""))
    finally:
        os.close(cg)
    return out


def prog_fd(prog_id: int) -> int:
    fd = libbpf.lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, f"program {prog_id}: {os.strerror(err)}")
    return fd


# -- kernel features --------------------------------------------------------

# helper ids of enum bpf_func_id (uapi) the datapath calls
HELPERS = {"fib_lookup": 69, "get_socket_cookie": 46, "redirect_neigh": 152,
           "redirect_peer": 155, "get_netns_cookie": 122, "ringbuf_output": 130,
           "ringbuf_reserve": 131}
MAP_TYPES = {"hash": 1, "array": 2, "percpu_hash": 5, "lru_hash": 9, "lpm_trie": 11,
             "ringbuf": 27}


def kernel_features() -> dict:
    """What this kernel offers fastpath, probed with libbpf (no compile)."""
    lib = libbpf.lib()
    lib.libbpf_probe_bpf_map_type.argtypes = [ct.c_int, ct.c_void_p]
    lib.libbpf_probe_bpf_helper.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
    maps = {n: lib.libbpf_probe_bpf_map_type(t, None) == 1 for n, t in MAP_TYPES.items()}
    helpers = {n: lib.libbpf_probe_bpf_helper(3, h, None) == 1 for n, h in HELPERS.items()}
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            stats = f.read().strip() == "1"
    except OSError:
        stats = False
    return {"release": os.uname().release, "btf": os.path.exists("/sys/kernel/btf/vmlinux"),
            "map_types": maps, "helpers": helpers, "bpf_stats_enabled": stats}
