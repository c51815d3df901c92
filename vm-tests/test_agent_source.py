"""`fastpath agent --source DIR` runs without a cluster and reports what it loaded."""
from __future__ import annotations

import time

from agent.api import wire
from agent.sim.agent import AgentProcess, private_paths

MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: web}}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 192.168.10.10
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: shop}
spec:
  clusterIP: 192.168.10.11
  ports: [{port: 70000, protocol: TCP}]
"""


def test_agent_loads_a_manifest_directory_and_logs_objects_and_rejections(world):
    node = world.add_node("n1", enis=1)
    with private_paths() as paths:
        with open(f"{paths.manifests}/shop.yaml", "w") as f:
            f.write(MANIFESTS)
        agent = AgentProcess(node, paths).start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                status = wire.call(paths.socket, "Status")
                if status["source"].get("synced"):
                    break
                time.sleep(0.2)
            assert status["source"]["synced"], status
            assert status["source"]["objects"]["Service"] == 1, status
            assert status["source"]["objects"]["Namespace"] == 1
            deadline = time.monotonic() + 10
            while "rejected" not in agent.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            log = agent.log.read_text()
            assert "cluster state:" in log and "services=1" in log, log
            assert "shop/cart" in log
            assert "rejected" in log and "shop/broken" in log and "port" in log, log
        finally:
            agent.stop()
