"""Every local API endpoint against a real daemon: good input, bad input, status codes.

Plain-text answers are Weave's (tests/test_weave_compat.py checks them byte for byte);
these tests check our own form too: JSON with precise status and error codes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from daemons import Cluster, Node


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Node]]:
    """One ready IPv4 node, one that can never reach consensus, one IPv6 node."""
    root = Path(tempfile.mkdtemp(prefix="wa-"))
    c = Cluster(root)
    try:
        (ready,) = c.add(1, init="consensus=1", extra=["--ipalloc-default-subnet",
                                                       "10.32.0.0/16"], connect=False)
        (stuck,) = c.add(1, init="consensus=3", extra=["--op-timeout", "1"], connect=False)
        (v6,) = c.add(1, range_="fd00:32::/108", init="consensus=1", connect=False)
        (full,) = c.add(1, range_="10.9.0.0/30", init="consensus=1",
                        extra=["--op-timeout", "1"], connect=False)
        yield {"ready": ready, "stuck": stuck, "v6": v6, "full": full}
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def test_allocate_default_subnet(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    code, body = n.api("POST", "/ip/a1")
    assert code == 200 and body.startswith("10.32.") and body.endswith("/16")
    assert n.api("POST", "/ip/a1") == (200, body)  # repeated: same answer
    assert n.api("POST", "/ip/a1?check-alive=true") == (200, body)
    code, body2 = n.api("POST", "/ip/a2", unix=True)
    assert code == 200 and body2 != body
    code, js = n.api("POST", "/ip/a3", json_=True)
    assert code == 200
    d = json.loads(js)
    assert d["containerid"] == "a3" and d["address"].endswith("/16") and d["prefix"] == 16


def test_allocate_in_subnet(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    code, body = n.api("POST", "/ip/s1/10.33.7.0/24")
    assert code == 200 and body.startswith("10.33.7.") and body.endswith("/24")
    assert body != "10.33.7.0/24" and body != "10.33.7.255/24"
    code, text = n.api("POST", "/ip/s1/10.33.7.9/24", json_=True)  # host bits set: Weave's 400
    assert code == 400 and "10.33.7.0/24" in json.loads(text)["message"]
    for bad in ("/ip/s2/192.168.0.0/24", "/ip/s2/10.33.7.0/abc", "/ip/s2/nonsense/24",
                "/ip/s2/10.33.7.0/40", "/ip/s2/fd00::/64"):
        code, text = n.api("POST", bad)
        assert code == 400, (bad, code, text)
        assert text.strip()
    code, js = n.api("POST", "/ip/s2/192.168.0.0/24", json_=True)
    assert code == 400 and json.loads(js)["error"] == "bad-request"


def test_bad_idents(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    assert n.api("POST", "/ip/" + "x" * 300)[0] == 400
    assert n.api("POST", "/ip/%01bad")[0] == 400
    assert n.api("POST", "/ip/")[0] in (404, 405)


def test_claim(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    assert n.api("PUT", "/ip/c1/10.40.1.2/12") == (204, "")
    assert n.api("PUT", "/ip/c1/10.40.1.2/12") == (204, "")  # idempotent
    assert n.lookup("c1") == []  # outside the default subnet: Weave does not list it
    assert json.loads(n.api("GET", "/ip/c1", json_=True)[1])["addrs"] == ["10.40.1.2/12"]
    assert n.api("GET", "/ip/c1/10.40.0.0/16") == (200, "10.40.1.2/12")
    code, text = n.api("PUT", "/ip/c2/10.40.1.2/12")
    assert code == 400 and "c1" in text  # Weave's status; ours is 409 with a code
    code, text = n.api("PUT", "/ip/c2/10.40.1.2/12", json_=True)
    assert code == 409 and json.loads(text)["error"] == "conflict" and "c1" in text
    assert n.api("PUT", "/ip/c2/192.168.1.1/24")[0] == 400
    assert n.api("PUT", "/ip/c2/bogus/24")[0] == 400
    assert n.api("PUT", "/ip/c2/10.40.1.3/xx")[0] == 400
    assert n.api("PUT", "/ip/c2/fd00::1/64")[0] == 400


def test_lookup_and_list(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    addr = n.allocate("l1")
    code, body = n.api("GET", "/ip/l1")
    assert code == 200 and body == f"{addr}/16"
    code, js = n.api("GET", "/ip/l1", json_=True)
    assert json.loads(js) == {"containerid": "l1", "addrs": [f"{addr}/16"]}
    assert n.api("GET", "/ip/never-seen") == (200, "")  # Weave's: nothing, not an error
    code, text = n.api("GET", "/ip/never-seen", json_=True)
    assert code == 404 and "never-seen" in text
    assert n.api("POST", "/ip/l2?note=default/pod-2")[0] == 200
    code, js = n.api("GET", "/ip", json_=True)
    owned = {o["containerid"]: o for o in json.loads(js)["owned"]}
    assert owned["l1"]["addrs"] == [f"{addr}/16"]
    assert owned["l2"]["notes"] == ["default/pod-2"]


def test_release(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    a = n.allocate("r1")
    b = n.allocate("r1", "/10.34.0.0/24")
    code, js = n.api("GET", "/ip/r1", json_=True)
    assert json.loads(js)["addrs"] == [f"{a}/16", f"{b}/24"]
    assert n.lookup("r1") == [a]  # Weave's GET /ip/{id}: the default subnet's only
    assert n.api("DELETE", f"/ip/r1/{b}") == (204, "")
    assert n.api("DELETE", f"/ip/r1/{b}")[0] == 400
    assert n.api("DELETE", f"/ip/r1/{b}", json_=True)[0] == 404
    assert n.api("DELETE", "/ip/r1/not-an-ip")[0] == 400
    assert n.api("DELETE", "/ip/r1/192.168.9.9")[0] == 400
    assert n.api("DELETE", "/ip/r1") == (204, "")
    assert n.api("DELETE", "/ip/r1") == (400, "Delete: no addresses for r1\n")
    assert n.api("DELETE", "/ip/r1", json_=True)[0] == 404
    assert n.lookup("r1") == []
    n.allocate("r2")
    code, js = n.api("DELETE", "/ip/r2", json_=True)
    assert code == 200 and len(json.loads(js)["released"]) == 1


def test_rmpeer_errors(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    assert n.api("DELETE", "/peer/no-such-peer") == (200, "0 IPs taken over from "
                                                     "no-such-peer\n")
    code, text = n.api("DELETE", "/peer/no-such-peer", json_=True)
    assert code == 404 and "no-such-peer" in text
    code, text = n.api("DELETE", f"/peer/{n.name}", json_=True)
    assert code == 400 and "reset" in text


def test_prime_and_default_subnet(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    assert n.api("GET", "/ring") == (200, "")
    code, body = n.api("GET", "/ring", json_=True)
    assert code == 200 and json.loads(body)["state"] == "ready"
    assert n.api("GET", "/ipinfo/defaultsubnet") == (200, "10.32.0.0/16")
    code, js = n.api("GET", "/ipinfo/defaultsubnet", json_=True)
    assert json.loads(js)["range"] == "10.32.0.0/12"


def test_unavailable_while_awaiting_consensus(nodes: dict[str, Node]) -> None:
    n = nodes["stuck"]
    assert n.status("/readyz")[0] == 503
    code, text = n.api("POST", "/ip/w1")
    assert code == 503 and "timed out" in text
    code, text = n.api("GET", "/ring")  # Weave waits for ever; we for --op-timeout
    assert code == 503 and "awaiting consensus" in text
    code, text = n.api("POST", "/ip/w1")
    assert code == 503
    assert "awaiting consensus (quorum: 2" in text and "consensus=N" in text
    code, js = n.api("POST", "/ip/w1", json_=True)
    assert code == 503 and json.loads(js)["error"] == "unavailable"
    code, text = n.status("/status/ipam")
    assert "awaiting consensus (quorum: 2, known: 1)" in text
    rep = n.report()
    assert rep["paxos"]["quorum"] == 2 and rep["state"] == "awaiting-consensus"
    assert n.status("/readyz")[1].strip()


def test_ipv6_range(nodes: dict[str, Node]) -> None:
    n = nodes["v6"]
    code, body = n.api("POST", "/ip/six")
    assert code == 200 and body.startswith("fd00:32::") and body.endswith("/108")
    assert n.api("PUT", "/ip/six2/fd00:32::abc/108") == (204, "")
    assert n.api("PUT", "/ip/six3/10.32.0.1/12")[0] == 400
    code, body = n.api("POST", "/ip/six4/fd00:32::100/120")
    assert code == 200 and body.endswith("/120")
    assert n.api("DELETE", "/ip/six2/fd00:32::abc") == (204, "")


def test_body_limit_and_unknown_routes(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    code, _ = n.api("POST", "/ip/big", body=b"x" * (70 * 1024))
    assert code == 413
    assert n.lookup("big") == []
    assert n.api("GET", "/nope") == (404, "404 page not found\n")
    assert n.api("PATCH", "/ip/x") == (405, "")
    code, js = n.api("GET", "/nope", json_=True)
    assert code == 404 and json.loads(js)["error"] == "no-such-path"


def test_socket_is_private(nodes: dict[str, Node]) -> None:
    mode = os.stat(nodes["ready"].socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_openapi_describes_every_endpoint(nodes: dict[str, Node]) -> None:
    code, text = nodes["ready"].api("GET", "/openapi.yaml")
    assert code == 200
    doc = yaml.safe_load(text)
    paths = doc["paths"]
    want = {"/ip/{id}": {"post", "get", "delete"},
            "/ip/{id}/{ip}/{prefixlen}": {"post", "put", "get"},
            "/ipinfo/tracker": {"get"}, "/connect": {"post"}, "/forget": {"post"},
            "/ip": {"get"}, "/ip/{id}/{ip}": {"delete"}, "/peer/{name}": {"delete"},
            "/peer": {"delete"}, "/ring": {"get"}, "/ipinfo/defaultsubnet": {"get"},
            "/status": {"get"}, "/status/ipam": {"get"}, "/report": {"get"},
            "/metrics": {"get"}, "/healthz": {"get"}, "/readyz": {"get"},
            "/openapi.yaml": {"get"}}
    for path, verbs in want.items():
        assert path in paths, path
        assert verbs <= set(paths[path]), (path, set(paths[path]))


def test_status_routes_on_socket(nodes: dict[str, Node]) -> None:
    n = nodes["ready"]
    code, text = n.api("GET", "/status/ipam", unix=True)
    assert code == 200 and f"{n.name}(node0)" in text
    code, js = n.api("GET", "/report", unix=True)
    assert code == 200 and json.loads(js)["name"] == n.name


def test_full_range_is_503_and_status_still_renders(nodes: dict[str, Node]) -> None:
    n = nodes["full"]
    got = {n.allocate("f1"), n.allocate("f2")}
    assert got == {"10.9.0.1", "10.9.0.2"}
    code, text = n.api("POST", "/ip/f3", timeout=30)
    assert code == 503 and text.strip()
    assert n.status("/status/ipam")[0] == 200
    assert n.status("/readyz")[0] == 503
    assert n.api("DELETE", "/ip/f1") == (204, "")
    assert n.allocate("f3") == "10.9.0.1"  # freed space is used again (after wrapping)
