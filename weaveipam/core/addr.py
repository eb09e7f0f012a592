"""Addresses as integers: IPv4 and IPv6 alike.

Parsing and formatting go through the stdlib `ipaddress`; all arithmetic is on ints so the
ring and space never care which family they serve.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class AddrError(ValueError):
    """Bad address text; the message says what was wrong."""


@dataclass(frozen=True, order=True)
class Range:
    """Half-open [start, end) of address integers."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def __contains__(self, a: object) -> bool:
        return isinstance(a, int) and self.start <= a < self.end

    def overlaps(self, other: Range) -> bool:
        return self.start < other.end and other.start < self.end

    def intersect(self, other: Range) -> Range | None:
        s, e = max(self.start, other.start), min(self.end, other.end)
        return Range(s, e) if s < e else None


@dataclass(frozen=True, order=True)
class CIDR:
    """An aligned block: `start` has its host bits zero."""

    start: int
    prefix: int
    bits: int  # 32 or 128

    @staticmethod
    def parse(text: str, *, strict: bool = True) -> CIDR:
        """Parse "10.32.0.0/12" or "fd00:32::/108"; a bare address is a host route."""
        try:
            net = ipaddress.ip_network(text.strip(), strict=strict)
        except ValueError as e:
            raise AddrError(f"{text!r} is not a CIDR like 10.32.0.0/12 or fd00::/108: {e}") from e
        return CIDR(int(net.network_address), net.prefixlen, net.max_prefixlen)

    @property
    def size(self) -> int:
        return 1 << (self.bits - self.prefix)

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def range(self) -> Range:
        return Range(self.start, self.end)

    @property
    def version(self) -> int:
        return 4 if self.bits == 32 else 6

    def __contains__(self, a: object) -> bool:
        return isinstance(a, int) and self.start <= a < self.end

    def contains_cidr(self, other: CIDR) -> bool:
        return self.bits == other.bits and self.start <= other.start and other.end <= self.end

    def usable(self) -> Range:
        """Addresses a pod may get: never the network or broadcast address of the subnet."""
        if self.size <= 2:
            return self.range
        return Range(self.start + 1, self.end - 1)

    def fmt_addr(self, a: int) -> str:
        return fmt(a, self.bits)

    def __str__(self) -> str:
        return f"{fmt(self.start, self.bits)}/{self.prefix}"


def parse_addr(text: str) -> tuple[int, int]:
    """Return (int, bits) for an address text."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError as e:
        raise AddrError(f"{text!r} is not an IPv4 or IPv6 address") from e
    return int(ip), ip.max_prefixlen


def fmt(a: int, bits: int) -> str:
    return str(ipaddress.IPv4Address(a) if bits == 32 else ipaddress.IPv6Address(a))


def aligned_pieces(r: Range) -> list[tuple[int, int]]:
    """Split [start, end) into maximal CIDR-aligned blocks, as (start, size) pairs."""
    out: list[tuple[int, int]] = []
    s = r.start
    while s < r.end:
        size = s & -s if s else 1 << (r.end - 1).bit_length()
        while s + size > r.end:
            size >>= 1
        out.append((s, size))
        s += size
    return out


def largest_aligned(r: Range) -> tuple[int, int]:
    """The largest CIDR-aligned block inside r, as (start, size); r must be non-empty."""
    return max(aligned_pieces(r), key=lambda p: (p[1], -p[0]))
