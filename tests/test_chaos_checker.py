"""The chaos checker fed planted histories: one per bug class it exists to catch, each
asserting the violation kind, and clean histories (including indeterminate answers) that
must pass.  No namespaces or daemons: the checker is a pure function of the record.

Before issue 14 the checker passed the lost-then-404, refused-release-duplicate,
refused-release-lost, probe-timeout, late-convergence and failed-restart histories here.
"""

from __future__ import annotations

from typing import Any

import pytest
from capability import missing
from cluster.checker import CONVERGE_LIMIT, RunRecord, check
from cluster.faults import Fault, RmpeerEvent
from cluster.workload import OK_CODES, Op

X, Y, Z = "10.32.0.5", "10.32.0.6", "10.32.0.7"
NODES = range(5)


def op(kind: str, node: int, ident: str, addr: str, t0: float, status: int = 200,
       gen: int = 0) -> Op:
    """An operation as the workload records it (acknowledged = the workload's OK codes)."""
    if kind != "allocate" and status == 200:
        status = 204
    return Op(kind, node, gen, ident, addr, t0, t0 + 0.1, status, status in OK_CODES[kind],
              "" if status in (200, 204) else "answer")


def record(ops: list[Op], final: dict[int, dict[str, list[str]] | None] | None = None,
           **kw: Any) -> RunRecord:
    """A run that healed at t=50 and converged 0.4 s later, every node healthy and able to
    allocate at the end; `final` holds the nodes that hold something."""
    owned: dict[int, dict[str, list[str]] | None] = {i: {} for i in NODES}
    owned.update(final or {})
    base: dict[str, Any] = {
        "healed_at": 50.0, "converged_at": 50.4, "healthy": dict.fromkeys(NODES, True),
        "end_alloc": [(i, 200, f"10.32.1.{i}/16") for i in NODES]}
    base.update(kw)
    return RunRecord(ops, final=owned, **base)


def kinds(run: RunRecord) -> list[str]:
    return sorted(v["kind"] for v in check(run))


def rmpeer_fault(node: int, **detail: Any) -> Fault:
    d: dict[str, Any] = {"name": "02:c5:00:00:00:03", "removed": True, "old_up": True,
                         "fresh_up": True, "probe": [[503, "this peer was removed"]]}
    d.update(detail)
    return Fault("rmpeer", [node], 10.0, 20.0, d)


# ---- planted bugs ----------------------------------------------------------------------------


def test_allocation_lost_over_restart_then_released_with_404() -> None:
    ops = [op("allocate", 0, "a", X, 0.0),
           op("release", 0, "a", X, 6.0, status=404)]      # after the restart: forgotten
    run = record(ops, faults=[Fault("kill", [0], 2.0, 5.0, {"up": True})])
    assert kinds(run) == ["lost"]
    (v,) = check(run)
    assert (v["ident"], v["address"], v["how"]) == ("a", X, "release answered 404")


def test_duplicate_between_refused_release_and_later_success() -> None:
    ops = [op("allocate", 0, "a", X, 0.0),
           op("release", 0, "a", X, 1.0, status=503),      # refused: a still holds X
           op("allocate", 1, "b", X, 2.0),                  # granted while a holds it
           op("release", 0, "a", X, 3.0),
           op("release", 1, "b", X, 4.0)]
    assert kinds(record(ops)) == ["duplicate"]


def test_refused_release_does_not_excuse_a_lost_allocation() -> None:
    """The lost check covers idents that were released, when every release was refused."""
    ops = [op("allocate", 0, "a", X, 0.0),
           op("release", 0, "a", X, 1.0, status=503)]
    assert kinds(record(ops)) == ["lost"]
    assert kinds(record(ops, {0: {"a": [X]}})) == []


def test_removed_node_that_allocates() -> None:
    probe_ok = rmpeer_fault(2, probe=[[200, "10.32.0.9/16"]])
    assert kinds(record([], faults=[probe_ok])) == ["removed-node-allocated"]
    # the workload's own allocation on the removed incarnation, after the rmpeer
    ops = [op("allocate", 2, "r", Y, 12.0, gen=0)]
    run = record(ops, faults=[rmpeer_fault(2)],
                 rmpeers=[RmpeerEvent(2, 0, "02:c5:00:00:00:03", 11.0)])
    assert kinds(run) == ["resurrected"]


def test_probe_timeout_is_not_a_refusal() -> None:
    timeouts = [[-1, "TimeoutError: "]] * 3
    assert kinds(record([], faults=[rmpeer_fault(2, probe=timeouts)])) == ["probe-unanswered"]
    assert kinds(record([], faults=[rmpeer_fault(2, probe=[])])) == ["probe-unanswered"]
    # retried until answered with a refusal: fine
    retried = [[-1, "TimeoutError: "], [503, "this peer was removed"]]
    assert kinds(record([], faults=[rmpeer_fault(2, probe=retried)])) == []


def test_rings_not_converged_within_the_limit_of_the_heal() -> None:
    late = record([], healed_at=30.0, converged_at=30.0 + CONVERGE_LIMIT + 1.0)
    assert kinds(late) == ["not-converged"]
    assert check(late)[0]["took_s"] == CONVERGE_LIMIT + 1.0
    never = record([], healed_at=30.0, converged_at=None, converge_detail=[5, 5, 6, 5, 5])
    assert kinds(never) == ["not-converged"]
    assert kinds(record([], healed_at=30.0, converged_at=30.0 + CONVERGE_LIMIT - 0.1)) == []


def test_restart_that_failed() -> None:
    assert kinds(record([], faults=[Fault("kill", [1], 2.0, 40.0, {"up": False})])) == [
        "restart-failed"]
    for key in ("old_up", "fresh_up"):
        (v,) = check(record([], faults=[rmpeer_fault(3, **{key: False})]))
        assert (v["kind"], v["node"], v["restart"]) == ("restart-failed", 3, key)
    healthy = dict.fromkeys(NODES, True) | {4: False}
    assert kinds(record([], healthy=healthy)) == ["unhealthy"]


def test_duplicate_while_held_and_in_final_states() -> None:
    ops = [op("allocate", 0, "a", X, 0.0),
           op("allocate", 1, "b", X, 1.5)]
    assert kinds(record(ops, {0: {"a": [X]}, 1: {"b": [X]}})) == ["duplicate",
                                                                  "final-duplicate"]


def test_answers_and_ends() -> None:
    ops = [op("allocate", 0, "a", X, 0.0, status=500)]
    assert kinds(record(ops)) == ["server-error"]
    end = [(i, 200 if i else 503, "no space") for i in NODES]
    assert kinds(record([], end_alloc=end)) == ["cannot-allocate-at-end"]
    held = [op("allocate", 0, "a", X, 0.0)]
    assert kinds(record(held, {0: None})) == ["no-final-state"]


# ---- clean histories -------------------------------------------------------------------------


def test_clean_history_passes() -> None:
    ops = [
        # allocate, release, and the address claimed again by another ident afterwards
        op("allocate", 0, "a", X, 0.0), op("release", 0, "a", X, 1.0),
        op("claim", 1, "b", X, 1.05),
        # a release with no answer may have freed the address (Jepsen's indeterminate):
        # another ident may get it, and the retried release may find nothing
        op("allocate", 0, "c", Y, 2.0), op("release", 0, "c", Y, 3.0, status=-1),
        op("allocate", 1, "d", Y, 4.0), op("release", 0, "c", Y, 5.0, status=404),
        # refused, then released: nobody else had it meanwhile
        op("allocate", 3, "e", Z, 2.0), op("release", 3, "e", Z, 3.0, status=503),
        op("release", 3, "e", Z, 4.0),
        # held by a node that was later removed and wiped: gone with it
        op("allocate", 2, "f", "10.32.0.8", 5.0, gen=0),
        op("release", 2, "f", "10.32.0.8", 25.0, status=404, gen=1),
        # refused answers and failed allocations hold nothing
        op("claim", 4, "g", X, 6.0, status=409), op("allocate", 4, "h", "", 7.0, status=-1),
    ]
    run = record(ops, {1: {"b": [X], "d": [Y]}},
                 faults=[Fault("kill", [0], 8.0, 9.5, {"up": True}),
                         Fault("pause", [1], 8.0, 9.0),
                         rmpeer_fault(2, probe=[[-1, "TimeoutError: "], [503, "removed"]])],
                 rmpeers=[RmpeerEvent(2, 0, "02:c5:00:00:00:03", 11.0)])
    assert check(run) == []


# ---- operators and strangers (issue 9) and the pod probe (issue 16) -------------------------

OLD = "02:c5:00:00:00:03"


def wipe_fault(kind: str, node: int, **detail: Any) -> Fault:
    d: dict[str, Any] = {"name": OLD, "wiped": [node, 0], "in_use": 1, "fresh_up": True,
                         "rmpeer_answer": [200, "8192 IPs taken over"]}
    d.update(detail)
    return Fault(kind, [node], 10.0, 30.0, d)


def test_wiped_holds_stay_held_until_the_old_name_is_rmpeered() -> None:
    """The Weave #2610 bug: a node back without its state re-issues what its old pods hold."""
    ops = [op("allocate", 2, "f", X, 1.0, gen=0),
           op("allocate", 2, "g", X, 12.0, gen=1)]  # the new peer hands out f's address
    run = record(ops, {2: {"g": [X]}}, faults=[wipe_fault("wipe-data", 2)],
                 rmpeers=[RmpeerEvent(2, 0, OLD, 20.0)])
    assert kinds(run) == ["duplicate"]
    # after the rmpeer (the operator said the old pods are gone) it may, and the lost hold
    # is never expected in a final state
    ops[1] = op("allocate", 2, "g", X, 21.0, gen=1)
    assert check(record(ops, {2: {"g": [X]}}, faults=[wipe_fault("wipe-data", 2)],
                        rmpeers=[RmpeerEvent(2, 0, OLD, 20.0)])) == []
    # the rmpeer refused: the hold is still never expected back, only the advice failed
    failed = wipe_fault("wipe-data", 2, rmpeer_answer=[409, "still reachable"])
    assert kinds(record(ops[:1], faults=[failed])) == ["advice-failed"]


def test_lost_state_not_detected_or_allocating() -> None:
    f = wipe_fault("wipe-store", 2, lost_gen=1, state="ready", up=True)
    ops = [op("allocate", 2, "f", X, 1.0, gen=0), op("allocate", 2, "g", Y, 12.0, gen=1)]
    run = record(ops, faults=[f], rmpeers=[RmpeerEvent(2, 0, OLD, 20.0),
                                           RmpeerEvent(2, 1, OLD, 20.0)])
    assert kinds(run) == ["lost-state-allocated", "lost-state-undetected"]
    f.detail["state"] = "lost-state"
    assert check(record(ops[:1], faults=[f], rmpeers=run.rmpeers)) == []


def test_operator_advice_and_resets() -> None:
    cases = [
        (wipe_fault("wipe-store", 2, lost_gen=1, state="lost-state",
                    empty_store=[None, "started"]), "empty-store-accepted"),
        (wipe_fault("wipe-data", 2, rmpeer_answer=[409, "still reachable"]), "advice-failed"),
        (wipe_fault("wipe-store", 2, lost_gen=1, state="lost-state",
                    reset_data_dir=[1, "a daemon is running"]), "advice-failed"),
        (Fault("reset", [1], 5.0, 6.0, {"reset_answer": [204, ""],
                                        "guard": [X, 200, X]}), "reset-not-refused"),
        (Fault("reset", [1], 5.0, 6.0, {"reset_answer": [409, "5 addresses"],
                                        "guard": [X, 404, ""]}), "reset-changed-state"),
        (Fault("init", [1], 5.0, 9.0, {"init": "consensus=1", "up": True,
                                       "up_states": ["awaiting-consensus", "split"]}),
         "split"),
        (Fault("forged-hello", [0], 5.0, 6.0, {"answers": [[None, True]], "state": "ready"}),
         "stranger-accepted"),
        (Fault("forged-hello", [0], 5.0, 6.0, {"answers": [["own name", False]],
                                               "state": "duplicate-name"}),
         "stranger-disturbed"),
        (Fault("forged-hello", [0], 5.0, 6.0, {"answers": [["already connected", False]],
                                               "state": "ready", "link_kept": False}),
         "stranger-disturbed"),
    ]
    for fault, kind in cases:
        assert kinds(record([], faults=[fault])) == [kind], fault
    clean = [wipe_fault("wipe-store", 2, lost_gen=1, state="lost-state",
                        empty_store=[1, "is empty (0 bytes)"], reset_data_dir=[0, "ok"]),
             Fault("reset", [1], 5.0, 6.0, {"reset_answer": [409, "5 addresses"],
                                            "guard": [X, 200, X]}),
             Fault("init", [1], 5.0, 9.0, {"up": True, "up_states": ["rejoining", "ready"]}),
             Fault("forged-hello", [0], 5.0, 6.0, {"answers": [["own name", False]],
                                                   "state": "ready", "link_kept": True})]
    assert check(record([], faults=clean)) == []


def test_pod_probe_failures_are_violations() -> None:
    pods = [{"kind": "pod-unreachable", "node": 0, "address": Y, "from": [0, X],
             "to": [1, Y], "detail": "100% packet loss"}]
    assert kinds(record([], pods=pods)) == ["pod-unreachable"]


# ---- a missing capability under CI -----------------------------------------------------------


def test_missing_capability_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true .* no namespaces here"):
        missing("no namespaces here")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no namespaces here"):
        missing("no namespaces here")
