"""The ENIs' root qdisc for egress pacing, and the kernel probe behind it.

EDT (the preferred way): the ENI's egress program stamps each packet of a
limited pod with its departure time; fq, the root qdisc (one per tx queue
under mq on a multi-queue ENI), holds it until then, and drops what lies
beyond the horizon (FP_BW_HORIZON_NS, which the program enforces first).
HTB (kernels built without fq): an HTB root whose classes, one per limited
pod, shape at the pod's rate; the program names the class in skb->priority
and everything else goes straight through (HTB's direct queue).

fastpath's root carries the handle fa57: (FP_BW_HTB_MAJOR), which is how a
restarted agent and `fastpath uninstall` recognise it. Only a kernel-default
root (handle 0:, e.g. noqueue on a veth or mq with default children on a
NIC) is taken over: an operator's own qdisc is left alone and its ENI is
reported unpaced. Restoring means deleting fastpath's root, upon which the
kernel re-creates the default it replaced (recorded at takeover, and
checked).

Every change goes through iproute2's `tc`, run inside the node's netns.
"""
from __future__ import annotations

import ctypes
import json
import logging
import re
import subprocess
import threading
from dataclasses import dataclass

from agent.datapath.maps import DEFS
from agent.datapath.nsenter import in_netns

log = logging.getLogger("fastpath.bandwidth")

MAJOR = DEFS.defines["FP_BW_HTB_MAJOR"]
HANDLE = f"{MAJOR:x}:"
HORIZON_S = DEFS.defines["FP_BW_HORIZON_NS"] / 1e9
EDT, HTB = "edt", "htb"


class QdiscError(Exception):
    pass


def tc(args: list[str], netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    # A process forked by a thread inside the netns starts inside it.
    with in_netns(netns):
        r = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise QdiscError(f"tc {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r


@dataclass(frozen=True)
class Root:
    kind: str
    handle: str              # "0:" for a kernel default, "fa57:" for ours

    @property
    def ours(self) -> bool:
        return self.handle == HANDLE

    @property
    def default(self) -> bool:
        return self.handle in ("0:", "")

    def describe(self) -> str:
        return f"{self.kind} {self.handle}" + (" (kernel default)" if self.default else "")


def root(dev: str, netns: str | None = None) -> Root:
    out = json.loads(tc(["-j", "qdisc", "show", "dev", dev, "root"], netns).stdout or "[]")
    if not out:
        return Root("noqueue", "0:")
    q = out[0]
    return Root(q.get("kind", ""), q.get("handle", "0:"))


def tx_queues(dev: str, netns: str | None = None) -> int:
    with in_netns(netns):
        r = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", dev], capture_output=True,
                           text=True, timeout=30)
    if r.returncode != 0:
        raise QdiscError(f"{dev}: {r.stderr.strip()}")
    return int(json.loads(r.stdout)[0].get("num_tx_queues", 1))


def fq_args() -> list[str]:
    return ["fq", "horizon", f"{HORIZON_S:g}s", "horizon_drop"]


def install(dev: str, mode: str, netns: str | None = None) -> Root:
    """Make fastpath's root the ENI's root qdisc. Returns what it replaced.
    Raises QdiscError when the root is an operator's (not a kernel default),
    or when tc fails."""
    before = root(dev, netns)
    if before.ours and before.kind == _root_kind(dev, mode, netns):
        return before                      # a restarted agent: classes and all kept
    if not (before.default or before.ours):
        raise QdiscError(f"{dev} has a configured root qdisc ({before.describe()}): "
                         "fastpath does not replace it, so traffic leaving by it is not paced")
    if mode == EDT:
        n = tx_queues(dev, netns)
        if n > 1:
            tc(["qdisc", "replace", "dev", dev, "root", "handle", HANDLE, "mq"], netns)
            for i in range(1, n + 1):
                tc(["qdisc", "replace", "dev", dev, "parent", f"{HANDLE}{i:x}", *fq_args()], netns)
        else:
            tc(["qdisc", "replace", "dev", dev, "root", "handle", HANDLE, *fq_args()], netns)
    else:
        # unclassified traffic (unlimited pods, the node's own) goes through
        # HTB's direct queue, unshaped
        tc(["qdisc", "replace", "dev", dev, "root", "handle", HANDLE, "htb"], netns)
    return before


def _root_kind(dev: str, mode: str, netns: str | None) -> str:
    if mode == HTB:
        return "htb"
    return "mq" if tx_queues(dev, netns) > 1 else "fq"


def restore(dev: str, netns: str | None = None) -> Root | None:
    """Delete fastpath's root (the kernel puts its default back); returns
    the root now in place, None when the device had none of ours."""
    if not root(dev, netns).ours:
        return None
    r = tc(["qdisc", "del", "dev", dev, "root"], netns, check=False)
    if r.returncode != 0 and "No such file" not in r.stderr and "Cannot find device" not in r.stderr:
        raise QdiscError(f"{dev}: cannot remove fastpath's root qdisc: {r.stderr.strip()}")
    return root(dev, netns)


def restore_all(netns: str | None = None) -> list[str]:
    """Give every device whose root qdisc is fastpath's its kernel default
    back (`fastpath uninstall`); one line per device."""
    from agent.datapath.netlink import iproute
    with iproute(netns) as ipr:
        names = [l.get_attr("IFLA_IFNAME") for l in ipr.get_links()]
    out = []
    for dev in names:
        try:
            now = restore(dev, netns)
        except QdiscError:
            continue            # the device went away meanwhile
        if now is not None:
            out.append(f"{dev} root qdisc: {now.describe()}")
    return out


# -- HTB classes (HTB mode) ----------------------------------------------------

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_rate(text: str) -> int:
    """tc's printed rate ("50Mbit", "12.3Kbit", "800bit") in bits/s."""
    m = re.fullmatch(r"([0-9.]+)([KMGT]?bit)", text, re.I)
    if not m:
        raise ValueError(f"unrecognised rate {text!r}")
    return round(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])


def classes(dev: str, netns: str | None = None) -> dict[int, int]:
    """minor -> rate (bits/s, as tc prints it: rounded to 3-4 digits) of
    the classes under fastpath's HTB root. (iproute2 has no JSON for HTB
    classes, so its text is read.)"""
    got = {}
    for line in tc(["class", "show", "dev", dev], netns).stdout.splitlines():
        m = re.match(r"class htb (\S+) .*?\brate (\S+)", line)
        if m and m.group(1).startswith(HANDLE):
            got[int(m.group(1)[len(HANDLE):], 16)] = parse_rate(m.group(2))
    return got


def same_rate(a: int, b: int) -> bool:
    """Equal as far as tc's rounded output can tell."""
    return abs(a - b) <= max(a, b) * 0.001 + 1


def quantum(bps: int) -> int:
    """HTB's round size per class: rate/r2q would exceed its 200000 cap at
    Gbit rates (and the kernel would log it for every class)."""
    return max(min(bps // 8 // 10, 200_000), 1514)


def burst(bps: int) -> int:
    """HTB's burst: 10 ms of the rate, at least two 64 KiB GSO packets. tc's
    own default (rate / HZ) is a single frame at Gbit rates here, which
    leaves the class under its rate (measured: 0.90 of 1 Gbit/s in goodput
    vs 0.956, the header overhead, with this burst)."""
    return max(bps // 8 // 100, 2 * 65536)


def set_class(dev: str, minor: int, bps: int, netns: str | None = None) -> None:
    rate, b = f"{bps}bit", f"{burst(bps)}b"
    tc(["class", "replace", "dev", dev, "parent", HANDLE, "classid", f"{HANDLE}{minor:x}", "htb",
        "rate", rate, "ceil", rate, "burst", b, "cburst", b, "quantum", str(quantum(bps))],
       netns)


def del_class(dev: str, minor: int, netns: str | None = None) -> None:
    r = tc(["class", "del", "dev", dev, "classid", f"{HANDLE}{minor:x}"], netns, check=False)
    if r.returncode != 0 and "No such file" not in r.stderr and "Cannot find" not in r.stderr:
        raise QdiscError(f"{dev}: cannot delete class {HANDLE}{minor:x}: {r.stderr.strip()}")


# -- the kernel probe ------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    fq: bool
    htb: bool
    detail: str = ""

    def mode(self, wanted: str) -> tuple[str | None, str]:
        """The egress mode to use for config value `wanted` (auto/edt/htb),
        or None with the reason the feature must stay off."""
        if wanted in ("auto", EDT) and self.fq:
            return EDT, "EDT timestamps, fq on the ENIs"
        if wanted == EDT:
            return None, f"bandwidth_egress is edt but this kernel has no fq qdisc ({self.detail})"
        if self.htb:
            why = "this kernel has no fq qdisc" if wanted == "auto" else "bandwidth_egress is htb"
            return HTB, f"per-pod HTB classes on the ENIs ({why})"
        return None, f"this kernel has neither the fq nor the htb qdisc ({self.detail})"


_CLONE_NEWNET = 0x40000000


def probe() -> Probe:
    """Which pacing qdiscs this kernel has, tried on a veth in a throwaway
    network namespace (a thread's own, gone when the thread ends), never
    on a device of the node."""
    box: dict = {}

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWNET) != 0:
            box["error"] = f"unshare(CLONE_NEWNET): errno {ctypes.get_errno()}"
            return
        r = subprocess.run(["ip", "link", "add", "fpprobe0", "type", "veth", "peer", "name",
                            "fpprobe1"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            box["error"] = f"cannot create a probe device: {r.stderr.strip()}"
            return
        got = {}
        for name, args in (("fq", fq_args()), ("htb", ["htb"])):
            r = subprocess.run(["tc", "qdisc", "add", "dev", "fpprobe0", "root", "handle", HANDLE,
                                *args], capture_output=True, text=True, timeout=30)
            got[name] = r.returncode == 0
            if r.returncode != 0:
                got[f"{name}_error"] = r.stderr.strip()
            subprocess.run(["tc", "qdisc", "del", "dev", "fpprobe0", "root"], capture_output=True,
                           timeout=30)
        box.update(got)

    t = threading.Thread(target=run, name="bw-probe")
    t.start()
    t.join(60)
    if "error" in box:
        return Probe(False, False, box["error"])
    detail = "; ".join(f"{k[:-6]}: {v}" for k, v in box.items() if k.endswith("_error"))
    return Probe(bool(box.get("fq")), bool(box.get("htb")), detail)
