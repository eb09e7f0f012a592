"""The allocator: one peer's IPAM as a pure state machine.

Inputs: `request`, `receive` (a peer's message), `peer_up`/`peer_down`, `tick`; every one
carries the current time.  Outputs (`take_outputs`): `Persist` records, `Send` messages and
`Reply`s.  The shell must make every `Persist` of a batch durable before it delivers any
`Send` or `Reply` of that batch: an acknowledged allocation, or space given to a peer, is
on disk first.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .addr import CIDR, AddrError, Range
from .paxos import NONE, Paxos
from .records import (
    ClearAllocations,
    DelAllocation,
    PutAllocation,
    Record,
    SetIdentity,
    SetPaxos,
    SetRing,
    Snapshot,
)
from .ring import Ring, RingError, valid_name
from .space import Space

# Timings, in seconds of the clock the shell passes in.
OP_TIMEOUT = 30.0         # pending allocate/claim/rmpeer give up with a clear error
SPACE_RETRY = 1.0         # ask another donor if no space arrived
PROPOSE_BACKOFF = (0.2, 1.0)
GOSSIP_INTERVAL = 0.5     # ring deltas are batched this long
ANTI_ENTROPY = 3.0        # digest exchange with one random peer
SPLIT_FORGET = 30.0
AUTO_PRIME_AFTER = 5.0
SYNC_GRACE = 10.0         # after a restart with no in-sync peer, trust merged rings
RING_ASK_RETRY = 0.25     # not in sync, answered by a peer that is not either: ask again
TAKEOVER_WAIT = 2.0       # rmpeer heir: longest wait for every peer's ring before acting
MAX_IDENT = 256
# Send(dest=None) is push gossip: the shell delivers it to at most this many random direct
# neighbours. Flooding every neighbour made each node decode each change ~30 times at
# 1,000 nodes; anti-entropy catches whatever the random choice misses.
GOSSIP_FANOUT = 6


# ---- inputs --------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocate:
    ident: str
    subnet: CIDR | None = None
    note: str = ""


@dataclass(frozen=True)
class Claim:
    ident: str
    addr: int
    note: str = ""
    prefix: int | None = None  # the subnet's prefix length, kept with the allocation


@dataclass(frozen=True)
class Release:
    ident: str
    addr: int | None = None


@dataclass(frozen=True)
class Lookup:
    ident: str


@dataclass(frozen=True)
class RmPeer:
    name: str


@dataclass(frozen=True)
class Leave:
    """Hand all our ranges to a live peer and forget our state (`weaveipam reset`)."""


@dataclass(frozen=True)
class Prime:
    """Start consensus now rather than at the first allocation."""


Request = Allocate | Claim | Release | Lookup | RmPeer | Leave | Prime


# ---- outputs -------------------------------------------------------------------------

@dataclass(frozen=True)
class Fail:
    code: str  # "bad-request" | "not-found" | "conflict" | "unavailable"
    message: str


@dataclass(frozen=True)
class Reply:
    rid: int
    value: Any = None
    error: Fail | None = None


@dataclass(frozen=True)
class Send:
    dest: str | None  # None: gossip to up to GOSSIP_FANOUT random neighbours
    msg: dict[str, Any]


@dataclass(frozen=True)
class Persist:
    record: Record


@dataclass(frozen=True)
class Event:
    """Something an operator should see in the log."""

    level: str  # "info" | "warning" | "error"
    text: str


Output = Reply | Send | Persist | Event


@dataclass(frozen=True)
class InitMode:
    kind: str  # "consensus" | "seed" | "observer"
    count: int = 1
    seeds: tuple[str, ...] = ()

    @staticmethod
    def parse(text: str) -> InitMode:
        """`consensus=N`, `seed=a,b,c` or `observer`, as Weave's --ipalloc-init."""
        t = text.strip()
        if t == "observer":
            return InitMode("observer")
        k, _, v = t.partition("=")
        if k == "consensus":
            if not v.isdigit() or int(v) < 1:
                raise ValueError(f"--ipalloc-init {t!r}: consensus needs a peer count >= 1, "
                                 "e.g. consensus=3")
            return InitMode("consensus", int(v))
        if k == "seed":
            names = tuple(sorted({n.strip() for n in v.split(",") if n.strip()}))
            if not names or not all(valid_name(n) for n in names):
                raise ValueError(f"--ipalloc-init {t!r}: seed needs peer names, "
                                 "e.g. seed=9e:96:c8:09:bf:c4,be:1e:35:91:c8:a2")
            return InitMode("seed", len(names), names)
        raise ValueError(f"--ipalloc-init {t!r}: use consensus=N, seed=NAME,... or observer")


@dataclass
class _Pending:
    rid: int
    req: Request
    deadline: float
    asked: dict[str, float] = field(default_factory=dict)  # donor -> when


@dataclass
class PeerView:
    nickname: str = ""


class Allocator:
    def __init__(self, *, name: str, nickname: str, universe: CIDR, init: InitMode,
                 rng: random.Random, now: float, default_subnet: CIDR | None = None,
                 snapshot: Snapshot | None = None, op_timeout: float = OP_TIMEOUT,
                 auto_prime: bool = False) -> None:
        self.name = name
        self.nickname = nickname
        self.universe = universe
        self.default_subnet = default_subnet or universe
        if not universe.contains_cidr(self.default_subnet):
            raise ValueError(f"default subnet {self.default_subnet} is not inside "
                             f"the range {universe}")
        self.init = init
        self.rng = rng
        self.now = now
        self.op_timeout = op_timeout
        self.ring = Ring(universe)
        self.space = Space()
        self.paxos: Paxos | None = None
        if init.kind == "consensus":
            self.paxos = Paxos(name, init.count // 2 + 1)
        self.allocs: dict[str, dict[int, str]] = {}
        self.holder: dict[int, str] = {}
        self.prefixes: dict[int, int] = {}  # address -> prefix length it was handed out in
        self.peers: dict[str, PeerView] = {}
        self._reach: set[str] = set()
        self.pending: list[_Pending] = []
        self.cursor = universe.start
        self.out: list[Output] = []
        self.dirty: set[int] = set()
        self.primed = False
        # a daemon starts consensus by itself (DaemonSet readiness), but only once every
        # peer it was told to expect is reachable, or a quorum is and AUTO_PRIME_AFTER has
        # passed: proposing alone at start would seed the ring with too few peers
        self.auto_prime_at = now + AUTO_PRIME_AFTER if auto_prime else None
        self.next_propose = 0.0
        self.paxos_progress = -1e9  # when others' claims last changed what we know
        self.next_gossip = now
        self.next_ae = now + ANTI_ENTROPY
        self.last_ae = now
        self.last_change = now
        self.fault: str | None = None        # "duplicate-name" | "removed": refuse to work
        self.fault_text = ""
        self.split: tuple[str, str, float] | None = None  # (peer, their seeds, when)
        self.synced = True
        self.urgent = False
        self.known_removed = False
        self.removal_accepted = False
        self.left = False
        self.rm_pending: dict[int, _Pending] = {}
        self.ring_sent: dict[str, float] = {}
        self._windows: dict[CIDR | None, Range] = {}
        self.next_ring_ask = now
        self.restored = False
        self.sync_deadline = now + SYNC_GRACE
        # Polls: every reachable peer is asked for its full ring before acting on news that
        # one peer's word is not enough for (a takeover, our name owning ranges).
        self.polling: set[str] = set()     # peers whose full ring has not come yet
        self.next_poll = now
        self.vetted = False                # ranges under our name checked at first sync
        self.vetting = False               # ... and the poll for that is running
        # dead peer -> (act by, waiting callers: (peer asking, or None for ours; rid))
        self.takeovers: dict[str, tuple[float, list[tuple[str | None, int]]]] = {}
        self._restore(snapshot)


    # ---- restore / persist -------------------------------------------------------------

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
            self.synced = set(self.ring.peers()) <= {self.name}
            self.restored = not self.ring.is_empty()
            self.known_removed = self.name in self.ring.removed
            self.removal_accepted = self.known_removed  # rejoined fresh after a removal
        if self.init.kind == "seed" and self.ring.is_empty():
            self._seed(self.init.seeds)

    def _persist(self, rec: Record) -> None:
        self.out.append(Persist(rec))

    def _persist_ring(self) -> None:
        if self.vetting or not (self.vetted or self.restored):
            # a fresh peer keeps its ring off disk until vetted: restored after a crash, a
            # ring naming us would count as our own data and skip the vetting
            return
        self._persist(SetRing(msgpack.packb(self.ring.to_wire(), use_bin_type=True)))

    # ---- outputs -------------------------------------------------------------------------

    def take_outputs(self) -> list[Output]:
        out, self.out = self.out, []
        return out

    def _send(self, dest: str | None, msg: dict[str, Any]) -> None:
        self.out.append(Send(dest, msg))

    def _full_ring(self, ae: bool = False) -> dict[str, Any]:
        # "ok": whether we are in sync ourselves; a stale ring must not make anyone synced
        return {"t": "ring", "full": True, "ae": ae, "ok": self.synced,
                "ring": self.ring.to_wire()}

    def _reply(self, rid: int, value: Any = None) -> None:
        self.out.append(Reply(rid, value))

    def _fail(self, rid: int, code: str, message: str) -> None:
        self.out.append(Reply(rid, None, Fail(code, message)))

    def _event(self, level: str, text: str) -> None:
        self.out.append(Event(level, text))

    # ---- state ---------------------------------------------------------------------------

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
        if s == "awaiting-consensus" and self.paxos is not None:
            return (f"awaiting consensus (quorum: {self.paxos.quorum}, known: "
                    f"{self.paxos.known()}): start at least {self.paxos.quorum} peers "
                    "that can reach each other, or check that --ipalloc-init consensus=N "
                    "is the cluster size on every node")
        if s == "awaiting-ring":
            return "observer: waiting for a peer that has a ring; connect this node to one"
        if s == "rejoining" and self.vetting:
            heir = self.heir_for(self.name)
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

    def reachable(self) -> set[str]:
        return self._reach

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

    # ---- requests ------------------------------------------------------------------------

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
            self._rmpeer(rid, req.name)
            return
        if isinstance(req, Leave):
            self._leave(rid)
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
        if isinstance(req, Release) and req.addr is not None and req.addr not in self.universe:
            return f"address {self._fmt(req.addr)} is not inside the range {self.universe}"
        return None

    def _fmt(self, a: int) -> str:
        try:
            return self.universe.fmt_addr(a)
        except (ValueError, AddrError):
            return str(a)

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
            self._hold(req.ident, req.addr, req.note, req.prefix)
            self._reply(p.rid, req.addr)
            return True
        owner = self.ring.owner(req.addr)
        self._fail(p.rid, "conflict",
                   f"address {self._fmt(req.addr)} is in a range owned by peer {owner}; "
                   "claim it on that peer's node, or allocate a new one")
        return True

    def _hold(self, ident: str, a: int, note: str, prefix: int | None) -> None:
        self.space.take(a)
        self.allocs.setdefault(ident, {})[a] = note
        self.holder[a] = ident
        if prefix is not None:
            self.prefixes[a] = prefix
        self._persist(PutAllocation(ident, a, note, prefix))

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

    # ---- space from peers ----------------------------------------------------------------

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
        if piece is None:
            # nothing here: tell them our true free counts so they ask someone else
            changed = self._report_free(exact=True)
            toks = changed or [o.start for o in self.ring.owned_by(self.name)]
            if toks:
                self._send(to, {"t": "ring", "full": False, "ring": self.ring.to_wire(toks)})
            return
        changed = self.ring.grant(piece.start, piece.end, to, self.name, piece.size)
        self._owned_changed()
        for t in changed:
            if self.ring.entries[t][1] == self.name:
                self.ring.set_free(t, self.space.free_of(t))
        self._persist_ring()
        self._send(to, {"t": "ring", "full": False, "ring": self.ring.to_wire(changed)})
        self.dirty.update(changed)
        self.urgent = True
        self._event("info", f"gave {self._fmt(piece.start)}+{piece.size} to {to}")

    def _owned_changed(self) -> None:
        self.space.set_owned([Range(o.start, o.end) for o in self.ring.owned_by(self.name)])

    def _report_free(self, exact: bool = False) -> list[int]:
        """Refresh the free counts others see for our entries.

        Counts are hints for choosing donors, so small drifts are not gossiped: only an
        entry that ran out, or moved by 1/16, costs a message (Weave #682).
        """
        changed = []
        for r in self.space.owned():
            free = self.space.free_of(r.start)
            old = self.ring.entries[r.start][2]
            if old == free or (not exact and free and abs(free - old) * 16 < old):
                continue
            if self.ring.set_free(r.start, free):
                changed.append(r.start)
        self.dirty.update(changed)
        return changed

    # ---- rmpeer and leave ----------------------------------------------------------------

    def resolve_peer(self, text: str) -> str | None:
        if text in self.ring.peers() or text in self.peers or text in self.ring.removed:
            return text
        for n, p in self.peers.items():
            if p.nickname == text:
                return n
        return None

    def heir_for(self, dead: str) -> str:
        """The one peer that takes a removed peer's ranges, the same whoever asks.

        Chosen from the ring (shared, converged state), never "whoever ran rmpeer": two
        rmpeers of one peer on two hosts then give its ranges to one heir (Weave #1949).
        """
        cands = sorted(set(self.ring.peers()) - set(self.ring.removed) - {dead})
        if not cands:
            cands = sorted((self.reachable() | {self.name}) - {dead})
        after = [c for c in cands if c > dead]
        return after[0] if after else cands[0]

    def _rmpeer(self, rid: int, text: str) -> None:
        dead = self.resolve_peer(text)
        if dead is None:
            self._fail(rid, "not-found", f"no peer named {text!r} is known")
            return
        if dead == self.name:
            self._fail(rid, "bad-request", "cannot rmpeer this peer itself; use "
                       "`weaveipam reset` here to hand its ranges away")
            return
        if dead in self.ring.removed and dead not in self.ring.peers():
            self._reply(rid, {"moved": 0, "peer": dead, "heir": self.ring.removed[dead],
                              "already": True})
            return
        if dead in self.reachable():
            self._fail(rid, "conflict", f"peer {dead} is reachable; stop it (or run "
                       "`weaveipam reset` on it) before removing it")
            return
        heir = self.heir_for(dead)
        if heir == self.name:
            self._take_over_later(dead, None, rid)
            self._flush()
            return
        self.rm_pending[rid] = _Pending(rid, RmPeer(dead), self.now + self.op_timeout)
        self._send(heir, {"t": "rmpeer", "n": dead, "id": rid})

    def _take_over(self, dead: str) -> dict[str, Any]:
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
        return {"moved": moved, "peer": dead, "heir": self.name}

    def _leave(self, rid: int) -> None:
        live = sorted(self.reachable())
        mine = self.ring.owned_by(self.name)
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
        self._reply(rid, {"moved": moved})

    # ---- peers ---------------------------------------------------------------------------

    def peer_up(self, name: str, nickname: str, now: float) -> None:
        self.now = now
        if name == self.name:
            return
        self._set_reachable(name, True)
        self.peers[name].nickname = nickname
        if self.vetting or self.takeovers:
            self.polling.add(name)  # it may know what the others did not
            self._send(name, {"t": "ring?", "all": True})
        # With a ring, say nothing: a new peer asks one of us for it (tick), and anti-entropy
        # covers the rest; answering every peer_up would cost O(peers) rings per join.
        if self.ring.is_empty() and self.paxos is not None and self.paxos.active():
            self._send(name, {"t": "paxos", "c": Paxos.encode(self.paxos.claims)})
        for p in list(self.pending):
            self._retry(p)
        self._flush()

    def peer_down(self, name: str, now: float) -> None:
        self.now = now
        if name in self.peers:
            self._set_reachable(name, False)

    def duplicate_name(self, uid_text: str) -> None:
        """The shell saw another peer using our name (a cloned machine: Weave #2606)."""
        self.fault = "duplicate-name"
        self.fault_text = (f"another peer uses this peer's name {self.name} ({uid_text}); "
                           "names must be unique: give each node its own --name, or delete "
                           "the cloned data dir")
        for p in self.pending:
            self._fail(p.rid, "unavailable", self.fault_text)
        self.pending.clear()

    # ---- messages ------------------------------------------------------------------------

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
            if msg["full"] and sender in self.polling:
                self.polling.discard(sender)
                self._polled()
            return err
        if t == "paxos":
            return self._on_paxos(sender, msg.get("c"))
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
            n, i = msg.get("n"), msg.get("id")
            if not isinstance(n, str) or not valid_name(n) or type(i) is not int:
                return "rmpeer request malformed"
            self._on_rmpeer(sender, n, i)
            return None
        if t == "rmpeer-done":
            return self._on_rmpeer_done(msg)
        return f"unknown message type {t[:32]!r}"

    def _merge(self, sender: str, r: Ring, full: bool, ae: bool, ok: bool) -> str | None:
        was_empty = self.ring.is_empty()
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
            self.vetted = True
            if not self.restored and self.ring.owned_by(self.name):
                # fresh state, yet ranges under our name: an earlier us that was removed,
                # which this peer may not have heard of yet; hear every peer first
                self.synced = newly_synced = False
                self.vetting = True
                self._poll()
                # our heir would know best, even if a partition hides it now
                self.polling.add(self.heir_for(self.name))
            else:
                self._persist_ring()
        if ae and self.ring.digest() != r.digest():
            self._send(sender, self._full_ring())
        if not res and not was_empty and not newly_synced:
            return None
        self.dirty.update(res)
        if res:
            self.last_change = self.now
        before = self.space.owned_size()
        me = self.name
        if was_empty or any(self.ring.entries[t][1] == me or self.space.owns(t) for t in res):
            self._owned_changed()  # only changes at or inside our ranges can move them
        if self.name in self.ring.removed and not self.known_removed:
            # fresh (reset) state: the removal is history, carry on under the same name;
            # restored old data: its ranges are the heir's now, refuse to work
            self.known_removed = True
        if self.name in self.ring.removed and self.restored and not self.fault and \
                not self.removal_accepted:
            heir = self.ring.removed[self.name]
            self.fault = "removed"
            self.fault_text = (f"this peer was removed with rmpeer; its ranges now belong to "
                               f"{heir}. Run `weaveipam reset` on this host to rejoin with "
                               "fresh state (its pods need new addresses)")
            self._event("error", self.fault_text)
            for p in self.pending:  # waiting work must not complete from stale ranges
                self._fail(p.rid, "unavailable", self.fault_text)
            self.pending.clear()
        if was_empty or self.space.owned_size() != before:
            self._persist_ring()
        if was_empty:
            self._event("info", f"joined ring seeded by {','.join(self.ring.seeds)}")
        for p in list(self.pending):
            self._retry(p)
        return None

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

    def _on_rmpeer(self, sender: str, dead: str, rid: int) -> None:
        refused = self._rmpeer_refused(dead)
        if refused is None:
            self._take_over_later(dead, sender, rid)
        else:
            self._rmpeer_answer(sender, rid, dead, *refused)

    def _rmpeer_refused(self, dead: str) -> tuple[dict[str, Any], str] | None:
        """None if we are the heir and may take `dead` over; else (result, error)."""
        heir = self.heir_for(dead)
        if dead in self.ring.removed and dead not in self.ring.peers():
            return {"moved": 0, "peer": dead, "heir": self.ring.removed[dead]}, ""
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
            self._send(sender, {"t": "rmpeer-done", "id": rid, "moved": res["moved"],
                                "n": dead, "heir": res["heir"], "err": err})

    def _take_over_later(self, dead: str, sender: str | None, rid: int) -> None:
        """Take over once every reachable peer sent its ring: `dead` may have given space
        to a peer while we could not hear it, and we must not take that piece too."""
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
        vetted = done and self.heir_for(self.name) not in self.polling
        if self.vetting and vetted:
            self.vetting = False
            self.synced = True
            self._persist_ring()
            for p in list(self.pending):
                self._retry(p)
        for dead, (until, callers) in list(self.takeovers.items()):
            if done or self.now >= until:
                del self.takeovers[dead]
                self._answer_takeover(dead, callers, *(self._rmpeer_refused(dead)
                                                       or (self._take_over(dead), "")))
        if not (self.vetting or self.takeovers):
            self.polling.clear()

    def _answer_takeover(self, dead: str, callers: list[tuple[str | None, int]],
                         res: dict[str, Any], err: str) -> None:
        for i, (sender, rid) in enumerate(callers):
            # one takeover: to later callers it was done already (moved nothing)
            self._rmpeer_answer(sender, rid, dead, {**res, "moved": 0} if i else res, err)

    def _on_rmpeer_done(self, msg: dict[str, Any]) -> str | None:
        i, moved, heir, err, n = (msg.get(k) for k in ("id", "moved", "heir", "err", "n"))
        if type(i) is not int or type(moved) is not int or not valid_name(heir) \
                or not isinstance(err, str) or not valid_name(n):
            return "rmpeer reply malformed"
        p = self.rm_pending.pop(i, None)
        if p is None:
            return None
        if err:
            self._fail(p.rid, "conflict", err[:500])
        else:
            self._reply(p.rid, {"moved": moved, "peer": n, "heir": heir})
        return None

    # ---- time ----------------------------------------------------------------------------

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
                self._fail(rid, "unavailable", f"the heir for {p.req.name}, "
                           f"{self.heir_for(p.req.name)}, did not answer; if it is gone too, "
                           "rmpeer it first")
        if self.split and now - self.split[2] > SPLIT_FORGET:
            self.split = None
        if self.polling and now >= self.next_poll:
            self.next_poll = now + 1.0  # a request or answer may have been lost
            for peer in sorted(self.polling & self.reachable()):
                self._send(peer, {"t": "ring?", "all": True})
        if self.vetting or self.takeovers:
            self._polled()
        if (self.ring.is_empty() or not self.synced) and now >= self.next_ring_ask:
            # restarted or new: ask one live peer for its ring rather than wait for gossip
            self.next_ring_ask = now + 1.0
            live = sorted(self.reachable())
            if live:
                self._send(self.rng.choice(live), {"t": "ring?"})
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
        elif now >= self.next_gossip:
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

    def _timeout_reason(self, p: _Pending) -> str:
        s = self.state()
        if s in ("ready", "waiting-for-space") and isinstance(p.req, Allocate):
            w = (p.req.subnet or self.default_subnet).usable()
            return f"timed out after {self.op_timeout:g}s: " + self._no_space_reason(w)
        return f"timed out after {self.op_timeout:g}s: {self.state_text()}"

    def _retry(self, p: _Pending) -> None:
        if p in self.pending and self._try(p):
            self.pending.remove(p)

    def _flush(self) -> None:
        """Gossip batched ring changes: at most once per GOSSIP_INTERVAL, except our own
        ownership changes, which go at once (a donation must not wait)."""
        if not (self.urgent or self.now >= self.next_gossip):
            return
        self.urgent = False
        if self.dirty and not self.ring.is_empty():
            self.next_gossip = self.now + GOSSIP_INTERVAL
            toks = [t for t in self.dirty if t in self.ring.entries]
            self.dirty = set()
            if toks:
                self._send(None, {"t": "ring", "full": False, "ring": self.ring.to_wire(toks)})

    # ---- views for status, API and tests -------------------------------------------------

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
