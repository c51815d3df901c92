"""Plain data shared by every layer: the datapath contract's names and codes
read from bpf/include/fastpath.h (bpfdefs.py) and a pod endpoint as fastpath
knows it (endpoint.py). Imports nothing of the agent."""
