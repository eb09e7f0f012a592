"""The fake API server answers like the recorded kube-apiserver v1.23.0.

Each recorded exchange the fake supports is replayed against it (same method, path and
body, with names and resourceVersions carried over) and the answers compared: status,
Content-Type, chunked or not where the recording says so, and the body's shape (kind,
reason, code, message, details, for objects the data).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubefake import FakeKube, recordings, running

REC = recordings()


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with running() as f:
        yield f


def exchanges(name: str) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in json.loads((REC / name).read_text())["exchanges"]
            if "request" in x}


def call(f: FakeKube, method: str, path: str, body: str | None = None,
         token: str | None = "ok", content_type: str = "application/json"
         ) -> tuple[int, dict[str, str], str]:
    c = http.client.HTTPConnection(f.host, f.port, timeout=20)
    try:
        h = {"Accept": "application/json"}
        if token is not None:
            h["Authorization"] = f"Bearer {f.token if token == 'ok' else token}"
        if body is not None:
            h["Content-Type"] = content_type
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        c.close()


def recorded(x: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    rs = x["response"]
    return rs["status"], {k.lower(): v for k, v in rs["headers"]}, rs.get("body_json")


def same_shape(got: Any, want: Any, *, exact_message: bool = True) -> None:
    """Same Status (kind, reason, code, message, details) or same object (kind, name, data)."""
    assert got["kind"] == want["kind"]
    if want["kind"] == "Status":
        for k in ("status", "reason", "code"):
            assert got.get(k) == want.get(k), k
        if exact_message:
            assert got.get("message") == want.get("message")
        assert set(got) == set(want)
        if "details" in want:
            assert {k: v for k, v in got["details"].items() if k != "uid"} == \
                {k: v for k, v in want["details"].items() if k != "uid"}
    else:
        assert got["metadata"]["name"] == want["metadata"]["name"]
        assert got.get("data") == want.get("data")
        assert isinstance(got["metadata"]["resourceVersion"], str)


def replay(f: FakeKube, x: dict[str, Any], rv_map: dict[str, str],
           exact_message: bool = True) -> tuple[int, dict[str, str], Any]:
    rq = x["request"]
    body = rq.get("body")
    if body is not None:
        for old, new in rv_map.items():
            body = body.replace(f'"resourceVersion": "{old}"', f'"resourceVersion": "{new}"')
    status, headers, text = call(f, rq["method"], rq["path"], body)
    want_status, want_headers, want_body = recorded(x)
    assert status == want_status, (x["name"], text)
    assert headers["content-type"] == want_headers["content-type"]
    got = json.loads(text)
    same_shape(got, want_body, exact_message=exact_message)
    if status < 300 and got["kind"] != "Status":
        rv_map[want_body["metadata"]["resourceVersion"]] = got["metadata"]["resourceVersion"]
    return status, headers, got


def test_configmap_exchanges(fake: FakeKube) -> None:
    ex = exchanges("configmap-weave-ipam-peers.json")
    rv: dict[str, str] = {}
    for name in ("get-missing-404", "create-201", "get-200", "put-current-rv-200",
                 "put-stale-rv-409", "put-without-resourceVersion-unconditional-200",
                 "create-again-409-AlreadyExists", "put-data-value-not-string-400",
                 "put-name-mismatch-400", "get-final"):
        x = ex[name]
        if name == "put-stale-rv-409":
            # stale: the rv the create returned, now overtaken by put-current-rv-200
            x = json.loads(json.dumps(x))
            rv.pop("352", None)
        replay(fake, x, rv, exact_message=name != "put-data-value-not-string-400")
    _, _, gone = replay(fake, ex["delete-configmap-200"], rv)
    assert gone["status"] == "Success"
    replay(fake, ex["get-after-delete-404"], rv)


def test_node_exchanges_and_chunked_list(fake: FakeKube) -> None:
    ex = exchanges("nodes-crud.json")
    rv: dict[str, str] = {}
    for name in ("create-node-a", "create-node-b", "create-node-c"):
        replay(fake, ex[name], rv)
    status, headers, body = call(fake, "GET", "/api/v1/nodes")
    want_status, want_headers, want = recorded(ex["list-nodes"])
    assert status == want_status
    assert headers.get("transfer-encoding") == want_headers["transfer-encoding"] == "chunked"
    got = json.loads(body)
    assert got["kind"] == want["kind"] == "NodeList"
    assert [i["metadata"]["name"] for i in got["items"]] == \
        [i["metadata"]["name"] for i in want["items"]]
    assert all("kind" not in i for i in got["items"])  # items carry no kind, as recorded
    assert [i["status"]["addresses"] for i in got["items"]] == \
        [i["status"]["addresses"] for i in want["items"]]
    assert got["items"][0]["spec"]["taints"] == want["items"][0]["spec"]["taints"]
    replay(fake, ex["get-node-missing"], rv)
    replay(fake, ex["create-node-a-again-conflict"], rv)


def test_auth_exchanges(fake: FakeKube) -> None:
    ex = exchanges("auth-rbac.json")
    for name, token in (("bad-token-401", "bogus"), ("no-token-anonymous-403", None)):
        x = ex[name]
        status, headers, body = call(fake, "GET", x["request"]["path"], token=token)
        assert status == x["response"]["status"]
        assert json.loads(body) == x["response"]["body_json"]
    fake.forbidden |= {("patch", "configmaps"), ("create", "configmaps")}
    for name in ("sa-patch-configmap-forbidden", "sa-create-configmap-with-resourceNames-rule"):
        x = ex[name]
        status, _, body = call(fake, x["request"]["method"], x["request"]["path"],
                               x["request"].get("body"))
        assert status == 403
        assert json.loads(body) == x["response"]["body_json"]


def read_stream(f: FakeKube, path: str) -> tuple[int, dict[str, str], list[dict[str, Any]]]:
    c = http.client.HTTPConnection(f.host, f.port, timeout=30)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {f.token}"})
        r = c.getresponse()
        body = r.read().decode()  # to the terminating zero-length chunk
        return r.status, {k.lower(): v for k, v in r.getheaders()}, \
            [json.loads(line) for line in body.splitlines()]
    finally:
        c.close()


def test_watch_stream_like_recorded(fake: FakeKube) -> None:
    import threading
    import time

    x = exchanges("nodes-watch.json")["watch-nodes-from-list-rv"]
    want_status, want_headers, _ = recorded(x)
    fake.add_node("node-a", "198.18.0.11")
    start = fake.rv

    def writes() -> None:
        time.sleep(0.3)
        fake.add_node("node-d", "198.18.0.14")
        time.sleep(0.3)
        fake.delete_node("node-d")

    t = threading.Thread(target=writes)
    t.start()
    status, headers, events = read_stream(
        fake, f"/api/v1/nodes?watch=1&resourceVersion={start}&allowWatchBookmarks=true"
        "&timeoutSeconds=3")
    t.join()
    assert status == want_status == 200
    assert headers["content-type"] == want_headers["content-type"]
    assert headers["transfer-encoding"] == want_headers["transfer-encoding"] == "chunked"
    recorded_types = [e["type"] for e in x["stream"]["event_summary"]]
    assert recorded_types[-1] == "BOOKMARK" and "DELETED" in recorded_types
    assert [e["type"] for e in events] == ["ADDED", "DELETED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["resourceVersion"] != \
        events[0]["object"]["metadata"]["resourceVersion"]
    assert set(events[2]["object"]["metadata"]) == {"resourceVersion"}


def test_expired_watch_is_an_error_event_in_a_200_stream(fake: FakeKube) -> None:
    x = exchanges("nodes-watch-expired.json")["watch-from-rv-1"]
    recorded_line = json.loads((REC / "nodes-watch-expired-stream.ndjson").read_text())
    status, headers, events = read_stream(fake, "/api/v1/nodes?watch=1&resourceVersion=1"
                                          "&timeoutSeconds=10")
    assert status == x["response"]["status"] == 200
    assert headers["transfer-encoding"] == "chunked"
    (ev,) = events
    assert ev["type"] == recorded_line["type"] == "ERROR"
    assert set(ev["object"]) == set(recorded_line["object"])
    for k in ("kind", "status", "reason", "code"):
        assert ev["object"][k] == recorded_line["object"][k]
    assert ev["object"]["message"].startswith("too old resource version: 1 (")


def test_watch_without_resource_version_starts_with_added(fake: FakeKube) -> None:
    x = exchanges("nodes-watch-timeout-bookmark.json")["watch-no-rv-initial-state"]
    for n in ("node-a", "node-b", "node-c"):
        fake.add_node(n, "198.18.0.1")
    _, _, events = read_stream(fake, "/api/v1/nodes?watch=1&timeoutSeconds=1")
    assert [e["type"] for e in events] == [e["type"] for e in x["stream"]["event_summary"]]


def test_node_patches_like_recorded(fake: FakeKube) -> None:
    """Annotations change through merge patches (a MODIFIED event, a new resourceVersion;
    a no-op patch neither); podCIDRs cannot change once set (422); plain JSON is 415."""
    crud = exchanges("nodes-crud.json")
    rv: dict[str, str] = {}
    for name in ("create-node-a", "create-node-b"):
        replay(fake, crud[name], rv)
    watch = json.loads((REC / "nodes-watch.json").read_text())
    acts = {a["name"]: a for a in watch["actions"]}
    start = fake.rv
    last_rv: dict[str, str] = {}
    for name in ("merge-patch-annotation-node-a", "strategic-merge-patch-annotation-node-b",
                 "noop-merge-patch-node-a-same-value", "merge-patch-remove-annotation-node-a"):
        rq, want = acts[name]["request"], acts[name]["response"]
        status, _, text = call(fake, "PATCH", rq["path"], rq["body"],
                               content_type=rq["headers"]["Content-Type"])
        got = json.loads(text)
        assert status == want["status"] == 200
        assert got["metadata"].get("annotations") == \
            want["body_json"]["metadata"].get("annotations"), name
        if name.startswith("noop"):  # unchanged resourceVersion, as recorded
            assert got["metadata"]["resourceVersion"] == last_rv[rq["path"]]
        last_rv[rq["path"]] = got["metadata"]["resourceVersion"]
    _, _, events = read_stream(fake, f"/api/v1/nodes?watch=1&resourceVersion={start}"
                               "&timeoutSeconds=1")
    recorded_mods = [(e["type"], e["name"]) for e in
                     watch["exchanges"][0]["stream"]["event_summary"] if e["type"] == "MODIFIED"
                     and e["name"] in ("node-a", "node-b")]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == recorded_mods
    x = crud["patch-node-b-change-podCIDRs-forbidden"]
    status, _, text = call(fake, "PATCH", x["request"]["path"], x["request"]["body"],
                           content_type=x["request"]["headers"]["Content-Type"])
    assert status == 422
    assert json.loads(text) == x["response"]["body_json"]
    x = exchanges("configmap-weave-ipam-peers.json")["patch-with-plain-json-content-type-415"]
    status, _, text = call(fake, "PATCH", "/api/v1/nodes/node-a", x["request"]["body"])
    assert status == 415 and json.loads(text) == x["response"]["body_json"]
