"""What operators and strangers do to real daemons (issue 9): a joiner with another
`--ipalloc-init` (item 1), lost state (2), forged hellos (3), reset of a lone node (4),
SIGTERM with waiting work (5), claims of subnet edges and rmpeer by nickname (7)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import threading
import time

from daemons import Cluster, Node, cluster, wait_for  # noqa: F401
from stranger import forge_hello
from test_cli import run

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


# ---- issue 9, items 1, 2 and 4: as its repro says, on real daemons -------------------------

class Unnamed(Node):
    """A daemon started as the README's examples start it: no --name, so the name comes
    from its data dir (a new random one for new state)."""

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--name")
        return argv[:i] + argv[i + 2:]

    def start(self, wait: bool = True) -> Node:
        super().start(wait)
        if wait:
            self.name = self.report()["name"]
        return self


def _unnamed(cluster: Cluster, init: str) -> Unnamed:
    n = Unnamed(len(cluster.nodes), cluster.root, range_="10.32.0.0/12", init=init)
    n.peers = [m.peer_addr for m in cluster.nodes]
    cluster.nodes.append(n)
    return n


def _alloc_many(node: Node, prefix: str, k: int) -> dict[str, str]:
    return {f"{prefix}{i}": node.allocate(f"{prefix}{i}") for i in range(k)}


def _no_split(nodes: list[Node]) -> None:
    for n in nodes:
        rep = n.report()
        assert rep["state"] != "split", (n.nickname, rep["status"])
        assert "seeded by different peers" not in n.status("/status")[1]


def _rings(nodes: list[Node]) -> set[tuple[tuple[str, int, str], ...]]:
    return {tuple((e["token"], e["size"], e["peer"]) for e in n.report()["entries"])
            for n in nodes}


def test_joiners_with_another_consensus_join_the_ring_that_exists(cluster: Cluster) -> None:
    """Item 1: A and B run consensus=2 and hold addresses; C joins with consensus=1 (the
    default) and D with consensus=5, both given A and B as peers, and allocate at once."""
    a, b = cluster.add(2, init="consensus=2")
    held = _alloc_many(a, "a", 5) | _alloc_many(b, "b", 5)
    for init, tag in (("consensus=1", "c"), ("consensus=5", "d")):
        (j,) = cluster.add(1, init=init, start=False)
        j.peers = [a.peer_addr, b.peer_addr]
        j.start()
        got = _alloc_many(j, tag, 10)  # waits for the ring, as a kubelet's first pod does
        assert not set(got.values()) & set(held.values()), (init, got, held)
        assert len(set(got.values())) == 10
        held |= got
        _no_split(cluster.nodes)
    wait_for(lambda: len(_rings(cluster.nodes)) == 1, what="one ring on every node")
    assert {e["peer"] for e in a.report()["entries"]} == {n.name for n in cluster.nodes}
    for n in cluster.nodes:  # all allocate afterwards, nothing handed out twice
        held[f"after-{n.nickname}"] = n.allocate(f"after-{n.nickname}")
    assert len(set(held.values())) == len(held)
    _no_split(cluster.nodes)


def _a_and_unnamed_b_holding(cluster: Cluster) -> tuple[Node, Unnamed, dict[str, str]]:
    """A (named) and B (named by its data dir), consensus=2; A holds 3 addresses, B 10."""
    (a,) = cluster.add(1, init="consensus=2", connect=False, start=False)
    b = _unnamed(cluster, "consensus=2")
    a.peers = [b.peer_addr]
    a.start(wait=False)
    b.start()
    a.wait_up()
    return a, b, _alloc_many(a, "a", 3) | _alloc_many(b, "b", 10)


def _follow_empty_store_advice(b: Node) -> None:
    """What a 0-byte store's message says when there is no backup: move ipam.db aside
    and run `weaveipam reset --data-dir` (with no daemon running)."""
    db = b.data_dir / "ipam.db"
    db.rename(db.with_suffix(".db.aside"))
    r = run("reset", "--data-dir", str(b.data_dir), "--socket", str(b.socket))
    assert r.returncode == 0, r


def test_data_dir_lost_comes_back_as_a_new_peer(cluster: Cluster) -> None:
    """Item 2: B holds 10 addresses, is stopped and its data dir deleted.  It restarts as
    a new peer (a new random name): it never re-issues the old addresses, the status says
    the old name owns space and is unreachable, and rmpeer frees that space."""
    a, b, held = _a_and_unnamed_b_holding(cluster)
    old = b.name
    assert b.stop() == 0
    shutil.rmtree(b.data_dir)
    b.start()
    assert b.name != old
    new_b = _alloc_many(b, "n", 10)
    assert not set(new_b.values()) & set(held.values()), (new_b, held)
    assert b.lookup("b0") == []  # the old records are gone with the data dir
    owners = {e["peer"] for e in a.report()["entries"]}
    assert owners == {a.name, b.name, old}
    status = a.status("/status")[1]
    assert "1 peer(s) owning IP space are unreachable" in status, status
    assert "weaveipam rmpeer NAME" in status, status
    # the old pods are gone: the operator frees the old name's ranges
    code, text = a.api("DELETE", f"/peer/{old}")
    assert code == 200 and f"taken over from {old}" in text, (code, text)
    wait_for(lambda: old not in {e["peer"] for e in b.report()["entries"]}, what="handover")
    assert "unreachable" not in a.status("/status")[1]
    more = _alloc_many(a, "m", 5) | _alloc_many(b, "o", 5)
    assert len(set(more.values()) | set(new_b.values())) == 20


def test_store_emptied_with_the_name_kept_refuses_and_its_advice_is_safe(
        cluster: Cluster) -> None:
    """Item 2: B holds 10 addresses, is stopped and ipam.db truncated to 0 bytes, the
    peer-name file kept.  B refuses to start and says what to do; doing it brings B back
    under a new name that re-issues none of the old addresses."""
    a, b, held = _a_and_unnamed_b_holding(cluster)
    old = b.name
    assert b.stop() == 0
    db = b.data_dir / "ipam.db"
    os.truncate(db, 0)
    assert (b.data_dir / "peer-name").read_text().strip() == old
    b.start(wait=False)
    assert b.proc is not None and b.proc.wait(30) == 1
    said = b.log_tail(10)
    assert "is empty (0 bytes)" in said and "never replaces a store silently" in said, said
    assert f"weaveipam reset --data-dir {b.data_dir}`" in said, said
    assert "Traceback" not in said
    assert db.stat().st_size == 0  # left as it was
    _follow_empty_store_advice(b)
    b.start()
    assert b.name != old
    log = b.log_tail(20)
    assert f"The earlier peer {old} of this data dir lost its state" in log, log
    assert f"run `weaveipam rmpeer {old}` on another node" in log, log
    new_b = _alloc_many(b, "n", 10)
    assert not set(new_b.values()) & set(held.values()), (new_b, held)
    _no_split(cluster.nodes)


def test_store_lost_under_a_kept_name_stops_with_lost_state(cluster: Cluster) -> None:
    """Item 2 for an operator who pins --name: the store is gone, the name given again.
    The node stops in `lost-state` (nothing handed out) and says what to do; doing it
    (restart without --name, rmpeer the old name) ends with no address twice."""
    a, b = cluster.add(2)
    held = _alloc_many(a, "a", 3) | _alloc_many(b, "b", 10)
    assert b.stop() == 0
    for f in b.data_dir.glob("ipam.db*"):
        f.unlink()
    b.start()
    rep = wait_for(lambda: (r := b.report())["state"] == "lost-state" and r,
                   what="lost-state")
    assert "none are handed out" in rep["status"] or "lost" in rep["status"], rep
    code, text = b.api("POST", "/ip/fresh")
    assert code == 503, (code, text)
    assert "data dir was lost" in text and f"weaveipam rmpeer {b.name}" in text, text
    assert "drop --name" in text, text
    assert b.status("/readyz")[0] == 503
    assert a.allocate("a-meanwhile") not in held.values()
    # the advice: a new name (a new data dir gets one), then rmpeer of the old one
    old = b.name
    assert b.stop() == 0
    nb = _unnamed(cluster, b.init)
    nb.peers = list(b.peers)
    # without --name on the same data dir the name comes from the (new, empty) store:
    # the same name, and still lost-state; nothing is handed out
    nb.data_dir = b.data_dir
    nb.start()
    assert nb.name == old
    wait_for(lambda: nb.report()["state"] == "lost-state", what="lost-state again")
    assert nb.api("POST", "/ip/fresh")[0] == 503
    assert nb.stop() == 0
    nb.data_dir = b.dir / "data-new"  # "a new data dir gets one"
    nb.start()
    assert nb.name != old
    got = _alloc_many(nb, "n", 10)
    assert not set(got.values()) & set(held.values()), (got, held)
    code, text = a.api("DELETE", f"/peer/{old}")
    assert code == 200, (code, text)
    wait_for(lambda: len(_rings([a, nb])) == 1, what="one ring")
    assert old not in {e["peer"] for e in nb.report()["entries"]}
    assert nb.allocate("after") not in got.values()


def test_lost_store_back_alone_with_consensus_1_never_seeds_a_ring_of_its_own(
        cluster: Cluster) -> None:
    """Item 2 with item 1, found by the simulator: B's store is lost and B comes back under
    its name, with `consensus=1` and A (the only other holder of the ring) down.  B used to
    seed a ring of its own after 5 s and hand out addresses the cluster's pods hold.  It
    waits instead, says why, and once A is back it stops in lost-state."""
    a, b = cluster.add(2)
    held = _alloc_many(a, "a", 3) | _alloc_many(b, "b", 5)
    assert a.stop() == 0 and b.stop() == 0
    for f in b.data_dir.glob("ipam.db*"):
        f.unlink()
    b.init = "consensus=1"
    b.start()
    time.sleep(7.0)  # past the 5 s after which it used to seed alone
    rep = b.report()
    assert rep["state"] in ("idle", "awaiting-consensus"), rep
    assert rep["entries"] == [], rep["entries"]
    assert "no peer reachable yet" in rep["advice"] and "give it no peers" in rep["advice"]
    assert b.status("/readyz")[0] == 503
    a.start()
    wait_for(lambda: b.report()["state"] == "lost-state", what="lost-state once A answers")
    code, text = b.api("POST", "/ip/fresh")
    assert code == 503 and "data dir was lost" in text, (code, text)
    assert a.allocate("a-after") not in held.values()
    _no_split(cluster.nodes)


def test_a_lone_node_given_only_its_own_address_still_starts_alone(cluster: Cluster) -> None:
    """The other side of waiting for a peer: a shared peer list on a cluster's only node
    names only the node itself, and that is no peer; it seeds and allocates."""
    (n,) = cluster.add(1, init="consensus=1", start=False)
    n.peers = [n.peer_addr]
    n.start()
    assert n.allocate("x", timeout=20.0).startswith("10.32.")
    assert n.report()["state"] == "ready"


def test_reset_of_a_lone_node_with_allocations(cluster: Cluster) -> None:
    """Item 4: reset on a lone node holding 5 addresses is refused with the reason and
    changes nothing, also over a restart; --force is accepted and says what it dropped."""
    (n,) = cluster.add(1, init="consensus=1")
    held = _alloc_many(n, "p", 5)
    code, text = n.api("DELETE", "/peer")
    assert code == 409, (code, text)
    assert "5 addresses are still allocated here" in text, text
    assert "no peer is reachable to take the ranges" in text, text
    assert "weaveipam reset --force" in text, text
    assert {k: n.lookup(k) for k in held} == {k: [v] for k, v in held.items()}
    assert n.report()["state"] == "ready"
    assert n.stop() == 0
    n.start()
    wait_for(lambda: n.status("/readyz")[0] == 200, what="ready after the restart")
    assert {k: n.lookup(k) for k in held} == {k: [v] for k, v in held.items()}
    again = _alloc_many(n, "q", 5)
    assert not set(again.values()) & set(held.values()), (again, held)
    # forced: the operator knows the pods are gone
    code, text = n.api("DELETE", "/peer?force=true", json_=True)
    assert code == 200, (code, text)
    assert json.loads(text)["dropped"] == 10, text
    assert all(n.lookup(k) == [] for k in held | again)


def test_reset_of_a_node_with_pod_routes_exits_cleanly_and_removes_them() -> None:
    """`weaveipam reset --force` (hand over, discard, stop) on a --pod-routes daemon: it
    stops with exit 0, no traceback, and none of its routes stay (issue 16, item 3)."""
    from test_cni_routed import RoutedNode, namespace_nodes, routes

    with namespace_nodes(2, RoutedNode) as (n0, n1):
        wait_for(lambda: routes(n0) and routes(n1), what="pod routes on both nodes")
        r = run("reset", "--force", env={"WEAVEIPAM_SOCKET": str(n1.socket)})
        assert r.returncode == 0 and "handed" in r.stdout, r
        assert n1.proc is not None and n1.proc.wait(30) == 0, n1.log_tail()
        assert "Traceback" not in n1.log_tail(), n1.log_tail()
        assert routes(n1) == []


def test_following_the_empty_store_advice_starts_from_empty_state(cluster: Cluster) -> None:
    """Item 2 with the name pinned: B holds 10 addresses and is killed, ipam.db truncated.
    Doing exactly what B then says must start it with empty state, as the advice says,
    and so in `lost-state` (its ranges are in use), not with records brought back."""
    a, b = cluster.add(2)
    held = _alloc_many(b, "b", 10)
    b.kill()  # SIGKILL: the WAL is not checkpointed into ipam.db
    db = b.data_dir / "ipam.db"
    os.truncate(db, 0)
    b.start(wait=False)
    assert b.proc is not None and b.proc.wait(30) == 1
    said = b.log_tail(1)
    assert f"move {db} aside" in said and f"weaveipam reset --data-dir {b.data_dir}`" in said
    _follow_empty_store_advice(b)
    b.start()
    rep = wait_for(lambda: (r := b.report())["state"] in ("ready", "lost-state") and r,
                   what="ready or lost-state")
    back = [k for k in held if b.api("GET", f"/ip/{k}")[0] == 200]
    assert not back, f"records the advice said were lost came back: {back}"
    assert rep["state"] == "lost-state", rep["status"]
