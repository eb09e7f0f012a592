"""A deterministic driver for several Reconcilers against a simulated API server.

One seeded RNG and a simulated clock: Nodes are created, deleted, re-created under the
same name (new peer name), their daemons go down and come back (the Node stays: must
never be reclaimed), daemons re-register with a wiped disk (new peer name on the same
Node), watches lag and expire (ERROR 410), the API server has outages, and every daemon
writes the one ConfigMap concurrently (409s).  Invariants are checked as it runs; `run`
returns the violations (empty when all held) and a summary.

To drive it from weaveipam/sim: give each simulated allocator a Reconciler, execute
`RmPeer` as that allocator's RmPeer request, and feed `ring_changed(ready, heir_for)`.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import reconcile as rc

WATCH_CACHE = 3  # events the fake server keeps for watches (small: expiries happen)
TICK = 0.1


@dataclass
class _Daemon:
    node: str
    peer: str
    rec: rc.Reconciler
    up: bool = True
    peers: frozenset[str] = frozenset()
    watch_gen: int = 0  # a new watch makes the old stream's deliveries void
    watch_rv: int | None = None  # where the open watch stands
    ring_lag: float = 0.0  # this daemon's ring view is this far behind (gossip delay)
    deliver_at: float = 0.0  # a stream is in order: no event overtakes another


@dataclass
class World:
    seed: int
    rng: random.Random
    now: float = 0.0
    rv: int = 100
    nodes: dict[str, rc.NodeInfo] = field(default_factory=dict)
    log: list[tuple[int, str, rc.NodeInfo]] = field(default_factory=list)
    dropped_upto: int = 0  # resourceVersion of the last event out of the watch cache
    cm: dict[str, str] | None = None
    cm_rv: int = 0
    outage_until: float = 0.0
    daemons: dict[str, _Daemon] = field(default_factory=dict)  # by node name
    # the ring (converged: heir disagreement is the allocator's concern, tested there)
    ring: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    joined_at: dict[str, float] = field(default_factory=dict)
    removed_at: dict[str, float] = field(default_factory=dict)
    recs: list[rc.Reconciler] = field(default_factory=list)  # every one, for the counts
    # truth for the checks
    must_reclaim: dict[str, str] = field(default_factory=dict)  # peer -> node
    reclaimed: dict[str, int] = field(default_factory=dict)
    registered: set[str] = field(default_factory=set)  # peers the map ever named
    rmpeer_calls: int = 0
    violations: list[str] = field(default_factory=list)
    writes: int = 0
    conflicts: int = 0
    expiries: int = 0
    _q: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _uids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _peers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # ---- scheduling -------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._q, (t, next(self._seq), fn))

    def later(self, fn: Callable[[], None], lo: float = 0.005, hi: float = 0.05) -> None:
        self.at(self.now + self.rng.uniform(lo, hi), fn)

    def api_down(self) -> bool:
        return self.now < self.outage_until

    def violate(self, text: str) -> None:
        self.violations.append(f"t={self.now:.2f}: {text}")

    # ---- the API server ---------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += self.rng.randint(1, 3)  # one counter shared by all kinds: gaps
        return self.rv

    def _node_event(self, kind: str, n: rc.NodeInfo) -> None:
        self.log.append((self._next_rv(), kind, n))
        if len(self.log) > WATCH_CACHE:
            self.dropped_upto = self.log[-WATCH_CACHE - 1][0]
            del self.log[:-WATCH_CACHE]
        for d in self.daemons.values():
            if d.up:
                self._push_watch(d)

    def new_peer(self) -> str:
        i = next(self._peers)
        return "02:00:00:00:" + f"{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"

    def create_node(self, name: str) -> None:
        n = rc.NodeInfo(name, f"uid-{next(self._uids)}",
                     (("InternalIP", f"198.18.{len(self.nodes) % 250}.{next(self._uids) % 250}"),))
        self.nodes[name] = n
        self._node_event("ADDED", n)
        self.start_daemon(name, self.new_peer())

    def delete_node(self, name: str) -> None:
        n = self.nodes.pop(name)
        d = self.daemons.pop(name, None)
        if d is not None:
            d.up = False
            self.must_reclaim[d.peer] = name
        self._node_event("DELETED", n)

    def start_daemon(self, node: str, peer: str) -> None:
        old = self.daemons.get(node)
        if old is not None and old.peer != peer:
            old.up = False
            self.must_reclaim[old.peer] = node  # re-registered with a wiped disk
        rec = rc.Reconciler(node_name=node, peer_name=peer, rng=random.Random(self.rng.random()),
                         now=self.now)
        d = _Daemon(node, peer, rec, ring_lag=self.rng.choice([0.0, 0.0, 0.5, 2.0]))
        self.daemons[node] = d
        self.recs.append(rec)
        rec.ring_changed(True, partial(self.heir_seen_by, d), self.now)
        rec.start(self.now)
        self.pump(d)

    def heir_of(self, dead: str, at: float | None = None) -> str:
        """Allocator.heir_for's rule over the ring as it was at time `at` (now: the
        converged ring, where an rmpeer is carried out)."""
        t = self.now if at is None else at
        cands = sorted(p for p in self.ring - {dead} if self.joined_at.get(p, 0.0) <= t
                       and self.removed_at.get(p, float("inf")) > t)
        if not cands:
            return dead
        after = [c for c in cands if c > dead]
        return after[0] if after else cands[0]

    def heir_seen_by(self, d: _Daemon, dead: str) -> str:
        """The heir by d's ring view, which lags: two daemons may both think they are it."""
        return self.heir_of(dead, self.now - d.ring_lag)

    # ---- executing a reconciler's outputs ---------------------------------------------

    def pump(self, d: _Daemon) -> None:
        for o in d.rec.take_outputs():
            if isinstance(o, rc.ListNodes):
                self.later(partial(self._do_list, d))
            elif isinstance(o, rc.WatchNodes):
                d.watch_gen += 1
                gen, rv = d.watch_gen, int(o.resource_version)
                self.later(partial(self._do_watch, d, gen, rv))
            elif isinstance(o, rc.ReadMap):
                self.later(partial(self._do_read, d))
            elif isinstance(o, rc.WriteMap):
                self.later(partial(self._do_write, d, o))
            elif isinstance(o, rc.RmPeer):
                self.later(partial(self._do_rmpeer, d, o), 0.05, 2.0)
            elif isinstance(o, rc.SetPeers):
                d.peers = o.addresses

    def _alive(self, d: _Daemon) -> bool:
        return d.up and self.daemons.get(d.node) is d

    def _fail(self, d: _Daemon, verb: str, res: str) -> rc.ApiProblem:
        return rc.ApiProblem(verb, res, None, "", "connection refused")

    def _do_list(self, d: _Daemon) -> None:
        if not self._alive(d):
            return
        if self.api_down():
            d.rec.nodes_failed(self._fail(d, "list", "nodes"), self.now)
        else:
            d.rec.nodes_listed(list(self.nodes.values()), str(self.rv), self.now)
        self.pump(d)

    def _do_watch(self, d: _Daemon, gen: int, rv: int) -> None:
        if not self._alive(d) or gen != d.watch_gen:
            return
        if self.api_down():
            d.rec.nodes_failed(self._fail(d, "watch", "nodes"), self.now)
            self.pump(d)
            return
        d.watch_rv = rv
        self._push_watch(d)

    def _push_watch(self, d: _Daemon) -> None:
        """Deliver the events after the watch's rv, each after a lag (sometimes long: a
        stale watch), or ERROR 410 when they fell out of the cache."""
        rv = d.watch_rv
        if rv is None:
            return
        gen = d.watch_gen
        if rv < self.dropped_upto:
            oldest = self.log[0][0]
            d.watch_rv = None
            self.expiries += 1
            err = {"kind": "Status", "code": 410, "reason": "Expired",
                   "message": f"too old resource version: {rv} ({oldest})"}
            self.later(lambda: self._deliver(d, gen, "ERROR", err, closes=True))
            return
        lag = self.rng.choice([0.05, 0.05, 0.2, 3.0])  # a stale watch now and then
        d.deliver_at = max(d.deliver_at, self.now + lag)
        for erv, kind, n in self.log:
            if erv > rv:
                obj = _node_json(n, erv)
                self.at(d.deliver_at, partial(self._deliver, d, gen, kind, obj))
                d.watch_rv = erv
        if self.rng.random() < 0.05:  # the server ends the stream (timeoutSeconds)
            d.watch_rv = None
            self.at(d.deliver_at, lambda: self._closed(d, gen))

    def _deliver(self, d: _Daemon, gen: int, kind: str, obj: dict[str, Any],
                 closes: bool = False) -> None:
        if not self._alive(d) or gen != d.watch_gen:
            return
        d.rec.node_event(kind, obj, self.now)
        if closes:
            d.rec.watch_closed(self.now)
        self.pump(d)

    def _closed(self, d: _Daemon, gen: int) -> None:
        if self._alive(d) and gen == d.watch_gen:
            d.rec.watch_closed(self.now)
            self.pump(d)

    def _do_read(self, d: _Daemon) -> None:
        if not self._alive(d):
            return
        if self.api_down():
            d.rec.map_failed(self._fail(d, "get", "configmaps"), self.now)
        elif self.cm is None:
            d.rec.map_read(None, None, self.now)
        else:
            d.rec.map_read(dict(self.cm), str(self.cm_rv), self.now)
        self.pump(d)

    def _do_write(self, d: _Daemon, o: rc.WriteMap) -> None:
        if not self._alive(d):
            return  # a crashed writer: the intent dies with it (others re-derive theirs)
        if self.api_down():
            d.rec.map_failed(self._fail(d, "update", "configmaps"), self.now)
        elif (o.resource_version is None) != (self.cm is None) or (
                o.resource_version is not None and o.resource_version != str(self.cm_rv)):
            self.conflicts += 1
            d.rec.map_conflict(self.now)
        else:
            self._check_write(self.cm or {}, o.data)
            self.cm, self.cm_rv = dict(o.data), self._next_rv()
            self.registered.update(p for _, p in _pairs(self.cm))
            # a daemon gets ranges once it is in the map: one that dies before its first
            # write leaves no trace of its Node, and its ranges need a hand rmpeer
            for x in self.daemons.values():
                if x.peer in self.registered and x.peer not in self.ring:
                    self.ring.add(x.peer)
                    self.joined_at[x.peer] = self.now
            self.writes += 1
            d.rec.map_written(dict(self.cm), str(self.cm_rv), self.now)
        self.pump(d)

    def _check_write(self, before: dict[str, str], after: dict[str, str]) -> None:
        """No entry lost: a (node, peer) pair may leave the map only once reclaimed."""
        for node, peer in _pairs(before) - _pairs(after):
            if peer not in self.reclaimed:
                self.violate(f"map entry {node} -> {peer} removed before its rmpeer")

    def _do_rmpeer(self, d: _Daemon, o: rc.RmPeer) -> None:
        if not self._alive(d):
            return
        self.rmpeer_calls += 1
        live = {x.peer for x in self.daemons.values() if x.up}
        if any(n.name == o.node for n in self.nodes.values()) and \
                self.daemons.get(o.node) is not None and self.daemons[o.node].peer == o.peer:
            self.violate(f"rmpeer {o.peer} of Node {o.node} which still runs it")
        if o.peer in live:  # the allocator refuses rmpeer of a reachable peer
            d.rec.rmpeer_done(o.peer, o.node, "refused", "peer is reachable", self.now)
        elif o.peer in self.removed or o.peer not in self.ring:
            d.rec.rmpeer_done(o.peer, o.node, "gone", "already removed", self.now)
        else:
            if o.peer not in self.must_reclaim:
                self.violate(f"rmpeer {o.peer}: its Node was not deleted nor re-registered")
            # an rmpeer is carried out by the heir of the converged ring (the engine
            # forwards it there), so a second one finds the peer already removed
            self.removed.add(o.peer)
            self.removed_at[o.peer] = self.now
            self.reclaimed[o.peer] = self.reclaimed.get(o.peer, 0) + 1
            d.rec.rmpeer_done(o.peer, o.node, "done", "took over its ranges", self.now)
        self.pump(d)

    def _tick(self) -> None:
        for d in list(self.daemons.values()):
            if d.up:
                d.rec.tick(self.now)
                self.pump(d)
        self.at(self.now + TICK, self._tick)

    # ---- faults and the run -----------------------------------------------------------

    def _fault(self, names: list[str]) -> None:
        r = self.rng.random()
        live = sorted(self.nodes)
        if r < 0.25 or len(live) < 3:
            name = self.rng.choice(names)
            if name not in self.nodes:
                self.create_node(name)
        elif r < 0.45:
            self.delete_node(self.rng.choice(live))
        elif r < 0.55:  # deleted and re-created at once under the same name
            name = self.rng.choice(live)
            self.delete_node(name)
            self.at(self.now + self.rng.uniform(0.0, 0.5), lambda: self._recreate(name))
        elif r < 0.65:  # the daemon is down (NotReady): its Node stays
            d = self.daemons.get(self.rng.choice(live))
            if d is not None and d.up:
                d.up = False
                self.at(self.now + self.rng.uniform(1, 15), lambda: self._restart(d))
        elif r < 0.75:  # the daemon comes back with a wiped disk: a new peer name
            name = self.rng.choice(live)
            self.start_daemon(name, self.new_peer())
        elif r < 0.85:
            self.outage_until = self.now + self.rng.uniform(1, 20)
        # else: a quiet spell

    def _recreate(self, name: str) -> None:
        if name not in self.nodes:
            self.create_node(name)

    def _restart(self, d: _Daemon) -> None:
        if self.daemons.get(d.node) is d and not d.up:
            self.start_daemon(d.node, d.peer)

    def run(self, steps: int, settle: float = 120.0) -> dict[str, Any]:
        names = [f"node-{c}" for c in "abcdefghij"]
        for n in names[:4]:
            self.create_node(n)
        self.at(0.0, self._tick)
        t = 0.0
        for _ in range(steps):
            t += self.rng.expovariate(1 / 3.0)
            self.at(t, lambda: self._fault(names))
        end = t + settle
        while self._q and self._q[0][0] <= end:
            self.now, _, fn = heapq.heappop(self._q)
            fn()
        self.final_checks()
        return self.summary()

    def final_checks(self) -> None:
        for peer, node in self.must_reclaim.items():
            n = self.reclaimed.get(peer, 0)
            if peer not in self.ring and not n:
                continue  # gone before it wrote its map entry: nobody can know its Node
            if n != 1:
                self.violate(f"peer {peer} of Node {node} reclaimed {n} times (want 1)")
        for peer in self.reclaimed:
            if peer not in self.must_reclaim:
                self.violate(f"peer {peer} reclaimed but nothing asked for it")
        counted = sum(r.reclaimed_total for r in self.recs)
        if counted != sum(self.reclaimed.values()):
            self.violate(f"the daemons count {counted} reclaims, "
                         f"{sum(self.reclaimed.values())} happened")
        ents = {k: rc.MapEntry.decode(v) for k, v in (self.cm or {}).items()}
        for name in self.nodes:
            d = self.daemons.get(name)
            e = ents.get(name)
            if d is not None and d.up and (e is None or e.peer != d.peer):
                self.violate(f"map lacks {name} -> {d.peer}: {e}")
        for k, e in ents.items():
            for p in (e.peer, *e.old) if e else ():
                if p in self.reclaimed:
                    self.violate(f"map still names reclaimed peer {p} ({k})")
        want_all = {n.address(("InternalIP",)) or "" for n in self.nodes.values()}
        for d in self.daemons.values():
            if d.up:
                want = want_all - {self.nodes[d.node].address(("InternalIP",)) or ""}
                if d.peers != want:
                    self.violate(f"{d.node} dials {sorted(d.peers)}, want {sorted(want)}")

    def summary(self) -> dict[str, Any]:
        return {"seed": self.seed, "nodes": len(self.nodes), "reclaims": sum(
            self.reclaimed.values()), "rmpeer_calls": self.rmpeer_calls,
            "rmpeers_without_takeover": self.rmpeer_calls - sum(self.reclaimed.values()),
            "map_writes": self.writes, "conflicts": self.conflicts, "expiries": self.expiries,
            "violations": len(self.violations)}


def _pairs(m: dict[str, str]) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for k, v in m.items():
        e = rc.MapEntry.decode(v)
        if e is not None:
            out.update((k, p) for p in (e.peer, *e.old))
    return out


def _node_json(n: rc.NodeInfo, rv: int) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": n.name, "uid": n.uid,
                                         "resourceVersion": str(rv)},
            "status": {"addresses": [{"type": t, "address": a} for t, a in n.addresses]}}


def run(seed: int, steps: int = 40) -> World:
    w = World(seed, random.Random(seed))
    w.run(steps)
    return w
