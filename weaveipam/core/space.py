"""Space: the ranges this peer owns and which addresses in them are in use.

Used addresses are kept as maximal runs `start -> end` in a SortedDict, so finding the
next free address, taking and freeing one are O(log n) and free space costs nothing.
"""

from __future__ import annotations

from bisect import bisect_right

from sortedcontainers import SortedDict

from .addr import Range, largest_aligned


class Space:
    def __init__(self) -> None:
        self._owned: SortedDict = SortedDict()  # start -> end, one per ring entry we own
        self._ostarts: list[int] = []           # the same starts, for stdlib bisect
        self._used_in: dict[int, int] = {}      # owned start -> used count
        self._runs: SortedDict = SortedDict()   # used runs: start -> end
        self._rkeys = self._runs.keys()         # live view; indexing it is O(log n)
        self._owned_list: list[Range] = []
        self.generation = 0
        self.used = 0

    # ---- ownership --------------------------------------------------------------------

    def set_owned(self, ranges: list[Range]) -> None:
        """Replace the owned ranges (after a ring change); used addresses are kept."""
        self._owned = SortedDict((r.start, r.end) for r in ranges)
        self._ostarts = list(self._owned.keys())
        self._owned_list = [Range(s, e) for s, e in self._owned.items()]
        self.generation += 1  # lets observers skip work when ownership did not move
        self._used_in = {s: self._count_used(s, e) for s, e in self._owned.items()}

    def owned(self) -> list[Range]:
        return list(self._owned_list)

    def owned_size(self) -> int:
        return sum(e - s for s, e in self._owned.items())

    def owning(self, a: int) -> int | None:
        """Start of the owned range (ring entry) that holds `a`, or None."""
        i = bisect_right(self._ostarts, a) - 1
        if i < 0:
            return None
        s = self._ostarts[i]
        return s if a < self._owned[s] else None

    def owns(self, a: int) -> bool:
        return self.owning(a) is not None

    def free_of(self, start: int) -> int:
        """Free addresses in the owned range starting at `start`."""
        return int(self._owned[start]) - start - self._used_in.get(start, 0)

    def free_total(self) -> int:
        return self.owned_size() - sum(self._used_in.values())

    def _count_used(self, s: int, e: int) -> int:
        n = 0
        i = max(self._runs.bisect_right(s) - 1, 0)
        keys, vals = self._runs.keys(), self._runs.values()
        while i < len(keys) and keys[i] < e:
            rs, re = max(keys[i], s), min(vals[i], e)
            if rs < re:
                n += re - rs
            i += 1
        return n

    def used_outside_owned(self) -> list[int]:
        """Used addresses in ranges we no longer own (e.g. after a transfer away)."""
        out: list[int] = []
        for s, e in self._runs.items():
            for a in range(s, e):
                if self.owning(a) is None:
                    out.append(a)
        return out

    # ---- use ---------------------------------------------------------------------------

    def _run_at(self, a: int) -> tuple[int, int] | None:
        """The used run containing or ending just below `a`, as (start, end)."""
        i = self._runs.bisect_right(a) - 1
        if i < 0:
            return None
        st = self._rkeys[i]
        return st, self._runs[st]

    def is_used(self, a: int) -> bool:
        r = self._run_at(a)
        return r is not None and a < r[1]

    def _run_end_from(self, a: int) -> int:
        """First address >= a that is not used."""
        r = self._run_at(a)
        return r[1] if r is not None and a < r[1] else a

    def take(self, a: int) -> None:
        """Mark `a` used; the caller has checked it is free (owned or not: a restart may
        restore an address before the ring that owns it)."""
        runs = self._runs
        start, end = a, a + 1
        r = self._run_at(a)
        if r is not None:
            assert r[1] <= a, "address already used"
            if r[1] == a:
                start = r[0]
        nxt = runs.get(a + 1)
        if nxt is not None:
            end = nxt
            del runs[a + 1]
        runs[start] = end
        self.used += 1
        o = self.owning(a)
        if o is not None:
            self._used_in[o] += 1

    def free(self, a: int) -> bool:
        runs = self._runs
        r = self._run_at(a)
        if r is None or a >= r[1]:
            return False
        s, e = r
        if s == a:
            del runs[s]
        else:
            runs[s] = a
        if a + 1 < e:
            runs[a + 1] = e
        self.used -= 1
        o = self.owning(a)
        if o is not None:
            self._used_in[o] -= 1
        return True

    def next_free(self, window: Range, after: int) -> int | None:
        """First free owned address in `window` at or after `after`, wrapping around once."""
        owned = self._owned
        if not owned:
            return None
        keys = owned.keys()
        n = len(keys)
        i0 = max(owned.bisect_right(after) - 1, 0)
        for k in range(n + 1):
            s = keys[(i0 + k) % n]
            e = owned[s]
            lo, hi = max(s, window.start), min(e, window.end)
            if k == 0:
                lo = max(lo, after)
            elif k == n:
                hi = min(hi, after)
            if lo >= hi:
                continue
            x = self._run_end_from(lo)
            if x < hi:
                return x
        return None

    def has_free(self, window: Range) -> bool:
        return self.next_free(window, window.start) is not None

    # ---- donation ----------------------------------------------------------------------

    def donation(self, window: Range) -> Range | None:
        """A CIDR-aligned piece of about half of our largest free run inside `window`.

        Returns the piece (it stays owned until the caller changes the ring).
        """
        best: Range | None = None
        for s, e in self._owned.items():
            lo, hi = max(s, window.start), min(e, window.end)
            x = lo
            while x < hi:
                x = self._run_end_from(x)
                if x >= hi:
                    break
                j = self._runs.bisect_right(x)
                gap_end = min(self._runs.keys()[j], hi) if j < len(self._runs) else hi
                if best is None or gap_end - x > best.size:
                    best = Range(x, gap_end)
                x = gap_end
        if best is None:
            return None
        start, size = largest_aligned(best)
        if size > 1:
            size //= 2
            start += size  # keep the lower half, where our cursor is likely to be
        return Range(start, start + size)
