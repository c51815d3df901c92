"""The agent process on a node: its lifecycle (agent.py), the loops that keep
the datapath's maps equal to cluster state (services.py, policysync.py on the
Worker base of worker.py), its HTTP endpoints and metrics (health.py,
metrics.py) and the node installation (nodeinstall.py). It wires the pure
layers (lb, policy, conntrack, k8s) to the kernel layer (datapath)."""
