"""Cluster state from the Kubernetes API (`--source kubernetes`).

One reflector thread per kind, each doing what client-go's reflector does:
list (paged, 500 per page) and replace the kind in the store as one
ChangeSet, then watch from the list's resourceVersion with bookmarks so a
reconnect resumes where it stopped instead of relisting. A watch that the
server ends (timeoutSeconds, randomised 5-10 minutes) is simply reopened; a
410 Gone (history compacted) triggers a relist; any other failure reconnects
after a capped exponential backoff with jitter, from the last
resourceVersion. A periodic resync relists every kind (default every 15
minutes, jittered) so that any drift is corrected; relists only emit the
differences.

What is watched, and why (the README section says the same):
  Namespaces, Services, EndpointSlices, NetworkPolicies: all of them.
  Pods: this node's only (fieldSelector spec.nodeName), unless
        watch_all_pods is set, which NetworkPolicy enforcement needs because
        peer selectors match pods anywhere in the cluster.
  Nodes: this node only (fieldSelector metadata.name): its zone for topology
        hints and its addresses for NodePort; other nodes' frequent status
        updates are of no use to this node.

Objects are read as raw JSON (`_preload_content=False`), never through the
client's generated model classes, which are several times slower and larger.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import threading
import time
from typing import Optional

from agent.k8s.model import ALL_KINDS, Kind, object_name
from agent.k8s.parse import ValidationError, object_key, parse_object
from agent.k8s.source import Backoff, Source
from agent.k8s.store import Store

log = logging.getLogger("fastpath.k8s")

# Kind -> (API class, list function); the *_for_all_namespaces variants hit the
# cluster-wide paths (/api/v1/pods, ...), one watch per kind.
_LIST_FUNCS = {
    Kind.NAMESPACE: ("CoreV1Api", "list_namespace"),
    Kind.NODE: ("CoreV1Api", "list_node"),
    Kind.POD: ("CoreV1Api", "list_pod_for_all_namespaces"),
    Kind.SERVICE: ("CoreV1Api", "list_service_for_all_namespaces"),
    Kind.ENDPOINT_SLICE: ("DiscoveryV1Api", "list_endpoint_slice_for_all_namespaces"),
    Kind.NETWORK_POLICY: ("NetworkingV1Api", "list_network_policy_for_all_namespaces"),
}


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused():
    """Suspend the cyclic collector while decoding and parsing a batch.

    Decoding one 500-object page allocates some 100,000 containers that all
    survive until the page is parsed; each gen0/gen1 collection promotes
    them and the growing old generation triggers full collections of the
    whole heap, which measured 3-4x the cost of the decoding itself. JSON
    decoding and model parsing create no reference cycles, so nothing is
    lost by not collecting during them. Counted, so overlapping reflectors
    re-enable the collector only when the last one is done.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


class _Expired(Exception):
    """The server no longer has history from our resourceVersion (410 Gone)."""


# Freeze only after pages of a big list; small lists leave nothing worth it.
_FREEZE_MIN = 500


class _WatchError(Exception):
    """An ERROR event other than 410 inside a watch stream."""


def make_api_client(kubeconfig: Optional[str] = None, context: Optional[str] = None,
                    host: Optional[str] = None):
    """An ApiClient for the source: in-cluster service account, else kubeconfig,
    or a plain `host` URL (the fake API server of tests and benchmarks)."""
    from kubernetes import client, config
    cfg = client.Configuration()
    if host is not None:
        cfg.host = host
    elif kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context,
                                client_configuration=cfg, persist_config=False)
    # The reflectors retry with their own backoff and say so once; urllib3's
    # silent immediate retries would only hide and multiply the attempts.
    cfg.retries = False
    # One long-lived watch per kind plus lists in flight: a smaller pool would
    # make urllib3 discard connections and warn.
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, 2 * len(ALL_KINDS) + 4)
    return client.ApiClient(cfg)


def _classify(e: BaseException) -> str:
    """A short, bounded metric label for a failed request."""
    status = getattr(e, "status", None)
    if isinstance(status, int) and status > 0:
        return f"http_{status}"
    if isinstance(e, _WatchError):
        return "watch_error"
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        return "decode"
    return "unreachable"


class KubernetesSource(Source):
    kind_name = "kubernetes"

    def __init__(self, store: Store, *, node_name: str = "", metrics=None,
                 watch_all_pods: bool = False, api_client=None,
                 resync_seconds: float = 900.0, min_watch_seconds: float = 300.0,
                 page_size: int = 500, backoff_initial: float = 0.5,
                 backoff_cap: float = 30.0, connect_timeout: float = 10.0,
                 freeze_gc: bool = True):
        super().__init__(store, metrics)
        from kubernetes import client
        self.api = api_client if api_client is not None else make_api_client()
        self.node_name = node_name
        self.resync_seconds = resync_seconds
        self.min_watch_seconds = min_watch_seconds
        self.page_size = page_size
        self.connect_timeout = connect_timeout
        self.freeze_gc = freeze_gc
        self._health_lock = threading.Lock()
        self._down_since: Optional[float] = None
        self._reflectors = []
        for kind in ALL_KINDS:
            cls_name, fn_name = _LIST_FUNCS[kind]
            fn = getattr(getattr(client, cls_name)(self.api), fn_name)
            selector = ""
            if kind == Kind.POD and node_name and not watch_all_pods:
                selector = f"spec.nodeName={node_name}"
            elif kind == Kind.NODE and node_name:
                selector = f"metadata.name={node_name}"
            self.kinds[kind].scope = f"node {node_name}" if selector else "all"
            self._reflectors.append(_Reflector(self, kind, fn, selector,
                                               Backoff(backoff_initial, backoff_cap)))

    @property
    def host(self) -> str:
        return self.api.configuration.host

    def describe_source(self) -> str:
        return f"kubernetes {self.host}"

    def lookup_pod(self, namespace: str, name: str, timeout: float):
        """GET one Pod (bounded by `timeout` seconds): the parsed Pod, None
        if the API has none (404), or an exception if it cannot answer."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        timeout = max(0.05, timeout)
        try:
            resp = client.CoreV1Api(self.api).read_namespaced_pod(
                name, namespace, _preload_content=False,
                _request_timeout=(min(timeout, self.connect_timeout), timeout))
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        try:
            data = resp.data
        finally:
            resp.release_conn()
        obj = parse_object(json.loads(data), Kind.POD)
        return obj

    def start(self) -> "KubernetesSource":
        log.info("watching the Kubernetes API at %s (pods: %s, nodes: %s)", self.host,
                 self.kinds[Kind.POD].scope, self.kinds[Kind.NODE].scope)
        for r in self._reflectors:
            r.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for r in self._reflectors:
            r.interrupt()
        deadline = time.monotonic() + timeout
        for r in self._reflectors:
            if r.thread.is_alive():
                r.thread.join(max(0.0, deadline - time.monotonic()))

    # --------------------------------------------------------------- health

    def _connected(self, kind: Kind) -> None:
        st = self.kinds[kind]
        if not st.connected:
            st.connected = True
            self.metrics.api_up.labels(kind=kind.value).set(1)
            if st.errors:
                self.metrics.reconnects.labels(kind=kind.value).inc()
        with self._health_lock:
            if self._down_since is not None and all(s.connected for s in self.kinds.values()):
                log.info("Kubernetes API at %s reachable again after %.1fs", self.host,
                         time.monotonic() - self._down_since)
                self._down_since = None

    def _failed(self, kind: Kind, op: str, e: BaseException, delay: float) -> None:
        st = self.kinds[kind]
        reason = _classify(e)
        was_connected = st.connected
        st.connected = False
        st.errors += 1
        err = str(e).replace("\n", " ")[:300] or type(e).__name__
        st.last_error = f"{op}: {err}"
        self.metrics.api_up.labels(kind=kind.value).set(0)
        self.metrics.api_errors.labels(kind=kind.value, reason=reason).inc()
        if op == "watch" and was_connected:
            # An established stream broke; reconnecting is routine unless the
            # reconnect itself fails, which lands in the branch below.
            log.info("watch of %s interrupted (%s); reconnecting in %.1fs",
                     kind.value, err, delay)
            return
        with self._health_lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            log.warning("Kubernetes API at %s is unreachable (%s of %s failed: %s); "
                        "keeping the last known state, retrying with backoff",
                        self.host, op, kind.value, err)
        else:
            log.debug("%s of %s failed again (%s); retry in %.1fs", op, kind.value,
                      err, delay)

    def _resync_delay(self) -> float:
        if self.resync_seconds <= 0:
            return float("inf")
        return self.resync_seconds * random.uniform(0.9, 1.1)


class _Reflector:
    def __init__(self, src: KubernetesSource, kind: Kind, list_fn, field_selector: str,
                 backoff: Backoff):
        self.src = src
        self.kind = kind
        self.list_fn = list_fn
        self.field_selector = field_selector or None
        self.backoff = backoff
        self.rv = ""
        self._resp = None
        self.thread = threading.Thread(target=self.run, name=f"k8s-{kind.value}", daemon=True)

    def interrupt(self) -> None:
        # Unblock a read in progress: the stream is closed under the reader.
        resp = self._resp
        if resp is None:
            return
        try:
            conn = getattr(resp, "connection", None)
            sock = getattr(conn, "sock", None)
            if sock is not None:
                import socket
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        src = self.src
        need_list, reason = True, "initial"
        resync_at = 0.0
        while not src._stop.is_set():
            op = "list" if need_list else "watch"
            try:
                if need_list:
                    self._list(reason)
                    need_list = False
                    resync_at = time.monotonic() + src._resync_delay()
                    continue
                remaining = resync_at - time.monotonic()
                if remaining <= 0:
                    need_list, reason = True, "resync"
                    continue
                timeout = random.uniform(src.min_watch_seconds, 2 * src.min_watch_seconds)
                self._watch(max(1, int(min(timeout, remaining))))
            except _Expired as e:
                if src._stop.is_set():
                    break
                log.info("%s watch from resourceVersion %s expired (%s); relisting",
                         self.kind.value, self.rv, e)
                src.metrics.api_errors.labels(kind=self.kind.value, reason="expired").inc()
                need_list, reason = True, "expired"
            except Exception as e:  # any failure: back off, never die
                if src._stop.is_set():
                    break
                if isinstance(e, _WatchError):
                    need_list, reason = True, "error"
                delay = self.backoff.next()
                src._failed(self.kind, op, e, delay)
                src._stop.wait(delay)
            finally:
                self._resp = None

    # ----------------------------------------------------------------- list

    def _list(self, reason: str) -> None:
        from kubernetes.client.exceptions import ApiException
        src, kind = self.src, self.kind
        objs = []
        failed_keys = set()
        cont = None
        while True:
            try:
                resp = self.list_fn(limit=src.page_size, _continue=cont,
                                    field_selector=self.field_selector,
                                    _preload_content=False,
                                    _request_timeout=(src.connect_timeout, 120))
            except ApiException as e:
                if e.status == 410:
                    raise _Expired("continue token expired") from e
                raise
            self._resp = resp
            try:
                data = resp.data
            finally:
                resp.release_conn()
                self._resp = None
            src._connected(kind)
            with _gc_paused():
                doc = json.loads(data)
                del data
                meta = doc.get("metadata") or {}
                for raw in doc.get("items") or ():
                    try:
                        obj = parse_object(raw, kind)
                    except ValidationError as err:
                        kept = err.key is not None and src.store.get(kind, err.key) is not None
                        if err.key is not None:
                            failed_keys.add(err.key)
                        src.reject(err, kept_previous=kept)
                        continue
                    objs.append(obj)
                    src.accepted(kind.value, object_name(kind, obj.key))
                del doc
            if src.freeze_gc and len(objs) >= _FREEZE_MIN:
                # A full sync holds millions of long-lived, acyclic objects. Left
                # in the collector's generations they are re-traversed by every
                # full collection while the heap grows. Freezing moves what is
                # alive now out of the collector's view; these objects are still
                # freed by reference counting when replaced. Young cycles are
                # collected first so that no garbage is frozen with them.
                gc.collect(1)
                gc.freeze()
            cont = meta.get("continue")
            if not cont:
                rv = meta.get("resourceVersion", "")
                break
        # Objects whose current version is invalid keep their last good one.
        src.store.replace(kind, objs, origin=f"list {kind.value}",
                          keep=failed_keys.__contains__)
        self.rv = rv
        st = src.kinds[kind]
        st.resource_version = rv
        src.metrics.relists.labels(kind=kind.value, reason=reason).inc()
        self.backoff.reset()
        was_synced = src.synced.is_set()
        src._mark_synced(kind)
        log.debug("listed %d %s at resourceVersion %s (%s)", len(objs), kind.value, rv, reason)
        if src.synced.is_set() and not was_synced:
            log.info("initial sync from %s complete", src.host)

    # ---------------------------------------------------------------- watch

    def _watch(self, timeout: int) -> None:
        src = self.src
        resp = self.list_fn(watch=True, resource_version=self.rv or None,
                            allow_watch_bookmarks=True, timeout_seconds=timeout,
                            field_selector=self.field_selector, _preload_content=False,
                            _request_timeout=(src.connect_timeout, timeout + 30))
        self._resp = resp
        if src._stop.is_set():
            self.interrupt()
        src._connected(self.kind)
        buf = b""
        try:
            for chunk in resp.stream(None, decode_content=False):
                buf += chunk
                if b"\n" not in buf:
                    continue
                lines = buf.split(b"\n")
                buf = lines.pop()
                with _gc_paused():
                    for line in lines:
                        if line.strip():
                            self._event(json.loads(line))
                self.backoff.reset()
                if src._stop.is_set():
                    return
        finally:
            resp.release_conn()

    def _event(self, ev: dict) -> None:
        src, kind = self.src, self.kind
        typ = ev.get("type")
        obj = ev.get("object") or {}
        if typ == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Expired(obj.get("message", "410 Gone"))
            raise _WatchError(f"{code} {obj.get('reason', '')}: {obj.get('message', '')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion") or self.rv
        if typ in ("ADDED", "MODIFIED"):
            try:
                model = parse_object(obj, kind)
            except ValidationError as err:
                kept = err.key is not None and src.store.get(kind, err.key) is not None
                src.reject(err, kept_previous=kept)
            else:
                src.store.upsert(model, origin=f"watch {kind.value}")
                src.accepted(kind.value, object_name(kind, model.key))
        elif typ == "DELETED":
            key = object_key(obj, kind)
            if key is not None:
                src.store.delete(kind, key, origin=f"watch {kind.value}")
                src.forget(kind.value, object_name(kind, key))
        elif typ != "BOOKMARK":
            log.debug("ignoring watch event of type %r for %s", typ, kind.value)
        self.rv = rv
        src.kinds[kind].resource_version = rv
