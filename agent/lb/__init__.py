"""Services + EndpointSlices -> service, slot and backend map entries (pure).

    from agent.lb import Reconciler, compile_services
    rec = Reconciler()                       # or Reconciler.restore(...) at restart
    ops = rec.plan(compile_services(snapshot, node_name, node_zone))
    for op in ops: apply op to the maps, in order

For one change among thousands of Services, ServiceTable recompiles only the
Services a ChangeSet touched and feeds Reconciler.plan_changes.

compile (kube-proxy's choice of backends) -> reconcile (ordered minimal map
writes). Neither touches the kernel; agent/datapath applies the operations.
See agent/lb/README-section.md for the semantics.
"""
from agent.lb.compile import (
    Backend, Frontend, FrontendState, compile_service, compile_services, describe,
    translated,
)
from agent.lb.reconcile import (
    DeleteBackend, DeleteService, DeleteSlots, FakeMaps, IdAllocator, IdsExhausted,
    Op, PutBackend, PutService, PutSlots, Reconciler, ServiceEntry, check_whole,
)
from agent.lb.table import ServiceTable, touched_services

__all__ = [
    "Backend", "Frontend", "FrontendState", "compile_service", "compile_services",
    "describe", "translated", "DeleteBackend", "DeleteService", "DeleteSlots",
    "FakeMaps", "IdAllocator", "IdsExhausted", "Op", "PutBackend", "PutService",
    "PutSlots", "Reconciler", "ServiceEntry", "check_whole", "ServiceTable",
    "touched_services",
]
