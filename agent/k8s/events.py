"""Kubernetes Events the agent records about objects (what a user alerts on).

`record(kind, namespace, name, type, reason, message)` never blocks the
caller and never raises for the API's sake: events go to a bounded queue
that one thread posts (core/v1 Events, `POST
/api/v1/namespaces/<ns>/events`), with the node as the source host and
`fastpath` as the reporting component. The same (object, reason, message)
is posted at most once per `repeat_seconds`; a full queue drops the newest
and says so in the log. With a manifest directory as source there is no
API: `LogEvents` writes them to the agent's log instead.

The service account needs `create` on `events` (deploy/rbac.yaml).
"""
from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from typing import Optional

log = logging.getLogger("fastpath.events")

API_VERSIONS = {"NetworkPolicy": "networking.k8s.io/v1", "Pod": "v1"}
COMPONENT = "fastpath"


def event_body(kind: str, namespace: str, name: str, type_: str, reason: str, message: str,
               node: str, now: Optional[datetime.datetime] = None) -> dict:
    ts = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {"kind": kind, "apiVersion": API_VERSIONS.get(kind, "v1"),
                           "namespace": namespace, "name": name},
        "type": type_, "reason": reason, "message": message[:1024],
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT, "reportingInstance": node,
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
    }


class LogEvents:
    """Events as log lines (no API to post them to)."""

    def __init__(self, node: str):
        self.node = node
        self.recorded: list[dict] = []

    def record(self, kind: str, namespace: str, name: str, type_: str, reason: str,
               message: str) -> None:
        self.recorded.append(event_body(kind, namespace, name, type_, reason, message, self.node))
        (log.warning if type_ == "Warning" else log.info)(
            "event %s %s %s/%s: %s: %s", type_, kind, namespace, name, reason, message)

    def stop(self) -> None:
        pass


def post(api_client, body: dict, timeout: float = 10.0) -> None:
    """Create one Event (the only write the agent makes to the API; the
    ClusterRole grants exactly this: deploy/rbac.yaml)."""
    from kubernetes import client
    resp = client.CoreV1Api(api_client).create_namespaced_event(
        body["metadata"]["namespace"], body, _preload_content=False, _request_timeout=timeout)
    resp.read()          # a connection goes back to the pool emptied
    resp.release_conn()


class KubeEvents:
    """Events posted to the Kubernetes API from a background thread."""

    def __init__(self, api_client, node: str, *, repeat_seconds: float = 600.0,
                 queue_size: int = 256, timeout: float = 10.0):
        self.api = api_client
        self.node = node
        self.repeat_seconds = repeat_seconds
        self.timeout = timeout
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._last: dict[tuple, float] = {}
        self._stop = threading.Event()
        self.posted = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="k8s-events", daemon=True)
        self._thread.start()

    def record(self, kind: str, namespace: str, name: str, type_: str, reason: str,
               message: str) -> None:
        key = (kind, namespace, name, reason, message)
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self.repeat_seconds:
            return
        self._last[key] = now
        try:
            self._q.put_nowait(event_body(kind, namespace, name, type_, reason, message,
                                          self.node))
        except queue.Full:
            log.warning("event queue full: %s %s/%s %s not posted", kind, namespace, name, reason)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                body = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            ns = body["metadata"]["namespace"]
            try:
                post(self.api, body, self.timeout)
                self.posted += 1
            except Exception as exc:     # never let the API take the agent's thread down
                self.failed += 1
                log.warning("event %s on %s %s/%s not posted: %s", body["reason"],
                            body["involvedObject"]["kind"], ns,
                            body["involvedObject"]["name"], str(exc).splitlines()[0][:200])

    def flush(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._q.empty() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def recorder_for(source, node: str):
    """KubeEvents for a Kubernetes source, LogEvents otherwise."""
    api = getattr(source, "api", None)
    if api is not None and getattr(source, "kind_name", "") == "kubernetes":
        return KubeEvents(api, node)
    return LogEvents(node)


__all__ = ["KubeEvents", "LogEvents", "event_body", "recorder_for"]
