"""Compile fastpath's programs with bcc, open their pinned maps, load them.

One compile per agent start: the text is maps.c followed by each attach-point
file, parameterised only by build options derived from the configuration
(pin root, map sizes, conntrack lifetimes, test build). Per-endpoint facts
live in maps, so pods never cause a compile. Pinned maps are checked
against the layout the programs were compiled with (BTF fingerprints,
agent/datapath/btf.py); a mismatch (a layout change, a resized map, an
older version) is migrated field by field, never silently reused.
"""
from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import logging
import os
import platform
import re
import tempfile
from dataclasses import dataclass, field
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
BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_UDP6_SENDMSG = 11, 15
BPF_CGROUP_UDP6_RECVMSG, BPF_CGROUP_INET6_GETPEERNAME = 20, 30
PROGRAMS = {
    "fp_from_pod": ("pod.c", SCHED_CLS, -1),
    "fp_to_pod": ("pod.c", SCHED_CLS, -1),
    "fp_from_vpc": ("eni.c", SCHED_CLS, -1),
    "fp_to_vpc": ("eni.c", SCHED_CLS, -1),
    "fp_lo": ("eni.c", SCHED_CLS, -1),
    # reached by tail call only, never attached (TAIL_CALLS)
    "fp_pod_route": ("pod.c", SCHED_CLS, -1),
    "fp_from_pod6": ("pod.c", SCHED_CLS, -1),
    "fp_from_vpc6": ("eni.c", SCHED_CLS, -1),
    "fp_to_pod6": ("pod.c", SCHED_CLS, -1),
    "fp_pod6_route": ("pod.c", SCHED_CLS, -1),
    "fp_vpc6_node": ("eni.c", SCHED_CLS, -1),
    "fp_vpc6_sctp": ("eni.c", SCHED_CLS, -1),
    "fp_sock_conn4": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
    "fp_sock_send4": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_SENDMSG),
    "fp_sock_recv4": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_RECVMSG),
    "fp_sock_peer4": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_GETPEERNAME),
    "fp_sock_conn6": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_CONNECT),
    "fp_sock_send6": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_UDP6_SENDMSG),
    "fp_sock_recv6": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_UDP6_RECVMSG),
    "fp_sock_peer6": ("sock.c", CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_GETPEERNAME),
}
# Program -> the FP_MAP_TAILS slot (fastpath.h: FP_TAIL_*) it is reached by.
TAIL_CALLS = {"fp_pod_route": "FP_TAIL_FROM_POD_ROUTE", "fp_from_pod6": "FP_TAIL_FROM_POD6",
              "fp_from_vpc6": "FP_TAIL_FROM_VPC6", "fp_to_pod6": "FP_TAIL_TO_POD6",
              "fp_pod6_route": "FP_TAIL_FROM_POD6_ROUTE", "fp_vpc6_node": "FP_TAIL_FROM_VPC6_NODE",
              "fp_vpc6_sctp": "FP_TAIL_FROM_VPC6_SCTP"}
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
    hairpin_ip6: str = "fd00::a9fe:a01"
    policy_max: int = 65536
    ipcache_max: int = 65536
    maglev_m: int = 1021
    src_range_max: int = 16384
    set_retval: bool = False         # the kernel has bpf_set_retval for cgroup hooks
    ct_new_max: int = 65536
    ct_policy_max: int = 262144
    # conntrack lifetimes in seconds (agent/config.py conntrack_*_timeout)
    ct_tcp_syn: int = 60
    ct_tcp_established: int = 21600
    ct_tcp_fin: int = 60
    ct_tcp_close: int = 10
    ct_other: int = 120
    bw_flows_max: int = 65536
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
                   set_retval=kernel_has_set_retval(),
                   ct_new_max=config.conntrack_new_map_size,
                   ct_policy_max=config.conntrack_policy_map_size,
                   ct_tcp_syn=config.conntrack_tcp_syn_timeout,
                   ct_tcp_established=config.conntrack_tcp_idle_timeout,
                   ct_tcp_fin=config.conntrack_tcp_fin_timeout,
                   ct_tcp_close=config.conntrack_tcp_close_timeout,
                   ct_other=config.conntrack_idle_timeout,
                   bw_flows_max=config.bandwidth_flows_map_size,
                   hairpin_ip6=config.hairpin_source_ipv6, test_build=test_build)

    def lifetimes(self) -> "Lifetimes":
        """The conntrack lifetimes these programs apply (the agent's GC
        applies the same ones)."""
        from agent.model.conntrack import Lifetimes
        return Lifetimes(self.ct_tcp_syn, self.ct_tcp_established, self.ct_tcp_fin,
                         self.ct_tcp_close, self.ct_other)

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
            f"-DFP_CT_NEW_MAX={self.ct_new_max}",
            f"-DFP_CT_POLICY_MAX={self.ct_policy_max}",
            f"-DFP_CT_TCP_SYN_S={self.ct_tcp_syn}ULL",
            f"-DFP_CT_TCP_ESTABLISHED_S={self.ct_tcp_established}ULL",
            f"-DFP_CT_TCP_FIN_S={self.ct_tcp_fin}ULL",
            f"-DFP_CT_TCP_CLOSE_S={self.ct_tcp_close}ULL",
            f"-DFP_CT_OTHER_S={self.ct_other}ULL",
            f"-DFP_AFF_MAX={self.affinity_max}",
            f"-DFP_SOCKREV_MAX={self.sockrev_max}",
            f"-DFP_POLICY_MAX={self.policy_max}",
            f"-DFP_IPCACHE_MAX={self.ipcache_max}",
            f"-DFP_MAGLEV_M={self.maglev_m}",
            f"-DFP_SRC_RANGE_MAX={self.src_range_max}",
            # (policy, direction, verdict) counters: bounded, whatever the rules
            f"-DFP_POLCNT_MAX={min(self.policy_max, 16384)}",
            f"-DFP_BW_FLOWS_MAX={self.bw_flows_max}",
            # per limited pod: passed and each drop reason, both directions
            # (allocated per entry, so the bound costs nothing unused)
            f"-DFP_BWCNT_MAX={self.endpoints_max * 12}",
            # as the raw value of a __be32 field, to compare without swapping
            f"-DFP_HAIRPIN_IP={_be32_literal(self.hairpin_ip)}",
            # the IPv6 one as four such __u32 words (lib/ct6.h)
            *(f"-DFP_HAIRPIN_IP6_{i}={w}" for i, w in enumerate(_be128_words(self.hairpin_ip6))),
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


def _be128_words(ip: str) -> list[str]:
    import socket
    import struct
    raw = socket.inet_pton(socket.AF_INET6, ip)
    return [f"0x{w:08x}U" for w in struct.unpack("=4I", raw)]


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
        raise NotPrivileged("fastpath needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN: run it "
                            "as root or in the policy container of deploy/daemonset.yaml")
    lb = libbpf.lib()
    lb.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                  ct.c_uint32, ct.c_void_p]
    fd = lb.bpf_map_create(2, b"fp_probe", 4, 4, 1, None)
    if fd < 0:
        err = ct.get_errno()
        if err == errno.EPERM:
            # a missing capability, or a seccomp profile that blocks bpf():
            # the runtime's default one does unless CAP_SYS_ADMIN is held
            raise NotPrivileged("bpf() is not permitted here: fastpath needs CAP_SYS_ADMIN (it "
                                "also covers bpf()), and a seccomp profile that allows bpf() "
                                "(RuntimeDefault does, given CAP_SYS_ADMIN)")
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

    def load_programs(self, fill_tails: bool = True) -> None:
        """`fill_tails`: also point the tail-call map at these programs (a
        build leaves that to the agent, right before it attaches them: the
        map is shared with the programs still attached)."""
        for name, (_, prog_type, attach_type) in PROGRAMS.items():
            with _capture_stderr() as err:
                try:
                    fn = self.bpf.load_func(name, prog_type, attach_type=attach_type)
                except Exception:
                    fn = None
            if fn is None:
                raise VerifierRejected(name, _tail(err["text"]) or "(no verifier log)")
            self.prog_fds[name] = fn.fd
        if fill_tails:
            self.fill_tail_calls()

    def fill_tail_calls(self) -> None:
        """Every slot of the tail-call map, before anything is attached: a
        program that meets an empty slot drops the packet."""
        import ctypes
        defs = bpfdefs.load()
        tails = self.bpf[defs.maps["FP_MAP_TAILS"]]
        for name, slot in TAIL_CALLS.items():
            tails[ctypes.c_int(int(defs.defines[slot]))] = ctypes.c_int(self.prog_fds[name])

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


# A pinned map set aside while its successor is created at its name; a
# start that finds one (the previous start died mid-migration) carries it
# over like any superseded map.
ASIDE = "_old"  # (bpffs refuses names with a dot)
PIN_RE = re.compile(r"fp_\w+_v\d+(_old\d*)?")
# Arrays hold settings and constants the agent writes at every start, a
# ring buffer events in flight: their content is rebuilt, never copied.
NOT_COPIED = (libbpf.BPF_MAP_TYPE_ARRAY, libbpf.BPF_MAP_TYPE_PERCPU_ARRAY,
              libbpf.BPF_MAP_TYPE_RINGBUF, libbpf.BPF_MAP_TYPE_PROG_ARRAY)
# Maps whose BTF carries no key/value layout worth checking.
NO_LAYOUT = (libbpf.BPF_MAP_TYPE_RINGBUF, libbpf.BPF_MAP_TYPE_PROG_ARRAY)


@dataclass
class Compiled:
    """What the programs were compiled with for one map."""
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    key: "btf.Layout | None"
    value: "btf.Layout | None"


def _compiled(bpf) -> dict[str, Compiled]:
    """Every pinned map's compiled declaration, layouts from the programs'
    BTF (bpf/maps.c's fp_btf_probe, which uses no map, is loaded to read it:
    a program that did would be refused while an older layout is pinned)."""
    from agent.datapath import btf
    fn = bpf.load_func("fp_btf_probe", SCHED_CLS)
    prog_btf = btf.program_btf(fn.fd)
    out = {}
    for name in pinned_map_names():
        mtype, ks, vs, maxent = _declared(bpf, bpf[name])
        key = value = None
        if mtype not in NO_LAYOUT:
            k, v = prog_btf.map_types(name)
            key, value = prog_btf.layout(k), prog_btf.layout(v)
        out[name] = Compiled(name, mtype, ks, vs, maxent, key, value)
    return out


def _difference(c: Compiled, fd: int) -> str:
    """How the pinned map behind `fd` differs from what was compiled ("" when
    it can be used as it is)."""
    from agent.datapath import btf
    info = libbpf.map_info(fd)
    what = []
    if info.type != c.type:
        what.append(f"type {info.type} (compiled {c.type})")
    if (info.key_size, info.value_size) != (c.key_size, c.value_size):
        what.append(f"key/value {info.key_size}/{info.value_size} B "
                    f"(compiled {c.key_size}/{c.value_size} B)")
    if info.max_entries != c.max_entries:
        what.append(f"max {info.max_entries} (compiled {c.max_entries})")
    if c.value is not None:
        have = btf.map_layouts(fd)
        if have is None:
            what.append("layout unknown (no BTF)")
        elif (have[0].fingerprint(), have[1].fingerprint()) != (c.key.fingerprint(),
                                                               c.value.fingerprint()):
            what.append(f"layout {have[1].describe()} (compiled {c.value.describe()})"
                        if have[1].fingerprint() != c.value.fingerprint() else
                        f"key layout {have[0].describe()} (compiled {c.key.describe()})")
    return "; ".join(what)


@dataclass
class Source:
    """A superseded pinned map whose entries go to the maps replacing it."""
    pin: str                 # its name under the pin root
    path: str
    fd: int
    type: int
    key_size: int
    value_size: int
    layouts: "tuple | None"  # (key, value) btf.Layout, None without BTF
    why: str                 # what superseded it
    copied: set = field(default_factory=set)   # raw keys carried by the first copy
    count: int = 0
    refused: int = 0


class Migration:
    """Carries entries of superseded pinned maps into the maps that replace
    them, field by field by name, twice: when the new maps are made (before
    any new program is attached) and once more after the new programs are
    attached (`finish`: entries the old programs created in between); then
    removes the superseded pins."""

    def __init__(self, pin_root: str, fds: dict[str, int], compiled: dict[str, Compiled],
                 sources: list[Source], notes: list[str], rules=None):
        self.pin_root = pin_root
        self.fds = fds           # map name -> fd of the map now pinned at that name
        self.compiled = compiled
        self.sources = sources
        self.notes = notes
        self.rules = rules
        self.finished = False
        self._by_lineage = {bpfdefs.map_lineage(name): name for name in compiled}

    def _targets(self, src: Source, key_fields: dict[str, int]) -> list[str]:
        got = self.rules.targets(src.pin, key_fields) if self.rules is not None else None
        return list(got) if got else [self._by_lineage[bpfdefs.map_lineage(src.pin)]]

    def _defaults(self, target: str) -> dict[str, int]:
        return self.rules.defaults(target) if self.rules is not None else {}

    def copy(self, final: bool = False) -> int:
        """Carry every source's entries over; `final`: only those the first
        copy did not see (what was carried then and is gone now was deleted
        on purpose: a closed flow, a removed endpoint). An entry whose key
        a target already holds is left as the target has it."""
        from agent.datapath import btf, mapio
        total = 0
        for src in self.sources:
            if src.layouts is None:
                continue
            vbuf = libbpf.value_buffer_size(src.type, src.value_size)
            ncpu = vbuf // ((src.value_size + 7) // 8 * 8) if src.type in libbpf.PERCPU_MAP_TYPES else 1
            per_target: dict[str, list[tuple[bytes, bytes]]] = {}
            fallbacks: dict[bytes, list[str]] = {}
            for k, v in mapio.items(src.fd, src.key_size, vbuf):
                if final and k in src.copied:
                    continue
                if not final:
                    src.copied.add(k)
                kf = btf.read_fields(src.layouts[0], k)
                tg = self._targets(src, kf)
                first = tg[0]
                c = self.compiled[first]
                try:
                    nk = btf.convert(src.layouts[0], c.key, k)
                    nv = self._convert_value(src, c, v, ncpu, self._defaults(first))
                except btf.MigrationError as exc:
                    src.refused += 1
                    log.warning("migration of %s: entry not carried over: %s", src.pin, exc)
                    continue
                if (final or len(tg) > 1) and any(
                        mapio.lookup(self.fds[t], nk, libbpf.value_buffer_size(
                            self.compiled[t].type, self.compiled[t].value_size)) is not None
                        for t in tg):
                    continue            # the new maps have it already (in any tier)
                per_target.setdefault(first, []).append((nk, nv))
                if len(tg) > 1:
                    fallbacks[nk] = tg[1:]
            for target, pairs in per_target.items():
                total += self._write(src, target, pairs, fallbacks)
        return total

    def _convert_value(self, src: Source, c: Compiled, raw: bytes, ncpu: int,
                       defaults: dict[str, int]) -> bytes:
        from agent.datapath import btf
        if src.type not in libbpf.PERCPU_MAP_TYPES:
            return btf.convert(src.layouts[1], c.value, raw, defaults)
        old_slot = (src.value_size + 7) // 8 * 8
        new_slot = (c.value_size + 7) // 8 * 8
        out = b""
        for i in range(ncpu):
            one = btf.convert(src.layouts[1], c.value, raw[i * old_slot:i * old_slot + src.value_size],
                              defaults)
            out += one + bytes(new_slot - len(one))
        return out

    def _write(self, src: Source, target: str, pairs, fallbacks) -> int:
        from agent.datapath import mapio
        fd = self.fds[target]
        written = 0
        for i, (k, v) in enumerate(pairs):
            err = mapio.update(fd, k, v, mapio.BPF_NOEXIST)
            if err == 0:
                written += 1
                continue
            if err == errno.EEXIST:
                continue
            # full (E2BIG): the next target of this entry, if any
            placed = False
            for other in fallbacks.get(k, ()):
                if mapio.update(self.fds[other], k, v, mapio.BPF_NOEXIST) in (0, errno.EEXIST):
                    placed = True
                    written += 1
                    break
            if not placed:
                src.refused += 1
        src.count += written
        return written

    def finish(self) -> list[str]:
        """The second copy, then the superseded pins go. Returns notes."""
        if self.finished:
            return []
        self.finished = True
        notes = []
        try:
            self.copy(final=True)
        finally:
            for src in self.sources:
                extra = f", {src.refused} not carried over" if src.refused else ""
                if src.layouts is None:
                    notes.append(f"pinned {src.pin}: {src.why}: entries are rebuilt from "
                                 "agent state")
                else:
                    notes.append(f"pinned {src.pin}: {src.why}: migrated {src.count} entries "
                                 f"field by field{extra}")
                with contextlib.suppress(OSError):
                    os.close(src.fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(src.path)
        for n in notes:
            log.warning("%s", n)
        self.notes.extend(notes)
        return notes


def _source(pin_root: str, pin: str, why: str) -> Source | None:
    from agent.datapath import btf
    path = os.path.join(pin_root, pin)
    try:
        fd = libbpf.obj_get(path)
    except OSError:
        return None
    try:
        info = libbpf.map_info(fd)
        layouts = btf.map_layouts(fd) if info.type not in NOT_COPIED else None
    except OSError:
        os.close(fd)
        return None
    return Source(pin, path, fd, info.type, info.key_size, info.value_size, layouts, why)


def pin_fd(fd: int, path: str) -> None:
    """Pin a map or program fd at path (bpffs), raising OSError naming it."""
    lib = libbpf.lib()
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    if lib.bpf_obj_pin(fd, path.encode()) != 0:
        err = ct.get_errno()
        raise OSError(err, f"pin {path}: {os.strerror(err)}")


def _aside_name(pin_root: str, name: str) -> str:
    cand, n = name + ASIDE, 0
    while os.path.exists(os.path.join(pin_root, cand)):
        n += 1
        cand = f"{name}{ASIDE}{n}"
    return cand


def reconcile(options: BuildOptions):
    """Compile, and set aside every pinned map the programs cannot use as it
    is (then compile again, so bcc makes new maps at those names). Returns
    the bcc module and [(name set aside, why)].

    A pinned map is used as it is only when its type, key and value sizes,
    capacity and layout fingerprint (BTF) are what was compiled."""
    os.makedirs(options.pin_root, exist_ok=True)
    bpf = _compile(options)
    compiled = _compiled(bpf)
    aside: list[tuple[str, str]] = []
    for name, c in compiled.items():
        why = _difference(c, bpf[name].map_fd)
        if why:
            # pin the map at its new name, then unpin the old one (the map
            # lives on as long as a pin or fd holds it)
            new = _aside_name(options.pin_root, name)
            old_path = os.path.join(options.pin_root, name)
            pin_fd(bpf[name].map_fd, os.path.join(options.pin_root, new))
            os.unlink(old_path)
            aside.append((new, why))
    if aside:
        bpf.cleanup()
        bpf = _compile(options)
        compiled = _compiled(bpf)
        still = [f"{n}: {w}" for n in compiled if (w := _difference(compiled[n], bpf[n].map_fd))]
        if still:
            raise PinnedMapMismatch("pinned maps still differ from the compiled ones after "
                                    "setting them aside: " + "; ".join(still))
    return bpf, aside


# -- the compiled program set, pinned -------------------------------------------
#
# Programs are pinned like the maps, under <pin root>/progs/<key>, where the
# key hashes everything a compile depends on: the program text, the build
# options (cflags) and the kernel release, and the compiler (libbcc). A
# start whose key has a complete pinned set loads nothing: it opens those
# programs, which already use the pinned maps. The set is pinned under a
# temporary name and renamed once complete, so a set is either whole or
# absent; the tail-call map is refilled from the same set at every open.

PROG_DIR = "progs"
_BUILDING = "_building"


def _compiler_id() -> str:
    import glob
    libs = sorted(glob.glob("/usr/lib/*/libbcc.so.*.*") + glob.glob("/usr/lib/libbcc.so.*.*"))
    return os.path.basename(os.path.realpath(libs[-1])) if libs else "bcc"


def build_key(options: BuildOptions) -> str:
    import hashlib
    h = hashlib.sha256()
    for part in (program_text(), "\0".join(options.cflags()), platform.release(),
                 _compiler_id()):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def prog_set_dir(options: BuildOptions, key: str) -> str:
    return os.path.join(options.pin_root, PROG_DIR, key)


def build(options: BuildOptions) -> dict:
    """Compile, reconcile the pinned maps, load and pin the programs (what
    a start with changed sources or options needs; the agent runs this in a
    short-lived child process, `python -m agent.datapath.build`, so that the
    compiler never stays resident in it). Returns {"key", "aside"}."""
    key = build_key(options)
    bpf, aside = reconcile(options)
    module = Loaded(bpf, options)
    try:
        # the tail-call map is pinned and in use by the attached programs:
        # the agent fills it from this set just before attaching it
        module.load_programs(fill_tails=False)
        root = os.path.join(options.pin_root, PROG_DIR)
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, key + _BUILDING)
        _remove_set(tmp)
        os.mkdir(tmp)
        for name, fd in module.prog_fds.items():
            pin_fd(fd, os.path.join(tmp, name))
        final = os.path.join(root, key)
        _remove_set(final)
        os.rename(tmp, final)
        # older sets: their programs stay loaded while attached (tc and the
        # cgroups hold them) until this start replaces every attachment
        for other in os.listdir(root):
            if other != key:
                _remove_set(os.path.join(root, other))
    finally:
        module.close()
    return {"key": key, "aside": aside}


def _remove_set(path: str) -> None:
    if not os.path.isdir(path):
        return
    for entry in os.listdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, entry))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


class PinnedModule:
    """The pinned program set of one build key and the pinned maps it uses:
    programs by fd, maps as tables typed from their BTF (agent/datapath/
    tables.py). No compiler involved."""

    def __init__(self, options: BuildOptions, prog_fds: dict[str, int], tables: dict):
        self.options = options
        self.prog_fds = prog_fds
        self.tables = tables

    def table(self, name: str):
        return self.tables[name]

    def fill_tail_calls(self) -> None:
        """Every slot of the tail-call map, from this set, before anything is
        attached: a program that meets an empty slot drops the packet."""
        defs = bpfdefs.load()
        tails = self.tables[defs.maps["FP_MAP_TAILS"]]
        for name, slot in TAIL_CALLS.items():
            tails[ct.c_int(int(defs.defines[slot]))] = ct.c_int(self.prog_fds[name])

    def close(self) -> None:
        for fd in list(self.prog_fds.values()) + [t.map_fd for t in self.tables.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.prog_fds, self.tables = {}, {}


def open_pinned(options: BuildOptions, key: str) -> PinnedModule | None:
    """The complete pinned set of `key` with every map it uses still the one
    pinned at that map's name; None when there is no such set (never built
    with these sources and options, or its maps were replaced since)."""
    from agent.datapath import tables as tablesmod
    d = prog_set_dir(options, key)
    if not os.path.isdir(d) or set(os.listdir(d)) != set(PROGRAMS):
        return None
    fds: dict[str, int] = {}
    tabs: dict = {}
    ok = False
    try:
        for name in PROGRAMS:
            fds[name] = libbpf.obj_get(os.path.join(d, name))
        wanted = pinned_map_names()
        pinned_ids = {}
        for n in wanted:
            path = os.path.join(options.pin_root, n)
            if not os.path.exists(path):
                return None
            fd = libbpf.obj_get(path)
            try:
                pinned_ids[libbpf.map_info(fd).id] = n
                if n in wanted:
                    tabs[n] = tablesmod.Table(n, fd)
                    fd = -1
            finally:
                if fd >= 0:
                    os.close(fd)
        # a map the programs use that is not pinned at its name any more
        # (replaced by another build, removed) makes the set unusable; maps
        # no pin names (per-CPU scratch space) are the programs' own
        pinned_names = {n[:15] for n in pinned_ids.values()}
        for name, fd in fds.items():
            for mid in _prog_map_ids(fd) - set(pinned_ids):
                if _map_name(mid) in pinned_names:
                    log.info("pinned programs %s: %s uses a map no longer pinned; "
                             "rebuilding", key, name)
                    return None
        ok = True
    except OSError as exc:
        log.info("pinned programs %s unusable (%s); rebuilding", key, exc)
        return None
    finally:
        if not ok:
            for fd in list(fds.values()) + [t.map_fd for t in tabs.values()]:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return PinnedModule(options, fds, tabs)


def _prog_map_ids(fd: int) -> set[int]:
    info = libbpf.prog_info(fd)
    n = info.nr_map_ids
    ids = (ct.c_uint32 * max(n, 1))()
    info2 = libbpf.ProgInfo()
    info2.nr_map_ids = n
    info2.map_ids = ct.addressof(ids)
    libbpf.prog_info(fd, info2)
    return set(ids[:n])


def _map_name(map_id: int) -> str:
    fd = libbpf.lib().bpf_map_get_fd_by_id(map_id)
    if fd < 0:
        return ""           # gone meanwhile
    try:
        return libbpf.map_info(fd).name.decode()
    finally:
        os.close(fd)


def compiled_from_pins(module: PinnedModule) -> dict[str, Compiled]:
    """What the programs were compiled with for each map: the maps they use
    were created (or checked) by that compile, so their own BTF is it."""
    from agent.datapath import btf
    out = {}
    for name, t in module.tables.items():
        key = value = None
        if t.type not in NO_LAYOUT:
            lay = btf.map_layouts(t.map_fd)
            if lay is not None:
                key, value = lay
        out[name] = Compiled(name, t.type, t.key_size, t.value_size, t.max_entries, key, value)
    return out


def start_migration(module: PinnedModule, aside: list[tuple[str, str]], rules=None) -> Migration:
    """The migration of whatever pinned maps the current ones supersede
    (set aside by a build, older versions of a map's lineage, leftovers of
    an interrupted start), copied once already; `Migration.finish()` once
    the programs are attached. `rules` (agent.conntrack.migrate.Rules):
    where an entry goes when not simply to the map of its lineage, and the
    defaults of fields its old layout lacks."""
    options = module.options
    compiled = compiled_from_pins(module)
    current = set(compiled) | {bpfdefs.load().maps["FP_MAP_EVENTS"]}
    lineages = {bpfdefs.map_lineage(n): n for n in current}
    whys = dict(aside)
    sources: list[Source] = []
    notes: list[str] = []
    for entry in sorted(os.listdir(options.pin_root)):
        if not PIN_RE.fullmatch(entry) or entry in current:
            continue
        lin = bpfdefs.map_lineage(entry)
        path = os.path.join(options.pin_root, entry)
        if lin not in lineages:
            os.unlink(path)
            notes.append(f"removed stale pinned map {entry} (no map of its lineage any more)")
            continue
        why = whys.get(entry) or (f"superseded by {lineages[lin]}" if not entry.startswith(
            lineages[lin]) else "left over from an interrupted migration")
        src = _source(options.pin_root, entry, why)
        if src is None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        sources.append(src)
    fds = {n: t.map_fd for n, t in module.tables.items()}
    migration = Migration(options.pin_root, fds, compiled, sources, notes, rules)
    migration.copy()
    for n in notes:
        log.warning("%s", n)
    return migration
