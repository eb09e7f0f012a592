"""What operators and strangers do to real daemons: forged hellos, SIGTERM with waiting
work, claims of subnet edges, rmpeer by nickname (issue 9, items 3, 5 and 7)."""

from __future__ import annotations

import asyncio
import re

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
