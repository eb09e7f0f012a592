"""Tests for weaveipam.core.ring: the ring CRDT, its seeding, operations and wire form.

Merge laws are checked on *valid* rings only: rings reached from a seeded ring by legal
owner operations (grant, set_free, transfer away from a dead peer), each performed by
the owner on its own replica, with replicas gossiping full rings at random.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weaveipam.core.addr import CIDR, Range
from weaveipam.core.ring import (
    FREE_CAP,
    MARKER,
    MAX_NAME,
    MAX_VERSION,
    TRANSFER_BUMP,
    Ring,
    RingError,
    valid_name,
    valid_names,
)

U4 = CIDR.parse("10.32.0.0/24")
U26 = CIDR.parse("10.32.1.64/26")
U6 = CIDR.parse("fd00:32::/108")
U64 = CIDR.parse("fd00::/64")
PEERS = ["alpha", "bravo", "charlie", "delta", "echo"]
JOINER = "joiner"

State = tuple[list[tuple[int, tuple[int, str, int]]], tuple[str, ...], list[tuple[str, str]]]


def state(r: Ring) -> State:
    return (r.snapshot(), r.seeds, sorted(r.removed.items()))


def wire(r: Ring, tokens: Any = None) -> Any:
    """To wire and through msgpack, as a peer would send it."""
    return msgpack.unpackb(msgpack.packb(r.to_wire(tokens), use_bin_type=True), raw=False)


def roundtrip(r: Ring) -> Ring:
    out = Ring.from_wire(wire(r), r.universe)
    assert isinstance(out, Ring), out
    return out


def merged(a: Ring, *others: Ring) -> Ring:
    x = a.copy()
    for o in others:
        res = x.merge(o)
        assert not isinstance(res, RingError), res
    return x


def seeded(peers: list[str], u: CIDR = U4) -> Ring:
    r = Ring(u)
    r.seed(peers)
    return r


def check_valid(r: Ring) -> None:
    """Structural invariants of a seeded ring, and that it survives its own wire form."""
    toks = list(r.entries.keys())
    assert toks and toks[0] == r.universe.start
    assert all(t in r.universe for t in toks)
    assert r.seeds == tuple(sorted(set(r.seeds)))
    for s, e, (ver, peer, free) in r.iter_ranges():
        # boundary markers (-1, "", 0) only; free is a hint and may exceed a split span
        assert (0 <= ver <= MAX_VERSION and peer) or (ver, peer, free) == (-1, "", 0)
        assert 0 <= free <= FREE_CAP, (s, e, free)
    back = roundtrip(r)
    assert state(back) == state(r)
    assert back.digest() == r.digest()


# ---- a little world of replicas doing legal owner operations ---------------------------


class World:
    """Replicas of one ring, each changed only by legal owner operations.

    With `deltas`, every change an owner makes and every change a merge makes is also
    sent as a delta (as the allocator does), delivered late, twice, or never; otherwise
    replicas only exchange full rings.
    """

    def __init__(self, n_seeds: int, joiner: bool, u: CIDR = U4, deltas: bool = False) -> None:
        self.u = u
        self.deltas = deltas
        self.seeds = PEERS[:n_seeds]
        self.names = self.seeds + ([JOINER] if joiner else [])
        self.rings: dict[str, Ring] = {}
        for i, p in enumerate(self.seeds):
            # every seed peer seeds on its own, from the peer list in its own order
            order = self.seeds[i:] + self.seeds[:i]
            self.rings[p] = seeded(order, u)
        if joiner:
            self.rings[JOINER] = Ring(u)
        self.alive = list(self.names)
        self.net: list[Any] = []

    def send(self, p: str, changed: list[int]) -> None:
        if self.deltas and changed:
            self.net.append(wire(self.rings[p], changed))

    def full(self, q: str) -> Ring:
        other = Ring.from_wire(wire(self.rings[q]), self.u)
        assert isinstance(other, Ring), other
        return other

    def apply(self, op: tuple[str, int, int, int, int]) -> None:
        kind, a, b, c, d = op
        alive = self.alive
        if kind == "deliver" and not self.deltas:
            kind = "merge"
        if kind == "merge":
            p, q = self.names[a % len(self.names)], self.names[b % len(self.names)]
            if p not in alive:
                return
            res = self.rings[p].merge(self.full(q))
            assert not isinstance(res, RingError), res
            self.send(p, res)
            return
        if kind == "deliver":
            if not self.net:
                return
            i = a % len(self.net)
            msg = self.net[i] if c % 3 == 0 else self.net.pop(i)  # duplicate or not
            p = self.names[b % len(self.names)]
            if p not in alive:
                return
            delta = Ring.from_wire(msg, self.u)
            if isinstance(delta, RingError):
                return  # refused by the receiver
            res = self.rings[p].merge(delta)
            if isinstance(res, RingError):
                assert res.kind == "unseeded" and self.rings[p].is_empty(), res
                return
            self.send(p, res)
            return
        if kind == "kill":
            if len(alive) < 2:
                return
            dead = alive[a % len(alive)]
            rest = [p for p in alive if p != dead]
            heir = rest[b % len(rest)]
            ring = self.rings[heir]
            res = ring.merge(self.full(dead))  # rmpeer after the dead peer's ring arrived
            assert not isinstance(res, RingError), res
            before = {s: v for s, _, v in ring.iter_ranges() if v[1] == dead}
            moved, changed = ring.transfer(dead, heir)
            assert sorted(changed) == sorted(before)
            assert moved == sum(e - s for s, e, v in ring.iter_ranges() if s in before)
            for t, v in before.items():
                assert ring.entries[t] == (v[0] + TRANSFER_BUMP, heir, v[2])
            ring.mark_removed(dead, heir)
            alive.remove(dead)
            self.send(heir, changed)
            return
        p = alive[a % len(alive)]
        ring = self.rings[p]
        own = ring.owned_by(p)
        if not own:
            return
        o = own[b % len(own)]
        span = o.end - o.start
        if kind == "free":
            if ring.set_free(o.start, c % (span + 1)):
                self.send(p, [o.start])
            return
        assert kind == "grant"
        others = [q for q in alive if q != p]
        if not others:
            return
        to = others[(a // 7) % len(others)]
        s = o.start + c % span
        e = s + 1 + d % (o.end - s)
        fg = (c ^ d) % (e - s + 1)
        changed = ring.grant(s, e, to, p, fg)
        assert ring.owner(s) == to and ring.owner(e - 1) == to
        assert ring.end_of(s) == e
        assert s in changed
        # as the allocator does: the giver re-reports free counts for what it kept
        for t in changed:
            v = ring.entries[t]
            if v[1] == p:
                ring.set_free(t, min(v[2], ring.end_of(t) - t))
        self.send(p, changed)


OPS = st.tuples(
    st.sampled_from(["grant", "grant", "free", "merge", "deliver", "deliver", "deliver",
                     "kill"]),
    st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 2**16),
)


@st.composite
def worlds(draw: Callable[..., Any], max_ops: int = 40, deltas: bool | None = None) -> World:
    w = World(draw(st.integers(1, 4)), draw(st.booleans()),
              draw(st.sampled_from([U4, U4, U26, U6])),
              draw(st.booleans()) if deltas is None else deltas)
    for op in draw(st.lists(OPS, max_size=max_ops)):
        w.apply(op)
    return w


def nonempty(w: World) -> list[Ring]:
    return [r for r in w.rings.values() if not r.is_empty()]


SET = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SET
@given(worlds(deltas=False))
def test_replica_rings_are_valid_and_roundtrip(w: World) -> None:
    for r in nonempty(w):
        check_valid(r)


@SET
@given(worlds(), st.data())
def test_merge_commutative(w: World, data: st.DataObject) -> None:
    rings = list(w.rings.values())
    a = data.draw(st.sampled_from(rings))
    b = data.draw(st.sampled_from(rings))
    ab, ba = merged(a, b), merged(b, a)
    assert state(ab) == state(ba)
    assert ab.digest() == ba.digest()


@SET
@given(worlds(), st.data())
def test_merge_associative(w: World, data: st.DataObject) -> None:
    rings = list(w.rings.values())
    a, b, c = (data.draw(st.sampled_from(rings)) for _ in range(3))
    left = merged(merged(a, b), c)
    right = merged(a, merged(b, c))
    assert state(left) == state(right)
    assert left.digest() == right.digest()


@SET
@given(worlds())
def test_merge_idempotent_and_reports_no_change(w: World) -> None:
    for r in w.rings.values():
        x = r.copy()
        assert x.merge(r) == []
        assert x.merge(r.copy()) == []
        assert state(x) == state(r) and x.digest() == r.digest()


@SET
@given(worlds(), st.data())
def test_merge_reports_exactly_the_changed_tokens(w: World, data: st.DataObject) -> None:
    rings = list(w.rings.values())
    a = data.draw(st.sampled_from(rings)).copy()
    b = data.draw(st.sampled_from(rings))
    before = dict(a.entries)
    res = a.merge(b)
    assert not isinstance(res, RingError)
    after = dict(a.entries)
    assert sorted(res) == sorted(t for t in after if before.get(t) != after[t])
    for t, v in b.entries.items():
        assert after[t] == max(v, before.get(t, v))


@SET
@given(worlds(), st.permutations(range(5)), st.permutations(range(5)))
def test_merging_all_replicas_in_any_order_agrees(
    w: World, p1: list[int], p2: list[int]
) -> None:
    rings = list(w.rings.values())
    o1 = [rings[i] for i in p1 if i < len(rings)]
    o2 = [rings[i] for i in p2 if i < len(rings)]
    x, y = merged(Ring(w.u), *o1), merged(Ring(w.u), *o2)
    assert state(x) == state(y)
    assert x.digest() == y.digest()
    check_valid(x)
    # digest of a ring rebuilt from scratch matches the incrementally kept one
    assert roundtrip(x).digest() == x.digest()


@SET
@given(worlds(max_ops=60, deltas=False))
def test_no_live_peer_believes_it_owns_what_the_merged_ring_gives_away(w: World) -> None:
    """The safety that matters: what a live peer allocates from is its own, everywhere."""
    full = merged(Ring(w.u), *w.rings.values())
    for p in w.alive:
        for o in w.rings[p].owned_by(p):
            assert full.owner(o.start) == p
            inner = full.entries.irange(o.start, o.end, inclusive=(False, False))
            assert all(full.entries[t][1] == p for t in inner), (p, o)
    # and after gossip settles every replica agrees with the join
    for r in w.rings.values():
        assert state(merged(r, full)) == state(full)


def _random_world(seed: int) -> World:
    rnd = random.Random(seed)
    kinds = ["grant", "grant", "free", "merge", "deliver", "deliver", "deliver", "kill"]
    w = World(rnd.randint(1, 4), rnd.random() < 0.5, U4, deltas=True)
    for _ in range(rnd.randint(1, 60)):
        w.apply((rnd.choice(kinds), *(rnd.randrange(2**16) for _ in range(4))))
    return w


def _believes_only_its_own(w: World) -> None:
    full = merged(Ring(w.u), *w.rings.values())
    for p in w.alive:
        for o in w.rings[p].owned_by(p):
            assert full.owner(o.start) == p
            inner = full.entries.irange(o.start, o.end, inclusive=(False, False))
            assert all(full.entries[t][1] == p for t in inner), (p, o)


def test_no_live_peer_believes_it_owns_too_much_with_deltas() -> None:
    """As above, with deltas gossiped as the allocator does (fixed pseudo-random runs)."""
    for seed in range(300):
        _believes_only_its_own(_random_world(seed))


def test_set_free_delta_does_not_extend_a_grantees_piece() -> None:
    s = U4.start
    peers = ["alpha", "bravo", "charlie", "delta"]
    charlie, alpha = seeded(peers), seeded(peers)  # charlie owns [128, 192)
    grant_msg = wire(charlie, charlie.grant(s + 179, s + 182, "alpha", "charlie", 3))
    assert grant_msg  # ... and this message is delayed (or lost, until anti-entropy)
    charlie.set_free(s + 128, 35)
    free_msg = wire(charlie, [s + 128])  # the next delta charlie sends
    d = Ring.from_wire(free_msg, U4)
    assert isinstance(d, Ring)
    assert not isinstance(alpha.merge(d), RingError)
    mine = [(o.start - s, o.end - s) for o in alpha.owned_by("alpha")]
    # alpha was given [179, 182) in the delayed message; [182, 192) is still charlie's:
    # alpha may not know of its piece yet, but must never believe it owns more
    assert mine in ([(0, 64)], [(0, 64), (179, 182)]), mine


def test_delta_merge_keeps_ring_valid() -> None:
    s = U4.start
    alpha, x = seeded(["alpha", "bravo"]), seeded(["alpha", "bravo"])  # alpha: [0, 128)
    alpha.grant(s + 32, s + 64, "bravo", "alpha", 32)  # its delta to x is lost
    alpha.set_free(s + 64, 10)
    d = Ring.from_wire(wire(alpha, [s + 64]), U4)
    assert isinstance(d, Ring)
    assert not isinstance(x.merge(d), RingError)
    # x: alpha's token 0 still says 128 free, but now spans [0, 64)
    check_valid(x)


def test_same_version_tie_with_different_peers_resolves_identically() -> None:
    """Weave #3310: same token and version, different owners; must not depend on order."""
    base = seeded(["alpha", "bravo"])
    mid = U4.start + 128
    w1, w2 = wire(base), wire(base)
    # a conflicting history: same token, same version, other owner and a larger free
    for w, peer, free in ((w1, "alpha", 3), (w2, "bravo", 100)):
        for ent in w["e"]:
            if ent[0] == (mid - U4.start).to_bytes(4, "big"):
                ent[1], ent[2], ent[3] = peer, 7, free
    a, b = Ring.from_wire(w1, U4), Ring.from_wire(w2, U4)
    assert isinstance(a, Ring) and isinstance(b, Ring)
    ab, ba = merged(a, b), merged(b, a)
    assert state(ab) == state(ba)
    assert ab.entries[mid] == (7, "bravo", 100)
    # free alone differing: the larger free wins either way
    w3 = wire(b)
    for ent in w3["e"]:
        if ent[0] == (mid - U4.start).to_bytes(4, "big"):
            ent[3] = 99
    c = Ring.from_wire(w3, U4)
    assert isinstance(c, Ring)
    assert state(merged(b, c)) == state(merged(c, b))
    assert merged(c, b).entries[mid] == (7, "bravo", 100)


def test_transfer_wins_over_the_dead_peers_later_writes() -> None:
    r = seeded(["alpha", "bravo"])
    dead = r.copy()
    for _ in range(5):  # the dead peer kept writing before it died
        dead.set_free(U4.start + 128, 0)
        dead.set_free(U4.start + 128, 5)
    heir = r.copy()
    moved, changed = heir.transfer("bravo", "alpha")
    assert (moved, changed) == (128, [U4.start + 128])
    assert heir.entries[U4.start + 128] == (TRANSFER_BUMP, "alpha", 128)
    heir.mark_removed("bravo", "alpha")
    assert not heir.mark_removed("bravo", "alpha")
    for x in (merged(heir, dead), merged(dead, heir)):
        assert x.owner(U4.start + 200) == "alpha"
        assert x.removed == {"bravo": "alpha"}
    assert heir.transfer("nobody", "alpha") == (0, [])


def test_transfer_version_is_capped() -> None:
    w = wire(seeded(["alpha", "bravo"]))
    w["e"][1][2] = MAX_VERSION - 1
    r = Ring.from_wire(w, U4)
    assert isinstance(r, Ring)
    r.transfer("bravo", "alpha")
    assert r.entries[U4.start + 128][0] == MAX_VERSION
    check_valid(r)


def test_removed_merge_keeps_max_heir_in_either_order() -> None:
    a, b = seeded(["alpha", "bravo", "charlie"]), seeded(["alpha", "bravo", "charlie"])
    a.mark_removed("charlie", "alpha")
    b.mark_removed("charlie", "bravo")
    assert merged(a, b).removed == merged(b, a).removed == {"charlie": "bravo"}
    assert merged(a, b).digest() == merged(b, a).digest()


# ---- grant ------------------------------------------------------------------------------


def test_grant_cases() -> None:
    s = U4.start
    # whole entry
    r = seeded(["alpha", "bravo"])
    assert r.grant(s + 128, s + 256, "charlie", "bravo", 128) == [s + 128]
    assert r.entries[s + 128] == (1, "charlie", 128)
    # a prefix of an entry: the rest stays with the giver under a new token
    r = seeded(["alpha", "bravo"])
    assert r.grant(s, s + 64, "charlie", "alpha", 64) == [s, s + 64]
    assert r.owner(s) == "charlie" and r.owner(s + 63) == "charlie"
    assert r.owner(s + 64) == "alpha" and r.owner(s + 127) == "alpha"
    assert r.owner(s + 128) == "bravo"
    # a suffix of an entry
    r = seeded(["alpha", "bravo"])
    # the end token (bravo's) travels too, so receivers know where charlie's piece ends
    assert r.grant(s + 64, s + 128, "charlie", "alpha", 64) == [s, s + 64, s + 128]
    assert [(o.start, o.end) for o in r.owned_by("alpha")] == [(s, s + 64)]
    assert [(o.start, o.end) for o in r.owned_by("charlie")] == [(s + 64, s + 128)]
    # the middle of an entry
    r = seeded(["alpha", "bravo"])
    assert r.grant(s + 32, s + 64, "charlie", "alpha", 1) == [s, s + 32, s + 64]
    assert r.entries[s] == (1, "alpha", 32)  # its free hint cut to what is left of it
    assert [(o.start, o.end) for o in r.owned_by("alpha")] == [(s, s + 32), (s + 64, s + 128)]
    assert r.peers() == {"alpha": 96, "bravo": 128, "charlie": 32}
    # not the giver's entry
    r = seeded(["alpha", "bravo"])
    with pytest.raises(AssertionError):
        r.grant(s + 130, s + 140, "charlie", "alpha", 0)
    with pytest.raises(AssertionError):
        r.grant(s + 100, s + 140, "charlie", "alpha", 0)  # crosses into bravo's entry


def test_grant_alone_leaves_a_ring_that_from_wire_accepts() -> None:
    r = seeded(["alpha", "bravo"])  # alpha: [0, 128) free 128
    r.grant(U4.start + 64, U4.start + 128, "charlie", "alpha", 64)
    # alpha's entry now spans 64 addresses but still says 128 free
    check_valid(r)


# ---- seeding -----------------------------------------------------------------------------


def names(n: int) -> list[str]:
    return [f"peer-{i:02d}" for i in range(n)]


@pytest.mark.parametrize("u", [U4, U26, CIDR.parse("10.32.0.0/12"), U6, U64])
@pytest.mark.parametrize("n", [*range(1, 11), 16, 17, 31, 33, 50])
def test_seed_covers_universe_with_aligned_pieces(u: CIDR, n: int) -> None:
    if n > u.size:
        pytest.skip("more peers than addresses")
    peers = names(n)
    r = seeded(peers, u)
    pos = u.start
    sizes: dict[str, int] = {}
    for s, e, (ver, peer, free) in r.iter_ranges():
        size = e - s
        assert s == pos
        assert size & (size - 1) == 0 and s % size == 0
        assert (ver, free) == (0, min(size, FREE_CAP))
        assert peer not in sizes, "one piece per peer"
        sizes[peer] = size
        pos = e
    assert pos == u.end
    assert set(sizes) == set(peers)
    assert max(sizes.values()) <= 2 * min(sizes.values())
    assert r.seeds == tuple(sorted(peers))
    assert r.peers() == sizes
    check_valid(r)
    shuffled = peers[:]
    random.Random(n).shuffle(shuffled)
    again = seeded(shuffled + shuffled[:3], u)  # repeats do not matter either
    assert state(again) == state(r) and again.digest() == r.digest()


@settings(max_examples=50, deadline=None)
@given(st.sets(st.text(alphabet="abcdefghij0123456789:-", min_size=1, max_size=12),
               min_size=1, max_size=50), st.randoms(use_true_random=False))
def test_seed_is_order_independent(peers: set[str], rnd: random.Random) -> None:
    ps = sorted(peers)
    shuffled = ps[:]
    rnd.shuffle(shuffled)
    a, b = seeded(ps), seeded(shuffled)
    assert state(a) == state(b) and a.digest() == b.digest()
    assert set(a.peers()) == peers
    # two independently seeded rings merge without any change
    assert a.copy().merge(b) == []


# ---- reading ------------------------------------------------------------------------------


def test_owner_owned_by_peers_free_in() -> None:
    s = U4.start
    r = seeded(["alpha", "bravo"])
    r.grant(s + 32, s + 64, "charlie", "alpha", 20)
    r.set_free(s, 10)  # alpha's [s, s+32)
    r.set_free(s + 64, 30)  # alpha's [s+64, s+128)
    assert r.owner(s) == "alpha"
    assert r.owner(s + 32) == "charlie" and r.owner(s + 63) == "charlie"
    assert r.owner(s + 64) == "alpha"
    assert r.owner(s + 255) == "bravo"
    assert r.owner(s - 1) is None and r.owner(s + 256) is None
    assert Ring(U4).owner(s) is None
    assert r.owned_by("alpha")[0].start == s and r.owned_by("alpha")[0].end == s + 32
    assert r.owned_by("alpha")[0].free == 10
    assert [o.free for o in r.owned_by("charlie")] == [20]
    assert r.owned_by("nobody") == []
    assert r.peers() == {"alpha": 96, "bravo": 128, "charlie": 32}
    assert sum(r.peers().values()) == U4.size
    everything = Range(s, s + 256)
    assert r.free_in(everything, exclude="nobody") == {"alpha": 40, "bravo": 128, "charlie": 20}
    assert r.free_in(everything, exclude="bravo") == {"alpha": 40, "charlie": 20}
    assert r.free_in(everything, exclude="alpha") == {"bravo": 128, "charlie": 20}
    # partial overlap: capped at the overlap size
    assert r.free_in(Range(s + 60, s + 70), exclude="nobody") == {"charlie": 4, "alpha": 6}
    assert r.free_in(Range(s + 128, s + 129), exclude="nobody") == {"bravo": 1}
    r.set_free(s + 128, 1)  # one free address still makes a donor
    assert r.free_in(everything, exclude="nobody") == {"alpha": 40, "bravo": 1, "charlie": 20}
    r.set_free(s + 128, 0)
    assert r.free_in(everything, exclude="nobody") == {"alpha": 40, "charlie": 20}
    assert len(r) == 4 and not r.is_empty() and Ring(U4).is_empty()


def test_set_free() -> None:
    r = seeded(["alpha"])
    assert not r.set_free(U4.start, 256)
    assert r.set_free(U4.start, 10)
    assert r.entries[U4.start] == (1, "alpha", 10)
    assert r.set_free(U4.start, 2**70)
    assert r.entries[U4.start][2] == FREE_CAP


def test_digest_equal_iff_equal() -> None:
    a, b = seeded(["alpha", "bravo"]), seeded(["bravo", "alpha"])
    assert a.digest() == b.digest() != 0
    assert Ring(U4).digest() == 0
    b.set_free(U4.start, 1)
    assert a.digest() != b.digest()
    a.set_free(U4.start, 1)
    assert a.digest() == b.digest()
    a.mark_removed("x", "alpha")
    assert a.digest() != b.digest()
    assert seeded(["alpha", "bravo"]).digest() != seeded(["alpha", "bravo", "charlie"]).digest()


# ---- wire -----------------------------------------------------------------------------------


@pytest.mark.parametrize("u", [U4, U26, U6, U64, CIDR.parse("10.32.0.0/12")])
def test_wire_roundtrip(u: CIDR) -> None:
    r = seeded(PEERS, u)
    for o in r.owned_by("alpha")[:1]:
        mid = o.start + (o.end - o.start) // 2
        r.grant(mid, o.end, "zulu", "alpha", o.end - mid)
        r.set_free(o.start, mid - o.start)
    r.transfer("echo", "alpha")
    r.mark_removed("echo", "alpha")
    check_valid(r)
    w = r.to_wire()
    assert w["u"] == str(u)
    assert all(len(e[0]) == u.bits // 8 for e in w["e"])
    # a delta: only some tokens, then merged into a full ring elsewhere
    toks = list(r.entries.keys())[1:3]
    d = Ring.from_wire(wire(r, toks), u)
    assert isinstance(d, Ring)
    # each token travels with its successor, so a receiver knows where every entry ends
    keys = list(r.entries.keys())
    expect = sorted(set(toks) | {keys[keys.index(t) + 1] for t in toks if t != keys[-1]})
    assert list(d.entries.keys()) == expect
    other = seeded(PEERS, u)
    assert not isinstance(other.merge(d), RingError)
    assert all(other.entries[t] == r.entries[t] for t in toks)


def test_wire_roundtrip_full_v6_64_with_large_values() -> None:
    r = seeded(["alpha"], U64)
    assert r.entries[U64.start] == (0, "alpha", FREE_CAP)
    top = U64.end - 1
    r.grant(top, U64.end, "bravo", "alpha", 1)
    r.set_free(U64.start, FREE_CAP)
    check_valid(r)
    assert r.owner(top) == "bravo" and r.owner(top - 1) == "alpha"
    assert roundtrip(r).owner(top) == "bravo"


# ---- bad rings from peers ---------------------------------------------------------------


def valid_ring() -> Ring:
    r = seeded(["alpha", "bravo", "charlie"])
    r.grant(U4.start + 16, U4.start + 32, "delta", "alpha", 16)
    r.set_free(U4.start, 10)
    r.mark_removed("echo", "alpha")
    return r


def tok(off: int) -> bytes:
    return off.to_bytes(4, "big")


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    def m(f: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        return f

    def setent(i: int, j: int, v: Any) -> Callable[[dict[str, Any]], Any]:
        def f(w: dict[str, Any]) -> None:
            w["e"][i][j] = v
        return f

    def swap(w: dict[str, Any]) -> None:
        w["e"][1], w["e"][2] = w["e"][2], w["e"][1]

    def repeat(w: dict[str, Any]) -> None:
        w["e"].insert(2, list(w["e"][1]))

    def marker_with_free(w: dict[str, Any]) -> None:
        w["e"][0][1:] = ["", -1, 5]  # a boundary marker carries no owner and no free

    return [
        ("unsorted", swap),
        ("repeated token", repeat),
        ("token past the end", setent(-1, 0, tok(256))),
        ("token far out", setent(-1, 0, b"\xff\xff\xff\xff")),
        ("token too short", setent(1, 0, b"\x00\x10")),
        ("token too long", setent(1, 0, b"\x00" * 16)),
        ("token as int", setent(1, 0, 16)),
        ("token as str", setent(1, 0, "16")),
        ("marker with free", marker_with_free),
        ("negative free", setent(0, 3, -1)),
        ("huge free", setent(0, 3, FREE_CAP + 1)),
        ("free 2**64-1", setent(0, 3, 2**64 - 1)),
        ("negative version", setent(0, 2, -1)),
        ("version past max", setent(0, 2, MAX_VERSION + 1)),
        ("version 2**64-1", setent(0, 2, 2**64 - 1)),
        ("version bool", setent(0, 2, True)),
        ("version float", setent(0, 2, 1.0)),
        ("version str", setent(0, 2, "1")),
        ("free None", setent(0, 3, None)),
        ("peer int", setent(0, 1, 7)),
        ("peer empty", setent(0, 1, "")),
        ("peer too long", setent(0, 1, "x" * 65)),
        ("peer unprintable", setent(0, 1, "al\npha")),
        ("peer bytes", setent(0, 1, b"alpha")),
        ("entry short", m(lambda w: w["e"][0].pop())),
        ("entry long", m(lambda w: w["e"][0].append(0))),
        ("entry map", m(lambda w: w["e"].__setitem__(0, {"t": 0}))),
        ("entry None", m(lambda w: w["e"].__setitem__(0, None))),
        ("entries map", m(lambda w: w.__setitem__("e", {}))),
        ("entries str", m(lambda w: w.__setitem__("e", "x"))),
        ("seeds str", m(lambda w: w.__setitem__("s", "alpha"))),
        ("seeds unsorted", m(lambda w: w["s"].reverse())),
        ("seeds repeated", m(lambda w: w["s"].append("charlie"))),
        ("seed int", m(lambda w: w["s"].__setitem__(0, 1))),
        ("seed empty name", m(lambda w: w["s"].insert(0, ""))),
        ("no seeds but entries", m(lambda w: w.__setitem__("s", []))),
        ("removed not pairs", m(lambda w: w.__setitem__("r", [["echo"]]))),
        ("removed triple", m(lambda w: w.__setitem__("r", [["echo", "alpha", "x"]]))),
        ("removed bad name", m(lambda w: w.__setitem__("r", [["echo", 3]]))),
        ("removed bad peer", m(lambda w: w.__setitem__("r", [["", "alpha"]]))),
        ("removed map", m(lambda w: w.__setitem__("r", {"echo": "alpha"}))),
        ("missing key", m(lambda w: w.pop("r"))),
        ("missing e", m(lambda w: w.pop("e"))),
        ("extra key", m(lambda w: w.__setitem__("x", 1))),
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_ring_is_refused_and_changes_nothing(
    what: str, mutate: Callable[[dict[str, Any]], Any]
) -> None:
    good = wire(valid_ring())
    assert isinstance(Ring.from_wire(good, U4), Ring)
    mutate(good)
    res = Ring.from_wire(good, U4)
    assert isinstance(res, RingError), what
    assert res.kind == "invalid"
    assert res.message == "ring " + REFUSAL[what]  # what was wrong, for the peer's log


SHAPE = "entry must be [token bytes, peer, version, free]"
BOUNDS = "entry version or free count out of bounds"
REFUSAL = {
    **dict.fromkeys(["unsorted", "repeated token"], "entries are not sorted or repeat a token"),
    **dict.fromkeys(["token past the end", "token far out"],
                    "entry token lies outside the range"),
    **dict.fromkeys(["token too short", "token too long", "token as int", "token as str",
                     "version bool", "version float", "version str", "free None",
                     "entry short", "entry long", "entry map", "entry None"], SHAPE),
    **dict.fromkeys(["marker with free", "negative free", "huge free", "free 2**64-1",
                     "negative version", "version past max", "version 2**64-1"], BOUNDS),
    **dict.fromkeys(["peer int", "peer empty", "peer too long", "peer unprintable",
                     "peer bytes"], "entry peer must be a peer name"),
    **dict.fromkeys(["entries map", "entries str"], "entries must be a list"),
    **dict.fromkeys(["seeds str", "seed int", "seed empty name"],
                    "seeds must be a list of peer names"),
    **dict.fromkeys(["seeds unsorted", "seeds repeated"], "seeds must be sorted and unique"),
    "no seeds but entries": "has entries but no seeds",
    **dict.fromkeys(["removed not pairs", "removed triple", "removed bad name",
                     "removed bad peer", "removed map"],
                    "removed list must hold [peer, heir] pairs"),
    **dict.fromkeys(["missing key", "missing e", "extra key"],
                    "must be a map with keys u, s, e, r"),
}


@pytest.mark.parametrize("obj", [None, 1, "ring", b"", [], {}, {"u": str(U4)},
                                 [str(U4), [], [], []], {"u": str(U4), "s": [], "e": [],
                                                         "r": [], "extra": 0}])
def test_not_a_ring(obj: Any) -> None:
    res = Ring.from_wire(obj, U4)
    assert isinstance(res, RingError) and res.kind == "invalid"


def test_wrong_universe() -> None:
    w = wire(valid_ring())
    for u in ["10.33.0.0/24", "10.32.0.0/25", "10.32.0.0/24 ", 5, None, ["10.32.0.0/24"]]:
        w["u"] = u
        res = Ring.from_wire(w, U4)
        assert isinstance(res, RingError) and res.kind == "universe"
        assert res.message == f"ring is for range {str(u)!r}, ours is {U4}"
    # a ring parsed for another universe is refused by merge and changes nothing
    mine = valid_ring()
    before, d = state(mine), mine.digest()
    other = seeded(["alpha", "bravo", "charlie"], CIDR.parse("10.33.0.0/24"))
    res2 = mine.merge(other)
    assert isinstance(res2, RingError) and res2.kind == "universe"
    assert res2.message == f"ring is for range 10.33.0.0/24, ours is {U4}"
    assert state(mine) == before and mine.digest() == d


def test_seeds_mismatch_is_refused_and_changes_nothing() -> None:
    mine = valid_ring()
    before, d = state(mine), mine.digest()
    theirs = seeded(["alpha", "bravo"])
    theirs.mark_removed("foxtrot", "alpha")
    res = mine.merge(roundtrip(theirs))
    assert isinstance(res, RingError) and res.kind == "seeds"
    assert res.message == ("ring was seeded by different peers: alpha,bravo there, "
                           "alpha,bravo,charlie here")
    assert state(mine) == before and mine.digest() == d
    # and an empty ring that adopted one seed set then refuses another
    e = Ring(U4)
    assert e.merge(roundtrip(seeded(["alpha"]))) != []
    res = e.merge(theirs)
    assert isinstance(res, RingError) and res.kind == "seeds"


def test_partial_ring_before_a_full_one_is_refused_and_changes_nothing() -> None:
    full = valid_ring()
    delta = Ring.from_wire(wire(full, list(full.entries.keys())[1:]), U4)
    assert isinstance(delta, Ring)
    empty = Ring(U4)
    res = empty.merge(delta)
    assert isinstance(res, RingError) and res.kind == "unseeded"
    assert res.message == "partial ring received before a full one"
    assert empty.is_empty() and empty.seeds == () and empty.removed == {}
    assert empty.digest() == 0
    # a ring with only seeds (no entries) is not partial
    assert Ring(U4).merge(Ring(U4)) == []
    # the delta merges fine into a seeded ring
    assert isinstance(valid_ring().merge(delta), list)


# ---- from_wire never raises --------------------------------------------------------------

NAMES = st.text(min_size=0, max_size=70)
LEAVES = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
          | st.integers() | st.floats() | NAMES | st.binary(max_size=20))
ANY = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=5)
    | st.tuples(kids, kids)
    | st.dictionaries(st.text(max_size=3) | st.integers(-5, 5) | st.binary(max_size=2),
                      kids, max_size=5),
    max_leaves=30,
)
TOKENS = st.binary(min_size=4, max_size=4) | st.binary(max_size=17) | LEAVES
ENTRY = st.lists(st.one_of(TOKENS, NAMES, st.integers(-3, 2**64), ANY), min_size=0, max_size=5) | (
    st.tuples(TOKENS, st.sampled_from(["alpha", "bravo", ""]) | NAMES,
              st.integers(-3, 2**64) | LEAVES, st.integers(-3, 2**64) | LEAVES).map(list))
RINGISH = st.fixed_dictionaries({
    "u": st.just(str(U4)) | LEAVES,
    "s": st.just(["alpha", "bravo"]) | st.lists(NAMES, max_size=4) | ANY,
    "e": st.lists(ENTRY, max_size=6) | ANY,
    "r": st.just([]) | st.lists(st.lists(NAMES, max_size=3), max_size=3) | ANY,
})


def _check_result(res: Any, u: CIDR) -> None:
    assert isinstance(res, Ring | RingError)
    if isinstance(res, Ring):
        toks = list(res.entries.keys())
        assert toks == sorted(set(toks)) and all(t in u for t in toks)
        # whatever was accepted survives its own wire form
        again = Ring.from_wire(wire(res), u)
        assert isinstance(again, Ring) and state(again) == state(res)
        # and merging it into a ring never raises
        tgt = seeded(["alpha", "bravo"], u)
        assert isinstance(tgt.merge(res), list | RingError)
    else:
        assert res.kind in ("invalid", "universe") and isinstance(res.message, str)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(ANY, RINGISH))
def test_from_wire_never_raises_on_anything(obj: Any) -> None:
    _check_result(Ring.from_wire(obj, U4), U4)
    _check_result(Ring.from_wire(obj, U6), U6)
    try:
        packed = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    _check_result(Ring.from_wire(msgpack.unpackb(packed, raw=False,
                                                 strict_map_key=False), U4), U4)


def _paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(obj, list):
        for i, x in enumerate(obj):
            out += _paths(x, (*path, i))
    elif isinstance(obj, dict):
        for k, x in obj.items():
            out += _paths(x, (*path, k))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(max_ops=10, deltas=False), st.data())
def test_from_wire_never_raises_on_mutated_valid_rings(w: World, data: st.DataObject) -> None:
    rings = nonempty(w)
    if not rings:
        return
    r = data.draw(st.sampled_from(rings))
    obj = wire(r, data.draw(st.none() | st.just(list(r.entries.keys())[1:])))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(obj)
        path = data.draw(st.sampled_from(paths))
        if not path:
            continue
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        how = data.draw(st.sampled_from(["replace", "delete", "dup", "int", "bytes"]))
        k = path[-1]
        if how == "replace":
            parent[k] = data.draw(ANY)
        elif how == "delete":
            del parent[k]
        elif how == "dup" and isinstance(parent, list):
            parent.insert(k, parent[k])
        elif how == "int":
            parent[k] = data.draw(st.integers(-(2**64), 2**65))
        elif how == "bytes":
            parent[k] = data.draw(st.binary(max_size=6))
    res = Ring.from_wire(obj, w.u)
    _check_result(res, w.u)
    if isinstance(res, Ring):
        # an accepted ring keeps every per-entry bound
        for _t, (ver, peer, free) in res.entries.items():
            assert 0 <= ver <= MAX_VERSION and 0 <= free <= FREE_CAP and peer


def test_from_wire_does_not_alias_its_input() -> None:
    w = wire(valid_ring())
    r = Ring.from_wire(w, U4)
    assert isinstance(r, Ring)
    before = state(r)
    w["s"].append("zzz")
    w["r"].clear()
    w["e"].clear()
    assert state(r) == before


def test_delta_boundary_markers() -> None:
    """A delta bounds each entry with a marker for a successor it does not ship."""
    s = U4.start
    peers = ["alpha", "bravo", "charlie", "delta"]
    charlie, alpha = seeded(peers), seeded(peers)
    grant_delta = roundtrip_delta(charlie, charlie.grant(s + 179, s + 182, "alpha", "charlie", 3))
    charlie.set_free(s + 128, 35)
    free_delta = roundtrip_delta(charlie, [s + 128])
    assert free_delta.entries[s + 179] == MARKER
    assert alpha.merge(free_delta) == [s + 128, s + 179]
    # the marker bounds charlie's entry and gives nobody [179, 192) for now
    assert alpha.owner(s + 150) == "charlie"
    assert alpha.owner(s + 179) is None and alpha.owner(s + 191) is None
    assert "" not in alpha.peers() and "" not in alpha.free_in(U4.range, exclude="x")
    check_valid(alpha)  # a ring holding a marker survives its own wire form
    # the late grant replaces the marker; alpha then owns exactly its piece
    assert s + 179 in alpha.merge(grant_delta)
    assert alpha.entries[s + 179] == (0, "alpha", 3)
    assert [(o.start - s, o.end - s) for o in alpha.owned_by("alpha")] == [(0, 64), (179, 182)]
    assert state(alpha) == state(merged(seeded(peers), charlie))
    # a marker never beats a real entry, in either order
    assert alpha.merge(free_delta) == []
    assert state(merged(free_delta, alpha)) == state(merged(alpha, free_delta))


def roundtrip_delta(r: Ring, tokens: list[int]) -> Ring:
    d = Ring.from_wire(wire(r, tokens), r.universe)
    assert isinstance(d, Ring), d
    return d


def test_refusal_messages_are_bounded() -> None:
    res = Ring.from_wire({"u": "x" * 100_000, "s": [], "e": [], "r": []}, U4)
    assert isinstance(res, RingError) and res.kind == "universe"
    assert len(res.message) < 500


def test_removed_list_with_a_repeated_peer_is_refused() -> None:
    w = wire(valid_ring())
    w["r"] = [["echo", "zulu"], ["echo", "alpha"]]
    res = Ring.from_wire(w, U4)
    assert isinstance(res, RingError) and res.kind == "invalid"
    assert res.message == "ring removed list must be sorted with each peer once"


def test_name_length_limit_is_inclusive() -> None:
    longest = "x" * MAX_NAME
    assert valid_name(longest) and valid_names(["a", longest])
    assert not valid_name(longest + "x") and not valid_names(["a", longest + "x"])
    assert not valid_name("") and not valid_names(["a", ""])


def test_digest_of_no_ring_is_zero_and_every_digest_fits_64_bits() -> None:
    """0 means "I have no ring" to a peer; digests travel as msgpack ints (64 bits)."""
    e = Ring(U4)
    assert e.digest() == 0 and e.digest() == 0
    r = valid_ring()
    assert 0 < r.digest() < 2**64
    msgpack.packb({"t": "digest", "d": r.digest()})


def test_mark_removed_says_whether_it_was_news() -> None:
    r = valid_ring()
    assert r.mark_removed("foxtrot", "alpha") is True
    assert r.mark_removed("foxtrot", "bravo") is False
    assert r.removed["foxtrot"] == "alpha"
