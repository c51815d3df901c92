"""What every inspection command shares: where things are, how to reach
the agent and the pinned maps, exit codes, and output (`--json` or a table).

Paths: flags win; otherwise, when the agent answers, what it runs with;
otherwise the configuration (`--config` file, defaults).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from agent import config as configuration
from agent.config import Config

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_AGENT, EXIT_PRIV = 0, 1, 2, 3, 4


class CliExit(Exception):
    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where fastpath is")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--config", help="the agent's configuration file (for its paths)")
    g.add_argument("--bpffs-root", dest="cfg_bpffs_root", default=None,
                   help="where fastpath's maps are pinned (default: the agent's, else "
                        "/sys/fs/bpf/fastpath)")
    g.add_argument("--socket", dest="cfg_api_socket", default=None,
                   help="the agent's API socket (default /var/run/fastpath/agent.sock)")
    g.add_argument("--grpc-socket", dest="cfg_grpc_socket", default=None,
                   help="the agent's gRPC socket (default: grpc.sock next to --socket)")
    g.add_argument("--cgroup-root", dest="cfg_cgroup_root", default=None,
                   help="cgroup v2 directory of socket-LB (default: the cgroup2 mount)")


class Ctx:
    def __init__(self, args):
        self.args = args
        overrides = {k: getattr(args, f"cfg_{k}", None)
                     for k in ("bpffs_root", "api_socket", "grpc_socket", "cgroup_root")}
        self.cfg: Config = configuration.load(getattr(args, "config", None), overrides)
        self.explicit_root = overrides["bpffs_root"] is not None
        self.json = bool(getattr(args, "json", False))
        self._client = None
        self._status: dict | None = None
        self._status_tried = False
        self.agent_error = ""
        self._maps = None
        self._links = None
        self.notes: list[str] = []

    # -- the agent ----------------------------------------------------------
    @property
    def grpc_path(self) -> str:
        return configuration.grpc_socket_path(self.cfg)

    def client(self):
        from agent.api.inspect import Client
        if self._client is None:
            self._client = Client(self.grpc_path)
        return self._client

    def agent(self, method: str, **req):
        """The agent's answer, or None when it is unreachable (the reason in
        agent_error); remote errors other than unreachable raise CliExit."""
        from agent.api.inspect import AgentUnreachable, RemoteFailure
        if self.agent_error:
            return None
        try:
            return self.client().call(method, **req)
        except AgentUnreachable as exc:
            self.agent_error = str(exc)
            return None
        except RemoteFailure as exc:
            raise CliExit(EXIT_FAIL, f"the agent: {exc.code}: {exc}") from None

    def require_agent(self, method: str, **req):
        out = self.agent(method, **req)
        if out is None:
            raise CliExit(EXIT_NO_AGENT, f"the agent is not reachable ({self.agent_error}); "
                                         "is `fastpath agent` running? (--grpc-socket, --socket)")
        return out

    def status(self) -> dict | None:
        if not self._status_tried:
            self._status_tried = True
            self._status = self.agent("Status")
        return self._status

    def note_agent_down(self, what: str) -> None:
        if self.agent_error:
            self.notes.append(f"agent not reachable ({self.agent_error}): {what}")

    # -- pinned maps ----------------------------------------------------------
    @property
    def bpffs_root(self) -> str:
        if not self.explicit_root:
            st = self.status()
            if st and st.get("bpffs_root"):
                return st["bpffs_root"]
        return self.cfg.bpffs_root

    def maps(self):
        from agent.datapath import pinned
        if self._maps is None:
            try:
                self._maps = pinned.open_maps(self.bpffs_root)
            except PermissionError as exc:
                raise CliExit(EXIT_PRIV, str(exc)) from None
            except pinned.NoPins as exc:
                raise CliExit(EXIT_FAIL, str(exc)) from None
        return self._maps

    def map(self, name: str):
        m = self.maps().get(name)
        if m is None:
            raise CliExit(EXIT_FAIL, f"map {name} is not pinned under {self.bpffs_root} "
                                     "(an agent of another version, or not started yet)")
        return m

    def entries(self, name: str, missing_ok: bool = False) -> list[dict]:
        from agent.datapath import libbpf
        from agent.inspect import decode
        m = self.maps().get(name)
        if m is None:
            if missing_ok:
                return []
            self.map(name)
        layout = self.layout(name, m)
        ncpu = libbpf.possible_cpus() if m.percpu else 1
        return [decode.decode_entry(layout, k, v, m.percpu, ncpu) for k, v in m.items()]

    def layout(self, name: str, m):
        """How to decode pinned map `m`: from its own BTF, the record the
        kernel keeps of the compile that made it (exact, whatever release
        pinned it). A map without BTF cannot be decoded and is refused."""
        from agent.datapath import tables
        from agent.datapath.errors import NotPrivileged
        from agent.inspect import decode
        try:
            got = tables.map_schema(m.fd)
        except NotPrivileged as exc:
            raise CliExit(EXIT_PRIV, f"map {name}: {exc}") from None
        if got is None:
            raise CliExit(EXIT_FAIL, f"map {name} carries no BTF: its layout cannot be known "
                                     "(it was not created by fastpath's loader)")
        schema, key, value = got
        layout = decode.Layout.of_schema(name, key, value, schema)
        if not layout.matches(m.key_size, m.value_size):
            raise CliExit(EXIT_FAIL, f"map {name}: its BTF describes {layout.key_size}/"
                                     f"{layout.value_size} B keys/values, the map holds "
                                     f"{m.key_size}/{m.value_size} B")
        return layout

    def program_schema(self, uses: str):
        """The BTF of the programs that use pinned map `uses`, for records
        that are no map's key or value (ring-buffer events): the most
        recently loaded such program is the one writing them."""
        from agent.datapath import pinned, tables
        from agent.datapath.errors import NotPrivileged
        m = self.map(uses)
        progs = [p for p in pinned.our_programs(self.maps()) if m.id in p.map_ids]
        if not progs:
            raise CliExit(EXIT_FAIL, f"no loaded program uses {uses} under {self.bpffs_root} "
                                     "(the agent never started, or its programs are gone)")
        newest = max(progs, key=lambda p: (p.loaded_at, p.id))
        try:
            fd = pinned.prog_fd(newest.id)
        except OSError as exc:
            raise CliExit(EXIT_FAIL, f"program {newest.name} (id {newest.id}): {exc}") from None
        try:
            return tables.program_schema(fd)
        except NotPrivileged as exc:
            raise CliExit(EXIT_PRIV, f"program {newest.name}: {exc}") from None
        finally:
            os.close(fd)

    def links(self) -> dict[int, str]:
        """ifindex -> name in the node's netns (the agent's view when it
        answers: the CLI may run elsewhere)."""
        if self._links is None:
            got = self.agent("Links")
            if got is not None:
                self._links = {int(k): v for k, v in got.items()}
            else:
                from agent.datapath import pinned
                try:
                    self._links = {i: n for i, n in pinned._links()}
                except OSError:
                    self._links = {}
        return self._links

    def close(self) -> None:
        if self._maps:
            from agent.datapath import pinned
            pinned.close_all(self._maps)
        if self._client:
            self._client.close()

    # -- output ---------------------------------------------------------------
    def emit(self, data, render=None) -> None:
        if self.json:
            print(json.dumps(data, indent=1, sort_keys=True, default=str))
        elif render is not None:
            text = render(data)
            if text:
                print(text)
        else:
            print(json.dumps(data, indent=1, sort_keys=True, default=str))
        for n in self.notes:
            print(f"note: {n}", file=sys.stderr)


def run(fn):
    """Wrap a command: build the context, map errors to exit codes."""
    def wrapped(args) -> int:
        ctx = Ctx(args)
        try:
            return fn(ctx, args) or EXIT_OK
        except CliExit as exc:
            if exc.message:
                print(f"fastpath: {exc.message}", file=sys.stderr)
            return exc.code
        except PermissionError as exc:
            print(f"fastpath: {exc}", file=sys.stderr)
            return EXIT_PRIV
        finally:
            ctx.close()
    wrapped.__name__ = fn.__name__
    return wrapped


def now_ns() -> int:
    """The clock bpf_ktime_get_ns() reads (CLOCK_MONOTONIC)."""
    return time.monotonic_ns()


def fmt_age(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def is_root() -> bool:
    return os.geteuid() == 0
