"""Tests for weaveipam.core.paxos: safety and liveness of gossip Paxos, and its wire form.

A message is a snapshot of one node's whole claims map (or of its dirty part), encoded as
on the wire, delivered to another node's update() followed by think().  The network may
reorder, duplicate and drop messages, and a node may restart with only its own claims
restored (the allocator persists them before it sends anything).
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weaveipam.core.paxos import MAX_VALUE, NONE, Claims, Paxos
from weaveipam.core.ring import MAX_VERSION


def wire(claims: dict[str, Claims]) -> dict[str, Claims]:
    """Through encode, msgpack and decode, as a real message."""
    raw = msgpack.packb(Paxos.encode(claims), use_bin_type=True)
    out = Paxos.decode(msgpack.unpackb(raw, raw=False))
    assert not isinstance(out, str), out
    return out


class Cluster:
    def __init__(self, k: int, quorum: int | None = None) -> None:
        self.names = [f"n{i}" for i in range(k)]
        self.quorum = k // 2 + 1 if quorum is None else quorum
        self.nodes = {n: Paxos(n, self.quorum) for n in self.names}
        self.disk: dict[str, Claims] = {n: p.ours for n, p in self.nodes.items()}
        self.net: list[tuple[str, dict[str, Claims]]] = []
        self.decided: dict[tuple[str, ...], tuple[str, int]] = {}
        self.proposals = 0
        self.steps = 0

    def persist(self) -> None:
        for n, p in self.nodes.items():
            self.disk[n] = p.ours

    def observe(self) -> None:
        self.steps += 1
        for n, p in self.nodes.items():
            v = p.consensus()
            if v is not None:
                self.decided.setdefault(v, (n, self.steps))
        assert len(self.decided) <= 1, f"two values decided: {self.decided}"

    def propose(self, i: int) -> None:
        n = self.names[i % len(self.names)]
        self.proposals += 1
        value = (n, f"v{self.proposals}")  # every proposal a distinct value
        self.nodes[n].propose(value)
        self.nodes[n].think()
        self.persist()
        self.observe()

    def send(self, i: int, j: int, dirty_only: bool) -> None:
        src = self.nodes[self.names[i % len(self.names)]]
        snap = src.take_dirty() if dirty_only else dict(src.claims)
        if not snap:
            return
        snap = wire(snap)
        if j % (len(self.names) + 1) == len(self.names):  # broadcast
            self.net += [(n, snap) for n in self.names if n != src.name]
        else:
            self.net.append((self.names[j % len(self.names)], snap))

    def deliver(self, idx: int, keep: bool) -> None:
        if not self.net:
            return
        dst, snap = self.net[idx % len(self.net)] if keep else self.net.pop(idx % len(self.net))
        p = self.nodes[dst]
        p.update(snap)
        p.think()
        self.persist()
        self.observe()

    def drop(self, idx: int) -> None:
        if self.net:
            self.net.pop(idx % len(self.net))

    def restart(self, i: int) -> None:
        n = self.names[i % len(self.names)]
        p = Paxos(n, self.quorum)
        restored = Paxos.decode(msgpack.unpackb(
            msgpack.packb(Paxos.encode({n: self.disk[n]}), use_bin_type=True), raw=False))
        assert not isinstance(restored, str)
        p.update(restored)
        assert p.ours == self.disk[n]
        self.nodes[n] = p
        self.observe()

    def run(self, ops: list[tuple[str, int, int]]) -> None:
        for kind, a, b in ops:
            if kind == "propose":
                self.propose(a)
            elif kind == "send":
                self.send(a, b, dirty_only=bool(b & 1))
            elif kind == "deliver":
                self.deliver(a, keep=b % 4 == 0)
            elif kind == "drop":
                self.drop(a)
            elif kind == "restart":
                self.restart(a)

    def settle(self, rounds: int = 50) -> None:
        """Reliable full gossip until nothing changes."""
        for _ in range(rounds):
            changed = False
            for src in self.names:
                snap = wire(dict(self.nodes[src].claims))
                for dst in self.names:
                    if dst != src:
                        p = self.nodes[dst]
                        c1 = p.update(snap)
                        c2 = p.think()
                        changed = changed or c1 or c2
            self.persist()
            self.observe()
            if not changed:
                return
        raise AssertionError("gossip did not settle")


OPS = st.lists(st.tuples(
    st.sampled_from(["propose", "send", "send", "send", "deliver", "deliver", "deliver",
                     "deliver", "drop", "restart"]),
    st.integers(0, 63), st.integers(0, 63),
), max_size=120)


def test_two_values_decided_scenario() -> None:
    """Two values decided under origin counting (Weave's rule), spelled out: 3 nodes, quorum 2."""
    a, b, c = (Paxos(n, 2) for n in "ABC")
    decided = set()

    def send(src: Paxos, dst: Paxos) -> None:
        dst.update(wire(dict(src.claims)))
        dst.think()
        for p in (a, b, c):
            if p.consensus() is not None:
                decided.add(p.consensus())

    a.propose(("vA",))
    a.think()
    send(a, b)
    send(b, a)  # A accepts (1,A) with its own value
    c.propose(("vC",))
    c.think()
    send(c, b)
    send(b, c)  # C accepts (1,C): a second origin
    b.propose(("vB",))
    b.think()
    send(b, a)
    send(a, b)  # B's ballot (2,B) adopts A's value: origin (1,A) now at A and B, but at
    # two different ballots, which is not a decision
    assert b.consensus() is None
    c.propose(("vC2",))
    c.think()
    send(c, a)
    send(a, c)  # C's ballot (2,C) sees A's (1,A) and its own (1,C): picks (1,C)
    send(c, a)
    # whatever gets decided from here on, at most one value may ever be
    if a.consensus() is not None:
        decided.add(a.consensus())
    assert len(decided) <= 1, f"two values decided: {decided}"




def justified(p: Paxos) -> bool:
    """A decision a node reports must be a Paxos decision in its own view: a quorum of
    nodes that accepted the *same ballot* (hence the same value)."""
    v = p.consensus()
    if v is None:
        return True
    per_ballot: dict[tuple[int, str], list[tuple[str, ...]]] = {}
    for c in p.claims.values():
        if c.accepted != NONE:
            per_ballot.setdefault(c.accepted, []).append(c.value)
    return any(len(vs) >= p.quorum and set(vs) == {v} for vs in per_ballot.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(3, 9), OPS)
def test_safety_never_two_values_decided(k: int, ops: list[tuple[str, int, int]]) -> None:
    """The safety property itself, under reordering, duplication, loss and restarts.

    The schedules that break it are rare (see test_two_values_decided_scenario), so this
    one stays green today; the next test checks the invariant that rules them out.
    """
    c = Cluster(k)
    c.run(ops)
    c.settle()


def random_ops(rnd: random.Random, n: int) -> list[tuple[str, int, int]]:
    kinds = ["propose", "send", "send", "send", "deliver", "deliver", "deliver", "deliver",
             "drop", "restart"]
    return [(rnd.choice(kinds), rnd.randrange(64), rnd.randrange(64)) for _ in range(n)]


def test_every_reported_decision_is_a_same_ballot_quorum() -> None:
    """Checked on fixed pseudo-random schedules (deterministic, and no shrinking cost)."""
    for seed in range(300):
        rnd = random.Random(seed)
        c = Cluster(3 + seed % 7)
        orig = c.observe

        def observe(c: Cluster = c, orig: Any = orig) -> None:
            orig()
            for n, p in c.nodes.items():
                assert justified(p), (n, p.consensus(), p.claims)

        c.observe = observe  # type: ignore[method-assign]
        c.run(random_ops(rnd, 80))
        c.settle()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(3, 9), OPS, st.data())
def test_safety_with_a_single_proposer(
    k: int, ops: list[tuple[str, int, int]], data: st.DataObject
) -> None:
    """With only one node ever proposing, nothing can disagree, whatever the network does."""
    c = Cluster(k)
    who = data.draw(st.integers(0, k - 1))
    c.run([(kind, who if kind == "propose" else a, b) for kind, a, b in ops])
    c.settle()


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 9), st.data())
def test_liveness_one_proposer_reliable_delivery(k: int, data: st.DataObject) -> None:
    c = Cluster(k)
    who = data.draw(st.integers(0, k - 1))
    c.propose(who)
    c.settle()
    values = {p.consensus() for p in c.nodes.values()}
    assert values == {(c.names[who], "v1")}
    # a node restarted afterwards still sees the decision once it hears from others
    r = data.draw(st.integers(0, k - 1))
    c.restart(r)
    c.settle()
    assert {p.consensus() for p in c.nodes.values()} == values
    assert all(p.known() == k for p in c.nodes.values())


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 9), st.data())
def test_liveness_with_only_a_quorum_up(k: int, data: st.DataObject) -> None:
    q = k // 2 + 1
    up = Cluster(q, quorum=q)  # the first q of k nodes; the others never answer
    who = data.draw(st.integers(0, q - 1))
    up.propose(who)
    up.settle()
    assert {p.consensus() for p in up.nodes.values()} == {(up.names[who], "v1")}


def test_no_consensus_below_quorum() -> None:
    c = Cluster(5)
    c.nodes["n0"].propose(("x",))
    c.nodes["n0"].think()
    for dst in ("n1",):  # only two nodes of five ever talk
        for _ in range(5):
            c.nodes[dst].update(wire(dict(c.nodes["n0"].claims)))
            c.nodes[dst].think()
            c.nodes["n0"].update(wire(dict(c.nodes[dst].claims)))
            c.nodes["n0"].think()
    assert c.nodes["n0"].consensus() is None
    assert c.nodes["n0"].ours.accepted == NONE


def test_restart_does_not_count_twice_or_forget_a_promise() -> None:
    c = Cluster(3)
    c.propose(0)
    c.send(0, 1, dirty_only=False)
    c.deliver(0, keep=False)  # n1 promised (1, n0)
    promised = c.nodes["n1"].ours.promise
    assert promised == (1, "n0")
    c.restart(1)
    assert c.nodes["n1"].ours.promise == promised
    assert c.nodes["n1"].known() == 1  # knows only itself, under its own name
    c.settle()
    assert {p.consensus() for p in c.nodes.values()} == {("n0", "v1")}
    assert all(p.known() == 3 for p in c.nodes.values())


def test_restarted_proposer_without_its_value_does_not_accept_empty() -> None:
    c = Cluster(3)
    c.propose(0)
    c.restart(0)  # proposal_value is not persisted
    assert c.nodes["n0"].proposal_value == ()
    c.settle()
    for p in c.nodes.values():
        assert p.ours.accepted == NONE or p.ours.value
        assert p.consensus() is None
    c.propose(1)
    c.settle()
    assert {p.consensus() for p in c.nodes.values()} == {("n1", "v2")}


def test_propose_dedups_and_sorts_value() -> None:
    p = Paxos("a", 1)
    p.propose(("c", "a", "b", "a"))
    assert p.proposal_value == ("a", "b", "c")
    p.think()
    assert p.consensus() == ("a", "b", "c")


def test_take_dirty() -> None:
    p = Paxos("a", 2)
    assert p.take_dirty() == {"a": Claims()}
    assert p.take_dirty() == {}
    assert p.update({"b": Claims(promise=(1, "b"))})
    assert not p.update({"b": Claims(promise=(1, "b"))})
    assert p.take_dirty() == {"b": Claims(promise=(1, "b"))}


# ---- wire ---------------------------------------------------------------------------------


CLAIMS = st.builds(
    lambda pr, pp, ar, ap, v, orr, op: Claims((pr, pp), (ar, ap), tuple(v), (orr, op)),
    st.integers(0, MAX_VERSION), st.sampled_from(["", "a", "n1"]),
    st.integers(0, MAX_VERSION), st.sampled_from(["", "b"]),
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=3),
    st.integers(0, MAX_VERSION), st.sampled_from(["", "c"]),
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "node-1"]), CLAIMS, max_size=3))
def test_encode_decode_roundtrip(claims: dict[str, Claims]) -> None:
    assert wire(claims) == claims
    for c in claims.values():
        assert Claims.from_wire(c.to_wire()) == c


@pytest.mark.parametrize("x", [
    None, 1, "x", [], {}, [0, "", 0, "", [], 0],  # too short
    [0, "", 0, "", [], 0, "", 0],  # too long
    (0, "", 0, "", [], 0, ""),  # tuple, not list
    [-1, "", 0, "", [], 0, ""],
    [MAX_VERSION + 1, "", 0, "", [], 0, ""],
    [0, "", 2**64 - 1, "", [], 0, ""],
    [0, "", 0, "", [], -5, ""],
    [True, "", 0, "", [], 0, ""],
    [1.0, "", 0, "", [], 0, ""],
    ["1", "", 0, "", [], 0, ""],
    [0, 5, 0, "", [], 0, ""],
    [0, "x" * 65, 0, "", [], 0, ""],
    [0, "a\x00", 0, "", [], 0, ""],
    [0, "", 0, None, [], 0, ""],
    [0, "", 0, "", "abc", 0, ""],
    [0, "", 0, "", ["a", ""], 0, ""],
    [0, "", 0, "", ["a", 3], 0, ""],
    [0, "", 0, "", [["a"]], 0, ""],
    [0, "", 0, "", {"a": 1}, 0, ""],
    [0, "", 0, "", ["n"] * (MAX_VALUE + 1), 0, ""],
    [0, "", 0, "", [], 0, b"a"],
])
def test_claims_from_wire_rejects(x: Any) -> None:
    assert Claims.from_wire(x) is None


@pytest.mark.parametrize("obj", [
    None, [], "a", 3, {"a": None}, {"a": []}, {"": Claims().to_wire()},
    {3: Claims().to_wire()}, {"a" * 65: Claims().to_wire()}, {b"a": Claims().to_wire()},
    {"a": Claims().to_wire(), "b": [1]}, {(1, 2): Claims().to_wire()},
])
def test_decode_rejects(obj: Any) -> None:
    res = Paxos.decode(obj)
    assert isinstance(res, str) and res


def test_decode_accepts_empty_and_valid() -> None:
    assert Paxos.decode({}) == {}
    c = Claims((3, "a"), (2, "b"), ("a", "b"), (1, "c"))
    assert Paxos.decode({"a": c.to_wire()}) == {"a": c}


LEAVES = (st.none() | st.booleans() | st.integers(-(2**64), 2**65) | st.floats()
          | st.text(max_size=70) | st.binary(max_size=8))
ANY = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=8) | st.tuples(kids, kids)
    | st.dictionaries(st.text(max_size=4) | st.integers(-3, 3) | st.binary(max_size=2),
                      kids, max_size=4),
    max_leaves=40,
)
CLAIMSISH = st.lists(st.one_of(st.integers(-2, MAX_VERSION + 2), st.sampled_from(["", "a"]),
                               st.lists(st.sampled_from(["a", "", "b"]) | LEAVES, max_size=3),
                               LEAVES), min_size=6, max_size=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(ANY, CLAIMSISH, st.dictionaries(st.text(max_size=66) | LEAVES,
                                                 CLAIMSISH | ANY, max_size=3)))
def test_decode_never_raises(obj: Any) -> None:
    c = Claims.from_wire(obj)
    assert c is None or isinstance(c, Claims)
    res = Paxos.decode(obj)
    assert isinstance(res, str | dict)
    if isinstance(res, dict):
        # what was accepted is usable and survives its own wire form
        p = Paxos("zz", 2)
        p.update(res)
        p.think()
        p.consensus()
        assert wire(res) == res


def test_propose_after_max_round_stays_decodable() -> None:
    p = Paxos("a", 2)
    peer = Paxos.decode({"b": [MAX_VERSION, "b", 0, "", [], 0, ""]})
    assert not isinstance(peer, str)
    p.update(peer)
    p.propose(("a", "b"))
    p.think()
    res = Paxos.decode(Paxos.encode({"a": p.ours}))
    assert not isinstance(res, str), res
