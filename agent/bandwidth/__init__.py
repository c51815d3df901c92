"""The bandwidth manager's pure core: Pod annotations -> per-pod limits ->
the values of the datapath's limits map (agent/datapath/bwmaps.py writes
them; agent/daemon/bandwidth.py keeps them in step with cluster state)."""
from agent.bandwidth.encode import Entry, Plan, encode, limits_of, plan
from agent.bandwidth.limits import (ANNOTATIONS, Annotation, Limits, PodLimits, compile_limits,
                                    pod_limits, touches_limits)

__all__ = ["ANNOTATIONS", "Annotation", "Entry", "Limits", "Plan", "PodLimits",
           "compile_limits", "encode", "limits_of", "plan", "pod_limits", "touches_limits"]
