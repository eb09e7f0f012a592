"""The chaos run: 5 daemons in network namespaces, a concurrent allocate/claim/release
workload on every node, and faults combined at random from a seed (SIGKILL + restart,
SIGSTOP/SIGCONT, packet loss, partitions, rmpeer of a killed node and its return with its
old data; operators and strangers: a restart with another --ipalloc-init, the data dir or
the store lost, reset refused and forced, forged hellos).  At the end a pod on every node
pings every pod on the others (tests/cluster/pods.py).  The checker must find no violation
(see tests/cluster/checker.py).

WEAVEIPAM_CHAOS_SECONDS (default 180) is how long faults are injected; WEAVEIPAM_CHAOS_SEED
(default 1) picks the faults; WEAVEIPAM_CHAOS_FAULTS (comma-separated, default all of
kill,pause,loss,partition,rmpeer,init,wipe-data,wipe-store,reset,reset-force,forged-hello)
limits their kinds; WEAVEIPAM_CHAOS_OUT keeps
summary.json, history.jsonl, faults.json and timeline.png there (default: pytest's
tmp_path).  `make chaos` runs longer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from capability import missing
from cluster.faults import KINDS
from cluster.harness import netns_unavailable
from cluster.pods import pods_unavailable
from cluster.run import run_chaos

pytestmark = pytest.mark.slow


def test_chaos_cluster(tmp_path: Path) -> None:
    why = netns_unavailable()
    if why:
        missing(f"chaos cluster: {why}")
    why = pods_unavailable()
    if why:
        missing(f"chaos cluster's pod-to-pod probe: {why}")
    seconds = float(os.environ.get("WEAVEIPAM_CHAOS_SECONDS", "180"))
    seed = int(os.environ.get("WEAVEIPAM_CHAOS_SEED", "1"))
    out = Path(os.environ.get("WEAVEIPAM_CHAOS_OUT") or tmp_path / "chaos")
    kinds = [k for k in os.environ.get("WEAVEIPAM_CHAOS_FAULTS", "").split(",") if k] or None
    s = run_chaos(nodes=5, seconds=seconds, seed=seed, out=out, kinds=kinds)
    brief = {k: s[k] for k in ("acknowledged", "ops_by_kind", "faults", "faults_by_kind",
                               "time_to_converge_s", "pod_probe", "png")}
    print(json.dumps(brief, indent=1))
    assert not s["violations"], json.dumps(s["violations"][:20], indent=1)
    assert not s["harness_errors"], s["harness_errors"]
    assert s["time_to_converge_s"] is not None
    assert set(s["pod_probe"]["pods"]) == set(range(5)), s["pod_probe"]
    # the history is not empty: every node acknowledged every kind of operation (how many
    # per second is a figure in summary.json and the README, not a pass/fail bound)
    for node, by_kind in s["acknowledged_by_node"].items():
        assert set(by_kind) == {"allocate", "claim", "release"}, (node, by_kind)
    chosen = kinds or list(KINDS)
    if seconds >= 15 * len(chosen):  # every kind runs once first: 80 to 120 s for all 11
        assert set(s["faults_by_kind"]) == set(chosen), s["faults_by_kind"]
        if "rmpeer" in s["faults_by_kind"]:
            assert any(r.get("removed") for r in s["rmpeers"]), s["rmpeers"]
