"""Tests for weaveipam.core.paxos: safety and liveness of gossip Paxos, and its wire form.

A message is a snapshot of one node's whole claims map (or of its dirty part), encoded as
on the wire, delivered to another node's update() followed by think().  The network may
reorder, duplicate and drop messages, and a node may restart with only its own claims
restored (the allocator persists them before it sends anything).
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from plants import weave_paxos_rule

from weaveipam.core.paxos import MAX_VALUE, NONE, Claims, Paxos
from weaveipam.core.ring import MAX_VERSION


def wire(claims: dict[str, Claims]) -> dict[str, Claims]:
    """Through encode, msgpack and decode, as a real message."""
    raw = msgpack.packb(Paxos.encode(claims), use_bin_type=True)
    out = Paxos.decode(msgpack.unpackb(raw, raw=False))
    assert not isinstance(out, str), out
    return out


Op = tuple[str, int, int]


class Net:
    """k Paxos nodes on a faulty network, watched for two decisions after every event.

    A node sends a snapshot of its claims (all of them, or only what changed, as the
    allocator gossips), through the wire form; in-flight messages are delivered in any
    order, duplicated or lost; a paused node neither acts nor takes deliveries until it is
    resumed; a restarted node keeps only its own claims (persisted before it sends).
    """

    def __init__(self, k: int, quorum: int | None = None) -> None:
        self.names = [f"n{i}" for i in range(k)]
        self.quorum = k // 2 + 1 if quorum is None else quorum
        self.nodes = {n: Paxos(n, self.quorum) for n in self.names}
        self.disk: dict[str, Claims] = {n: p.ours for n, p in self.nodes.items()}
        self.paused: set[str] = set()
        self.net: list[tuple[str, dict[str, Claims]]] = []
        self.decided: dict[tuple[str, ...], tuple[str, int]] = {}  # value -> (first node, step)
        self.proposals = 0
        self.steps = 0

    def name(self, i: int) -> str:
        return self.names[i % len(self.names)]

    def observe(self) -> str | None:
        """The checker: every value any node ever reported decided; more than one is a
        violation (a node changing its mind counts too)."""
        self.steps += 1
        for n, p in self.nodes.items():
            self.disk[n] = p.ours
            v = p.consensus()
            if v is not None:
                self.decided.setdefault(v, (n, self.steps))
        if len(self.decided) > 1:
            seen = ", ".join(f"{v} at {n} (step {s})" for v, (n, s) in self.decided.items())
            return f"two values decided: {seen}"
        return None

    def propose(self, i: int) -> None:
        n = self.name(i)
        if n in self.paused:
            return
        self.proposals += 1
        self.nodes[n].propose((n, f"v{self.proposals}"))  # every proposal a distinct value
        self.nodes[n].think()

    def send(self, i: int, j: int, dirty_only: bool) -> None:
        src = self.name(i)
        if src in self.paused:
            return
        p = self.nodes[src]
        snap = p.take_dirty() if dirty_only else dict(p.claims)
        if not snap:
            return
        snap = wire(snap)
        dst = self.name(j)
        if dirty_only or dst == src:  # broadcast
            self.net += [(n, snap) for n in self.names if n != src]
        else:
            self.net.append((dst, snap))

    def deliver(self, m: int, keep: bool) -> None:
        """Message m modulo the in-flight count (-1: the newest); kept if duplicated."""
        if not self.net:
            return
        m %= len(self.net)
        dst, snap = self.net[m]
        if dst in self.paused:
            return
        if not keep:
            self.net.pop(m)
        self.nodes[dst].update(snap)
        self.nodes[dst].think()

    def restart(self, i: int) -> None:
        n = self.name(i)
        p = Paxos(n, self.quorum)
        p.update(wire({n: self.disk[n]}))
        assert p.ours == self.disk[n]
        self.nodes[n] = p

    def step(self, op: Op) -> str | None:
        kind, a, b = op
        if kind == "propose":
            self.propose(a)
        elif kind == "send":
            self.send(a, b, dirty_only=False)
        elif kind == "gossip":
            self.send(a, b, dirty_only=True)
        elif kind in ("deliver", "dup"):
            self.deliver(a, keep=kind == "dup")
        elif kind == "drop":
            if self.net:
                self.net.pop(a % len(self.net))
        elif kind == "pause":  # SIGSTOP, or SIGCONT if paused
            self.paused ^= {self.name(a)}
        elif kind == "restart":
            self.restart(a)
        else:
            raise ValueError(f"unknown op {kind!r}")
        return self.observe()

    def settle(self, rounds: int = 50) -> str | None:
        """Heal: resume every node, deliver what is in flight, then gossip full claims
        reliably until nothing changes; checked after every delivery."""
        self.paused.clear()
        while self.net:
            self.deliver(0, keep=False)
            if err := self.observe():
                return err
        for _ in range(rounds):
            changed = False
            for src in self.names:
                snap = wire(dict(self.nodes[src].claims))
                for dst in self.names:
                    if dst != src:
                        p = self.nodes[dst]
                        changed = p.update(snap) | p.think() | changed
                        if err := self.observe():
                            return err
            if not changed:
                return None
        raise AssertionError("gossip did not settle")


def paxos_violation(k: int, ops: list[Op]) -> str | None:
    """Run a schedule on k nodes, then heal: the first violation found, or None."""
    net = Net(k)
    for op in ops:
        if err := net.step(op):
            return err
    return net.settle()


KINDS = ["propose", "send", "send", "send", "gossip", "deliver", "deliver", "deliver",
         "deliver", "dup", "drop", "pause", "restart"]
OPS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 63), st.integers(0, 63)),
               max_size=120)


def tell(i: int, j: int) -> list[Op]:
    """Node i's claims reach node j at once."""
    return [("send", i, j), ("deliver", -1, 0)]


# Weave's rule decides two values here (3 nodes, quorum 2; n0, n1, n2 are A, B, C):
SPELLED_OUT: list[Op] = [
    ("propose", 0, 0), *tell(0, 1), *tell(1, 0),  # A accepts (1,A) with its value vA
    ("propose", 2, 0), *tell(2, 1), *tell(1, 2),  # C accepts (1,C) with vC
    ("propose", 1, 0), *tell(1, 0), *tell(0, 1),  # B's (2,B) adopts vA: origin (1,A) at A
    # and B, at two ballots (Weave: decided vA)
    ("propose", 2, 0), *tell(2, 0), *tell(0, 2),  # C's (2,C) hears A's (1,A), its own (1,C):
    *tell(2, 0),                                  # picks vC; A accepts: decided vC
]
# ... and here, where a delayed message is needed (found by a seeded random search of
# proposals and round trips among 3 nodes: 1 schedule in 20,000; shrunk by removing ops):
# C's promise to A's ballot (3,n0) arrives after C promised B's (3,n1), so A accepts C's
# old value with C's origin and counts 2 of it, while B and C decide B's value at (3,n1).
FOUND: list[Op] = [
    ("propose", 2, 2), ("send", 2, 1), ("deliver", -1, 0), ("send", 1, 2),
    ("propose", 1, 0), ("deliver", -1, 0), ("send", 1, 0), ("deliver", -1, 0),
    ("send", 0, 1), ("deliver", -1, 0), ("propose", 0, 1), ("send", 0, 2),
    ("deliver", -1, 0), ("send", 2, 0), ("propose", 1, 1), ("send", 1, 2),
    ("deliver", -1, 0), ("send", 2, 1), ("deliver", -1, 0), ("deliver", -1, 0),
    ("send", 1, 2), ("deliver", -1, 0),
]


@settings(max_examples=400, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@example(k=3, ops=SPELLED_OUT)
@example(k=3, ops=FOUND)
@given(k=st.integers(3, 7), ops=OPS)
def test_no_two_nodes_ever_decide_different_values(k: int, ops: list[Op]) -> None:
    """Safety: competing proposers with distinct values, messages reordered, duplicated
    and lost, nodes paused and restarted; then healed.  Never two decided values."""
    assert paxos_violation(k, ops) is None


def test_the_safety_check_catches_weaves_rule() -> None:
    """With Weave's counting rule planted, the property test fails, on its explicit
    schedules.  Random schedules alone rarely reach it: none of 5,000 hypothesis examples
    of OPS did, and a seeded search of proposals and round trips found 1 in 20,000."""
    with weave_paxos_rule():
        for ops in (SPELLED_OUT, FOUND):
            err = paxos_violation(3, ops)
            assert err is not None and err.startswith("two values decided"), err
        with pytest.raises(AssertionError, match="two values decided"):
            test_no_two_nodes_ever_decide_different_values()
    # and our rule on the same schedules: one value, and it gets decided once healed
    for ops in (SPELLED_OUT, FOUND):
        net = Net(3)
        for op in ops:
            assert net.step(op) is None
        assert net.settle() is None
        assert len({p.consensus() for p in net.nodes.values()}) == 1
        assert len(net.decided) == 1


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(3, 9), OPS, st.data())
def test_safety_with_a_single_proposer(k: int, ops: list[Op], data: st.DataObject) -> None:
    """With only one node ever proposing, nothing can disagree, whatever the network does."""
    who = data.draw(st.integers(0, k - 1))
    ops = [(kind, who if kind == "propose" else a, b) for kind, a, b in ops]
    assert paxos_violation(k, ops) is None


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.integers(3, 9), st.data())
def test_liveness_one_proposer_reliable_delivery(k: int, data: st.DataObject) -> None:
    net = Net(k)
    who = data.draw(st.integers(0, k - 1))
    net.propose(who)
    assert net.settle() is None
    values = {p.consensus() for p in net.nodes.values()}
    assert values == {(net.names[who], "v1")}
    # a node restarted afterwards still sees the decision once it hears from others
    r = data.draw(st.integers(0, k - 1))
    net.restart(r)
    assert net.settle() is None
    assert {p.consensus() for p in net.nodes.values()} == values
    assert all(p.known() == k for p in net.nodes.values())


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.integers(3, 9), st.data())
def test_liveness_with_only_a_quorum_up(k: int, data: st.DataObject) -> None:
    q = k // 2 + 1
    up = Net(q, quorum=q)  # the first q of k nodes; the others never answer
    who = data.draw(st.integers(0, q - 1))
    up.propose(who)
    assert up.settle() is None
    assert {p.consensus() for p in up.nodes.values()} == {(up.names[who], "v1")}


def test_no_consensus_below_quorum() -> None:
    net = Net(5)
    net.propose(0)
    for _ in range(5):  # only two nodes of five ever talk
        for op in (*tell(0, 1), *tell(1, 0)):
            assert net.step(op) is None
    assert net.nodes["n0"].consensus() is None
    assert net.nodes["n0"].ours.accepted == NONE


def test_restart_does_not_count_twice_or_forget_a_promise() -> None:
    net = Net(3)
    net.propose(0)
    for op in tell(0, 1):
        net.step(op)
    promised = net.nodes["n1"].ours.promise
    assert promised == (1, "n0")
    net.restart(1)
    assert net.nodes["n1"].ours.promise == promised
    assert net.nodes["n1"].known() == 1  # knows only itself, under its own name
    assert net.settle() is None
    assert {p.consensus() for p in net.nodes.values()} == {("n0", "v1")}
    assert all(p.known() == 3 for p in net.nodes.values())


def test_restarted_proposer_without_its_value_does_not_accept_empty() -> None:
    net = Net(3)
    net.propose(0)
    net.observe()
    net.restart(0)  # proposal_value is not persisted
    assert net.nodes["n0"].proposal_value == ()
    assert net.settle() is None
    for p in net.nodes.values():
        assert p.ours.accepted == NONE or p.ours.value
        assert p.consensus() is None
    net.propose(1)
    assert net.settle() is None
    assert {p.consensus() for p in net.nodes.values()} == {("n1", "v2")}


def test_propose_dedups_and_sorts_value() -> None:
    p = Paxos("a", 1)
    p.propose(("c", "a", "b", "a"))
    assert p.proposal_value == ("a", "b", "c")
    p.think()
    assert p.consensus() == ("a", "b", "c")


def test_active_once_anyone_proposed_and_for_good() -> None:
    """A joiner stays quiet until some node has proposed (it would only send empty claims)."""
    p = Paxos("a", 2)
    p.update({"b": Claims()})
    assert not p.active()
    assert not p.active()  # asking does not change the answer
    p.update({"b": Claims(promise=(1, "b"))})
    assert p.active()
    q = Paxos("c", 2)
    assert q.propose(("c",))
    assert q.active()


def test_propose_says_whether_it_started_a_ballot() -> None:
    p = Paxos("a", 2)
    assert p.propose(("a", "b")) is True
    assert p.ours.promise == (1, "a")
    top = Paxos.decode({"b": [MAX_VERSION, "b", 0, "", [], 0, ""]})
    assert not isinstance(top, str)
    p.update(top)
    before = dict(p.claims)
    assert p.propose(("a", "b")) is False  # rounds exhausted: nothing to gossip
    assert p.claims == before


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


def test_decode_errors_say_what_was_wrong() -> None:
    assert Paxos.decode([]) == "paxos state must be a map of peer name to claims"
    assert Paxos.decode({"b": Claims().to_wire(), "peer-x": [1]}) == \
        "paxos claims for 'peer-x' are malformed"
    assert Paxos.decode({"": Claims().to_wire()}) == "paxos claims for '' are malformed"


def test_size_limits_are_inclusive() -> None:
    """MAX_VALUE peers in a value, and claims for MAX_VALUE peers, are still accepted."""
    names = [f"p{i}" for i in range(MAX_VALUE)]
    full = [0, "", 1, "a", names, 1, "a"]
    assert Claims.from_wire(full) is not None
    assert Claims.from_wire([*full[:4], [*names, "one-more"], *full[5:]]) is None
    wire1 = Claims().to_wire()
    many = dict.fromkeys(names, wire1)
    res = Paxos.decode(many)
    assert isinstance(res, dict) and len(res) == MAX_VALUE
    many["one-more"] = wire1
    assert isinstance(Paxos.decode(many), str)


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
