"""Weave's own clients against a real daemon: every answer byte for byte as Weave's.

Each call is sent as raw bytes, exactly as Weave's Go API client (api/ipam.go,
api/weaveapi.go: Go's net/http client, no body, `Content-Length: 0` on POST and PUT) or
the `weave` script (curl, `Accept: */*`, forms with `-d`) sends it, and the status code
and body are compared with what Weave's daemon (ipam/http.go, router/http.go, weaver's
/peer routes, gorilla/mux) answers.  The answers were read from Weave's source: Go's
http.Error adds a newline, http.NotFound is `404 page not found`, mux's wrong verb is 405
with no body.  Our own form (JSON) is checked beside each, so the two never drift.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator

import pytest
from daemons import Cluster, Node, temp_cluster, wait_for

GO_UA = "Go-http-client/1.1"


def go(node: Node, method: str, path: str, form: dict[str, list[str]] | None = None,
       ) -> tuple[int, bytes]:
    """A request as Weave's Go client writes it (api/weaveapi.go httpVerb)."""
    body = b""
    extra = ""
    if form is not None:
        body = urllib.parse.urlencode([(k, v) for k, vs in form.items() for v in vs]).encode()
        extra = "Content-Type: application/x-www-form-urlencoded\r\n"
    length = f"Content-Length: {len(body)}\r\n" if method in ("POST", "PUT") or body else ""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{node.http_port}\r\n"
            f"User-Agent: {GO_UA}\r\n{length}{extra}Accept-Encoding: gzip\r\n\r\n")
    return _send(node, head.encode() + body)


def curl(node: Node, method: str, path: str, data: list[str] | None = None
         ) -> tuple[int, bytes]:
    """A request as the `weave` script's `curl -s -X VERB [-d k=v ...]` writes it."""
    body = "&".join(data or []).encode()
    extra = ""
    if data:
        extra = (f"Content-Length: {len(body)}\r\n"
                 "Content-Type: application/x-www-form-urlencoded\r\n")
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{node.http_port}\r\n"
            f"User-Agent: curl/7.88.1\r\nAccept: */*\r\n{extra}\r\n")
    return _send(node, head.encode() + body)


HEADERS: dict[tuple[str, str], http.client.HTTPMessage] = {}  # (method, path) -> last


def _send(node: Node, raw: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=60) as s:
        s.sendall(raw)
        r = http.client.HTTPResponse(s)
        r.begin()
        method, path = raw.split(b" ", 2)[:2]
        HEADERS[(method.decode(), path.decode())] = r.headers
        return r.status, r.read()


def content_type(method: str, path: str) -> str | None:
    return HEADERS[(method, path)].get("Content-Type")


def ours(node: Node, method: str, path: str) -> tuple[int, dict[str, object]]:
    code, text = node.api(method, path, json_=True)
    return code, json.loads(text)


def our_refusal(node: Node, method: str, path: str) -> tuple[int, object]:
    """Our form of a refusal: (status, error code)."""
    code, js = ours(node, method, path)
    return code, js["error"]


@pytest.fixture(scope="module")
def weave() -> Iterator[Node]:
    with temp_cluster("wc-") as c:
        (n,) = c.add(1, init="consensus=1", connect=False)
        wait_for(lambda: n.status("/readyz")[0] == 200, timeout=30, what="ready")
        yield n


def test_allocate_lookup_and_the_subnet_prefix(weave: Node) -> None:
    n = weave
    assert go(n, "POST", "/ip/c1") == (200, b"10.32.0.1/12")
    assert go(n, "POST", "/ip/c1") == (200, b"10.32.0.1/12")  # repeated: the same
    assert go(n, "GET", "/ip/c1") == (200, b"10.32.0.1/12")
    # AllocateIPInSubnet: the subnet's prefix is kept and shown everywhere
    assert go(n, "POST", "/ip/c2/10.32.5.0/24") == (200, b"10.32.5.1/24")
    assert go(n, "GET", "/ip/c2") == (200, b"10.32.5.1/24")
    assert curl(n, "GET", "/ip/c2/10.32.5.0/24") == (200, b"10.32.5.1/24")
    assert curl(n, "GET", "/ip/c2/10.32.6.0/24") == (200, b"")
    assert curl(n, "GET", "/ip/c1/10.32.5.0/24") == (200, b"")
    assert content_type("GET", "/ip/c2") == "text/plain; charset=utf-8"
    code, body = curl(n, "GET", "/ip")
    assert content_type("GET", "/ip") == "application/json"
    owned = json.loads(body)["owned"]
    assert body.endswith(b"}\n") and b" " not in body  # Go's encoder: compact, newline
    assert {o["containerid"]: o["addrs"] for o in owned} == {
        "c1": ["10.32.0.1/12"], "c2": ["10.32.5.1/24"]}
    assert n.report()["owned"]["c2"] == ["10.32.5.1/24"]
    assert ours(n, "GET", "/ip/c2") == (200, {"containerid": "c2", "addrs": ["10.32.5.1/24"]})


def test_refusals_in_weaves_words(weave: Node) -> None:
    n = weave
    assert curl(n, "POST", "/ip/x/10.32.5.7/24") == (
        400, b"invalid subnet - bits after network prefix are not all zero: 10.32.5.7/24\n")
    assert curl(n, "POST", "/ip/x/10.32.5.0/31") == (
        400, b"invalid subnet - smaller than minimum size 4: 10.32.5.0/31\n")
    assert curl(n, "POST", "/ip/x/bogus/24") == (400, b"invalid CIDR address: bogus/24\n")
    assert curl(n, "POST", "/ip/x/10.64.0.0/24") == (
        400, b"range 10.64.0.0/24 out of bounds: 10.32.0.0/12\n")
    assert curl(n, "DELETE", "/ip/x/bogus") == (400, b"invalid IP Address: bogus\n")
    code, js = ours(n, "POST", "/ip/x/10.32.5.7/24")
    assert code == 400 and js["error"] == "bad-request" and "10.32.5.0/24" in str(js["message"])
    assert content_type("POST", "/ip/x/bogus/24") == "text/plain; charset=utf-8"
    assert HEADERS[("POST", "/ip/x/bogus/24")]["X-Content-Type-Options"] == "nosniff"
    assert HEADERS[("POST", "/ip/x/bogus/24")]["X-Weaveipam-Error"] == "bad-request"
    assert go(n, "GET", "/ip/x") == (200, b"")  # nothing was allocated by any of those


def test_claims(weave: Node) -> None:
    n = weave
    assert go(n, "PUT", "/ip/c4/10.32.100.100/12") == (204, b"")
    assert go(n, "PUT", "/ip/c4/10.32.100.100/12") == (204, b"")
    assert go(n, "PUT", "/ip/c5/10.32.100.100/12") == (
        400, b"Unable to claim: address 10.32.100.100/12 is already owned by c4\n")
    assert our_refusal(n, "PUT", "/ip/c5/10.32.100.100/12") == (409, "conflict")
    # two addresses for one id: space-separated, in the order they were taken
    assert go(n, "PUT", "/ip/c6/10.32.100.101/12") == (204, b"")
    assert go(n, "PUT", "/ip/c6/10.32.100.102/12") == (204, b"")
    assert go(n, "GET", "/ip/c6") == (200, b"10.32.100.101/12 10.32.100.102/12")
    # on purpose (README): outside the range is refused, where Weave records it
    assert go(n, "PUT", "/ip/c7/192.168.1.1/24") == (
        400, b"Unable to claim: address 192.168.1.1 is not inside the allocation range "
             b"10.32.0.0/12\n")
    # on purpose (README): a subnet's network address, which allocation never hands out
    assert go(n, "PUT", "/ip/c7/10.32.100.112/28") == (
        400, b"Unable to claim: address 10.32.100.112 is the network address of subnet "
             b"10.32.100.112/28, which allocation never hands out; claim an address inside "
             b"the subnet\n")
    # on purpose (README): the daemon's own ids, readable but not writable
    code, body = go(n, "POST", "/ip/weave:expose")
    assert code == 400 and b"is reserved" in body
    assert go(n, "GET", "/ip/weave:expose") == (200, b"")
    assert go(n, "GET", "/ip/c7") == (200, b"")  # none of those took anything


def test_releases(weave: Node) -> None:
    n = weave
    assert go(n, "GET", "/ip/never") == (200, b"")  # the weave script: 404 = IPAM disabled
    assert go(n, "GET", "/ip/" + "x" * 300) == (200, b"")
    assert curl(n, "DELETE", "/ip/never/192.168.1.1") == (
        400, b"Unable to free: Free: address 192.168.1.1 not found for never\n")
    assert go(n, "DELETE", "/ip/never") == (400, b"Delete: no addresses for never\n")
    code, got = go(n, "POST", "/ip/r1")
    assert code == 200 and got.endswith(b"/12")
    assert curl(n, "DELETE", "/ip/r1/10.32.0.99") == (
        400, b"Unable to free: Free: address 10.32.0.99 not found for r1\n")
    assert curl(n, "DELETE", "/ip/r1/" + got.split(b"/")[0].decode()) == (204, b"")
    code, again = go(n, "POST", "/ip/r3")  # on purpose (README): no immediate reuse
    assert code == 200 and again != got
    assert go(n, "PUT", "/ip/r2/10.32.0.50/12") == (204, b"")
    assert go(n, "DELETE", "/ip/r2") == (204, b"")
    assert go(n, "DELETE", "/ip/r2") == (400, b"Delete: no addresses for r2\n")
    assert our_refusal(n, "DELETE", "/ip/r2") == (404, "not-found")
    assert go(n, "GET", "/ip/r2") == (200, b"")


def test_info_ring_rmpeer_and_routing(weave: Node) -> None:
    n = weave
    assert go(n, "GET", "/ipinfo/defaultsubnet") == (200, b"10.32.0.0/12")
    assert go(n, "GET", "/ipinfo/tracker") == (200, b"")
    assert curl(n, "GET", "/ring") == (200, b"")
    assert curl(n, "DELETE", "/peer/gone-host") == (200, b"0 IPs taken over from gone-host\n")
    assert our_refusal(n, "DELETE", "/peer/gone-host") == (404, "not-found")
    # this peer itself: Weave takes nothing over and says so; ours explains
    assert curl(n, "DELETE", f"/peer/{n.name}") == (200, f"0 IPs taken over from {n.name}\n"
                                                    .encode())
    assert our_refusal(n, "DELETE", f"/peer/{n.name}") == (400, "bad-request")
    assert curl(n, "GET", "/nowhere") == (404, b"404 page not found\n")
    assert curl(n, "GET", "/ip/a/b/c/d") == (404, b"404 page not found\n")
    assert curl(n, "GET", "/ip/a/b") == (405, b"")  # mux: the path is DELETE's
    assert curl(n, "PATCH", "/ip/c1") == (405, b"")
    assert curl(n, "POST", "/ipinfo/defaultsubnet") == (405, b"")
    assert our_refusal(n, "PATCH", "/ip/c1") == (405, "method-not-allowed")


def test_connect_and_forget_forms(weave: Node) -> None:
    n = weave
    assert curl(n, "POST", "/connect", ["peer=127.0.0.1:9"]) == (200, b"")
    assert n.report()["direct_peers"] == ["127.0.0.1:9"]
    assert curl(n, "POST", "/connect", ["peer=127.0.0.1:10", "peer=127.0.0.1:11",
                                        "replace=true"]) == (200, b"")
    assert n.report()["direct_peers"] == ["127.0.0.1:10", "127.0.0.1:11"]
    code, body = curl(n, "POST", "/connect", ["peer=127.0.0.1:99999"])
    assert code == 400 and b"99999" in body
    assert n.report()["direct_peers"] == ["127.0.0.1:10", "127.0.0.1:11"]  # unchanged
    assert go(n, "POST", "/forget", {"peer": ["127.0.0.1:10", "127.0.0.1:11"]}) == (200, b"")
    assert n.report()["direct_peers"] == []
    assert go(n, "POST", "/connect", {"peer": []}) == (200, b"")  # nothing: still 200


def test_reset(weave: Node) -> None:
    """Last: `weave reset` while addresses are allocated is refused on purpose (README:
    pods may still use them, and they would be handed out again); with `?force=true` it
    hands the ranges away and drops them, with Weave's 204."""
    n = weave
    code, body = curl(n, "DELETE", "/peer")
    assert code == 409 and b"still allocated here" in body and b"--force" in body
    assert our_refusal(n, "DELETE", "/peer") == (409, "conflict")
    assert go(n, "GET", "/ip/c1") == (200, b"10.32.0.1/12")  # nothing was dropped
    assert curl(n, "DELETE", "/peer?force=true") == (204, b"")


def _cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weaveipam", *args, "--socket",
                           str(node.socket)], capture_output=True, text=True, timeout=60)


def test_connected_peers_survive_a_restart() -> None:
    """`weaveipam connect` joins an observer to a ring at run time; restarted with no
    peers on its command line, it dials them again; after `forget` it does not."""
    with temp_cluster("wc-") as c:
        (seed,) = c.add(1, init="consensus=1", connect=False)
        (late,) = c.add(1, init="observer", connect=False)
        assert _cli(late, "connect", "no:port:here").returncode == 2
        r = _cli(late, "connect", seed.peer_addr)
        assert r.returncode == 0 and seed.peer_addr in r.stdout, r.stderr
        addr = wait_for(lambda: late.api("POST", "/ip/after-connect")[1]
                        if late.status("/readyz")[0] == 200 else None,
                        timeout=30, what="observer allocates after connect")
        assert addr.endswith("/12")
        # a claim of an address in a range the other peer owns: Weave's deniedBy words
        token = next(e["token"] for e in late.report()["entries"] if e["peer"] == seed.name)
        other = str(ipaddress.IPv4Address(token) + 5)
        assert curl(late, "PUT", f"/ip/theirs/{other}/12") == (400, (
            f"Unable to claim: address {other}/12 is owned by other peer {seed.name} "
            f"({seed.nickname})\n").encode())
        code, sub = late.api("POST", "/ip/in-sub/10.32.9.0/24")
        assert code == 200 and sub.endswith("/24")
        r = _cli(late, "alloc", "cli-sub", "10.32.9.0/24")  # our CLI (host bits: exit 2)
        assert r.returncode == 0 and r.stdout.startswith("10.32.9."), r.stderr
        _restart(c, late)
        assert late.report()["direct_peers"] == [seed.peer_addr]
        # the subnet's prefix is kept across the restart, in Weave's answers and in ls
        assert late.api("GET", "/ip/in-sub") == (200, sub)
        assert f"in-sub\t{sub}" in _cli(late, "ls").stdout
        wait_for(lambda: _reachable(late, seed), timeout=30, what="redialled after restart")
        r = _cli(late, "forget", seed.peer_addr)
        assert r.returncode == 0 and "no peers" in r.stdout, r.stderr
        _restart(c, late)
        assert late.report()["direct_peers"] == []


def _restart(c: Cluster, node: Node) -> None:
    assert node.stop() == 0
    node.start()


def _reachable(node: Node, other: Node) -> bool:
    return any(p["name"] == other.name and p["reachable"] for p in node.report()["peers"])
