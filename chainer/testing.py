"""Run CNI plugins the way a container runtime does, for tests and benchmarks.

`CniRuntime` plays libcni's part for one conflist: it execs each plugin
with the CNI environment and the plugin's entry on stdin, with the list's
`name` and `cniVersion` injected; on ADD it hands each plugin the previous
plugin's result as `prevResult` and caches the last one; DEL runs the
plugins in reverse order and CHECK in order, both with the cached result.
Plugins run in the node's network namespace (as a runtime on that node
would): the calling thread enters it just for the fork, so any thread may
use a runtime (agent/datapath/nsenter.py). Every exec is timed from the
runtime's side: fork to exit.

`install_plugins` fills a CNI bin dir: fastpath-cni as `python3 -m
chainer.install` writes it, the Terway stand-in from vm-tests/cni as
`terway`, and Debian's containernetworking-plugins by symlink.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.datapath.nsenter import in_netns
from chainer import install

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "vm-tests" / "cni" / "terway"
DEBIAN_PLUGINS = Path("/usr/lib/cni")


def install_plugins(bin_dir: str | Path, debian: tuple[str, ...] = ("ptp", "host-local")) -> Path:
    bin_dir = Path(bin_dir)
    install.install(bin_dir)
    shutil.copy2(STANDIN, bin_dir / "terway")
    for name in debian:
        target = bin_dir / name
        if not target.exists():
            target.symlink_to(DEBIAN_PLUGINS / name)
    return bin_dir


@dataclass
class Invocation:
    plugin: str
    command: str
    rc: int
    stdout: str
    stderr: str
    t_spawn: float            # wall clock just before the fork
    elapsed_ms: float         # fork to exit, as the runtime sees it

    @property
    def output(self):
        return json.loads(self.stdout) if self.stdout.strip() else None


class PluginFailed(Exception):
    def __init__(self, inv: Invocation):
        out = inv.output if inv.stdout.strip().startswith("{") else None
        self.invocation = inv
        self.code = (out or {}).get("code")
        self.msg = (out or {}).get("msg", inv.stdout + inv.stderr)
        super().__init__(f"{inv.plugin} {inv.command} exited {inv.rc}: code {self.code}: {self.msg}")


@dataclass
class Attachment:
    container_id: str
    netns: str
    ifname: str
    args: str
    result: dict | None = None
    invocations: list[Invocation] = field(default_factory=list)


class CniRuntime:
    def __init__(self, conflist: dict, bin_dir: str | Path, node_netns: str | None,
                 timeout: float = 60, wrapper: tuple[str, ...] = ()):
        self.conflist = conflist
        self.bin_dir = str(bin_dir)
        self.node_netns = node_netns
        self.timeout = timeout
        # a command each plugin runs under (e.g. nsenter into the mount
        # namespace where the node's files are)
        self.wrapper = list(wrapper)
        self.cache: dict[tuple[str, str], Attachment] = {}
        self._lock = threading.Lock()

    # -- one plugin -------------------------------------------------------------
    def plugin_conf(self, index: int, prev_result: dict | None = None) -> dict:
        conf = dict(self.conflist["plugins"][index])
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.conflist["cniVersion"]
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return conf

    def exec_plugin(self, plugin_type: str, command: str, stdin: bytes | str,
                    container_id: str = "", netns: str = "", ifname: str = "eth0",
                    args: str = "", extra_env: dict | None = None) -> Invocation:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
               "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": self.bin_dir,
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        env.update(extra_env or {})
        data = stdin.encode() if isinstance(stdin, str) else stdin
        with in_netns(self.node_netns):
            t_spawn = time.time()
            t0 = time.perf_counter()
            proc = subprocess.Popen([*self.wrapper, os.path.join(self.bin_dir, plugin_type)],
                                    env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        out, err = proc.communicate(data, timeout=self.timeout)
        elapsed = (time.perf_counter() - t0) * 1e3
        return Invocation(plugin_type, command, proc.returncode, out.decode(errors="replace"),
                          err.decode(errors="replace"), t_spawn, elapsed)

    # -- the list -----------------------------------------------------------------
    def add(self, container_id: str, netns: str, ifname: str = "eth0",
            args: str = "") -> Attachment:
        att = Attachment(container_id, netns, ifname, args)
        prev = None
        for i, plugin in enumerate(self.conflist["plugins"]):
            conf = self.plugin_conf(i, prev)
            inv = self.exec_plugin(plugin["type"], "ADD", json.dumps(conf), container_id,
                                   netns, ifname, args)
            att.invocations.append(inv)
            if inv.rc != 0:
                raise PluginFailed(inv)
            prev = inv.output
        att.result = prev
        with self._lock:
            self.cache[(container_id, ifname)] = att
        return att

    def check(self, container_id: str, ifname: str = "eth0") -> list[Invocation]:
        att = self.cache[(container_id, ifname)]
        done = []
        for i, plugin in enumerate(self.conflist["plugins"]):
            inv = self.exec_plugin(plugin["type"], "CHECK",
                                   json.dumps(self.plugin_conf(i, att.result)),
                                   container_id, att.netns, ifname, att.args)
            done.append(inv)
            if inv.rc != 0:
                raise PluginFailed(inv)
        return done

    def delete(self, container_id: str, netns: str | None = None, ifname: str = "eth0",
               args: str = "") -> list[Invocation]:
        """DEL in reverse order; `netns` overrides the ADD's (e.g. "" once
        the namespace is gone, as runtimes pass it)."""
        with self._lock:
            att = self.cache.get((container_id, ifname))
        prev = att.result if att else None
        ns = netns if netns is not None else (att.netns if att else "")
        args = att.args if att and not args else args
        done = []
        for i in reversed(range(len(self.conflist["plugins"]))):
            plugin = self.conflist["plugins"][i]
            inv = self.exec_plugin(plugin["type"], "DEL",
                                   json.dumps(self.plugin_conf(i, prev)), container_id, ns,
                                   ifname, args)
            done.append(inv)
            if inv.rc != 0:
                raise PluginFailed(inv)
        with self._lock:
            self.cache.pop((container_id, ifname), None)
        return done


def terway_conflist(*, agent_socket: str, state_dir: str, log_file: str, ipam_dir: str,
                    eni: str = "eth1", first: str, last: str, prefix: int = 16,
                    cni_version: str = "0.4.0", **fastpath) -> dict:
    """deploy/10-terway.conflist with the test's paths, and the stand-in's
    settings in Terway's entry."""
    conflist = json.loads((REPO / "deploy" / "10-terway.conflist").read_text())
    conflist["cniVersion"] = cni_version
    terway, ours = conflist["plugins"]
    terway["standin"] = {"eni": eni, "first": first, "last": last, "prefix": prefix,
                         "data_dir": ipam_dir}
    ours.update(agent_socket=agent_socket, state_dir=state_dir, log_file=log_file, **fastpath)
    return conflist


def ptp_conflist(*, agent_socket: str, state_dir: str, log_file: str, ipam_dir: str,
                 subnet: str, cni_version: str = "1.0.0", **fastpath) -> dict:
    """Debian's ptp + host-local, then fastpath-cni (no ENI: ptp pods route
    through the node's main table)."""
    ours = {"type": "fastpath-cni", "agent_socket": agent_socket, "state_dir": state_dir,
            "log_file": log_file, "require_eni": False}
    ours.update(fastpath)
    return {"cniVersion": cni_version, "name": "ptp-chain", "plugins": [
        {"type": "ptp", "ipMasq": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": ipam_dir}},
        ours]}
