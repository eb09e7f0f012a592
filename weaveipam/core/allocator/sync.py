"""Peers' rings and liveness: merging, restarts and the checks before trusting a ring."""

from __future__ import annotations

from typing import Any

import msgpack

from ..addr import Range
from ..paxos import Paxos
from ..records import SetIdentity, Snapshot
from ..ring import TRANSFER_BUMP, Ring, RingError, valid_name
from .base import RING_ASK_RETRY, SYNC_GRACE, PeerView
from .takeover import Takeover


class RingSync(Takeover):
    def _restore(self, snap: Snapshot | None) -> None:
        if snap is None or snap.name is None:
            self._persist(SetIdentity(self.name, str(self.universe)))
        else:
            if snap.name != self.name or snap.universe != str(self.universe):
                raise ValueError(
                    f"state belongs to peer {snap.name} with range {snap.universe}, "
                    f"not {self.name} with {self.universe}")
            if snap.ring is not None:
                r = Ring.from_wire(msgpack.unpackb(snap.ring, raw=False), self.universe)
                if isinstance(r, RingError):
                    raise ValueError(f"stored ring is unreadable: {r.message}")
                self.ring = r
            if snap.witnessed is not None:
                self._restore_witnessed(snap.witnessed)
            if snap.paxos is not None and self.paxos is not None:
                c = Paxos.decode(msgpack.unpackb(snap.paxos, raw=False))
                if isinstance(c, dict):
                    self.paxos.update(c)
            for ident, addrs in snap.allocations.items():
                for a, note in addrs.items():
                    self.allocs.setdefault(ident, {})[a] = note
                    self.holder[a] = ident
                    self.space.take(a)
                    self.cursor = a
                    if (ident, a) in snap.prefixes:
                        self.prefixes[a] = snap.prefixes[(ident, a)]
            self._owned_changed()
            # Until we hear from a peer, our ring may be stale (ranges taken by rmpeer).
            # A ring naming only us is no exception when we have peers: they may have
            # removed us and taken it all; only if none answers in SYNC_GRACE is it ours.
            self.synced = set(self.ring.peers()) <= {self.name} and not self.expect_peers
            self.restored = not self.ring.is_empty()
            self.known_removed = self.name in self.ring.removed
            self.removal_accepted = self.known_removed  # rejoined fresh after a removal
            # what we owned when we stopped: an heir's takeover shows as a transfer of these
            # (a second removal leaves no new marker: the name is in `removed` already)
            self.disk_owned = {o.start: self.ring.entries[o.start][0]
                               for o in self.ring.owned_by(self.name)}
        if self.init.kind == "seed" and self.ring.is_empty() and self._clear_to_seed():
            self._seed(self.init.seeds)  # else once the peers have said they hold no ring

    def _restore_witnessed(self, data: bytes) -> None:
        try:
            pairs = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException):
            return  # only costs a new confirmation
        u = self.universe
        if isinstance(pairs, list):
            for x in pairs:
                if isinstance(x, list) and len(x) == 2 and valid_name(x[0]) \
                        and type(x[1]) is int and 0 <= x[1] < u.size:
                    self.witnessed[u.start + x[1]] = x[0]

    def peer_up(self, name: str, nickname: str, now: float) -> None:
        self.now = now
        if name == self.name:
            return
        self._set_reachable(name, True)
        self.peers[name].nickname = nickname
        self._vet_seeded()
        if self.vetting or self.takeovers:
            self.polling.add(name)  # it may know what the others did not
            self._send(name, {"t": "ring?", "all": True})
        # With a ring, say nothing: a new peer asks one of us for it (tick), and anti-entropy
        # covers the rest; answering every peer_up would cost O(peers) rings per join.
        if self.ring.is_empty() and self.paxos is not None and self.paxos.active():
            self._send(name, self._paxos_msg(self.paxos.claims))
        elif self._wants_seed():
            self._send(name, {"t": "ring?", "all": True})  # does it hold a ring already?
        for p in list(self.pending):
            self._retry(p)
        self._flush()

    def peer_down(self, name: str, now: float) -> None:
        self.now = now
        if name in self.peers:
            self._set_reachable(name, False)
        self.heard.discard(name)  # it may come back with a ring

    def _set_reachable(self, name: str, up: bool) -> None:
        self.peers.setdefault(name, PeerView())
        if up:
            self._reach.add(name)
            refused = self._rmpeer_refused(name) if name in self.takeovers else None
            if refused is not None:
                # back while we waited to take it over: it is not gone, even if a
                # partition hides it again before the wait ends
                self._answer_takeover(name, self.takeovers.pop(name)[1], *refused)
        else:
            self._reach.discard(name)

    def _on_used(self, sender: str, msg: dict[str, Any]) -> str | None:
        """A peer marks one of its entries used (or gives a piece away), and asks us, its
        heir or the peer standing in for it: keep it on disk and confirm.  Only once our
        ring is one we keep on disk: the confirmation promises that the mark outlives the
        peer's data dir."""
        r = Ring.from_wire(msg.get("ring"), self.universe)
        if isinstance(r, RingError):
            return r.message
        if self.ring.is_empty() or r.is_empty():
            return None  # nothing to keep it in yet; the peer asks again
        err = self._merge(sender, r, False, False, True)
        if self.vetting or not (self.vetted or self.restored) or self.fault:
            return err  # it asks again (or another peer)
        ok: list[int] = []
        newer: list[int] = []
        for t, e in r.entries.items():
            cur = self.ring.entries.get(t)
            if cur is None:
                continue
            if cur[0] > e[0] and e[1] == sender and cur[1] == sender:
                newer.append(t)
            elif cur[0] >= e[0]:
                # we hold it, or what superseded it: its own entries, and the pieces it
                # granted (Requests._donate), which their receivers (or an heir of theirs)
                # may have changed since
                ok.append(t)
        if newer:
            # we hold a later version of its own entry than it knows: an earlier instance
            # under its name wrote it (a lost data dir): no confirmation, but what it missed
            self._send(sender, {"t": "ring", "full": False, "ring": self.ring.to_wire(newer)})
        if ok:
            self._persist_ring()  # durable before the confirmation leaves (same batch)
            # offsets from the range's start: IPv6 addresses do not fit msgpack's integers
            u = self.universe.start
            self._send(sender, {"t": "used-ok", "tok": [t - u for t in ok],
                                "v": [self.ring.entries[t][0] for t in ok]})
        return err

    def _on_used_ok(self, sender: str, msg: dict[str, Any]) -> str | None:
        toks, vers = msg.get("tok"), msg.get("v")
        if not isinstance(toks, list) or len(toks) > 1024 or \
                not all(type(t) is int for t in toks):
            return "used-ok without a token list"
        if not isinstance(vers, list) or len(vers) != len(toks) or \
                not all(type(v) is int for v in vers):
            return "used-ok without a version for each token"
        if sender not in (self._witness(), self._witness_target()):
            return None  # asked under an older ring: the current heir must hold the mark
        u = self.universe.start
        self._grants_confirmed({u + t: v for t, v in zip(toks, vers, strict=True)})
        mine = {u + t for t in toks if (e := self.ring.entries.get(u + t)) is not None
                and e[1] == self.name and self.witnessed.get(u + t) != sender}
        if mine:
            for t in mine:
                self.witnessed[t] = sender
            self._persist_witnessed()
            for p in list(self.pending):
                self._retry(p)
        return None

    def _taken_over(self) -> bool:
        """Has an heir taken over ranges we owned when we stopped?"""
        ents = self.ring.entries
        return any((e := ents.get(t)) is not None and e[1] != self.name
                   and e[0] >= v + TRANSFER_BUMP for t, v in self.disk_owned.items())

    def _foreign_writes(self, r: Ring) -> list[int]:
        """Tokens we own that `r` changed under our name or gave away: only we write our
        entries (an heir does too, but marks us removed), and every version we ever sent
        is on disk, so a newer one is another instance acting under our name (a cloned
        data dir or machine, or this data dir restored from an old copy). A hello that
        merely claims our name proves nothing and is refused by the mesh."""
        if self.name in r.removed or self.name in self.ring.removed:
            return []
        mine = self.ring.entries
        return [t for t, e in r.entries.items()
                if (cur := mine.get(t)) is not None and cur[1] == self.name and e[0] > cur[0]]

    def receive(self, sender: str, msg: Any, now: float) -> None:
        """Handle a peer's message; a malformed one is logged and changes nothing."""
        self.now = now
        if self.fault == "duplicate-name":
            return
        if not valid_name(sender):
            self._event("warning", "message from a peer with an invalid name ignored")
            return
        if sender not in self._reach:
            self._set_reachable(sender, True)
        err = self._dispatch(sender, msg)
        if err:
            self._event("warning", f"bad message from {sender}: {err}")
        self._flush()

    def _dispatch(self, sender: str, msg: Any) -> str | None:
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            return "not a message map with a type"
        t = msg["t"]
        if t == "ring":
            if not isinstance(msg.get("full"), bool):
                return "ring message without 'full'"
            r = Ring.from_wire(msg.get("ring"), self.universe)
            if isinstance(r, RingError):
                return r.message
            err = None
            if not r.is_empty():  # empty: a polled peer that has no ring yet
                err = self._merge(sender, r, bool(msg["full"]), bool(msg.get("ae", False)),
                                  msg.get("ok", True) is True)
            if msg["full"]:
                self.heard.add(sender)
                self.rings_from.add(sender)
                rm = msg.get("rm")
                if self.vetting and self.restored and isinstance(rm, list) \
                        and self.name in rm:
                    # back with our data while an rmpeer of us is under way: only our heir
                    # knows whether it took our ranges (it may have, and then crashed)
                    heir = self.heir_for(self.name)
                    if heir != self.name and heir not in self.polling:
                        self.rm_told = sender
                        self.polling.add(heir)
                        if heir in self.reachable():
                            self._send(heir, {"t": "ring?", "all": True})
            if msg["full"] and sender in self.polling:
                self.polling.discard(sender)
                self._polled()
            return err
        if t == "paxos":
            return self._on_paxos(sender, msg.get("c"), msg.get("n"))
        if t == "space?":
            w = msg.get("w")
            if not (isinstance(w, list) and len(w) == 2 and all(type(x) is int for x in w)
                    and 0 <= w[0] < w[1] <= self.universe.size):
                return "space request with a bad window"
            if sender in self.ring.removed and msg.get("rj") is not True:
                # a removed peer back with old data: no space; our ring tells it why
                self._send(sender, self._full_ring())
            elif not self.ring.is_empty() and self.synced and not self.fault:
                u = self.universe.start
                self._donate(sender, Range(u + w[0], u + w[1]))
            return None
        if t == "digest":
            d = msg.get("d")
            if type(d) is not int:
                return "digest without an integer"
            if not self.ring.is_empty() and d != self.ring.digest():
                self._send(sender, self._full_ring(ae=True))
            elif self.ring.is_empty() and d != 0 and self.now >= self.next_ring_ask:
                self.next_ring_ask = self.now + 1.0
                self._send(sender, {"t": "ring?"})
            return None
        if t == "ring?":
            if not self.ring.is_empty() or msg.get("all") is True:
                self._send(sender, self._full_ring())
            return None
        if t == "rmpeer":
            n, i, g = msg.get("n"), msg.get("id"), msg.get("gone", [])
            if not isinstance(n, str) or not valid_name(n) or type(i) is not int \
                    or not isinstance(g, list) or len(g) > 64 \
                    or not all(isinstance(x, str) and valid_name(x) for x in g):
                return "rmpeer request malformed"
            self._on_rmpeer(sender, n, i, tuple(g))
            return None
        if t == "rmpeer-done":
            return self._on_rmpeer_done(sender, msg)
        if t == "used":
            return self._on_used(sender, msg)
        if t == "used-ok":
            return self._on_used_ok(sender, msg)
        return f"unknown message type {t[:32]!r}"

    def _merge(self, sender: str, r: Ring, full: bool, ae: bool, ok: bool) -> str | None:
        was_empty = self.ring.is_empty()
        trusted = self.synced and not self.vetting and (self.restored or self.vetted)
        foreign = self._foreign_writes(r) if trusted and not self.fault else []
        res = self.ring.merge(r)
        if isinstance(res, RingError):
            if res.kind == "seeds":
                if self.split is None:
                    self._event("error", res.message)
                self.split = (sender, ",".join(r.seeds), self.now)
                return None
            if res.kind == "unseeded":
                self._send(sender, {"t": "ring?"})
                return None
            return res.message
        if foreign:
            self._stop("duplicate-name", (
                f"ring entries under this peer's name {self.name} were changed by another "
                f"node (e.g. at {self._fmt(foreign[0])}, received from {sender}): another "
                "daemon runs under this name (a cloned data dir or machine), or this data "
                "dir was restored from an old copy. Stop the other daemon (the log names "
                "the address of any refused hello claiming this name), then restart this "
                "one with a new name and run `weaveipam rmpeer` for this name elsewhere"))
        newly_synced = False
        if was_empty and not (full and ok):
            # a delta, or a peer not in sync itself, may relay a restarted peer's stale
            # ring: only a full ring from an in-sync peer puts us in sync
            self.synced = False
            self.sync_deadline = self.now + SYNC_GRACE
            if not full:  # most likely a peer that just seeded: ask it now, not next second
                self.next_ring_ask = self.now + 1.0
                self._send(sender, {"t": "ring?"})
        elif full and not self.synced and not self.vetting and (
                ok or self.now >= self.sync_deadline):
            # in sync once a peer that is itself in sync sent its ring; if none is (the
            # whole cluster restarted), after a grace period with what we merged
            self.synced = newly_synced = True
        elif full and not ok and not self.synced:
            # that peer is catching up too (common while a new ring spreads): try another
            # soon rather than in a second
            self.next_ring_ask = min(self.next_ring_ask, self.now + RING_ASK_RETRY)
        if self.synced and not self.vetted:
            was_restarted = self.restored and bool(set(self.ring.peers()) - {self.name})
            self.vetted = True
            if self.ring.owned_by(self.name) and (not self.restored or was_restarted):
                # ranges under our name, fresh state: an earlier us that was removed, which
                # this peer may not have heard of yet; restarted with our data: ranges an
                # heir may have taken over while we were down. Hear every peer first.
                self.synced = newly_synced = False
                self.vetting = True
                self._poll()
                if not self.restored:
                    # our heir would know best, even if a partition hides it now
                    self.polling.add(self.heir_for(self.name))
            else:
                self._persist_ring()
        if ae and self.ring.digest() != r.digest():
            self._send(sender, self._full_ring())
        if not res and not was_empty and not newly_synced and (
                self.name not in self.ring.removed or self.known_removed):
            return None  # (news of our own removal may come without changed entries)
        self.dirty.update(res)
        if res:
            self.last_change = self.now
        me = self.name
        if was_empty or any(self.ring.entries[t][1] == me or self.space.owns(t) for t in res):
            self._owned_changed()  # only changes at or inside our ranges can move them
            if self.vetted and not self.vetting:
                # fresh, and a ring heard later shows ranges of our name in use that the
                # first one did not (a stale copy, or a grant still held back)
                self._check_lost_state()
        if self.name in self.ring.removed and not self.known_removed:
            # fresh (reset) state: the removal is history, carry on under the same name;
            # restored old data: its ranges are the heir's now, refuse to work
            self.known_removed = True
        if self.name in self.ring.removed and self.restored and not self.fault and (
                not self.removal_accepted or self._taken_over()):
            heir = self.ring.removed[self.name]
            self._stop("removed", f"this peer was removed with rmpeer; its ranges now belong "
                       f"to {heir}. Run `weaveipam reset` on this host to rejoin with fresh "
                       "state (its pods need new addresses)")
        # Every change we learn goes to disk, not only changes to our ranges: a peer's "in
        # use" marks and grants must outlive that peer's data dir in as many places as
        # possible (its heir holds them for certain; a returning node hears every peer)
        self._persist_ring()
        if was_empty:
            self._event("info", f"joined ring seeded by {','.join(self.ring.seeds)}")
        for p in list(self.pending):
            self._retry(p)
        return None

