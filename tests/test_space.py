"""Tests for weaveipam.core.space: owned ranges, used runs, next_free, donation.

The stateful test drives Space and a plain model (a set of used addresses and a list of
owned ranges) with the same operations and compares them after every step.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from weaveipam.core.addr import Range
from weaveipam.core.space import Space

V4 = int(ipaddress.IPv4Address("10.32.0.0"))
ODD26 = int(ipaddress.IPv4Address("10.32.1.64"))
V6 = 2**100 + 3 * 2**12


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class SpaceModel(RuleBasedStateMachine):
    BASE = V4
    SIZE = 256

    def __init__(self) -> None:
        super().__init__()
        self.space = Space()
        self.owned: list[Range] = []
        self.owned_set: set[int] = set()
        self.used: set[int] = set()
        self.cursor = self.BASE - 1

    # ---- model helpers ---------------------------------------------------------------

    @property
    def universe(self) -> Range:
        return Range(self.BASE, self.BASE + self.SIZE)

    def is_owned(self, a: int) -> bool:
        return a in self.owned_set

    def free_owned_in(self, w: Range) -> list[int]:
        out = []
        for r in self.owned:
            for a in range(max(r.start, w.start), min(r.end, w.end)):
                if a not in self.used:
                    out.append(a)
        return sorted(out)

    def expect_next(self, w: Range, after: int) -> int | None:
        cands = self.free_owned_in(w)
        later = [a for a in cands if a >= after]
        if later:
            return later[0]
        return cands[0] if cands else None

    def free_runs(self, w: Range) -> list[Range]:
        """Maximal free runs inside one owned range and the window."""
        runs = []
        for r in self.owned:
            lo, hi = max(r.start, w.start), min(r.end, w.end)
            a = lo
            while a < hi:
                if a in self.used:
                    a += 1
                    continue
                b = a
                while b < hi and b not in self.used:
                    b += 1
                runs.append(Range(a, b))
                a = b
        return runs

    # ---- strategies -------------------------------------------------------------------

    def windows(self) -> st.SearchStrategy[Range]:
        base, size = self.BASE, self.SIZE

        def aligned(t: tuple[int, int]) -> Range:
            bits, k = t
            sz = size >> bits
            s = base + (k % (1 << bits)) * sz
            return Range(s, s + sz)

        def arbitrary(t: tuple[int, int]) -> Range:
            a, b = sorted(t)
            return Range(base + a, base + b + 1)

        return st.one_of(
            st.just(Range(base, base + size)),
            st.tuples(st.integers(0, 4), st.integers(0, 15)).map(aligned),
            st.tuples(st.integers(0, size - 1), st.integers(0, size - 1)).map(arbitrary),
        )

    # ---- rules ------------------------------------------------------------------------

    @initialize(cuts=st.sets(st.integers(1, 255), max_size=8), mask=st.integers(0, 2**9 - 1))
    def init_owned(self, cuts: set[int], mask: int) -> None:
        self.set_owned(cuts, mask, False)

    @rule(cuts=st.sets(st.integers(1, 255), max_size=8), mask=st.integers(0, 2**9 - 1),
          reverse=st.booleans())
    def set_owned(self, cuts: set[int], mask: int, reverse: bool) -> None:
        pts = [0, *sorted(c for c in cuts if c < self.SIZE), self.SIZE]
        segs = [Range(self.BASE + a, self.BASE + b) for a, b in zip(pts, pts[1:], strict=False)]
        self.owned = [r for i, r in enumerate(segs) if mask >> i & 1]
        self.owned_set = {a for r in self.owned for a in range(r.start, r.end)}
        self.space.set_owned(self.owned[::-1] if reverse else list(self.owned))

    @rule(data=st.data())
    def take_any_free(self, data: st.DataObject) -> None:
        """Take any free address, owned or not (a restart restores before the ring)."""
        cands = [a for a in range(self.BASE - 2, self.BASE + self.SIZE + 2)
                 if a not in self.used]
        a = data.draw(st.sampled_from(cands))
        self.space.take(a)
        self.used.add(a)

    @rule(data=st.data())
    def take_next(self, data: st.DataObject) -> None:
        w = data.draw(self.windows())
        after = self.BASE + data.draw(st.integers(-3, self.SIZE + 3))
        got = self.space.next_free(w, after)
        assert got == self.expect_next(w, after), (w, after)
        if got is not None:
            assert got not in self.used and self.is_owned(got) and got in w
            self.space.take(got)
            self.used.add(got)

    @rule(data=st.data())
    def alloc_with_cursor(self, data: st.DataObject) -> None:
        """What the allocator does: continue after the last handed-out address."""
        w = data.draw(self.windows())
        got = self.space.next_free(w, self.cursor + 1)
        assert got == self.expect_next(w, self.cursor + 1)
        if got is not None:
            self.space.take(got)
            self.used.add(got)
            self.cursor = got

    @precondition(lambda self: bool(self.used))
    @rule(data=st.data())
    def free_then_allocate_after_it(self, data: st.DataObject) -> None:
        x = data.draw(st.sampled_from(sorted(self.used)))
        w = data.draw(self.windows())
        assert self.space.free(x)
        self.used.discard(x)
        got = self.space.next_free(w, x + 1)
        assert got == self.expect_next(w, x + 1)
        later = [a for a in self.free_owned_in(w) if a > x]
        if later:
            assert got != x, "no immediate reuse while later addresses are free"
            assert got == later[0]
        if got is not None:
            self.space.take(got)
            self.used.add(got)

    @rule(data=st.data())
    def free_any(self, data: st.DataObject) -> None:
        pool = sorted(self.used) + [self.BASE - 1, self.BASE + self.SIZE, self.BASE + 7]
        a = data.draw(st.sampled_from(pool))
        assert self.space.free(a) == (a in self.used)
        self.used.discard(a)

    @rule(data=st.data())
    def donation(self, data: st.DataObject) -> None:
        w = data.draw(self.windows())
        d = self.space.donation(w)
        runs = self.free_runs(w)
        if not runs:
            assert d is None
            return
        assert d is not None
        size = d.size
        assert _pow2(size) and d.start % size == 0, d
        assert d.start >= w.start and d.end <= w.end
        assert any(r.start <= d.start and d.end <= r.end for r in self.owned), \
            "a donation lies inside one owned range (one ring entry)"
        assert all(a not in self.used for a in range(d.start, d.end))
        longest = max(r.size for r in runs)
        assert size <= max(1, longest // 2), "never more than half the largest free run"
        assert size * 8 >= longest, "and not much less than half"
        # it comes from a largest free run
        run = next(r for r in runs if r.start <= d.start < r.end)
        assert run.size == longest

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        sp = self.space
        assert sp.used == len(self.used)
        assert sp.owned() == self.owned
        assert sp.owned_size() == sum(r.size for r in self.owned)
        used_owned = self.used & self.owned_set
        assert sp.free_total() == sp.owned_size() - len(used_owned)
        for r in self.owned:
            assert sp.free_of(r.start) == r.size - len(self.used & set(range(r.start, r.end)))
        # both are piecewise constant: checking around every change point is enough
        points = {self.BASE - 1, self.BASE, self.BASE + self.SIZE - 1, self.BASE + self.SIZE}
        for a in self.used:
            points.update((a - 1, a, a + 1))
        for r in self.owned:
            points.update((r.start - 1, r.start, r.end - 1, r.end))
        for a in points:
            assert sp.is_used(a) == (a in self.used)
            assert sp.owns(a) == self.is_owned(a)
        assert sp.used_outside_owned() == sorted(self.used - used_owned)
        whole = self.universe
        assert sp.has_free(whole) == bool(self.free_owned_in(whole))


class SpaceOddOffset(SpaceModel):
    BASE = ODD26
    SIZE = 64


class SpaceV6(SpaceModel):
    BASE = V6
    SIZE = 256


_S = settings(max_examples=60, stateful_step_count=30, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TestSpaceV4 = SpaceModel.TestCase
TestSpaceV4.settings = _S
TestSpaceOddOffset = SpaceOddOffset.TestCase
TestSpaceOddOffset.settings = _S
TestSpaceV6 = SpaceV6.TestCase
TestSpaceV6.settings = _S


# ---- examples --------------------------------------------------------------------------


def space(owned: list[tuple[int, int]], used: list[int] = ()) -> Space:  # type: ignore[assignment]
    s = Space()
    s.set_owned([Range(a, b) for a, b in owned])
    for a in used:
        s.take(a)
    return s


def test_empty_space() -> None:
    s = Space()
    assert s.next_free(Range(0, 100), 0) is None
    assert not s.has_free(Range(0, 100))
    assert s.donation(Range(0, 100)) is None
    assert s.free_total() == 0 and s.owned_size() == 0 and s.used == 0
    assert s.owned() == []  # asked by status before the ring exists


def test_no_immediate_reuse_then_wrap() -> None:
    s = space([(100, 110)])
    w = Range(100, 110)
    cursor = 99
    got = []
    for _ in range(10):
        a = s.next_free(w, cursor + 1)
        assert a is not None
        s.take(a)
        got.append(a)
        cursor = a
    assert got == list(range(100, 110))
    assert s.next_free(w, cursor + 1) is None
    assert s.free(103)
    assert s.free(105)
    # continue after the cursor (109): wraps to the lowest freed one
    assert s.next_free(w, cursor + 1) == 103
    s.take(103)
    # after 103 comes 105 before anything lower
    assert s.next_free(w, 104) == 105
    assert s.free(101)
    assert s.next_free(w, 106) == 101  # wrapped
    assert s.next_free(w, 101) == 101  # at `after` counts


def test_next_free_across_ranges_and_window() -> None:
    s = space([(10, 20), (30, 40), (50, 60)], used=[30, 31, 55])
    assert s.next_free(Range(0, 100), 25) == 32
    assert s.next_free(Range(0, 100), 60) == 10  # wraps
    assert s.next_free(Range(35, 52), 45) == 50
    assert s.next_free(Range(35, 52), 52) == 35
    assert s.next_free(Range(0, 100), 0) == 10
    assert s.next_free(Range(20, 30), 0) is None  # window between owned ranges
    assert s.next_free(Range(55, 56), 0) is None  # only a used address
    assert s.next_free(Range(30, 33), 31) == 32


def test_taking_just_below_a_used_run_joins_it() -> None:
    """Addresses taken out of order (claims, a restore) still form one run, so next_free
    skips all of it rather than stopping where a piece of it began."""
    s = space([(0, 16)], used=[5, 6, 4])
    assert s.next_free(Range(0, 16), 4) == 7
    s = space([(0, 16)], used=[9, 8])
    assert s.next_free(Range(0, 16), 8) == 10
    assert s.free(9)
    assert s.next_free(Range(0, 16), 8) == 9


def test_generation_moves_on_every_ownership_change() -> None:
    """The simulator re-indexes a node's ownership only when its generation moved."""
    s = Space()
    seen = {s.generation}
    for owned in ([Range(0, 8)], [Range(0, 4)], [Range(0, 4), Range(8, 12)]):
        s.set_owned(owned)
        assert s.generation not in seen
        seen.add(s.generation)


def test_take_used_asserts_and_free_unused_is_false() -> None:
    s = space([(0, 8)], used=[3])
    with pytest.raises(AssertionError, match="address already used"):
        s.take(3)
    assert not s.free(4)
    assert not s.free(-1)
    assert s.free(3) and not s.free(3)


def test_restore_before_owning() -> None:
    s = Space()
    for a in (5, 6, 7):
        s.take(a)
    assert s.used_outside_owned() == [5, 6, 7]
    s.set_owned([Range(0, 8)])
    assert s.free_of(0) == 5 and s.used_outside_owned() == []
    s.set_owned([Range(0, 6)])
    assert s.free_of(0) == 5 and s.used_outside_owned() == [6, 7]
    assert s.free(7)
    assert s.free_of(0) == 5 and s.free_total() == 5


def test_donation_examples() -> None:
    assert space([(0, 256)]).donation(Range(0, 256)) == Range(128, 256)
    assert space([(0, 256)], used=[0]).donation(Range(0, 256)) == Range(192, 256)
    assert space([(0, 256)], used=[200]).donation(Range(0, 256)) == Range(64, 128)
    assert space([(0, 256)]).donation(Range(0, 64)) == Range(32, 64)
    assert space([(0, 2)], used=[0]).donation(Range(0, 2)) == Range(1, 2)
    assert space([(0, 2)], used=[0, 1]).donation(Range(0, 2)) is None
    # two adjacent owned ranges: the piece stays inside one of them
    d = space([(0, 64), (64, 128)]).donation(Range(0, 128))
    assert d is not None and (d.end <= 64 or d.start >= 64)


def test_ipv6_sized_ranges_cost_nothing() -> None:
    base = 2**100
    s = space([(base, base + 2**64)], used=[base, base + 1])
    assert s.free_total() == 2**64 - 2
    assert s.next_free(Range(base, base + 2**64), base) == base + 2
    assert s.next_free(Range(base, base + 2**64), base + 2**64 - 1) == base + 2**64 - 1
    s.take(base + 2**64 - 1)
    assert s.next_free(Range(base, base + 2**64), base + 2**64 - 1) == base + 2
    d = s.donation(Range(base, base + 2**64))
    assert d == Range(base + 2**62 + 2**61, base + 2**63)  # half of [base+2**62, +2**63)
    assert s.free_of(base) == 2**64 - 3
    s.set_owned([Range(base, base + 2**63), Range(base + 2**63, base + 2**64)])
    assert s.free_of(base) == 2**63 - 2 and s.free_of(base + 2**63) == 2**63 - 1
