"""ServiceSync on its own: the store -> compile -> plan -> maps loop, its
failure paths (a write that fails, a map filled behind its back, a map too
small), hostPorts from the API, affinity purges, address changes.

The maps are tests/lb/fakelb.FakeLb, which fails like the kernel does; the
same paths with the real maps are in tests/bpf/test_service_sync_maps.py.
"""
from __future__ import annotations

import errno
import time

import pytest

from agent.k8s.parse import parse_object
from agent.k8s.store import Store
from agent.daemon.services import HostPortRefused, ServiceSync
from agent.lb.capacity import Capacities
from agent.lb.compile import SCOPE_EXTERNAL, Frontend, LbOptions
from agent.lb.hostport import PortMapping
from agent.lb.nodeaddr import NodeAddresses
from agent.lb.reconcile import FLAG_REJECT, ServiceEntry
from agent.lb.svcnet import FLAG_CLUSTER_IP, FLAG_RANGE
from tests.lb.fakelb import FakeLb
from tests.lb.lbdata import NODE, ep, eslice, service

NODE_IP = "10.240.0.11"


def vip(i: int) -> str:
    return f"172.16.0.{i}"


def svc(name: str, i: int, *ips: str, **spec):
    return [service(name, ip=vip(i), **spec),
            eslice(f"{name}-1", name, [ep(ip) for ip in ips])]


class Env:
    def __init__(self, lb=None, caps=None, addresses=None, **kw):
        self.lb = lb or FakeLb()
        self.store = Store()
        self.addresses = addresses or NodeAddresses(("10.240.0.11",), ("10.240.0.11",),
                                                    ("10.240.0.11", "127.0.0.1"))
        self.sync = ServiceSync(self.lb, self.store, None, NODE, capacities=caps,
                                addresses_fn=lambda: self.addresses,
                                service_cidrs=("172.16.0.0/16",), **kw)

    def put(self, *objs):
        return self.store.apply(upserts=[parse_object(o) for o in objs])

    def delete(self, kind, ns, name):
        from agent.k8s.model import Kind
        return self.store.apply(deletes=[(Kind(kind), (ns, name))])

    def change(self, cs) -> int:
        return self.sync._guarded(lambda: self.sync._sync_changes([cs]))

    def backends_of(self, fe):
        got = self.lb.resolve(fe)
        return None if got is None else [f"{ip}:{port}" for ip, port, _ in got]


def fe(i, port=80):
    return Frontend(vip(i), port, "TCP")


# ------------------------------------------------------------ the basics

def test_a_full_sync_then_changes_reach_the_maps():
    env = Env()
    env.put(*svc("a", 1, "10.0.0.1"))
    assert env.sync._guarded(env.sync.sync_once) > 0
    assert env.backends_of(fe(1)) == ["10.0.0.1:8080"]
    env.change(env.put(*svc("b", 2, "10.0.0.2", "10.0.0.3")))
    assert env.backends_of(fe(2)) == ["10.0.0.2:8080", "10.0.0.3:8080"]
    env.change(env.delete("Service", "shop", "a"))
    assert env.backends_of(fe(1)) is None and env.sync.healthy()
    # address ranges: the Service CIDR drops, live ClusterIPs reject
    assert env.lb.svcnet == {"172.16.0.0/16": FLAG_RANGE, f"{vip(2)}/32": FLAG_CLUSTER_IP}


# ---------------------------------------------------------- failed writes

def test_a_write_that_fails_mid_plan_is_not_believed_and_the_retry_programs_it():
    env = Env()
    env.put(*svc("a", 1, "10.0.0.1"))
    env.sync._guarded(env.sync.sync_once)
    env.lb.fail_at = env.lb.writes + 2          # the backend goes in, the slots fail
    assert env.change(env.put(*svc("b", 2, "10.0.0.2"))) == -1
    s = env.sync
    assert s.errors == 1 and s.retry_at is not None and not s.healthy()
    assert "injected failure" in s.last_error
    # the reconciler now believes the maps: a backend with no slot, no entry for b
    assert set(s.reconciler.frontends()) == {fe(1)}
    assert env.lb.resolve(fe(2)) is None
    # changes during the backoff wait for the retry, which plans everything
    assert env.change(env.put(*svc("c", 3, "10.0.0.3"))) == 0
    s.retry_at = time.monotonic() - 1
    s._idle()
    assert s.retry_at is None and s.failures == 0 and s.healthy()
    assert env.backends_of(fe(2)) == ["10.0.0.2:8080"]
    assert env.backends_of(fe(3)) == ["10.0.0.3:8080"]
    assert env.backends_of(fe(1)) == ["10.0.0.1:8080"]


def test_the_retry_backs_off_while_the_failure_lasts_and_then_recovers():
    env = Env()
    env.put(*svc("a", 1, "10.0.0.1"))
    env.lb.fail_at = 1
    s = env.sync
    waits = []
    for _ in range(8):
        env.lb.fail_at = env.lb.writes + 1       # every attempt's first write fails
        t = time.monotonic()
        s._guarded(s.sync_once)
        waits.append(round(s.retry_at - t, 1))
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    env.lb.fail_at = None
    s.retry_at = 0
    s._idle()
    assert s.healthy() and env.backends_of(fe(1)) == ["10.0.0.1:8080"]


def test_a_map_filled_behind_the_agents_back_fails_once_then_the_retry_cleans_it():
    env = Env(lb=FakeLb(sizes={"services": 3}), caps=Capacities(3, 100, 100, 10, 10))
    env.put(*svc("a", 1, "10.0.0.1"))
    env.sync._guarded(env.sync.sync_once)
    # another writer (an older agent's leftovers, a hand-made entry) fills it
    for k in (1, 2):
        env.lb.svc[Frontend(f"192.0.2.{k}", 80, "TCP")] = ServiceEntry(900 + k, 0, 0, FLAG_REJECT)
    # the reconciler does not know: capacity looks fine, the kernel says E2BIG
    assert env.change(env.put(*svc("b", 2, "10.0.0.2"))) == -1
    assert "map full" in env.sync.last_error
    # the maps were read back: the strangers are known now, and removed
    # before anything is added, so the retry fits
    env.sync.retry_at = 0
    env.sync._idle()
    assert env.sync.healthy()
    assert set(env.lb.svc) == {fe(1), fe(2)}


# ------------------------------------------------------------- capacity

def test_a_service_that_does_not_fit_is_refused_by_name_and_programmed_once_room_is_made():
    env = Env(lb=FakeLb(sizes={"services": 2}), caps=Capacities(2, 100, 100, 10, 10))
    env.put(*svc("a", 1, "10.0.0.1"), *svc("b", 2, "10.0.0.2"), *svc("c", 3, "10.0.0.3"))
    env.sync._guarded(env.sync.sync_once)
    s = env.sync
    assert s.healthy() and s.errors == 0
    assert set(env.lb.svc) == {fe(1), fe(2)}
    assert s.status()["refused"] == [
        "Service shop/c refused: the services map would need 3 entries (capacity 2)"]
    # b grows: never at a's or b's expense, and c stays refused
    env.change(env.put(*svc("b", 2, "10.0.0.2", "10.0.0.4")))
    assert env.backends_of(fe(2)) == ["10.0.0.2:8080", "10.0.0.4:8080"]
    assert list(s.refused) == [("shop", "c")]
    env.change(env.delete("Service", "shop", "a"))
    assert env.backends_of(fe(3)) == ["10.0.0.3:8080"] and s.refused == {}
    assert env.lb.resolve(fe(1)) is None


# ------------------------------------------------------- affinity purges

def test_affinity_entries_of_retired_backends_and_services_are_purged():
    env = Env()
    env.put(*svc("a", 1, "10.0.0.1", "10.0.0.2", sessionAffinity="ClientIP"),
            *svc("b", 2, "10.0.0.2"))
    s = env.sync
    s._guarded(s.sync_once)
    rec = s.reconciler
    sid_a, sid_b = rec.service_id(fe(1)), rec.service_id(fe(2))
    b2 = rec.backend_id(("10.0.0.2", 8080, "TCP"))
    b1 = rec.backend_id(("10.0.0.1", 8080, "TCP"))
    env.lb.affinity = {(sid_a, "client-x"): b2, (sid_a, "client-y"): b1,
                       (sid_b, "client-x"): b2}
    # 10.0.0.2 leaves a but stays in b: a's client-x must not keep it
    env.change(env.put(*svc("a", 1, "10.0.0.1", sessionAffinity="ClientIP")))
    assert s.affinity_purger.wait_idle(5)
    assert env.lb.affinity == {(sid_a, "client-y"): b1, (sid_b, "client-x"): b2}
    env.change(env.delete("Service", "shop", "b"))
    assert s.affinity_purger.wait_idle(5)
    assert env.lb.affinity == {(sid_a, "client-y"): b1}
    s.stop()


def test_a_restarted_sync_does_not_hand_out_ids_affinity_entries_still_name():
    lb = FakeLb()
    lb.affinity = {(7, "client"): 40}            # from before the restart
    env = Env(lb=lb)
    env.put(*svc("a", 1, "10.0.0.1"))
    env.sync._guarded(env.sync.sync_once)
    rec = env.sync.reconciler
    assert rec.service_id(fe(1)) > 7 and rec.backend_id(("10.0.0.1", 8080, "TCP")) > 40


# ------------------------------------------------------------- hostPorts

def test_host_ports_are_written_before_the_call_returns_and_removed_on_delete():
    env = Env()
    env.put(*svc("a", 1, "10.0.0.1"))
    s = env.sync
    # before the first full sync they wait for it
    s.set_host_ports(("web", "p"), "10.241.1.20", [PortMapping(8080, 80, "TCP")])
    assert env.lb.resolve(Frontend(NODE_IP, 8080, "TCP")) is None
    s._guarded(s.sync_once)
    for ip in (NODE_IP, "127.0.0.1"):
        assert env.backends_of(Frontend(ip, 8080, "TCP")) == ["10.241.1.20:80"]
    s.set_host_ports(("web", "q"), "10.241.1.21", [PortMapping(9090, 90, "UDP", NODE_IP)])
    assert env.lb.resolve(Frontend(NODE_IP, 9090, "UDP")) == [("10.241.1.21", 90, "UDP")]
    s.remove_host_ports(("web", "p"))
    assert env.lb.resolve(Frontend(NODE_IP, 8080, "TCP")) is None
    assert env.lb.resolve(Frontend(NODE_IP, 9090, "UDP")) is not None


def test_a_host_port_a_service_or_another_pod_holds_is_refused_and_changes_nothing():
    env = Env()
    env.put(service("np", ip=vip(5), typ="NodePort", ports=[("http", 80, "TCP", 8080, 30080)]),
            eslice("np-1", "np", [ep("10.0.0.5")]))
    s = env.sync
    s._guarded(s.sync_once)
    with pytest.raises(HostPortRefused, match="taken by Service shop/np"):
        s.set_host_ports(("web", "p"), "10.241.1.20", [PortMapping(30080, 80, "TCP")])
    s.set_host_ports(("web", "p"), "10.241.1.20", [PortMapping(8080, 80, "TCP")])
    with pytest.raises(HostPortRefused, match="taken by pod web/p"):
        s.set_host_ports(("web", "q"), "10.241.1.21", [PortMapping(8080, 80, "TCP")])
    assert s.host_ports() == {("web", "p"): ("10.241.1.20", (PortMapping(8080, 80, "TCP"),))}
    assert env.backends_of(Frontend(NODE_IP, 30080, "TCP")) == ["10.0.0.5:8080"]
    # a Service that takes a pod's port later wins, and it is reported
    env.change(env.put(service("np2", ip=vip(6), typ="NodePort",
                               ports=[("http", 80, "TCP", 8080, 8080)]),
                       eslice("np2-1", "np2", [ep("10.0.0.6")])))
    assert env.backends_of(Frontend(NODE_IP, 8080, "TCP")) == ["10.0.0.6:8080"]
    assert s.status()["hostport_conflicts"] == [
        "hostPort 10.240.0.11:8080/TCP of pod web/p is taken by Service shop/np2"]
    # (127.0.0.1 is no NodePort address: the pod keeps it)
    assert env.backends_of(Frontend("127.0.0.1", 8080, "TCP")) == ["10.241.1.20:80"]
    # the Service goes: the pod gets its port back
    env.change(env.delete("Service", "shop", "np2"))
    assert env.backends_of(Frontend(NODE_IP, 8080, "TCP")) == ["10.241.1.20:80"]


def test_ipv6_host_ports_are_written_per_family_and_removed_on_delete():
    env = Env(addresses=NodeAddresses(("10.240.0.11",), ("10.240.0.11",),
                                      ("10.240.0.11", "127.0.0.1"), ("fd00::11",),
                                      ("fd00::11",), ("::1", "fd00::11")))
    s = env.sync
    s._guarded(s.sync_once)
    s.set_host_ports(("web", "p"), "10.241.1.20", [PortMapping(8080, 80, "TCP")],
                     "fd00:241::20")
    for ip in ("10.240.0.11", "127.0.0.1"):
        assert env.backends_of(Frontend(ip, 8080, "TCP")) == ["10.241.1.20:80"]
    for ip in ("fd00::11", "::1"):
        assert env.backends_of(Frontend(ip, 8080, "TCP")) == ["fd00:241::20:80"]
    # an IPv6-only pod: IPv6 frontends only; its IPv6 hostIP mapping too
    s.set_host_ports(("web", "q"), "", [PortMapping(9090, 90, "UDP", "fd00::11"),
                                        PortMapping(9091, 91, "TCP")], "fd00:241::21")
    assert env.lb.resolve(Frontend("fd00::11", 9090, "UDP")) == [("fd00:241::21", 90, "UDP")]
    assert env.backends_of(Frontend("::1", 9091, "TCP")) == ["fd00:241::21:91"]
    assert env.lb.resolve(Frontend("10.240.0.11", 9091, "TCP")) is None
    # another pod cannot take an IPv6 one either
    with pytest.raises(HostPortRefused, match=r"\[fd00::11\]:9090/UDP of pod web/r is taken "
                                              "by pod web/q"):
        s.set_host_ports(("web", "r"), "", [PortMapping(9090, 90, "UDP")], "fd00:241::22")
    # the node's IPv6 addresses change: the mappings follow
    env.addresses = NodeAddresses(("10.240.0.11",), ("10.240.0.11",),
                                  ("10.240.0.11", "127.0.0.1"), ("fd00::12",), ("fd00::12",),
                                  ("::1", "fd00::12"))
    s._guarded(s.sync_once)
    assert env.backends_of(Frontend("fd00::12", 8080, "TCP")) == ["fd00:241::20:80"]
    assert env.lb.resolve(Frontend("fd00::11", 8080, "TCP")) is None
    s.remove_host_ports(("web", "p"))
    s.remove_host_ports(("web", "q"))
    for f in (Frontend("fd00::12", 8080, "TCP"), Frontend("::1", 8080, "TCP"),
              Frontend("::1", 9091, "TCP"), Frontend("fd00::11", 9090, "UDP")):
        assert env.lb.resolve(f) is None
    assert s.host_ports() == {}


def test_host_ports_that_do_not_fit_are_refused_as_the_pods():
    env = Env(caps=Capacities(2, 100, 100, 10, 10))
    s = env.sync
    s._guarded(s.sync_once)
    with pytest.raises(HostPortRefused, match="hostPorts of pod web/p refused: the services"):
        s.set_host_ports(("web", "p"), "10.241.1.20",
                         [PortMapping(8080, 80, "TCP"), PortMapping(8081, 81, "TCP")])
    assert s.host_ports() == {} and env.lb.svc == {}


# ------------------------------------------------------------- addresses

def test_node_ports_follow_the_nodes_addresses():
    env = Env(options=LbOptions())
    env.put(service("np", ip=vip(5), typ="NodePort", externalTrafficPolicy="Local",
                    ports=[("http", 80, "TCP", 8080, 30080)]),
            eslice("np-1", "np", [ep("10.0.0.5", node=NODE)]))
    s = env.sync
    s._guarded(s.sync_once)
    assert env.backends_of(Frontend(NODE_IP, 30080, "TCP", SCOPE_EXTERNAL)) == ["10.0.0.5:8080"]
    env.addresses = NodeAddresses(("10.240.0.12",), ("10.240.0.12",), ("10.240.0.12",))
    s._next_poll = 0
    s._idle()
    assert env.lb.resolve(Frontend(NODE_IP, 30080, "TCP")) is None
    assert env.backends_of(Frontend("10.240.0.12", 30080, "TCP")) == ["10.0.0.5:8080"]


def test_health_check_node_ports_follow_the_local_endpoints():
    class Health:
        def __init__(self):
            self.seen = []

        def sync(self, checks):
            self.seen.append({k: (h.port, h.local_endpoints) for k, h in checks.items()})

    h = Health()
    env = Env(health=h)
    lb_svc = service("web", ip=vip(7), typ="LoadBalancer", externalTrafficPolicy="Local",
                     healthCheckNodePort=32000, ports=[("http", 80, "TCP", 8080, 30080)])
    env.put(lb_svc, eslice("web-1", "web", [ep("10.0.0.7", node=NODE)]))
    env.sync._guarded(env.sync.sync_once)
    env.change(env.put(eslice("web-1", "web", [ep("10.0.0.7", node="node-b")])))
    assert h.seen == [{("shop", "web"): (32000, 1)}, {("shop", "web"): (32000, 0)}]
