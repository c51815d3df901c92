"""Real-traffic NetworkPolicy checks: a cluster of pods, their manifests, a
prober that tries every connection, and the matrix the reference expects.

The cluster is the classic one of NetworkPolicy conformance suites:
namespaces x, y, z (labelled ns=<name>), pods a, b, c in each (labelled
pod=<name>), every pod serving TCP and UDP on ports 80 and 81. Pods are
spread over the world's nodes.

Every pod runs one small program (POD_PROGRAM) that serves those four
sockets and, on request, probes a list of targets concurrently: TCP is
connect + one request + its reply, UDP one datagram + its reply, each within
a short timeout. Servers answer "<pod> <peer address> <token>", so a probe
counts as allowed only when the right pod answered that very request.
Each prober picks its source ports itself, never repeating a 4-tuple within
a run: a probe is always a new flow, never a leftover conntrack entry of an
earlier case. The node's own netns runs the same program without servers,
to probe as kubelet does.

The expected matrix comes from tests/policy/reference.py, which reads the
same manifests (through the same parser the agent uses) and shares no code
with agent/policy.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from agent.k8s.parse import parse_object
from tests.policy.reference import reference_for

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (80, 81)
PROTOS = ("TCP", "UDP")
AUDIT_ANNOTATION = "fastpath.io/audit"
# The container port "web" is 80 on some pods and 81 on others, so a named
# port must be resolved on each destination pod.
WEB_PORT = {"a": 80, "b": 81, "c": 80}
PROGRAM_LIFETIME = 900          # seconds; a forgotten prober ends by itself


# ---------------------------------------------------------------------------
# The per-pod program: servers on 80/81 TCP+UDP, and a prober driven by JSON
# lines on stdin (one JSON answer per line on stdout).

POD_PROGRAM = r'''
import json, os, selectors, socket, sys, threading, time
ident, host, lifetime = sys.argv[1], sys.argv[2], float(sys.argv[3])
PORTS = (80, 81)
threading.Thread(target=lambda: (time.sleep(lifetime), os._exit(3)), daemon=True).start()

def serve():
    sel = selectors.DefaultSelector()
    for port in PORTS:
        t = socket.socket()
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, port)); t.listen(512); t.setblocking(False)
        sel.register(t, selectors.EVENT_READ, ("listen", None))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((host, port)); u.setblocking(False)
        sel.register(u, selectors.EVENT_READ, ("udp", None))
    while True:
        for key, _ in sel.select():
            kind, peer = key.data
            s = key.fileobj
            if kind == "listen":
                try:
                    c, peer = s.accept()
                except OSError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, ("tcp", peer))
            elif kind == "udp":
                try:
                    data, peer = s.recvfrom(2048)
                    s.sendto(f"{ident} {peer[0]} ".encode() + data, peer)
                except OSError:
                    pass
            else:
                try:
                    data = s.recv(2048)
                except OSError:
                    data = b""
                if data:
                    try:
                        s.send(f"{ident} {peer[0]} ".encode() + data)
                        continue
                    except OSError:
                        pass
                sel.unregister(s)
                s.close()

def probe(targets, timeout, src):
    """targets: [ip, port, proto, sport, token]; answer per target: the reply,
    or "timeout" / "refused" / "error:<errno name>"."""
    sel = selectors.DefaultSelector()
    out = ["timeout"] * len(targets)
    socks = []
    for i, (ip, port, proto, sport, token) in enumerate(targets):
        try:
            if proto == "TCP":
                s = socket.socket()
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((src, sport))
            s.setblocking(False)
            if proto == "TCP":
                s.connect_ex((ip, port))
                sel.register(s, selectors.EVENT_WRITE, [i, "connect", token])
            else:
                s.connect((ip, port))
                s.send(token.encode())
                sel.register(s, selectors.EVENT_READ, [i, "reply", token])
        except OSError as e:
            out[i] = "error:" + (os.strerror(e.errno) if e.errno else str(e))
    deadline = time.monotonic() + timeout
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, _ in sel.select(left):
            i, state, token = key.data
            s = key.fileobj
            try:
                if state == "connect":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send(token.encode())
                    key.data[1] = "reply"
                    sel.modify(s, selectors.EVENT_READ, key.data)
                    continue
                data = s.recv(2048)
                out[i] = data.decode(errors="replace") if data else "closed"
            except ConnectionRefusedError:
                out[i] = "refused"
            except OSError as e:
                out[i] = "error:" + (os.strerror(e.errno) if e.errno else str(e))
            sel.unregister(s)
    for s in socks:
        s.close()
    return out

conns = {}
if host:
    threading.Thread(target=serve, daemon=True).start()
src = host or "0.0.0.0"
print(json.dumps({"ready": ident}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    try:
        if op == "probe":
            res = {"results": probe(req["targets"], req["timeout"], src)}
        elif op == "open":
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((src, req["sport"]))
            s.settimeout(req["timeout"])
            s.connect((req["ip"], req["port"]))
            conns[req["name"]] = s
            res = {"ok": True}
        elif op == "ask":
            s = conns[req["name"]]
            s.settimeout(req["timeout"])
            s.send(req["token"].encode())
            data = s.recv(2048)
            res = {"reply": data.decode(errors="replace") if data else "closed"}
        elif op == "close":
            conns.pop(req["name"]).close()
            res = {"ok": True}
        else:
            res = {"error": f"unknown op {op}"}
    except (OSError, KeyError) as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res), flush=True)
'''


class Prober:
    """The program above running in one netns (a pod, or a node)."""

    def __init__(self, ns, ident: str, serve_ip: str = ""):
        self.ns, self.ident = ns, ident
        self.proc = ns.popen([sys.executable, "-u", "-c", POD_PROGRAM, ident, serve_ip,
                              str(PROGRAM_LIFETIME)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._sport = 20000
        self.ready = False

    def next_sport(self) -> int:
        self._sport = 20000 if self._sport >= 60000 else self._sport + 1
        return self._sport

    def send(self, req: dict) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"prober {self.ident} did not answer within {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"prober {self.ident} exited ({self.proc.poll()})")
        return json.loads(line)

    def wait_ready(self, timeout: float = 20) -> None:
        if not self.ready:
            got = self.recv(timeout)
            assert got.get("ready") == self.ident, got
            self.ready = True

    def call(self, req: dict, timeout: float = 10) -> dict:
        self.send(req)
        return self.recv(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# The cluster: manifests the agents read, and the objects the reference reads.

@dataclass
class PodInfo:
    ns: str
    name: str
    labels: dict
    sim: object                  # the agent.sim Pod
    node: str

    @property
    def key(self) -> str:
        return f"{self.ns}/{self.name}"

    @property
    def ip(self) -> str:
        return self.sim.ip


def pod_manifest(p: PodInfo) -> dict:
    ports = [{"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
             for port in PORTS for proto in PROTOS]
    ports.append({"name": "web", "containerPort": WEB_PORT[p.name], "protocol": "TCP"})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": p.ns, "name": p.name, "labels": dict(p.labels)},
            "spec": {"nodeName": p.node,
                     "containers": [{"name": "server", "image": "probe", "ports": ports}]},
            "status": {"phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}]}}


def namespace_manifest(name: str, labels: Optional[dict] = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels if labels is not None else {"ns": name}}}


def node_manifest(node) -> dict:
    addrs = [{"type": "InternalIP", "address": node.ip}]
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name},
            "status": {"addresses": addrs}}


def netpol(ns: str, name: str, spec: dict, audit: bool = False) -> dict:
    spec = dict(spec)
    spec.setdefault("podSelector", {})
    md: dict = {"namespace": ns, "name": name}
    if audit:
        md["annotations"] = {AUDIT_ANNOTATION: "true"}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": md,
            "spec": spec}


def node_addresses(node) -> list[str]:
    """Every IPv4 address the node's netns holds (eth0 and its ENIs)."""
    return [node.ip] + [e.ip for e in node.enis]


@dataclass
class Cluster:
    """Pods of the simulated world as Kubernetes objects, and the agents that
    read them (one manifest directory per node)."""
    nodes: list
    pods: dict[str, PodInfo]                   # "ns/name" -> PodInfo
    manifest_dirs: list[str]
    ns_labels: dict[str, dict] = field(default_factory=dict)
    policies: list[dict] = field(default_factory=list)
    _written: int = 0
    _last_text: str = ""

    def objects(self) -> list[dict]:
        out = [namespace_manifest(n, self.ns_labels.get(n)) for n in NAMESPACES]
        out += [node_manifest(n) for n in self.nodes]
        out += [pod_manifest(p) for p in self.pods.values()]
        return out + list(self.policies)

    def write(self) -> bool:
        """Replace the manifests of every node's source: one file, renamed
        into place, so a source applies the whole case in one step. Returns
        whether anything changed."""
        text = json.dumps({"apiVersion": "v1", "kind": "List", "items": self.objects()},
                          sort_keys=True)
        if text == self._last_text:
            return False
        self._last_text = text
        self._written += 1
        for d in self.manifest_dirs:
            tmp = os.path.join(d, f".cluster.json.{self._written}.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(d, "cluster.json"))
        return True

    def model_objects(self) -> list:
        return [parse_object(d, default_namespace="default") for d in self.objects()]

    def audited(self) -> set[tuple[str, str]]:
        return {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in self.policies
                if p["metadata"].get("annotations", {}).get(AUDIT_ANNOTATION) == "true"}

    def reference(self, mode: str = "default", include_audited: bool = False):
        return reference_for(self.model_objects(),
                             {n.name: node_addresses(n) for n in self.nodes},
                             mode=mode, audited=self.audited(), include_audited=include_audited)


# ---------------------------------------------------------------------------
# Matrices

Cell = tuple[str, str, str, int]        # (source, destination, protocol, port)


@dataclass
class Matrix:
    sources: list[str]                  # pod keys, then "node:<name>"
    destinations: list[str]             # pod keys
    allowed: dict[Cell, bool]
    detail: dict[Cell, str] = field(default_factory=dict)   # what the probe saw


def expected_matrix(cluster: Cluster, sources: dict[str, str], mode: str = "default",
                    include_audited: bool = False) -> Matrix:
    """sources: label -> source address (pods' IPs, nodes' addresses as the
    kernel picks them)."""
    ref = cluster.reference(mode, include_audited)
    dsts = list(cluster.pods)
    allowed = {}
    for s, sip in sources.items():
        for d in dsts:
            dip = cluster.pods[d].ip
            for proto in PROTOS:
                for port in PORTS:
                    allowed[(s, d, proto, port)] = ref.allows(sip, dip, proto, port)
    return Matrix(list(sources), dsts, allowed)


def probe_matrix(probers: dict[str, Prober], cluster: Cluster, *, timeout: float = 1.0,
                 retry_timeout: float = 2.0) -> Matrix:
    """Every source tries every (pod, protocol, port) at once; what failed is
    tried once more with a longer timeout (a loaded machine may miss the
    first), each attempt a new flow."""
    dsts = list(cluster.pods)
    cells = [(s, d, proto, port) for s in probers for d in dsts for proto in PROTOS for port in PORTS]
    allowed = {c: False for c in cells}
    detail = {c: "not probed" for c in cells}
    todo = cells
    for attempt, tmo in enumerate((timeout, retry_timeout)):
        by_src: dict[str, list[tuple[Cell, str]]] = {}
        for c in todo:
            by_src.setdefault(c[0], []).append((c, f"{c[0]}>{c[1]}/{c[2]}{c[3]}#{attempt}"))
        for s, items in by_src.items():
            pr = probers[s]
            pr.send({"op": "probe", "timeout": tmo,
                     "targets": [[cluster.pods[c[1]].ip, c[3], c[2], pr.next_sport(), tok]
                                 for c, tok in items]})
        for s, items in by_src.items():
            res = probers[s].recv(tmo + 15)["results"]
            for (c, tok), r in zip(items, res):
                ok = r.startswith(f"{c[1]} ") and r.endswith(tok)
                allowed[c] = ok
                detail[c] = "ok" if ok else r
        todo = [c for c in todo if not allowed[c]]
        if not todo:
            break
    return Matrix(list(probers), dsts, allowed, detail)


def render(expected: Matrix, observed: Matrix) -> tuple[list[str], str]:
    """(mismatch lines, tables): '.' allowed as expected, '-' denied as
    expected, 'X' expected allowed but denied, '!' expected denied but allowed."""
    mism = []
    tables = []
    w = max(len(s) for s in expected.sources) + 1
    for proto in PROTOS:
        for port in PORTS:
            lines = [f"{proto}/{port}".ljust(w) + " ".join(d.rjust(3) for d in expected.destinations)]
            for s in expected.sources:
                row = []
                for d in expected.destinations:
                    c = (s, d, proto, port)
                    e, o = expected.allowed[c], observed.allowed[c]
                    row.append({(True, True): ".", (False, False): "-",
                                (True, False): "X", (False, True): "!"}[(e, o)])
                    if e != o:
                        mism.append(f"{s} -> {d} {proto}/{port}: expected "
                                    f"{'allowed' if e else 'denied'}, observed "
                                    f"{'allowed' if o else 'denied'} ({observed.detail.get(c)})")
                lines.append(s.ljust(w) + " ".join(x.rjust(3) for x in row))
            tables.append("\n".join(lines))
    return mism, "\n\n".join(tables)


def assert_matrix(expected: Matrix, observed: Matrix, case: str) -> None:
    mism, tables = render(expected, observed)
    if mism:
        raise AssertionError(
            f"{case}: {len(mism)} of {len(expected.allowed)} probes differ from the reference\n"
            + "\n".join(mism[:80]) + ("\n..." if len(mism) > 80 else "")
            + "\n\n('.' allowed, '-' denied, as expected; 'X' should pass but was dropped, "
              "'!' should be dropped but passed)\n" + tables)


def summary(m: Matrix) -> str:
    n = sum(m.allowed.values())
    return f"{n} allowed / {len(m.allowed) - n} denied"


# ---------------------------------------------------------------------------
# The agents

def wait_until(cond, what: str, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Exception as e:          # an agent briefly busy
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def counters(socket_path: str) -> list[dict]:
    from agent.api import wire
    return wire.call(socket_path, "Counters")


def drops_by_reason(sockets: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in sockets:
        for r in counters(s):
            out[r["reason"]] = out.get(r["reason"], 0) + int(r["packets"])
    return out


def policy_verdicts(bpffs_root: str, grpc_socket: str) -> dict[tuple[str, str, str], int]:
    """(policy name, direction, verdict) -> new flows, from one agent's
    per-policy verdict counters (its pinned map, decoded as `fastpath map
    dump` does) and its names for policy ids (`PolicyNames`)."""
    from agent.api.inspect import Client
    from agent.model.bpfdefs import load
    from agent.datapath import libbpf, pinned, tables
    from agent.datapath.maps import MAP
    from agent.inspect import decode
    defs = load().defines
    labels = {defs["FP_PV_ALLOW"]: "allow", defs["FP_PV_DENY"]: "deny",
              defs["FP_PV_AUDIT_DENY"]: "audit-would-deny"}
    dirs = {defs["FP_POL_INGRESS"]: "Ingress", defs["FP_POL_EGRESS"]: "Egress"}
    name = MAP["FP_MAP_POLICY_CNT"]
    m = pinned.open_map(bpffs_root, name)
    try:
        schema, key, value = tables.map_schema(m.fd)      # as the CLI: the map's own BTF
        layout = decode.Layout.of_schema(name, key, value, schema)
        ncpu = libbpf.possible_cpus() if m.percpu else 1
        entries = [decode.decode_entry(layout, k, v, m.percpu, ncpu) for k, v in m.items()]
    finally:
        os.close(m.fd)
    client = Client(grpc_socket)
    try:
        names = {int(k): v for k, v in client.call("PolicyNames").items()}
    finally:
        client.close()
    out: dict[tuple[str, str, str], int] = {}
    for e in entries:
        k = e["key"]
        key = (names.get(k["policy_id"], f"id {k['policy_id']}"), dirs[k["dir"]],
               labels.get(k["verdict"], str(k["verdict"])))
        out[key] = out.get(key, 0) + int(e["value"]["packets"])
    return out


def verdict_delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


def deciding_policies(cluster: Cluster, sources: dict[str, str], exp: Matrix,
                      mode: str = "default") -> list[tuple[Cell, str, set[str]]]:
    """For each denied cell: the direction that denies it and the policies
    that isolate that end in that direction (any one of them may be named
    as the decider), from the reference."""
    ref = cluster.reference(mode)
    out = []
    for c, ok in exp.allowed.items():
        if ok:
            continue
        s, d, proto, port = c
        sip, dip = sources[s], cluster.pods[d].ip
        src, dst = ref.pod_at(sip), ref.pod_at(dip)
        if src is not None and not ref.one_side(src, "Egress", dip, proto, port):
            side, pod = "Egress", src
        else:
            side, pod = "Ingress", dst
        names = {f"{p.namespace}/{p.name}" for p in ref.policies_for(pod, side)}
        if not names and mode == "always":
            names = {"reserved:mode-always"}
        out.append((c, side, names))
    return out
