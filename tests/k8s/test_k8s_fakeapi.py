"""The fake API server speaks the real wire format (checked with raw HTTP, no client)."""
from __future__ import annotations

import http.client
import json

import pytest


def get(fake, path: str):
    c = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    c.request("GET", path)
    return c, c.getresponse()


def test_list_has_the_api_server_shape(fake):
    c, r = get(fake, "/api/v1/pods?limit=5")
    doc = json.loads(r.read())
    assert r.status == 200 and doc["kind"] == "PodList" and doc["apiVersion"] == "v1"
    assert int(doc["metadata"]["resourceVersion"]) == fake.resource_version
    assert doc["metadata"]["continue"] and doc["metadata"]["remainingItemCount"] == 35
    assert len(doc["items"]) == 5 and "kind" not in doc["items"][0]
    assert doc["items"][0]["metadata"]["resourceVersion"]


def test_unknown_paths_are_a_404_status(fake):
    c, r = get(fake, "/api/v1/secrets")
    doc = json.loads(r.read())
    assert r.status == 404 and doc["kind"] == "Status" and doc["code"] == 404


def test_watch_is_chunked_json_lines_with_bookmarks(fake):
    rv = fake.resource_version
    fake.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "w"}})
    c, r = get(fake, f"/api/v1/namespaces?watch=true&resourceVersion={rv}"
                     "&allowWatchBookmarks=true&timeoutSeconds=1")
    assert r.status == 200 and r.getheader("Transfer-Encoding") == "chunked"
    events = [json.loads(line) for line in r.read().splitlines() if line]
    assert events[0]["type"] == "ADDED" and events[0]["object"]["kind"] == "Namespace"
    assert events[0]["object"]["metadata"]["name"] == "w"
    # A watch ending on its timeout closes with a bookmark at the latest version.
    assert events[-1]["type"] == "BOOKMARK"
    assert events[-1]["object"]["metadata"]["resourceVersion"] == str(fake.resource_version)


def test_watch_from_a_compacted_version_gets_a_410_expired_event(fake):
    rv = fake.resource_version
    fake.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    fake.compact()
    c, r = get(fake, f"/api/v1/namespaces?watch=true&resourceVersion={rv}")
    (ev,) = [json.loads(line) for line in r.read().splitlines() if line]
    assert ev["type"] == "ERROR"
    assert ev["object"]["code"] == 410 and ev["object"]["reason"] == "Expired"


def test_dropped_watch_ends_without_the_terminating_chunk(fake):
    c, r = get(fake, f"/api/v1/services?watch=true&resourceVersion={fake.resource_version}")
    fake.drop_connections()
    with pytest.raises(http.client.IncompleteRead):
        r.read()


def test_field_selector_filters_lists(fake):
    node = sorted(fake._objects["Node"])[0][1]
    c, r = get(fake, f"/api/v1/pods?fieldSelector=spec.nodeName%3D{node}")
    items = json.loads(r.read())["items"]
    assert items and all(p["spec"]["nodeName"] == node for p in items)
    c, r = get(fake, f"/api/v1/nodes?fieldSelector=metadata.name%3D{node}")
    assert [n["metadata"]["name"] for n in json.loads(r.read())["items"]] == [node]


def test_burst_makes_exactly_the_requested_number_of_changes(fake):
    rv = fake.resource_version
    fake.burst(50)
    assert fake.resource_version == rv + 50
