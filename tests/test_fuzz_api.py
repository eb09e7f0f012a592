"""Fuzz the local HTTP API of one live daemon: schemathesis against the OpenAPI document it
serves, then hypothesis on path parameters, request lines and bodies.

Never a 5xx other than a 503 with a reason; the status codes are the documented ones; a
rejected request changes nothing (GET /ip before and after are equal); an accepted DELETE
frees what it named and nothing else; after every case the daemon still answers.  The cases
tried are printed at the end (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from daemons import Node, single_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import status_code_conformance

MAX_BODY = 64 * 1024
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CASES: Counter[str] = Counter()
ACCEPTED_DELETES: list[str] = []
_seq = itertools.count(1)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with single_node("wi-fa-") as n:
        yield n
        print(f"\nfuzz api cases: {dict(CASES)} total={sum(CASES.values())}")


def owned(n: Node) -> Any:
    code, body = n.api("GET", "/ip", json_=True, timeout=10)
    assert code == 200, (code, body)
    return json.loads(body)


def request(n: Node, method: str, path: str, body: bytes | None = None,
            json_: bool = False) -> tuple[int, str]:
    headers = {"Accept": "application/json"} if json_ else {}
    conn = http.client.HTTPConnection("127.0.0.1", n.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def assert_no_server_error(code: int, body: str, what: str) -> None:
    if code == 503:
        assert body.strip(), f"{what}: 503 without a reason"
        return
    assert code < 500, f"{what}: {code} {body[:300]}"


def by_ident(state: Any) -> dict[str, list[str]]:
    return {e["containerid"]: sorted(e["addrs"]) for e in state["owned"]}


def assert_released(before: Any, after: Any, ident: str, whole: bool, what: str) -> None:
    """An accepted DELETE freed what it named and changed nothing else."""
    old, new = by_ident(before), by_ident(after)
    assert ident in old, f"{what}: accepted, but {ident!r} held nothing"
    gone = set(old[ident]) - set(new.get(ident, []))
    if whole:
        assert ident not in new, f"{what}: {ident!r} still holds {new[ident]}"
    else:
        assert len(gone) == 1, f"{what}: released {sorted(gone)} of {old[ident]}"
        assert set(new.get(ident, [])) == set(old[ident]) - gone, f"{what}: {old} -> {new}"
    old.pop(ident)
    new.pop(ident, None)
    assert new == old, f"{what}: other idents changed: {old} -> {new}"


def assert_alive(n: Node) -> None:
    assert n.running(), "daemon died:\n" + n.log_tail()
    ident = f"fuzz-alive-{next(_seq)}"
    assert n.api("POST", f"/ip/{ident}", timeout=5)[0] == 200
    assert n.api("DELETE", f"/ip/{ident}", timeout=5)[0] == 204


# ---- schemathesis ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(node: Node) -> Any:
    url = f"http://127.0.0.1:{node.http_port}/openapi.yaml"
    return schemathesis.openapi.from_url(url)


# DELETE /peer is reset (and with forget=true stops the daemon): not for a fuzzer
schema = schemathesis.pytest.from_fixture("api_schema").exclude(method="DELETE", path="/peer")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi(case: Any, node: Node) -> None:
    CASES["schemathesis"] += 1
    response = case.call(base_url=f"http://127.0.0.1:{node.http_port}", timeout=30)
    assert_no_server_error(response.status_code, response.text,
                           f"{case.method} {case.formatted_path}")
    case.validate_response(response, checks=[status_code_conformance])
    assert node.running(), "daemon died:\n" + node.log_tail()
    owned(node)  # it still answers


# ---- hypothesis: path parameters -------------------------------------------------------------

idents = (st.text(max_size=40)
          | st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=600)
          | st.text(alphabet="/%\\.\x00\x01\x7f\n\r\t ?#&=", max_size=20)
          | st.sampled_from(["", ".", "..", "a/b", "%2F", "%00", "\u202e", "\ufeff", "x" * 256,
                             "x" * 257]))
ip_strings = (st.text(alphabet="0123456789abcdef.:/-x ", max_size=45)
              | st.ip_addresses().map(str)
              | st.text(max_size=20))
prefixes = st.integers(-5, 300).map(str) | st.text(max_size=8) | st.sampled_from(
    ["12", "0", "32", "128", "012", "+1", "1e1", "99999999999999999999"])


def enc(text: str) -> str:
    return quote(text, safe="")


def test_path_params(node: Node) -> None:
    # from an empty daemon, so a fuzzed ident never meets one the schemathesis run left
    for e in owned(node)["owned"]:
        assert request(node, "DELETE", "/ip/" + enc(e["containerid"]))[0] == 204
    assert owned(node)["owned"] == []

    @FUZZ
    @given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]), ident=idents,
           ip=ip_strings, prefix=prefixes, shape=st.integers(0, 2), note=st.none() | idents,
           hit=st.booleans())
    def case(method: str, ident: str, ip: str, prefix: str, shape: int, note: str | None,
             hit: bool) -> None:
        CASES["path-params"] += 1
        start = owned(node)
        if method == "DELETE":
            # something to delete: the ident holds an address (when it is a valid ident),
            # and with `hit` the single-address form names that address
            code, body = request(node, "POST", "/ip/" + enc(ident))
            if code == 200 and hit and shape == 1:
                ip = body.strip().split("/")[0]
        path = "/ip/" + enc(ident)
        if shape == 1:
            path += "/" + enc(ip)
        elif shape == 2:
            path += "/" + enc(ip) + "/" + enc(prefix)
        if note is not None:
            path += "?note=" + enc(note)
        what = f"{method} {path[:200]}"
        before = owned(node)
        code, body = request(node, method, path)
        assert_no_server_error(code, body, what)
        if code >= 400 or method in ("GET",):
            assert owned(node) == before, f"{what} -> {code} changed the state"
        elif method == "DELETE":
            ACCEPTED_DELETES.append(path)
            assert_released(before, owned(node), ident, whole=shape == 0,
                            what=f"{what} -> {code}")
        # undo whatever is left (an accepted POST or PUT, the DELETE's own allocation)
        if by_ident(owned(node)).get(ident):
            rc, rbody = request(node, "DELETE", "/ip/" + enc(ident))
            assert rc in (200, 204), (rc, rbody)
        assert owned(node) == start

    case()
    assert ACCEPTED_DELETES, "no DELETE was accepted: that branch was never tested"
    assert_alive(node)
    assert node.status("/healthz")[0] == 200


@FUZZ
@given(line=st.binary(max_size=200), target=st.binary(max_size=120))
def test_raw_request_lines(node: Node, line: bytes, target: bytes) -> None:
    """Unencoded bytes (control characters, NUL, non-UTF-8) in the request line."""
    CASES["raw-request"] += 1
    before = owned(node)
    statuses: list[int] = []
    for raw in (line + b"\r\n\r\n",
                b"POST /ip/" + target
                + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"):
        with contextlib.closing(socket.create_connection(("127.0.0.1", node.http_port),
                                                         timeout=1)) as s:
            # no half-close: a client that goes away may get no answer to a request
            # that still ran
            with contextlib.suppress(OSError):
                s.sendall(raw)
            data = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    data += chunk
        if data.startswith(b"HTTP/1."):
            status = int(data.split(b" ", 2)[1])
            text = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
            assert_no_server_error(status, text, repr(raw[:100]))
            statuses.append(status)
    after = owned(node)
    if after != before:
        assert 200 in statuses, f"rejected raw requests changed the state: {before} -> {after}"
        # a valid ident after all: release what it got
        old = {e["containerid"] for e in before["owned"]}
        for e in after["owned"]:
            if e["containerid"] not in old:
                assert request(node, "DELETE", "/ip/" + enc(e["containerid"]))[0] == 204
        assert owned(node) == before


# ---- hypothesis: bodies ----------------------------------------------------------------------


@FUZZ
@given(size=st.sampled_from([0, 1, 100, MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, MAX_BODY + 100,
                             MAX_BODY + 4096]) | st.integers(0, MAX_BODY + 4096),
       fill=st.binary(min_size=1, max_size=64),
       method=st.sampled_from(["POST", "PUT", "DELETE"]), json_=st.booleans())
def test_bodies(node: Node, size: int, fill: bytes, method: str, json_: bool) -> None:
    CASES["bodies"] += 1
    body = (fill * (size // len(fill) + 1))[:size]
    ident = f"fuzz-body-{next(_seq)}"
    path = f"/ip/{ident}" + ("/10.32.0.7/12" if method == "PUT" else "")
    before = owned(node)
    try:
        code, text = request(node, method, path, body=body, json_=json_)
    except OSError:  # the daemon may close while a refused body is still being sent
        assert size > MAX_BODY
        code, text = 413, "(closed)"
    assert_no_server_error(code, text, f"{method} {size} bytes")
    if size > MAX_BODY:
        assert code == 413, (size, code, text)
    elif method == "DELETE":  # nothing held: Weave's 400, our JSON 404
        assert code == (404 if json_ else 400), (size, code, text)
    else:
        assert code in (200, 204), (size, code, text)
        assert request(node, "DELETE", f"/ip/{ident}")[0] == 204
    assert owned(node) == before
