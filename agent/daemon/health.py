"""The agent's HTTP endpoints: liveness, readiness and Prometheus metrics.

    GET /healthz   liveness: 200 while the process and its loops work (the
                   API answers a request, the agent's lock can be taken, the
                   cluster-state threads run). The kubelet restarts the
                   container when it fails, so it never depends on anything
                   outside the process: an unreachable API server is not a
                   reason to restart an agent whose datapath forwards.
    GET /readyz    readiness: 200 once the start is complete, the cluster
                   state has been synced once, fastpath's programs are on
                   every ENI and registered pod veth (and socket-LB's on its
                   cgroup, when on), and the maps take a write. A rolling
                   update waits for it on each node.
    GET /metrics   Prometheus text format (agent/daemon/metrics.py).

Each answer lists its checks one per line ("ok NAME" or "fail NAME: why"),
which is what `kubectl describe pod` shows of a failed probe. Health and
metrics listen on separate addresses (health on loopback for the kubelet,
metrics on the node's IP where Prometheus reaches them); the same address
serves both. A slow or idle client costs a bounded share of a listener,
never a thread (httpserve.py).
"""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent.config import NODE_IP, parse_address
from agent.daemon.httpserve import Listener

log = logging.getLogger("fastpath.health")

Check = tuple[str, bool, str]          # (name, ok, detail)
LOCK_TIMEOUT = 2.0
READY_CACHE_SECONDS = 1.0


def liveness(agent) -> list[Check]:
    checks: list[Check] = []
    if agent.api is not None:
        from agent.api import wire
        alive = agent.api._thread is not None and agent.api._thread.is_alive()
        detail = ""
        if alive:
            try:
                wire.call(agent.config.api_socket, "Status", timeout=LOCK_TIMEOUT)
            except Exception as exc:         # any failure to answer is the finding
                alive, detail = False, f"no answer on {agent.config.api_socket}: {exc}"
        else:
            detail = "the API accept loop has stopped"
        checks.append(("api", alive, detail))
    if agent.lock.acquire(timeout=LOCK_TIMEOUT):
        agent.lock.release()
        checks.append(("agent-lock", True, ""))
    else:
        checks.append(("agent-lock", False, f"held for more than {LOCK_TIMEOUT}s"))
    src = agent.source
    if src is not None:
        threads = [r.thread for r in getattr(src, "_reflectors", [])]
        if getattr(src, "_thread", None) is not None:
            threads.append(src._thread)
        dead = [t.name for t in threads if not t.is_alive()]
        if src.stopped:
            checks.append(("cluster-state-loops", True, "stopped"))
        else:
            checks.append(("cluster-state-loops", not dead,
                           f"stopped: {', '.join(dead)}" if dead else ""))
    return checks


def _programs_attached(agent) -> Check:
    from agent.datapath import tc
    from agent.datapath.errors import InterfaceNotFound
    prio = agent.config.tc_priority
    want = {"eni": {("ingress", "fp_from_vpc"), ("egress", "fp_to_vpc")},
            "pod": {("ingress", "fp_from_pod"), ("egress", "fp_to_pod")},
            "lo": {("egress", "fp_lo")}}
    devices = [(eni, "eni") for eni in agent.enis]
    if getattr(agent, "loopback", ""):
        devices.append((agent.loopback, "lo"))
    with agent.lock:
        devices += [(ep.host_ifname, "pod") for ep in agent.endpoints.values()]
    missing = []
    for dev, role in devices:
        try:
            have = {(f.direction, f.name) for f in tc.list_filters(dev, agent.netns)
                    if f.prio == prio}
        except InterfaceNotFound:
            continue        # a pod being deleted: its DEL will follow
        for direction, prog in sorted(want[role] - have):
            missing.append(f"{prog} on {dev} {direction}")
    if missing:
        return ("programs-attached", False, "missing: " + ", ".join(missing[:5])
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    return ("programs-attached", True, f"{len(devices)} devices")


def _socket_lb_attached(agent) -> Check:
    from agent.datapath import cgroup as cgroups
    from agent.datapath import cgroup
    try:
        path = cgroups.resolve_root(agent.config.cgroup_root)
        have = {p.name for p in cgroup.attached(path)}
    except Exception as exc:      # no cgroup2, cgroup gone: the finding itself
        return ("socket-lb-attached", False, str(exc))
    missing = sorted(set(cgroup.SOCK_PROGRAMS) - have)
    if missing:
        return ("socket-lb-attached", False, f"missing on cgroup {path}: {', '.join(missing)}")
    return ("socket-lb-attached", True, path)


def _maps_writable(agent) -> Check:
    maps = agent.datapath.maps
    if maps is None:
        return ("maps-writable", False, "maps are not open")
    try:
        # Rewriting the bypass prefixes with the values they already hold is
        # a real map update that changes nothing for packets.
        maps.bypass_set(agent.config.host_stack_cidrs + agent.config.service_cidrs)
    except Exception as exc:
        return ("maps-writable", False, f"{type(exc).__name__}: {exc}")
    return ("maps-writable", True, "")


def readiness(agent) -> list[Check]:
    if not agent.ready.is_set():
        return [("started", False, "the agent is still starting")]
    checks: list[Check] = [("started", True, "")]
    src = agent.source
    if src is None:
        checks.append(("cluster-state-synced", False, agent.source_error or "no source"))
    elif not src.synced.is_set():
        checks.append(("cluster-state-synced", False,
                       f"initial sync from {src.describe_source()} not complete"))
    else:
        checks.append(("cluster-state-synced", True, ""))
    checks.append(_programs_attached(agent))
    if agent.config.kube_proxy_replacement and agent.config.socket_lb:
        checks.append(_socket_lb_attached(agent))
    checks.append(_maps_writable(agent))
    return checks


def render(checks: list[Check]) -> tuple[bool, str]:
    ok = all(c[1] for c in checks)
    lines = [f"{'ok' if good else 'fail'} {name}" + (f": {detail}" if detail else "")
             for name, good, detail in checks]
    return ok, "\n".join(lines) + "\n"


class HttpEndpoints:
    """The agent's HTTP listeners (one per distinct address), each with a
    bounded cost per client (agent/daemon/httpserve.py)."""

    def __init__(self, agent):
        self.agent = agent
        self.listeners: list[Listener] = []
        self.addresses: dict[str, str] = {}
        self._ready_cache: tuple[float, list[Check]] = (0.0, [])
        self._ready_lock = threading.Lock()

    def _ready_checks(self) -> list[Check]:
        # Probes and curious operators may poll hard; the checks walk every
        # pod's veth, so one answer serves a burst.
        with self._ready_lock:
            at, checks = self._ready_cache
            if time.monotonic() - at > READY_CACHE_SECONDS or not checks:
                checks = readiness(self.agent)
                self._ready_cache = (time.monotonic(), checks)
            return checks

    def _handler(self, paths: set[str]):
        def handle(path: str) -> tuple[int, str, bytes]:
            if path not in paths:
                return 404, "text/plain", f"not found; try {', '.join(sorted(paths))}\n".encode()
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(self.agent.metrics.registry)
            checks = liveness(self.agent) if path == "/healthz" else self._ready_checks()
            ok, text = render(checks)
            return (200 if ok else 503), "text/plain; charset=utf-8", text.encode()
        return handle

    def _host(self, host: str) -> str:
        if host != NODE_IP:
            return host
        from agent.datapath.netlink import first_ipv4
        dev = self.agent.config.primary_device
        ip = first_ipv4(dev, self.agent.netns)
        if ip is None:
            from agent.datapath.errors import DatapathError
            raise DatapathError(f"{NODE_IP}: primary_device {dev} has no IPv4 address here; "
                                "set metrics_address / health_address to an explicit address")
        return ip

    def start(self) -> "HttpEndpoints":
        wanted: dict[tuple[str, int], set[str]] = {}
        cfg = self.agent.config
        for address, paths in ((cfg.health_address, {"/healthz", "/readyz"}),
                               (cfg.metrics_address, {"/metrics"})):
            if address:
                host, port = parse_address(address)
                wanted.setdefault((self._host(host), port), set()).update(paths)
        try:
            for (host, port), paths in wanted.items():
                lst = Listener.bind(host, port, self._handler(paths),
                                    max_connections=cfg.http_max_connections,
                                    timeout=cfg.http_timeout).start()
                self.listeners.append(lst)
                for p in paths:
                    self.addresses["health" if p != "/metrics" else "metrics"] = lst.name
                log.info("serving %s on %s", ", ".join(sorted(paths)), lst.name)
        except OSError as exc:
            self.stop()
            from agent.datapath.errors import DatapathError
            raise DatapathError(f"cannot listen on {host}:{port}: {exc.strerror}; change "
                                "metrics_address / health_address") from None
        return self

    def stop(self) -> None:
        for lst in self.listeners:
            lst.stop()
        self.listeners.clear()


__all__ = ["HttpEndpoints", "liveness", "readiness", "render"]
