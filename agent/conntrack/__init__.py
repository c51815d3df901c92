"""Connection tracking, the agent's side: what to do with conntrack entries.

The datapath owns flow state (bpf/lib/ct.h); this package decides, pure
over entries (agent/model/conntrack.py) and through the map objects it is
given (agent/datapath/maps.CtMaps, agent/datapath/mapio):

- gc: which entries are past their state's lifetime (the programs ignore
  them already; the sweep gives the memory back);
- purge: which flows a backend that left its Service loses (its datagram
  flows; its connections finish on their own);
- migrate: where an entry of a superseded pinned map goes on upgrade, and
  which defaults new fields take (the loader copies field by field).

The threads that run gc and purge live in agent/daemon/conntrack_gc.py.
"""
