"""Keep the datapath's per-pod limits equal to what the local pods' annotations ask.

At start (`start`): the kernel is probed (agent.datapath.qdisc.probe) and
the egress mode chosen from `bandwidth_egress`: EDT (fq on the ENIs) or HTB
classes; without either the manager stays off, says why in its status, and
limits nothing (never half of it). Each ENI's kernel-default root qdisc is
replaced by fastpath's (restored on uninstall, or when the manager is
turned off) when the first local pod has an egress bandwidth limit, not
before: replacing a root qdisc drops what the device is sending at that
instant, which a node whose pods have no such limit (or an upgrade from a
release without the manager) need not pay.

Then, like the socket-LB opt-out: the local endpoints plus the Pods of the
cluster state -> agent.bandwidth (limits, problems) -> a plan against what
the pinned limits map holds -> HTB classes first (so a pod's class exists
before the program names it), then the map entries, and the datapath's
switch (FP_CFG_F_BW) on while any pod is limited. Refreshed when an
endpoint comes or goes (before the CNI ADD returns) and when a Pod's limit
annotations change. The pinned maps and the qdiscs outlive the agent, so
limits hold while it is down or restarting; a restarted agent plans against
the map and changes only what changed meanwhile.

Every `sweep_interval` the tracked connections of connection-limited pods
are swept: one never answered within OPENING_TIMEOUT, or idle longer than
`idle_timeout`, is removed and its count given back (the reaped counters
of fp_bw, which only this class writes).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from agent.bandwidth import Entry, compile_limits, limits_of, plan, touches_limits
from agent.daemon.worker import Worker

log = logging.getLogger("fastpath.bandwidth")

# A SYN nobody answered for this long no longer counts (the kernel's
# conntrack keeps SYN_SENT as long).
OPENING_TIMEOUT = 120


@dataclass
class BandwidthStatus:
    enabled: bool = False
    mode: str = ""                       # edt / htb
    summary: str = "not started"         # the status line
    enis: dict = field(default_factory=dict)     # ENI -> what fastpath did to its root qdisc
    pods: int = 0
    problems: list = field(default_factory=list)
    refreshes: int = 0
    sweeps: int = 0
    reaped: int = 0
    errors: int = 0
    error: str = ""
    bbr: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class BandwidthSync(Worker):
    def __init__(self, datapath, config, store, source, endpoints_fn: Callable[[], list], *,
                 netns: Optional[str] = None, sweep_interval: float = 30.0, metrics=None):
        self.dp = datapath
        self.maps = datapath.bandwidth
        self.config = config
        self.store = store
        self.source = source
        self.endpoints_fn = endpoints_fn
        self.netns = netns
        self.sweep_interval = sweep_interval
        self.metrics = metrics
        self.status = BandwidthStatus()
        self.lock = threading.Lock()
        self.enis: list[str] = []              # ENIs whose root qdisc is fastpath's
        self._waiting: list[str] = []          # ENIs to take over at the first egress limit
        self._entries: dict[str, Entry] = {}
        self._owners: dict[str, str] = {}      # pod IP -> endpoint key its entry was made for
        self._bbr_done: set[str] = set()
        self._synced = False                   # planned once from a complete cluster state
        self._classes_checked = False          # the ENIs' HTB classes compared with the map
        Worker.__init__(self, "bandwidth")

    # ----------------------------------------------------------------- start
    def start(self, enis: list[str], probe=None) -> "BandwidthSync":
        """`probe`: a future of qdisc.probe() started earlier (the agent
        runs it while it loads and restores), else probed here."""
        from agent.datapath import qdisc
        if not self.config.bandwidth_manager:
            self.disable(enis, "off (bandwidth_manager: false)")
            return self
        probe = probe.result() if probe is not None else qdisc.probe()
        mode, how = probe.mode(self.config.bandwidth_egress)
        if mode is None:
            self.disable(enis, f"off: {how}")
            log.error("bandwidth manager %s; pods' limits are not applied", self.status.summary)
            return self
        st = self.status
        st.enabled, st.mode = True, mode
        for eni in enis:
            try:
                before = qdisc.root(eni, self.netns)
            except qdisc.QdiscError as exc:
                st.enis[eni] = f"not paced: {exc}"
                log.warning("bandwidth manager: %s", exc)
                continue
            if before.ours:          # a restarted agent: classes and all kept
                self._install(eni)
            elif before.default:
                self._waiting.append(eni)
                st.enis[eni] = (f"{before.describe()} until a pod has an egress bandwidth "
                                "limit")
            else:
                st.enis[eni] = (f"not paced: {eni} has a configured root qdisc "
                                f"({before.describe()}): fastpath does not replace it")
                log.warning("bandwidth manager: %s", st.enis[eni])
        if self.config.bandwidth_bbr:
            st.bbr = self._check_bbr()
        self._entries = self.maps.entries()
        st.pods = len(self._entries)
        st.summary = (f"on: traffic to the VPC paced by {how} on "
                      f"{', '.join(self.enis + self._waiting) or 'no ENI'} (installed with "
                      f"the first egress bandwidth limit); same-node egress and all ingress "
                      f"by eBPF token buckets")
        log.info("bandwidth manager %s", st.summary)
        if self.source is not None:
            self._thread.start()
        else:
            log.warning("bandwidth manager: no cluster state source; the limits in the pinned "
                        "maps stay as they are")
        return self

    def _install(self, eni: str) -> bool:
        from agent.datapath import qdisc
        st = self.status
        try:
            before = qdisc.install(eni, st.mode, self.netns)
        except qdisc.QdiscError as exc:
            st.enis[eni] = f"not paced: {exc}"
            log.warning("bandwidth manager: %s", exc)
            return False
        self.enis.append(eni)
        st.enis[eni] = (f"fastpath {st.mode} root (kept from before)" if before.ours else
                        f"fastpath {st.mode} root (replaced {before.describe()})")
        if not before.ours:
            log.info("bandwidth manager: %s: %s", eni, st.enis[eni])
        return True

    def _install_waiting(self) -> None:
        """The ENIs' root qdiscs, before the first egress limit is written
        (so that the pod is paced from its first packet)."""
        waiting, self._waiting = self._waiting, []
        for eni in waiting:
            self._install(eni)

    def disable(self, enis: list[str], summary: str) -> None:
        """Switch the limits off, empty the maps, give the ENIs their
        kernel-default qdisc back."""
        from agent.datapath import qdisc
        self.dp.settings.set_bandwidth(False)
        removed = self.maps.clear()
        restored = []
        for eni in enis:
            try:
                now = qdisc.restore(eni, self.netns)
            except qdisc.QdiscError as exc:
                log.warning("bandwidth manager: %s", exc)
                continue
            if now is not None:
                restored.append(f"{eni} ({now.describe()})")
        self.status = BandwidthStatus(enabled=False, summary=summary)
        if removed or restored:
            log.info("bandwidth manager %s: %d pods' limits removed; root qdisc restored on %s",
                     summary, removed, ", ".join(restored) or "no ENI")

    def _check_bbr(self) -> str:
        try:
            with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
                have = f.read().split()
        except OSError as exc:
            return f"unavailable ({exc})"
        if "bbr" not in have:
            log.warning("bandwidth_bbr: this kernel has no bbr (it has %s); pods keep their "
                        "congestion control", ", ".join(have))
            return f"unavailable: the kernel offers {', '.join(have)}"
        return "on: new pods' TCP uses bbr"

    # -------------------------------------------------------------- planning
    def refresh(self) -> int:
        """Recompute every local pod's limits and bring the datapath to them.
        Returns the number of map writes and deletes."""
        from agent.datapath import qdisc
        # before the source's initial sync an empty store would withdraw
        # every limit the pinned maps hold
        if not self.status.enabled or not self._synced:
            return 0
        with self.lock:
            endpoints = list(self.endpoints_fn())
            by_ip = {ep.pod_key: ep for ep in endpoints}
            want, problems = compile_limits(self.store.snapshot(), endpoints)
            have = {ip: replace(e, owner=self._owners.get(ip, "")) for ip, e in
                    self._entries.items()}
            htb = self.status.mode == qdisc.HTB
            p = plan({ip: (lim, by_ip[ip].key) for ip, lim in want.items()}, have, htb=htb,
                     new_gen=lambda: secrets.randbits(31) | 1)
            after = {ip: e for ip, e in self._entries.items() if ip not in p.deletes}
            after.update(p.writes)
            if self._waiting and any(e.limits["egress_rate"] for e in after.values()):
                self._install_waiting()
            # the classes follow the plan (reading them costs a tc run: not
            # on every CNI ADD/DEL that changes no limit), and are checked
            # whole once after start
            classes = htb and (p.writes or p.deletes or not self._classes_checked)
            if classes:
                self._htb_classes(after)
            for ip, e in p.writes.items():
                self.maps.write(ip, e, ip in p.fresh)
                self._owners[ip] = e.owner
            self.dp.settings.set_bandwidth(bool(after), edt=self.status.mode == qdisc.EDT)
            for ip in p.deletes:
                self.maps.delete(ip)
                self._owners.pop(ip, None)
            if classes:
                self._htb_classes(after, remove=True)
                self._classes_checked = True
            self._entries = after
            for pr in set(problems) - set(self.status.problems):
                log.warning("bandwidth: %s", pr)
            st = self.status
            st.problems, st.pods = problems, len(after)
            st.refreshes += 1
            if self.config.bandwidth_bbr and st.bbr.startswith("on"):
                self._bbr(endpoints)
        n = len(p.writes) + len(p.deletes)
        if n:
            log.info("bandwidth: %d pods limited (%d written, %d removed)", len(after),
                     len(p.writes), len(p.deletes))
        return n

    def _htb_classes(self, entries: dict[str, Entry], remove: bool = False) -> None:
        """Each ENI's classes: one per pod with an egress rate. Adds and
        changes, or (remove) deletes classes no pod names any more."""
        from agent.datapath import qdisc
        want = {e.htb_minor: e.limits["egress_rate"] * 8 for e in entries.values()
                if e.htb_minor and e.limits["egress_rate"]}
        for eni in self.enis:
            have = qdisc.classes(eni, self.netns)
            if remove:
                for minor in set(have) - set(want):
                    qdisc.del_class(eni, minor, self.netns)
                continue
            for minor, bps in want.items():
                if minor not in have or not qdisc.same_rate(have[minor], bps):
                    qdisc.set_class(eni, minor, bps, self.netns)

    def _bbr(self, endpoints) -> None:
        from agent.datapath.nsenter import in_netns
        for ep in endpoints:
            if not ep.netns or ep.key in self._bbr_done:
                continue
            try:
                with in_netns(ep.netns):
                    with open("/proc/sys/net/ipv4/tcp_congestion_control", "w") as f:
                        f.write("bbr")
                self._bbr_done.add(ep.key)
            except PermissionError:
                # a pod's netns may only pick the node's default or an
                # algorithm the node allows (tcp_allowed_congestion_control)
                self.status.bbr = ("refused: bbr is restricted in pod network namespaces; "
                                   "allow it on the node: sysctl net.ipv4."
                                   "tcp_allowed_congestion_control (add bbr)")
                log.error("bandwidth_bbr: %s", self.status.bbr)
                return
            except OSError as exc:
                log.warning("bandwidth_bbr: %s (netns %s): %s", ep.key, ep.netns, exc)
        live = {ep.key for ep in endpoints}
        self._bbr_done &= live

    def sweep(self, now_ns: Optional[int] = None) -> int:
        """Remove idle tracked connections and give their counts back."""
        if not self.status.enabled:
            return 0
        with self.lock:
            live = {ip: e.conn_gen for ip, e in self._entries.items()}
            reaped, gone = self.maps.sweep(now_ns if now_ns is not None else time.monotonic_ns(),
                                           self.config.conntrack_tcp_idle_timeout * 10**9,
                                           OPENING_TIMEOUT * 10**9, live)
            for (ip, d), n in reaped.items():
                e = self._entries.get(ip)
                if e is None:
                    continue
                e = (replace(e, egress_reaped=e.egress_reaped + n) if d == 0 else
                     replace(e, ingress_reaped=e.ingress_reaped + n))
                self.maps.write(ip, e, False)
                self._entries[ip] = e
            self.status.sweeps += 1
            self.status.reaped += sum(reaped.values())
        if gone:
            log.info("bandwidth: %d idle tracked connections removed", gone)
        return gone

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self.source.synced.wait(0.5):
            if self._stop.is_set():
                return
        sub = self.store.subscribe()
        next_sweep = time.monotonic() + self.sweep_interval
        try:
            self._synced = True
            self._guarded(self.refresh)
            while not self._stop.is_set():
                cs = sub.get(timeout=0.5)
                if cs is not None:
                    batch = [cs] + sub.drain()
                    if any(touches_limits(c.deltas) for c in batch):
                        self._guarded(self.refresh)
                if time.monotonic() >= next_sweep:
                    self._guarded(self.sweep)
                    next_sweep = time.monotonic() + self.sweep_interval
        finally:
            sub.close()

    def _guarded(self, fn) -> None:
        try:
            fn()
        except Exception as exc:        # one failure must not stop the loop
            self.status.errors += 1
            self.status.error = f"{type(exc).__name__}: {exc}"
            log.exception("bandwidth: %s failed; the datapath keeps its previous limits",
                          fn.__name__)

    # ----------------------------------------------------------------- views
    def view(self) -> dict:
        """Status, problems and each limited pod's limits as the agent applied them."""
        with self.lock:
            pods = {ip: {"limits": limits_of(e.limits).as_dict(), "htb_class":
                         f"{e.htb_class >> 16:x}:{e.htb_minor:x}" if e.htb_minor else "",
                         "endpoint": self._owners.get(ip, "")}
                    for ip, e in self._entries.items()}
        return {"status": self.status.as_dict(), "pods": pods}


__all__ = ["BandwidthSync", "BandwidthStatus", "OPENING_TIMEOUT"]
