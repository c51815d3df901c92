"""A new pod is isolated from the first packet after its CNI ADD returns.

    node n1:  prober (ns probe)      new pod (ns locked or open), made by the
              sends UDP in a tight   CNI chain: the Terway stand-in, then
              loop, a new flow each  fastpath-cni as the runtime runs them

A pod whose namespace has a default-deny policy must not answer anyone
(but the node) once `fastpath-cni` ADD has returned: the agent learns the
pod's labels (its store, else it asks its source for that one Pod) and
writes its policy entries before ADD returns. The prober starts before ADD
and probes every 2 ms with a fresh source port (never a leftover flow); the
pod's echo server runs from before ADD too, so probes before ADD are
answered (the prober and the pod work) and every probe sent after ADD
returned must go unanswered. When the labels cannot be had, the pod starts
in the safe state (deny-ingress) and converges once its Pod arrives.
Sources: a manifest directory, and the Kubernetes API (fake server on the
node's loopback).
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from agent.api import wire
from agent.sim import manifests as m
from agent.sim import plan
from agent.sim.netns import sh
from agent.sim.agent import NodeAgent, private_paths
from chainer.testing import CniRuntime, install_plugins, terway_conflist
from fastpath_helpers import wait_for

PORT = 7777
ECHO = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", %d))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
""" % PORT

# Probes `ip` every `gap` seconds for `seconds`, each from a port of its own
# (a new flow); prints one JSON list: [sent (CLOCK_MONOTONIC), answered].
PROBER = r"""
import json, select, socket, sys, time
ip, seconds, gap = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
socks, out, port = {}, [], 21000
end = time.monotonic() + seconds
print("ready", flush=True)
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); port += 1
    s.setblocking(False)
    t = time.monotonic()
    try:
        s.sendto(str(len(out)).encode(), (ip, %d))
    except OSError:
        pass
    socks[s] = len(out)
    out.append([t, False])
    stop = time.monotonic() + gap
    while True:
        left = stop - time.monotonic()
        r, _, _ = select.select(list(socks), [], [], max(0, left))
        for s2 in r:
            try:
                s2.recv(64)
                out[socks[s2]][1] = True
            except OSError:
                pass
            del socks[s2]; s2.close()
        if left <= 0:
            break
    for s2 in [x for x, i in socks.items() if out[i][0] < time.monotonic() - 1.0]:
        del socks[s2]; s2.close()
print(json.dumps(out), flush=True)
""" % PORT


@contextlib.contextmanager
def cni_world(world, *agent_args, env=None):
    node = world.add_node("n1", enis=1)
    with private_paths() as paths:
        bin_dir = str(install_plugins(f"{paths.root}/bin"))
        conflist = terway_conflist(agent_socket=paths.socket, state_dir=paths.state_dir,
                                   log_file=f"{paths.root}/cni.log",
                                   ipam_dir=f"{paths.root}/terway-ipam",
                                   first="10.241.1.100", last="10.241.1.250")
        yield node, paths, CniRuntime(conflist, bin_dir, node.netns)


def pod_doc(ns: str, name: str, labels: dict, ip: str | None = None) -> dict:
    doc = m.pod(ns, name, ip or "0.0.0.0", "n1", labels)
    if ip is None:
        doc["status"] = {"phase": "Pending"}      # scheduled, no address yet: as at ADD
    return doc


DENY_ALL = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "locked", "name": "default-deny"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def base_objects(prober) -> list[dict]:
    return [m.namespace("locked"), m.namespace("open"), m.namespace("probe"),
            m.pod("probe", "prober", prober.ip, "n1", {"app": "prober"}), DENY_ALL]


class NewPod:
    """A pod netns with the Terway stand-in's interface, and an echo server."""

    def __init__(self, world, runtime, ns: str, name: str):
        self.ns, self.name = ns, name
        self.netns = plan.pod_ns(world.tag, f"{ns}-{name}")
        sh(["ip", "netns", "add", self.netns])      # named after the world: it goes with it
        self.path = f"/var/run/netns/{self.netns}"
        self.cid = f"c-{ns}-{name}"
        self.args = f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"
        self.runtime = runtime
        inv = runtime.exec_plugin("terway", "ADD", json.dumps(runtime.plugin_conf(0)),
                                  self.cid, self.path, "eth0", self.args)
        assert inv.rc == 0, inv.stdout + inv.stderr
        self.prev = inv.output
        self.ip = self.prev["ips"][0]["address"].split("/")[0]
        self.echo = subprocess.Popen(["ip", "netns", "exec", self.netns, sys.executable, "-u",
                                      "-c", ECHO], stdout=subprocess.PIPE, text=True)
        assert self.echo.stdout.readline().strip() == "ready"

    def fastpath_add(self):
        conf = self.runtime.plugin_conf(1, self.prev)
        return self.runtime.exec_plugin("fastpath-cni", "ADD", json.dumps(conf), self.cid,
                                        self.path, "eth0", self.args)

    def close(self):
        self.echo.kill()
        self.echo.wait()
        sh(["ip", "netns", "del", self.netns], check=False)


def probe_around_add(prober, pod: NewPod, before: float = 0.6, after: float = 1.0,
                     just_before=None):
    """Probe `pod` from `prober`, run fastpath-cni ADD in the middle (after
    `just_before()`, if given); returns (probes, ADD started, ADD returned,
    the ADD invocation)."""
    proc = prober.popen([sys.executable, "-u", "-c", PROBER, pod.ip,
                         str(before + after + 3.0), "0.002"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(before)
    if just_before is not None:
        just_before()
    t_start = time.monotonic()
    inv = pod.fastpath_add()
    t_ret = time.monotonic()
    assert inv.rc == 0, inv.stdout + inv.stderr
    out, _ = proc.communicate(timeout=before + after + 30)
    probes = json.loads(out.strip().splitlines()[-1])
    return probes, t_start, t_ret, inv


def answered(probes, t0: float, t1: float) -> tuple[int, int]:
    """(probes sent in [t0, t1), of which answered)."""
    sent = [ok for t, ok in probes if t0 <= t < t1]
    return len(sent), sum(sent)


def check_isolated_from_add(probes, t_start, t_ret, what: str) -> None:
    n_before, ok_before = answered(probes, 0, t_start - 0.05)
    assert n_before >= 50 and ok_before >= n_before * 0.8, \
        f"{what}: the pod must answer before ADD ({ok_before}/{n_before}): the test proves nothing"
    n_first, ok_first = answered(probes, t_ret, t_ret + 0.1)
    n_after, ok_after = answered(probes, t_ret, float("inf"))
    assert n_first >= 10, f"{what}: too few probes in the first 100 ms ({n_first})"
    assert ok_first == 0, f"{what}: {ok_first} of {n_first} probes answered in the first 100 ms"
    assert ok_after == 0, f"{what}: {ok_after} of {n_after} probes answered after ADD returned"


def write_manifests(paths, objs) -> None:
    m.write(paths.manifests, "cluster.yaml", objs)


def policy_status(paths) -> dict:
    return wire.call(paths.socket, "PolicyStatus")


@contextlib.contextmanager
def enforcing_agent(node, paths, prober, *args: str):
    """`fastpath agent` enforcing NetworkPolicy, the prober registered and
    the first plan applied; stopped on the way out."""
    agent = NodeAgent(node, paths, ["--policy-enforcement", "default", *args]).start()
    try:
        agent.register(prober)
        wait_for(lambda: policy_status(paths)["plans"] > 0, "the first plan")
        yield agent
    finally:
        agent.stop()


def test_a_new_pod_of_a_default_deny_namespace_answers_nobody_once_add_returns(world):
    with cni_world(world) as (node, paths, runtime):
        prober = node.add_pod("prober")
        new = None
        # the Pod is scheduled (labels known, no address yet), as at ADD time
        objs = base_objects(prober) + [pod_doc("locked", "web", {"app": "web"})]
        write_manifests(paths, objs)
        with enforcing_agent(node, paths, prober) as agent:
            try:
                new = NewPod(world, runtime, "locked", "web")
                probes, t_start, t_ret, inv = probe_around_add(prober, new)
                check_isolated_from_add(probes, t_start, t_ret, "pod known to the store")
                log = agent.log.read_text()
                assert "locked/web" in log and "policy=compiled (labels: store)" in log, \
                    log[-2000:]
                # the node still reaches it (kubelet probes)
                r = node.run([sys.executable, "-c",
                              "import socket; s=socket.socket(2,2); s.settimeout(2); "
                              f"s.sendto(b'k',('{new.ip}',{PORT})); print(s.recv(9))"],
                             check=False)
                assert "b'k'" in r.stdout, r.stdout + r.stderr
            finally:
                if new is not None:
                    new.close()


def test_a_pod_whose_labels_are_unknown_starts_denied_and_converges_when_its_pod_arrives(world):
    with cni_world(world) as (node, paths, runtime):
        prober = node.add_pod("prober")
        new = None
        write_manifests(paths, base_objects(prober))      # no Pod for it anywhere
        with enforcing_agent(node, paths, prober) as agent:
            try:
                new = NewPod(world, runtime, "open", "late")
                probes, t_start, t_ret, inv = probe_around_add(prober, new)
                check_isolated_from_add(probes, t_start, t_ret, "pod with unknown labels")
                assert policy_status(paths)["pending"] == ["open/late"]
                assert "policy=pending" in agent.log.read_text()
                # its Pod arrives (namespace open has no policy): it converges, open
                write_manifests(paths, base_objects(prober)
                                + [pod_doc("open", "late", {"app": "late"}, new.ip)])
                wait_for(lambda: policy_status(paths)["pending"] == [], "the pod to converge")
                probes, _, _, _ = probe_for(prober, new, 0.5)
                assert sum(ok for _, ok in probes) >= len(probes) * 0.8, "converged pod unreachable"
            finally:
                if new is not None:
                    new.close()


def probe_for(prober, pod, seconds):
    proc = prober.popen([sys.executable, "-u", "-c", PROBER, pod.ip, str(seconds), "0.005"],
                        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    out, _ = proc.communicate(timeout=seconds + 30)
    return json.loads(out.strip().splitlines()[-1]), 0, 0, None


def test_from_the_kubernetes_api_a_new_pod_is_isolated_from_the_first_packet(world, monkeypatch):
    """The same with the Kubernetes source: the Pod is created in the API
    just before ADD (the agent has it from its watch, or asks for it)."""
    from test_node_agent import fake_api_in, kubeconfig_for
    with cni_world(world) as (node, paths, runtime):
        prober = node.add_pod("prober")
        new = None
        with fake_api_in(node) as (fake, _listen):
            fake.apply_many([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}]
                            + base_objects(prober))
            monkeypatch.setenv("KUBECONFIG", str(kubeconfig_for(Path(paths.root, "kubeconfig"),
                                                                fake.port)))
            with enforcing_agent(node, paths, prober, "--source", "kubernetes") as agent:
                try:
                    for name in ("api1", "api2"):
                        new = NewPod(world, runtime, "locked", name)

                        def create(name=name):
                            # cut the watches first: the Pod reaches the store
                            # only after their reconnect (a quarter to half a
                            # second), so the ADD asks the API for it
                            fake.drop_connections()
                            fake.apply(pod_doc("locked", name, {"app": "web"}))
                        probes, t_start, t_ret, inv = probe_around_add(prober, new,
                                                                       just_before=create)
                        check_isolated_from_add(probes, t_start, t_ret, f"{name} from the API")
                        new.close()
                        new = None
                    log = agent.log.read_text()
                    assert "policy=compiled (labels: kubernetes)" in log, log[-3000:]
                    gets = [r for r in fake.requests if "/namespaces/locked/pods/api" in r]
                    assert gets, "the ADD never asked the API for its Pod"
                finally:
                    if new is not None:
                        new.close()
