"""Simulated Terway ENIMultiIP nodes in network namespaces (see world.py).

Used by vm-tests, `make demo` and the benchmarks: everything the product is
proven in is built here. Address plan and names: agent/sim/plan.py.
"""
from .netns import CommandError, Netns, cleanup_stale
from .plan import PREFIX
from .world import (Client, DirectPair, Endpoint, Eni, Iface, Node, Pod, World,
                    direct_pair)

__all__ = ["World", "Node", "Pod", "Eni", "Iface", "Endpoint", "DirectPair", "Client",
           "Netns", "CommandError", "direct_pair", "cleanup_stale", "PREFIX"]
