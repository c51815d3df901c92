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
        from agent.sim import setpool
        setpool.give_back(f"{paths.bpffs}/fastpath")
        subprocess.run(["umount", "-l", paths.bpffs], check=False)
        shutil.rmtree(root, ignore_errors=True)


def register_pod(agent_or_socket, pod, namespace: str = "default") -> dict:
    """Tell the agent about a pod the way the CNI plugin does."""
    params = {"netns": pod.netns_path, "ifname": pod.ifname,
              "container_id": f"sim-{pod.name}", "pod_namespace": namespace,
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
        from agent.datapath.loader import BuildOptions
        from agent.sim import setpool
        setpool.adopt(BuildOptions.from_config(cfg, test_build), node.netns)
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
        self._adopt(cmd[cmd.index("agent.cli.main") + 1:])
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

    def _adopt(self, argv: list[str]) -> None:
        """A program set an earlier agent left, for the options these
        arguments give, when the session has a pool (agent.sim.setpool).
        The arguments are read as `fastpath agent` reads its flags (this
        layer sits below the CLI); any other form: nothing is adopted."""
        from agent.sim import setpool
        if not setpool.active():
            return
        from agent import config as configuration
        from agent.datapath.loader import BuildOptions
        flags = {"--" + k.name.replace("_", "-"): k.name for k in configuration.KEYS}
        overrides, path = {}, None
        words = iter(argv[1:])              # after "agent"
        try:
            for word in words:
                flag, eq, value = word.partition("=")
                value = value if eq else next(words)
                if flag == "--config":
                    path = value
                elif flag in flags:
                    overrides[flags[flag]] = value
                else:
                    return
            options = BuildOptions.from_config(configuration.load(path, overrides))
        except (StopIteration, Exception):
            return         # arguments the agent will refuse itself
        setpool.adopt(options, self.node.netns, repo=self.repo)

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


# `fastpath` from this source tree, for a command run in a node's netns
FASTPATH = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "agent.cli.main"]


def cli_command(node, paths: SimPaths, *args: str) -> list[str]:
    """`fastpath ARGS` as an operator runs it on the node: inside its netns,
    on the agent's pins and API socket (unless ARGS name other pins)."""
    where = [] if "--bpffs-root" in args else ["--bpffs-root", f"{paths.bpffs}/fastpath"]
    return ["ip", "netns", "exec", node.netns, *FASTPATH, *args, *where,
            "--socket", paths.socket]


class NodeAgent:
    """`fastpath agent` as a process on a simulated node with paths of its
    own (a manifest directory as its cluster-state source), and the CLI
    beside it: what the demo and the vm-tests that drive a real agent
    process share."""

    def __init__(self, node, paths: SimPaths, args: list[str] | tuple = ()):
        self.node, self.paths, self.args = node, paths, list(args)
        self.proc: AgentProcess | None = None

    @property
    def socket(self) -> str:
        return self.paths.socket

    @property
    def log(self) -> Path:
        return Path(self.paths.root) / "agent.log"

    def start(self) -> "NodeAgent":
        """Start (or start again, after kill) the agent; it restores what
        its state dir and pins hold."""
        self.proc = AgentProcess(self.node, self.paths, self.args).start()
        return self

    def kill(self, sig: int = 9) -> None:
        if self.proc:
            self.proc.kill(sig)

    def stop(self) -> None:
        self.kill(15)

    def register(self, *pods, namespace: str = "default") -> None:
        for pod in pods:
            register_pod(self.paths.socket, pod, namespace)

    def write(self, name: str, objects) -> Path:
        """Put a manifest file (objects or YAML text) in the source directory."""
        from . import manifests
        return manifests.write(self.paths.manifests, name, objects)

    def call(self, method: str, params: dict | None = None, **kw):
        from agent.api import wire
        return wire.call(self.paths.socket, method, params, **kw)

    def cli(self, *args: str, check: bool = True, timeout: float = 30):
        r = subprocess.run(cli_command(self.node, self.paths, *args), capture_output=True,
                           text=True, timeout=timeout, cwd=REPO)
        if check and r.returncode != 0:
            raise AssertionError(f"fastpath {' '.join(args)} -> {r.returncode}\n{r.stderr}")
        return r

    def cli_popen(self, *args: str, **popen) -> subprocess.Popen:
        """The CLI left running (monitor): its output through `popen`'s
        stdout/stderr."""
        return subprocess.Popen(cli_command(self.node, self.paths, *args), text=True, cwd=REPO,
                                **popen)


@contextlib.contextmanager
def node_agent(node, args: list[str] | tuple = (), manifests: dict | None = None,
               register: bool = True):
    """A NodeAgent on `node` in private paths: `manifests` (file name ->
    objects or YAML text) written before it starts, the node's pods
    registered once it is ready (unless not `register`); stopped and its
    paths removed on the way out, whatever happened."""
    with private_paths() as paths:
        agent = NodeAgent(node, paths, args)
        for name, objects in (manifests or {}).items():
            agent.write(name, objects)
        agent.start()
        try:
            if register:
                agent.register(*node.pods)
            yield agent
        finally:
            agent.stop()
