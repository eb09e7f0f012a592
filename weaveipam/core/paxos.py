"""Paxos over gossip, as Weave's: every node holds every node's claims and gossips them.

A node's claims are (promise, accepted, value, origin).  Only the node itself writes its
claims, each field only grows, so merging by per-field max is safe.  A node promises the
highest proposal it has seen; a proposer with a quorum of promises accepts the highest
accepted value among its promisers (or its own); an acceptor accepts what the proposer it
promised has accepted; consensus is a quorum of nodes that accepted values of one origin.

Unlike Weave, nodes are counted by name and our own claims are persisted by the caller,
so a restarted node cannot count twice or forget a promise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .ring import MAX_VERSION, valid_name, valid_names

ProposalID = tuple[int, str]  # (round, proposer); tuple order is proposal order
NONE: ProposalID = (0, "")
MAX_VALUE = 100_000


@dataclass(frozen=True)
class Claims:
    promise: ProposalID = NONE
    accepted: ProposalID = NONE
    value: tuple[str, ...] = ()
    origin: ProposalID = NONE

    def merged(self, o: Claims) -> Claims:
        c = self
        if o.promise > c.promise:
            c = replace(c, promise=o.promise)
        if o.accepted > c.accepted:
            c = replace(c, accepted=o.accepted, value=o.value, origin=o.origin)
        return c

    def to_wire(self) -> list[Any]:
        return [self.promise[0], self.promise[1], self.accepted[0], self.accepted[1],
                list(self.value), self.origin[0], self.origin[1]]

    @staticmethod
    def from_wire(x: Any) -> Claims | None:
        if not (isinstance(x, list) and len(x) == 7):
            return None
        pr, pp, ar, ap, val, orr, op = x
        for r in (pr, ar, orr):
            if type(r) is not int or not 0 <= r <= MAX_VERSION:
                return None
        for p in (pp, ap, op):
            if not (p == "" or valid_name(p)):
                return None
        if not isinstance(val, list) or len(val) > MAX_VALUE or not valid_names(val):
            return None
        return Claims((pr, pp), (ar, ap), tuple(val), (orr, op))


class Paxos:
    def __init__(self, name: str, quorum: int) -> None:
        self.name = name
        self.quorum = quorum
        self.claims: dict[str, Claims] = {name: Claims()}
        self.proposal_value: tuple[str, ...] = ()
        self.dirty: set[str] = {name}
        self._active = False

    @property
    def ours(self) -> Claims:
        return self.claims[self.name]

    def _set_ours(self, c: Claims) -> None:
        if c != self.claims[self.name]:
            self.claims[self.name] = c
            self.dirty.add(self.name)

    def propose(self, value: tuple[str, ...]) -> bool:
        """Start a ballot above every round seen; False if rounds are exhausted (a peer
        gossiped the maximum round: our claims would no longer be valid on the wire)."""
        top = max(max(c.promise[0], c.accepted[0]) for c in self.claims.values())
        if top >= MAX_VERSION:
            return False
        self.proposal_value = tuple(sorted(set(value)))
        self._set_ours(replace(self.ours, promise=(top + 1, self.name)))
        return True

    def update(self, received: dict[str, Claims]) -> bool:
        changed = False
        for n, c in received.items():
            cur = self.claims.get(n)
            new = c if cur is None else cur.merged(c)
            if new != cur:
                self.claims[n] = new
                self.dirty.add(n)
                changed = True
        return changed

    def think(self) -> bool:
        """Advance our own claims from what we know; True if they changed."""
        before = self.ours
        top = max(c.promise for c in self.claims.values())
        if top > self.ours.promise:
            self._set_ours(replace(self.ours, promise=top))
        ours = self.ours
        p = ours.promise
        if p[1] == self.name and ours.accepted < p:
            promisers = [c for c in self.claims.values() if c.promise == p]
            if len(promisers) >= self.quorum:
                prior = max(promisers, key=lambda c: c.accepted)
                if prior.accepted != NONE:
                    value, origin = prior.value, prior.origin
                else:
                    value, origin = self.proposal_value, p
                if value:
                    self._set_ours(replace(ours, accepted=p, value=value, origin=origin))
        elif p[1] != self.name and ours.accepted < p:
            prop = self.claims.get(p[1])
            if prop is not None and prop.accepted == p:
                self._set_ours(replace(ours, accepted=p, value=prop.value, origin=prop.origin))
        return self.ours != before

    def consensus(self) -> tuple[str, ...] | None:
        """A value is decided when a quorum accepted the same *ballot*.

        Counting acceptances of one value origin across different ballots (as Weave did)
        is not a decision: a later ballot whose promisers missed them can choose another.
        """
        counts: dict[ProposalID, int] = {}
        for c in self.claims.values():
            if c.accepted != NONE:
                counts[c.accepted] = counts.get(c.accepted, 0) + 1
        for ballot, n in counts.items():
            if n >= self.quorum:
                for c in self.claims.values():
                    if c.accepted == ballot:
                        return c.value
        return None

    def active(self) -> bool:
        """Has anyone proposed yet? Before that, our claims are empty and not worth sending
        (a joiner telling every peer so made each answer with its whole ring: O(N^2))."""
        if not self._active:  # once true it stays true: promises only grow
            self._active = any(c.promise != NONE for c in self.claims.values())
        return self._active

    def known(self) -> int:
        return len(self.claims)

    def take_dirty(self) -> dict[str, Claims]:
        out = {n: self.claims[n] for n in self.dirty}
        self.dirty = set()
        return out

    @staticmethod
    def decode(obj: Any) -> dict[str, Claims] | str:
        if not isinstance(obj, dict) or len(obj) > MAX_VALUE:
            return "paxos state must be a map of peer name to claims"
        out: dict[str, Claims] = {}
        for n, x in obj.items():
            c = Claims.from_wire(x)
            if not valid_name(n) or c is None:
                return f"paxos claims for {str(n)[:64]!r} are malformed"
            out[n] = c
        return out

    @staticmethod
    def encode(claims: dict[str, Claims]) -> dict[str, Any]:
        return {n: c.to_wire() for n, c in claims.items()}
