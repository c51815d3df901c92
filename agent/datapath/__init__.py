"""The only package that touches the kernel: BPF load/pin/attach and maps.

`Datapath` (node.py) is what the agent drives. It is imported on first use,
so that a command needing one module of this package (the CLI reading pins
through libbpf) does not pay for pyroute2 and the loader.
"""


def __getattr__(name: str):
    if name in ("Datapath", "ATTACH"):
        from agent.datapath import node
        return getattr(node, name)
    raise AttributeError(f"module 'agent.datapath' has no attribute {name!r}")


__all__ = ["ATTACH", "Datapath"]
