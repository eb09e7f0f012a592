"""Durable records the allocator emits and the store applies.

The allocator never touches storage: it emits these records in its outputs, and the
shell (daemon or simulator) must make every record of one output batch durable before
it delivers any reply or message of that batch.  A restart rebuilds a `Snapshot` from
the records applied so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SetIdentity:
    """Who this state belongs to: a snapshot for another name or range is refused."""

    name: str
    universe: str  # CIDR text, e.g. "10.32.0.0/12"


@dataclass(frozen=True)
class SetRing:
    data: bytes  # msgpack of Ring.to_wire(); replaces the previous ring


@dataclass(frozen=True)
class SetPaxos:
    data: bytes  # msgpack of our own Paxos claims; replaces the previous one


@dataclass(frozen=True)
class SetWitnessed:
    """Our entries our heir confirmed as in use: msgpack of [[heir, offset], ...]."""

    data: bytes


@dataclass(frozen=True)
class PutAllocation:
    ident: str
    address: int
    note: str = ""  # free text shown by `ls` (e.g. pod namespace/name)
    # the subnet's prefix length it was handed out in, shown as address/prefix; None
    # (records written before it was kept) means the default subnet's
    prefix: int | None = None


@dataclass(frozen=True)
class DelAllocation:
    ident: str
    address: int


@dataclass(frozen=True)
class ClearAllocations:
    """Forget every allocation (reset, or handing everything away)."""


Record = (SetIdentity | SetRing | SetPaxos | SetWitnessed | PutAllocation | DelAllocation
          | ClearAllocations)


@dataclass
class Snapshot:
    """Everything a restarted allocator needs; built by replaying records in order."""

    name: str | None = None
    universe: str | None = None
    ring: bytes | None = None
    paxos: bytes | None = None
    witnessed: bytes | None = None
    # ident -> {address: note}, in insertion order
    allocations: dict[str, dict[int, str]] = field(default_factory=dict)
    # (ident, address) -> subnet prefix length, for the allocations that recorded one
    prefixes: dict[tuple[str, int], int] = field(default_factory=dict)

    def apply(self, rec: Record) -> None:
        if isinstance(rec, SetIdentity):
            self.name, self.universe = rec.name, rec.universe
        elif isinstance(rec, SetRing):
            self.ring = rec.data
        elif isinstance(rec, SetPaxos):
            self.paxos = rec.data
        elif isinstance(rec, SetWitnessed):
            self.witnessed = rec.data
        elif isinstance(rec, PutAllocation):
            self.allocations.setdefault(rec.ident, {})[rec.address] = rec.note
            if rec.prefix is None:
                self.prefixes.pop((rec.ident, rec.address), None)
            else:
                self.prefixes[(rec.ident, rec.address)] = rec.prefix
        elif isinstance(rec, DelAllocation):
            addrs = self.allocations.get(rec.ident)
            if addrs is not None:
                addrs.pop(rec.address, None)
                self.prefixes.pop((rec.ident, rec.address), None)
                if not addrs:
                    del self.allocations[rec.ident]
        elif isinstance(rec, ClearAllocations):
            self.allocations.clear()
            self.prefixes.clear()
