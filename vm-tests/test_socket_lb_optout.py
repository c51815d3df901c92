"""Socket-LB opt-out by annotation, with real sockets and the agent's own
pipeline (manifests -> cluster state -> skip map): socket-LB for all
sockets, except pods annotated fastpath.io/socket-lb: disabled (or in a
Namespace so annotated), whose connections are translated per packet on
their veth, after anything inside the pod (a mesh sidecar) saw the VIP.

    pod a, pod m (clients, cgroup fp-test-*) --connect(VIP:80)--> pod b:8080
"""
from __future__ import annotations

from agent.datapath.maps import netns_cookie
from agent.sim import manifests as mf
from agent.sim.agent import sim_attach
from fastpath_helpers import counters_by, flows_created, serve_reply, wait_for
from socket_clients import one_shot

VIP = "192.168.77.10"


def manifests(b_ip: str, *, pod_m: str | None = None, ns: str | None = None) -> list[dict]:
    """Service web (VIP:80 -> b:8080) and the clients a and m; `pod_m`, `ns`:
    the fastpath.io/socket-lb annotation of m and of the Namespace."""
    def ann(v):
        return {"fastpath.io/socket-lb": v} if v else None
    return [mf.namespace("default", annotations=ann(ns)),
            mf.pod("default", "a", None, "n1", ports={}),
            mf.pod("default", "m", None, "n1", ports={}, annotations=ann(pod_m)),
            mf.service("default", "web", VIP, 80, 8080),
            mf.endpoint_slice("default", "web", 8080, [(b_ip, "ready", "n1")])]


def translated_per_packet(agent, pod) -> int:
    rows = agent.datapath.maps.counters()
    return counters_by(rows, pod.host_ifindex)[("from-pod", "service-translated")]


def sidecar_view(pod) -> int:
    """Packets to VIP:80 as seen inside the pod (the OUTPUT hook a mesh
    sidecar's redirect rule sits on): a socket translated by socket-LB sends
    to the backend, never to the VIP."""
    out = pod.run(["iptables", "-w", "-nvxL", "OUTPUT"], timeout=10).stdout
    for line in out.splitlines():
        if VIP in line and "dpt:80" in line:
            return int(line.split()[0])
    raise AssertionError(f"no counting rule in {pod.name}:\n{out}")


def test_annotated_pods_bypass_socket_lb_while_others_keep_it(world, cgroup):
    node = world.add_node("n1", enis=1)
    a, m, b = node.add_pod("a"), node.add_pod("m"), node.add_pod("b")
    serve_reply(b, 8080, "from-b")
    for p in (a, m):
        p.run(["iptables", "-w", "-A", "OUTPUT", "-d", VIP, "-p", "tcp", "--dport", "80"],
              timeout=10)
    with sim_attach(node, socket_lb=True, socket_lb_hostns_only=False,
                    cgroup_root=cgroup) as agent:
        skip = agent.datapath.socklb_skip
        ck = {p.name: netns_cookie(p.netns) for p in (a, m, b)}

        def skipped():
            return {name for name, c in ck.items() if c in skip.get()}

        def write(**kw):
            mf.write(agent.config.source, "cluster.yaml", manifests(b.ip, **kw))

        write(pod_m="disabled")
        wait_for(lambda: skipped() == {"m"}, "m's netns in the skip map")
        wait_for(lambda: agent.datapath.lb.services(), "the Service in the maps")
        before = {p.name: (translated_per_packet(agent, p), sidecar_view(p)) for p in (a, m)}
        created = flows_created(agent.datapath.lb)
        for _ in range(3):
            # both reach the backend and see the VIP as their peer
            assert one_shot(a, cgroup, VIP, "80", "tcp") == f"from-b {VIP} 80"
            assert one_shot(m, cgroup, VIP, "80", "tcp") == f"from-b {VIP} 80"
        # a: translated at connect() -- no packet to the VIP, none translated
        assert translated_per_packet(agent, a) == before["a"][0]
        assert sidecar_view(a) == before["a"][1]
        # m: its packets went to the VIP and were translated on its veth
        assert translated_per_packet(agent, m) >= before["m"][0] + 3
        assert sidecar_view(m) >= before["m"][1] + 3
        # one flow opened per connection of m's, none for a's
        assert flows_created(agent.datapath.lb) == created + 3

        # the Namespace opts out: every pod in it now goes per packet
        write(ns="disabled")
        wait_for(lambda: skipped() == {"a", "m", "b"}, "every pod's netns in the skip map")
        n_a = translated_per_packet(agent, a)
        assert one_shot(a, cgroup, VIP, "80", "tcp") == f"from-b {VIP} 80"
        assert translated_per_packet(agent, a) >= n_a + 1

        # ... except a pod that says enabled
        write(ns="disabled", pod_m="enabled")
        wait_for(lambda: skipped() == {"a", "b"}, "m back under socket-LB")
        n_m, v_m = translated_per_packet(agent, m), sidecar_view(m)
        assert one_shot(m, cgroup, VIP, "80", "tcp") == f"from-b {VIP} 80"
        assert translated_per_packet(agent, m) == n_m
        assert sidecar_view(m) == v_m

        # annotations gone: socket-LB for every pod again
        write()
        wait_for(lambda: skip.get() == {}, "an empty skip map")
        n_a = translated_per_packet(agent, a)
        assert one_shot(a, cgroup, VIP, "80", "tcp") == f"from-b {VIP} 80"
        assert translated_per_packet(agent, a) == n_a
        agent.datapath.detach_socket_lb(cgroup)
