"""Cluster state: the Kubernetes objects fastpath's services and policies come from.

    from agent.k8s import Store, open_source, summarize
    store = Store()
    src = open_source("kubernetes" or "/path/to/manifests", node_name, store)
    src.synced.wait()
    snap, sub = store.snapshot(), store.subscribe()

model (frozen objects) <- parse (validation) <- sources (kube, directory) -> store
(snapshot + ordered ChangeSets) -> compilers. See agent/k8s/README-section.md.
"""
from agent.k8s.model import ALL_KINDS, Action, Kind
from agent.k8s.source import Source, describe, open_source, summarize
from agent.k8s.store import ChangeSet, Delta, Snapshot, Store, Subscription

__all__ = ["ALL_KINDS", "Action", "Kind", "Source", "describe", "open_source",
           "summarize", "ChangeSet", "Delta", "Snapshot", "Store", "Subscription"]
