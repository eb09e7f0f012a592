"""kube-node allocations, sans-IO: addresses from this node's own ranges (issue 10 item 5).

The ranges come from the Node object (`spec.podCIDRs` or an annotation) and are this
node's alone, so there is no ring and no consensus: one `Space` per address family marks
what is used here, over every range old and new, and a cursor per family gives the ring
allocator's no-immediate-reuse (a freed address comes back only after the rest of its
range was handed out).  Every change is returned as records that the shell makes durable
(in the same sqlite store) before it answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..core.addr import CIDR, Range, fmt
from ..core.space import Space
from .noderanges import changed

FAMILIES = (32, 128)


# ---- records (applied by weaveipam.store) ------------------------------------------------

@dataclass(frozen=True)
class PutNodeAddress:
    ident: str
    bits: int  # 32 or 128: IPv4 and IPv6 addresses of one pod live side by side
    address: int
    note: str = ""


@dataclass(frozen=True)
class DelNodeAddress:
    ident: str
    bits: int
    address: int


@dataclass(frozen=True)
class SetNodeRanges:
    """The ranges a source (`spec.podCIDRs`, `annotation KEY`) last allocated from, and the
    ones before them while addresses are still held there (for the status warning)."""
    source: str
    ranges: str    # comma-separated CIDRs
    previous: str  # comma-separated CIDRs, "" if none


NodeRecord = PutNodeAddress | DelNodeAddress | SetNodeRanges
Key = tuple[int, int]  # (bits, address)


class NodeRangeFull(Exception):
    """No free address in any of a family's ranges; the message names them."""


def gateway_of(c: CIDR) -> int | None:
    """The range's first usable address is the gateway (as host-local's default); never a
    pod's.  A /31, /32 (or /127, /128) has none."""
    return c.start + 1 if c.size >= 4 else None


def pool_of(c: CIDR) -> Range:
    """What pods get: the usable addresses but the gateway."""
    u = c.usable()
    return Range(u.start + 1, u.end) if gateway_of(c) is not None else u


def parse_ranges(text: str) -> tuple[CIDR, ...]:
    return tuple(CIDR.parse(t) for t in text.split(",") if t)


def ranges_text(ranges: Iterable[CIDR]) -> str:
    return ",".join(map(str, ranges))


class NodeAllocations:
    """This node's kube-node allocations: ident -> {(bits, address): note}."""

    def __init__(self) -> None:
        self.allocs: dict[str, dict[Key, str]] = {}
        self.spaces = {b: Space() for b in FAMILIES}
        for b, s in self.spaces.items():
            s.set_owned([Range(0, 1 << b)])  # the ranges are the windows asked for
        self.cursor = dict.fromkeys(FAMILIES, -1)  # last handed out, per family
        self.sources: dict[str, tuple[tuple[CIDR, ...], tuple[CIDR, ...]]] = {}

    # ---- state from the store -------------------------------------------------------------

    def restore(self, rows: Iterable[tuple[str, int, int, str]],
                sources: Mapping[str, tuple[str, str]], cursors: Mapping[int, int]) -> None:
        """What the store holds; the cursors continue after the last address handed out,
        so a restart does not hand out again what was freed just before it."""
        for ident, bits, addr, note in rows:
            if bits not in self.spaces:
                raise ValueError(f"stored kube-node address {addr} has family {bits}")
            self._hold(ident, (bits, addr), note)
        for src, (cur, prev) in sources.items():
            self.sources[src] = (parse_ranges(cur), parse_ranges(prev))
        for bits, a in cursors.items():
            if bits in self.cursor:
                self.cursor[bits] = a

    def _hold(self, ident: str, k: Key, note: str) -> None:
        self.allocs.setdefault(ident, {})[k] = note
        self.spaces[k[0]].take(k[1])
        self.cursor[k[0]] = k[1]

    # ---- queries ------------------------------------------------------------------------

    def held(self, ident: str) -> list[Key]:
        return list(self.allocs.get(ident, {}))

    def idents(self) -> list[str]:
        return list(self.allocs)

    def used_in(self, ranges: Iterable[CIDR]) -> int:
        rs = list(ranges)
        return sum(1 for addrs in self.allocs.values() for b, a in addrs
                   if any(c.bits == b and a in c for c in rs))

    def has_free(self, fams: Mapping[int, list[CIDR]]) -> str | None:
        """None if an allocation for these families would succeed, else why not."""
        for bits, cidrs in fams.items():
            if not any(self.spaces[bits].has_free(pool_of(c)) for c in cidrs):
                return f"no free address in {ranges_text(cidrs)}"
        return None

    # ---- changes ------------------------------------------------------------------------

    def note_ranges(self, source: str, ranges: tuple[CIDR, ...]) -> list[NodeRecord]:
        """The source now allocates from `ranges`; the old ones are kept as `previous` while
        addresses are held in them (existing pods keep theirs)."""
        cur, prev = self.sources.get(source, ((), ()))
        if cur == ranges:
            return []
        prev = tuple(dict.fromkeys(c for c in (*prev, *cur)
                                   if c not in ranges and self.used_in([c])))
        self.sources[source] = (ranges, prev)
        return [SetNodeRanges(source, ranges_text(ranges), ranges_text(prev))]

    def allocate(self, ident: str, fams: Mapping[int, list[CIDR]], note: str
                 ) -> tuple[list[tuple[int, CIDR]], list[NodeRecord]]:
        """One address per family, from the first of its ranges with room; an ident that
        holds one already (in these ranges or earlier ones) gets it again.  All or
        nothing: NodeRangeFull changes no state.  Returns [(address, its range)] in family
        order, and the records."""
        have = self.allocs.get(ident, {})
        known = [c for cur, prev in self.sources.values() for c in (*cur, *prev)]
        out: list[tuple[int, CIDR]] = []
        new: list[Key] = []
        for bits in sorted(fams):
            cidrs = fams[bits]
            # held already, also in a range the Node no longer has: a pod keeps its address
            mine = next(((a, c) for b, a in have if b == bits for c in (*cidrs, *known)
                         if c.bits == bits and a in c), None)
            if mine is not None:
                out.append(mine)
                continue
            got = None
            for c in cidrs:
                x = self.spaces[bits].next_free(pool_of(c), self.cursor[bits] + 1)
                if x is not None:
                    got = (x, c)
                    break
            if got is None:
                raise NodeRangeFull(f"no free address in {ranges_text(cidrs)}: every one "
                                    "is held by a pod on this node")
            out.append(got)
            new.append((bits, got[0]))
            self.spaces[bits].take(got[0])  # taken now so the next family cannot clash
        for k in new:
            self.spaces[k[0]].free(k[1])
            self._hold(ident, k, note)
        return out, [PutNodeAddress(ident, b, a, note) for b, a in new]

    def release(self, ident: str, key: Key | None = None) -> tuple[list[Key], list[NodeRecord]]:
        """Free one address of `ident`, or all of them; nothing held is no change."""
        addrs = self.allocs.get(ident, {})
        gone = [k for k in addrs if key is None or k == key]
        for k in gone:
            del addrs[k]
            self.spaces[k[0]].free(k[1])
        if not addrs:
            self.allocs.pop(ident, None)
        recs: list[NodeRecord] = [DelNodeAddress(ident, b, a) for b, a in gone]
        if gone:
            for src, (cur, prev) in list(self.sources.items()):
                if prev and not self.used_in(prev):  # the last pod of an old range left
                    self.sources[src] = (cur, ())
                    recs.append(SetNodeRanges(src, ranges_text(cur), ""))
        return gone, recs

    # ---- status -------------------------------------------------------------------------

    def warnings(self, node: str) -> list[str]:
        """Sources whose ranges changed while pods still hold addresses in the old ones."""
        out = []
        for src, (cur, prev) in sorted(self.sources.items()):
            text = changed(list(prev), list(cur), node, src) if prev else None
            if text:
                out.append(f"{text} ({self.used_in(prev)} address(es) still held in "
                           f"{ranges_text(prev)})")
        return out

    def summary(self) -> list[str]:
        return [f"{src}: {ranges_text(cur)} ({self.used_in(cur)} used)"
                for src, (cur, _) in sorted(self.sources.items())]


def key_text(k: Key) -> str:
    return fmt(k[1], k[0])
