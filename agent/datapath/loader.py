"""Compile fastpath's programs with bcc, open their pinned maps, load them.

One compile per agent start: the text is maps.c followed by each attach-point
file, parameterised only by build options derived from the configuration
(pin root, map sizes, test build). Per-endpoint facts live in maps, so pods
never cause a compile. Pinned maps are checked against the layout the
programs were compiled with; a mismatch (a layout change without a version
bump, or a resized map) is migrated, never silently reused.
"""
from __future__ import annotations

import contextlib
import ctypes as ct
import logging
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.model import bpfdefs
from agent.config import Config
from agent.datapath import libbpf
from agent.datapath.errors import (DatapathError, MissingKernelHeaders, NoBpfSupport,
                                   NotPrivileged, PinnedMapMismatch, VerifierRejected)

log = logging.getLogger("fastpath.datapath")

BPF_DIR = bpfdefs.BPF_DIR
# Attach-point files, in the order they are appended after maps.c.
PROGRAM_FILES = ("pod.c", "eni.c", "sock.c")
# Entry functions: name -> (file, program type, expected attach type or -1).
# Names fit the kernel's 15 characters, so listings show them whole.
# Attach types are the kernel's enum bpf_attach_type values (uapi).
SCHED_CLS, CGROUP_SOCK_ADDR = 3, 18
BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_UDP4_SENDMSG = 10, 14
BPF_CGROUP_UDP4_RECVMSG, BPF_CGROUP_INET4_GETPEERNAME = 19, 29
PROGRAMS = {
    "fp_from_pod": ("pod.c", SCHED_CLS, -1),
    "fp_to_pod": ("pod.c", SCHED_CLS, -1),
    "fp_from_vpc": ("eni.c", SCHED_CLS, -1),
    "fp_to_vpc": ("eni.c", SCHED_CLS, -1),
    "fp_sock_conn4": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
    "fp_sock_send4": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_SENDMSG),
    "fp_sock_recv4": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_RECVMSG),
    "fp_sock_peer4": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_GETPEERNAME),
}
BPFFS_MAGIC_TYPE = "bpf"


@dataclass(frozen=True)
class BuildOptions:
    pin_root: str
    endpoints_max: int
    counters_max: int
    bypass_max: int
    svc_max: int
    backends_max: int
    slots_max: int
    ct_max: int
    affinity_max: int
    sockrev_max: int
    hairpin_ip: str = "169.254.10.1"
    policy_max: int = 65536
    ipcache_max: int = 65536
    maglev_m: int = 1021
    src_range_max: int = 16384
    set_retval: bool = False         # the kernel has bpf_set_retval for cgroup hooks
    test_build: bool = False

    @classmethod
    def from_config(cls, config: Config, test_build: bool = False) -> "BuildOptions":
        return cls(config.bpffs_root, config.endpoints_map_size, config.counters_map_size,
                   config.bypass_map_size, config.services_map_size, config.backends_map_size,
                   config.slots_map_size, config.conntrack_map_size, config.affinity_map_size,
                   # socket-LB's reverse table holds one entry per translated
                   # socket, the socket-level twin of a conntrack entry
                   config.conntrack_map_size, config.local_router_ipv4,
                   policy_max=config.policy_map_size, ipcache_max=config.ipcache_map_size,
                   maglev_m=config.maglev_table_size,
                   src_range_max=config.source_ranges_map_size,
                   set_retval=kernel_has_set_retval(), test_build=test_build)

    def cflags(self) -> list[str]:
        flags = [
            f"-I{BPF_DIR}",
            f'-DFP_PIN_ROOT="{self.pin_root}"',
            f"-DFP_EP_MAX={self.endpoints_max}",
            f"-DFP_COUNTERS_MAX={self.counters_max}",
            f"-DFP_BYPASS_MAX={self.bypass_max}",
            f"-DFP_SVC_MAX={self.svc_max}",
            f"-DFP_BE_MAX={self.backends_max}",
            f"-DFP_SLOT_MAX={self.slots_max}",
            f"-DFP_CT_MAX={self.ct_max}",
            f"-DFP_AFF_MAX={self.affinity_max}",
            f"-DFP_SOCKREV_MAX={self.sockrev_max}",
            f"-DFP_POLICY_MAX={self.policy_max}",
            f"-DFP_IPCACHE_MAX={self.ipcache_max}",
            f"-DFP_MAGLEV_M={self.maglev_m}",
            f"-DFP_SRC_RANGE_MAX={self.src_range_max}",
            # (policy, direction, verdict) counters: bounded, whatever the rules
            f"-DFP_POLCNT_MAX={min(self.policy_max, 16384)}",
            # as the raw value of a __be32 field, to compare without swapping
            f"-DFP_HAIRPIN_IP={_be32_literal(self.hairpin_ip)}",
            "-Wno-unused-function",
        ]
        if self.set_retval:
            flags.append("-DFP_HAVE_SET_RETVAL=1")
        if self.test_build:
            flags.append("-DFP_TEST=1")
        return flags


# uapi: enum bpf_func_id (BPF_FUNC_set_retval, Linux 5.18)
BPF_FUNC_SET_RETVAL = 187


def kernel_has_set_retval() -> bool:
    """Whether socket-LB can refuse with ECONNREFUSED (bpf_set_retval) rather
    than the EPERM every refusing cgroup hook gives without it."""
    try:
        return libbpf.probe_helper(CGROUP_SOCK_ADDR, BPF_FUNC_SET_RETVAL)
    except (OSError, AttributeError):
        return False


def _be32_literal(ip: str) -> str:
    from agent.datapath.maps import be32
    return f"0x{be32(ip):08x}U"


def program_text() -> str:
    """The single compilation unit bcc sees (see maps.c for why).

    bcc cannot rewrite a map method call made through a macro name, so the
    FP_MAP_* names of fastpath.h are substituted here, before compiling."""
    maps = bpfdefs.load().maps
    pattern = re.compile(r"\b(" + "|".join(maps) + r")\b")
    parts = ['#include "include/fastpath.h"\n']
    for name in ("maps.c",) + PROGRAM_FILES:
        parts.append(f'#line 1 "{BPF_DIR / name}"\n')
        parts.append(pattern.sub(lambda m: maps[m.group(1)], (BPF_DIR / name).read_text()))
        parts.append("\n")
    return "".join(parts)


def mount_fstype(path: str) -> tuple[str, str]:
    """(mount point, fs type) of the filesystem holding `path` (or its nearest
    existing ancestor)."""
    p = os.path.realpath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    best = ("/", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4]
            fstype = fields[fields.index("-") + 1]
            if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype)
    return best


def preflight(pin_root: str) -> None:
    """Fail early, with the fix, for the usual reasons a node cannot run us."""
    if os.geteuid() != 0:
        raise NotPrivileged("fastpath needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): "
                            "run it as root or in the privileged policy container")
    lb = libbpf.lib()
    lb.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                  ct.c_uint32, ct.c_void_p]
    fd = lb.bpf_map_create(2, b"fp_probe", 4, 4, 1, None)
    if fd < 0:
        err = ct.get_errno()
        raise NoBpfSupport(f"this kernel refuses BPF maps ({os.strerror(err)}): fastpath needs "
                           "Linux >= 5.10 with CONFIG_BPF_SYSCALL and BTF")
    os.close(fd)
    build = Path(f"/lib/modules/{platform.release()}/build")
    if not (build / "include").exists():
        raise MissingKernelHeaders(
            f"kernel headers not found at {build}: bcc compiles against them. Install "
            "linux-headers-amd64 and link /lib/modules/$(uname -r)/build and source to "
            "/usr/src/linux-headers-*-{amd64,common} (`make setup` does exactly this)")
    mnt, fstype = mount_fstype(pin_root)
    if fstype != BPFFS_MAGIC_TYPE:
        raise DatapathError(f"bpffs_root {pin_root} is not on a bpf filesystem (it is on "
                            f"{fstype or 'unknown'} at {mnt}): mount one with "
                            f"`mount -t bpf bpf {os.path.dirname(pin_root) or pin_root}`")


@contextlib.contextmanager
def _capture_stderr():
    """bcc and libbpf print compiler errors and verifier logs on fd 2."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        box = {"text": ""}
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode(errors="replace")


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Loaded:
    """A compiled module: its tables (typed, from the C structs) and program fds."""

    def __init__(self, bpf, options: BuildOptions):
        self.bpf = bpf
        self.options = options
        self.prog_fds: dict[str, int] = {}

    def table(self, name: str):
        return self.bpf[name]

    def load_programs(self) -> None:
        for name, (_, prog_type, attach_type) in PROGRAMS.items():
            with _capture_stderr() as err:
                try:
                    fn = self.bpf.load_func(name, prog_type, attach_type=attach_type)
                except Exception:
                    fn = None
            if fn is None:
                raise VerifierRejected(name, _tail(err["text"]) or "(no verifier log)")
            self.prog_fds[name] = fn.fd

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bpf.cleanup()


def _compile(options: BuildOptions):
    try:
        from bcc import BPF
    except ImportError as exc:
        raise DatapathError(f"bcc is not importable ({exc}): install python3-bpfcc and use a "
                            "venv made with --system-site-packages (`make setup`)") from None
    with _capture_stderr() as err:
        try:
            bpf = BPF(text=program_text(), cflags=options.cflags())
        except Exception as exc:
            bpf = None
            reason = str(exc)
    if bpf is None:
        text = err["text"]
        if "kernel headers" in text or "kconfig.h" in text:
            raise MissingKernelHeaders(
                "bcc cannot find usable kernel headers: install linux-headers-amd64 and link "
                "/lib/modules/$(uname -r)/{build,source} (`make setup` does this)\n" + _tail(text, 8))
        raise DatapathError(f"compiling fastpath's BPF programs failed ({reason}):\n"
                            + _tail(text))
    return bpf


def _declared(bpf, table) -> tuple[int, int, int, int]:
    from bcc import lib as bcclib
    # bcc 0.26 declares no argtypes for these two: ctypes would pass the
    # module pointer as a C int (truncated), which crashes once the module
    # lives at a high enough address (seen after ~45 agents in one process)
    for fn in (bcclib.bpf_table_key_size_id, bcclib.bpf_table_leaf_size_id):
        if fn.argtypes is None:
            fn.argtypes = [ct.c_void_p, ct.c_ulonglong]
            fn.restype = ct.c_size_t
    tid = table.map_id
    return (bcclib.bpf_table_type_id(bpf.module, tid),
            bcclib.bpf_table_key_size_id(bpf.module, tid),
            bcclib.bpf_table_leaf_size_id(bpf.module, tid),
            bcclib.bpf_table_max_entries_id(bpf.module, tid))


def pinned_map_names() -> list[str]:
    m = bpfdefs.load().maps
    return list(m.values())


def _mismatches(bpf) -> list[tuple[str, str, bool]]:
    """Pinned maps whose real layout differs from what was compiled:
    (name, description, entries copyable)."""
    out = []
    for name in pinned_map_names():
        t = bpf[name]
        mtype, ksize, vsize, maxent = _declared(bpf, t)
        info = libbpf.map_info(t.map_fd)
        if (info.type, info.key_size, info.value_size, info.max_entries) == (mtype, ksize, vsize, maxent):
            continue
        desc = (f"pinned {name}: type {info.type} key {info.key_size}B value {info.value_size}B "
                f"max {info.max_entries}; compiled: type {mtype} key {ksize}B value {vsize}B max {maxent}")
        # a ring buffer holds events in flight, not state: never copied
        copyable = ((info.type, info.key_size, info.value_size) == (mtype, ksize, vsize)
                    and mtype != libbpf.BPF_MAP_TYPE_RINGBUF)
        out.append((name, desc, copyable))
    return out


def open_module(options: BuildOptions) -> tuple[Loaded, list[str]]:
    """Compile, reconcile pinned maps, and return the module plus a list of
    human-readable migration notes (empty when every pin was reused as is)."""
    os.makedirs(options.pin_root, exist_ok=True)
    bpf = _compile(options)
    notes: list[str] = []
    bad = _mismatches(bpf)
    if bad:
        saved: dict[str, list[tuple[bytes, bytes]]] = {}
        for name, desc, copyable in bad:
            t = bpf[name]
            if copyable:
                info = libbpf.map_info(t.map_fd)
                vsize = libbpf.value_buffer_size(info.type, info.value_size)
                saved[name] = list(libbpf.map_items_raw(t.map_fd, info.key_size, vsize))
                notes.append(f"{desc}: resized, {len(saved[name])} entries carried over")
            else:
                notes.append(f"{desc}: layout changed, entries are rebuilt from agent state")
            os.unlink(os.path.join(options.pin_root, name))
        bpf.cleanup()
        bpf = _compile(options)
        for name, items in saved.items():
            fd = bpf[name].map_fd
            for k, v in items:
                kb = ct.create_string_buffer(k, len(k))
                vb = ct.create_string_buffer(v, len(v))
                libbpf.lib().bpf_map_update_elem(fd, kb, vb, 0)
        still = _mismatches(bpf)
        if still:
            raise PinnedMapMismatch("pinned maps still mismatch after migration: "
                                    + "; ".join(d for _, d, _ in still))
        for n in notes:
            log.warning("migrated %s", n)
    # Pins of older layout versions are no longer referenced by any program.
    current = set(pinned_map_names())
    for entry in sorted(os.listdir(options.pin_root)):
        if re.fullmatch(r"fp_\w+_v\d+", entry) and entry not in current:
            os.unlink(os.path.join(options.pin_root, entry))
            notes.append(f"removed stale pinned map {entry} (superseded layout)")
            log.warning("removed stale pinned map %s", entry)
    return Loaded(bpf, options), notes
