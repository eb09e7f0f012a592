"""What goes into and comes out of the allocator: requests, peer-facing outputs, init modes.

The shell (daemon or simulator) builds these and hands them in with the current time; it
gets `Persist`, `Send`, `Reply` and `Event` back from `take_outputs()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..addr import CIDR
from ..records import Record
from ..ring import valid_name

# ---- inputs --------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocate:
    ident: str
    subnet: CIDR | None = None
    note: str = ""


@dataclass(frozen=True)
class Claim:
    ident: str
    addr: int
    note: str = ""
    subnet: CIDR | None = None  # the caller's subnet: its edges are never handed out


@dataclass(frozen=True)
class Release:
    ident: str
    addr: int | None = None


@dataclass(frozen=True)
class Lookup:
    ident: str


@dataclass(frozen=True)
class RmPeer:
    name: str
    # other peers the operator says are gone too: skipped when choosing the heir, so peers
    # that are each other's heirs can be removed together (`weaveipam rmpeer A B`)
    gone: tuple[str, ...] = ()


@dataclass(frozen=True)
class Leave:
    """Hand all our ranges to a live peer and forget our state (`weaveipam reset`).

    Refused while addresses are allocated here unless `force`: pods may still use them.
    """

    force: bool = False


@dataclass(frozen=True)
class Prime:
    """Start consensus now rather than at the first allocation."""


Request = Allocate | Claim | Release | Lookup | RmPeer | Leave | Prime


# ---- outputs -------------------------------------------------------------------------

@dataclass(frozen=True)
class Fail:
    code: str  # "bad-request" | "not-found" | "conflict" | "unavailable"
    message: str


@dataclass(frozen=True)
class Reply:
    rid: int
    value: Any = None
    error: Fail | None = None


@dataclass(frozen=True)
class Send:
    dest: str | None  # None: gossip to up to GOSSIP_FANOUT random neighbours
    msg: dict[str, Any]


@dataclass(frozen=True)
class Persist:
    record: Record


@dataclass(frozen=True)
class Event:
    """Something an operator should see in the log."""

    level: str  # "info" | "warning" | "error"
    text: str


Output = Reply | Send | Persist | Event


@dataclass(frozen=True)
class InitMode:
    kind: str  # "consensus" | "seed" | "observer"
    count: int = 1
    seeds: tuple[str, ...] = ()

    @staticmethod
    def parse(text: str) -> InitMode:
        """`consensus=N`, `seed=a,b,c` or `observer`, as Weave's --ipalloc-init."""
        t = text.strip()
        if t == "observer":
            return InitMode("observer")
        k, _, v = t.partition("=")
        if k == "consensus":
            if not v.isdigit() or int(v) < 1:
                raise ValueError(f"--ipalloc-init {t!r}: consensus needs a peer count >= 1, "
                                 "e.g. consensus=3")
            return InitMode("consensus", int(v))
        if k == "seed":
            names = tuple(sorted({n.strip() for n in v.split(",") if n.strip()}))
            if not names or not all(valid_name(n) for n in names):
                raise ValueError(f"--ipalloc-init {t!r}: seed needs peer names, "
                                 "e.g. seed=9e:96:c8:09:bf:c4,be:1e:35:91:c8:a2")
            return InitMode("seed", len(names), names)
        raise ValueError(f"--ipalloc-init {t!r}: use consensus=N, seed=NAME,... or observer")

