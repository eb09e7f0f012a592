"""rmpeer and reset: who inherits a removed peer's ranges, and the polls before acting."""

from __future__ import annotations

from typing import Any

from ..records import ClearAllocations
from ..ring import Ring, RingError, valid_name
from ..space import Space
from .base import TAKEOVER_WAIT, _Pending
from .interface import RmPeer
from .seeding import Seeding


class Takeover(Seeding):
    def resolve_peer(self, text: str) -> str | None:
        if text in self.ring.peers() or text in self.peers or text in self.ring.removed:
            return text
        if text in (self.name, self.nickname):
            return self.name  # so that rmpeer of ourselves is explained, by either name
        for n, p in self.peers.items():
            if p.nickname == text:
                return n
        return None

    def heir_for(self, dead: str) -> str:
        """The one peer that takes a removed peer's ranges, the same whoever asks.

        Chosen from the ring (shared, converged state), never "whoever ran rmpeer": two
        rmpeers of one peer on two hosts then give its ranges to one heir (Weave #1949).
        """
        return self._heir_among(dead, frozenset())

    def _heir_past(self, dead: str, gone: tuple[str, ...]) -> str:
        """heir_for, skipping peers the operator says are gone too (RmPeer.gone)."""
        return self._heir_among(dead, frozenset(gone)) if gone else self.heir_for(dead)

    def _heir_among(self, dead: str, gone: frozenset[str]) -> str:
        cands = sorted(set(self.ring.peers()) - set(self.ring.removed) - {dead} - gone)
        if not cands:
            cands = sorted((self.reachable() | {self.name}) - {dead})
        if not cands:
            return self.name  # our own heir, asked alone: nobody else could take them
        after = [c for c in cands if c > dead]
        return after[0] if after else cands[0]

    def _rmpeer(self, rid: int, text: str, also: tuple[str, ...] = ()) -> None:
        dead = self.resolve_peer(text)
        if dead is None:
            self._fail(rid, "not-found", f"no peer named {text!r} is known")
            return
        gone_l = []
        for t in also:
            g = self.resolve_peer(t)
            if g is None or g == self.name or g in self.reachable():
                why = ("is not known" if g is None else "is this peer" if g == self.name
                       else "is reachable")
                self._fail(rid, "bad-request", f"{t!r}, named as gone too, {why}")
                return
            gone_l.append(g)
        gone = tuple(sorted(set(gone_l) - {dead}))
        if dead == self.name:
            self._fail(rid, "bad-request", "cannot rmpeer this peer itself; use "
                       "`weaveipam reset` here to hand its ranges away")
            return
        # an rmpeer of a name removed before still goes through its heir's poll: the name
        # may have rejoined fresh and been given space we have not heard of yet
        if dead in self.reachable():
            self._fail(rid, "conflict", f"peer {dead} is reachable; stop it (or run "
                       "`weaveipam reset` on it) before removing it")
            return
        heir = self._heir_past(dead, gone)
        if heir != self.name and heir not in self.reachable():
            if self._heir_past(heir, gone) == dead:
                # each other's heirs, both gone: neither removal can be done first. Only
                # the ring may choose an heir (a host's view of who is alive is not shared:
                # across a partition two hosts would choose two), so one must come back
                self._fail(rid, "unavailable", f"{dead}'s ranges go to {heir} and {heir}'s "
                           f"to {dead}, and neither is reachable from here: if both are gone "
                           f"for good, remove them together (`weaveipam rmpeer {dead} {heir}`); "
                           "else start one of them again with its data dir")
            else:
                self._fail(rid, "unavailable", f"{dead}'s ranges go to {heir}, which is "
                           f"unreachable from here: start {heir} again, or if it is gone for "
                           f"good too, run `weaveipam rmpeer {heir}` first, then retry")
            return
        if heir == self.name:
            self._take_over_later(dead, None, rid, gone)
            self._flush()
            return
        self.rm_pending[rid] = _Pending(rid, RmPeer(dead, gone), self.now + self.op_timeout)
        msg: dict[str, Any] = {"t": "rmpeer", "n": dead, "id": rid}
        if gone:
            msg["gone"] = list(gone)
        self._send(heir, msg)

    def _take_over(self, dead: str) -> dict[str, Any]:
        already = dead in self.ring.removed
        moved, changed = self.ring.transfer(dead, self.name)
        self.ring.mark_removed(dead, self.name)
        self._owned_changed()
        self._persist_ring()
        self.dirty.update(changed)
        self.dirty.add(self.universe.start)  # any entry carries the removed marker
        self.urgent = True
        self._event("warning", f"{moved} IPs taken over from {dead}")
        for p in list(self.pending):
            self._retry(p)
        res: dict[str, Any] = {"moved": moved, "peer": dead, "heir": self.name}
        if already and not moved:  # removed before, and nothing rejoined under its name
            res.update(already=True, heir=self.ring.removed[dead])
        return res

    def _leave(self, rid: int, force: bool) -> None:
        if self.fault not in (None, "removed") or not self.synced and not self.fault:
            # a restarted peer's ranges may have been taken over while it was down: handing
            # them on would give them a second owner
            self._fail(rid, "unavailable", f"cannot hand ranges away now: {self.state_text()}")
            return
        live = sorted(self.reachable())
        # a removed peer's ranges are its heir's already: it only forgets its state
        mine = [] if self.fault == "removed" else self.ring.owned_by(self.name)
        held = sum(len(a) for a in self.allocs.values())
        if held and not force and self.fault != "removed":
            # a removed peer's allocations were given up by the rmpeer; anyone else's may
            # still be used by running pods, and reset would let them be handed out again
            ident = min(self.allocs)
            where = ("another peer would then hand them out again" if live else
                     "no peer is reachable to take the ranges, so they would be handed out "
                     "again here after a restart")
            self._fail(rid, "conflict",
                       f"{held} addresses are still allocated here ({len(self.allocs)} "
                       f"idents, e.g. {ident!r}) and {where}: release them first "
                       "(`weaveipam release ID`), or run `weaveipam reset --force` once "
                       "their pods are gone")
            return
        if mine and not live and set(self.ring.peers()) != {self.name}:
            self._fail(rid, "unavailable", "no reachable peer to hand our ranges to; "
                       "connect to a peer first, or delete the data dir if the whole "
                       "cluster is going away")
            return
        moved = 0
        if mine and live:
            heir = live[0]
            moved, changed = self.ring.transfer(self.name, heir)
            self.dirty.update(changed)
            self._persist_ring()
            self._send(None, {"t": "ring", "full": False, "ring": self.ring.to_wire(changed)})
        for p in self.pending:
            self._fail(p.rid, "unavailable", "this peer is leaving (reset)")
        self.pending.clear()
        self.allocs.clear()
        self.holder.clear()
        self.prefixes.clear()
        self.space = Space()
        self._persist(ClearAllocations())
        self.left = True
        self._event("warning", f"reset: {moved} IPs handed over, {held} allocations dropped")
        self._reply(rid, {"moved": moved, "dropped": held})

    def _on_rmpeer(self, sender: str, dead: str, rid: int, gone: tuple[str, ...] = ()) -> None:
        refused = self._rmpeer_refused(dead, gone)
        if refused is None:
            self._take_over_later(dead, sender, rid, gone)
        else:
            self._rmpeer_answer(sender, rid, dead, *refused)

    def _rmpeer_refused(self, dead: str, gone: tuple[str, ...] = ()
                        ) -> tuple[dict[str, Any], str] | None:
        """None if we are the heir and may take `dead` over; else (result, error)."""
        heir = self._heir_past(dead, gone)
        back = sorted(set(gone) & self.reachable())
        if back:
            return {"moved": 0, "peer": dead, "heir": heir}, (
                f"peer {back[0]}, named as gone too, is reachable from {self.name}")
        if self.fault or self.left:
            # stopped (lost state, removed, a duplicate name) or reset: its ring is not one
            # to act on, and what it took could be lost with it
            return {"moved": 0, "peer": dead, "heir": heir}, (
                f"peer {self.name}, the heir, cannot take ranges over now: "
                f"{self.state_text()}")
        if heir != self.name:
            return {"moved": 0, "peer": dead, "heir": heir}, (
                f"peer {self.name} computes heir {heir}; wait for the ring to settle and retry")
        if dead in self.reachable():
            return {"moved": 0, "peer": dead, "heir": heir}, \
                f"peer {dead} is reachable from {heir}"
        return None

    def _rmpeer_answer(self, sender: str | None, rid: int, dead: str, res: dict[str, Any],
                       err: str) -> None:
        if sender is None:  # our own request
            if err:
                self._fail(rid, "conflict", err)
            else:
                self._reply(rid, res)
        else:
            done = {"t": "rmpeer-done", "id": rid, "moved": res["moved"],
                    "n": dead, "heir": res["heir"], "err": err}
            if not err:
                # the removal travels with the answer: should we crash before gossiping it,
                # the peer that asked still knows, and tells `dead` if it comes back with
                # its old data (persisted there like any merged change)
                done["ring"] = self._shown_ring().to_wire()
            self._send(sender, done)

    def _take_over_later(self, dead: str, sender: str | None, rid: int,
                         gone: tuple[str, ...] = ()) -> None:
        """Take over once every reachable peer sent its ring: `dead` may have given space
        to a peer while we could not hear it, and we must not take that piece too."""
        self.rm_gone[dead] = gone
        until, callers = self.takeovers.get(dead, (self.now + TAKEOVER_WAIT, []))
        self.takeovers[dead] = (until, [*callers, (sender, rid)])
        self._poll()
        self._polled()  # nobody to ask: at once

    def _poll(self) -> None:
        """Ask every reachable peer for its full ring, even an empty one (an answer)."""
        self.polling = set(self.reachable())
        self.next_poll = self.now + 1.0
        for p in sorted(self.polling):
            self._send(p, {"t": "ring?", "all": True})

    def _polled(self) -> None:
        """Do what waited for the poll: vetting once every peer and our heir answered,
        a takeover once every reachable peer answered or TAKEOVER_WAIT is up."""
        done = not (self.polling & self.reachable())
        # no deadline: while our heir is unheard it may have taken our ranges over (a
        # partition kept the news from the others); only a ring naming another heir ends it
        heir = self.heir_for(self.name)
        if self.vetting and not self.restored and heir != self.name \
                and heir not in self.rings_from and heir not in self.polling:
            # fresh: our heir holds every "in use" mark we made (Requests._witnessed), and
            # the rings we heard may name another heir than the one we first asked
            self.polling.add(heir)
            if heir in self.reachable():
                self._send(heir, {"t": "ring?", "all": True})
                done = False
        vetted = done and heir not in self.polling
        if self.vetting and vetted:
            self.vetting = False
            self.synced = True
            self._check_lost_state()
            self._persist_ring()
            for p in list(self.pending):
                self._retry(p)
        for dead, (until, callers) in list(self.takeovers.items()):
            if done or self.now >= until:
                del self.takeovers[dead]
                gone = self.rm_gone.pop(dead, ())
                self._answer_takeover(dead, callers, *(self._rmpeer_refused(dead, gone)
                                                       or (self._take_over(dead), "")))
        if not (self.vetting or self.takeovers):
            self.polling.clear()

    def _check_lost_state(self) -> None:
        """Fresh state, yet the ring shows addresses in use under our name: an earlier us
        lost its data dir (Weave #2610).  Its pods may still hold them; we cannot know
        which, so we hand out none.  A new name (a new data dir gets one) rejoins, and
        rmpeer of the old name frees its ranges once those pods are gone."""
        if self.restored or self.allocs or self.fault:
            return
        used = [o for o in self.ring.owned_by(self.name)
                if not self._untouched(o.start) and o.start not in self.witness_asked]
        if not used:
            return  # (an entry we marked ourselves, this start, is ours to use)
        total = sum(o.end - o.start for o in self.ring.owned_by(self.name))
        self._stop("lost-state", (
            f"the cluster's ring gives this peer's name {self.name} {total} addresses, some "
            "of them in use, but this node has no allocation records: its data dir was lost "
            "or replaced. Pods started before may still hold those addresses, so none are "
            "handed out. Restart this daemon under a new peer name (a new data dir gets one; "
            f"drop --name), and once the old pods are gone run `weaveipam rmpeer {self.name}` "
            "on another node to free its ranges"))

    def _answer_takeover(self, dead: str, callers: list[tuple[str | None, int]],
                         res: dict[str, Any], err: str) -> None:
        for i, (sender, rid) in enumerate(callers):
            # one takeover: to later callers it was done already (moved nothing)
            self._rmpeer_answer(sender, rid, dead, {**res, "moved": 0} if i else res, err)

    def _on_rmpeer_done(self, sender: str, msg: dict[str, Any]) -> str | None:
        i, moved, heir, err, n = (msg.get(k) for k in ("id", "moved", "heir", "err", "n"))
        if type(i) is not int or type(moved) is not int or not valid_name(heir) \
                or not isinstance(err, str) or not valid_name(n):
            return "rmpeer reply malformed"
        if "ring" in msg and not self.ring.is_empty():
            r = Ring.from_wire(msg["ring"], self.universe)
            if isinstance(r, RingError):
                return r.message
            bad = self._merge(sender, r, False, False, True)
            if bad:
                return bad
        p = self.rm_pending.pop(i, None)
        if p is None:
            return None
        if err:
            self._fail(p.rid, "conflict", err[:500])
        else:
            self._reply(p.rid, {"moved": moved, "peer": n, "heir": heir})
        return None

