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
from agent.datapath.loader import BuildOptions, Loaded, open_module, preflight
from agent.datapath.maps import (ConfigMap, LbMaps, Maps, MAP, SocketLbSkipMap, crc32c_fill,
                                 netns_cookie)
from agent.model.endpoint import Endpoint

log = logging.getLogger("fastpath.datapath")

# Which program runs where: device role -> {tc direction: program}.
ATTACH = {
    "pod": {"ingress": "fp_from_pod", "egress": "fp_to_pod"},
    "eni": {"ingress": "fp_from_vpc", "egress": "fp_to_vpc"},
}


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
        self.module: Loaded | None = None
        self.maps: Maps | None = None
        self.lb: LbMaps | None = None
        self.migration_notes: list[str] = []
        self.migration = None

    # -- lifecycle -------------------------------------------------------
    def load(self, defer_migration: bool = False, reader: bool = False) -> "Datapath":
        """Compile, open the pinned maps and load the programs. Entries of
        superseded pinned maps are carried over before this returns; with
        `defer_migration` the caller attaches the new programs first and
        then calls finish_migration() (entries the old programs still
        create meanwhile are carried over then). A `reader` (a tool that
        only reads the pinned maps) leaves the tail-call slots to the agent
        that attached the programs calling them."""
        preflight(self.options.pin_root)
        self.module, self.migration = open_module(self.options, self.migration_rules)
        self.migration_notes = self.migration.notes
        self.module.load_programs(fill_tail_calls=not reader)
        names = [n for n in MAP.values() if n != MAP["FP_MAP_EVENTS"]]
        tables = {n: self.module.table(n) for n in names}
        self.tables = tables
        self.maps = Maps(tables)
        self.lb = LbMaps(tables)
        self.settings = ConfigMap(tables)
        from agent.datapath.policymaps import PolicyMaps
        self.policy = PolicyMaps(tables)
        self.socklb_skip = SocketLbSkipMap(tables)
        from agent.datapath.bwmaps import BandwidthMaps
        self.bandwidth = BandwidthMaps(tables)
        crc32c_fill(tables)
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
        from agent.datapath.netlink import iproute
        with iproute(self.netns) as ipr:
            names = [l.get_attr("IFLA_IFNAME") for l in ipr.get_links()]
        return sorted(n for n in names if fnmatch.fnmatch(n, self.config.eni_pattern)
                      and n != self.config.primary_device)

    def attach_enis(self) -> list[str]:
        """The VPC-facing programs on every ENI and on the primary NIC:
        traffic from outside to NodePorts, external and load-balancer IPs
        arrives on either, and replies of flows SNATed to the node's address
        on the primary one. Returns the devices, the primary NIC last."""
        devices = self.enis()
        from agent.datapath.netlink import iproute
        with iproute(self.netns) as ipr:
            names = {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
        if self.config.primary_device in names:
            devices.append(self.config.primary_device)
        for dev in devices:
            self.attach(dev, "eni")
        return devices

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
        self.attach(ep.host_ifindex or ep.host_ifname, "pod")
        self.maps.endpoint_put(ep)

    def remove_endpoint(self, ep: Endpoint) -> None:
        """Map entry first (nobody is redirected to it any more), then our
        filters on its veth, if the veth still exists."""
        self.maps.endpoint_delete(ep.ip)
        try:
            self.detach(ep.host_ifname)
        except InterfaceNotFound:
            pass


__all__ = ["Datapath", "DatapathError", "Endpoint"]

