"""Real daemon processes on 127.0.0.1: consensus, restart, donation, rmpeer, crashes."""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from daemons import REPO, Cluster, Node, cluster, wait_for  # noqa: F401

__all__ = ["cluster"]


def _alloc_everywhere(nodes: list[Node], per_node: int, prefix: str = "c") -> dict[str, str]:
    """Allocate concurrently on every node; ident -> address."""
    jobs = [(n, f"{prefix}{n.idx}-{i}") for n in nodes for i in range(per_node)]
    with ThreadPoolExecutor(len(jobs)) as ex:
        addrs = list(ex.map(lambda j: j[0].allocate(j[1]), jobs))
    return {ident: a for (_, ident), a in zip(jobs, addrs, strict=True)}


def _metric(node: Node, name: str) -> float:
    for line in node.status("/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def _owners(node: Node) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in node.report()["entries"]:
        out[e["peer"]] = out.get(e["peer"], 0) + e["size"]
    return out


def test_three_peers_agree_allocate_distinct_and_keep_state_over_restart(
        cluster: Cluster) -> None:
    nodes = cluster.add(3)
    got = _alloc_everywhere(nodes, 4)
    assert len(set(got.values())) == len(got), got
    for a in got.values():
        assert ipaddress.ip_address(a) in ipaddress.ip_network("10.32.0.0/12")
    # every node sees one ring seeded by all three
    for n in nodes:
        rep = wait_for(lambda n=n: len(_owners(n)) == 3 and n.report(), what="ring")
        assert sorted(rep["seeds"]) == sorted(m.name for m in nodes)
        assert rep["state"] == "ready"
    # restart with state kept: same address for the same ident
    n0 = nodes[0]
    assert n0.stop() == 0
    n0.start()
    for i in range(4):
        ident = f"c0-{i}"
        assert n0.lookup(ident) == [got[ident]]
        assert n0.allocate(ident) == got[ident]
    fresh = n0.allocate("after-restart")
    assert fresh not in got.values()


def test_seven_peers_consensus(cluster: Cluster) -> None:
    nodes = cluster.add(7)
    got = _alloc_everywhere(nodes, 2)
    assert len(set(got.values())) == 14
    rep = nodes[3].report()
    assert len({e["peer"] for e in rep["entries"]}) == 7
    code, text = nodes[3].status("/status/ipam")
    assert code == 200
    assert sum(1 for line in text.splitlines() if "IPs (" in line) == 7


def test_small_range_donation(cluster: Cluster) -> None:
    nodes = cluster.add(3, range_="10.32.0.0/26")
    first = _alloc_everywhere(nodes, 1, prefix="warm")
    a, b, c = nodes
    share = _owners(a)[a.name]
    assert share < 40
    mine = [a.allocate(f"bulk-{i}") for i in range(40)]  # more than its share: donations
    assert len(set(mine)) == 40
    assert _owners(a)[a.name] > share
    others = [b.allocate(f"b-{i}") for i in range(5)] + [c.allocate(f"c-{i}") for i in range(5)]
    every = mine + others + list(first.values())
    assert len(set(every)) == len(every)
    net = ipaddress.ip_network("10.32.0.0/26")
    for x in every:
        ip = ipaddress.ip_address(x)
        assert ip in net and ip not in (net.network_address, net.broadcast_address)


def test_rmpeer_of_stopped_node_twice_at_once_leaves_one_heir(cluster: Cluster) -> None:
    nodes = cluster.add(4)
    _alloc_everywhere(nodes, 1)
    dead = nodes[3]
    dead_size = _owners(nodes[0])[dead.name]
    dead_tokens = {e["token"] for e in nodes[0].report()["entries"] if e["peer"] == dead.name}
    assert dead.stop() == 0
    for n in nodes[:3]:
        wait_for(lambda n=n: not any(e["peer"] == dead.name and e["reachable"]
                                     for e in n.report()["entries"]),
                 what="peer seen unreachable")
    code, text = nodes[0].status("/status/ipam")
    assert "- unreachable!" in text
    # the same rmpeer on two hosts at once (Weave #1949): one by name, one by nickname
    barrier = threading.Barrier(2)

    def rm(node: Node, who: str) -> tuple[int, str]:
        barrier.wait()
        return node.api("DELETE", f"/peer/{who}")

    with ThreadPoolExecutor(2) as ex:
        r1 = ex.submit(rm, nodes[0], dead.name)
        r2 = ex.submit(rm, nodes[1], dead.nickname)
        res = [r1.result(), r2.result()]
    for (code, body), who in zip(res, (dead.name, dead.nickname), strict=True):
        assert code == 200, res
        assert body.endswith(f" IPs taken over from {who}\n"), res  # as given, as Weave
    assert sum(int(body.split()[0]) for _, body in res) == dead_size

    def settled() -> bool:
        heirs = set()
        for n in nodes[:3]:
            owners = _owners(n)
            if dead.name in owners:
                return False
            heirs.add(n.report()["removed"].get(dead.name))
        return len(heirs) == 1 and None not in heirs

    wait_for(settled, what="one heir everywhere")
    heir = nodes[0].report()["removed"][dead.name]
    assert heir in {n.name for n in nodes[:3]}
    for n in nodes[:3]:  # every range the dead peer had went to that one heir
        assert {e["peer"] for e in n.report()["entries"] if e["token"] in dead_tokens} == {heir}
    # the heir's share grew by exactly the dead peer's share, and the rings agree
    rings = [[(e["token"], e["peer"]) for e in n.report()["entries"]] for n in nodes[:3]]
    assert rings[0] == rings[1] == rings[2]
    # still allocating everywhere, distinct
    got = _alloc_everywhere(nodes[:3], 2, prefix="post")
    assert len(set(got.values())) == 6


def test_sigkill_mid_load_keeps_acknowledged(cluster: Cluster) -> None:
    nodes = cluster.add(2)
    victim = nodes[1]
    victim.allocate("warm")
    acked: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def load(t: int) -> None:
        i = 0
        while not stop.is_set():
            ident = f"k{t}-{i}"
            i += 1
            try:
                code, body = victim.api("POST", f"/ip/{ident}", timeout=5)
            except OSError:
                return
            if code == 200:
                with lock:
                    acked[ident] = body.split("/")[0]

    threads = [threading.Thread(target=load, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 200, timeout=30, what="load")
    victim.signal(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(10)
    victim.proc.wait(10)  # type: ignore[union-attr]
    with lock:
        snapshot = dict(acked)
    assert len(snapshot) >= 200
    victim.start()
    code, body = victim.api("GET", "/ip")
    held = {o["containerid"]: o["addrs"][0].split("/")[0]
            for o in __import__("json").loads(body)["owned"]}
    lost = {k: v for k, v in snapshot.items() if held.get(k) != v}
    assert not lost, f"{len(lost)} acknowledged allocations lost: {list(lost.items())[:5]}"
    # and the survivor never hands them out again
    more = [nodes[0].allocate(f"s-{i}") for i in range(20)]
    assert not set(more) & set(snapshot.values())
    assert victim.allocate("after") not in snapshot.values()


def test_bad_frames_and_stopped_peer_do_not_disturb_local_api(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    a.allocate("x0")
    b.allocate("y0")
    socks = []
    garbage = [b"\x00\x00\x00\x00", b"\xff\xff\xff\xffjunk", b"GET / HTTP/1.1\r\n\r\n",
               b"\x00\x00\x00\x10" + b"\xc1" * 16, bytes(range(256)) * 8,
               b"\x00\x00\x10\x00partial"]
    for g in garbage:
        s = socket.create_connection(("127.0.0.1", a.peer_port))
        s.sendall(g)
        socks.append(s)
    idle = [socket.create_connection(("127.0.0.1", a.peer_port)) for _ in range(5)]
    # a slow peer: b stops reading and answering altogether
    b.signal(signal.SIGSTOP)
    try:
        # each allocation is answered although b is stopped; the client timeout is a
        # deadline for a hang (waiting on b would take --op-timeout, 30 s), not a speed
        for i in range(30):
            a.allocate(f"x{i + 1}", timeout=20)
        assert a.status("/healthz")[0] == 200
    finally:
        b.signal(signal.SIGCONT)
        for s in socks + idle:
            s.close()
    assert a.running() and b.running()
    wait_for(lambda: all(e["reachable"] for e in a.report()["entries"]), what="b back")
    got = {a.allocate("x-late"), b.allocate("y-late")}
    assert len(got) == 2
    assert "bad" in a.log_tail(200).lower() or "frame" in a.log_tail(200).lower()


def test_state_for_another_range_refuses_with_discard_command(cluster: Cluster) -> None:
    (n,) = cluster.add(1, init="consensus=1")
    n.allocate("keep")
    assert n.stop() == 0
    n.range = "10.40.0.0/16"
    proc = subprocess.run(n.argv(), capture_output=True, text=True, timeout=30, cwd=n.dir,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    err = proc.stderr
    assert "10.32.0.0/12" in err and "10.40.0.0/16" in err
    assert f"weaveipam reset --data-dir {n.data_dir}" in err
    assert "--ipalloc-range 10.32.0.0/12" in err
    # the state is untouched: the original range still finds it
    n.range = "10.32.0.0/12"
    n.start()
    assert n.lookup("keep")
    assert n.stop() == 0
    # the discard command given works, and then the new range starts
    rc = subprocess.run([sys.executable, "-m", "weaveipam", "reset", "--data-dir",
                         str(n.data_dir), "--socket", str(n.socket), "--force"],
                        capture_output=True,
                        text=True, timeout=30, env={"PYTHONPATH": str(REPO)})
    assert rc.returncode == 0, rc.stderr
    n.range = "10.40.0.0/16"
    n.start()
    assert n.allocate("new").startswith("10.40.")


def test_status_text_and_metrics_have_weave_names(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    a.allocate("m1")
    code, text = a.status("/status/ipam")
    assert code == 200
    first = text.splitlines()[0]
    assert first.startswith(f"{a.name}(node0)") and "IPs (" in first and "% of total)" in first
    assert "(1 active)" in first
    code, text = a.status("/status")
    assert "Status: ready" in text and "Range: 10.32.0.0/12" in text
    code, metrics = a.status("/metrics")
    assert code == 200
    for name in ('weave_ips{state="local-used"} 1.0', "weave_max_ips 1.048576e+06",
                 "weave_ipam_unreachable_count", "weave_ipam_unreachable_percentage",
                 "weave_ipam_pending_allocates", "weave_ipam_pending_claims",
                 "weave_connections{", "weave_connection_terminations_total",
                 "weaveipam_allocate_seconds_bucket", "weaveipam_release_seconds_bucket"):
        assert name in metrics, name
    wait_for(lambda: 'weave_connections{encryption="no",state="established",type="tcp"} 1.0'
             in a.status("/metrics")[1], what="connection metric")
    assert a.status("/readyz")[0] == 200
    rep = a.report()
    assert {"range", "size", "active", "entries", "pending"} <= set(rep)
    assert {"token", "size", "peer", "nickname", "reachable", "version"} <= set(rep["entries"][0])
    b.stop()
    wait_for(lambda: "weave_ipam_unreachable_count 1.0" in a.status("/metrics")[1],
             what="unreachable metric")
    wait_for(lambda: _metric(a, "weave_connection_terminations_total") >= 1,
             what="termination counted")
    assert "- unreachable!" in a.status("/status/ipam")[1]


def _load_until(node: Node, acked: dict[str, str], stop: threading.Event, t: int) -> None:
    i = 0
    while not stop.is_set():
        ident = f"t{t}-{i}"
        i += 1
        try:
            code, body = node.api("POST", f"/ip/{ident}", timeout=5)
        except OSError:
            return
        if code == 200:
            acked[ident] = body.split("/")[0]


def test_sigterm_mid_load_exits_zero_and_keeps_acknowledged(cluster: Cluster) -> None:
    (n,) = cluster.add(1, init="consensus=1")
    acked: dict[str, str] = {}
    stop = threading.Event()
    threads = [threading.Thread(target=_load_until, args=(n, acked, stop, t))
               for t in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 100, timeout=30, what="load")
    assert n.stop() == 0
    stop.set()
    for t in threads:
        t.join(10)
    snapshot = dict(acked)
    n.start()
    lost = [k for k, v in snapshot.items() if n.lookup(k) != [v]]
    assert not lost, lost[:5]
    assert "stopped" in n.log_tail(5)


def test_cloned_name_is_refused_at_the_handshake_without_stopping_either(
        cluster: Cluster) -> None:
    a, b = cluster.add(2, init="consensus=1", start=False)
    b.name = a.name  # a cloned machine
    for n in (a, b):
        n.start(wait=False)
    for n in (a, b):
        n.wait_up()
    wait_for(lambda: all("claims our own name" in n.log_tail(100) for n in (a, b)),
             what="both refuse the clone")
    for n in (a, b):
        assert not [c for c in n.report()["connections"] if c["state"] == "established"]
        assert n.report()["state"] != "duplicate-name"


def test_second_daemon_on_same_data_dir_refuses(cluster: Cluster) -> None:
    (n,) = cluster.add(1, init="consensus=1")
    argv = n.argv()
    for flag, value in (("--port", "0"), ("--http-addr", ""), ("--status-addr", ""),
                        ("--socket", str(n.dir / "other.sock"))):
        argv[argv.index(flag) + 1] = value
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert "another weaveipam daemon" in proc.stderr and str(n.data_dir) in proc.stderr
    assert n.allocate("still-fine")


async def test_bad_messages_from_a_real_peer_are_ignored(cluster: Cluster) -> None:
    """A peer that speaks the mesh protocol but sends nonsense payloads."""
    import asyncio

    from weaveipam.mesh import Mesh, PeerInfo

    (a,) = cluster.add(1, init="consensus=1")
    before = a.allocate("before")
    up = asyncio.Event()

    def on_up(p: PeerInfo) -> None:
        up.set()

    evil = Mesh(name="0e:vi:l0:00:00:01", nickname="evil", uid=7, host="127.0.0.1", port=0,
                conn_limit=10, on_message=lambda o, p: None, on_peer_up=on_up,
                on_peer_down=lambda n: None)
    await evil.start()
    try:
        evil.add_peer("127.0.0.1", a.peer_port)
        await asyncio.wait_for(up.wait(), 10)
        junk = [{}, {"t": 5}, {"t": "ring"}, {"t": "ring", "full": True, "ring": "x"},
                {"t": "ring", "full": True, "ring": {"u": "10.32.0.0/12", "s": ["z"],
                                                     "e": [[b"\xff" * 4, "z", 1, 99]], "r": []}},
                {"t": "ring", "full": False, "ring": {"u": "10.32.0.0/12", "s": ["z"],
                                                      "e": [[b"\0\0\0\0", "z", -1, 0]],
                                                      "r": []}},
                {"t": "paxos", "c": {"x": [1, 2]}}, {"t": "paxos", "c": [[[]]]},
                {"t": "space?", "w": [10, 1]}, {"t": "space?", "w": ["a", None]},
                {"t": "digest", "d": "nope"}, {"t": "rmpeer", "n": 3, "id": "x"},
                {"t": "rmpeer-done", "id": 1}, {"t": "x" * 10000}, {"t": "ring?"},
                {"t": "rmpeer", "n": "02:00:00:00:00:01", "id": 1}]
        for j in junk:
            evil.send(a.name, j)
        await asyncio.sleep(0.5)
    finally:
        await evil.stop()
    assert a.running()
    assert a.lookup("before") == [before]
    assert await asyncio.to_thread(a.allocate, "after")
    assert "bad message from 0e:vi:l0:00:00:01" in a.log_tail(100)


def test_seed_and_observer(cluster: Cluster) -> None:
    nodes = cluster.add(3, start=False)
    seeds = f"seed={nodes[0].name},{nodes[1].name}"
    nodes[0].init = nodes[1].init = seeds
    nodes[2].init = "observer"
    for n in nodes:
        n.start(wait=False)
    for n in nodes:
        n.wait_up()
    got = _alloc_everywhere(nodes, 2)
    assert len(set(got.values())) == 6
    rep = nodes[2].report()
    assert rep["seeds"] == sorted([nodes[0].name, nodes[1].name])
    assert nodes[2].name in {e["peer"] for e in rep["entries"]}  # the observer got space
