"""fastpath's datapath on one node: what the agent drives.

`Datapath` is what the agent drives: load once at start, then attach to
devices and write map entries as endpoints come and go. It works on the
node's network namespace given by name/path (None = the caller's own), which
lets tests and the demo drive a simulated node from outside it.
"""
from __future__ import annotations

import fnmatch
import logging

from agent.config import Config
from agent.datapath import tc
from agent.datapath.errors import DatapathError, InterfaceNotFound
from agent.datapath.loader import (BuildOptions, PinnedModule, build_key, open_pinned,
                                   preflight, start_migration)
from agent.datapath.maps import (ConfigMap, LbMaps, Maps, MAP, MonitorMap, SocketLbSkipMap,
                                 crc32c_fill, netns_cookie)
from agent.model.endpoint import Endpoint

log = logging.getLogger("fastpath.datapath")

# Which program runs where: device role -> {tc direction: program}.
ATTACH = {
    "pod": {"ingress": "fp_from_pod", "egress": "fp_to_pod"},
    "eni": {"ingress": "fp_from_vpc", "egress": "fp_to_vpc"},
    # the node's loopback: what the node sends its own addresses (bpf/eni.c fp_lo)
    "lo": {"egress": "fp_lo"},
}
LOOPBACK = "lo"
LOOPBACK_IFINDEX = 1      # in every netns (bpf/lib/lo.h: FP_LO_IFINDEX)
# lo must take packets whose source is one of the node's addresses once a
# redirect has dropped their route (bpf/lib/lo.h): fastpath owns this one
# setting of the node (net.ipv4.conf.lo.accept_local), and sets it on every
# start, by rtnetlink: the agent's container has /proc/sys read-only
LO_ACCEPT_LOCAL = "accept_local"


class Datapath:
    def __init__(self, config: Config, *, netns: str | None = None, test_build: bool = False,
                 migration_rules=None):
        """`migration_rules`: where entries of superseded pinned maps go
        (agent.conntrack.migrate.RULES for the conntrack maps); without
        them each goes to the map of its lineage (loader.Migration)."""
        self.config = config
        self.netns = netns
        self.options = BuildOptions.from_config(config, test_build)
        self.migration_rules = migration_rules
        self.module: PinnedModule | None = None
        self.build_key = ""
        self.built = False           # this start compiled (no pinned set matched)
        self.build_seconds = 0.0
        self._build = None
        self.maps: Maps | None = None
        self.lb: LbMaps | None = None
        self.migration_notes: list[str] = []
        self.migration = None

    # -- lifecycle -------------------------------------------------------
    def begin_load(self) -> "Datapath":
        """Open the pinned programs of these sources and options, or start
        building them in a child process (agent/datapath/build.py) while
        the caller does other work; `load()` finishes either."""
        if self.module is not None or self._build is not None:
            return self
        preflight(self.options.pin_root)
        self.build_key = build_key(self.options)
        self.module = open_pinned(self.options, self.build_key)
        if self.module is None:
            from agent.datapath.build import BuildProcess
            self._build = BuildProcess(self.options)
        return self

    def load(self, defer_migration: bool = False, reader: bool = False) -> "Datapath":
        """Open the pinned programs and maps (building them first when no
        pinned set matches). Entries of superseded pinned maps are carried
        over before this returns; with `defer_migration` the caller attaches
        the programs first and then calls finish_migration() (entries the
        old programs still create meanwhile are carried over then). A
        `reader` (a tool that only reads the pinned maps) leaves the
        tail-call slots to the agent that attached the programs calling
        them."""
        self.begin_load()
        aside = []
        if self.module is None:
            build, self._build = self._build, None
            try:
                aside = [tuple(a) for a in build.result()["aside"]]
            finally:
                build.kill()
            self.built, self.build_seconds = True, build.seconds
            log.info("built and pinned programs %s in %.2fs", self.build_key, build.seconds)
            self.module = open_pinned(self.options, self.build_key)
            if self.module is None:
                raise DatapathError(f"the programs just built ({self.build_key}) are not "
                                    f"usable from their pins under {self.options.pin_root}")
        else:
            log.info("reusing pinned programs %s (no compile)", self.build_key)
        self.migration = start_migration(self.module, aside, self.migration_rules)
        self.migration_notes = self.migration.notes
        if not reader:
            self.module.fill_tail_calls()
        names = [n for n in MAP.values() if n != MAP["FP_MAP_EVENTS"]]
        tables = {n: self.module.table(n) for n in names}
        self.tables = tables
        self.maps = Maps(tables)
        self.lb = LbMaps(tables)
        self.settings = ConfigMap(tables)
        self.monitor = MonitorMap(tables)
        from agent.datapath.policymaps import PolicyMaps
        self.policy = PolicyMaps(tables)
        self.socklb_skip = SocketLbSkipMap(tables)
        from agent.datapath.bwmaps import BandwidthMaps
        self.bandwidth = BandwidthMaps(tables)
        crc32c_fill(tables)
        if self.migration.sources and not reader:
            # entries carried over are marked (FP_MAP_MARK6; and the
            # map armed again) once the new programs run (Agent.start)
            self.maps.mark6_disarm()
        self.maps.bypass_set(self.config.host_stack_cidrs + self.config.service_cidrs)
        if not defer_migration:
            self.finish_migration()
        return self

    def finish_migration(self) -> list[str]:
        """Second copy of superseded pinned maps, then their pins go."""
        return self.migration.finish() if self.migration is not None else []

    def close(self) -> None:
        """Release our fds. Attached programs and pinned maps stay in the
        kernel and keep forwarding: that is the point of pinning."""
        if self._build is not None:
            self._build.kill()
            self._build = None
        if self.module:
            self.module.close()
            self.module = None

    def prog_fd(self, name: str) -> int:
        if not self.module:
            raise DatapathError("datapath not loaded")
        return self.module.prog_fds[name]

    # -- devices ---------------------------------------------------------
    def attach(self, dev: str | int, role: str) -> list[tc.Filter]:
        out = []
        for direction, prog in ATTACH[role].items():
            out.append(tc.attach(dev, direction, self.prog_fd(prog), prog,
                                 self.config.tc_priority, self.netns))
        return out

    def detach(self, dev: str | int) -> list[tc.Filter]:
        return tc.detach(dev, self.config.tc_priority, self.netns)

    def enis(self) -> list[str]:
        """ENI devices on the node: eni_pattern, except the primary device."""
        from agent.datapath.netlink import link_names
        return sorted(n for n in link_names(self.netns).values()
                      if fnmatch.fnmatch(n, self.config.eni_pattern)
                      and n != self.config.primary_device)

    def attach_enis(self) -> list[str]:
        """The VPC-facing programs on every ENI and on the primary NIC:
        traffic from outside to NodePorts, external and load-balancer IPs
        arrives on either, and replies of flows SNATed to the node's address
        on the primary one. Returns the devices, the primary NIC last. A
        device already running these very programs is left as it is."""
        from agent.datapath.netlink import link_names
        index = {n: i for i, n in link_names(self.netns).items()}
        devices = sorted(n for n in index if fnmatch.fnmatch(n, self.config.eni_pattern)
                         and n != self.config.primary_device)
        if self.config.primary_device in index:
            devices.append(self.config.primary_device)
        progs = {d: (self.prog_fd(p), p) for d, p in ATTACH["eni"].items()}
        _, failed = tc.ensure([(index[d], d, progs) for d in devices],
                              self.config.tc_priority, self.netns)
        if failed:
            raise failed[0][1]
        return devices

    def attach_lo(self) -> str:
        """fp_lo on the node's loopback (the node's SCTP to its own
        addresses), after lo accepts local sources, which the replies that
        fastpath hands to lo need. A lo already running this very program
        is left as it is. Returns the device."""
        from agent.datapath.netlink import set_ipv4_devconf
        try:
            set_ipv4_devconf(LOOPBACK_IFINDEX, LO_ACCEPT_LOCAL, 1, self.netns)
        except OSError as exc:
            raise DatapathError(f"{LOOPBACK}: cannot set net.ipv4.conf.{LOOPBACK}."
                                f"{LO_ACCEPT_LOCAL} to 1: {exc.strerror}") from exc
        progs = {d: (self.prog_fd(p), p) for d, p in ATTACH["lo"].items()}
        _, failed = tc.ensure([(LOOPBACK_IFINDEX, LOOPBACK, progs)],
                              self.config.tc_priority, self.netns)
        if failed:
            raise failed[0][1]
        return LOOPBACK

    # -- socket-LB -------------------------------------------------------
    def attach_socket_lb(self, cgroup_path: str, hostns_only: bool = True):
        """Translate services at connect()/sendmsg() for sockets in
        `cgroup_path`; with `hostns_only`, only for the node's own netns."""
        from agent.datapath import cgroup
        self.settings.set(socket_lb=True, hostns_only=hostns_only,
                          host_netns_cookie=netns_cookie(self.netns))
        progs = {n: self.prog_fd(n) for n in cgroup.SOCK_PROGRAMS}
        return cgroup.attach(cgroup_path, progs)

    def detach_socket_lb(self, cgroup_path: str):
        from agent.datapath import cgroup
        return cgroup.detach(cgroup_path)

    # -- endpoints -------------------------------------------------------
    def add_endpoint(self, ep: Endpoint) -> None:
        """The veth's anti-spoofing guard, then the programs, then the map
        entry: no packet passes fastpath's programs on a registered veth
        unchecked, and by the time other pods can be redirected to this one
        its own traffic is already handled."""
        self.maps.veth_put(ep)
        if ep.host_ifindex:
            # tc.ensure, as a restore does: the filters read through one raw
            # netlink socket, written through one session. attach() opens a
            # session per direction and lists the device's filters through
            # pyroute2 four times: most of an ADD's agent CPU, which
            # concurrent ADDs queue for (bench/cni_bench.py's split)
            progs = {d: (self.prog_fd(p), p) for d, p in ATTACH["pod"].items()}
            _, failed = tc.ensure([(ep.host_ifindex, ep.host_ifname, progs)],
                                  self.config.tc_priority, self.netns)
            if failed:
                raise failed[0][1]
        else:
            self.attach(ep.host_ifname, "pod")
        self.maps.endpoint_put(ep)

    def add_endpoints(self, eps: list[Endpoint]) -> list[tuple[Endpoint, Exception]]:
        """add_endpoint for many (a restart's restore), in the same order of
        guard, programs, entry, with one netlink session for all veths; a
        veth already running these very programs (a restart that reused the
        pinned set) is not touched. Returns the endpoints that could not be
        attached, with why; they get no map entry."""
        for ep in eps:
            self.maps.veth_put(ep)
        by_index = {ep.host_ifindex: ep for ep in eps}
        progs = {d: (self.prog_fd(p), p) for d, p in ATTACH["pod"].items()}
        _, failed = tc.ensure([(ep.host_ifindex, ep.host_ifname, progs) for ep in eps],
                              self.config.tc_priority, self.netns)
        bad = {idx for idx, _ in failed}
        for ep in eps:
            if ep.host_ifindex not in bad:
                self.maps.endpoint_put(ep)
        return [(by_index[idx], exc) for idx, exc in failed]

    def remove_endpoint(self, ep: Endpoint) -> None:
        """Map entry first (nobody is redirected to it any more), then our
        filters on its veth, if the veth still exists."""
        self.maps.endpoint_delete(ep.pod_key, ep.host_ifindex)
        try:
            self.detach(ep.host_ifname)
        except InterfaceNotFound:
            pass


__all__ = ["Datapath", "DatapathError", "Endpoint"]

