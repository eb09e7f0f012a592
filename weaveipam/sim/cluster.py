"""A deterministic simulated cluster driving the real allocator code.

One seeded RNG, one simulated clock, a message queue with latency, loss, duplication and
partitions, crashes that restart from the persisted records, joins, and rmpeer.  Given the
same arguments a run replays exactly.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any

import msgpack
from sortedcontainers import SortedDict

from ..core.addr import CIDR, Range
from ..core.allocator import (
    GOSSIP_FANOUT,
    Allocate,
    Allocator,
    Claim,
    Event,
    InitMode,
    Leave,
    Persist,
    Release,
    Reply,
    Request,
    RmPeer,
    Send,
)
from ..core.records import Snapshot
from ..core.ring import Ring
from .wire import transit


@dataclass
class Faults:
    loss: float = 0.0
    dup: float = 0.0
    latency: tuple[float, float] = (0.001, 0.005)
    partition_rate: float = 0.0   # per second
    crash_rate: float = 0.0       # per second, cluster-wide
    join_rate: float = 0.0
    rmpeer_rate: float = 0.0
    # operators and strangers (per second, cluster-wide): a node joining or restarting with
    # another --ipalloc-init, a restart with the store wiped but the name kept, reset, a
    # forged hello claiming a node's name
    operator_rate: float = 0.0
    stranger_rate: float = 0.0
    stale_removed: float = 0.0    # chance a removed node comes back with its old data
    # chance that a node crashes right after a batch that acknowledged an allocation left
    # it: whatever the allocator had not yet emitted (a later batch) never reaches the disk
    reply_crash: float = 0.0


@dataclass
class SimNode:
    idx: int
    name: str
    alloc: Allocator | None
    disk: Snapshot = field(default_factory=Snapshot)
    neighbours: set[int] = field(default_factory=set)
    removed: bool = False        # rmpeer'd while down: its acknowledged allocations are gone
    init: InitMode | None = None  # an operator's own --ipalloc-init for this node
    wiped: bool = False          # restarted with its store lost: its pods still hold addresses
    respawn_at: float | None = None  # the operator restarts it with fresh state then
    removal_done: bool = False   # an rmpeer of it took ranges: they are the heir's now
    removal_ok: bool = False     # an rmpeer of it succeeded (whatever it moved)
    # back with old data after its removal: the ranges that data names as its own (the
    # heir's now); space it is given afterwards is its own again
    stale: list[Range] = field(default_factory=list)
    down_since: float = 0.0
    next_ident: int = 0
    bytes_sent: int = 0
    # per delivery attempt (a broadcast counts once per target): the per-node rates
    msgs_out: int = 0
    bytes_out: int = 0
    rid_seq: int = 0
    inflight: dict[int, Request] = field(default_factory=dict)


WIPE_APART = 30.0  # simulated seconds between two operator wipes of a data dir


class Violation(Exception):
    """An invariant broke; `kind` says which, so a planted bug's test can check that the
    checker meant for it is the one that caught it."""

    KINDS = ("duplicate", "double-owner", "lost", "removed-allocated", "not-converged",
             "not-allocating")

    def __init__(self, kind: str, text: str) -> None:
        assert kind in self.KINDS, kind
        super().__init__(text)
        self.kind = kind


def peer_name(i: int) -> str:
    b = (i + 1).to_bytes(6, "big")
    return ":".join(f"{x:02x}" for x in b)


class Simulator:
    def __init__(self, *, nodes: int, seed: int, universe: str = "10.32.0.0/12",
                 consensus: int | None = None, degree: int = 30, faults: Faults | None = None,
                 traffic: float = 5.0, tick: float = 0.1, fanout: int = GOSSIP_FANOUT,
                 wire: bool = True, join_all: bool = True) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.universe = CIDR.parse(universe)
        self.now = 0.0
        self.tick_s = tick
        self.degree = degree
        self.faults = faults or Faults()
        self.traffic = traffic
        self.fanout = fanout
        self.wire = wire
        self.init = InitMode("consensus", consensus or nodes)
        self.nodes: list[SimNode] = []
        # (due, seq, src, dst, msg, the sender's and receiver's incarnations): a connection
        # dies with either end, so nothing sent before a crash arrives after it
        self.queue: list[tuple[float, int, int, int, dict[str, Any], object, object]] = []
        self.qseq = 0
        self.side: dict[int, int] = {}  # partition side per node; empty = healed
        self.heal_at = 0.0
        self.steps = 0
        self.stats = {"allocations": 0, "claims": 0, "releases": 0, "failures": 0,
                      "crashes": 0, "restarts": 0, "joins": 0, "rmpeers": 0, "partitions": 0,
                      "messages": 0, "dropped": 0, "operator": 0, "wipes": 0, "resets": 0,
                      "forged_hellos": 0, "reply_crashes": 0}
        # acknowledged holdings, as a client sees them: address -> (node, ident)
        self.ledger: dict[int, tuple[int, str]] = {}
        # ledger addresses whose node lost its store: pods still hold them (no one may hand
        # them out), but the node cannot; they leave the ledger when the node is rmpeer'd
        self.orphans: set[int] = set()
        self.owned_index: SortedDict = SortedDict()  # start -> (end, node)
        self.owned_of: dict[int, list[Range]] = {}
        self.index_key: dict[int, Any] = {}
        self.events: list[str] = []
        self.last_wipe = -1e9
        # crashed the instant their last delivered batch acknowledged an allocation: their
        # later outputs never leave, and they go down at the next safe point of the step
        self.doomed: set[int] = set()
        self.faulting = False
        self.expected = nodes
        for _ in range(nodes):
            self._add_node(connect=join_all)

    # ---- topology ------------------------------------------------------------------------

    def _add_node(self, connect: bool = True, init: InitMode | None = None) -> SimNode:
        i = len(self.nodes)
        name = peer_name(i)
        n = SimNode(i, name, None, init=init)
        self.nodes.append(n)
        self._boot(n)
        if connect:
            others = [j for j in range(i) if len(self.nodes[j].neighbours) < self.degree]
            self.rng.shuffle(others)
            for j in others[: max(1, min(self.degree // 2, len(others)))]:
                n.neighbours.add(j)
                self.nodes[j].neighbours.add(i)
        for m in self.nodes:
            if m is not n and m.alloc is not None and self._connected(n.idx, m.idx):
                m.alloc.peer_up(name, f"node{i}", self.now)
                n.alloc.peer_up(m.name, f"node{m.idx}", self.now)  # type: ignore[union-attr]
                self._drain(m)
        self._drain(n)
        return n

    def _boot(self, n: SimNode) -> None:
        snap = n.disk if n.disk.name is not None else None
        n.alloc = Allocator(name=n.name, nickname=f"node{n.idx}", universe=self.universe,
                            init=n.init or self.init, rng=random.Random(self.rng.random()),
                            now=self.now, snapshot=snap,
                            # every node is given the others' addresses, as a DaemonSet's
                            expect_peers=len(self.nodes) > 1 or self.expected > 1)
        self._drain(n)

    def _connected(self, a: int, b: int) -> bool:
        return self.side.get(a, 0) == self.side.get(b, 0)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if n.alloc is not None]

    # ---- message plumbing ----------------------------------------------------------------

    def _drain(self, n: SimNode) -> None:
        """Deliver one batch of outputs as the daemon does: every Persist of the batch is
        durable before any of its Sends or Replies leaves (weaveipam/daemon.py)."""
        a = n.alloc
        assert a is not None
        if n.idx in self.doomed:
            return  # it crashed already: what it does now never leaves it
        outs = a.take_outputs()
        for o in outs:
            if isinstance(o, Persist):
                n.disk.apply(o.record)
        acked = False
        for o in outs:
            if isinstance(o, Send):
                self._send(n, o)
            elif isinstance(o, Reply):
                acked = self._on_reply(n, o) or acked
            elif isinstance(o, Event) and o.level == "error":
                self.events.append(f"{self.now:.1f} {n.name}: {o.text}")
        self._reindex(n)
        if acked and self.faulting and self.faults.reply_crash \
                and self.rng.random() < self.faults.reply_crash:
            up = [m for m in self.live() if not m.removed and m.idx not in self.doomed]
            if not n.removed and len(up) > 2:
                self.doomed.add(n.idx)

    def _crash_doomed(self) -> None:
        for i in sorted(self.doomed):
            n = self.nodes[i]
            self.doomed.discard(i)
            if n.alloc is not None:
                self.stats["reply_crashes"] += 1
                self._crash(n)

    def _send(self, n: SimNode, s: Send) -> None:
        msg = s.msg
        size = 0
        if self.wire:
            size, msg = transit(msg)
            n.bytes_sent += size
        if s.dest is None:
            targets = [j for j in n.neighbours if self.nodes[j].alloc is not None]
            if self.fanout and len(targets) > self.fanout:
                targets = self.rng.sample(sorted(targets), self.fanout)
        else:
            targets = [j for j in self._index_of(s.dest)]
        n.msgs_out += len(targets)
        n.bytes_out += size * len(targets)
        for j in targets:
            self._enqueue(n.idx, j, msg)

    def _index_of(self, name: str) -> list[int]:
        # names are peer_name(i); parse back
        try:
            i = int(name.replace(":", ""), 16) - 1
        except ValueError:
            return []
        return [i] if 0 <= i < len(self.nodes) else []

    def _enqueue(self, src: int, dst: int, msg: dict[str, Any]) -> None:
        f = self.faults
        if not self._connected(src, dst) or self.rng.random() < f.loss:
            self.stats["dropped"] += 1
            return
        copies = 2 if self.rng.random() < f.dup else 1
        for _ in range(copies):
            at = self.now + self.rng.uniform(*f.latency)
            self.qseq += 1
            heapq.heappush(self.queue, (at, self.qseq, src, dst, msg,
                                        self.nodes[src].alloc, self.nodes[dst].alloc))

    def _deliver_until(self, t: float) -> None:
        while self.queue and self.queue[0][0] <= t:
            at, _, src, dst, msg, sent_by, sent_to = heapq.heappop(self.queue)
            self.now = max(self.now, at)
            n = self.nodes[dst]
            if n.alloc is None or n.alloc is not sent_to or self.nodes[src].alloc is not sent_by \
                    or not self._connected(src, dst):
                self.stats["dropped"] += 1
                continue
            self.stats["messages"] += 1
            n.alloc.receive(self.nodes[src].name, msg, self.now)
            self._drain(n)  # re-indexes ownership: a double owner raises Violation here

    # ---- client side ---------------------------------------------------------------------

    def request(self, n: SimNode, req: Request) -> int:
        assert n.alloc is not None
        n.rid_seq += 1
        n.inflight[n.rid_seq] = req
        n.alloc.request(n.rid_seq, req, self.now)
        self._drain(n)
        return n.rid_seq

    def _on_reply(self, n: SimNode, r: Reply) -> bool:
        """Check a reply against the ledger; True if it acknowledged an allocation."""
        req = n.inflight.pop(r.rid, None)
        if req is None:
            return False
        if r.error is not None:
            self.stats["failures"] += 1
            return False
        if isinstance(req, Allocate | Claim):
            a = int(r.value)
            key = (n.idx, req.ident)
            if n.removed and n.removal_done and any(a in r_ for r_ in n.stale):
                raise Violation("removed-allocated", f"{n.name}, removed with rmpeer and back "
                                f"with its old data, acknowledged {req.ident} -> "
                                f"{self.universe.fmt_addr(a)}")
            held = self.ledger.get(a)
            if held is not None and held != key:
                raise Violation("duplicate", f"address {self.universe.fmt_addr(a)} acknowledged to "
                                f"{key} while held by {held}")
            self.ledger[a] = key
            self.stats["allocations" if isinstance(req, Allocate) else "claims"] += 1
            return True
        elif isinstance(req, Release):
            for a in r.value:
                if self.ledger.get(a) == (n.idx, req.ident):
                    del self.ledger[a]
            self.stats["releases"] += 1
        elif isinstance(req, RmPeer):
            self.stats["rmpeers"] += 1
            for i in self._index_of(req.name):
                # its heir has taken its ranges; back with old data it must not use them (a
                # removal that moved nothing took nothing: the name may rejoin as it was)
                if self.nodes[i].removed:
                    self.nodes[i].removal_ok = True
                    self.nodes[i].removal_done |= bool(r.value.get("moved"))
        return False

    def _traffic(self) -> None:
        live = self.live()
        if not live:
            return
        k = self._poisson(self.traffic * self.tick_s * len(live) / 10)
        for _ in range(k):
            n = self.rng.choice(live)
            a = n.alloc
            assert a is not None
            x = self.rng.random()
            if x < 0.55 or not a.allocs:
                n.next_ident += 1
                self.request(n, Allocate(f"c{n.next_ident}"))
            elif x < 0.9:
                ident = self.rng.choice(sorted(a.allocs))
                self.request(n, Release(ident))
            else:
                off = self.rng.randrange(self.universe.size)
                n.next_ident += 1
                self.request(n, Claim(f"c{n.next_ident}", self.universe.start + off))

    def _poisson(self, lam: float) -> int:
        # Knuth; lam is small
        import math
        lim, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= lim:
                return k
            k += 1

    # ---- faults --------------------------------------------------------------------------

    def _faults(self, enabled: bool) -> None:
        f, dt = self.faults, self.tick_s
        if self.side and self.now >= self.heal_at:
            self._heal()
        if not enabled:
            return
        if not self.side and self.rng.random() < f.partition_rate * dt:
            self._partition()
        if self.rng.random() < f.crash_rate * dt:
            up = [n for n in self.live() if not n.removed]
            if len(up) > 2:
                self._crash(self.rng.choice(up))
        for n in self.nodes:
            if n.alloc is None and n.respawn_at is None and \
                    self.now - n.down_since > self.rng.uniform(1, 30) and self.rng.random() < 0.05:
                self._restart(n)
        if self.rng.random() < f.join_rate * dt:
            self._add_node()
            self.stats["joins"] += 1
        if not self.side and self.rng.random() < f.rmpeer_rate * dt:
            down = [n for n in self.nodes if n.alloc is None and not n.removed
                    and self.now - n.down_since > 5]
            if down:
                self._rmpeer(self.rng.choice(down))
        if self.now > 2.0 and self.rng.random() < f.operator_rate * dt:
            self._operator()
        if self.rng.random() < f.stranger_rate * dt:
            live = self.live()
            if live:
                self.forged_hello(self.rng.choice(live))

    # ---- operators and strangers ---------------------------------------------------------

    def _other_init(self) -> InitMode:
        """An --ipalloc-init other than the cluster's: the defaults, another count, a seed
        list of existing names, or observer (a DaemonSet edited, a node added by hand)."""
        k = self.rng.randrange(4)
        if k == 0:
            return InitMode("consensus", 1)
        if k == 1:
            return InitMode("consensus", self.rng.randint(1, len(self.nodes) + 3))
        if k == 2:
            names = sorted({self.rng.choice(self.nodes).name for _ in range(2)})
            return InitMode("seed", len(names), tuple(names))
        return InitMode("observer")

    def _operator(self) -> None:
        """One thing an operator does that the cluster must survive."""
        down = [n for n in self.nodes if n.alloc is None and n.respawn_at is None]
        k = self.rng.randrange(4)
        if k == 0 and not self.side:
            # a node added with other flags; only while its peers can answer it (islands
            # seeded apart while partitioned are detected, not prevented)
            self._add_node(init=self._other_init())
            self.stats["joins"] += 1
            self.stats["operator"] += 1
        down = [n for n in down if not self._island(n)]
        if k == 1 and down:
            n = self.rng.choice(down)
            n.init = self._other_init()  # restarted with edited flags
            self.stats["operator"] += 1
            self._restart(n)
        elif k == 2 and down and self.now - self.last_wipe >= WIPE_APART:
            # one data dir lost at a time: a node's marks live on its heir's disk until they
            # spread, so a node and its heir both losing theirs in that window is beyond
            # what one witness can cover (README, The engine: Lost state)
            self.last_wipe = self.now
            n = self.rng.choice([m for m in down if not m.removed] or down)
            n.disk = Snapshot()  # the data dir is lost; the name (--name) is kept
            n.wiped = True
            self.stats["operator"] += 1
            self.stats["wipes"] += 1
            self._restart(n)
        elif k == 3:
            live = self.live()
            if live:
                # reset, most often where no peer can take the ranges (lone or last node)
                lone = [n for n in live if n.alloc is not None and not n.alloc.reachable()]
                n = self.rng.choice(lone or live)
                self.stats["operator"] += 1
                self.stats["resets"] += 1
                self.request(n, Leave())

    def _island(self, n: SimNode) -> bool:
        """Would `n`, back fresh or with other flags, share a side of a partition only with
        peers that hold no ring?  Together they could seed an island: detected when it
        meets the ring, not prevented (README), so the operator faults do not make one.  A
        node alone on its side is fair game: it must wait for a peer (issue 9)."""
        if not self.side:
            return False
        mates = [m for m in self.live() if m is not n and self._connected(m.idx, n.idx)]
        return bool(mates) and all(m.alloc is None or m.alloc.ring.is_empty() for m in mates)

    def forged_hello(self, victim: SimNode) -> None:
        """A stranger's hello claiming the victim's own name (no --password).

        The mesh refuses a hello whose name is in use (mesh.handshake.judge): nothing
        reaches the allocator, so nothing happens here.  Planted bugs replace this with
        what the daemon once did (stop allocating)."""
        self.stats["forged_hellos"] += 1

    def _operator_responds(self) -> None:
        """Follow the advice a stopped node gives, as an operator would."""
        for n in self.live():
            a = n.alloc
            assert a is not None
            if a.fault == "removed" or a.left:
                # reset it: fresh state (a removed node's pods are gone with the rmpeer;
                # a node that handed its ranges away restarts to rejoin)
                self._crash(n)
                n.respawn_at = self.now + 1.0
                n.disk = Snapshot() if a.fault == "removed" else n.disk
                n.removed = n.removal_done = False
            elif a.fault == "lost-state":
                # its old pods are gone: remove the old name, then start it afresh
                self._crash(n)
                n.respawn_at = self.now + 8.0
                if self.side:
                    # not while partitioned (as for every rmpeer here): an heir that cannot
                    # hear a peer the dead one gave space to takes that piece too
                    n.removed, n.removal_ok, n.respawn_at = True, False, self.now
                else:
                    self._rmpeer(n)
        self._resolve_split()
        for n in self.nodes:
            # not while partitioned: fresh nodes that make a quorum without any holder of the
            # ring seed a second one, and no rule can see the ring they cannot reach (README)
            if n.alloc is None and n.respawn_at is not None and self.now >= n.respawn_at \
                    and not self.side:
                if n.removed and not n.removal_ok and self.now - n.down_since < 60:
                    # the rmpeer failed (its heir was down too, say): read why, try again
                    n.respawn_at = self.now + 8.0
                    # others also waiting for their removal are gone too: name them (two
                    # gone peers that are each other's heirs are removed only together)
                    self._rmpeer(n, tuple(m.name for m in self.nodes if m is not n
                                          and m.alloc is None and m.removed
                                          and not m.removal_ok))
                    continue
                if n.removed:
                    n.disk = Snapshot()
                    n.removed = n.removal_done = False
                n.respawn_at = None
                self._restart(n)

    def _resolve_split(self) -> None:
        """Islands seeded apart meet (`split`): as the status says, keep one group and
        reset every node of the other, whose pods then need new addresses."""
        if self.side:
            return
        rings = [n for n in self.live() if n.alloc is not None and not n.alloc.ring.is_empty()]
        if not any(n.alloc is not None and n.alloc.split for n in rings):
            return
        groups: dict[tuple[str, ...], int] = {}
        for n in rings:
            assert n.alloc is not None
            groups[n.alloc.ring.seeds] = groups.get(n.alloc.ring.seeds, 0) + 1
        keep = max(groups, key=lambda k: (groups[k], k))
        for n in rings:
            assert n.alloc is not None
            if n.alloc.split and n.alloc.ring.seeds != keep:
                self.stats["operator"] += 1
                self._crash(n)
                n.disk = Snapshot()
                n.respawn_at = self.now + 1.0
                for a in [a for a, (i, _) in self.ledger.items() if i == n.idx]:
                    del self.ledger[a]
                    self.orphans.discard(a)

    def _partition(self) -> None:
        live = self.live()
        if not live:
            return
        k = self.rng.randint(1, max(1, len(live) // 2))
        cut = {n.idx for n in self.rng.sample(live, k)}
        self.side = {i: (1 if i in cut else 0) for i in range(len(self.nodes))}
        self.heal_at = self.now + self.rng.uniform(1, 15)
        self.stats["partitions"] += 1
        self._reachability()

    def _heal(self) -> None:
        self.side = {}
        self._reachability()

    def _reachability(self) -> None:
        live = self.live()
        for a in live:
            assert a.alloc is not None
            for b in live:
                if a is b:
                    continue
                if self._connected(a.idx, b.idx):
                    if b.name not in a.alloc.reachable():
                        a.alloc.peer_up(b.name, f"node{b.idx}", self.now)
                elif b.name in a.alloc.reachable():
                    a.alloc.peer_down(b.name, self.now)
            self._drain(a)

    def _crash(self, n: SimNode) -> None:
        self.doomed.discard(n.idx)
        n.alloc = None
        n.inflight.clear()  # unanswered requests were never acknowledged
        n.down_since = self.now
        self.stats["crashes"] += 1
        self._reindex(n)
        for m in self.live():
            assert m.alloc is not None
            m.alloc.peer_down(n.name, self.now)

    def _restart(self, n: SimNode) -> None:
        if n.removed and (n.disk.ring is None or self.side
                          or self.rng.random() >= self.faults.stale_removed):
            n.disk = Snapshot()  # the operator reset it (or it had no ring): fresh, same name
            n.removed = n.removal_done = False
        # else: back with its old data; it must refuse to work (n.removed stays set). Not
        # while partitioned: an heir that cannot see it come back takes its ranges over as
        # it was told, and no rule can stop that (rmpeer means "it is gone")
        n.stale = []
        if n.removed and n.disk.ring is not None:
            r = Ring.from_wire(msgpack.unpackb(n.disk.ring, raw=False), self.universe)
            if isinstance(r, Ring):
                n.stale = [Range(o.start, o.end) for o in r.owned_by(n.name)]
            n.stale += [Range(a, a + 1) for addrs in n.disk.allocations.values() for a in addrs]
        self._boot(n)
        self.stats["restarts"] += 1
        if n.wiped:
            n.wiped = False  # its pods keep their addresses: the ledger still has them
            self.orphans.update(a for a, (i, _) in self.ledger.items() if i == n.idx)
        for key_addr in [a for a, (i, _) in self.ledger.items()
                         if i == n.idx and a not in self.orphans]:
            ident = self.ledger[key_addr][1]
            assert n.alloc is not None
            if key_addr not in n.alloc.allocs.get(ident, {}):
                raise Violation("lost", f"{n.name} lost acknowledged {ident} -> "
                                f"{self.universe.fmt_addr(key_addr)} over a restart")
        self._connect(n)

    def _connect(self, n: SimNode) -> None:
        for m in self.live():
            if m is not n and self._connected(m.idx, n.idx):
                assert m.alloc is not None and n.alloc is not None
                m.alloc.peer_up(n.name, f"node{n.idx}", self.now)
                n.alloc.peer_up(m.name, f"node{m.idx}", self.now)
                self._drain(m)
        self._drain(n)

    def _rmpeer(self, dead: SimNode, gone: tuple[str, ...] = ()) -> None:
        live = [n for n in self.live() if not n.removed]
        if not live:
            return
        callers = self.rng.sample(live, min(len(live), self.rng.choice([1, 1, 2])))
        dead.removed = True
        dead.removal_ok = False
        # its pods are gone before the operator runs rmpeer (an heir that needs to ask no
        # one takes over, and serves waiting requests, within the request itself)
        for a in [a for a, (i, _) in self.ledger.items() if i == dead.idx]:
            del self.ledger[a]
            self.orphans.discard(a)
        for c in callers:  # sometimes on two hosts at once (Weave #1949)
            self.request(c, RmPeer(dead.name, gone))

    # ---- invariants ----------------------------------------------------------------------

    def believes(self, n: SimNode) -> bool:
        a = n.alloc
        return a is not None and a.synced and not a.fault and not a.left and not a.split

    def _reindex(self, n: SimNode) -> None:
        key = (id(n.alloc), n.alloc.space.generation, self.believes(n)) if n.alloc else None
        if self.index_key.get(n.idx) == key:
            return  # ownership (and whether it counts) did not move since last time
        self.index_key[n.idx] = key
        new = n.alloc.owned_ranges() if self.believes(n) and n.alloc else []
        old = self.owned_of.get(n.idx, [])
        if new == old:
            return
        for r in old:
            if self.owned_index.get(r.start, (None, None))[1] == n.idx:
                del self.owned_index[r.start]
        self.owned_of[n.idx] = new
        for r in new:
            self._insert_owned(r, n.idx)

    def _insert_owned(self, r: Range, idx: int) -> None:
        oi = self.owned_index
        i = oi.bisect_right(r.start)
        if i > 0:
            ps = oi.keys()[i - 1]
            pe, pn = oi[ps]
            if pe > r.start and pn != idx:
                self._dup_owner(r, idx, pn)
        if i < len(oi):
            ns = oi.keys()[i]
            if ns < r.end and oi[ns][1] != idx:
                self._dup_owner(r, idx, oi[ns][1])
        if r.start in oi and oi[r.start][1] != idx:
            self._dup_owner(r, idx, oi[r.start][1])
        oi[r.start] = (r.end, idx)

    def _dup_owner(self, r: Range, a: int, b: int) -> None:
        raise Violation("double-owner",
                        f"peers {self.nodes[a].name} and {self.nodes[b].name} both own "
                        f"addresses in {self.universe.fmt_addr(r.start)}+{r.size}")

    def check_ledger(self) -> None:
        """Every acknowledged, unreleased allocation is still held by its node: a loss in
        memory only, or one that a restart never sees, shows here at the latest."""
        for a, (i, ident) in sorted(self.ledger.items()):
            n = self.nodes[i]
            if a in self.orphans:
                continue
            if n.alloc is None or a not in n.alloc.allocs.get(ident, {}):
                raise Violation("lost", f"{n.name} no longer holds acknowledged {ident} -> "
                                f"{self.universe.fmt_addr(a)}")

    def converged(self) -> bool:
        live = [n for n in self.live()]
        if not live:
            return True
        # identical rings; all empty counts (nobody asked yet: consensus starts on demand)
        digests = {n.alloc.ring.digest() for n in live if n.alloc is not None}
        return len(digests) == 1

    # ---- running -------------------------------------------------------------------------

    def step(self, *, faults: bool, traffic: bool) -> None:
        self.steps += 1
        self.faulting = faults
        end = self.now + self.tick_s
        self._deliver_until(end)
        self.now = end
        self._crash_doomed()
        self._faults(faults)
        self._operator_responds()
        for n in self.live():
            assert n.alloc is not None
            n.alloc.tick(self.now)
            self._drain(n)
        self._crash_doomed()
        if traffic:
            self._traffic()
            self._crash_doomed()
        self.faulting = False  # what runs between steps (the final heal) crashes nothing
