"""Kubernetes decisions, sans-IO: peers from Nodes, the node -> peer map, and reclaim.

Every input carries the current time; outputs come from `take_outputs()` and are requests
for the shell (list or watch Nodes, read or write the ConfigMap, rmpeer, dial these
peers).  No sockets, no clock reads, randomness (retry jitter) passed in: the daemon and
the deterministic harness in the tests drive the same code.

Safety rules (issue 10):
- A peer is reclaimed (rmpeer) only when its Node was deleted in the API: a DELETED event,
  or absence from a fresh LIST sent after we saw the map entry.  NotReady, unreachable, a
  broken watch or a lagging cache never cause a reclaim (an entry the view cannot vouch
  for waits).  A node that came back under the same name with a new peer name gets its
  old peer name reclaimed.
- One reclaimer: the ring's heir of the dead peer (`Allocator.heir_for`), which is the peer
  that takes the ranges over anyway; rmpeer is safe from several hosts, but we do it once.
- A map entry is removed only after its rmpeer succeeded, every write carries the
  resourceVersion read (409: re-read, re-apply the intent, retry with jitter), and entries
  we do not understand are written back unchanged: no entry is ever lost.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_ADDRESS_TYPES

MAP_NAME = "weave-ipam-peers"
MAP_REFRESH = 5.0  # re-read the map this often (other daemons' entries, removals)
RELIST_TO_VOUCH = 10.0  # at most this often, a LIST to vouch for entries of unseen Nodes
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
RMPEER_RETRY_MIN, RMPEER_RETRY_MAX = 1.0, 30.0


# ---- values ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeInfo:
    name: str
    uid: str
    addresses: tuple[tuple[str, str], ...] = ()  # (type, address) in the API's order
    pod_cidrs: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()  # sorted (key, value)

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> NodeInfo | None:
        """A Node as the API sends it (plain JSON); None if it has no name."""
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            return None
        status = obj.get("status") or {}
        spec = obj.get("spec") or {}
        addrs = tuple((str(a.get("type", "")), str(a.get("address", "")))
                      for a in status.get("addresses") or [] if isinstance(a, dict))
        cidrs = tuple(str(c) for c in spec.get("podCIDRs") or [] if isinstance(c, str))
        ann = meta.get("annotations") or {}
        notes = tuple(sorted((str(k), str(v)) for k, v in ann.items())) \
            if isinstance(ann, dict) else ()
        return NodeInfo(name, str(meta.get("uid") or ""), addrs, cidrs, notes)

    def address(self, types: Iterable[str]) -> str | None:
        """The first address of the first type that the node has."""
        for t in types:
            for typ, a in self.addresses:
                if typ == t and a:
                    return a
        return None


@dataclass(frozen=True)
class MapEntry:
    """One ConfigMap value: the node's current peer and earlier ones awaiting reclaim."""
    peer: str
    uid: str = ""
    old: tuple[str, ...] = ()

    def encode(self) -> str:
        d: dict[str, Any] = {"peer": self.peer, "uid": self.uid}
        if self.old:
            d["old"] = list(self.old)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def decode(text: str) -> MapEntry | None:
        try:
            d = json.loads(text)
        except ValueError:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("peer"), str):
            return None
        old = d.get("old") or []
        if not isinstance(old, list) or not all(isinstance(o, str) for o in old):
            return None
        uid = d.get("uid")
        return MapEntry(d["peer"], uid if isinstance(uid, str) else "", tuple(old))


@dataclass(frozen=True)
class ApiProblem:
    """A failed API call, in terms a person can act on."""
    verb: str
    resource: str
    status: int | None = None  # None: no answer (connection refused, timeout)
    reason: str = ""
    message: str = ""

    def text(self) -> str:
        what = f"{self.verb} {self.resource}"
        if self.status is None:
            return (f"cannot reach the Kubernetes API server ({what}: {self.message}); "
                    "allocation goes on from what is known, retrying with back-off")
        if self.status == 401:
            return (f"the API server rejected our token (401 on {what}); check the "
                    "ServiceAccount token (it is re-read when it rotates) or --kubeconfig")
        if self.status == 403:
            text = (f"forbidden: our ServiceAccount may not {what} (403); grant "
                    f"'{self.verb}' on '{self.resource}' in its Role/ClusterRole (see "
                    "docker/weave-ipam-daemonset.yaml)")
            if (self.verb, self.resource) == ("create", "configmaps"):
                text += (f", or apply the empty ConfigMap {MAP_NAME} from that manifest (a "
                         "resourceNames rule never allows create)")
            return text
        return f"{what} failed: HTTP {self.status} {self.reason}: {self.message}".strip()


# ---- outputs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ListNodes:
    """LIST Nodes with no resourceVersion (a quorum read: fresh)."""


@dataclass(frozen=True)
class WatchNodes:
    resource_version: str


@dataclass(frozen=True)
class ReadMap:
    pass


@dataclass(frozen=True)
class WriteMap:
    data: dict[str, str]
    resource_version: str | None  # None: create (the map did not exist)


@dataclass(frozen=True)
class RmPeer:
    peer: str
    node: str


@dataclass(frozen=True)
class SetPeers:
    addresses: frozenset[str]


@dataclass(frozen=True)
class Note:
    level: str  # info, warning, error
    text: str


Output = ListNodes | WatchNodes | ReadMap | WriteMap | RmPeer | SetPeers | Note


@dataclass
class Reclaim:
    peer: str
    node: str
    why: str
    result: str = ""


@dataclass
class _Backoff:
    rng: random.Random
    lo: float = BACKOFF_MIN
    hi: float = BACKOFF_MAX
    n: int = 0

    def next(self) -> float:
        d = min(self.hi, self.lo * (2 ** self.n))
        self.n = min(self.n + 1, 16)
        return float(d * self.rng.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.n = 0


@dataclass
class _Ring:
    ready: bool = False
    heir_of: Callable[[str], str] | None = None


# ---- the reconciler ---------------------------------------------------------------------

class Reconciler:
    """One daemon's view of Nodes and the peer map, and what to do about it."""

    def __init__(self, *, node_name: str, peer_name: str, rng: random.Random, now: float,
                 address_types: Iterable[str] = DEFAULT_ADDRESS_TYPES,
                 map_refresh: float = MAP_REFRESH) -> None:
        self.node_name = node_name
        self.peer_name = peer_name
        self.address_types = tuple(address_types)
        self.rng = rng
        self.now = now
        self.map_refresh = map_refresh
        self._out: list[Output] = []
        self._seq = 0  # orders what we saw against the LISTs we sent
        # Nodes
        self.nodes: dict[str, NodeInfo] = {}
        self.nodes_known = False  # a LIST succeeded at least once
        self.rv = ""
        self._nodes_op: str | None = None  # "list" | "watch" | None (waiting to retry)
        self._list_sent_seq = 0
        self._view_seq = 0  # seq at which the LIST our view comes from was sent
        self._last_list = now
        self.deleted_uids: set[str] = set()
        self._nodes_retry: tuple[float, ListNodes] | None = None
        self._nodes_backoff = _Backoff(rng)
        self.peers: frozenset[str] = frozenset()
        # the map
        self.map_raw: dict[str, str] = {}
        self.map_rv: str | None = None
        self.map_state = "unknown"  # unknown | missing | known
        self._entries: dict[str, MapEntry] = {}
        self._entries_of: dict[str, str] | None = None  # the map_raw they were decoded from
        self._map_busy = False
        self._map_due: float | None = now
        self._map_backoff = _Backoff(rng, lo=0.05, hi=5.0)
        self._entry_seen: dict[tuple[str, str], int] = {}
        self._unmap: dict[str, str] = {}  # peer -> node: reclaimed, entry still to remove
        # reclaim
        self.ring = _Ring()
        self._rm_inflight: set[str] = set()
        self._rm_retry: dict[str, tuple[float, _Backoff]] = {}
        self.reclaims: list[Reclaim] = []  # done, most recent last
        self.reclaimed_total = 0
        self.problems: dict[str, str] = {}  # area -> what is wrong and what to do
        self.waiting: dict[str, str] = {}  # peer -> why its reclaim waits
        self.unvouched = 0  # map entries of Nodes not in our view, not yet known deleted

    # ---- plumbing ----------------------------------------------------------------------

    def take_outputs(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def _emit(self, o: Output) -> None:
        self._seq += 1
        self._out.append(o)

    def _note(self, level: str, text: str) -> None:
        self._out.append(Note(level, text))

    def _problem(self, area: str, text: str | None) -> None:
        old = self.problems.get(area)
        if text is None:
            if old is not None:
                del self.problems[area]
                self._note("info", f"Kubernetes {area}: working again")
        elif text != old:
            self.problems[area] = text
            self._note("warning", f"Kubernetes {area}: {text}")

    def start(self, now: float) -> None:
        self.now = now
        self._list(now)
        self._read_map()

    # ---- Nodes -------------------------------------------------------------------------

    def _list(self, now: float) -> None:
        self._nodes_op = "list"
        self._nodes_retry = None
        self._last_list = now
        self._emit(ListNodes())
        self._list_sent_seq = self._seq

    def nodes_listed(self, items: Iterable[NodeInfo], resource_version: str, now: float) -> None:
        """A successful LIST: the whole truth as of its resourceVersion."""
        self.now = now
        fresh = {n.name: n for n in items}
        for name, n in self.nodes.items():
            if fresh.get(name, None) is None or fresh[name].uid != n.uid:
                self.deleted_uids.add(n.uid)
        self.nodes = fresh
        self.nodes_known = True
        self.rv = resource_version
        self._view_seq = self._list_sent_seq
        self._nodes_backoff.reset()
        self._problem("nodes", None)
        self._nodes_op = "watch"
        self._emit(WatchNodes(self.rv))
        self._changed()

    def node_event(self, kind: str, obj: Mapping[str, Any], now: float) -> None:
        """One watch event: ADDED, MODIFIED, DELETED, BOOKMARK or ERROR (raw JSON object)."""
        self.now = now
        if self._nodes_op != "watch":
            return  # a late event of a watch we gave up
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:  # our resourceVersion is too old: only a new LIST helps
                self._note("info", f"Node watch expired ({obj.get('message', '')}); re-listing")
                self._list(now)
            else:
                self._nodes_failed(ApiProblem("watch", "nodes", code if isinstance(code, int)
                                              else None, str(obj.get("reason", "")),
                                              str(obj.get("message", ""))), now)
            return
        if isinstance(rv, str) and rv:
            self.rv = rv  # opaque: only ever handed back to the server
        if kind == "BOOKMARK":
            return
        n = NodeInfo.from_json(obj)
        if n is None:
            return
        if kind == "DELETED":
            cur = self.nodes.get(n.name)
            if cur is not None and (not n.uid or cur.uid == n.uid):
                del self.nodes[n.name]
            self.deleted_uids.add(n.uid)
            self._map_due = now  # read the latest entries: a reclaim may be ours
        elif kind in ("ADDED", "MODIFIED"):
            self.nodes[n.name] = n
        else:
            return
        self._changed()

    def watch_closed(self, now: float) -> None:
        """The server ended the stream (timeoutSeconds, or after an ERROR we handled)."""
        self.now = now
        if self._nodes_op == "watch":
            self._emit(WatchNodes(self.rv))

    def nodes_failed(self, problem: ApiProblem, now: float) -> None:
        self.now = now
        if problem.status == 410:  # a real HTTP 410 on a list continue or a watch
            self._list(now)
            return
        self._nodes_failed(problem, now)

    def _nodes_failed(self, problem: ApiProblem, now: float) -> None:
        # retry with a LIST, not a watch: its answer tells that the server is back (a
        # watch that opens but stays idle says nothing) and brings us up to date
        self._problem("nodes", problem.text())
        self._nodes_op = None
        self._nodes_retry = (now + self._nodes_backoff.next(), ListNodes())

    def _update_peers(self) -> None:
        addrs = set()
        for n in self.nodes.values():
            if n.name == self.node_name:
                continue
            a = n.address(self.address_types)
            if a:
                addrs.add(a)
        peers = frozenset(addrs)
        if peers != self.peers:
            self.peers = peers
            self._emit(SetPeers(peers))

    def _changed(self) -> None:
        self._update_peers()
        self._want_write()
        self._reclaim()

    # ---- the map ----------------------------------------------------------------------

    @property
    def entries(self) -> dict[str, MapEntry]:
        """The readable entries, decoded once per map version (read every tick)."""
        if self._entries_of is not self.map_raw:
            out = {}
            for k, v in self.map_raw.items():
                e = MapEntry.decode(v)
                if e is not None:
                    out[k] = e
            self._entries, self._entries_of = out, self.map_raw
        return self._entries

    def _read_map(self) -> None:
        self._map_busy = True
        self._map_due = None
        self._emit(ReadMap())

    def map_read(self, data: Mapping[str, str] | None, resource_version: str | None,
                 now: float) -> None:
        """The ConfigMap's data and resourceVersion; data None: it does not exist (404)."""
        self._map_loaded(data, resource_version, now)

    def map_written(self, data: Mapping[str, str], resource_version: str, now: float) -> None:
        self._map_loaded(data, resource_version, now)

    def _map_loaded(self, data: Mapping[str, str] | None, resource_version: str | None,
                    now: float) -> None:
        """What the server holds now (read or just written): apply what is still to do."""
        self.now = now
        self._map_busy = False
        if data is None:
            self.map_raw, self.map_rv, self.map_state = {}, None, "missing"
        else:
            self.map_raw, self.map_rv, self.map_state = dict(data), resource_version, "known"
        self._seen_entries()
        self._map_backoff.reset()
        self._problem("peer map", None)
        if not self._want_write():
            self._map_due = now + self.map_refresh
        self._reclaim()

    def map_conflict(self, now: float) -> None:
        """409 (Conflict on a stale resourceVersion, AlreadyExists on create): re-read and
        re-apply after a jittered pause, so the writers that collided spread out."""
        self.now = now
        self._map_busy = False
        self._map_due = now + self._map_backoff.next()

    def map_failed(self, problem: ApiProblem, now: float) -> None:
        self.now = now
        self._map_busy = False
        self._problem("peer map", problem.text())
        self._map_due = now + max(self._map_backoff.next(), BACKOFF_MIN)

    def _seen_entries(self) -> None:
        for node, e in self.entries.items():
            for p in (e.peer, *e.old):
                self._entry_seen.setdefault((node, p), self._seq)

    def _desired(self) -> dict[str, str] | None:
        """The map with our intents applied to what we read; None if nothing to change."""
        if self.map_state == "unknown":
            return None
        raw = dict(self.map_raw)
        ents = self.entries
        me = self.nodes.get(self.node_name)
        uid = me.uid if me is not None else ""
        cur = ents.get(self.node_name)
        if cur is None:
            if self.node_name in raw:  # a value we cannot read: keep it as a reclaim hint
                raw[self.node_name + ".unreadable"] = raw[self.node_name]
            raw[self.node_name] = MapEntry(self.peer_name, uid).encode()
        elif cur.peer != self.peer_name:
            # this node came back with a new peer name: the old one is to be reclaimed
            old = tuple(dict.fromkeys((*cur.old, cur.peer)))
            raw[self.node_name] = MapEntry(self.peer_name, uid,
                                           tuple(o for o in old if o != self.peer_name)
                                           ).encode()
        elif uid and cur.uid != uid:
            raw[self.node_name] = MapEntry(cur.peer, uid, cur.old).encode()
        for peer, node in list(self._unmap.items()):
            e = MapEntry.decode(raw.get(node, ""))
            if e is None:
                del self._unmap[peer]
            elif e.peer == peer:
                if node == self.node_name:
                    del self._unmap[peer]  # never drop our own entry
                elif e.old:  # keep the older names' entry, minus this one
                    raw[node] = MapEntry(e.old[0], e.uid, e.old[1:]).encode()
                    # the node is gone: its older names are reclaimable by the same rule
                else:
                    del raw[node]
            elif peer in e.old:
                raw[node] = MapEntry(e.peer, e.uid, tuple(o for o in e.old if o != peer)
                                     ).encode()
            else:
                del self._unmap[peer]  # someone else removed it already
        if raw == self.map_raw and self.map_state == "known":
            return None
        return raw

    def _want_write(self) -> bool:
        if self._map_busy or self.map_state == "unknown":
            return False
        if self.map_state == "known" and self.map_rv is None:
            return False
        data = self._desired()
        if data is None:
            return False
        self._map_busy = True
        self._map_due = None
        self._emit(WriteMap(data, self.map_rv if self.map_state == "known" else None))
        return True

    # ---- reclaim ----------------------------------------------------------------------

    def ring_changed(self, ready: bool, heir_of: Callable[[str], str] | None,
                     now: float) -> None:
        """The ring is established here (`ready`); `heir_of` is `Allocator.heir_for`."""
        self.now = now
        self.ring = _Ring(ready, heir_of)
        self._reclaim()

    def _vouched(self, node: str, peer: str, uid: str) -> bool:
        """Is `node` (and so `peer`'s entry) known deleted from the API?"""
        if uid and uid in self.deleted_uids:
            return node not in self.nodes
        seen = self._entry_seen.get((node, peer))
        # our view comes from a LIST sent after we saw the entry, kept current by the
        # watch since: the node existed when the entry was written, so it was deleted
        return seen is not None and self.nodes_known and seen < self._view_seq \
            and node not in self.nodes

    def candidates(self) -> list[Reclaim]:
        """Peers that must be reclaimed, by anyone."""
        out = []
        live = {e.peer for n, e in self.entries.items() if n in self.nodes}
        live.add(self.peer_name)
        self.unvouched = 0
        for node, e in sorted(self.entries.items()):
            if node not in self.nodes:
                if not self._vouched(node, e.peer, e.uid):
                    self.unvouched += 1
                else:
                    for p in (e.peer, *e.old):
                        if p not in live:
                            out.append(Reclaim(p, node, f"Node {node} was deleted"))
                continue
            for p in e.old:
                if p not in live:
                    out.append(Reclaim(p, node, f"Node {node} came back as peer {e.peer}"))
        return out

    def _reclaim(self) -> None:
        if self.map_state != "known" or not self.nodes_known:
            return
        self.waiting.clear()
        for c in self.candidates():
            if c.peer in self._rm_inflight or c.peer in self._unmap:
                continue
            if not self.ring.ready or self.ring.heir_of is None:
                self.waiting[c.peer] = "waiting for this peer's ring"
                continue
            heir = self.ring.heir_of(c.peer)
            if heir != self.peer_name:
                self.waiting[c.peer] = f"reclaimed by its heir {heir}"
                continue
            retry = self._rm_retry.get(c.peer)
            if retry is not None and retry[0] > self.now:
                self.waiting[c.peer] = "rmpeer failed; retrying"
                continue
            self._rm_inflight.add(c.peer)
            self._note("info", f"reclaiming peer {c.peer}: {c.why}")
            self._emit(RmPeer(c.peer, c.node))

    def rmpeer_done(self, peer: str, node: str, outcome: str, message: str,
                    now: float) -> None:
        """outcome: done (ranges taken over), gone (nothing of it in the ring), refused
        (e.g. the peer is reachable) or error."""
        self.now = now
        self._rm_inflight.discard(peer)
        if outcome in ("done", "gone"):
            self._rm_retry.pop(peer, None)
            if outcome == "done":  # "gone": another peer's rmpeer (or a person's) did it
                self.reclaimed_total += 1
                self.reclaims.append(Reclaim(peer, node, "", message))
                del self.reclaims[:-20]
                self._note("warning", f"reclaimed peer {peer} (Node {node}): {message}")
            else:
                self._note("info", f"peer {peer} (Node {node}) was already reclaimed "
                           f"({message}); removing it from the map")
            self._unmap[peer] = node
            self._want_write()
        else:
            _, b = self._rm_retry.get(peer, (0.0, _Backoff(self.rng, RMPEER_RETRY_MIN,
                                                           RMPEER_RETRY_MAX)))
            self._rm_retry[peer] = (now + b.next(), b)
            self._note("warning", f"rmpeer {peer} (Node {node}) {outcome}: {message}; "
                       "will retry")
        self._reclaim()

    # ---- time -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.now = now
        if self._nodes_retry is not None and now >= self._nodes_retry[0]:
            self._list(now)
        if not self._map_busy and self._map_due is not None and now >= self._map_due:
            self._read_map()
        if any(t <= now for t, _ in self._rm_retry.values()):
            self._reclaim()
        if self.unvouched and self._nodes_op == "watch" \
                and now >= self._last_list + RELIST_TO_VOUCH:
            # entries of Nodes we never saw (deleted before we started?): a fresh LIST
            # sent after we read them tells whether those Nodes exist
            self._list(now)

    def status(self) -> dict[str, Any]:
        return {
            "nodes": len(self.nodes) if self.nodes_known else None,
            "peers": sorted(self.peers),
            "map_entries": len(self.map_raw) if self.map_state != "unknown" else None,
            "reclaimed_total": self.reclaimed_total,
            "reclaims": [{"peer": r.peer, "node": r.node, "result": r.result}
                         for r in self.reclaims],
            "waiting": dict(self.waiting),
            "problems": dict(self.problems),
        }
