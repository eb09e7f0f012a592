"""Planted bugs: known-wrong behaviour switched on by a test, to prove a checker catches it.

Each plant is a context manager that patches the real code for the duration of a `with`
block (`unittest.mock.patch.object`); nothing here is imported by weaveipam, so no plant is
reachable in production.  Every plant's docstring names the bug and the checker expected to
catch it, and `PLANTS` lists them all: name -> (factory, checker, description).  A test of
the gauntlet enters `factory()` and asserts that `checker` reports the violation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import NamedTuple
from unittest import mock

from weaveipam.core.paxos import NONE, Paxos, ProposalID


@contextmanager
def weave_paxos_rule() -> Iterator[None]:
    """Weave's consensus rule: a value is decided once a quorum of nodes accepted values of
    one *origin*, whatever ballot each accepted it in (weave ipam/paxos/paxos.go,
    `Consensus`), instead of our quorum that accepted the same ballot.  A later ballot whose
    promisers missed those acceptances can then choose another value: two decisions.

    Caught by: tests/test_paxos.py `paxos_violation` (no two nodes ever see different
    decided values), on its explicit schedule and within the stated number of seeds.
    """

    def consensus(self: Paxos) -> tuple[str, ...] | None:
        counts: dict[ProposalID, int] = {}
        for c in self.claims.values():
            if c.accepted != NONE:
                counts[c.origin] = counts.get(c.origin, 0) + 1
                if counts[c.origin] >= self.quorum:
                    return c.value
        return None

    with mock.patch.object(Paxos, "consensus", consensus):
        yield


class Plant(NamedTuple):
    factory: Callable[[], AbstractContextManager[None]]
    checker: str  # the checker expected to catch it, as "file::function"
    description: str


PLANTS: dict[str, Plant] = {
    "weave_paxos_rule": Plant(
        weave_paxos_rule, "tests/test_paxos.py::paxos_violation",
        "Weave's Paxos rule: acceptances of one value origin counted across ballots"),
}
