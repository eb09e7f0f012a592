"""The allocator's state and its outputs, shared by every layer built on it.

The allocator is built in layers, each a module with one idea, each building on the ones
before it: `requests` (serve allocate/claim/release, trade space with peers), `seeding`
(Paxos and the first ring), `takeover` (rmpeer, reset, the polls before acting), `sync`
(peers' rings and liveness, restarts) and `peer` (the entry points and the state line).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..addr import CIDR, AddrError, Range
from ..paxos import Paxos
from ..records import Record, SetRing, Snapshot
from ..ring import FREE_CAP, Ring
from ..space import Space
from .interface import Event, Fail, InitMode, Output, Persist, Reply, Request, RmPeer, Send

# Timings, in seconds of the clock the shell passes in.
OP_TIMEOUT = 30.0         # pending allocate/claim/rmpeer give up with a clear error
SPACE_RETRY = 1.0         # ask another donor if no space arrived
PROPOSE_BACKOFF = (0.2, 1.0)
GOSSIP_INTERVAL = 0.5     # ring deltas are batched this long
ANTI_ENTROPY = 3.0        # digest exchange with one random peer
SPLIT_FORGET = 30.0
AUTO_PRIME_AFTER = 5.0
WITNESS_RETRY = 0.5      # ask our heir again to confirm an entry is in use
GRANT_WAIT = 2.0          # longest a grant waits for our heir before it goes anyway
SYNC_GRACE = 10.0         # after a restart with no in-sync peer, trust merged rings
RING_ASK_RETRY = 0.25     # not in sync, answered by a peer that is not either: ask again
TAKEOVER_WAIT = 2.0       # rmpeer heir: longest wait for every peer's ring before acting
MAX_IDENT = 256
# Send(dest=None) is push gossip: the shell delivers it to at most this many random direct
# neighbours. Flooding every neighbour made each node decode each change ~30 times at
# 1,000 nodes; anti-entropy catches whatever the random choice misses.
GOSSIP_FANOUT = 6


@dataclass
class _Pending:
    rid: int
    req: Request
    deadline: float
    asked: dict[str, float] = field(default_factory=dict)  # donor -> when


@dataclass
class _Grant:
    """A piece we gave away, held back from its receiver until our heir has it on disk."""

    to: str
    toks: dict[int, int]  # token -> version our heir must hold
    before: dict[int, Any]  # token -> its entry before the grant (None: new token)
    asked: float
    since: float
    confirmed: dict[int, int] = field(default_factory=dict)


@dataclass
class PeerView:
    nickname: str = ""



class AllocatorBase:
    def __init__(self, *, name: str, nickname: str, universe: CIDR, init: InitMode,
                 rng: random.Random, now: float, default_subnet: CIDR | None = None,
                 snapshot: Snapshot | None = None, op_timeout: float = OP_TIMEOUT,
                 auto_prime: bool = False, expect_peers: bool = False) -> None:
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
        self.disk_owned: dict[int, int] = {}  # token -> version of ours at restore
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
        self.rm_gone: dict[str, tuple[str, ...]] = {}  # dead -> others named gone with it
        # Before seeding a ring we must know that no reachable peer already holds one:
        # peers that told us they have none (an empty full ring, or Paxos claims).  A node
        # given peers waits for one to answer before it may seed (Seeding._clear_to_seed).
        self.heard: set[str] = set()
        self.rings_from: set[str] = set()  # every peer that sent its full ring, this start
        self.rm_told: str | None = None  # a peer that told us an rmpeer of us is pending
        self.next_unheard_ask = now
        # our entries our heir confirmed as in use -> that heir (Requests._witnessed)
        self.witnessed: dict[int, str] = {}
        self.witness_asked: dict[int, float] = {}
        self.grants: list[_Grant] = []  # (Requests._donate)
        self.expect_peers = expect_peers
        self.self_seeded = False  # this start seeded the ring itself, not vetted since
        self._restore(snapshot)

    def _persist(self, rec: Record) -> None:
        self.out.append(Persist(rec))

    def _persist_ring(self) -> None:
        if self.vetting or not (self.vetted or self.restored) or self.fault == "lost-state":
            # a fresh peer keeps its ring off disk until vetted: restored after a crash, a
            # ring naming us would count as our own data and skip the vetting (and a peer
            # that lost its state must find that out again after a restart)
            return
        self._persist(SetRing(msgpack.packb(self.ring.to_wire(), use_bin_type=True)))

    def take_outputs(self) -> list[Output]:
        out, self.out = self.out, []
        return out

    def _send(self, dest: str | None, msg: dict[str, Any]) -> None:
        self.out.append(Send(dest, msg))

    def _full_ring(self, ae: bool = False) -> dict[str, Any]:
        # "ok": whether we are in sync ourselves; a stale ring must not make anyone synced
        msg = {"t": "ring", "full": True, "ae": ae, "ok": self.synced,
               "ring": self._shown_ring().to_wire()}
        rm = {p.req.name for p in self.rm_pending.values() if isinstance(p.req, RmPeer)}
        if rm or self.takeovers:
            # peers an rmpeer asked here is not answered for yet: one back with its old
            # data must hear its heir before it trusts its ranges (RingSync._dispatch)
            msg["rm"] = sorted(rm | set(self.takeovers))
        return msg

    def _shown_ring(self) -> Ring:
        """Our ring as we show it whole: without the grants our heir does not hold yet
        (Requests._donate), so that their receivers cannot learn them from it."""
        if not self.grants:
            return self.ring
        r = self.ring.copy()
        for g in reversed(self.grants):
            for t, e in g.before.items():
                if e is None:
                    r.entries.pop(t, None)
                else:
                    r.entries[t] = e
        r._digest = None
        return r

    def _reply(self, rid: int, value: Any = None) -> None:
        self.out.append(Reply(rid, value))

    def _fail(self, rid: int, code: str, message: str) -> None:
        self.out.append(Reply(rid, None, Fail(code, message)))

    def _event(self, level: str, text: str) -> None:
        self.out.append(Event(level, text))

    def _stop(self, fault: str, text: str) -> None:
        """Refuse all work from now on: what we hold may not be ours to hand out."""
        self.fault, self.fault_text = fault, text
        self._event("error", text)
        for p in self.pending:  # waiting work must not complete from suspect ranges
            self._fail(p.rid, "unavailable", text)
        self.pending.clear()

    def _fmt(self, a: int) -> str:
        try:
            return self.universe.fmt_addr(a)
        except (ValueError, AddrError):
            return str(a)

    def _untouched(self, t: int) -> bool:
        """Does the ring show entry `t` as never used: free count equal to its size?

        Less is an address in use (or an "in use" mark).  More is a version older than a
        grant that cut the entry: its owner wrote after it, and may have handed out
        addresses since; a node back without its data must not take that for unused."""
        return bool(self.ring.entries[t][2] == min(self.ring.end_of(t) - t, FREE_CAP))

    def reachable(self) -> set[str]:
        return self._reach

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

    # ---- provided by the layers above ------------------------------------------------

    def _restore(self, snap: Snapshot | None) -> None:
        raise NotImplementedError

    def state_text(self) -> str:
        raise NotImplementedError

    def _poll(self) -> None:  # takeover.py
        raise NotImplementedError

    def _polled(self) -> None:  # takeover.py
        raise NotImplementedError

    def heir_for(self, dead: str) -> str:  # takeover.py
        raise NotImplementedError

    def _merge(self, sender: str, r: Ring, full: bool, ae: bool, ok: bool) -> str | None:
        raise NotImplementedError  # sync.py

    def _vet_seeded(self) -> None:
        """Hear every reachable peer's ring before handing anything out from a ring we
        seeded ourselves: the same seeds give the same ring, and the cluster's copy may be
        older than us, with our entries in use by a predecessor under our name (a lost
        data dir: lost_state).  Our own marks would only repeat its versions."""
        if self.self_seeded and self.reachable() and not (
                self.witness_asked or self.allocs or self.restored or self.fault):
            self.self_seeded = False
            self.synced = False
            self.vetting = True
            self._poll()
            self._polled()
