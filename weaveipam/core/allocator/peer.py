"""One peer's IPAM as a pure state machine: the entry points and the state line.

Inputs: `request`, `receive` (a peer's message), `peer_up`/`peer_down`, `tick`; every one
carries the current time.  Outputs (`take_outputs`): `Persist` records, `Send` messages and
`Reply`s.  The shell must make every `Persist` of a batch durable before it delivers any
`Send` or `Reply` of that batch: an acknowledged allocation, or space given to a peer, is
on disk first.
"""

from __future__ import annotations

from typing import Any

from ..addr import Range
from .base import ANTI_ENTROPY, SPLIT_FORGET, _Pending
from .interface import Allocate, Leave, Lookup, Prime, Release, Request, RmPeer
from .sync import RingSync


class Allocator(RingSync):
    def state(self) -> str:
        """Weave's IPAM states, plus ours for the failures Weave left silent."""
        if self.fault:
            return self.fault
        if self.left:
            return "left"
        if self.split:
            return "split"
        if self.ring.is_empty():
            if self.init.kind == "observer":
                return "awaiting-ring"
            return "awaiting-consensus" if (self.primed or self.pending) else "idle"
        if not self.synced:
            return "rejoining"
        if any(isinstance(p.req, Allocate) for p in self.pending):
            return "waiting-for-space"
        return "ready"

    def state_text(self) -> str:
        s = self.state()
        if s in ("duplicate-name", "removed"):
            return self.fault_text
        if s == "split" and self.split:
            peer, seeds, _ = self.split
            return (f"IP allocation was seeded by different peers: {','.join(self.ring.seeds)} "
                    f"here, {seeds} at peer {peer}. Keep one group: on every node of the "
                    "other group run `weaveipam reset` and restart it pointing at this group, "
                    "with --ipalloc-init consensus=N where N is the whole cluster size.")
        if s in ("awaiting-consensus", "idle") and not self.reachable() \
                and (self.expect_peers or self.peers):
            return (f"{s}: no peer reachable yet. A node given peers seeds no ring before "
                    "it hears one (the cluster's ring may exist beyond them); check that "
                    "the peer addresses are right and reachable. To start a new cluster's "
                    "first node alone, give it no peers")
        if s == "awaiting-consensus" and self.paxos is not None:
            return (f"awaiting consensus (quorum: {self.paxos.quorum}, known: "
                    f"{self.paxos.known()}): start at least {self.paxos.quorum} peers "
                    "that can reach each other, or check that --ipalloc-init consensus=N "
                    "is the cluster size on every node")
        if s == "awaiting-ring":
            return "observer: waiting for a peer that has a ring; connect this node to one"
        if s == "idle" and self.paxos is not None and self.init.count > 1:
            return (f"idle: waiting for peers (consensus={self.init.count}, quorum: "
                    f"{self.paxos.quorum}, reachable: {len(self.reachable()) + 1}); consensus "
                    "starts by itself once they can be reached: start them, with this "
                    "node's address among their peers")
        if s == "rejoining" and self.vetting:
            heir = self.heir_for(self.name)
            if heir in self.polling and self.restored:
                return (f"restarted while peer {self.rm_told} waits for an rmpeer of this "
                        f"node: waiting to hear peer {heir}, which may have taken its ranges "
                        f"over (if {heir} is gone for good, run `weaveipam rmpeer {heir}`)")
            if heir in self.polling:
                return (f"rejoined fresh with ranges under our name: waiting to hear peer "
                        f"{heir}, which would have taken them over (if it is gone for good, "
                        f"run `weaveipam rmpeer {heir}`)")
        if s == "rejoining":
            return "restarted: waiting to hear the ring from any peer before allocating"
        if s == "waiting-for-space":
            return "waiting for IP(s) to become available: " + self._no_space_reason(
                self.default_subnet.usable())
        return s

    def can_allocate(self) -> bool:
        """Ready in /readyz's sense: an allocation in the default subnet could be served."""
        if self.state() not in ("ready", "waiting-for-space"):
            return False
        w = self.default_subnet.usable()
        return self.space.has_free(w) or bool(self._donors(w))

    def request(self, rid: int, req: Request, now: float) -> None:
        self.now = now
        err = self._check(req)
        if err:
            self._fail(rid, "bad-request", err)
            return
        if self.fault:
            self._fail(rid, "unavailable", self.fault_text)
            return
        if isinstance(req, Lookup):
            addrs = self.allocs.get(req.ident)
            if not addrs:
                self._fail(rid, "not-found", f"no addresses for {req.ident!r}")
            else:
                self._reply(rid, list(addrs))
            return
        if isinstance(req, Release):
            self._release(rid, req)
            return
        if isinstance(req, Prime):
            self.primed = True
            if self.ring.is_empty():
                self._maybe_propose(force=True)
            self._reply(rid, self.state())
            return
        if isinstance(req, RmPeer):
            self._rmpeer(rid, req.name, req.gone)
            return
        if isinstance(req, Leave):
            self._leave(rid, req.force)
            return
        if self.left:
            self._fail(rid, "unavailable", "this peer has handed its ranges away (reset); "
                       "restart the daemon to rejoin")
            return
        p = _Pending(rid, req, now + self.op_timeout)
        if not self._try(p):
            self.pending.append(p)
            if self.ring.is_empty():
                self._maybe_propose(force=False)
        self._flush()

    def tick(self, now: float) -> None:
        self.now = now
        if self.fault == "duplicate-name":
            return
        for p in list(self.pending):
            if now >= p.deadline:
                reason = self._timeout_reason(p)  # while p still counts as pending
                self.pending.remove(p)
                self._fail(p.rid, "unavailable", reason)
            else:
                self._retry(p)
        for rid, p in list(self.rm_pending.items()):
            if now >= p.deadline:
                del self.rm_pending[rid]
                assert isinstance(p.req, RmPeer)
                heir = self._heir_past(p.req.name, p.req.gone)
                self._fail(rid, "unavailable", f"the heir for {p.req.name}, "
                           f"{heir}, did not answer; if it is gone too, "
                           "rmpeer it first")
        if not self.synced and self.restored and not self.vetting \
                and now >= self.sync_deadline and set(self.ring.peers()) <= {self.name}:
            # our ring names only us, and in SYNC_GRACE no peer sent one (we ask a live
            # peer every second) that took it from us: it is ours
            self.synced = True
            for p in list(self.pending):
                self._retry(p)
        if self.split and now - self.split[2] > SPLIT_FORGET:
            self.split = None
        if self.polling and now >= self.next_poll:
            self.next_poll = now + 1.0  # a request or answer may have been lost
            for peer in sorted(self.polling & self.reachable()):
                self._send(peer, {"t": "ring?", "all": True})
        if self.vetting or self.takeovers:
            self._polled()
        if self.grants:
            self._grants_retry()
        if (self.ring.is_empty() or not self.synced) and now >= self.next_ring_ask:
            # restarted or new: ask one live peer for its ring rather than wait for gossip
            self.next_ring_ask = now + 1.0
            live = sorted(self.reachable())
            if live:
                self._send(self.rng.choice(live), {"t": "ring?"})
        if self.ring.is_empty() and self.init.kind == "seed":
            if self._clear_to_seed():
                self._seed(self.init.seeds)
            else:
                self._ask_unheard()
        if self.ring.is_empty():
            if self.paxos is not None:
                if self.auto_prime_at is not None and not self.primed:
                    known = len(self.reachable()) + 1
                    if known >= self.init.count or (
                            now >= self.auto_prime_at and known >= self.paxos.quorum):
                        self.primed = True
                if self.pending or self.primed:
                    self._maybe_propose(force=False)
                if self.paxos.dirty:
                    self._paxos_step(relay=True)
        elif now >= self.next_gossip and self.synced and not self.fault:
            # only a peer in sync speaks for its entries: a fresh one checking what its name
            # owns would otherwise erase the "in use" its predecessor left (lost_state)
            self._report_free()
        # Anti-entropy repairs lost deltas; while deltas are flowing the digests differ
        # anyway and full rings would flood a large cluster, so it waits for a quiet
        # interval (but runs at least every 5 intervals under constant churn).
        quiet = now - self.last_change >= ANTI_ENTROPY or now - self.last_ae >= 5 * ANTI_ENTROPY
        if now >= self.next_ae and quiet:
            self.last_ae = now
            self.next_ae = now + ANTI_ENTROPY * self.rng.uniform(0.75, 1.25)
            live = sorted(self.reachable())
            if live:
                self._send(self.rng.choice(live), {"t": "digest", "d": self.ring.digest()})
        self._flush()

    def no_other_peers(self) -> None:
        """The shell found that every peer address we were given is our own: we were
        given no peers after all, and may seed alone (Seeding._clear_to_seed)."""
        self.expect_peers = False

    def _timeout_reason(self, p: _Pending) -> str:
        s = self.state()
        if s in ("ready", "waiting-for-space") and isinstance(p.req, Allocate):
            w = (p.req.subnet or self.default_subnet).usable()
            if self.space.has_free(w):
                heir = self.heir_for(self.name)
                return (f"timed out after {self.op_timeout:g}s: peer {heir}, this node's "
                        "heir, has not confirmed that this node's range is in use (it must "
                        "hold that on its disk before the range's first address is handed "
                        "out, so that the addresses are never handed out twice if this node "
                        "loses its data dir); check the connection to it, or if it is gone "
                        f"for good run `weaveipam rmpeer {heir}`")
            return f"timed out after {self.op_timeout:g}s: " + self._no_space_reason(w)
        return f"timed out after {self.op_timeout:g}s: {self.state_text()}"

    def pending_ops(self) -> list[tuple[Request, float]]:
        """Waiting allocate/claim requests with the time each was received."""
        return [(p.req, p.deadline - self.op_timeout) for p in self.pending]

    def paxos_view(self) -> dict[str, Any] | None:
        """Consensus progress while the ring is not seeded; None once it is (or observer)."""
        if self.paxos is None or not self.ring.is_empty():
            return None
        return {"quorum": self.paxos.quorum, "known": self.paxos.known(),
                "claims": {n: {"promise": list(c.promise), "accepted": list(c.accepted),
                               "value": list(c.value)} for n, c in self.paxos.claims.items()}}

    def nickname_of(self, name: str) -> str:
        p = self.peers.get(name)
        return p.nickname if p else ""

    def allocations(self) -> dict[str, dict[int, str]]:
        return self.allocs

    def prefix_of(self, a: int) -> int:
        """The prefix length `a` was handed out with; for records from before it was
        kept, the default subnet's (or the range's, outside the default subnet)."""
        p = self.prefixes.get(a)
        if p is not None:
            return p
        return self.default_subnet.prefix if a in self.default_subnet else self.universe.prefix

    def owned_ranges(self) -> list[Range]:
        return self.space.owned()

    def free_total(self) -> int:
        return self.space.free_total()

