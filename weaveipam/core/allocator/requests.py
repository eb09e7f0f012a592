"""Serving allocate, claim and release from our space, and trading space with peers."""

from __future__ import annotations

import msgpack

from ..addr import CIDR, Range
from ..records import DelAllocation, PutAllocation, SetWitnessed
from ..ring import FREE_CAP
from .base import (
    GRANT_WAIT,
    MAX_IDENT,
    SPACE_RETRY,
    WITNESS_RETRY,
    AllocatorBase,
    _Grant,
    _Pending,
)
from .interface import Allocate, Claim, Release, Request


class Requests(AllocatorBase):
    def _check(self, req: Request) -> str | None:
        ident = getattr(req, "ident", None)
        if ident is not None and (not isinstance(ident, str) or not 0 < len(ident) <= MAX_IDENT
                                  or not ident.isprintable()):
            return f"identifier must be 1..{MAX_IDENT} printable characters"
        if isinstance(req, Allocate) and req.subnet is not None:
            if not self.universe.contains_cidr(req.subnet):
                return (f"subnet {req.subnet} is not inside the allocation range "
                        f"{self.universe}")
        if isinstance(req, Claim) and req.addr not in self.universe:
            return (f"address {self._fmt(req.addr)} is not inside the allocation range "
                    f"{self.universe}")
        if isinstance(req, Claim) and req.subnet is not None \
                and req.addr not in req.subnet.usable():
            edge = "network" if req.addr == req.subnet.start else (
                "broadcast" if req.subnet.bits == 32 else "last")
            return (f"address {self._fmt(req.addr)} is the {edge} address of subnet "
                    f"{req.subnet}, which allocation never hands out; claim an address "
                    "inside the subnet")
        if isinstance(req, Release) and req.addr is not None and req.addr not in self.universe:
            return f"address {self._fmt(req.addr)} is not inside the range {self.universe}"
        return None

    def _try(self, p: _Pending) -> bool:
        """Serve a pending allocate/claim if we can now; False if it must wait."""
        req = p.req
        if self.split or self.fault:
            self._fail(p.rid, "unavailable", self.state_text())
            return True
        if self.ring.is_empty() or not self.synced:
            return False
        if isinstance(req, Claim):
            return self._claim(p, req)
        assert isinstance(req, Allocate)
        window = self._window(req.subnet)
        have = self.allocs.get(req.ident, {})
        for a in have:
            if a in window:
                self._reply(p.rid, a)  # repeated allocate: same answer, no second address
                return True
        nxt = self.space.next_free(window, self.cursor + 1)
        if nxt is not None:
            if not self._witnessed(nxt):
                return False  # a peer's answer (or a tick) retries it
            self._hold(req.ident, nxt, req.note, (req.subnet or self.default_subnet).prefix)
            self.cursor = nxt
            self._reply(p.rid, nxt)
            return True
        return self._ask_for_space(p, window)

    def _window(self, subnet: CIDR | None) -> Range:
        """Addresses a plain allocation in `subnet` may get (cached: asked on every call)."""
        w = self._windows.get(subnet)
        if w is None:
            if len(self._windows) > 256:  # subnets come from callers: keep it bounded
                self._windows.clear()
            w = self._windows[subnet] = (subnet or self.default_subnet).usable()
        return w

    def _claim(self, p: _Pending, req: Claim) -> bool:
        held_by = self.holder.get(req.addr)
        if held_by == req.ident:
            self._reply(p.rid, req.addr)
            return True
        if held_by is not None:
            self._fail(p.rid, "conflict",
                       f"address {self._fmt(req.addr)} is held by {held_by!r}")
            return True
        if self.space.owns(req.addr):
            if not self._witnessed(req.addr):
                return False
            self._hold(req.ident, req.addr, req.note,
                       None if req.subnet is None else req.subnet.prefix)
            self._reply(p.rid, req.addr)
            return True
        owner = self.ring.owner(req.addr)
        self._fail(p.rid, "conflict",
                   f"address {self._fmt(req.addr)} is in a range owned by peer {owner}; "
                   "claim it on that peer's node, or allocate a new one")
        return True

    def _hold(self, ident: str, a: int, note: str, prefix: int | None) -> None:
        """Hold `a` for `ident`, with the prefix of the subnet it was asked in (None: the
        caller gave none, and `prefix_of` answers the default subnet's)."""
        self.space.take(a)
        self.allocs.setdefault(ident, {})[a] = note
        self.holder[a] = ident
        if prefix is not None:
            self.prefixes[a] = prefix
        self._persist(PutAllocation(ident, a, note, prefix))

    def _witnessed(self, a: int) -> bool:
        """Has our heir (or the peer standing in for it) confirmed that the entry holding
        `a` is in use?

        Only peers outlive the loss of our data dir: if we came back fresh under our name,
        the ring must show every entry we ever used as used, or it would be handed back to
        us as empty while pods still hold its addresses (lost_state).  So before the first
        address of an entry is handed out, the entry is marked used, durably, and our heir
        confirms it has that mark on its disk.  The heir, because a returning fresh node
        waits to hear its heir before it trusts its entries (Takeover._polled); while the
        heir is unreachable, the next reachable peer in heir order stands in (a node must
        not stop allocating because one peer is down), and the mark spreads from there to
        every peer's disk as any ring change does.  A lone peer has nobody to tell.
        """
        t = self.space.owning(a)
        target = self._witness_target()
        if t is None or t not in self.ring.entries or target is None:
            return True
        untouched = self._untouched(t)
        w = self.witnessed.get(t)
        if w is not None and w in (target, self._witness()) and not untouched:
            return True
        if self.witnessed.pop(t, None) is not None:
            # emptied and shown so, or a new heir that may not hold the mark: mark again
            self._persist_witnessed()
        if self.now - self.witness_asked.get(t, -1e9) >= WITNESS_RETRY \
                and target in self.reachable():
            self.witness_asked[t] = self.now
            if untouched:
                v = self.ring.entries[t]
                self.ring.set_free(t, max(0, v[2] - 1))
                self._persist_ring()  # every version we send is on disk first
                self.dirty.add(t)
            self._send(target, {"t": "used", "ring": self.ring.to_wire([t])})
        return False

    def _persist_witnessed(self) -> None:
        """Keep what our heir confirmed: after a restart with our data those entries need
        no new confirmation (their heir may be down then), the others do."""
        u = self.universe.start
        self._persist(SetWitnessed(msgpack.packb(
            [[h, t - u] for t, h in sorted(self.witnessed.items())], use_bin_type=True)))

    def _release(self, rid: int, req: Release) -> None:
        addrs = self.allocs.get(req.ident)
        if not addrs or (req.addr is not None and req.addr not in addrs):
            what = req.ident if req.addr is None else f"{self._fmt(req.addr)} of {req.ident}"
            self._fail(rid, "not-found", f"nothing allocated for {what!r}")
            return
        gone = list(addrs) if req.addr is None else [req.addr]
        for a in gone:
            del addrs[a]
            del self.holder[a]
            self.prefixes.pop(a, None)
            self.space.free(a)
            self._persist(DelAllocation(req.ident, a))
        if not addrs:
            del self.allocs[req.ident]
        self._reply(rid, gone)
        self._flush()

    def _retry(self, p: _Pending) -> None:
        if p in self.pending and self._try(p):
            self.pending.remove(p)

    def _donors(self, window: Range) -> dict[str, int]:
        live = self.reachable()
        return {p: f for p, f in self.ring.free_in(window, self.name).items() if p in live}

    def _full(self, window: Range) -> bool:
        """True when the ring says nobody, reachable or not, has a free address in window."""
        if not self.synced or self.ring.is_empty():
            return False
        for s, e, v in self.ring.iter_ranges():
            if v[1] and v[1] != self.name and Range(s, e).overlaps(window):
                if v[1] not in self.reachable() or v[2] > 0:
                    return False
        return True

    def _no_space_reason(self, window: Range) -> str:
        owners = {v[1] for s, e, v in self.ring.iter_ranges()
                  if v[1] and Range(s, e).overlaps(window) and v[1] != self.name}
        dead = sorted(owners - self.reachable())
        if dead:
            return ("no free address here, and these peers that own part of it are "
                    f"unreachable: {', '.join(dead)} (if they are gone for good, run "
                    "`weaveipam rmpeer NAME` for each)")
        return "no free address in the subnet on any reachable peer: the range is full"

    def _ask_for_space(self, p: _Pending, window: Range) -> bool:
        """Ask a donor for space; True if instead the request was answered (range full)."""
        recent = [d for d, t in p.asked.items() if self.now - t < SPACE_RETRY]
        if recent:
            return False
        donors = self._donors(window)
        if not donors and self._full(window):
            # no peer reports free space and none that owns part of it is unreachable:
            # waiting cannot help, so say so now (a CNI ADD must not hang for 30 s)
            self._fail(p.rid, "unavailable", self._no_space_reason(window))
            return True
        for d in list(donors):
            if d in p.asked and self.now - p.asked[d] < SPACE_RETRY * 4:
                donors.pop(d)
        if not donors:
            return False
        names = sorted(donors)
        d = self.rng.choices(names, weights=[donors[n] for n in names])[0]
        p.asked[d] = self.now
        # "rj": we know we were removed once and rejoined fresh; without it a donor that
        # knows of our removal takes us for the old incarnation returning with stale data
        self._send(d, {"t": "space?", "w": [window.start - self.universe.start,
                                            window.end - self.universe.start],
                       "rj": self.known_removed})
        return False

    def _donate(self, to: str, window: Range) -> None:
        piece = self.space.donation(window)
        heir = self._witness_target()
        if piece is None:
            # nothing here: tell them our true free counts so they ask someone else
            changed = self._report_free(exact=True)
            toks = changed or [o.start for o in self.ring.owned_by(self.name)]
            if toks:
                self._send(to, {"t": "ring", "full": False, "ring": self.ring.to_wire(toks)})
            return
        before = dict(self.ring.entries)
        changed = self.ring.grant(piece.start, piece.end, to, self.name, piece.size)
        self._owned_changed()
        for t in changed:
            if self.ring.entries[t][1] == self.name:
                self.ring.set_free(t, self._shown_free(t))
        self._persist_ring()
        self._event("info", f"gave {self._fmt(piece.start)}+{piece.size} to {to}")
        if heir is None:
            self._send_grant(to, changed)
            return
        # Our heir should hold the grant before its receiver does: should our data dir be
        # lost, or rmpeer hand our ranges to the heir, while the receiver is down, nobody
        # else would know that the piece is no longer ours (two owners).  At most
        # GRANT_WAIT: a pending grant makes our view of the ring's peers differ from the
        # others' (its receiver may be new), and an rmpeer needs them to agree on heirs.
        g = _Grant(to, {t: self.ring.entries[t][0] for t in changed},
                   {t: before.get(t) for t in changed}, self.now, self.now)
        self.grants.append(g)
        self._send(heir, {"t": "used", "ring": self.ring.to_wire(changed)})

    def _send_grant(self, to: str, toks: list[int]) -> None:
        self._send(to, {"t": "ring", "full": False, "ring": self.ring.to_wire(toks)})
        self.dirty.update(toks)
        self.urgent = True

    def _witness(self) -> str | None:
        """The peer that must hold our marks and grants on disk: our heir (None: alone)."""
        if set(self.ring.peers()) <= {self.name}:
            return None
        heir = self.heir_for(self.name)
        return None if heir == self.name else heir

    def _witness_target(self) -> str | None:
        """Whom to ask: our heir, or while it is unreachable the next reachable peer in
        heir order (the heir again if none is: then we wait)."""
        heir = self._witness()
        live = self.reachable()
        if heir is None or heir in live:
            return heir
        cands = sorted(set(self.ring.peers()) - set(self.ring.removed) - {self.name})
        order = [c for c in cands if c > self.name] + [c for c in cands if c < self.name]
        return next((c for c in order if c in live), heir)

    def _grants_confirmed(self, conf: dict[int, int]) -> None:
        """Our heir holds these versions: hand over the grants it now holds whole."""
        for g in list(self.grants):
            for t, v in conf.items():
                if t in g.toks:
                    g.confirmed[t] = max(v, g.confirmed.get(t, -1))
            if all(g.confirmed.get(t, -1) >= v for t, v in g.toks.items()):
                self.grants.remove(g)
                self._send_grant(g.to, sorted(g.toks))

    def _grants_retry(self) -> None:
        heir = self._witness_target()
        for g in list(self.grants):
            if heir is None or self.now - g.since >= GRANT_WAIT:
                self.grants.remove(g)
                self._send_grant(g.to, sorted(g.toks))
            elif self.now - g.asked >= WITNESS_RETRY and heir in self.reachable():
                g.asked = self.now
                toks = [t for t in g.toks if t in self.ring.entries]
                self._send(heir, {"t": "used", "ring": self.ring.to_wire(toks)})

    def _owned_changed(self) -> None:
        self.space.set_owned([Range(o.start, o.end) for o in self.ring.owned_by(self.name)])

    def _shown_free(self, t: int) -> int:
        """The free count others see for our entry `t`.

        While a witness is pending the entry must stay shown as used: the true count of an
        entry nothing was handed out from yet would undo the mark the peer is confirming,
        and mark and count would take turns for ever (no allocation from a small entry).
        """
        free = self.space.free_of(t)
        if t in self.witness_asked and t not in self.witnessed:
            free = min(free, min(self.ring.end_of(t) - t, FREE_CAP) - 1)
        return free

    def _report_free(self, exact: bool = False) -> list[int]:
        """Refresh the free counts others see for our entries.

        Counts are hints for choosing donors, so small drifts are not gossiped: only an
        entry that ran out, or moved by 1/16, costs a message (Weave #682).
        """
        changed = []
        for r in self.space.owned():
            free = self._shown_free(r.start)
            old = self.ring.entries[r.start][2]
            if old == free or (not exact and free and abs(free - old) * 16 < old):
                continue
            if self.ring.set_free(r.start, free):
                changed.append(r.start)
        if changed:
            self.dirty.update(changed)
            # every version of our entries we send is on disk first: after a restart, a
            # newer one can only be another instance's (_foreign_writes)
            self._persist_ring()
        return changed

