"""The ring: who owns which part of the universe, as a state-based CRDT.

Entries `token -> (version, peer, free)` in a SortedDict; an entry owns
[token, next token), the last one up to the end of the universe.  A seeded ring always
has a token at the universe start.  Tokens are never removed, and merge keeps, per token,
the entry with the largest `(version, peer, free)` tuple: a total order, so merge is a
join (commutative, associative, idempotent) and no same-version tie is left to chance
(Weave compared free counts alone, which is not commutative: its #3310).

Only an entry's owner changes it, except a transfer away from a removed peer, which bumps
the version by TRANSFER_BUMP so it wins over anything the dead peer may still write.

A delta may carry *boundary markers* `(-1, "", 0)`: "a token exists here, owner not told".
They bound the entry before them (an entry owns only up to the next token, so a receiver
lacking that token would believe it owns more) and lose to any real entry in a merge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sortedcontainers import SortedDict

from .addr import CIDR, Range

TRANSFER_BUMP = 1 << 32
MAX_VERSION = (1 << 63) - 1
MAX_NAME = 64
FREE_CAP = (1 << 62)  # free counts are hints; IPv6 ranges exceed what msgpack ints carry

Entry = tuple[int, str, int]  # (version, peer, free): tuple order is the merge order
MARKER: Entry = (-1, "", 0)


@dataclass(frozen=True)
class RingError:
    """Why a received ring was refused; `kind` is stable for callers to branch on."""

    kind: str  # "invalid" | "seeds" | "universe" | "unseeded"
    message: str


@dataclass(frozen=True)
class OwnedRange:
    start: int
    end: int
    version: int
    free: int


def valid_names(ns: list[Any]) -> bool:
    """valid_name for every element, at C speed (Paxos values list every peer)."""
    if not ns:
        return True
    try:
        joined = "".join(ns)
    except TypeError:
        return False
    return joined.isprintable() and 0 < min(map(len, ns)) and max(map(len, ns)) <= MAX_NAME


def valid_name(n: object) -> bool:
    return isinstance(n, str) and 0 < len(n) <= MAX_NAME and n.isprintable()


class Ring:
    def __init__(self, universe: CIDR) -> None:
        self.universe = universe
        self.entries: SortedDict = SortedDict()  # int -> Entry
        self.seeds: tuple[str, ...] = ()
        self.removed: dict[str, str] = {}  # removed peer -> heir (grow-only)
        self._digest: int | None = None

    # ---- reading -------------------------------------------------------------------

    def is_empty(self) -> bool:
        return not self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def digest(self) -> int:
        """A 64-bit summary, equal on equal rings: anti-entropy compares these.

        Computed on demand and cached until the next change, so merges stay cheap.
        """
        if self._digest is None:
            if not self.entries and not self.seeds and not self.removed:
                self._digest = 0  # "I have no ring": peers answer with theirs
                return 0
            h = hashlib.blake2b(digest_size=8)
            h.update(repr((self.seeds, sorted(self.removed.items()))).encode())
            for t, (v, p, f) in self.entries.items():
                h.update(f"{t},{v},{p},{f};".encode())
            self._digest = int.from_bytes(h.digest(), "big")
        return self._digest

    def end_of(self, token: int) -> int:
        i = self.entries.bisect_right(token)
        return self.entries.keys()[i] if i < len(self.entries) else self.universe.end

    def owner(self, addr: int) -> str | None:
        if not self.entries or addr not in self.universe:
            return None
        i = self.entries.bisect_right(addr) - 1
        if i < 0:
            return None
        return str(self.entries.values()[i][1]) or None

    def iter_ranges(self) -> Iterator[tuple[int, int, Entry]]:
        it = iter(self.entries.items())
        prev = next(it, None)
        if prev is None:
            return
        for t, e in it:
            yield prev[0], t, prev[1]
            prev = (t, e)
        yield prev[0], self.universe.end, prev[1]

    def owned_by(self, peer: str) -> list[OwnedRange]:
        return [OwnedRange(s, e, v[0], v[2]) for s, e, v in self.iter_ranges() if v[1] == peer]

    def peers(self) -> dict[str, int]:
        """Peer -> number of addresses it owns."""
        out: dict[str, int] = {}
        for s, e, v in self.iter_ranges():
            if v[1]:
                out[v[1]] = out.get(v[1], 0) + (e - s)
        return out

    def free_in(self, window: Range, exclude: str) -> dict[str, int]:
        """Per peer, its reported free space overlapping `window` (free is per entry: a hint)."""
        out: dict[str, int] = {}
        for s, e, v in self.iter_ranges():
            if v[1] == exclude or v[2] <= 0:
                continue
            ov = Range(s, e).intersect(window)
            if ov is None:
                continue
            share = min(v[2], ov.size)
            out[v[1]] = out.get(v[1], 0) + share
        return out

    # ---- changing (only the owner of an entry calls these) --------------------------

    def _set(self, token: int, e: Entry) -> None:
        self.entries[token] = e
        self._digest = None

    def seed(self, peers: Iterable[str]) -> None:
        """CIDR-aligned initial split, identical on every node given the same peer set."""
        names = sorted(set(peers))
        assert names and self.is_empty()
        self.seeds = tuple(names)

        def split(start: int, size: int, ps: list[str]) -> None:
            if len(ps) == 1 or size == 1:
                self._set(start, (0, ps[0], min(size, FREE_CAP)))
                return
            half = size // 2
            k = (len(ps) + 1) // 2
            split(start, half, ps[:k])
            split(start + half, half, ps[k:])

        split(self.universe.start, self.universe.size, names)

    def grant(self, start: int, end: int, to: str, by: str, free_given: int) -> list[int]:
        """`by` gives [start, end) (inside one of its entries) to `to`.

        Returns the tokens a receiver needs: those changed, plus the one bounding the piece.
        """
        i = self.entries.bisect_right(start) - 1
        tok = self.entries.keys()[i]
        ver, owner, free = self.entries.values()[i]
        assert owner == by and end <= self.end_of(tok), "grant outside an owned entry"
        changed: list[int] = []
        if end < self.end_of(tok):
            # the rest after the piece stays ours; new token, never seen before
            self._set(end, (0, by, 0))
        if end < self.universe.end:
            # always ship the end token: an entry's extent is "up to the next token", so a
            # receiver that lacked it would believe it owns more than it was given
            changed.append(end)
        if start == tok:
            self._set(start, (ver + 1, to, min(free_given, FREE_CAP)))
        else:
            self._set(tok, (ver + 1, by, min(free, start - tok)))  # stay within its span
            self._set(start, (0, to, min(free_given, FREE_CAP)))
        changed.append(start)
        if start != tok:
            changed.append(tok)
        return sorted(changed)

    def set_free(self, token: int, free: int) -> bool:
        ver, peer, old = self.entries[token]
        free = min(free, FREE_CAP)
        if old == free:
            return False
        self._set(token, (ver + 1, peer, free))
        return True

    def transfer(self, frm: str, to: str) -> tuple[int, list[int]]:
        """Hand every entry of `frm` to `to`; returns (addresses moved, changed tokens)."""
        moved, changed = 0, []
        for s, e, v in list(self.iter_ranges()):
            if v[1] == frm:
                self._set(s, (min(v[0] + TRANSFER_BUMP, MAX_VERSION), to, v[2]))
                moved += e - s
                changed.append(s)
        return moved, changed

    def mark_removed(self, name: str, heir: str) -> bool:
        if name in self.removed:
            return False
        self.removed[name] = heir
        self._digest = None
        return True

    # ---- merging ---------------------------------------------------------------------

    def merge(self, other: Ring) -> list[int] | RingError:
        """Join `other` into self; returns the tokens that changed here, or why it was refused.

        A refused ring changes nothing.
        """
        if other.universe != self.universe:
            return RingError("universe", f"ring is for range {other.universe}, "
                                         f"ours is {self.universe}")
        if other.seeds and self.seeds and other.seeds != self.seeds:
            return RingError("seeds", "ring was seeded by different peers: "
                             f"{','.join(other.seeds)} there, {','.join(self.seeds)} here")
        if self.is_empty() and other.entries and other.universe.start not in other.entries:
            return RingError("unseeded", "partial ring received before a full one")
        mine = self.entries
        get = mine.get
        changed = [tok for tok, e in other.entries.items()
                   if (cur := get(tok)) is None or e > cur]
        if changed:
            oe = other.entries
            mine.update((t, oe[t]) for t in changed)
            self._digest = None
        if other.seeds and not self.seeds:
            self.seeds = other.seeds
            self._digest = None
        for n, h in other.removed.items():
            if n not in self.removed or h > self.removed[n]:
                self.removed[n] = h
                self._digest = None
        return changed

    # ---- wire ------------------------------------------------------------------------

    def to_wire(self, tokens: Iterable[int] | None = None) -> dict[str, Any]:
        """Full ring, or only `tokens` (a delta)."""
        nb = self.universe.bits // 8
        base = self.universe.start
        if tokens is None:
            toks = self.entries.keys()
        else:
            # every entry travels with its successor, so whoever merges it (a relay's relay
            # included) knows where it ends and never believes it owns more
            want = set(tokens)
            keys = self.entries.keys()
            bounds = set()
            for t in want:
                i = self.entries.bisect_right(t)
                if i < len(keys) and keys[i] not in want:
                    bounds.add(keys[i])
            toks = sorted(want | bounds)
        ents = []
        for t in toks:
            v = MARKER if tokens is not None and t in bounds else self.entries[t]
            ents.append([(t - base).to_bytes(nb, "big"), v[1], v[0], v[2]])
        return {"u": str(self.universe), "s": list(self.seeds), "e": ents,
                "r": sorted([k, h] for k, h in self.removed.items())}

    @staticmethod
    def from_wire(obj: Any, universe: CIDR) -> Ring | RingError:
        """Validate a received ring or delta; never raises on bad input."""
        def bad(msg: str) -> RingError:
            return RingError("invalid", msg)

        if not isinstance(obj, dict) or set(obj) != {"u", "s", "e", "r"}:
            return bad("ring must be a map with keys u, s, e, r")
        if obj["u"] != str(universe):
            return RingError("universe", f"ring is for range {str(obj['u'])[:64]!r}, "
                                         f"ours is {universe}")
        seeds, ents, rem = obj["s"], obj["e"], obj["r"]
        if not isinstance(seeds, list) or not valid_names(seeds):
            return bad("ring seeds must be a list of peer names")
        if seeds != sorted(set(seeds)):
            return bad("ring seeds must be sorted and unique")
        if not isinstance(rem, list) or not all(
            isinstance(p, list) and len(p) == 2 and valid_name(p[0]) and valid_name(p[1])
            for p in rem
        ):
            return bad("ring removed list must hold [peer, heir] pairs")
        if [p[0] for p in rem] != sorted({p[0] for p in rem}):
            return bad("ring removed list must be sorted with each peer once")
        if not isinstance(ents, list):
            return bad("ring entries must be a list")
        if ents and not seeds:
            return bad("ring has entries but no seeds")
        nb = universe.bits // 8
        size = universe.size
        prev = -1
        toks: list[int] = []
        vals: list[Entry] = []
        names: list[str] = []
        for x in ents:
            if not (isinstance(x, list) and len(x) == 4 and isinstance(x[0], bytes)
                    and len(x[0]) == nb and type(x[2]) is int and type(x[3]) is int):
                return bad("ring entry must be [token bytes, peer, version, free]")
            off = int.from_bytes(x[0], "big")
            if off >= size:
                return bad("ring entry token lies outside the range")
            if off <= prev:
                return bad("ring entries are not sorted or repeat a token")
            prev = off
            p, v, f = x[1], x[2], x[3]
            if p == "" and v == -1 and f == 0:
                vals.append(MARKER)
            elif not (0 <= v <= MAX_VERSION and 0 <= f <= FREE_CAP):
                return bad("ring entry version or free count out of bounds")
            else:
                names.append(p)
                vals.append((v, p, f))
            toks.append(universe.start + off)
        if not valid_names(names):
            return bad("ring entry peer must be a peer name")
        # A free count above the entry's span is not refused (Weave refused it and isolated
        # nodes): merging deltas legitimately leaves a stale count on an entry that was
        # split since. Free is a hint for picking donors and is clamped where it is used.
        r = Ring(universe)
        r.seeds = tuple(seeds)
        r.removed = {p[0]: p[1] for p in rem}
        r.entries = SortedDict(zip(toks, vals, strict=True))  # already sorted: one pass
        return r

    def copy(self) -> Ring:
        r = Ring(self.universe)
        r.entries = self.entries.copy()
        r.seeds, r.removed, r._digest = self.seeds, dict(self.removed), self._digest
        return r

    def snapshot(self) -> list[tuple[int, Entry]]:
        return list(self.entries.items())
