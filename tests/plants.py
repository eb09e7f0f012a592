"""Planted bugs: known-wrong behaviour switched on by a test, to prove a checker catches it.

Each plant is a context manager that patches the real code for the duration of a `with`
block (`unittest.mock.patch.object`); nothing here is imported by weaveipam, so no plant is
reachable in production.  A plant that undoes one fix rewrites the fixed method's own source
(`undo`): the rest of the method stays the real code, and if the fix's text changes the
plant fails loudly instead of planting nothing.

`PLANTS` lists them all: name -> Plant(factory, checker, kind, runs, description).  `runs`
are the pinned simulator runs, (configuration, seed) as `sim_run` spells them out, on which
the checker reports `kind` with the plant in, and no violation without it;
tests/test_plants.py asserts both for every entry.  A plant checked by another checker has
no runs (`weave_paxos_rule`: the Paxos safety property of tests/test_paxos.py; issue 9's
plants: an allocator rule of tests/test_allocator.py each, test_plants.RULES).
"""

from __future__ import annotations
import __future__

import contextlib
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NamedTuple
from unittest import mock

from weaveipam.core.allocator import Allocator, Output, Persist, Release, Reply
from weaveipam.core.allocator.base import AllocatorBase
from weaveipam.core.allocator.requests import Requests
from weaveipam.core.allocator.seeding import Seeding
from weaveipam.core.allocator.sync import RingSync
from weaveipam.core.allocator.takeover import Takeover
from weaveipam.core.paxos import NONE, Paxos, ProposalID
from weaveipam.core.records import PutAllocation


def undo(cls: type, method: str, fixed: str, broken: str,
         *more: tuple[str, str]) -> AbstractContextManager[Any]:
    """Patch `cls.method` with its own source, the text `fixed` replaced by `broken` (and
    each further (fixed, broken) pair of `more`)."""
    fn = cls.__dict__[method]
    src = textwrap.dedent(inspect.getsource(fn))
    for f, b in ((fixed, broken), *more):
        if src.count(f) != 1:
            raise AssertionError(f"plant out of date: {f!r} is not in "
                                 f"{cls.__name__}.{method} exactly once")
        src = src.replace(f, b)
    ns = dict(vars(sys.modules[fn.__module__]))
    exec(compile(src, f"<plant of {cls.__name__}.{method}>", "exec",
                 flags=__future__.annotations.compiler_flag, dont_inherit=True), ns)
    return mock.patch.object(cls, method, ns[method])


@contextmanager
def weave_paxos_rule() -> Iterator[None]:
    """Weave's consensus rule: a value is decided once a quorum of nodes accepted values of
    one *origin*, whatever ballot each accepted it in (weave ipam/paxos/paxos.go,
    `Consensus`), instead of our quorum that accepted the same ballot.  A later ballot whose
    promisers missed those acceptances can then choose another value: two decisions.

    Caught by: tests/test_paxos.py `paxos_violation` (no two nodes ever see different
    decided values), on its explicit schedules.
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


@contextmanager
def lost_in_memory() -> Iterator[None]:
    """Every third address handed out (by value) is forgotten in memory right after it was
    acknowledged; the disk keeps it, so a restart would bring it back, and no restart is
    needed for the loss.  Caught by the simulator's end-of-run ledger check: `lost`."""
    hold = Requests._hold

    def _hold(self: Requests, ident: str, a: int, note: str, *rest: Any) -> None:
        hold(self, ident, a, note, *rest)
        if a % 3 == 0:
            del self.allocs[ident][a]
            if not self.allocs[ident]:
                del self.allocs[ident]
            del self.holder[a]

    with mock.patch.object(Requests, "_hold", _hold):
        yield


@contextmanager
def lost_on_release() -> Iterator[None]:
    """A release that succeeds also releases another ident's addresses (memory and disk),
    unasked.  Caught by the simulator's ledger (at a restart or at the end): `lost`."""
    release = Requests._release

    def _release(self: Requests, rid: int, req: Release) -> None:
        had = req.ident in self.allocs
        release(self, rid, req)
        others = sorted(i for i in self.allocs if i != req.ident)
        if had and others:
            self.out, out = [], self.out
            release(self, rid, Release(others[0]))
            self.out = out + [o for o in self.out if not isinstance(o, Reply)]  # unasked

    with mock.patch.object(Requests, "_release", _release):
        yield


@contextmanager
def removed_ignores_removal() -> Iterator[None]:
    """A node removed with rmpeer and back with its old data carries on instead of
    stopping (the bug the chaos cluster found).  Caught by the simulator's check that a
    removed node never acknowledges an allocation: `removed-allocated`."""
    stop = AllocatorBase._stop

    def _stop(self: AllocatorBase, fault: str, text: str) -> None:
        if fault != "removed":
            stop(self, fault, text)

    with mock.patch.object(AllocatorBase, "_stop", _stop):
        yield


@contextmanager
def freed_on_restart() -> Iterator[None]:
    """A restart restores the allocations but leaves their addresses free in the space, so
    they are handed out again.  Caught by the simulator's ledger in a small range, where
    addresses come round: `duplicate`."""
    restore = RingSync._restore

    def _restore(self: RingSync, snap: Any) -> None:
        restore(self, snap)
        for a in self.holder:
            self.space.free(a)

    with mock.patch.object(RingSync, "_restore", _restore):
        yield


@contextmanager
def reply_before_persist() -> Iterator[None]:
    """An allocation's record leaves the allocator one batch after its reply: the reply is
    out before the state is durable, and a crash in between loses an acknowledged
    allocation.  Caught by the simulator with crashes right after a reply (`reply_crash`),
    at the restart: `lost`."""
    take = AllocatorBase.take_outputs

    def take_outputs(self: AllocatorBase) -> list[Output]:
        out = take(self)
        late = [o for o in out if isinstance(o, Persist) and isinstance(o.record, PutAllocation)]
        held: list[Output] = self.__dict__.pop("_plant_late", [])
        self.__dict__["_plant_late"] = late
        return held + [o for o in out if o not in late]

    with mock.patch.object(AllocatorBase, "take_outputs", take_outputs):
        yield


def weave_rmpeer() -> AbstractContextManager[Any]:
    """Weave's rmpeer: whoever runs it takes the removed peer's ranges, so rmpeer on two
    hosts at once gives them two owners (Weave #1949).  Caught by the simulator's ownership
    check: `double-owner`."""
    heir_for = Allocator.heir_for

    def weave_heir(self: Allocator, dead: str) -> str:
        # (a node asking who would take its own ranges still gets the real answer)
        return self.name if dead != self.name else heir_for(self, dead)

    return mock.patch.object(Allocator, "heir_for", weave_heir)


def joiner_seeds_alone() -> AbstractContextManager[Any]:
    """A joiner seeds a ring of its own without hearing whether its peers hold one (a node
    added with another --ipalloc-init).  Caught by the simulator: `duplicate`."""
    return mock.patch.object(Seeding, "_clear_to_seed", lambda self: True)


def wiped_name_reused() -> AbstractContextManager[Any]:
    """A node whose data dir was lost comes back under its old name and is not stopped:
    it hands out addresses its pods still hold (Weave #2610).  Caught by the simulator's
    ledger: `duplicate`."""
    return mock.patch.object(Takeover, "_check_lost_state", lambda self: None)


def second_removal_missed() -> AbstractContextManager[Any]:
    """Undoes the fix `_taken_over`: a peer removed, reset, rejoined and removed again
    carries on with its old data (the second removal leaves no new marker).  Caught by the
    simulator: `removed-allocated`."""
    return mock.patch.object(RingSync, "_taken_over", lambda self: False)


def removal_marker_ignored() -> AbstractContextManager[Any]:
    """Undoes the fix in `_merge`: a merge that carries only our removal marker (no entry
    changed) is ignored, so a removed node back with old data does not stop.  Not caught
    yet (UNCAUGHT)."""
    return undo(RingSync, "_merge", "self.name not in self.ring.removed or "
                 "self.known_removed)", "True)")


def witness_remark_skipped() -> AbstractContextManager[Any]:
    """Undoes the re-mark in `_witnessed`: an entry emptied (and shown as untouched) and
    used again is not marked used again, so a successor that lost the data dir finds it
    untouched and hands out addresses its pods hold."""
    return undo(Requests, "_witnessed",
                "if w is not None and w in (target, self._witness()) and not untouched:",
                "if w is not None and w in (target, self._witness()):")


def leave_unsynced() -> AbstractContextManager[Any]:
    """Undoes the fix in `_leave`: reset on a restarted node that has not heard the ring
    since hands on ranges an heir may have taken over meanwhile."""
    return undo(Takeover, "_leave", " or not self.synced and not self.fault", "")


def free_counts_unvetted() -> AbstractContextManager[Any]:
    """Undoes the fix in `tick`: a node not yet in sync (a fresh one checking what its name
    owns) reports its own free counts, erasing the "in use" marks its predecessor left, so
    a wiped node reusing its name is not stopped.  Not caught yet (UNCAUGHT)."""
    return undo(Allocator, "tick", "elif now >= self.next_gossip and self.synced and "
                "not self.fault:", "elif now >= self.next_gossip:")


def seeds_alone_after_wait() -> AbstractContextManager[Any]:
    """Undoes issue 9's fix in `_clear_to_seed`: a node given peers, none of them
    reachable, seeds a ring of its own after 5 s (as before).  A node whose data dir was
    lost, back alone in a partition with `consensus=1`, then hands out addresses the
    cluster's ring holds.  Caught by the simulator: `duplicate`."""
    return undo(Seeding, "_clear_to_seed",
                "return not (self.expect_peers or self.peers)",
                "return self.now >= self.sync_deadline - 5.0")  # ~5 s after the start


@contextmanager
def witness_any_peer() -> Iterator[None]:
    """Undoes issue 9's fix to the "in use" witness: any reachable peer confirms a mark
    (as before), not our heir, so when every peer holding the mark is down, wiped or cut
    off, a node back without its data finds its entries untouched and re-issues their
    addresses.  Caught by an allocator rule (tests/test_plants.py RULES)."""
    def anyone(self: Any) -> str | None:
        live = sorted(self.reachable())
        return self.rng.choice(live) if live and self._witness() else self._witness()

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(Requests, "_witness_target", anyone))
        stack.enter_context(undo(
            Requests, "_witnessed", "if w is not None and w in (target, self._witness()) "
            "and not untouched:", "if w is not None and not untouched:"))
        stack.enter_context(undo(
            RingSync, "_on_used_ok",
            "if sender not in (self._witness(), self._witness_target()):", "if False:"))
        yield


def grant_unwitnessed() -> AbstractContextManager[Any]:
    """Undoes issue 9's fix in `_donate`: a grant goes to its receiver at once, before the
    donor's heir holds it.  With the receiver down, an heir taking the donor's ranges over
    (rmpeer), or the donor back without its data, takes the piece as the donor's: two
    owners.  Caught by the simulator: `double-owner`."""
    return undo(Requests, "_donate", "if heir is None:", "if True:")


def stale_count_untouched() -> AbstractContextManager[Any]:
    """Undoes issue 9's fix in `_untouched`: a free count larger than the entry (a version
    older than a grant that cut it) counts as untouched, so a node back without its data
    does not see that its predecessor used the entry.  Caught by the simulator:
    `duplicate`."""
    return undo(AllocatorBase, "_untouched", "return bool(self.ring.entries[t][2] == ",
                "return bool(self.ring.entries[t][2] >= ")


class Plant(NamedTuple):
    factory: Callable[[], AbstractContextManager[Any]]
    checker: str  # the checker expected to catch it
    kind: str     # the violation kind it must report
    runs: tuple[tuple[str, int], ...]  # pinned simulator runs that show it: (config, seed)
    description: str


def sim_run(cfg: str, seed: int) -> dict[str, Any]:
    """The simulator configurations the gauntlet uses, by name."""
    base: dict[str, dict[str, Any]] = {
        "faults": dict(nodes=3 + seed % 8, steps=300, faults=True),
        "rmpeer": dict(nodes=8, steps=600, faults=True, rmpeer_rate=0.5),
        "operators": dict(nodes=3 + seed % 8, steps=400, faults=True, operator_rate=0.5),
        "small": dict(nodes=3, steps=400, faults=True, universe="10.32.0.0/24",
                      traffic=40.0, operator_rate=0.3),
        "operators-heavy": dict(nodes=3 + seed % 8, steps=400, faults=True,
                                operator_rate=2.0),
        "reply-crash": dict(nodes=5, steps=300, faults=True, reply_crash=0.2),
        "quiet-churn": dict(nodes=3 + seed % 8, steps=600, faults=True, operator_rate=1.0,
                            rmpeer_rate=0.5, traffic=0.2),
    }
    return {**base[cfg], "seed": seed}


def sweep(name: str, cfg: str, seeds: Iterable[int]) -> None:
    """Print, per seed, the violation kind with the plant in and without it: how pinned
    seeds are found again when a change to the engine moves the simulator's runs."""
    import contextlib
    import io

    from weaveipam.sim.__main__ import run

    factory = PLANTS[name].factory if name in PLANTS else UNCAUGHT[name][0]
    for seed in seeds:
        with contextlib.redirect_stderr(io.StringIO()):
            with factory():
                planted = run(**sim_run(cfg, seed)).get("kind")
            clean = run(**sim_run(cfg, seed)).get("kind")
        print(f"{cfg} seed {seed}: planted {planted or '-'}, clean {clean or '-'}", flush=True)


SIM = "the simulator (weaveipam/sim)"
RULE = "an allocator rule (tests/test_allocator.py)"

PLANTS: dict[str, Plant] = {
    "weave_paxos_rule": Plant(
        weave_paxos_rule, "the Paxos safety property (tests/test_paxos.py)",
        "two values decided", (),
        "Weave's Paxos rule: acceptances of one value origin counted across ballots"),
    "lost_in_memory": Plant(
        lost_in_memory, SIM, "lost", (("faults", 8), ("faults", 9)),
        "an acknowledged allocation dropped from memory only (no restart needed)"),
    "lost_on_release": Plant(
        lost_on_release, SIM, "lost", (("faults", 1), ("faults", 8)),
        "a release also drops another ident's allocation"),
    "removed_ignores_removal": Plant(
        removed_ignores_removal, SIM, "removed-allocated", (("rmpeer", 3), ("rmpeer", 4)),
        "a removed node back with its old data ignores its own removal"),
    "freed_on_restart": Plant(
        freed_on_restart, SIM, "duplicate", (("small", 2), ("small", 3)),
        "used addresses left free after a restart"),
    "reply_before_persist": Plant(
        reply_before_persist, SIM, "lost", (("reply-crash", 5), ("reply-crash", 6)),
        "an allocation's reply emitted a batch before its record"),
    "weave_rmpeer": Plant(
        weave_rmpeer, SIM, "double-owner", (("rmpeer", 6), ("rmpeer", 9)),
        "Weave's rmpeer: whoever runs it is the heir"),
    "joiner_seeds_alone": Plant(
        joiner_seeds_alone, SIM, "double-owner", (("operators", 107), ("operators", 140)),
        "a joiner seeds its own ring without hearing its peers"),
    "wiped_name_reused": Plant(
        wiped_name_reused, SIM, "duplicate", (("operators", 4), ("operators", 6)),
        "a node that lost its data dir reuses its name and is not stopped"),
    "second_removal_missed": Plant(
        second_removal_missed, SIM, "removed-allocated", (("rmpeer", 50), ("rmpeer", 66)),
        "fix undone: a second removal taken for the first rejoin (`_taken_over`)"),
    "leave_unsynced": Plant(
        leave_unsynced, SIM, "duplicate", (("operators-heavy", 177),),
        "fix undone: reset on a restarted node hands on ranges before it heard the ring"),
    # issue 9's fixes, each caught always by an allocator rule (tests/test_plants.py RULES)
    "witness_any_peer": Plant(
        witness_any_peer, RULE, "rule fails", (),
        "fix undone: any reachable peer confirms an \"in use\" mark, not the heir"),
    "grant_unwitnessed": Plant(
        grant_unwitnessed, RULE, "rule fails", (),
        "fix undone: a grant reaches its receiver before the donor's heir holds it"),
    "seeds_alone_after_wait": Plant(
        seeds_alone_after_wait, RULE, "rule fails", (),
        "fix undone: a node given peers seeds alone after 5 s when none answers"),
    "stale_count_untouched": Plant(
        stale_count_untouched, RULE, "rule fails", (),
        "fix undone: a free count larger than its entry counts as untouched"),
}

# Plants no checker catches yet within a reasonable number of seeds (README, "Planted bugs"):
# name -> (factory, why).  The gauntlet checks that each still applies to the real code.
UNCAUGHT: dict[str, tuple[Callable[[], AbstractContextManager[Any]], str]] = {
    "removal_marker_ignored": (
        removal_marker_ignored,
        "a merge changing nothing but our removal marker needs a removed peer whose ring is "
        "otherwise current; no seed swept reached one (README, Planted bugs)"),
    "witness_remark_skipped": (
        witness_remark_skipped,
        "after this session's engine changes no seed of 170 swept (operators, operators-heavy, "
        "small) reaches an entry emptied, used again and then lost with its node's data dir"),
    "free_counts_unvetted": (
        free_counts_unvetted,
        "no node out of sync reported a changed free count in 60 seeds: a used mark moves "
        "a count by one, which the 1/16 drift rule gossips only for entries under 16"),
}
