"""Agreeing on the first ring: gossip Paxos among the peers, then seeding from its value."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

from ..paxos import MAX_VALUE, NONE, Claims, Paxos
from ..records import SetPaxos
from .base import PROPOSE_BACKOFF, RING_ASK_RETRY
from .requests import Requests


class Seeding(Requests):
    def _on_paxos(self, sender: str, c: Any, count: Any) -> str | None:
        claims = Paxos.decode(c)
        if isinstance(claims, str):
            return claims
        if count is not None and (type(count) is not int or not 1 <= count <= MAX_VALUE):
            return "paxos message with a bad consensus count"
        self.heard.add(sender)  # it has no ring (or it would have sent that instead)
        if not self.ring.is_empty():
            # already seeded: the proposer needs our ring, not our vote (once a second)
            if self.now - self.ring_sent.get(sender, -1e9) >= 1.0:
                self.ring_sent[sender] = self.now
                self._send(sender, self._full_ring())
            return None
        if self.paxos is None:
            return None
        if count is not None and count // 2 + 1 > self.paxos.quorum:
            # a peer expects a larger cluster: a majority of the largest count is the only
            # quorum that every node's quorum intersects, whatever each was started with
            self.paxos.quorum = count // 2 + 1
            self._event("info", f"peer {sender} expects consensus={count}: quorum is now "
                        f"{self.paxos.quorum}")
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
            self._send(None, self._paxos_msg(dirty))
        value = self.paxos.consensus()
        if value is not None and self.ring.is_empty():
            self._seed(value)

    def _paxos_msg(self, claims: dict[str, Claims]) -> dict[str, Any]:
        return {"t": "paxos", "c": Paxos.encode(claims), "n": self.init.count}

    def _clear_to_seed(self) -> bool:
        """May we start a ring of our own?  Only once every reachable peer has told us it
        has none: a joiner whose --ipalloc-init differs from the founders' (or that was
        started with the defaults) must join their ring, not seed a second one and hand
        out addresses they hold.  Given peers (or knowing any) and none reachable: never.
        A cluster may exist beyond a partition or behind a dead link, and a ring of our own
        would hand out its addresses until the two met (a node whose data dir was lost,
        back alone with --ipalloc-init consensus=1).  A first node starts alone only if it
        was given no peers."""
        live = self.reachable()
        if not live:
            return not (self.expect_peers or self.peers)
        return live <= self.heard

    def _wants_seed(self) -> bool:
        return self.ring.is_empty() and (
            bool(self.pending) or self.primed or self.init.kind == "seed")

    def _ask_unheard(self) -> None:
        """Ask every reachable peer not heard from yet whether it holds a ring."""
        if self.now < self.next_unheard_ask:
            return
        self.next_unheard_ask = self.now + 2 * RING_ASK_RETRY
        for p in sorted(self.reachable() - self.heard):
            self._send(p, {"t": "ring?", "all": True})

    def _seed(self, peers: Iterable[str]) -> None:
        self.ring.seed(peers)
        self.vetted = True
        self._owned_changed()
        self._persist_ring()
        self.dirty.update(self.ring.entries.keys())
        self.urgent = True
        self._event("info", f"ring seeded by {','.join(self.ring.seeds)}")
        self.self_seeded = True
        self._vet_seeded()  # now, or when the first peer comes up
        for p in list(self.pending):
            self._retry(p)

    def _maybe_propose(self, force: bool) -> None:
        if self.paxos is None or not self.ring.is_empty():
            return
        if not force and self.now < self.next_propose:
            return
        if not self._clear_to_seed():
            self._ask_unheard()  # tick comes back here
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

