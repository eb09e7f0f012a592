"""Tests for weaveipam.core.addr: parsing, ranges, CIDR-aligned splitting."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weaveipam.core.addr import (
    CIDR,
    AddrError,
    Range,
    aligned_pieces,
    fmt,
    largest_aligned,
    parse_addr,
)

V4 = int(ipaddress.IPv4Address("10.32.0.0"))


# ---- CIDR.parse ---------------------------------------------------------------------


def test_parse_v4_default_universe() -> None:
    c = CIDR.parse("10.32.0.0/12")
    assert (c.start, c.prefix, c.bits) == (V4, 12, 32)
    assert c.size == 1 << 20
    assert c.end == int(ipaddress.IPv4Address("10.48.0.0"))
    assert c.range == Range(c.start, c.end)
    assert c.version == 4
    assert str(c) == "10.32.0.0/12"
    assert c.fmt_addr(c.start + 1) == "10.32.0.1"


@pytest.mark.parametrize(
    ("text", "prefix", "size"),
    [("fd00:32::/108", 108, 1 << 20), ("fd00::/64", 64, 1 << 64), ("::/0", 0, 1 << 128)],
)
def test_parse_v6(text: str, prefix: int, size: int) -> None:
    c = CIDR.parse(text)
    net = ipaddress.ip_network(text)
    assert (c.start, c.prefix, c.bits, c.size) == (int(net.network_address), prefix, 128, size)
    assert c.version == 6
    assert str(c) == text
    assert CIDR.parse(str(c)) == c


def test_parse_bare_address_is_host_route_and_whitespace_is_stripped() -> None:
    assert CIDR.parse("10.32.0.7") == CIDR(V4 + 7, 32, 32)
    assert CIDR.parse("  10.32.0.0/12\n") == CIDR.parse("10.32.0.0/12")
    assert CIDR.parse("fd00::1").prefix == 128


def test_parse_strict_rejects_host_bits_unless_told() -> None:
    with pytest.raises(AddrError) as ei:
        CIDR.parse("10.32.0.1/12")
    assert "10.32.0.1/12" in str(ei.value)
    assert "host bits" in str(ei.value)
    assert CIDR.parse("10.32.0.1/12", strict=False) == CIDR.parse("10.32.0.0/12")


@pytest.mark.parametrize(
    "text",
    ["", "   ", "foo", "10.32.0.0/33", "300.1.1.1/8", "10.32.0.0/-1", "10.32.0.0/12/3",
     "fd00::/129", "fd00:::1/64", "10.32.0.0/ 12", "10.32.0/12x", "1.2.3.4.5/32"],
)
def test_parse_errors_are_addr_errors_with_helpful_text(text: str) -> None:
    with pytest.raises(AddrError) as ei:
        CIDR.parse(text)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert repr(text) in msg  # says which input was bad
    assert "CIDR like 10.32.0.0/12" in msg  # and what a good one looks like


def test_parse_addr() -> None:
    assert parse_addr("10.32.0.1") == (V4 + 1, 32)
    assert parse_addr(" fd00::1 ") == (int(ipaddress.IPv6Address("fd00::1")), 128)
    for bad in ["", "10.32.0.0/12", "10.32.0.256", "zz::1", "fd00::1%eth0x/3"]:
        with pytest.raises(AddrError) as ei:
            parse_addr(bad)
        assert repr(bad) in str(ei.value)
        assert "not an IPv4 or IPv6 address" in str(ei.value)


def test_fmt() -> None:
    assert fmt(V4, 32) == "10.32.0.0"
    assert fmt(1, 128) == "::1"
    assert fmt(2**128 - 1, 128) == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


# ---- usable, containment, Range -------------------------------------------------------


def test_usable_excludes_network_and_broadcast() -> None:
    c = CIDR.parse("10.32.0.0/24")
    u = c.usable()
    assert u == Range(c.start + 1, c.end - 1)
    assert c.start not in u and c.end - 1 not in u
    assert u.size == 254
    big = CIDR.parse("10.32.0.0/12").usable()
    assert int(ipaddress.IPv4Address("10.32.0.0")) not in big
    assert int(ipaddress.IPv4Address("10.47.255.255")) not in big
    assert int(ipaddress.IPv4Address("10.47.255.254")) in big
    v6 = CIDR.parse("fd00:32::/108")
    assert v6.usable() == Range(v6.start + 1, v6.end - 1)


@pytest.mark.parametrize("text", ["10.32.0.0/31", "10.32.0.0/32", "fd00::/127", "fd00::/128"])
def test_usable_tiny_subnets_keep_every_address(text: str) -> None:
    c = CIDR.parse(text)
    assert c.usable() == c.range


def test_contains_and_contains_cidr() -> None:
    c = CIDR.parse("10.32.0.0/12")
    assert c.start in c and c.end - 1 in c
    assert c.end not in c and c.start - 1 not in c
    assert "10.32.0.1" not in c  # only integers are addresses
    assert c.contains_cidr(CIDR.parse("10.40.0.0/16"))
    assert c.contains_cidr(c)
    assert not c.contains_cidr(CIDR.parse("10.0.0.0/8"))
    assert not c.contains_cidr(CIDR.parse("10.48.0.0/16"))
    # same integers, other family: never contained
    assert not CIDR(c.start, 12, 128).contains_cidr(c)
    assert not c.contains_cidr(CIDR(c.start, 16, 128))


def test_range_ops() -> None:
    r = Range(10, 20)
    assert r.size == 10
    assert 10 in r and 19 in r and 20 not in r and 9 not in r
    assert r.overlaps(Range(19, 30)) and not r.overlaps(Range(20, 30))
    assert r.intersect(Range(15, 30)) == Range(15, 20)
    assert r.intersect(Range(20, 30)) is None
    assert r.intersect(Range(0, 5)) is None
    assert r.intersect(Range(0, 100)) == r


# ---- aligned pieces -------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_pieces(r: Range) -> list[tuple[int, int]]:
    pieces = aligned_pieces(r)
    pos = r.start
    for s, size in pieces:
        assert s == pos, "pieces must be contiguous, in order"
        assert _is_pow2(size), "piece size is a power of two"
        assert s % size == 0, "piece is CIDR aligned"
        # maximal (greedy): doubling would either misalign or overrun the range
        assert s % (2 * size) != 0 or s + 2 * size > r.end
        pos += size
    assert pos == r.end, "pieces cover the range exactly"
    # each size occurs at most twice (once going up, once going down)
    sizes = [p[1] for p in pieces]
    assert all(sizes.count(x) <= 2 for x in set(sizes))
    return pieces


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from([0, V4, 2**100, 2**128 - 2**20, 3 * 2**64]),
    a=st.integers(0, 2**20),
    n=st.integers(0, 2**20),
)
def test_aligned_pieces_cover_exactly(base: int, a: int, n: int) -> None:
    r = Range(base + a, base + a + n)
    pieces = _check_pieces(r)
    assert (pieces == []) == (n == 0)


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 2**128 - 1), b=st.integers(0, 2**128 - 1))
def test_aligned_pieces_full_v6_scale(a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    pieces = _check_pieces(Range(lo, hi))
    assert len(pieces) <= 2 * 128


def test_aligned_pieces_examples() -> None:
    assert aligned_pieces(Range(0, 1)) == [(0, 1)]
    assert aligned_pieces(Range(0, 256)) == [(0, 256)]
    assert aligned_pieces(Range(1, 8)) == [(1, 1), (2, 2), (4, 4)]
    assert aligned_pieces(Range(0, 7)) == [(0, 4), (4, 2), (6, 1)]
    assert aligned_pieces(Range(5, 5)) == []
    u = CIDR.parse("fd00::/64")
    assert aligned_pieces(u.range) == [(u.start, 1 << 64)]


def _brute_largest(r: Range) -> tuple[int, int]:
    best = (r.start, 1)
    size = 1
    while size <= r.size:
        s = -(-r.start // size) * size  # first aligned start >= r.start
        if s + size <= r.end and size > best[1]:
            best = (s, size)
        size *= 2
    return best


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from([0, 2**100, V4]), a=st.integers(0, 5000), n=st.integers(1, 5000))
def test_largest_aligned_is_the_largest_and_lowest(base: int, a: int, n: int) -> None:
    r = Range(base + a, base + a + n)
    s, size = largest_aligned(r)
    assert (s, size) == _brute_largest(r)
    assert r.start <= s and s + size <= r.end and s % size == 0


def test_largest_aligned_examples() -> None:
    assert largest_aligned(Range(1, 1023)) == (256, 256)
    assert largest_aligned(Range(0, 1024)) == (0, 1024)
    assert largest_aligned(Range(3, 4)) == (3, 1)
    with pytest.raises(ValueError):
        largest_aligned(Range(5, 5))
