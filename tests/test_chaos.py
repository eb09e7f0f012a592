"""The chaos run: 5 daemons in network namespaces, a concurrent allocate/claim/release
workload on every node, and faults combined at random from a seed (SIGKILL + restart,
SIGSTOP/SIGCONT, packet loss, partitions, rmpeer of a killed node and its return with its
old data).  The checker must find no violation (see tests/cluster/checker.py).

WEAVEIPAM_CHAOS_SECONDS (default 180) is how long faults are injected; WEAVEIPAM_CHAOS_SEED
(default 1) picks the faults; WEAVEIPAM_CHAOS_FAULTS (comma-separated, default all of
kill,pause,loss,partition,rmpeer) limits their kinds; WEAVEIPAM_CHAOS_OUT keeps
summary.json, history.jsonl, faults.json and timeline.png there (default: pytest's
tmp_path).  `make chaos` runs longer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cluster.checker import check
from cluster.faults import KINDS, RmpeerEvent
from cluster.harness import netns_unavailable
from cluster.run import run_chaos
from cluster.workload import Op

pytestmark = pytest.mark.slow


def _op(op: str, node: int, ident: str, addr: str, t0: float, t1: float,
        ok: bool = True, gen: int = 0) -> Op:
    return Op(op, node, gen, ident, addr, t0, t1, 200 if ok else -1, ok)


def test_checker_catches_what_it_must() -> None:
    """No cluster needed: planted histories."""
    ops = [_op("allocate", 0, "a", "10.0.0.1", 0.0, 1.0),
           _op("allocate", 1, "b", "10.0.0.1", 1.5, 2.0),     # a still holds it
           _op("allocate", 2, "c", "10.0.0.2", 0.0, 1.0),
           _op("release", 2, "c", "10.0.0.2", 3.0, 3.5),
           _op("claim", 3, "d", "10.0.0.2", 3.1, 3.6),        # after c's release: fine
           _op("allocate", 4, "e", "10.0.0.3", 0.0, 1.0, gen=0),
           _op("allocate", 4, "f", "10.0.0.4", 6.0, 6.5, gen=0)]  # after its rmpeer
    final: dict[int, dict[str, list[str]] | None] = {
        0: {"a": ["10.0.0.1"]}, 1: {"b": ["10.0.0.1"]}, 2: {}, 3: {"d": ["10.0.0.2"]}, 4: {}}
    v = check(ops, [RmpeerEvent(4, 0, "x", 5.0)], final, {(4, 0)})
    kinds = sorted(x["kind"] for x in v)
    assert kinds == ["duplicate", "final-duplicate", "resurrected"], v
    # a lost acknowledged allocation
    v = check(ops[:1], [], {0: {}}, set())
    assert [x["kind"] for x in v] == ["lost"]
    assert check(ops[2:5], [], {2: {}, 3: {"d": ["10.0.0.2"]}}, set()) == []


def test_chaos_cluster(tmp_path: Path) -> None:
    why = netns_unavailable()
    if why:
        pytest.skip(f"chaos cluster skipped: {why}")
    seconds = float(os.environ.get("WEAVEIPAM_CHAOS_SECONDS", "180"))
    seed = int(os.environ.get("WEAVEIPAM_CHAOS_SEED", "1"))
    out = Path(os.environ.get("WEAVEIPAM_CHAOS_OUT") or tmp_path / "chaos")
    kinds = [k for k in os.environ.get("WEAVEIPAM_CHAOS_FAULTS", "").split(",") if k] or None
    s = run_chaos(nodes=5, seconds=seconds, seed=seed, out=out, kinds=kinds)
    brief = {k: s[k] for k in ("acknowledged", "ops_by_kind", "faults", "faults_by_kind",
                               "time_to_converge_s", "png")}
    print(json.dumps(brief, indent=1))
    assert not s["violations"], json.dumps(s["violations"][:20], indent=1)
    assert not s["harness_errors"], s["harness_errors"]
    assert s["time_to_converge_s"] is not None
    need = 10_000 if seconds >= 180 else int(10_000 * seconds / 180)
    assert s["acknowledged"] >= need, f"only {s['acknowledged']} acknowledged operations"
    if seconds >= 60:
        assert set(s["faults_by_kind"]) == set(kinds or KINDS), s["faults_by_kind"]
        if "rmpeer" in s["faults_by_kind"]:
            assert any(r.get("removed") for r in s["rmpeers"]), s["rmpeers"]
