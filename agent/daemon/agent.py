"""The fastpath agent: owns the datapath on one node.

Start-up order (each step idempotent, so a restarted agent converges
without flushing anything that forwards traffic):
  1. load: compile once, reopen pinned maps; a changed layout gets a new
     map and the old one's entries are carried over field by field;
  2. attach the ENI programs;
  3. restore endpoints from the state dir (skipping pods whose veth is gone);
     the new programs now run everywhere: entries the old programs created
     since step 1 are carried over too, and the superseded pins removed;
  4. the bandwidth manager: kernel probe, the ENIs' root qdisc, pods' limits;
  5. replay CNI deletions queued while the agent was down;
  6. serve the API (CNI plugin, CLI).
Health and metrics (agent/daemon/health.py, agent/daemon/metrics.py) are served from the
beginning, so liveness answers while the programs compile and readiness
says what is still missing.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

from agent.api.server import ApiError, ApiServer
from agent.config import Config
from agent.datapath import Datapath, tc
from agent.datapath.discover import DiscoveryError, InvalidNetns, discover
from agent.datapath.errors import DatapathError, InterfaceNotFound
from agent.model.endpoint import Endpoint, allocate_endpoint_key
from agent.k8s.model import Kind
from agent.daemon.metrics import AgentMetrics, cni_observed
from chainer.plugin import container_id_problem, ifname_problem

log = logging.getLogger("fastpath.agent")


def socket_lb_off_note(config: Config) -> str | None:
    """What socket_lb: false means while fastpath replaces kube-proxy: the
    node's own TCP and UDP to Services are translated per packet where they
    leave the node (fp_to_vpc, fp_lo), as its SCTP always is."""
    if not (config.kube_proxy_replacement and not config.socket_lb):
        return None
    return ("socket_lb is off: the node's own TCP and UDP to ClusterIPs, external and "
            "load-balancer IPs and its own NodePorts are translated per packet on its "
            "interfaces and lo, not at connect()")

DEL_QUEUE = "cni-del-queue"
# The state dir names containers, netns paths, pods and policies: root's
# alone (the CLI and the CNI plugin run as root).
STATE_DIR_MODE = 0o700
STATE_FILE_MODE = 0o600
# An endpoint record or a queued DEL is a few hundred bytes; a stray file
# far larger than that is not one of ours and is not read into memory.
MAX_RECORD_BYTES = 64 << 10


class StrayEntry(Exception):
    """An entry of the state dir that cannot be one of the agent's records:
    not a regular file, unreadable, or far too large."""


class Agent:
    def __init__(self, config: Config, *, netns: str | None = None, test_build: bool = False):
        self.config = config
        self.netns = netns
        from agent.conntrack.migrate import RULES
        self.datapath = Datapath(config, netns=netns, test_build=test_build,
                                 migration_rules=RULES)
        self.state_dir = Path(config.state_dir)
        self.ep_dir = self.state_dir / "endpoints"
        self.endpoints: dict[str, Endpoint] = {}
        self.lock = threading.RLock()
        self._key_reserved: set[str] = set()   # endpoint keys of ADDs under way
        self.api: ApiServer | None = None
        self.started_at = 0.0
        self.ready = threading.Event()
        self.enis: list[str] = []
        self.loopback = ""                 # lo, once fp_lo runs there
        self.store = None
        self.source = None
        self.source_error = ""
        self.services = None
        self.healthchecks = None
        self.policy = None
        self.events = None       # Kubernetes Events about policies (agent/k8s/events.py)
        self.socklb_optout = None
        self.conntrack_gc = None
        self.bandwidth = None
        self._qdisc_probe = None     # a future of qdisc.probe(), started by start()
        self.metrics = AgentMetrics(self)
        self.http = None
        self.inspect = None      # gRPC inspection service (agent/api/inspect.py)
        self._strays_reported: set[str] = set()

    # -- lifecycle -------------------------------------------------------
    def start(self, serve: bool = True) -> "Agent":
        t0 = time.monotonic()
        # the programs build in a child process (when no pinned set matches
        # these sources and options) while the cluster state is read
        self.datapath.begin_load()
        if serve:
            # the gRPC stack takes a good part of a second to import: on the
            # side, while the datapath loads (the module lock keeps it whole)
            threading.Thread(target=_preimport, args=("agent.api.inspect",),
                             name="preimport", daemon=True).start()
        # which pacing qdiscs the kernel has: a throwaway netns and a few tc
        # runs, done on the side while the datapath loads and restores
        if self.config.bandwidth_manager:
            import concurrent.futures
            from agent.datapath import qdisc
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bw-probe")
            self._qdisc_probe = pool.submit(qdisc.probe)
            pool.shutdown(wait=False)
        try:
            self._open_cluster_state()
            if serve:
                from agent.daemon.health import HttpEndpoints
                self.http = HttpEndpoints(self).start()
            self._prepare_state_dir()
            self.metrics.count_start(self.state_dir)
            self.datapath.load(defer_migration=True)
        except BaseException:
            self.datapath.close()
            raise
        phases = {"load": time.monotonic() - t0}
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[name] = phases.get(name, 0.0) + now - mark
            mark = now
        log.info("programs: %s", f"built in {self.datapath.build_seconds:.2f}s"
                 if self.datapath.built else "reused the pinned set (no compile)")
        # what the pins held, before any program of this start runs
        self.metrics.record_restored_maps(self.datapath)
        self.enis = self.datapath.attach_enis()
        log.info("attached to ENIs: %s", ", ".join(self.enis) or "(none)")
        self.loopback = self.datapath.attach_lo()
        phase("enis")
        restored, dropped = self.restore()
        log.info("restored %d endpoints (%d stale removed)", restored, dropped)
        phase("restore")
        self.datapath.finish_migration()
        for note in self.datapath.migration_notes:
            log.warning("pinned maps: %s", note)
        if not self.datapath.maps.mark6_armed():
            # every program now marks the reply sources it creates, and
            # this agent the frontends it writes: mark those already
            # there, then skip by the marks (fastpath.h FP_MAP_MARK6)
            log.info("IPv6 address marks: %d set, armed", self.datapath.maps.mark6_arm())
        phase("migration")
        self._start_services()
        phase("services")
        self._start_policy()
        phase("policy")
        self._start_bandwidth()
        phase("bandwidth")
        replayed = self.replay_deletions()
        if replayed:
            log.info("replayed %d queued CNI deletions", replayed)
        if serve:
            self.api = ApiServer(self.config.api_socket, self)
            self.api.start()
            log.info("API on %s", self.config.api_socket)
            self._start_inspect()
            # a CNI DEL that found no socket between the sweep above and
            # now was queued too: sweep once more now that DELs get through
            late = self.replay_deletions()
            if late:
                log.info("replayed %d CNI deletions queued during start-up", late)
            replayed += late
        self.metrics.record_restore(restored, dropped, replayed, self.datapath.migration_notes)
        self.started_at = time.time()
        self.ready.set()
        self.metrics.start_seconds.set(time.monotonic() - t0)
        phase("serve")
        log.info("ready in %.2fs (%s)", time.monotonic() - t0,
                 ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
        return self

    def _start_inspect(self) -> None:
        """The CLI's gRPC service; the agent runs on without it."""
        from agent.api import inspect
        from agent.config import grpc_socket_path
        path = grpc_socket_path(self.config)
        try:
            self.inspect = inspect.start_for(self, path)
            log.info("inspection service (gRPC) on %s", path)
        except Exception as exc:
            log.error("inspection service (gRPC) cannot start on %s: %s", path, exc)

    def _start_services(self) -> None:
        """Service translation: the maps follow cluster state (per packet,
        for pods and traffic from outside; at the socket for host sockets,
        or all sockets when not host-namespace-only), local pods' hostPorts
        with them; healthCheckNodePorts answered."""
        if not self.config.socket_lb:
            # the programs translate the node's TCP and UDP per packet
            # while the flag is clear: a previous run's may still be set
            self.datapath.settings.set(socket_lb=False,
                                       hostns_only=self.config.socket_lb_hostns_only,
                                       host_netns_cookie=0)
        if not self.config.kube_proxy_replacement:
            return
        note = socket_lb_off_note(self.config)
        if note:
            log.info("%s", note)
        if self.source is not None:
            from agent.daemon.hcserver import HealthCheckServer
            from agent.daemon.services import ServiceSync
            import socket as _socket
            cfg = self.config
            node = cfg.node_name or _socket.gethostname()
            self.healthchecks = HealthCheckServer(
                lambda: (self.services.addresses.nodeport + self.services.addresses.nodeport6
                         if self.services else ()),
                netns=self.netns,
                healthy_fn=lambda: self.services is not None and self.services.healthy())
            self.services = ServiceSync(
                self.datapath.lb, self.store, self.source, node, metrics=self.metrics,
                options=lb_options(cfg), addresses_fn=self._node_addresses,
                capacities=lb_capacities(cfg),
                service_cidrs=cfg.service_cidrs, reconciler_kw=reconciler_options(cfg),
                health=self.healthchecks)
            self.services.on_addresses = self._write_node_addresses
            if self.config.socket_lb:
                from agent.daemon.services import UdpSocketReaper
                self.services.on_backends_lost = UdpSocketReaper(
                    self.datapath.lb, self._socket_netns).reap
            self._restore_host_ports()
            self.services.start()
        from agent.daemon.conntrack_gc import ConntrackGC
        self.conntrack_gc = ConntrackGC(
            self.datapath.lb.ct, interval=self.config.conntrack_gc_interval,
            lifetimes=self.datapath.options.lifetimes(), metrics=self.metrics).start()
        if self.config.socket_lb:
            from agent.datapath.cgroup import resolve_root
            try:
                path = resolve_root(self.config.cgroup_root)
            except FileNotFoundError as exc:
                raise DatapathError(f"socket-LB: {exc} (or set socket_lb: false)") from None
            progs = self.datapath.attach_socket_lb(path, self.config.socket_lb_hostns_only)
            self._start_socket_lb_opt_out()
            log.info("socket-LB on cgroup %s (%s): %s", path,
                     "host netns only" if self.config.socket_lb_hostns_only else "all sockets",
                     ", ".join(p.name for p in progs))

    def _restore_host_ports(self) -> None:
        """Restored endpoints' hostPorts, for the first full plan."""
        from agent.daemon.services import HostPortRefused
        from agent.lb.hostport import PortMapping
        for ep in sorted(self.endpoints.values(), key=lambda e: e.owner):
            if not ep.port_mappings:
                continue
            try:
                self.services.set_host_ports(ep.owner, ep.ip,
                                             [PortMapping(*m) for m in ep.port_mappings],
                                             ep.ip6)
            except HostPortRefused as exc:
                log.error("restored hostPorts of %s/%s not programmed: %s", *ep.owner, exc)

    def _write_node_addresses(self, addrs) -> None:
        """The primary address and NIC, for the programs: the source of
        SNATed Service traffic and of the node's unbound sockets."""
        links = {name: idx for idx, name in self._links_by_index().items()}
        self.datapath.settings.set_node(addrs.primary[0] if addrs.primary else "",
                                        links.get(self.config.primary_device, 0),
                                        addrs.primary6[0] if addrs.primary6 else "")

    def _links_by_index(self) -> dict[int, str]:
        from agent.datapath.netlink import link_names
        return link_names(self.netns)

    def _node_addresses(self):
        """This node's addresses of both families for NodePorts and hostPorts
        (agent.lb.nodeaddr)."""
        import socket as _socket
        from agent.datapath.netlink import interface_addresses
        from agent.lb.nodeaddr import node_addresses
        by_dev = interface_addresses(self.netns, (_socket.AF_INET, _socket.AF_INET6))
        everything = [ip for ips in by_dev.values() for ip in ips]
        primary_dev = by_dev.get(self.config.primary_device, [])
        node_ips: list[str] = []
        if self.store is not None and self.services is not None:
            node = self.store.snapshot().nodes.get(("", self.services.node_name))
            if node is not None:
                node_ips = [a.address for a in node.addresses if a.type == "InternalIP"]
        return node_addresses(self.config.nodeport_addresses, everything, node_ips, primary_dev)

    def _start_policy(self) -> None:
        """NetworkPolicy: the policy maps follow cluster state; with
        enforcement `never` the checks are switched off and the maps emptied."""
        from agent.policy import Capacities
        from agent.daemon.policysync import PolicySync
        import socket as _socket
        cfg = self.config
        if cfg.policy_enforcement != "never" and self.source is None:
            log.error("policy: enforcement %r needs a cluster state source; the last "
                      "policy state in the maps stays enforced", cfg.policy_enforcement)
            return
        node = cfg.node_name or _socket.gethostname()
        if self.source is not None and cfg.policy_enforcement != "never":
            from agent.k8s.events import recorder_for
            self.events = recorder_for(self.source, node)
        self.policy = PolicySync(
            self.datapath.policy, self.datapath.settings, self.store, self.source,
            node, cfg.policy_enforcement,
            Capacities(cfg.ipcache_map_size, cfg.endpoints_map_size, cfg.policy_map_size),
            self._node_ips, ids_file=str(self.state_dir / "policy-ids.json"),
            metrics=self.metrics, events=self.events,
            unknown_pod=cfg.policy_unknown_pod)
        # restored endpoints keep what their ADD said until the store agrees
        for ep in self._endpoint_list():
            self.policy.remember(ep.pod_key, ep.pod_namespace, ep.pod_name)
        self.policy.start()

    def _start_bandwidth(self) -> None:
        """Per-pod limits (agent/daemon/bandwidth.py): on when the config
        asks and the kernel can, else off with the reason in the status."""
        from agent.daemon.bandwidth import BandwidthSync
        self.bandwidth = BandwidthSync(self.datapath, self.config, self.store, self.source,
                                       self._endpoint_list, netns=self.netns,
                                       sweep_interval=max(self.config.conntrack_gc_interval, 5)
                                       if self.config.conntrack_gc_interval else 30,
                                       metrics=self.metrics).start(self.enis,
                                                                   probe=self._qdisc_probe)

    def _refresh_bandwidth(self) -> None:
        # never with self.lock held: refresh takes it (through _endpoint_list)
        if self.bandwidth is not None:
            try:
                self.bandwidth.refresh()
            except Exception as exc:      # a CNI request must not fail on a limit
                log.error("bandwidth: refresh after an endpoint change failed: %s", exc)

    def _node_ips(self) -> list[str]:
        """This node's own addresses, IPv4 and global IPv6: what the host
        stack (kubelet probes) sends from, always allowed to reach the
        node's pods."""
        from agent.datapath.netlink import iproute
        ips = {self.config.local_router_ipv4}
        with iproute(self.netns) as ipr:
            for a in ipr.get_addr(family=2):
                ip = a.get_attr("IFA_ADDRESS")
                if ip and not ip.startswith("127."):
                    ips.add(ip)
            # global scope only: link-local and loopback are never judged
            for a in ipr.get_addr(family=10):
                ip = a.get_attr("IFA_ADDRESS")
                if ip and a.get("scope", 0) == 0 and not ip.lower().startswith("fe80"):
                    ips.add(ip)
        snap = self.store.snapshot() if self.store is not None else None
        node = snap.nodes.get(("", self.policy.node_name)) if snap and self.policy else None
        if node is not None:
            ips.update(a.address for a in node.addresses if a.type == "InternalIP")
        return sorted(ips)

    def policy_status(self) -> dict:
        """For the metrics: counts, and `refused_policies` (policy -> pods
        its rules are not written for)."""
        if self.policy is None:
            return {"mode": self.config.policy_enforcement, "policies": 0, "rules": 0,
                    "refused": 0, "refused_policies": {}, "pending": 0}
        st = self.policy.status.as_dict()
        st["refused_policies"] = {r["policy"]: len(r["pods"]) for r in st["refused"]}
        st["refused"] = len(st["refused"])
        st["pending"] = len(st["pending"])
        return st

    def _start_socket_lb_opt_out(self) -> None:
        """Pods annotated fastpath.io/socket-lb: disabled (or in such a
        Namespace) bypass socket-LB; only meaningful for all sockets."""
        if self.config.socket_lb_hostns_only or self.source is None:
            self.datapath.socklb_skip.set({})
            return
        from agent.daemon.services import SocketLbOptOut
        self.socklb_optout = SocketLbOptOut(self.datapath.socklb_skip, self.store,
                                            self._endpoint_list).start()

    def _socket_netns(self) -> list:
        """Network namespaces whose sockets socket-LB may translate: the
        node's own (None: this process's) and every local pod's."""
        pods = sorted({ep.netns for ep in self._endpoint_list() if ep.netns})
        return [self.netns] + pods

    def _endpoint_list(self) -> list[Endpoint]:
        with self.lock:
            return list(self.endpoints.values())

    def _refresh_socket_lb_opt_out(self) -> None:
        # never with self.lock held: refresh takes it (through _endpoint_list)
        if self.socklb_optout is not None:
            self.socklb_optout.refresh()

    def _open_cluster_state(self) -> None:
        """Start following cluster state. The datapath does not wait for it:
        pods keep being registered and forwarded while the API is away."""
        from agent.k8s import open_source
        from agent.k8s.store import Store
        import socket as _socket
        self.store = Store()
        node = self.config.node_name or _socket.gethostname()
        try:
            self.source = open_source(self.config.source, node, self.store,
                                      metrics=self.metrics.k8s,
                                      # peer selectors match pods of every node
                                      watch_all_pods=self.config.policy_enforcement != "never",
                                      directory_watch=self.config.source_watch)
        except Exception as exc:      # no kubeconfig, unreadable directory, ...
            self.source = None
            self.source_error = f"{type(exc).__name__}: {exc}"
            log.error("cluster state source %r cannot start: %s", self.config.source, exc)
            return
        threading.Thread(target=self._log_initial_sync, name="k8s-sync", daemon=True).start()

    def _log_initial_sync(self) -> None:
        from agent.k8s.source import describe, summarize
        src = self.source
        while not src.synced.wait(30):
            log.warning("cluster state from %s: initial sync not complete yet",
                        src.describe_source())
        snap = self.store.snapshot()
        log.info("%s (from %s)", summarize(snap), src.describe_source())
        for line in describe(snap):
            log.info("  %s", line)
        for err in src.rejected():
            log.warning("  rejected: %s", err)

    def stop(self) -> None:
        if self.bandwidth is not None:
            self.bandwidth.stop()
        if self.policy is not None:
            self.policy.stop()
        if self.events is not None:
            self.events.stop()
        if self.conntrack_gc is not None:
            self.conntrack_gc.stop()
        if self.services is not None:
            self.services.stop()
        if self.healthchecks is not None:
            self.healthchecks.stop()
        if self.socklb_optout is not None:
            self.socklb_optout.stop()
        if self.source is not None:
            self.source.stop()
        if self.api:
            self.api.stop()
        if self.inspect is not None:
            self.inspect.stop()
        if self.http:
            self.http.stop()
        # The module's tables must outlive every thread that uses them: a
        # table call releases the GIL, and destroying the module under it
        # corrupts the process (in-process agents in tests and the demo).
        busy = [t.name for t in self._worker_threads() if not _joined(t, 60)]
        if busy:
            log.warning("threads still busy at stop (%s): leaving the BPF module open",
                        ", ".join(busy))
            return
        self.datapath.close()

    def _worker_threads(self) -> list[threading.Thread]:
        out = []
        for w in (self.policy, self.conntrack_gc, self.services, self.socklb_optout,
                  self.bandwidth, getattr(self.services, "purger", None),
                  getattr(self.services, "affinity_purger", None),
                  self.healthchecks):
            t = getattr(w, "_thread", None) if w is not None else None
            if isinstance(t, threading.Thread):
                out.append(t)
        return out

    # -- endpoint state ----------------------------------------------------
    def _prepare_state_dir(self) -> None:
        """Make the state dir and its two record dirs 0700, and take group
        and other access away from whatever an earlier release (or anyone)
        left in them: files and sockets 0600 at most. Symbolic links are
        never followed, stray directories are left as they are."""
        dirs = (self.state_dir, self.ep_dir, self.state_dir / DEL_QUEUE)
        for d in dirs:
            d.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        fixed = []
        for d in dirs:
            fixed += _restrict(d, STATE_DIR_MODE)
            try:
                entries = list(os.scandir(d))
            except OSError as exc:
                log.warning("state dir: cannot list %s: %s", d, exc.strerror)
                continue
            for e in entries:
                try:
                    mode = e.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue            # gone meanwhile
                if stat.S_ISREG(mode) or stat.S_ISSOCK(mode):
                    fixed += _restrict(Path(e.path), STATE_FILE_MODE)
        if fixed:
            log.warning("state dir: took group/other access away from %d entries (%s%s)",
                        len(fixed), ", ".join(fixed[:5]),
                        f" and {len(fixed) - 5} more" if len(fixed) > 5 else "")

    def _state_file(self, ep: Endpoint) -> Path:
        return self.ep_dir / f"{ep.key}.json"

    def _persist(self, ep: Endpoint) -> None:
        path = self._state_file(ep)
        _write_private(path.with_suffix(".tmp"), ep.to_json())
        os.replace(path.with_suffix(".tmp"), path)

    def restore(self) -> tuple[int, int]:
        """Re-apply saved endpoints whose host veth still exists; forget the
        rest (their pods went away while we were not looking)."""
        restored = dropped = 0
        wanted_ips = set()
        links = self._links()
        pending: list[tuple[Path, Endpoint]] = []
        for f in sorted(self.ep_dir.glob("*.json")):
            try:
                ep = Endpoint.from_json(read_record(f))
            except FileNotFoundError:
                continue
            except StrayEntry as exc:
                log.warning("endpoint state: %s; left alone", exc)
                continue
            except (ValueError, TypeError) as exc:
                log.warning("ignoring unreadable endpoint state %s: %s", f, exc)
                f.unlink(missing_ok=True)
                continue
            if links.get(ep.host_ifname) != ep.host_ifindex:
                # the veth is gone (or its name now belongs to another pod)
                self.datapath.maps.endpoint_delete(ep.pod_key, ep.host_ifindex)
                f.unlink(missing_ok=True)
                dropped += 1
                continue
            pending.append((f, ep))
        failed = {id(ep): exc for ep, exc in
                  self.datapath.add_endpoints([ep for _, ep in pending])}
        for f, ep in pending:
            exc = failed.get(id(ep))
            if isinstance(exc, InterfaceNotFound):
                # the veth went away since it was listed
                self.datapath.maps.veth_delete(ep.host_ifindex, ep.pod_key)
                f.unlink(missing_ok=True)
                dropped += 1
                continue
            if exc is not None:
                raise exc
            self.endpoints[ep.key] = ep
            wanted_ips.add(ep.pod_key)
            restored += 1
        # map entries nobody claims any more (e.g. state dir lost) are stale
        for entry in self.datapath.maps.endpoints():
            if entry.ip not in wanted_ips:
                self.datapath.maps.endpoint_delete(entry.ip, entry.host_ifindex)
                dropped += 1
        self.datapath.maps.veths_retain({ep.host_ifindex: ep.pod_key
                                         for ep in self.endpoints.values()})
        # IPv6 twins whose endpoint is gone (an agent killed between the two deletions)
        dropped += self.datapath.maps.endpoints6_retain(
            {ep.ip6 for ep in self.endpoints.values() if ep.ip6})
        return restored, dropped

    def _links(self) -> dict[str, int]:
        from agent.datapath.netlink import link_names
        return {name: index for index, name in link_names(self.netns).items()}

    def replay_deletions(self) -> int:
        """Apply the CNI DELs the plugin queued while the agent was away.
        Runs while ADDs may arrive (the second sweep of start()): each file
        is read, judged and removed under the agent's lock, which an ADD
        holds while it registers and removes the queued DEL it supersedes.
        So a file an ADD took away is skipped, and a DEL queued before the
        attachment it names was registered again is dropped, not applied."""
        qdir = self.state_dir / DEL_QUEUE
        n = 0
        removed = False
        for f in sorted(qdir.glob("*.json")):
            t0 = time.monotonic()
            with self.lock:
                try:
                    text = read_record(f)
                except FileNotFoundError:
                    continue                # an ADD superseded it meanwhile
                except StrayEntry as exc:
                    if str(f) not in self._strays_reported:    # each sweep meets it again
                        self._strays_reported.add(str(f))
                        log.warning("CNI DEL queue: %s; left alone", exc)
                    continue
                try:
                    outcome = self._replay_deletion(json.loads(text))
                except (ValueError, ApiError) as exc:
                    log.warning("dropping queued deletion %s: %s", f.name, exc)
                    outcome = None
                f.unlink(missing_ok=True)
            if outcome is not None:
                n += 1
                removed |= outcome == "ok"
                self.metrics.observe_cni("DEL", outcome, time.monotonic() - t0)
        if removed:
            self._refresh_socket_lb_opt_out()
        return n

    def _replay_deletion(self, req) -> str:
        """One queued DEL, with self.lock held; its result as a CNI metric
        label ("ok", or "unknown" when nothing was deleted)."""
        if not isinstance(req, dict):
            raise ValueError("not a JSON object")
        container_id, ifname = req.get("container_id", ""), req.get("ifname", "eth0")
        _check_identity(container_id, ifname)
        queued_at, netns = req.get("queued_at", 0), req.get("netns", "")
        if isinstance(queued_at, bool) or not isinstance(queued_at, (int, float)):
            raise ValueError(f"queued_at must be a number, not {queued_at!r:.40}")
        if not isinstance(netns, str):
            raise ValueError(f"netns must be a string, not {netns!r:.40}")
        key = f"{container_id}-{ifname}"
        ep = self.endpoints.get(key)
        if ep is None:
            return "unknown"
        if queued_at and ep.added_at > queued_at:
            log.info("queued DEL of %s dropped: it was queued at %.3f, before the attachment "
                     "was registered again at %.3f", key, queued_at, ep.added_at)
            return "unknown"
        if netns and ep.netns and netns != ep.netns:
            log.info("queued DEL of %s dropped: it names netns %s, the registered attachment "
                     "is in %s", key, netns, ep.netns)
            return "unknown"
        self._forget(ep)
        log.info("endpoint deleted (queued CNI DEL): %s ip=%s", key, ep.ip or ep.ip6)
        return "ok"

    # -- API -----------------------------------------------------------------
    @cni_observed("ADD")
    def rpc_EndpointAdd(self, netns: str, ifname: str = "eth0", container_id: str = "",
                        pod_namespace: str = "", pod_name: str = "",
                        require_eni: bool = False, port_mappings=None) -> dict:
        """Discover, attach, write the map entry and the pod's hostPorts;
        return once all are in place. Idempotent for one container id +
        ifname (a CNI ADD retry). Nothing is left behind when it fails."""
        t0 = time.monotonic()
        _check_identity(container_id, ifname, empty_id=True)
        for name, value in (("netns", netns), ("pod_namespace", pod_namespace),
                            ("pod_name", pod_name)):
            if not isinstance(value, str):
                raise ApiError("invalid-argument", f"{name} must be a string, not "
                               f"{type(value).__name__}")
        if not isinstance(require_eni, bool):
            raise ApiError("invalid-argument", "require_eni must be true or false")
        from agent.lb.hostport import (
            PortMapping, PortMappingError, family_refusal, parse_port_mappings,
        )
        try:
            mappings, notes = parse_port_mappings(port_mappings)
        except PortMappingError as exc:
            raise ApiError("invalid-port-mappings",
                           f"pod {pod_namespace}/{pod_name}: {exc}") from None
        for n in notes:
            log.warning("pod %s/%s: %s", pod_namespace, pod_name, n)
        if mappings and not self.config.host_port:
            log.info("pod %s/%s: hostPorts %s not served (host_port: false)", pod_namespace,
                     pod_name, ", ".join(map(str, mappings)))
            mappings = ()
        if mappings and self.services is None:
            raise ApiError("hostport-refused",
                           f"pod {pod_namespace}/{pod_name} asks for hostPorts, but Service "
                           "translation is off on this node (kube_proxy_replacement, or no "
                           "cluster state)")
        try:
            ep = discover(netns, ifname, self.netns, container_id=container_id,
                          pod_namespace=pod_namespace, pod_name=pod_name)
        except InvalidNetns as exc:
            raise ApiError("invalid-netns", str(exc)) from None
        except DiscoveryError as exc:
            raise ApiError("discovery", str(exc)) from None
        ep = dataclasses.replace(ep, added_at=time.time())
        why = family_refusal(mappings, ep.ip, ep.ip6) if mappings else None
        if why:
            raise ApiError("hostport-refused", f"pod {pod_namespace}/{pod_name}: {why}")
        if not ep.ip:
            ep = self._with_endpoint_key(ep)
        t1 = time.monotonic()
        fetched, how = self._identify(pod_namespace, pod_name)
        t_identity = time.monotonic()
        if require_eni and not ep.eni_name:
            self._key_reserved.discard(ep.endpoint_key)
            raise ApiError("eni-unresolved",
                           f"no ENI found for pod IP {ep.ip or ep.ip6}: the node needs a "
                           f"policy-routing rule `from {ep.ip or ep.ip6} lookup <table>` whose "
                           "table has a default route through "
                           f"an ENI (Terway adds both); see `ip rule` and `ip route show table all`")
        if mappings:
            ep = dataclasses.replace(ep, port_mappings=tuple(
                (m.host_port, m.container_port, m.protocol, m.host_ip) for m in mappings))
        # the pod's NetworkPolicy before its programs and its entry: the
        # first packet anyone sends it is judged as its policies say
        try:
            policy = self._admit_policy(ep, fetched, t0)
        except BaseException:
            self._key_reserved.discard(ep.endpoint_key)
            raise
        t2 = time.monotonic()
        with self.lock:
            self._key_reserved.discard(ep.endpoint_key)
            for key, other in list(self.endpoints.items()):
                if key != ep.key and (other.ip == ep.ip if ep.ip else other.ip6 == ep.ip6):
                    # the IP was reassigned: the old attachment is stale
                    log.info("endpoint %s replaces stale %s for %s", ep.key, key,
                             ep.ip or ep.ip6)
                    self._forget(other, detach=other.host_ifindex != ep.host_ifindex)
            try:
                self.datapath.add_endpoint(ep)
            except DatapathError as exc:
                raise ApiError("datapath", str(exc)) from None
            if mappings or self._owns_host_ports(ep.owner):
                from agent.daemon.services import HostPortRefused
                try:
                    self.services.set_host_ports(ep.owner, ep.ip, mappings, ep.ip6)
                except HostPortRefused as exc:
                    self._forget(ep)
                    raise ApiError("hostport-refused",
                                   f"pod {pod_namespace}/{pod_name}: {exc}") from None
                except Exception as exc:
                    self._forget(ep)
                    raise ApiError("datapath", f"hostPorts of pod {pod_namespace}/"
                                               f"{pod_name}: {exc}") from None
            self.endpoints[ep.key] = ep
            self._persist(ep)
            # an ADD supersedes a deletion of the same attachment still queued
            (self.state_dir / DEL_QUEUE / f"{ep.key}.json").unlink(missing_ok=True)
        self._refresh_socket_lb_opt_out()
        self._refresh_bandwidth()
        t3 = time.monotonic()
        log.info("endpoint added: %s %s/%s ip=%s veth=%s eni=%s policy=%s (labels: %s)", ep.key,
                 pod_namespace, pod_name, ep.ip or ep.ip6, ep.host_ifname, ep.eni_name or "-",
                 policy, how)
        view = endpoint_view(ep)
        view["host_ports"] = [str(PortMapping(*m)) for m in ep.port_mappings]
        view["policy"] = policy
        view["timing_ms"] = {"discover": round((t1 - t0) * 1e3, 3),
                             "identity": round((t_identity - t1) * 1e3, 3),
                             "policy": round((t2 - t_identity) * 1e3, 3),
                             "attach": round((t3 - t2) * 1e3, 3),
                             "total": round((t3 - t0) * 1e3, 3)}
        return view

    def _with_endpoint_key(self, ep: Endpoint) -> Endpoint:
        """An IPv6-only pod's endpoint key (agent/model/endpoint.py): the one
        its attachment already has (an ADD retried), else the lowest free one,
        held for this ADD until its endpoint is registered or refused."""
        with self.lock:
            prev = self.endpoints.get(ep.key)
            if prev is not None and prev.endpoint_key and prev.ip6 == ep.ip6:
                return dataclasses.replace(ep, endpoint_key=prev.endpoint_key)
            taken = {o.endpoint_key for o in self.endpoints.values()} | self._key_reserved
            try:
                key = allocate_endpoint_key(taken)
            except ValueError as exc:
                raise ApiError("datapath", f"pod {ep.pod_namespace}/{ep.pod_name}: "
                                           f"{exc}") from None
            self._key_reserved.add(key)
        return dataclasses.replace(ep, endpoint_key=key)

    def _identify(self, namespace: str, name: str):
        """A new pod's labels, for its NetworkPolicy: (the Pod fetched for
        it when the store does not hold it, where the labels came from).
        The store first; else the source is asked for that one Pod (a GET,
        or a rescan of the manifests), retried while it cannot answer, for
        at most policy_pod_lookup_timeout_ms. (None, "unknown") when the
        labels cannot be had in time: the pod starts in the safe state."""
        if self.policy is None or self.policy.mode.value == "never":
            return None, "not needed"
        if not namespace or not name:
            return None, "no pod name in the CNI request"
        key = (namespace, name)
        if self.store.get(Kind.POD, key) is not None:
            return None, "store"
        src = self.source
        deadline = time.monotonic() + self.config.policy_pod_lookup_timeout_ms / 1e3
        last = "no answer in time"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                pod = src.lookup_pod(namespace, name, left)
            except Exception as exc:       # unreachable, timeout: ask again while time is left
                last = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                continue
            if self.store.get(Kind.POD, key) is not None:
                return None, "store"
            if pod is None:
                last = f"{src.kind_name} has no Pod {namespace}/{name}"
                break
            return pod, src.kind_name
        log.warning("CNI ADD of %s/%s: its labels are not known (%s): it starts as %s until "
                    "its Pod arrives", namespace, name, last, self.config.policy_unknown_pod)
        return None, f"unknown ({last})"

    def _admit_policy(self, ep: Endpoint, fetched, t0: float) -> str:
        if self.policy is None:
            return "not-enforced"
        if self.policy.mode.value == "never":
            return "not-enforced"
        left = max(0.0, t0 + self.config.policy_pod_lookup_timeout_ms / 1e3 - time.monotonic())
        try:
            return self.policy.admit(ep.pod_key, ep.pod_namespace, ep.pod_name, fetched,
                                     wait=left)
        except Exception as exc:
            raise ApiError("datapath", f"NetworkPolicy of {ep.pod_namespace}/{ep.pod_name} "
                                       f"({ep.ip or ep.ip6}) could not be written: {exc}") from None

    def _host_link_is(self, ep: Endpoint) -> bool:
        """Whether ep's veth still exists as the device it was at ADD time: a
        pod re-created under the same name gets a veth of the same name, which
        a late DEL of the old one must not touch."""
        from agent.datapath.netlink import link_name
        return link_name(ep.host_ifindex, self.netns) == ep.host_ifname

    def _owns_host_ports(self, owner) -> bool:
        return self.services is not None and owner in self.services.host_ports()

    def _forget(self, ep: Endpoint, detach: bool = True) -> None:
        self.endpoints.pop(ep.key, None)
        if ep.port_mappings and self.services is not None and not any(
                o.owner == ep.owner and o.port_mappings for o in self.endpoints.values()):
            try:
                self.services.remove_host_ports(ep.owner)
            except Exception as exc:     # the retry of the service sync cleans up
                log.warning("hostPorts of %s/%s not removed yet: %s", *ep.owner, exc)
        # map entry first (nobody is redirected to it any more), then filters;
        # either may since belong to a newer attachment, which keeps them
        if not any(o.pod_key == ep.pod_key for o in self.endpoints.values()):
            self.datapath.maps.endpoint_delete(ep.pod_key, ep.host_ifindex)
        if not any(o.host_ifindex == ep.host_ifindex for o in self.endpoints.values()):
            self.datapath.maps.veth_delete(ep.host_ifindex, ep.pod_key)
        if detach and self._host_link_is(ep) and not any(
                o.host_ifindex == ep.host_ifindex for o in self.endpoints.values()):
            try:
                self.datapath.detach(ep.host_ifindex)
            except DatapathError:
                pass        # the veth went away meanwhile, and our filters with it
        self._state_file(ep).unlink(missing_ok=True)

    @cni_observed("DEL")
    def rpc_EndpointDel(self, container_id: str, ifname: str = "eth0") -> dict:
        _check_identity(container_id, ifname, empty_id=True)
        key = f"{container_id}-{ifname}"
        with self.lock:
            ep = self.endpoints.get(key)
            if ep is None:
                return {"deleted": False}
            self._forget(ep)
        if self.policy is not None and not any(o.pod_key == ep.pod_key
                                               for o in self._endpoint_list()):
            self.policy.forget(ep.pod_key)
        self._refresh_socket_lb_opt_out()
        self._refresh_bandwidth()
        log.info("endpoint deleted: %s ip=%s", key, ep.ip or ep.ip6)
        return {"deleted": True, "ip": ep.ip}

    def rpc_EndpointCheck(self, container_id: str, ifname: str = "eth0") -> dict:
        """Verify the datapath for one endpoint; list every problem found."""
        _check_identity(container_id, ifname, empty_id=True)
        key = f"{container_id}-{ifname}"
        ep = self.endpoints.get(key)
        if ep is None:
            raise ApiError("not-found", f"endpoint {key} is not known to the agent")
        problems = []
        try:
            progs = {(f.direction, f.name) for f in tc.list_filters(ep.host_ifname, self.netns)
                     if f.prio == self.config.tc_priority}
            for direction, prog in (("ingress", "fp_from_pod"), ("egress", "fp_to_pod")):
                if (direction, prog) not in progs:
                    problems.append(f"{prog} is not attached to {ep.host_ifname} {direction}")
        except InterfaceNotFound:
            problems.append(f"host veth {ep.host_ifname} no longer exists")
        else:
            if not self._host_link_is(ep):
                problems.append(f"host veth {ep.host_ifname} is not the device registered at "
                                f"ADD (ifindex {ep.host_ifindex}): it was re-created")
        maps = self.datapath.maps
        entry = next((e for e in (maps.endpoints() if ep.ip else maps.endpoints6())
                      if ipaddress.ip_address(e.ip) == ipaddress.ip_address(ep.ip or ep.ip6)),
                     None)
        if entry is None:
            problems.append(f"no endpoints map entry for {ep.ip or ep.ip6}")
        elif entry.host_ifindex != ep.host_ifindex:
            problems.append(f"endpoints map entry for {ep.ip or ep.ip6} points at ifindex "
                            f"{entry.host_ifindex}, not {ep.host_ifname} ({ep.host_ifindex})")
        if ep.eni_name:
            try:
                tc.list_filters(ep.eni_name, self.netns)
            except InterfaceNotFound:
                problems.append(f"ENI {ep.eni_name} no longer exists")
        if problems:
            raise ApiError("check-failed", "; ".join(problems))
        return {"ok": True, "endpoint": endpoint_view(ep)}

    def rpc_EndpointList(self) -> list[dict]:
        with self.lock:
            return [endpoint_view(e) for e in sorted(self.endpoints.values(),
                                                     key=lambda e: (e.ip, e.ip6))]

    def rpc_Counters(self) -> list[dict]:
        return [dict(ifindex=r.ifindex, direction=r.direction, reason=r.reason,
                     packets=r.packets, bytes=r.bytes, drop=r.is_drop)
                for r in self.datapath.maps.counters()]

    def rpc_Status(self) -> dict:
        src = self.source
        source = ({"spec": self.config.source, "synced": src.synced.is_set(),
                   "status": src.status(), "objects": self.store.snapshot().counts()}
                  if src is not None else {"spec": self.config.source, "error": self.source_error})
        source["state"] = source_state(source)
        return {"ready": self.ready.is_set(), "started_at": self.started_at,
                "endpoints": len(self.endpoints), "enis": self.enis,
                "bpffs_root": self.config.bpffs_root, "pid": os.getpid(), "source": source,
                "http": dict(self.http.addresses) if self.http else {},
                "policy": self.rpc_PolicyStatus(), "bandwidth": self.bandwidth_status(),
                # whether this start compiled, or reused the pinned programs
                "programs": {"build_key": self.datapath.build_key,
                             "built": self.datapath.built,
                             "build_seconds": round(self.datapath.build_seconds, 3)}}

    def bandwidth_status(self) -> dict:
        if self.bandwidth is None:
            return {"enabled": False, "summary": "not started"}
        return self.bandwidth.status.as_dict()

    def rpc_Bandwidth(self) -> dict:
        """Status, rejected annotations and every limited pod's limits."""
        if self.bandwidth is None:
            return {"status": self.bandwidth_status(), "pods": {}}
        return self.bandwidth.view()

    def rpc_PolicyStatus(self) -> dict:
        if self.policy is None:
            return {"mode": self.config.policy_enforcement, "enabled": False}
        st = self.policy.status.as_dict()
        st["enabled"] = self.policy.mode.value != "never"
        return st

    def rpc_PolicyWait(self, applied_after: int, timeout: float = 10.0) -> dict:
        """Return the policy status once the maps reflect a store version past
        `applied_after` (PolicyStatus' applied_version), waiting at most
        `timeout` seconds (60 at most): a caller that changed cluster state
        learns when it is enforced without polling."""
        if isinstance(applied_after, bool) or not isinstance(applied_after, int):
            raise ApiError("invalid-argument", "applied_after must be an integer")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                0 <= timeout <= 60):
            raise ApiError("invalid-argument", "timeout must be a number of seconds, 0 to 60")
        if self.policy is None or self.policy.mode.value == "never":
            raise ApiError("unavailable", "NetworkPolicy enforcement is off")
        if not self.policy.wait_applied(applied_after, float(timeout)):
            raise ApiError("timeout", f"the policy maps do not reflect a store version past "
                                      f"{applied_after} after {timeout:g}s (they reflect "
                                      f"{self.policy.status.applied_version})")
        return self.rpc_PolicyStatus()

    def rpc_PolicyGet(self, endpoint: str) -> dict:
        """The effective rules of a pod (by IPv4 or namespace/name)."""
        if self.policy is None or self.policy.state is None:
            raise ApiError("unavailable", "NetworkPolicy enforcement is off or not synced yet")
        ip = endpoint
        if "/" in endpoint:
            for addr, ep in self.policy.state.endpoints.items():
                if f"{ep.namespace}/{ep.name}" == endpoint:
                    ip = addr
                    break
        view = self.policy.describe_endpoint(ip)
        if view is None:
            raise ApiError("not-found", f"{endpoint}: no policy endpoint on this node")
        return view

    def rpc_Config(self) -> dict:
        """The configuration in force and where each value came from."""
        from agent.config import describe
        return {"keys": describe(self.config), "notes": list(self.config.notes)}


def lb_options(cfg: Config):
    """What the configuration says about Services, for agent.lb.compile
    (the node's NodePort addresses are filled in by the service sync)."""
    from agent.lb.compile import LbOptions
    return LbOptions(node_port=cfg.node_port, external_ips=cfg.external_ips,
                     in_cluster_lb=cfg.in_cluster_lb, session_affinity=cfg.session_affinity,
                     topology=cfg.service_topology,
                     maglev=cfg.lb_external_algorithm == "maglev")


def lb_capacities(cfg: Config):
    from agent.lb.capacity import Capacities
    return Capacities(services=cfg.services_map_size, slots=cfg.slots_map_size,
                      backends=cfg.backends_map_size, maglev=cfg.services_map_size,
                      ranges=cfg.source_ranges_map_size)


def reconciler_options(cfg: Config) -> dict:
    """Released ids wait longer than anything that names them can live: the
    longest ClientIP affinity the API allows, and the conntrack lifetimes."""
    from agent.lb.reconcile import ID_QUARANTINE_SECONDS
    return {"quarantine": max(ID_QUARANTINE_SECONDS, cfg.conntrack_tcp_idle_timeout + 3600,
                              cfg.conntrack_idle_timeout + 3600),
            "maglev_size": cfg.maglev_table_size}


def _check_identity(container_id, ifname, empty_id: bool = False) -> None:
    """The CNI spec's rules for a container id and an interface name (the
    CNI plugin's own checks, so both ends agree); an empty id is allowed
    where endpoints registered without one (by IP) are meant."""
    for name, value, problem in (("container_id", container_id, container_id_problem),
                                 ("ifname", ifname, ifname_problem)):
        if name == "container_id" and empty_id and value == "":
            continue
        why = problem(value)
        if why:
            shown = f" {value[:60]!r}" if isinstance(value, str) else ""
            raise ApiError("invalid-argument", f"{name}{shown} {why}")


def read_record(path: Path) -> bytes:
    """The content of one of the agent's record files (an endpoint, a queued
    DEL). FileNotFoundError if it is gone; StrayEntry for what cannot be a
    record: a directory, link, FIFO or other non-file, a file that cannot be
    read, or one larger than MAX_RECORD_BYTES. Opened without following
    links and without blocking, so no entry can hang or redirect a start."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StrayEntry(f"{path} is a symbolic link") from None
        raise StrayEntry(f"{path} cannot be read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StrayEntry(f"{path} is not a regular file")
        if st.st_size > MAX_RECORD_BYTES:
            raise StrayEntry(f"{path} is {st.st_size} bytes, far more than a record")
        try:
            data = os.read(fd, MAX_RECORD_BYTES + 1)
        except OSError as exc:
            raise StrayEntry(f"{path} cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)
    return data


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 STATE_FILE_MODE)
    try:
        os.fchmod(fd, STATE_FILE_MODE)      # a leftover temporary file keeps its mode
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _restrict(path: Path, mask: int) -> list[str]:
    """Clear the mode bits of `path` outside `mask`; [path] if it changed."""
    mode = 0
    try:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if mode & ~mask == 0 or stat.S_ISLNK(st.st_mode):
            return []
        os.chmod(path, mode & mask)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("state dir: cannot restrict %s (mode %o): %s", path, mode, exc.strerror)
        return []
    return [f"{path} {mode:o}->{mode & mask:o}"]


def _preimport(module: str) -> None:
    import importlib
    try:
        importlib.import_module(module)
    except Exception:       # the real import reports it, where it is needed
        pass


def _joined(t: threading.Thread, timeout: float) -> bool:
    if t.is_alive() and t is not threading.current_thread():
        t.join(timeout)
    return not t.is_alive()


def source_state(source: dict) -> str:
    """One word for `fastpath status`: synced, syncing, unreachable (while
    the datapath keeps the last known state), degraded (synced, but the
    source reports problems of its own, e.g. a manifest directory with a
    link loop: its status lists them), or failed (never started)."""
    if "error" in source:
        return "failed"
    st = source["status"]
    if not st["connected"] and any(k["errors"] for k in st["kinds"].values()):
        return "unreachable"
    if not source["synced"]:
        return "syncing"
    return "degraded" if st.get("problems") else "synced"


def endpoint_view(ep: Endpoint) -> dict:
    return {"key": ep.key, "ip": ep.ip, "ip6": ep.ip6, "endpoint_key": ep.endpoint_key,
            "pod": f"{ep.pod_namespace}/{ep.pod_name}".strip("/"),
            "host_ifname": ep.host_ifname, "host_ifindex": ep.host_ifindex,
            "eni": ep.eni_name, "eni_ifindex": ep.eni_ifindex, "pod_mac": ep.pod_mac,
            "host_mac": ep.host_mac, "container_id": ep.container_id, "ifname": ep.ifname}
