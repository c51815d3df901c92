"""The benchmarks' NodePort floor (bench/nodeport_profile.NodePortFloor)
serves its NodePort from outside and retires every flow at its close, as
fastpath does: a floor whose closed flows waited for eviction would pay an
evicting insert at every SYN of a busy client, which fastpath does not, and
would no longer be a floor.

    client (outside) ── vpc ══ eth0 n3 ── pod b (backend, no fastpath)
"""
from __future__ import annotations

from agent.sim.traffic import serve_reply
from bench.nodeport_profile import NodePortFloor

NODE_PORT, PORT = 30095, 8080


def ask(src, ip: str, port: int) -> str:
    return src.run(["sh", "-c", f"printf hi | nc -N -w 3 {ip} {port}"], check=False,
                   timeout=10).stdout


def test_the_floor_serves_its_node_port_and_deletes_each_flow_at_its_close(world):
    n3 = world.add_node("n3", enis=1)
    b = n3.add_pod("b")
    client = world.add_client("ext")
    serve_reply(b, PORT, "from-b", peer=True)
    floor = NodePortFloor(n3, b, NODE_PORT, PORT)
    ct = floor.bpf["npf_ct"]
    with floor.attached():
        for _ in range(20):
            who, seen = ask(client, n3.ip, NODE_PORT).split()
            # translated by the floor (nothing else on n3 serves the port),
            # the client's own address kept
            assert who == "from-b" and seen.split(":")[0] == client.ip, seen
        # each connection wrote its two entries; its close deleted both
        assert len(list(ct.items())) == 0
        # the pod's own address: redirected, no entry written
        who, _ = ask(client, b.ip, PORT).split()
        assert who == "from-b"
        assert len(list(ct.items())) == 0
