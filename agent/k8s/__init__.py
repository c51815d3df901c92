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
from agent.k8s.source import Source, describe, summarize
from agent.k8s.store import ChangeSet, Delta, Snapshot, Store, Subscription

__all__ = ["ALL_KINDS", "Action", "Kind", "Source", "describe", "open_source",
           "summarize", "ChangeSet", "Delta", "Snapshot", "Store", "Subscription"]


def open_source(spec: str, node_name: str, store: Store, *, metrics=None,
                watch_all_pods: bool = False, directory_watch: bool = True,
                **kwargs) -> Source:
    """Open and start the source named by `spec` ("kubernetes" or a directory path).

    node_name: this node (kubernetes: pods and the Node object are watched for
    it only; "" watches all). watch_all_pods: watch every pod in the cluster,
    which NetworkPolicy enforcement needs for peer selectors. directory_watch:
    a directory is also followed with inotify (else polled only). Other
    keyword arguments go to the source (e.g. interval= for a directory,
    api_client= / resync_seconds= for kubernetes).
    """
    if spec == "kubernetes":
        from agent.k8s.kube import KubernetesSource
        return KubernetesSource(store, node_name=node_name, metrics=metrics,
                                watch_all_pods=watch_all_pods, **kwargs).start()
    from agent.k8s.directory import DirectorySource
    return DirectorySource(spec, store, metrics=metrics, watch=directory_watch,
                           **kwargs).start()
