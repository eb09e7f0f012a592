"""The sans-IO Kubernetes decisions: unit cases, then seeded runs of the harness."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from kubefake import recordings

from weaveipam.kube import harness
from weaveipam.kube import reconcile as rc

REC = recordings()
ME, OTHER = "02:00:00:00:00:01", "02:00:00:00:00:02"


def node(name: str, uid: str, ip: str) -> rc.NodeInfo:
    return rc.NodeInfo(name, uid, (("Hostname", name), ("InternalIP", ip)))


def node_json(name: str, uid: str, ip: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": uid, "resourceVersion": rv},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def started(peer: str = ME, nodes: list[rc.NodeInfo] | None = None,
            cm: dict[str, str] | None = None) -> rc.Reconciler:
    r = rc.Reconciler(node_name="node-a", peer_name=peer, rng=random.Random(1), now=0.0)
    r.start(0.0)
    assert r.take_outputs() == [rc.ListNodes(), rc.ReadMap()]
    r.nodes_listed(nodes or [node("node-a", "u-a", "198.18.0.1"),
                             node("node-b", "u-b", "198.18.0.2")], "100", 0.1)
    r.map_read(cm, "50" if cm is not None else None, 0.2)
    return r


def kinds(outs: list[Any]) -> list[str]:
    return [type(o).__name__ for o in outs]


def test_peers_are_the_other_nodes_internal_ips_and_watch_follows_the_list() -> None:
    r = rc.Reconciler(node_name="node-a", peer_name=ME, rng=random.Random(1), now=0.0)
    r.start(0.0)
    r.take_outputs()
    r.nodes_listed([node("node-a", "u-a", "198.18.0.1"), node("node-b", "u-b", "198.18.0.2")],
                   "214", 0.1)
    outs = r.take_outputs()
    assert rc.WatchNodes("214") in outs
    assert rc.SetPeers(frozenset({"198.18.0.2"})) in outs
    r.node_event("ADDED", node_json("node-c", "u-c", "198.18.0.3", "300"), 0.2)
    assert r.take_outputs()[-1:] == [rc.SetPeers(frozenset({"198.18.0.2", "198.18.0.3"}))]
    r.node_event("BOOKMARK", {"kind": "Node", "metadata": {"resourceVersion": "377"}}, 0.3)
    r.watch_closed(0.4)  # timeoutSeconds: re-watch from the last resourceVersion seen
    assert r.take_outputs() == [rc.WatchNodes("377")]


def test_recorded_expired_watch_relists() -> None:
    r = started()
    r.take_outputs()
    line = (REC / "nodes-watch-expired-stream.ndjson").read_text().splitlines()[0]
    ev = json.loads(line)
    r.node_event(ev["type"], ev["object"], 1.0)
    r.watch_closed(1.0)  # the server closes right after the ERROR: no watch from the old rv
    assert kinds(r.take_outputs()) == ["Note", "ListNodes"]


def test_recorded_watch_stream_updates_the_view() -> None:
    r = started()
    r.take_outputs()
    for line in (REC / "nodes-watch-stream.ndjson").read_text().splitlines():
        ev = json.loads(line)
        r.node_event(ev["type"], ev["object"], 1.0)
    # the recorded stream adds node-d and deletes it again; the last rv is the bookmark's
    assert "node-d" not in r.nodes
    last = json.loads((REC / "nodes-watch-stream.ndjson").read_text().splitlines()[-1])
    assert r.rv == last["object"]["metadata"]["resourceVersion"]


def test_map_write_carries_the_read_version_and_retries_a_conflict_after_jitter() -> None:
    r = started()
    w = [o for o in r.take_outputs() if isinstance(o, rc.WriteMap)]
    assert w == [rc.WriteMap({"node-a": rc.MapEntry(ME, "u-a").encode()}, None)]  # create
    r.map_conflict(0.3)  # AlreadyExists: another daemon created it first
    assert r.take_outputs() == []
    r.tick(0.31)
    assert r.take_outputs() == []  # not at once: jittered
    r.tick(5.0)
    assert r.take_outputs() == [rc.ReadMap()]
    theirs = {"node-b": rc.MapEntry(OTHER, "u-b").encode()}
    r.map_read(theirs, "77", 5.1)
    assert r.take_outputs() == [rc.WriteMap({**theirs, "node-a": rc.MapEntry(ME, "u-a").encode()},
                                         "77")]


def test_unreadable_entry_is_kept() -> None:
    r = started(cm={"node-a": "not json", "x": "{}"})
    (w,) = [o for o in r.take_outputs() if isinstance(o, rc.WriteMap)]
    assert w.data["node-a.unreadable"] == "not json" and w.data["x"] == "{}"


def heir_is_me(_dead: str) -> str:
    return ME


def test_deleted_node_is_reclaimed_once_then_unmapped() -> None:
    cm = {"node-a": rc.MapEntry(ME, "u-a").encode(), "node-b": rc.MapEntry(OTHER, "u-b").encode()}
    r = started(cm=cm)
    r.ring_changed(True, heir_is_me, 0.3)
    r.take_outputs()
    r.node_event("DELETED", node_json("node-b", "u-b", "198.18.0.2", "120"), 1.0)
    outs = r.take_outputs()
    assert rc.RmPeer(OTHER, "node-b") in outs
    assert rc.SetPeers(frozenset()) in outs
    r.tick(1.1)  # a deletion re-reads the map at once
    assert r.take_outputs() == [rc.ReadMap()]
    r.map_read(cm, "50", 1.15)
    r.ring_changed(True, heir_is_me, 1.2)  # nothing new while it runs
    assert not [o for o in r.take_outputs() if isinstance(o, rc.RmPeer | rc.WriteMap)]
    r.rmpeer_done(OTHER, "node-b", "done", "4096 IPs taken over", 2.0)
    outs = r.take_outputs()
    assert rc.WriteMap({"node-a": cm["node-a"]}, "50") in outs  # removed only now
    assert r.reclaimed_total == 1
    r.map_written({"node-a": cm["node-a"]}, "51", 2.1)
    r.tick(20.0)
    assert not [o for o in r.take_outputs() if isinstance(o, rc.RmPeer)]


def test_not_the_heir_does_not_reclaim_and_says_who_will() -> None:
    cm = {"node-a": rc.MapEntry(ME, "u-a").encode(), "node-b": rc.MapEntry(OTHER, "u-b").encode()}
    r = started(cm=cm)
    r.ring_changed(True, lambda d: "02:00:00:00:00:09", 0.3)
    r.node_event("DELETED", node_json("node-b", "u-b", "198.18.0.2", "120"), 1.0)
    assert not [o for o in r.take_outputs() if isinstance(o, rc.RmPeer)]
    assert r.status()["waiting"] == {OTHER: "reclaimed by its heir 02:00:00:00:00:09"}


def test_entry_of_an_unseen_node_waits_for_a_fresh_list() -> None:
    """The map names node-z, our view lacks it: it may be new and our watch behind."""
    cm = {"node-z": rc.MapEntry(OTHER, "u-z").encode()}
    r = rc.Reconciler(node_name="node-a", peer_name=ME, rng=random.Random(1), now=0.0)
    r.start(0.0)
    r.ring_changed(True, heir_is_me, 0.0)
    r.map_read(cm, "50", 0.1)  # read before the LIST answered
    r.nodes_listed([node("node-a", "u-a", "198.18.0.1")], "100", 0.2)
    assert not [o for o in r.take_outputs() if isinstance(o, rc.RmPeer)]
    r.tick(5.0)
    assert rc.ListNodes() not in r.take_outputs()
    r.tick(11.0)  # a LIST sent after we read the entry vouches for it
    assert rc.ListNodes() in r.take_outputs()
    r.nodes_listed([node("node-a", "u-a", "198.18.0.1"), node("node-z", "u-z", "198.18.0.9")],
                   "140", 11.1)
    assert not [o for o in r.take_outputs() if isinstance(o, rc.RmPeer)]  # it exists
    r.node_event("DELETED", node_json("node-z", "u-z", "198.18.0.9", "150"), 12.0)
    assert rc.RmPeer(OTHER, "node-z") in r.take_outputs()


def test_refused_rmpeer_is_retried_and_a_recreated_node_is_left_alone() -> None:
    cm = {"node-a": rc.MapEntry(ME, "u-a").encode(), "node-b": rc.MapEntry(OTHER, "u-b").encode()}
    r = started(cm=cm)
    r.ring_changed(True, heir_is_me, 0.3)
    r.node_event("DELETED", node_json("node-b", "u-b", "198.18.0.2", "120"), 1.0)
    assert rc.RmPeer(OTHER, "node-b") in r.take_outputs()
    r.rmpeer_done(OTHER, "node-b", "refused", "peer is reachable", 1.5)
    assert not [o for o in r.take_outputs() if isinstance(o, rc.RmPeer)]
    # the Node is back under its name (its daemon kept its disk and peer name)
    r.node_event("ADDED", node_json("node-b", "u-b2", "198.18.0.2", "130"), 2.0)
    r.tick(60.0)
    assert not [o for o in r.take_outputs() if isinstance(o, rc.RmPeer)]
    assert r.reclaimed_total == 0


def test_node_back_with_a_new_peer_name_keeps_the_old_for_reclaim() -> None:
    cm = {"node-a": rc.MapEntry(OTHER, "u-a").encode()}
    r = started(cm=cm)  # we are node-a, now as ME; the map still says OTHER
    (w,) = [o for o in r.take_outputs() if isinstance(o, rc.WriteMap)]
    assert rc.MapEntry.decode(w.data["node-a"]) == rc.MapEntry(ME, "u-a", (OTHER,))
    r.map_written(w.data, "51", 0.3)
    r.ring_changed(True, heir_is_me, 0.4)
    assert rc.RmPeer(OTHER, "node-a") in r.take_outputs()
    r.rmpeer_done(OTHER, "node-a", "done", "taken over", 1.0)
    (w,) = [o for o in r.take_outputs() if isinstance(o, rc.WriteMap)]
    assert w.data == {"node-a": rc.MapEntry(ME, "u-a").encode()} and w.resource_version == "51"


def test_api_problems_say_what_to_do() -> None:
    t = rc.ApiProblem("update", "configmaps", 403, "Forbidden", "...").text()
    assert "'update'" in t and "'configmaps'" in t and "Role" in t
    assert "token" in rc.ApiProblem("list", "nodes", 401).text()
    assert "allocation goes on" in rc.ApiProblem("watch", "nodes", None, "", "refused").text()
    r = started()
    r.take_outputs()
    r.nodes_failed(rc.ApiProblem("watch", "nodes", None, "", "connection refused"), 1.0)
    assert "cannot reach" in r.status()["problems"]["nodes"]
    assert kinds(r.take_outputs()) == ["Note"]  # logged once
    r.tick(1.1)
    assert r.take_outputs() == []  # backs off
    r.tick(2.0)
    assert r.take_outputs() == [rc.ListNodes()]  # a LIST tells that the server is back


@pytest.mark.parametrize("seed", range(30))
def test_harness_invariants(seed: int) -> None:
    w = harness.run(seed)
    assert not w.violations, "\n".join(w.violations) + f"\n{w.summary()}"
    assert w.summary()["reclaims"] > 0


def test_harness_catches_a_reclaim_on_mere_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant the bug (absent from our view = deleted): the harness must see it."""
    monkeypatch.setattr(rc.Reconciler, "_vouched",
                        lambda self, node, peer, uid: node not in self.nodes)
    assert any(harness.run(s).violations for s in range(40)), \
        "the harness did not notice reclaims of Nodes that exist"


def test_harness_catches_an_entry_removed_before_rmpeer(monkeypatch: pytest.MonkeyPatch) -> None:
    real = rc.Reconciler._reclaim

    def early(self: rc.Reconciler) -> None:  # unmap as soon as the rmpeer is asked for
        real(self)
        for peer in self._rm_inflight:
            for n, e in self.entries.items():
                if peer in (e.peer, *e.old):
                    self._unmap.setdefault(peer, n)
        self._want_write()

    monkeypatch.setattr(rc.Reconciler, "_reclaim", early)
    assert any(harness.run(s).violations for s in range(40))
