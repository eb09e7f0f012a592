"""The allocator's README rules, each driven through its sans-IO interface with explicit times.

A few allocators are wired by `World`: every output is taken after each call, `Persist`
records go to the node's disk (a `Snapshot`, what a restart starts from), `Send`s cross a
msgpack round trip to the peers linked to the sender, and `Reply`s are kept per request id.
Time moves only when a test says so.
"""

from __future__ import annotations

import copy
import random
from typing import Any

from weaveipam.core.addr import CIDR
from weaveipam.core.allocator import (
    Allocate,
    Allocator,
    Event,
    InitMode,
    Persist,
    Prime,
    Reply,
    RmPeer,
    Send,
)
from weaveipam.core.records import Snapshot
from weaveipam.sim.wire import transit

RANGE = CIDR.parse("10.32.0.0/24")
A, B, C = "peer-a", "peer-b", "peer-c"  # sorted: the heir of C is A, of A is B


class Node:
    def __init__(self, name: str, init: str, now: float, disk: Snapshot | None = None,
                 auto_prime: bool = False, expect_peers: bool = False,
                 universe: CIDR = RANGE) -> None:
        self.name = name
        self.disk = copy.deepcopy(disk) if disk is not None else Snapshot()
        self.alloc = Allocator(name=name, nickname=name[-1], universe=universe,
                               init=InitMode.parse(init), rng=random.Random(name), now=now,
                               snapshot=copy.deepcopy(disk), auto_prime=auto_prime,
                               expect_peers=expect_peers)
        self.outbox: list[Send] = []
        self.replies: dict[int, Reply] = {}
        self.events: list[Event] = []
        self.drain()

    def drain(self) -> None:
        for o in self.alloc.take_outputs():
            if isinstance(o, Persist):
                self.disk.apply(o.record)  # durable before the batch's sends and replies
            elif isinstance(o, Send):
                self.outbox.append(o)
            elif isinstance(o, Reply):
                self.replies[o.rid] = o
            else:
                self.events.append(o)


class World:
    def __init__(self) -> None:
        self.now = 0.0
        self.nodes: dict[str, Node] = {}
        self.links: set[frozenset[str]] = set()
        self.lossy: set[frozenset[str]] = set()  # up, but every message between them is lost
        self.rid = 0

    def add(self, name: str, init: str, disk: Snapshot | None = None,
            auto_prime: bool = False, expect_peers: bool = False) -> Node:
        self.nodes[name] = n = Node(name, init, self.now, disk, auto_prime, expect_peers)
        return n

    def connect(self, a: str, b: str) -> None:
        self.links.add(frozenset((a, b)))
        self.nodes[a].alloc.peer_up(b, b[-1], self.now)
        self.nodes[b].alloc.peer_up(a, a[-1], self.now)
        self.flush()

    def cut(self, a: str, b: str) -> None:
        self.links.discard(frozenset((a, b)))
        self.nodes[a].alloc.peer_down(b, self.now)
        self.nodes[b].alloc.peer_down(a, self.now)
        self.flush()

    def flush(self) -> None:
        """Deliver every message until none is left (each link in order)."""
        for _ in range(10_000):
            for n in self.nodes.values():
                n.drain()
            moving = [(n, s) for n in self.nodes.values() for s in n.outbox]
            if not moving:
                return
            for n in self.nodes.values():
                n.outbox.clear()
            for n, s in moving:
                dests = [s.dest] if s.dest is not None else sorted(self.nodes)
                for d in dests:
                    link = frozenset((n.name, d))
                    if d != n.name and link in self.links and link not in self.lossy:
                        self.nodes[d].alloc.receive(n.name, transit(s.msg)[1], self.now)
        raise AssertionError("messages never stopped")

    def run_until(self, t: float, dt: float = 0.1) -> None:
        while self.now + dt <= t + 1e-9:
            self.now = round(self.now + dt, 6)
            for n in self.nodes.values():
                n.alloc.tick(self.now)
            self.flush()

    def call(self, name: str, req: Any) -> int:
        self.rid += 1
        self.nodes[name].alloc.request(self.rid, req, self.now)
        self.flush()
        return self.rid

    def reply(self, name: str, rid: int) -> Reply | None:
        return self.nodes[name].replies.get(rid)


def ok(w: World, name: str, rid: int) -> Any:
    r = w.reply(name, rid)
    assert r is not None, f"{name}: request {rid} got no answer yet"
    assert r.error is None, f"{name}: {r.error}"
    return r.value


def owners(n: Node) -> dict[int, str]:
    return {tok: e[1] for tok, e in n.alloc.ring.entries.items()}


def seeded(names: tuple[str, ...]) -> World:
    """Nodes seeded with one ring (seed=...), all linked, rings exchanged."""
    w = World()
    for n in names:
        w.add(n, "seed=" + ",".join(names))
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            w.connect(a, b)
    return w


# ---- split ------------------------------------------------------------------------------


def test_rings_seeded_by_different_peers_stop_allocation() -> None:
    """Two groups seeded apart meet: both say `split` with the recovery step, and refuse
    to allocate rather than hand out addresses the other group may hold."""
    w = World()
    w.add(A, f"seed={A}")
    w.add(B, f"seed={B}")
    a1 = ok(w, A, w.call(A, Allocate("pod-a1")))
    b1 = ok(w, B, w.call(B, Allocate("pod-b1")))
    assert a1 == b1  # each believes it owns the whole range: this is what must stop
    w.connect(A, B)
    w.run_until(6.0)  # anti-entropy compares rings within ANTI_ENTROPY * 1.25
    for name, other in ((A, B), (B, A)):
        n = w.nodes[name]
        assert n.alloc.state() == "split"
        rid = w.call(name, Allocate(f"pod-{name}-2"))
        r = w.reply(name, rid)
        assert r is not None and r.error is not None, r
        assert r.error.code == "unavailable"
        assert "seeded by different peers" in r.error.message
        assert "weaveipam reset" in r.error.message  # the recovery step
        assert other in r.error.message
        assert set(owners(n).values()) == {name}  # the other group's ring was not taken in
        assert f"pod-{name}-2" not in n.alloc.allocations()
    assert any(e.level == "error" for e in w.nodes[A].events)


# ---- rmpeer -----------------------------------------------------------------------------


def test_rmpeer_of_a_reachable_peer_is_refused() -> None:
    w = seeded((A, B, C))
    before = owners(w.nodes[A])
    assert C in before.values()
    # asked on the heir itself (A is C's heir)
    r = w.reply(A, w.call(A, RmPeer(C)))
    assert r is not None and r.error is not None and r.error.code == "conflict", r
    assert f"peer {C} is reachable; stop it" in r.error.message  # and what to do
    # asked on B, which cannot reach C, while C's heir A can: forwarded, and refused there
    w.cut(B, C)
    r = w.reply(B, w.call(B, RmPeer(C)))
    assert r is not None and r.error is not None and r.error.code == "conflict", r
    assert f"peer {C} is reachable from {A}" in r.error.message
    w.run_until(3.0)  # longer than the heir's wait: nothing happens later either
    for n in w.nodes.values():
        assert owners(n) == before
        assert C not in n.alloc.ring.removed


def test_a_peer_back_during_the_heirs_wait_is_refused() -> None:
    """The heir waits for every reachable peer's ring before taking over; if the removed
    peer comes back meanwhile it is not gone, even if it is hidden again before the wait
    ends, and the rmpeer is refused at once."""
    w = seeded((A, B, C))
    w.cut(A, C)
    w.cut(B, C)
    before = owners(w.nodes[A])
    w.lossy.add(frozenset((A, B)))  # B's ring never reaches A: A waits TAKEOVER_WAIT
    rid = w.call(A, RmPeer(C))
    w.run_until(1.0)
    assert w.reply(A, rid) is None  # waiting for B
    w.connect(A, C)  # C is back ...
    r = w.reply(A, rid)
    assert r is not None and r.error is not None and r.error.code == "conflict", r
    assert f"peer {C} is reachable" in r.error.message
    w.cut(A, C)  # ... and hidden again before the wait would have ended
    w.run_until(4.0)
    assert owners(w.nodes[A]) == before
    assert C not in w.nodes[A].alloc.ring.removed


def test_rmpeer_of_a_dead_peer_completes_after_the_heirs_wait() -> None:
    """The counterpart of the two refusals: the same rmpeer with C gone takes C's ranges
    once the wait ends, so those tests fail for the rule, not for want of a takeover."""
    w = seeded((A, B, C))
    w.cut(A, C)
    w.cut(B, C)
    w.lossy.add(frozenset((A, B)))
    rid = w.call(A, RmPeer(C))
    w.run_until(1.0)
    assert w.reply(A, rid) is None
    w.run_until(2.5)
    res = ok(w, A, rid)
    assert res["peer"] == C and res["heir"] == A and res["moved"] > 0
    assert C not in owners(w.nodes[A]).values()


def test_rmpeer_whose_heir_is_unreachable_says_which_peer_to_start_or_remove_first() -> None:
    """C's heir is A; asked on B, which reaches neither, the rmpeer cannot be done: it is
    refused at once, naming A and what to do, and changes nothing."""
    w = seeded((A, B, C))
    w.cut(A, C)
    w.cut(B, C)
    w.cut(A, B)
    before = owners(w.nodes[B])
    r = w.reply(B, w.call(B, RmPeer(C)))
    assert r is not None and r.error is not None and r.error.code == "unavailable", r
    assert f"go to {A}, which is unreachable" in r.error.message
    assert f"weaveipam rmpeer {A}" in r.error.message
    w.run_until(3.0)
    assert owners(w.nodes[B]) == before and C not in w.nodes[B].alloc.ring.removed


def test_peers_that_are_each_others_heirs_and_both_gone_are_removed_together() -> None:
    """A and C own the ring, B joined later and owns nothing: A's heir is C and C's is A.
    With both gone, neither can be removed first, and B may not pick another heir from its
    own view of who is alive (across a partition two hosts would pick two): each rmpeer
    alone is refused and says to name both.  Named together (the operator says both are
    gone), the heir is chosen past them and B takes both over."""
    w = seeded((A, C))
    w.add(B, f"seed={A},{C}")
    w.connect(A, B)
    w.connect(B, C)
    w.run_until(1.0)
    assert set(owners(w.nodes[B]).values()) == {A, C}
    for dead in (A, C):
        w.cut(B, dead)
        w.links = {link for link in w.links if dead not in link}
        w.nodes.pop(dead)
    before = owners(w.nodes[B])
    for dead, heir in ((A, C), (C, A)):
        r = w.reply(B, w.call(B, RmPeer(dead)))
        assert r is not None and r.error is not None and r.error.code == "unavailable", r
        assert f"go to {heir} and {heir}'s to {dead}" in r.error.message
        assert f"weaveipam rmpeer {dead} {heir}" in r.error.message
    w.run_until(4.0)
    assert owners(w.nodes[B]) == before
    r = w.reply(B, w.call(B, RmPeer(A, gone=("nobody",))))
    assert r is not None and r.error is not None and r.error.code == "bad-request", r
    assert owners(w.nodes[B]) == before
    for dead, other in ((A, C), (C, A)):
        rid = w.call(B, RmPeer(dead, gone=(other,)))
        w.run_until(w.now + 3.0)
        res = ok(w, B, rid)
        assert res["heir"] == B and res["moved"] > 0, res
    assert set(owners(w.nodes[B]).values()) == {B}
    assert ok(w, B, w.call(B, Allocate("pod-b"))) is not None


def test_rmpeer_of_a_name_that_rejoined_takes_what_it_was_given_since() -> None:
    """C is removed, comes back fresh under its name and is given space by D (its heir);
    B never hears of the grant (D's own heir, A, does: a grant needs it).  A second rmpeer
    of C asked on B must not answer "already removed" from B's stale ring: it goes to the
    heir, which takes C's new space."""
    d = "peer-d"
    w = seeded((A, B, C, d))
    for n in (A, B, d):
        w.cut(n, C)
    ok(w, d, w.call(d, RmPeer(C)))  # D is C's heir
    w.run_until(3.0)
    assert C in w.nodes[B].alloc.ring.removed
    w.nodes.pop(C)
    w.add(C, f"seed={A},{B},{C},{d}")  # fresh state, the same name
    w.lossy.add(frozenset((A, B)))  # B hears nothing of what follows
    w.lossy.add(frozenset((d, B)))
    w.connect(d, C)
    rid = w.call(C, Allocate("pod-c"))
    w.run_until(10.0)
    got = ok(w, C, rid)
    assert w.nodes[d].alloc.ring.owner(got) == C
    assert w.nodes[B].alloc.ring.owner(got) != C  # B's ring is stale
    w.cut(d, C)
    w.nodes.pop(C)
    w.links = {link for link in w.links if C not in link}
    w.lossy.clear()
    rid = w.call(B, RmPeer(C))
    w.run_until(14.0)
    res = ok(w, B, rid)
    assert res["moved"] > 0 and not res.get("already"), res
    assert w.nodes[d].alloc.ring.owner(got) == d


# ---- restarts ---------------------------------------------------------------------------


def test_whole_cluster_restart_allocates_after_the_grace_with_what_it_merged() -> None:
    """Restarted with no peer in sync (every node restarted), a node allocates only once
    SYNC_GRACE has passed, then from its ring merged with its peers'."""
    d = "peer-d"  # C's heir, which must hold C's grant before B does
    w = seeded((A, B, C, d))
    held = ok(w, A, w.call(A, Allocate("pod-a")))
    for n in (B, C, d):
        w.cut(A, n)
    for i in range(80):  # B runs out of its quarter and gets space from C; A hears nothing
        ok(w, B, w.call(B, Allocate(f"pod-b{i}")))
    granted = set(owners(w.nodes[B]).items()) - set(owners(w.nodes[A]).items())
    assert any(o == B for _, o in granted)
    disks = {n: w.nodes[n].disk for n in (A, B)}

    r = World()  # the whole cluster restarts from disk at t=100; A and B come back
    r.now = 100.0
    for n in (A, B):
        r.add(n, f"seed={A},{B},{C},{d}", disk=disks[n])
    r.connect(A, B)
    rid = r.call(A, Allocate("after-restart"))
    r.run_until(109.5)  # SYNC_GRACE is 10 s from the restart
    assert r.reply(A, rid) is None
    assert r.nodes[A].alloc.state() == "rejoining"
    r.run_until(111.0)
    got = ok(r, A, rid)
    a = r.nodes[A].alloc
    assert granted <= set(owners(r.nodes[A]).items())  # B's grant from C, merged
    assert a.ring.digest() == r.nodes[B].alloc.ring.digest()
    assert a.ring.owner(got) == A and got != held
    assert a.allocations()["pod-a"] == {held: ""}  # kept over the restart


def test_a_lone_owner_back_with_old_data_hears_its_peers_before_allocating() -> None:
    """A owned the whole ring; it went down, was removed, and B took everything.  Back with
    its old data, A's ring names only A: with peers given it must not trust that alone, but
    hear B (and stop, removed); with no peer answering, after SYNC_GRACE the ring is A's."""
    w = World()
    w.add(A, f"seed={A}")
    ok(w, A, w.call(A, Allocate("pod-a")))
    w.add(B, f"seed={A}")
    w.connect(A, B)
    w.run_until(1.0)
    assert set(owners(w.nodes[B]).values()) == {A}
    disk = w.nodes[A].disk
    w.cut(A, B)
    w.nodes.pop(A)
    w.links.clear()
    ok(w, B, w.call(B, RmPeer(A)))
    assert set(owners(w.nodes[B]).values()) == {B}
    w.now = 20.0
    w.add(A, f"seed={A}", disk=disk, expect_peers=True)
    rid = w.call(A, Allocate("pod-a2"))
    assert w.reply(A, rid) is None  # not before it heard a peer
    w.connect(A, B)
    w.run_until(22.0)
    r = w.reply(A, rid)
    assert r is not None and r.error is not None, r
    assert w.nodes[A].alloc.state() == "removed"
    # alone, the same disk: after the grace its ring is its own
    r2 = World()
    r2.now = 20.0
    r2.add(A, f"seed={A}", disk=disk, expect_peers=True)
    rid = r2.call(A, Allocate("pod-a2"))
    r2.run_until(29.0)
    assert r2.reply(A, rid) is None
    r2.run_until(31.0)
    assert ok(r2, A, rid) is not None


def test_a_node_given_peers_never_seeds_alone_however_long_none_answers() -> None:
    """Issue 9, hole 2: B's data dir is lost and it comes back, with peers given and
    `consensus=1`, cut off from every peer that holds the ring.  Seeding alone would hand
    out A's addresses from a second ring until the two met; it waits instead, and joins
    A's ring once it hears A."""
    w = seeded((A, B))
    held = ok(w, A, w.call(A, Allocate("pod-a")))
    w.cut(A, B)
    w.nodes.pop(B)
    w.now = 10.0
    w.add(B, "consensus=1", expect_peers=True)  # fresh, given A, A unreachable
    rid = w.call(B, Allocate("pod-b"))
    w.run_until(60.0)
    b = w.nodes[B].alloc
    assert b.ring.is_empty()
    r = w.reply(B, rid)
    assert r is None or r.error is not None, r
    w.connect(A, B)
    w.run_until(62.0)
    assert b.ring.digest() == w.nodes[A].alloc.ring.digest()
    assert held not in b.holder


def test_a_wiped_node_that_seeds_the_same_ring_again_still_sees_its_lost_state() -> None:
    """A's data dir is lost and it comes back under its name with `seed=A,B` and no peer
    given: it seeds the same ring on its own at once (so it was never polled), then B
    connects and A hears B's copy, where its entries are in use.  It must stop
    (lost-state) and hand out nothing, as a joiner does."""
    w = seeded((A, B))
    held = ok(w, A, w.call(A, Allocate("pod-a")))
    w.cut(A, B)
    w.nodes.pop(A)
    w.now = 10.0
    w.add(A, f"seed={A},{B}")  # fresh state, same name, same seeds, no peer given
    w.run_until(11.0)
    assert not w.nodes[A].alloc.ring.is_empty()
    w.connect(A, B)
    rid = w.call(A, Allocate("pod-a2"))
    w.run_until(20.0)
    r = w.reply(A, rid)
    assert r is None or r.error is not None, r  # never an address
    assert w.nodes[A].alloc.state() == "lost-state"
    assert held not in w.nodes[A].alloc.holder


def test_a_mark_waiting_for_its_witness_is_not_undone_by_the_free_count_report() -> None:
    """A small entry (16 addresses): the first allocation marks it used and waits for a
    peer's confirmation.  The periodic free-count report must not show the entry as
    untouched meanwhile: it would undo the mark, and mark and report would take turns for
    ever whenever the confirmation takes longer than the report (no allocation again)."""
    w = World()
    small = CIDR.parse("10.32.0.0/27")
    for n in (A, B):
        w.nodes[n] = Node(n, f"seed={A},{B}", w.now, universe=small)
    w.connect(A, B)
    tok = next(t for t, e in w.nodes[A].alloc.ring.entries.items() if e[1] == A)
    size = w.nodes[A].alloc.ring.end_of(tok) - tok
    assert size <= 16
    w.lossy.add(frozenset((A, B)))  # the confirmation is slow to come
    rid = w.call(A, Allocate("pod-a"))
    w.run_until(2.0)  # several free-count reports
    assert w.reply(A, rid) is None
    assert w.nodes[A].alloc.ring.entries[tok][2] < size  # still marked used
    w.lossy.clear()
    w.run_until(3.0)
    assert ok(w, A, rid) is not None


def test_a_stopped_heir_takes_nothing_over() -> None:
    """B lost its data dir and came back under its name: it stops (lost-state).  A is
    gone and B is A's heir: an rmpeer of A must be refused, not done by a node whose
    state nobody may trust, and A's ranges stay A's."""
    w = seeded((A, B, C))
    ok(w, B, w.call(B, Allocate("pod-b")))
    w.cut(A, B)
    w.cut(B, C)
    w.nodes.pop(B)
    w.add(B, f"seed={A},{B},{C}")  # fresh state, the same name
    w.connect(B, C)
    w.run_until(3.0)
    assert w.nodes[B].alloc.state() == "lost-state"
    w.cut(A, C)
    w.nodes.pop(A)
    w.links = {link for link in w.links if A not in link}
    rid = w.call(C, RmPeer(A))
    w.run_until(8.0)
    r = w.reply(C, rid)
    assert r is not None and r.error is not None, r
    assert "cannot take ranges over now" in r.error.message
    assert A in owners(w.nodes[C]).values()


def test_a_restarted_node_with_an_in_sync_peer_allocates_without_waiting() -> None:
    w = seeded((A, B))
    ok(w, A, w.call(A, Allocate("pod-1")))
    disk = w.nodes[A].disk
    w.cut(A, B)
    w.now = 50.0
    w.add(A, f"seed={A},{B}", disk=disk)  # only A restarts; B stayed in sync
    rid = w.call(A, Allocate("pod-2"))
    assert w.reply(A, rid) is None  # no peer heard yet
    w.connect(A, B)
    w.run_until(51.5)
    assert ok(w, A, rid) is not None


# ---- auto prime -------------------------------------------------------------------------


def test_auto_prime_waits_for_all_or_a_quorum_after_five_seconds() -> None:
    """consensus=3 with 2 of 3 up: consensus starts by itself only after AUTO_PRIME_AFTER,
    with the quorum that is there; with 1 of 3 never; with all 3 at once."""
    w = World()
    for n in (A, B):
        w.add(n, "consensus=3", auto_prime=True)
    w.connect(A, B)
    w.run_until(4.8)
    for n in (A, B):
        assert w.nodes[n].alloc.ring.is_empty()
        assert w.nodes[n].alloc.state() == "idle"
    w.run_until(6.0)
    for n in (A, B):
        assert w.nodes[n].alloc.ring.seeds == (A, B)
        assert w.nodes[n].alloc.can_allocate()

    alone = World()
    alone.add(C, "consensus=3", auto_prime=True)
    alone.run_until(30.0)
    assert alone.nodes[C].alloc.ring.is_empty()
    assert alone.nodes[C].alloc.state() == "idle"

    full = World()
    for n in (A, B, C):
        full.add(n, "consensus=3", auto_prime=True)
    full.connect(A, B)
    full.connect(B, C)
    full.connect(A, C)
    full.run_until(1.0)
    for n in (A, B, C):
        assert full.nodes[n].alloc.ring.seeds == (A, B, C)


def test_without_auto_prime_consensus_waits_for_a_request() -> None:
    w = World()
    for n in (A, B):
        w.add(n, "consensus=3")
    w.connect(A, B)
    w.run_until(20.0)
    assert w.nodes[A].alloc.ring.is_empty()
    rid = w.call(A, Prime())
    w.run_until(21.0)
    assert ok(w, A, rid) == "awaiting-consensus"
    assert w.nodes[B].alloc.ring.seeds == (A, B)


# ---- the heir keeps what must outlive a node's data dir (issue 9) -------------------------


def _disk_ring(n: Node) -> Any:
    import msgpack

    from weaveipam.core.ring import Ring

    assert n.disk.ring is not None
    return Ring.from_wire(msgpack.unpackb(n.disk.ring, raw=False), RANGE)


def test_the_first_address_of_an_entry_waits_for_the_heir_and_the_mark_is_on_its_disk() -> None:
    """A's heir is B.  While B is up but its answers are lost, C may not confirm A's "in
    use" mark in B's place: should A's data dir be lost while C is down, A, back, waits
    for B alone.  (Only while B is unreachable does the next peer in heir order stand in.)
    Once B confirms, the mark is on B's disk, and the allocation is answered."""
    w = seeded((A, B, C))
    w.lossy.add(frozenset((A, B)))
    rid = w.call(A, Allocate("pod-a"))
    w.run_until(3.0)
    assert w.reply(A, rid) is None
    w.lossy.discard(frozenset((A, B)))
    w.run_until(4.0)
    got = ok(w, A, rid)
    a = w.nodes[A].alloc
    t = a.space.owning(got)
    assert t is not None
    disk = _disk_ring(w.nodes[B])
    size = a.ring.end_of(t) - t
    assert disk.entries[t][1] == A and disk.entries[t][2] < size  # marked in use, on B's disk
    # kept over A's restart: the heir need not confirm again while it is away
    w.cut(A, B)
    w.nodes[A] = Node(A, f"seed={A},{B},{C}", w.now, w.nodes[A].disk)
    w.connect(A, C)
    w.run_until(w.now + 12.0)  # restarted with its data: in sync once C answers
    assert ok(w, A, w.call(A, Allocate("pod-a2"))) != got


def test_a_grant_reaches_its_receiver_only_once_the_donors_heir_holds_it() -> None:
    """C's heir is A.  While C's messages to A are lost, B gets no space from C (should
    C's data dir be lost, or rmpeer of C hand its ranges to A, while B is down, A would
    take the piece as C's: two owners).  Once A has the grant on disk, B gets it, well
    before GRANT_WAIT, after which a grant goes anyway (an rmpeer needs the peers' views
    of who is on the ring to agree, and a pending grant's receiver may be new)."""
    w = seeded((A, B, C))
    w.cut(A, B)  # B can ask only C
    w.lossy.add(frozenset((A, C)))
    for i in range(200):
        rid = w.call(B, Allocate(f"pod-b{i}"))
        if w.reply(B, rid) is None:
            break
    else:
        raise AssertionError("B never ran out of space")
    w.run_until(0.9)
    assert w.reply(B, rid) is None, w.reply(B, rid)
    piece = [t for t, o in owners(w.nodes[C]).items()
             if o == B and owners(w.nodes[B]).get(t) != B]
    assert piece  # C gave it, and holds it back
    assert all(t not in _disk_ring(w.nodes[A]).entries for t in piece)
    w.lossy.discard(frozenset((A, C)))
    w.run_until(1.6)
    got = ok(w, B, rid)
    t = w.nodes[B].alloc.space.owning(got)
    assert t is not None and _disk_ring(w.nodes[A]).entries[t][1] == B


def test_a_free_count_larger_than_its_entry_counts_as_used() -> None:
    """A's entry, as B's ring shows it, is at a version older than a grant that cut it:
    the receiver's piece (C's) is known there, A's newer version is not, so the free count
    exceeds the entry.  A wrote after that version and may have handed out addresses:
    back without its data, A must take the entry for used and stop (lost-state)."""
    w = seeded((A, B))
    b = w.nodes[B].alloc
    t = next(t for t, e in b.ring.entries.items() if e[1] == A)
    end = b.ring.end_of(t)
    assert b.ring.entries[t][2] == end - t  # untouched as seeded
    mid = (t + end) // 2
    b.ring._set(mid, (0, C, end - mid))  # the grant's piece, as its receiver gossiped it
    w.cut(A, B)
    w.nodes.pop(A)
    w.add(A, f"seed={A},{B}", expect_peers=True)  # A's data dir is lost, its name kept
    w.connect(A, B)
    rid = w.call(A, Allocate("pod-a"))
    w.run_until(3.0)
    r = w.reply(A, rid)
    assert r is None or r.error is not None, r
    assert w.nodes[A].alloc.state() == "lost-state"
