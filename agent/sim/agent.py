"""Run fastpath on a simulated node (agent/sim), in process or as a daemon.

Used by the demo, the vm-tests and the benchmarks. Everything it makes is
private: a bpffs mounted on a temporary directory (never /sys/fs/bpf), a
temporary state dir and API socket. On exit it detaches fastpath's filters
from the node's devices, unpins its maps and unmounts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config

REPO = Path(__file__).resolve().parents[2]


@dataclass
class SimPaths:
    root: str
    bpffs: str
    state_dir: str
    socket: str
    manifests: str      # the cluster-state source: a directory of manifests

    def config(self, **overrides) -> Config:
        overrides.setdefault("source", self.manifests)
        # Never the machine's own cgroups or ports: a test that wants
        # socket-LB attaches it to a cgroup child of its own.
        overrides.setdefault("socket_lb", False)
        return Config.defaults().replace(bpffs_root=f"{self.bpffs}/fastpath",
                                         state_dir=self.state_dir, api_socket=self.socket,
                                         **overrides)


@contextlib.contextmanager
def private_paths():
    root = tempfile.mkdtemp(prefix="fp-sim-")
    paths = SimPaths(root, f"{root}/bpffs", f"{root}/state", f"{root}/agent.sock",
                     f"{root}/manifests")
    os.makedirs(paths.bpffs)
    os.makedirs(paths.manifests)
    subprocess.run(["mount", "-t", "bpf", "bpf", paths.bpffs], check=True)
    try:
        yield paths
    finally:
        subprocess.run(["umount", "-l", paths.bpffs], check=False)
        shutil.rmtree(root, ignore_errors=True)


def register_pod(agent_or_socket, pod) -> dict:
    """Tell the agent about a pod the way the CNI plugin does."""
    params = {"netns": pod.netns_path, "ifname": pod.ifname,
              "container_id": f"sim-{pod.name}", "pod_namespace": "default",
              "pod_name": pod.name}
    if isinstance(agent_or_socket, str):
        from agent.api import wire
        return wire.call(agent_or_socket, "EndpointAdd", params)
    return agent_or_socket.rpc_EndpointAdd(**params)


def _detach_node(node, prio: int) -> None:
    from agent.datapath import tc
    from agent.datapath.netlink import iproute
    with iproute(node.netns) as ipr:
        names = [l.get_attr("IFLA_IFNAME") for l in ipr.get_links()]
    for name in names:
        tc.detach(name, prio, node.netns)


@contextlib.contextmanager
def sim_attach(node, *, register: bool = True, test_build: bool = False, **overrides):
    """In-process agent on `node` (an agent.sim Node); yields the Agent."""
    from agent.daemon.agent import Agent
    with private_paths() as paths:
        overrides.setdefault("node_name", node.name)
        cfg = paths.config(**overrides)
        agent = Agent(cfg, netns=node.netns, test_build=test_build)
        try:
            agent.start(serve=False)
            if register:
                for pod in node.pods:
                    register_pod(agent, pod)
            yield agent
        finally:
            agent.stop()
            _detach_node(node, cfg.tc_priority)


class AgentProcess:
    """`fastpath agent` as a real process inside the node's netns."""

    def __init__(self, node, paths: SimPaths, extra_args: list[str] | None = None,
                 wrapper: list[str] | None = None, repo: Path | str | None = None):
        """`repo`: the source tree to run (another release's, for upgrade
        tests); this one by default."""
        self.node = node
        self.paths = paths
        self.extra = extra_args or []
        # a command the agent runs under inside the netns (e.g. setpriv
        # with the DaemonSet's capabilities)
        self.wrapper = wrapper or []
        self.repo = Path(repo) if repo else REPO
        self.proc: subprocess.Popen | None = None
        self.log = Path(paths.root) / "agent.log"

    def start(self, timeout: float = 180) -> "AgentProcess":
        # a first start compiles (the build child): on a shared 2-CPU machine
        # under other test runs that alone has taken over 50 s
        cmd = ["ip", "netns", "exec", self.node.netns, *self.wrapper, sys.executable, "-m",
               "agent.cli.main",
               "agent", "--bpffs-root", f"{self.paths.bpffs}/fastpath",
               "--state-dir", self.paths.state_dir, "--api-socket", self.paths.socket,
               "--source", self.paths.manifests, "--socket-lb", "false",
               "--node-name", self.node.name, *self.extra]
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.repo, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        from agent.api import wire
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                if wire.call(self.paths.socket, "Status", timeout=2)["ready"]:
                    return self
            except (OSError, wire.WireError):
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("agent not ready in time:\n" + self.log.read_text()[-3000:])

    def kill(self, sig: int = 9) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.kill(15)
