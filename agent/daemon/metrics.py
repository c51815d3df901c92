"""The node agent's Prometheus metrics.

One registry per Agent (so agents in one test process never collide), served
on `metrics_address` by agent/daemon/health.py. Three kinds of source:

- read from the kernel at scrape time by `DatapathCollector`: the per-CPU
  verdict counters (forwarded or dropped, by interface, direction and the
  reason code of bpf/include/fastpath.h, summed over CPUs) and, per pinned
  map, its entries against its capacity. Nothing is cached, so a scrape
  shows what the datapath holds now, also after an agent restart;
  Conntrack entries are counted by protocol and direction from the same
  key walk;
- kept by the agent: CNI ADD/DEL counts and latency (`cni_observed` wraps
  the API handlers), endpoints, Services and backends the service maps
  hold, map sync durations and errors per object kind, conntrack GC runs,
  what the last start restored and migrated, starts persisted in the state
  dir (a restart adds one);
- the cluster-state source's `fastpath_k8s_*` metrics (agent/k8s/metrics.py),
  registered here instead of on the process-wide registry.

NetworkPolicy counts (`fastpath_policies`, `fastpath_policy_rules`,
`fastpath_policy_refused`, per refused policy `fastpath_policy_refused_pods`,
`fastpath_policy_pending_pods`) are read from `agent.policy_status()`, a
dict with the keys "policies", "rules", "refused" and, when known,
"refused_policies" ({"namespace/name": pods}) and "pending" (an agent
without it exposes none of them: no zero that only means "not
implemented"). The policy sync
reports each run with `metrics.observe_sync("NetworkPolicy", seconds, ops, ok)`.
"""
from __future__ import annotations

import ctypes as ct
import functools
import logging
import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from agent.api.server import ApiError

log = logging.getLogger("fastpath.metrics")

STARTS_FILE = "agent-starts"
# Maps without a fill level: every slot of an array always exists
# (BPF_MAP_TYPE_ARRAY, _PERCPU_ARRAY; a PROG_ARRAY's slots are filled once
# at start), a ring buffer's size is bytes of events in flight
# (BPF_MAP_TYPE_RINGBUF) (uapi numbers).
ARRAY_TYPES = (2, 3, 6, 27)
# Object kinds whose datapath maps the agent syncs from cluster state: the
# service maps follow Services + EndpointSlices (+ the node's zone); the
# policy maps follow NetworkPolicies + Pods + Namespaces.
SYNC_KINDS = ("Service", "NetworkPolicy")
# A sync of the service maps is a few map writes when one thing changed and
# seconds for 10,000 Services at start.
SYNC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# CNI latency is tens of milliseconds when healthy (README: p50 ~26 ms from
# the runtime's side, ~10 ms of it in the agent); the top buckets catch an
# agent that queues requests.
CNI_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)


def count_keys(fd: int, key_size: int, limit: int, on_key=None) -> int:
    """Entries of a map we hold as an fd, by walking its keys (no values:
    per-CPU values would cost a copy per CPU for nothing). Bounded by the
    map's capacity in case entries churn under the walk. `on_key(buf)` sees
    each key's bytes."""
    from agent.datapath import libbpf
    lib = libbpf.lib()
    cur = ct.create_string_buffer(key_size)
    nxt = ct.create_string_buffer(key_size)
    prev = None
    n = 0
    while n < limit and lib.bpf_map_get_next_key(fd, prev, nxt) == 0:
        ct.memmove(cur, nxt, key_size)
        prev = cur
        n += 1
        if on_key is not None:
            on_key(cur)
    return n


class ConntrackTally:
    """Counts conntrack keys by (protocol, direction) during key walks of
    the conntrack maps; the field offsets come from the compiled key type
    (fastpath.h's fp_ct4_key, or fp_ct6_key for the IPv6 maps: a tally per
    key type, sharing `counts`)."""

    def __init__(self, key_type, counts: dict | None = None):
        from agent.datapath.maps import DEFS, PROTO_NAME
        self.proto_at = key_type.proto.offset
        # the IPv6 policy table's keys have no direction: all are policy's
        self.dir_at = key_type.dir.offset if hasattr(key_type, "dir") else None
        self.fixed_dir = DEFS.defines.get("FP_CT_POLICY", 2)
        self.dirs = {DEFS.defines[f"FP_CT_{d.upper()}"]: d
                     for d in ("forward", "reply", "policy") if f"FP_CT_{d.upper()}" in DEFS.defines}
        self.proto_name = PROTO_NAME
        self.counts: dict[tuple[int, int], int] = {} if counts is None else counts

    def __call__(self, buf) -> None:
        raw = buf.raw
        k = (raw[self.proto_at], raw[self.dir_at] if self.dir_at is not None else self.fixed_dir)
        self.counts[k] = self.counts.get(k, 0) + 1

    def rows(self):
        for (proto, d), n in sorted(self.counts.items()):
            yield (self.proto_name.get(proto, str(proto)), self.dirs.get(d, f"dir-{d}"), n)


class DatapathCollector:
    """Kernel-side state, read when Prometheus scrapes."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        # Families depend on what the datapath holds; an empty describe keeps
        # the registry from calling collect() at registration time.
        return []

    def collect(self):
        yield from self._agent_state()
        dp = self.agent.datapath
        if dp.module is None or dp.maps is None:
            return
        try:
            yield from self._counters(dp)
            yield from self._maps(dp)
            yield from self._bandwidth(dp)
        except Exception as exc:     # a scrape must never take the agent down
            log.warning("datapath metrics unavailable: %s", exc)

    def _agent_state(self):
        """Counts the agent holds: what the service maps were last synced to,
        and NetworkPolicy state when enforcement is built."""
        svc = self.agent.services
        if svc is not None:
            n_svc = GaugeMetricFamily(
                "fastpath_services", "Service frontends (VIP, port, protocol) programmed in the "
                "service maps.")
            n_svc.add_metric([], len(svc.reconciler.frontends()))
            n_be = GaugeMetricFamily(
                "fastpath_service_backends", "Distinct backends (IP, port, protocol) programmed "
                "in the service maps.")
            n_be.add_metric([], len(svc.reconciler.backend_ids))
            refused = GaugeMetricFamily(
                "fastpath_services_refused", "Services (and pods' hostPort sets) refused "
                "because they would overflow a service map; the maps keep what they had.")
            refused.add_metric([], len(svc.refused))
            conflicts = GaugeMetricFamily(
                "fastpath_hostport_conflicts", "Pods' hostPorts a Service or another pod "
                "holds (the Service, or the first pod by name, keeps the port).")
            conflicts.add_metric([], len(svc.conflicts))
            failing = GaugeMetricFamily(
                "fastpath_service_sync_failing", "1 while a failed service-map write waits "
                "for its retry (the maps hold what was written; healthCheckNodePorts answer "
                "503), else 0.")
            failing.add_metric([], 1.0 if svc.retry_at is not None else 0.0)
            yield from (n_svc, n_be, refused, conflicts, failing)
        status = getattr(self.agent, "policy_status", None)
        if callable(status):
            try:
                st = status()
            except Exception as exc:
                log.warning("policy metrics unavailable: %s", exc)
                return
            for name, key, help_ in (
                    ("fastpath_policies", "policies",
                     "NetworkPolicies enforced on this node's endpoints."),
                    ("fastpath_policy_rules", "rules",
                     "Policy map entries the enforced NetworkPolicies compile to."),
                    ("fastpath_policy_refused", "refused",
                     "NetworkPolicies whose rules are not written for some pods of this node "
                     "because the policy maps cannot hold them; those pods stay isolated by "
                     "them and admit nothing they allow.")):
                g = GaugeMetricFamily(name, help_)
                g.add_metric([], float(st.get(key, 0)))
                yield g
            per = st.get("refused_policies")
            if per is not None:
                g = GaugeMetricFamily(
                    "fastpath_policy_refused_pods",
                    "Pods of this node a refused NetworkPolicy's rules are not written for, per "
                    "policy (only refused policies have a series).", labels=["namespace", "policy"])
                for pol, n in sorted(per.items()):
                    ns, _, name = pol.partition("/")
                    g.add_metric([ns, name], float(n))
                yield g
            if "pending" in st:
                g = GaugeMetricFamily(
                    "fastpath_policy_pending_pods",
                    "Pods of this node whose labels were not known at CNI ADD and are not yet: "
                    "they are in the policy_unknown_pod state.")
                g.add_metric([], float(st["pending"]))
                yield g

    def _counters(self, dp):
        labels = ["interface", "direction", "reason", "family"]
        fam = {
            (False, "packets"): CounterMetricFamily(
                "fastpath_forwarded_packets", "Packets fastpath's programs let through or "
                "redirected, by interface, direction, reason and address family (ipv4: IPv4 "
                "and ARP; ipv6).", labels=labels),
            (False, "bytes"): CounterMetricFamily(
                "fastpath_forwarded_bytes", "Bytes of the packets in fastpath_forwarded_packets_total.",
                labels=labels),
            (True, "packets"): CounterMetricFamily(
                "fastpath_dropped_packets", "Packets fastpath's programs dropped, by interface, "
                "direction, drop reason and address family.", labels=labels),
            (True, "bytes"): CounterMetricFamily(
                "fastpath_dropped_bytes", "Bytes of the packets in fastpath_dropped_packets_total.",
                labels=labels),
        }
        names = {idx: name for name, idx in self.agent._links().items()}
        for r in dp.maps.counters(by_family=True):
            # A deleted pod's veth keeps its counters until they are cleared;
            # its ifindex is all that is left to name it by.
            iface = names.get(r.ifindex, f"ifindex:{r.ifindex}")
            values = [iface, r.direction, r.reason, r.family]
            fam[(r.is_drop, "packets")].add_metric(values, r.packets)
            fam[(r.is_drop, "bytes")].add_metric(values, r.bytes)
        yield from fam.values()

    def _bandwidth(self, dp):
        """Per limited pod: what passed and what each limit dropped, its
        limits and its counted connections; the manager's state."""
        from agent.bandwidth import limits_of
        from agent.bandwidth.encode import LIMIT_FIELDS
        bw = getattr(self.agent, "bandwidth", None)
        st = bw.status if bw is not None else None
        on = GaugeMetricFamily("fastpath_bandwidth_enabled", "1 while the bandwidth manager "
                               "limits pods (the kernel supports it and the config asks).")
        on.add_metric([], 1.0 if st is not None and st.enabled else 0.0)
        rejected = GaugeMetricFamily(
            "fastpath_bandwidth_rejected_annotations", "Pod limit annotations rejected (bad "
            "value, or a burst without its rate); those limits are not applied.")
        rejected.add_metric([], float(len(st.problems)) if st is not None else 0.0)
        yield from (on, rejected)
        names = {ep.pod_key: f"{ep.pod_namespace}/{ep.pod_name}".strip("/") or ep.ip or ep.ip6
                 for ep in self.agent._endpoint_list()}
        pkts = CounterMetricFamily(
            "fastpath_bandwidth_packets", "Packets of limited pods, by pod, direction "
            "(egress: sent, ingress: delivered) and reason (passed, or the limit that dropped "
            "them).", labels=["pod", "direction", "reason"])
        byts = CounterMetricFamily(
            "fastpath_bandwidth_bytes", "Bytes of the packets in "
            "fastpath_bandwidth_packets_total.", labels=["pod", "direction", "reason"])
        for r in dp.bandwidth.counters():
            labels = [names.get(r["ip"], r["ip"]), r["direction"], r["reason"]]
            pkts.add_metric(labels, r["packets"])
            byts.add_metric(labels, r["bytes"])
        limit = GaugeMetricFamily(
            "fastpath_bandwidth_limit", "A limited pod's limits, by direction and kind "
            "(bits_per_second, packets_per_second, connections).",
            labels=["pod", "direction", "kind"])
        conns = GaugeMetricFamily(
            "fastpath_bandwidth_connections", "TCP connections counted against a pod's "
            "connection limit, by direction.", labels=["pod", "direction"])
        states = dp.bandwidth.states()
        for ip, e in dp.bandwidth.entries().items():
            lim = limits_of({f: e.limits[f] for f in LIMIT_FIELDS})
            pod = names.get(ip, ip)
            for d in ("egress", "ingress"):
                for kind, field in (("bits_per_second", "bps"), ("packets_per_second", "pps"),
                                    ("connections", "max_conns")):
                    v = getattr(lim, f"{d}_{field}")
                    if v is not None:
                        limit.add_metric([pod, d, kind], float(v))
                if getattr(lim, f"{d}_max_conns") is not None and ip in states:
                    s_ = states[ip]
                    n = (s_[f"{d}_conns_opened"] - s_[f"{d}_conns_closed"]
                         - getattr(e, f"{d}_reaped"))
                    conns.add_metric([pod, d], float(max(n, 0)))
        yield from (pkts, byts, limit, conns)

    def _maps(self, dp):
        from agent.datapath import libbpf
        from agent.datapath.loader import pinned_map_names
        entries = GaugeMetricFamily("fastpath_map_entries",
                                    "Entries in each of fastpath's pinned BPF maps.", labels=["map"])
        capacity = GaugeMetricFamily("fastpath_map_max_entries",
                                     "Capacity (max_entries) of each pinned BPF map.", labels=["map"])
        pressure = GaugeMetricFamily(
            "fastpath_map_pressure_ratio",
            "Entries / max_entries of each pinned BPF map; a full hash map refuses new entries "
            "(an LRU map evicts the oldest).", labels=["map"])
        conntrack = GaugeMetricFamily(
            "fastpath_conntrack_entries", "Conntrack entries, by protocol and direction "
            "(forward: client to Service; reply: backend to client; policy: a flow admitted "
            "by NetworkPolicy), over the established, new and policy maps of both families.",
            labels=["protocol", "direction"])
        from agent.datapath.maps import MAP
        ct_names = {MAP["FP_MAP_CT"], MAP["FP_MAP_CT_NEW"], MAP["FP_MAP_CT_POLICY"],
                    MAP["FP_MAP_CT6"], MAP["FP_MAP_CT_NEW6"]}
        ct6_name = MAP["FP_MAP_CT_POLICY6"]
        tally = tally6 = None
        counts: dict = {}
        for name in pinned_map_names():
            table = dp.module.table(name)
            fd = table.map_fd
            info = libbpf.map_info(fd)
            if info.type in ARRAY_TYPES:
                continue     # arrays cannot fill up; a ring buffer has no entries
            if name in ct_names:
                tally = ConntrackTally(table.Key, counts)
            if name == ct6_name:
                tally6 = ConntrackTally(table.Key, counts)
            n = count_keys(fd, info.key_size, info.max_entries,
                           tally if name in ct_names else tally6 if name == ct6_name else None)
            entries.add_metric([name], n)
            capacity.add_metric([name], info.max_entries)
            pressure.add_metric([name], n / info.max_entries if info.max_entries else 0.0)
        tally = tally or tally6       # one `counts`, shared by both
        if tally is not None:
            for proto, direction, k in tally.rows():
                conntrack.add_metric([proto, direction], k)
        events = CounterMetricFamily(
            "fastpath_conntrack_events", "Conntrack events in the datapath, summed over CPUs: "
            "flows created, promoted to the established map (TCP handshake done, or a reply "
            "seen), promotion-failed-full (the established map was full: the flow stays in "
            "the LRU map of new flows, where new flows can evict it), demoted (reset: "
            "moved back to the LRU map), related-icmp (ICMP errors translated back for their flow), "
            "fragment-followed (fragments that took their first fragment's verdict).",
            labels=["event"])
        for label, n in dp.lb.ct_events().items():
            events.add_metric([label], n)
        yield from (entries, capacity, pressure, conntrack, events)


class AgentMetrics:
    def __init__(self, agent, registry: CollectorRegistry | None = None):
        from agent.k8s.metrics import K8sMetrics
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        # CPU and memory of the agent itself: what DataPath V2 is known to
        # cost per node (about 0.5 core, 512 MB) is the figure to beat.
        ProcessCollector(registry=r)
        self.k8s = K8sMetrics.for_registry(r)
        self.cni_requests = Counter(
            "fastpath_cni_requests_total",
            "CNI requests handled by the agent, by command (ADD, DEL) and result (ok, "
            "unknown for a DEL of an endpoint the agent does not know, else the error code).",
            ["command", "result"], registry=r)
        self.cni_seconds = Histogram(
            "fastpath_cni_request_duration_seconds",
            "Time the agent took for a CNI request (discovery, attach, map writes).",
            ["command"], buckets=CNI_BUCKETS, registry=r)
        self.endpoints = Gauge("fastpath_endpoints", "Pod endpoints the agent has registered.",
                               registry=r)
        self.endpoints.set_function(lambda: len(agent.endpoints))
        # what the endpoint maps hold per family: a dual-stack pod has one
        # address of each, an IPv4-only pod none of IPv6
        self.endpoint_addresses = Gauge(
            "fastpath_endpoint_addresses", "Addresses of the registered pod endpoints, by "
            "address family (ipv4, ipv6).", ["family"], registry=r)
        self.endpoint_addresses.labels("ipv4").set_function(
            lambda: sum(1 for e in list(agent.endpoints.values()) if getattr(e, "ip", "")))
        self.endpoint_addresses.labels("ipv6").set_function(
            lambda: sum(1 for e in list(agent.endpoints.values()) if getattr(e, "ip6", "")))
        self.ready = Gauge("fastpath_agent_ready",
                           "1 once the agent has started (maps loaded, programs attached, "
                           "endpoints restored, API served), else 0.", registry=r)
        self.ready.set_function(lambda: 1.0 if agent.ready.is_set() else 0.0)
        self.starts = Counter(
            "fastpath_agent_starts_total",
            "Agent starts on this node since its state dir was created (a restart adds one).",
            registry=r)
        self.start_seconds = Gauge("fastpath_agent_start_duration_seconds",
                                   "Time the last start took until the agent was ready.",
                                   registry=r)
        self.restored = Gauge(
            "fastpath_agent_restored_endpoints",
            "Endpoints the last start found in its state dir, by result: restored, or removed "
            "because their veth was gone (or no state claimed their map entry).",
            ["result"], registry=r)
        self.replayed = Gauge("fastpath_agent_replayed_cni_deletions",
                              "CNI deletions queued while the agent was down, replayed by the "
                              "last start.", registry=r)
        self.migrations = Gauge(
            "fastpath_agent_map_migrations",
            "Pinned maps the last start had to migrate: resized (capacity changed, entries "
            "carried over), migrated (layout or version changed, entries carried over field "
            "by field), rebuilt (layout unknown, entries rebuilt from agent state), removed "
            "(no map of its lineage any more).", ["action"], registry=r)
        for action in ("resized", "migrated", "rebuilt", "removed"):
            self.migrations.labels(action=action).set(0)
        self.restored_services = Gauge(
            "fastpath_agent_restored_services",
            "Service frontends the last start found in the pinned service maps (kept "
            "forwarding, then reconciled against cluster state without a flush).", registry=r)
        self.restored_conntrack = Gauge(
            "fastpath_agent_restored_conntrack_entries",
            "Conntrack entries the last start found in (or carried over into) the pinned "
            "conntrack maps: translated flows that keep their backend across the restart, and "
            "flows NetworkPolicy admitted.", registry=r)
        self.sync_seconds = Histogram(
            "fastpath_sync_duration_seconds",
            "Time to bring the datapath maps of one object kind in line with cluster state "
            "(plan and map writes), per sync.", ["kind"], buckets=SYNC_BUCKETS, registry=r)
        self.sync_errors = Counter(
            "fastpath_sync_errors_total",
            "Syncs of the maps of one object kind that failed; the maps keep their previous "
            "state and the next change retries from a full rebuild.", ["kind"], registry=r)
        self.sync_ops = Counter(
            "fastpath_sync_map_operations_total",
            "Map operations made by syncs of one object kind (for Services: a backend, a run "
            "of slots, a service entry, or the delete of one).", ["kind"], registry=r)
        self.gc_runs = Counter(
            "fastpath_conntrack_gc_runs_total",
            "Garbage-collection sweeps of the conntrack map.", registry=r)
        self.gc_deleted = Counter(
            "fastpath_conntrack_gc_deleted_entries_total",
            "Conntrack entries removed by the agent, by reason: idle (no packet for longer "
            "than the protocol's idle timeout), backend-removed (its backend left the Service).",
            ["reason"], registry=r)
        self.gc_seconds = Gauge(
            "fastpath_conntrack_gc_last_duration_seconds",
            "Time the last conntrack garbage-collection sweep took.", registry=r)
        for kind in SYNC_KINDS:
            self.sync_errors.labels(kind=kind)
            self.sync_ops.labels(kind=kind)
        for reason in ("idle", "backend-removed"):
            self.gc_deleted.labels(reason=reason)
        r.register(DatapathCollector(agent))

    def observe_sync(self, kind: str, seconds: float, ops: int = 0, ok: bool = True) -> None:
        """One sync of `kind`'s maps (the service sync; the policy sync when
        enforcement is built)."""
        self.sync_seconds.labels(kind=kind).observe(seconds)
        if ops:
            self.sync_ops.labels(kind=kind).inc(ops)
        if not ok:
            self.sync_errors.labels(kind=kind).inc()

    def observe_backend_flows_removed(self, n: int) -> None:
        if n:
            self.gc_deleted.labels(reason="backend-removed").inc(n)

    def observe_gc(self, seconds: float, idle: int) -> None:
        self.gc_runs.inc()
        self.gc_seconds.set(seconds)
        if idle:
            self.gc_deleted.labels(reason="idle").inc(idle)

    def record_restored_maps(self, datapath) -> None:
        """What the pinned service and conntrack maps held when this start
        opened them (before any reconcile)."""
        from agent.datapath import libbpf
        from agent.datapath.maps import MAP
        self.restored_services.set(len(datapath.lb.services()))
        n = 0
        for macro in ("FP_MAP_CT", "FP_MAP_CT_NEW", "FP_MAP_CT_POLICY", "FP_MAP_CT6",
                      "FP_MAP_CT_NEW6"):
            fd = datapath.module.table(MAP[macro]).map_fd
            info = libbpf.map_info(fd)
            n += count_keys(fd, info.key_size, info.max_entries)
        self.restored_conntrack.set(n)

    def count_start(self, state_dir: Path) -> int:
        """Persist one more start in the state dir and expose the total. A
        counter that cannot be read (a stray entry in its place) restarts
        from one rather than stopping the start; one that cannot be written
        is only logged."""
        path = Path(state_dir) / STARTS_FILE
        try:
            n = int(path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            n = 0
        except OSError as exc:
            log.warning("start counter %s cannot be read (%s): counting from 1", path,
                        exc.strerror)
            n = 0
        n += 1
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, f"{n}\n".encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("start counter %s cannot be written: %s", path, exc.strerror)
        self.starts.inc(n)
        return n

    def record_restore(self, restored: int, removed: int, replayed: int, notes: list[str]) -> None:
        self.restored.labels(result="restored").set(restored)
        self.restored.labels(result="removed").set(removed)
        self.replayed.set(replayed)
        # The loader's notes say what it did to each map (see loader.Migration).
        counts = {"resized": 0, "migrated": 0, "rebuilt": 0, "removed": 0}
        for note in notes:
            if "entries are rebuilt" in note:
                counts["rebuilt"] += 1
            elif note.startswith("removed stale"):
                counts["removed"] += 1
            elif "migrated" in note:
                only_size = "max " in note and not any(
                    w in note for w in ("layout", "key/value", "type ", "superseded",
                                        "interrupted"))
                counts["resized" if only_size else "migrated"] += 1
        for action, n in counts.items():
            self.migrations.labels(action=action).set(n)

    def observe_cni(self, command: str, result: str, seconds: float) -> None:
        self.cni_requests.labels(command=command, result=result).inc()
        self.cni_seconds.labels(command=command).observe(seconds)


def cni_observed(command: str):
    """Count and time an Agent API handler that serves a CNI command."""
    def wrap(fn):
        @functools.wraps(fn)
        def handler(self, *args, **kwargs):
            t0 = time.monotonic()
            result = "internal"
            try:
                out = fn(self, *args, **kwargs)
                result = "unknown" if isinstance(out, dict) and out.get("deleted") is False else "ok"
                return out
            except ApiError as exc:
                result = exc.code
                raise
            finally:
                metrics = getattr(self, "metrics", None)
                if metrics is not None:
                    metrics.observe_cni(command, result, time.monotonic() - t0)
        return handler
    return wrap


__all__ = ["AgentMetrics", "DatapathCollector", "cni_observed", "count_keys"]
