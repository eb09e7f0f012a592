"""The planted-bug gauntlet: every plant in tests/plants.py is caught by the checker meant
for it, which reports the violation kind stated for it, on pinned runs that pass with no
plant (so that a run cannot pass the gauntlet for another reason)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from plants import PLANTS, UNCAUGHT, sim_run, undo
from test_paxos import FOUND, SPELLED_OUT, paxos_violation

from weaveipam.core.allocator.requests import Requests
from weaveipam.sim.__main__ import run


@functools.cache
def _clean(cfg: str, seed: int) -> dict[str, Any]:
    """A pinned run without any plant (several plants share some)."""
    return run(**sim_run(cfg, seed))


@pytest.mark.parametrize("name", [n for n, p in PLANTS.items() if p.runs])
def test_the_simulator_catches_the_plant(name: str) -> None:
    plant = PLANTS[name]
    for cfg, seed in plant.runs:
        with plant.factory():
            s = run(**sim_run(cfg, seed))
        assert s["violations"] == 1 and s.get("kind") == plant.kind, (
            f"{name} on {cfg} seed {seed}: expected {plant.kind!r}, got {s.get('kind')!r}: "
            f"{s.get('violation')}")
        clean = _clean(cfg, seed)
        assert clean["violations"] == 0, (cfg, seed, clean)


def test_the_paxos_property_catches_weaves_rule() -> None:
    plant = PLANTS["weave_paxos_rule"]
    for ops in (SPELLED_OUT, FOUND):
        with plant.factory():
            err = paxos_violation(3, ops)
        assert err is not None and err.startswith(plant.kind), err
        assert paxos_violation(3, ops) is None


# The allocator rule (tests/test_allocator.py) that catches each of issue 9's plants: the
# simulator catches them too (their runs), but only on rare seeds; these catch them always.
RULES = {
    "witness_any_peer":
        "test_the_first_address_of_an_entry_waits_for_the_heir_and_the_mark_is_on_its_disk",
    "grant_unwitnessed": "test_a_grant_reaches_its_receiver_only_once_the_donors_heir_holds_it",
    "seeds_alone_after_wait": "test_a_node_given_peers_never_seeds_alone_however_long_none_answers",
    "stale_count_untouched": "test_a_free_count_larger_than_its_entry_counts_as_used",
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_the_allocator_rule_catches_the_plant(name: str) -> None:
    import test_allocator

    rule = getattr(test_allocator, RULES[name])
    rule()  # passes without the plant
    with PLANTS[name].factory(), pytest.raises(AssertionError):
        rule()


@pytest.mark.parametrize("seed", range(1, 21))
def test_crashes_right_after_replies_lose_nothing_without_a_plant(seed: int) -> None:
    """The fault that catches reply_before_persist is no cause of violations itself."""
    s = run(**sim_run("reply-crash", seed))
    assert s["violations"] == 0 and s["reply_crashes"] > 0, s


def test_every_plant_has_its_checker_run_here() -> None:
    elsewhere = {"weave_paxos_rule", *RULES}  # their own tests above
    assert {n for n, p in PLANTS.items() if not p.runs} == elsewhere
    for name, p in PLANTS.items():
        assert p.checker and p.kind and p.description, name


def test_a_plant_is_gone_after_its_block() -> None:
    before = {c: dict(vars(c)) for c in _patched_classes()}
    for factory in [p.factory for p in PLANTS.values()] + [f for f, _ in UNCAUGHT.values()]:
        with factory():
            pass
    for c, attrs in before.items():
        assert dict(vars(c)) == attrs, c


def _patched_classes() -> list[type]:
    from weaveipam.core.allocator import Allocator
    from weaveipam.core.allocator.base import AllocatorBase
    from weaveipam.core.allocator.seeding import Seeding
    from weaveipam.core.allocator.sync import RingSync
    from weaveipam.core.allocator.takeover import Takeover
    from weaveipam.core.paxos import Paxos
    return [Allocator, AllocatorBase, Requests, Seeding, Takeover, RingSync, Paxos]


def test_a_plant_whose_fix_moved_fails_loudly() -> None:
    with pytest.raises(AssertionError, match="plant out of date"):
        undo(Requests, "_witnessed", "text that is not there", "")
