"""The agent's gRPC inspection service, for the `fastpath` CLI.

Service `fastpath.v1.Inspect` on a unix socket (config `grpc_socket`).
Every method is unary; requests and replies are JSON objects (generic
handlers with JSON (de)serializers, no generated code). Methods answer
what only the agent knows; the CLI reads the pinned maps itself.

  Status    {}                  health, config in force, source sync state
  Endpoints {}                  the pods the agent registered (names, veths)
  Links     {}                  ifindex -> name in the node's netns
  Services  {}                  frontend -> Service name, port name, backend states
  Policy    {"endpoint": str}   effective rules of a pod, traced to policies
  PolicyNames {}                policy id -> namespace/name ({} without policy state)
  Bandwidth {}                  the bandwidth manager's status, rejected annotations,
                                every limited pod's limits
  Logs      {"lines": int}      the agent's recent log lines

Errors: NOT_FOUND for an unknown object, FAILED_PRECONDITION when the
agent does not have that state (e.g. no policy compiled), INTERNAL else.
The framed JSON API (agent/api/wire.py) stays the CNI plugin's.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading

SERVICE = "fastpath.v1.Inspect"
METHODS = ("Status", "Endpoints", "Links", "Services", "Policy", "PolicyNames", "Logs",
           "Bandwidth")

log = logging.getLogger("fastpath.api")


def _ser(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def _de(data: bytes):
    return json.loads(data.decode() or "{}") if data else {}


class InspectError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code            # not-found, unavailable, failed-precondition


class LogRing(logging.Handler):
    """The agent's last log lines, for `fastpath bugtool`."""

    def __init__(self, capacity: int = 2000):
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
        except Exception:
            pass


class InspectServer:
    """Serves `handler.inspect_<Method>(**request)` for each method."""

    def __init__(self, path: str, handler):
        self.path = path
        self.handler = handler
        self._server = None

    def start(self) -> "InspectServer":
        import grpc
        from concurrent import futures

        def wrap(name):
            fn = getattr(self.handler, f"inspect_{name}")

            def call(request, context):
                try:
                    return fn(**(request or {}))
                except InspectError as exc:
                    code = {"not-found": grpc.StatusCode.NOT_FOUND,
                            "failed-precondition": grpc.StatusCode.FAILED_PRECONDITION,
                            "invalid-argument": grpc.StatusCode.INVALID_ARGUMENT,
                            }.get(exc.code, grpc.StatusCode.UNAVAILABLE)
                    context.abort(code, str(exc))
                except TypeError as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                except Exception as exc:   # the agent must survive any request
                    log.exception("inspect %s failed", name)
                    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=_de,
                                                       response_serializer=_ser)

        handlers = {m: wrap(m) for m in METHODS}
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)         # a previous agent's socket
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4,
                                                        thread_name_prefix="inspect"))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE,
                                                                              handlers),))
        server.add_insecure_port(f"unix:{self.path}")
        server.start()
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait(2)
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class AgentUnreachable(Exception):
    pass


class RemoteFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Client:
    """The CLI's side: one channel, one call per method."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self._channel = None

    def call(self, method: str, **request):
        if not os.path.exists(self.path):
            raise AgentUnreachable(f"no agent socket at {self.path}")
        import grpc
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.path}")
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=_ser,
                                         response_deserializer=_de)
        try:
            return stub(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                detail = exc.details() or ""
                why = ("connection refused" if "refused" in detail.lower() else
                       "timed out" if code == grpc.StatusCode.DEADLINE_EXCEEDED else detail[:120])
                raise AgentUnreachable(f"the agent does not answer on {self.path} ({why})") from None
            raise RemoteFailure(code.name.lower().replace("_", "-"), exc.details()) from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


# -- the agent's side ---------------------------------------------------------

class AgentInspect:
    """The methods, over a running Agent (agent/daemon/agent.py)."""

    def __init__(self, agent, logs: LogRing | None = None):
        self.agent = agent
        self.logs = logs

    def inspect_Status(self) -> dict:
        from agent.config import describe
        a = self.agent
        st = a.rpc_Status()
        st["config"] = {r["key"]: r["value"] for r in describe(a.config)}
        st["config_sources"] = {r["key"]: r["source"] for r in describe(a.config)}
        st["migration_notes"] = list(a.datapath.migration_notes)
        svc = a.services
        st["services"] = ({"plans": svc.plans, "errors": svc.errors,
                           "applied_version": svc.applied_version,
                           "last_plan_ops": svc.last_plan_ops,
                           "frontends": len(svc.table.desired) if svc.table else 0,
                           **svc.status(),
                           "nodeport_addresses": list(svc.addresses.nodeport),
                           "host_ports": {f"{o[0]}/{o[1]}": [str(m) for m in ms]
                                          for o, (_, ms) in svc.host_ports().items()},
                           "health_check_node_ports": (
                               {f"{ip}:{port}": f"{k[0]}/{k[1]}" for (ip, port), k
                                in a.healthchecks.ports().items()}
                               if getattr(a, "healthchecks", None) else {})}
                          if svc is not None else None)
        if a.store is not None:
            st["source"]["store_version"] = a.store.snapshot().version
        pol = dict(st.get("policy") or {})
        pol["enforcement"] = a.config.policy_enforcement
        pol["compiled"] = _policy_state(a) is not None
        st["policy"] = pol
        return st

    def inspect_Endpoints(self) -> list[dict]:
        return self.agent.rpc_EndpointList()

    def inspect_Links(self) -> dict:
        return {str(k): v for k, v in _links(self.agent.netns).items()}

    def inspect_Services(self) -> list[dict]:
        svc = self.agent.services
        if svc is None or svc.table is None:
            return []
        out = []
        desired = dict(svc.table.desired)
        for fe in svc.hostports.frontends():
            st = svc.hostports.combine(fe, desired.get(fe))
            if st is not None:
                desired[fe] = st
        for fe, st in list(desired.items()):
            out.append({
                "vip": fe.ip, "port": fe.port, "proto": fe.protocol,
                "scope": "external" if fe.scope else "internal",
                "service": f"{st.service[0]}/{st.service[1]}", "port_name": st.port_name,
                "kind": st.kind, "topology": st.topology, "local_only": st.local_only,
                "reject": st.reject, "drop": st.drop, "maglev": st.maglev,
                "source_ranges": list(st.source_ranges),
                "affinity_timeout": st.affinity_timeout,
                "backends": [{"ip": b.ip, "port": b.port, "proto": b.protocol,
                              "state": "terminating" if b.terminating else "ready",
                              "node": b.node_name, "zone": b.zone} for b in st.backends],
            })
        return out

    def inspect_Policy(self, endpoint: str = "") -> dict:
        from agent.inspect import policy as pview
        state = _policy_state(self.agent)
        if state is None:
            raise InspectError("failed-precondition",
                               "the agent holds no compiled NetworkPolicy state (policy_enforcement "
                               f"is {self.agent.config.policy_enforcement!r}, or the first sync "
                               "has not completed)")
        snap = self.agent.store.snapshot() if self.agent.store is not None else None
        try:
            view = pview.endpoint_rules(state, endpoint, snap)
        except KeyError as exc:
            raise InspectError("not-found", str(exc.args[0])) from None
        from agent.policy.pending import is_pending
        view["pending"] = is_pending(state.endpoints[view["ip"]])
        return view

    def inspect_PolicyNames(self) -> dict:
        state = _policy_state(self.agent)
        return {str(k): v for k, v in state.policies.items()} if state is not None else {}

    def inspect_Bandwidth(self) -> dict:
        return self.agent.rpc_Bandwidth()

    def inspect_Logs(self, lines: int = 500) -> list[str]:
        if self.logs is None:
            return []
        return list(self.logs.lines)[-int(lines):]


def _policy_state(agent):
    """The compiled PolicyState the agent enforces (None: off or not synced)."""
    sync = getattr(agent, "policy", None)
    return getattr(sync, "state", None) if sync is not None else None


def _links(netns) -> dict[int, str]:
    from agent.datapath.netlink import link_names
    return link_names(netns)


_ring_lock = threading.Lock()
_ring: LogRing | None = None


def log_ring() -> LogRing:
    """One process-wide ring on the root logger."""
    global _ring
    with _ring_lock:
        if _ring is None:
            _ring = LogRing()
            logging.getLogger().addHandler(_ring)
        return _ring


def start_for(agent, path: str) -> InspectServer:
    return InspectServer(path, AgentInspect(agent, log_ring())).start()
