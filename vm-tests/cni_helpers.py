"""A simulated node ready for CNI tests: agent process, CNI bin dir, runtime.

`cni_node(world)` gives a node (agent.sim) running `fastpath agent` as a
process with private paths, a CNI bin dir holding fastpath-cni as installed
on a node plus the Terway stand-in and Debian's ptp/host-local, and a
libcni-like runtime (chainer.testing) for the Terway-layout conflist.
Pod namespaces are named after the world (agent.sim.plan.pod_ns), so the
world deletes them whatever happens to the test.

The witnesses read the kernel, not the agent: tc filters through netlink,
the endpoints map through bpftool on the pinned map.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass, field

from agent.api import wire
from agent.datapath import tc
from agent.datapath.maps import MAP
from agent.sim import plan
from agent.sim.netns import sh
from agent.sim.agent import AgentProcess, SimPaths, private_paths
from chainer.testing import CniRuntime, install_plugins, terway_conflist

TC_PRIORITY = 25000            # agent.config's default, which the sim agents keep
OUR_PROGRAMS = {("ingress", "fp_from_pod"), ("egress", "fp_to_pod")}
FOREIGN_CBPF = "1,6 0 0 4294967295,"    # classic BPF "accept": a filter that is not ours


@dataclass
class CniNode:
    world: object
    node: object
    paths: SimPaths
    agent: AgentProcess
    bin_dir: str
    log_file: str
    ipam_dir: str
    runtime: CniRuntime
    pods: list = field(default_factory=list)

    # -- pods ---------------------------------------------------------------
    def pod_netns(self, name: str) -> str:
        """An empty pod netns (the runtime's part); returns its path."""
        ns = plan.pod_ns(self.world.tag, name)
        sh(["ip", "netns", "add", ns])
        self.pods.append(ns)
        return f"/var/run/netns/{ns}"

    def conf(self, index: int = 1, prev=None, **over) -> dict:
        """Plugin `index`'s entry as the runtime would pass it."""
        c = self.runtime.plugin_conf(index, prev)
        c.update(over)
        return c

    def fastpath(self, command: str, conf, container_id: str = "", netns: str = "",
                 ifname: str = "eth0", args: str = ""):
        data = conf if isinstance(conf, (str, bytes)) else json.dumps(conf)
        return self.runtime.exec_plugin("fastpath-cni", command, data, container_id, netns,
                                        ifname, args)

    # -- witnesses ---------------------------------------------------------------
    def api(self, method: str, params: dict | None = None):
        return wire.call(self.paths.socket, method, params)

    def endpoints(self) -> dict[str, dict]:
        """The agent's endpoints by key (container id-ifname)."""
        return {e["key"]: e for e in self.api("EndpointList")}

    def endpoint_map(self) -> dict[str, int]:
        """The pinned endpoints map as the kernel has it: pod IP -> host ifindex."""
        pin = f"{self.paths.bpffs}/fastpath/{MAP['FP_MAP_ENDPOINTS']}"
        out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", pin],
                             capture_output=True, text=True, check=True).stdout
        entries = {}
        for e in json.loads(out):
            key = bytes(int(b, 16) for b in e["key"])
            value = bytes(int(b, 16) for b in e["value"])
            entries[".".join(str(b) for b in key[:4])] = int.from_bytes(value[:4], "little")
        return entries

    def filters(self, dev: str | int) -> set[tuple[str, str, int]]:
        """(direction, name, prio) of every bpf filter on a node device."""
        return {(f.direction, f.name, f.prio) for f in tc.list_filters(dev, self.node.netns)}

    def programs(self, dev: str | int) -> set[tuple[str, str]]:
        return {(d, n) for d, n, p in self.filters(dev) if n.startswith("fp_")
                and p == TC_PRIORITY}

    def leftover_pod_programs(self) -> dict[str, set]:
        """fastpath's filters on any node device but the ENIs and eth0."""
        links = self.node.ip_json("link", "show")
        out = {}
        for link in links:
            name = link["ifname"]
            if name == "lo" or name.startswith("eth"):
                continue
            ours = {f for f in self.filters(name) if f[1].startswith("fp_")}
            if ours:
                out[name] = ours
        return out

    def add_foreign_filter(self, dev: str) -> None:
        sh(["tc", "-n", self.node.netns, "qdisc", "replace", "dev", dev, "clsact"])
        sh(["tc", "-n", self.node.netns, "filter", "add", "dev", dev, "ingress", "prio", "30000",
            "bpf", "bytecode", FOREIGN_CBPF])

    def host_veth(self, endpoint_key: str) -> tuple[str, int]:
        ep = self.endpoints()[endpoint_key]
        return ep["host_ifname"], ep["host_ifindex"]

    def queued_deletions(self) -> list[str]:
        qdir = os.path.join(self.paths.state_dir, "cni-del-queue")
        return sorted(n for n in os.listdir(qdir) if n.endswith(".json")) \
            if os.path.isdir(qdir) else []

    def restart_agent(self) -> None:
        self.agent = AgentProcess(self.node, self.paths).start()


@contextlib.contextmanager
def cni_node(world, *, enis: int = 1, first: str = "10.241.1.100", last: str = "10.241.1.250",
             **fastpath):
    node = world.add_node("n1", enis=enis)
    with private_paths() as paths:
        bin_dir = str(install_plugins(f"{paths.root}/bin"))
        log_file, ipam_dir = f"{paths.root}/cni.log", f"{paths.root}/terway-ipam"
        conflist = terway_conflist(agent_socket=paths.socket, state_dir=paths.state_dir,
                                   log_file=log_file, ipam_dir=ipam_dir, first=first, last=last,
                                   **fastpath)
        cn = CniNode(world, node, paths, AgentProcess(node, paths), bin_dir, log_file, ipam_dir,
                     CniRuntime(conflist, bin_dir, node.netns))
        try:
            cn.agent.start()
            yield cn
        finally:
            # fastpath's filters go with the node's netns when the world
            # closes, its pinned maps with the private bpffs
            cn.agent.kill(9)
