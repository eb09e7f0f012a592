"""What operators and strangers do to real daemons: forged hellos, SIGTERM with waiting
work, claims of subnet edges, rmpeer by nickname (issue 9, items 3, 5 and 7)."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time

from daemons import Cluster, Node, cluster, wait_for  # noqa: F401
from stranger import forge_hello

__all__ = ["cluster"]


def _metric(node: Node, name: str, labels: str = "") -> float:
    want = f"{name}{{{labels}}}" if labels else name
    for line in node.status("/metrics")[1].splitlines():
        if line.startswith(want + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {want}")


def _links(node: Node) -> set[tuple[str, str, bool]]:
    return {(c["name"], c["address"], c["outbound"]) for c in node.report()["connections"]
            if c["state"] == "established"}


async def test_forged_hello_with_our_own_name_is_refused_and_changes_nothing(
        cluster: Cluster) -> None:
    (a,) = cluster.add(1, init="consensus=1")
    before = await asyncio.to_thread(a.allocate, "before")
    answers = [await forge_hello("127.0.0.1", a.peer_port, name=a.name, uid=424242)
               for _ in range(3)]
    await asyncio.sleep(0.2)
    assert await asyncio.to_thread(a.allocate, "after") != before
    assert a.status("/readyz") == (200, "ready\n")
    assert a.report()["state"] == "ready"
    for ans in answers:
        assert ans.hello is not None and ans.hello.name == a.name
        assert not ans.accepted and ans.refused and "own name" in ans.refused
    assert _metric(a, "weaveipam_peer_hello_refused_total", 'reason="own-name"') == 3
    log = a.log_tail(200)
    assert re.search(r"refusing hello from 127\.0\.0\.1:\d+ naming itself "
                     + re.escape(a.name) + r"\(stranger\) with uid 424242", log), log


async def test_forged_hello_with_a_connected_peers_name_keeps_the_real_link(
        cluster: Cluster) -> None:
    a, b = cluster.add(2)
    await asyncio.to_thread(a.allocate, "x")
    wait_for(lambda: any(n == b.name for n, _, _ in _links(a)), what="link a-b")
    # both dial at start: in a link's first heartbeat the real peer's second connection may
    # still replace the first (the tie-break); take the link once that window has passed
    await asyncio.sleep(2.5)
    links = _links(a)
    ended = _metric(a, "weave_connection_terminations_total")
    answers = []
    for i in range(5):
        answers.append(await forge_hello("127.0.0.1", a.peer_port, name=b.name, uid=1000 + i))
        await asyncio.sleep(0.2)
    assert _links(a) == links  # the same connection, never re-made: no flapping
    assert _metric(a, "weave_connection_terminations_total") == ended
    for ans in answers:
        assert not ans.accepted and ans.refused and "already connected" in ans.refused
    assert _metric(a, "weaveipam_peer_hello_refused_total", 'reason="name-in-use"') == 5
    assert f"peer {b.name} unreachable" not in a.log_tail(200)
    assert b.name in {p["name"] for p in a.report()["peers"] if p["reachable"]}
    assert await asyncio.to_thread(b.allocate, "y")


def _post_and_leave(node: Node, path: str) -> None:
    """Send a request and hang up at once: a client that has gone."""
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        time.sleep(0.2)


def test_sigterm_with_only_waiting_work_exits_at_once_and_keeps_acknowledged(
        cluster: Cluster) -> None:
    a, b = cluster.add(2)
    acked = {f"k{i}": a.allocate(f"k{i}") for i in range(5)}
    wait_for(lambda: len({e["peer"] for e in a.report()["entries"]}) == 2, what="ring")
    theirs = next(e for e in a.report()["entries"] if e["peer"] == b.name)
    subnet = f"/{theirs['token']}/24"  # space only b can give
    b.kill()
    _post_and_leave(a, f"/ip/gone{subnet}")
    answer: list[tuple[int, str]] = []
    stays = threading.Thread(target=lambda: answer.append(a.api("POST", f"/ip/stays{subnet}",
                                                                timeout=30)))
    stays.start()
    wait_for(lambda: len(a.report()["pending"]) == 2, what="two allocations waiting")
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.proc is not None
    rc = a.proc.wait(5)  # a hang-catching deadline; base waited its whole 10 s grace
    took = time.monotonic() - t0
    print(f"\nSIGTERM to exit with 2 allocations waiting for space: {took:.3f} s")
    stays.join(10)
    assert rc == 0, a.log_tail()
    code, text = answer[0]
    assert code == 503 and "shutting down" in text, answer
    a.start()
    assert {k: a.lookup(k) for k in acked} == {k: [v] for k, v in acked.items()}
    assert a.lookup("gone") == [] and a.lookup("stays") == []


def test_small_things_an_operator_tries(cluster: Cluster) -> None:
    (n,) = cluster.add(1, init="consensus=1")
    n.allocate("first")
    # the subnet's network and broadcast addresses: allocation never hands them out
    for addr, edge in (("10.32.0.15", "broadcast"), ("10.32.0.16", "network")):
        prefix = "28"
        code, text = n.api("PUT", f"/ip/c1/{addr}/{prefix}")
        assert code == 400 and f"is the {edge} address of subnet" in text, (code, text)
    assert n.lookup("c1") == []
    assert n.api("PUT", "/ip/c1/10.32.0.14/28")[0] == 204
    # rmpeer of ourselves explains, by nickname as by name (Weave's text form: its "0 IPs")
    for who in (n.name, n.nickname):
        code, text = n.api("DELETE", f"/peer/{who}", json_=True)
        assert code == 400 and "cannot rmpeer this peer itself" in text, (who, code, text)
        assert n.api("DELETE", f"/peer/{who}") == (200, f"0 IPs taken over from {who}\n")
    # request lines aiohttp refuses: one log line each, no traceback
    for raw in (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", n.http_port), timeout=5) as s:
            s.sendall(raw)
            assert s.recv(100).startswith(b"HTTP/1.0 400")
    wait_for(lambda: n.log_tail(50).count("Error handling request") == 2, what="logged")
    log = n.log_tail(50)
    assert "Traceback" not in log, log
    assert "Got more than 8190 bytes" in log and "Invalid char in url path" in log, log
    assert n.allocate("last")
