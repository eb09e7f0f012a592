"""Agreeing on the first ring: gossip Paxos among the peers, then seeding from its value."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

from ..paxos import NONE, Paxos
from ..records import SetPaxos
from .base import PROPOSE_BACKOFF
from .requests import Requests


class Seeding(Requests):
    def _on_paxos(self, sender: str, c: Any) -> str | None:
        claims = Paxos.decode(c)
        if isinstance(claims, str):
            return claims
        if not self.ring.is_empty():
            # already seeded: the proposer needs our ring, not our vote (once a second)
            if self.now - self.ring_sent.get(sender, -1e9) >= 1.0:
                self.ring_sent[sender] = self.now
                self._send(sender, self._full_ring())
            return None
        if self.paxos is None:
            return None
        if self.paxos.update(claims):
            if any(c.promise != NONE for c in claims.values()):
                # a ballot moved (a peer only becoming known is not progress)
                self.paxos_progress = self.now
            self._paxos_step()
        elif self.paxos.dirty:
            self._paxos_step()
        return None

    def _paxos_step(self, relay: bool = False) -> None:
        """Think; gossip at once if our own claims moved, else batch relays until a tick."""
        assert self.paxos is not None
        # the value we would accept is the peers we know *now*: those that connected since
        # we proposed get a share of the ring instead of waiting for donations
        self.paxos.proposal_value = tuple(sorted({self.name} | self.reachable()))
        self.paxos.think()
        if self.name in self.paxos.dirty or (relay and self.paxos.dirty):
            dirty = self.paxos.take_dirty()
            if self.name in dirty:
                self._persist(SetPaxos(msgpack.packb(
                    Paxos.encode({self.name: self.paxos.ours}), use_bin_type=True)))
            self._send(None, {"t": "paxos", "c": Paxos.encode(dirty)})
        value = self.paxos.consensus()
        if value is not None and self.ring.is_empty():
            self._seed(value)

    def _seed(self, peers: Iterable[str]) -> None:
        self.ring.seed(peers)
        self.vetted = True
        self._owned_changed()
        self._persist_ring()
        self.dirty.update(self.ring.entries.keys())
        self.urgent = True
        self._event("info", f"ring seeded by {','.join(self.ring.seeds)}")
        for p in list(self.pending):
            self._retry(p)

    def _maybe_propose(self, force: bool) -> None:
        if self.paxos is None or not self.ring.is_empty():
            return
        if not force and self.now < self.next_propose:
            return
        lo, hi = PROPOSE_BACKOFF
        known = {self.name} | set(self.reachable())
        if not force and self.now - self.paxos_progress < hi:
            # a ballot is moving: a new one would only pre-empt it (duelling proposers
            # kept 25 daemons on 2 cores from ever deciding); look again later
            self.next_propose = self.now + self.rng.uniform(lo, hi)
            return
        if not self.paxos.propose(tuple(known)):
            return
        self.next_propose = self.now + self.rng.uniform(lo, hi) * (1 + 0.1 * len(known))
        self._paxos_step()

