"""The service sync's failure paths with real, full maps and real traffic.

An agent whose service map holds 16 frontends gets 20 Services: 16 are
programmed and answer, 4 are refused by name (and reported), nothing is half
written; when Services go, the refused ones get in. Then the map is filled
behind the agent's back until the kernel refuses writes: the next Service's
plan fails, the agent rebuilds its view from the kernel's maps and retries,
the strangers are removed, the Service answers.

    pod a (client) ── n1 ── pod b (every Service's backend)
"""
from __future__ import annotations

import os
import time

import yaml

from agent.lb.reconcile import FLAG_REJECT
from agent.sim.agent import sim_attach
from fastpath_helpers import serve_reply, wait_for


def vip(i: int) -> str:
    return f"192.168.61.{i + 1}"


def objects(names, backend_ip):
    out = []
    for i in names:
        out.append({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": f"svc-{i:02d}", "namespace": "shop"},
                    "spec": {"clusterIP": vip(i), "ports": [
                        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
        out.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": f"svc-{i:02d}-1", "namespace": "shop",
                                 "labels": {"kubernetes.io/service-name": f"svc-{i:02d}"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [backend_ip], "conditions": {"ready": True},
                                   "nodeName": "n1"}]})
    return out


def ask(pod, ip) -> str:
    return pod.run(["sh", "-c", f"printf hi | nc -N -w 2 {ip} 80"], check=False,
                   timeout=10).stdout


def test_a_full_service_map_refuses_by_name_and_a_failed_write_is_retried_from_the_kernel(
        world):
    n1 = world.add_node("n1", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    serve_reply(b, 8080, "from-b")
    with sim_attach(n1, services_map_size=16, service_cidrs="192.168.61.0/24") as ag:
        path = f"{os.path.dirname(ag.config.state_dir)}/manifests/svc.yaml"

        def write(names):
            with open(path, "w") as f:
                f.write(yaml.safe_dump_all(objects(names, b.ip)))

        write(range(20))
        svc = wait_for(lambda: ag.services if ag.services and ag.services.synced.is_set()
                       and len(ag.services.refused) == 4 else None, "the first plan")
        assert sorted(k[1] for k in svc.refused) == [f"svc-{i}" for i in range(16, 20)]
        assert svc.errors == 0 and len(ag.datapath.lb.services()) == 16
        assert ask(a, vip(0)) == "from-b" and ask(a, vip(15)) == "from-b"
        # a refused Service is not half there: its ClusterIP refuses at once
        t = time.monotonic()
        assert ask(a, vip(19)) == "" and time.monotonic() - t < 1.5

        # four Services go: the refused ones get in
        write(range(4, 20))
        wait_for(lambda: not svc.refused, "the refused Services to be programmed")
        assert ask(a, vip(19)) == "from-b"
        assert len(ag.datapath.lb.services()) == 16

        # another writer fills the map to the brim behind the agent's back
        write(range(5, 20))
        wait_for(lambda: len(ag.datapath.lb.services()) == 15, "svc-04 to go")
        lb = ag.datapath.lb
        lb.put_service("198.18.0.1", 80, "TCP", 90001, 0, FLAG_REJECT)
        try:
            lb.put_service("198.18.0.2", 80, "TCP", 90002, 0, FLAG_REJECT)
            raise AssertionError("the map should be full")
        except Exception as exc:
            assert "Argument list too long" in str(exc), exc
        errors = svc.errors
        write(list(range(5, 20)) + [0])         # svc-00 comes back
        wait_for(lambda: svc.errors > errors, "the failed write")
        assert svc.status()["last_error"]
        # the retry reads the kernel's maps back, removes the stranger, and
        # programs svc-00
        wait_for(lambda: svc.healthy() and ask(a, vip(0)) == "from-b", "the retry")
        fes = {(s["vip"], s["port"]) for s in lb.services()}
        assert ("198.18.0.1", 80) not in fes and (vip(0), 80) in fes
        assert svc.refused == {}
