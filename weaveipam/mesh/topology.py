"""Who is connected to whom: gossiped peer entries, reachability and next hops.

Pure data structure (no sockets, no clock), so routing can be tested in isolation.
Each peer is the only author of its own entry and bumps its version on every change;
receivers keep the highest version they have seen and pass new ones on, so the picture
converges by flooding.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Iterable

from .frames import MAX_VERSION, Neighbour, PeerEntry

log = logging.getLogger("weaveipam.mesh")


class Topology:
    def __init__(self, name: str, nickname: str, uid: int, version: int) -> None:
        self.name = name
        self.uid = uid
        self._entries: dict[str, PeerEntry] = {name: PeerEntry(name, nickname, uid, version, ())}
        self._links: dict[str, frozenset[str]] = {name: frozenset()}

    @property
    def own(self) -> PeerEntry:
        return self._entries[self.name]

    def get(self, name: str) -> PeerEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[PeerEntry]:
        return list(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def _put(self, entry: PeerEntry) -> None:
        self._entries[entry.name] = entry
        self._links[entry.name] = frozenset(n.name for n in entry.neighbours)

    def set_own_neighbours(self, neighbours: Iterable[Neighbour]) -> bool:
        """Replace our own neighbour list; True (and a new version) if it changed."""
        nbrs = tuple(sorted(neighbours, key=lambda n: n.name))
        own = self.own
        if nbrs == own.neighbours:
            return False
        self._put(PeerEntry(own.name, own.nickname, own.uid, own.version + 1, nbrs))
        return True

    def merge(self, entries: Iterable[PeerEntry]) -> list[PeerEntry]:
        """Take in gossiped entries; return those that were news (to pass on).

        An entry about ourselves with a version at least ours (left over from an earlier
        run of this peer) makes us bump our own version past it, so our current view
        wins everywhere; an entry claiming our name with another uid is ignored.
        """
        changed: dict[str, PeerEntry] = {}
        for entry in entries:
            if entry.name == self.name:
                own = self.own
                if entry.uid != self.uid:
                    log.debug("ignoring gossip about another peer named %r (uid %d)",
                              entry.name, entry.uid)
                elif entry.version >= MAX_VERSION // 2:
                    log.warning("ignoring gossip about us with absurd version %d",
                                entry.version)
                elif entry.version >= own.version and entry != own:
                    self._put(PeerEntry(own.name, own.nickname, own.uid, entry.version + 1,
                                        own.neighbours))
                    changed[self.name] = self.own
                continue
            known = self._entries.get(entry.name)
            if known is None or entry.version > known.version:
                self._put(entry)
                changed[entry.name] = entry
        return list(changed.values())

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            if name != self.name:
                self._entries.pop(name, None)
                self._links.pop(name, None)

    def routes(self, direct: Collection[str]) -> dict[str, str]:
        """Next hop for every reachable peer, by breadth-first search (shortest paths).

        Our own direct connections are trusted as they are; any other link counts only
        when both ends report it, so a dead peer's stale entry cannot create routes.
        Ties go to the lexically smaller neighbour, so routes are deterministic.
        """
        next_hop: dict[str, str] = {}
        queue: deque[str] = deque()
        for name in sorted(direct):
            if name != self.name:
                next_hop[name] = name
                queue.append(name)
        while queue:
            here = queue.popleft()
            for there in sorted(self._links.get(here, ())):
                if there == self.name or there in next_hop:
                    continue
                if here not in self._links.get(there, ()):
                    continue
                next_hop[there] = next_hop[here]
                queue.append(there)
        return next_hop

    def address_book(self) -> dict[str, list[tuple[str, int]]]:
        """Listen addresses of every peer, as reported by its neighbours."""
        book: dict[str, list[tuple[str, int]]] = {}
        for entry in self._entries.values():
            for n in entry.neighbours:
                if n.port and n.name != self.name:
                    addrs = book.setdefault(n.name, [])
                    if (n.host, n.port) not in addrs:
                        addrs.append((n.host, n.port))
        return book
