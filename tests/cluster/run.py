"""One chaos run: cluster up, workload + faults for `seconds`, heal, converge, check, plot.

`python -m tests.cluster.run --seconds 30 --out /tmp/chaos` runs one from the repo root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .checker import CONVERGE_LIMIT, RunRecord, check
from .client import NodeClient, own_share, ring_signature
from .faults import FaultInjector, wait_healthy
from .harness import ChaosCluster
from .plot import timeline
from .pods import probe
from .workload import History, Workload


async def monitor(clients: list[NodeClient], h: History, shares: list[tuple[float, int, float]],
                  stop: asyncio.Event) -> None:
    while not stop.is_set():
        reps = await asyncio.gather(*(c.report(1.0) for c in clients))
        for c, rep in zip(clients, reps, strict=True):
            if rep is not None and rep.get("entries"):
                shares.append((h.now(), c.node.idx, own_share(rep)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def converge(clients: list[NodeClient], h: History, until: float
                   ) -> tuple[float | None, list[Any]]:
    """The run time at which every node was seen reporting the same ring (None if not by
    `until`), and the ring sizes last seen when not."""
    sigs: list[Any] = []
    while h.now() < until:
        reps = await asyncio.gather(*(c.report(2.0) for c in clients))
        sigs = [ring_signature(r) if r else None for r in reps]
        if all(s is not None for s in sigs) and len(set(sigs)) == 1:
            return h.now(), []
        await asyncio.sleep(0.2)
    return None, [len(s) if s else None for s in sigs]


async def _run(cl: ChaosCluster, seconds: float, seed: int, workers: int,
               out: Path, kinds: list[str] | None, pods: bool) -> dict[str, Any]:
    h = History()
    clients = [NodeClient(n) for n in cl.nodes]
    try:
        for n in cl.nodes:
            n.start()
        for c in clients:
            assert await wait_healthy(c, 60), f"node{c.node.idx} down:\n{c.node.log_tail()}"
        t_ready0 = time.monotonic()
        deadline = t_ready0 + 60
        while time.monotonic() < deadline:
            codes = await asyncio.gather(*(c.call("GET", "/readyz", 2.0) for c in clients))
            if all(code == 200 for code, _ in codes):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"cluster not ready: {codes}")
        ready_s = time.monotonic() - t_ready0
        h.t_start = time.monotonic()
        shares: list[tuple[float, int, float]] = []
        stop_mon = asyncio.Event()
        mon = asyncio.create_task(monitor(clients, h, shares, stop_mon))
        wl = Workload(clients, h, seed, workers_per_node=workers)
        fi = FaultInjector(clients, h, seed + 1, kinds=kinds)
        fi.workload = wl
        wl_task = asyncio.create_task(wl.run())
        try:
            await fi.run(seconds)
        finally:
            # heal everything that might be left (a lane's finally already did, normally)
            for c in clients:
                c.node.signal(signal.SIGCONT)
                for chain in ("WICPART", "WICLOSS"):
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(c.node.ipt, "-F", chain)
            wl.stop()
        # convergence is timed from the heal of the last fault, while the workload drains;
        # watched for a while past the limit so a miss says by how much
        healed_at = max((f.t1 for f in fi.faults), default=h.now())
        conv = asyncio.create_task(converge(clients, h, healed_at + 3 * CONVERGE_LIMIT))
        await wl_task
        t_end = h.now()
        for c in clients:
            if not c.node.running():
                c.node.start()
        healthy = await asyncio.gather(*(wait_healthy(c) for c in clients))
        converged_at, conv_detail = await conv
        stop_mon.set()
        await mon
        finals = await asyncio.gather(*(c.owned() for c in clients))
        final = {c.node.idx: f for c, f in zip(clients, finals, strict=True)}
        # every node allocates again
        end_alloc: list[tuple[int, int, str]] = []
        for c in clients:
            code, body = await c.call("POST", f"/ip/wic-final-{c.node.idx}", 15.0)
            end_alloc.append((c.node.idx, code, body.strip()[:120]))
        # pods on different nodes reach each other (issue 16)
        unreachable, pod_summary = (await asyncio.to_thread(probe, cl.nodes) if pods
                                    else ([], {}))
        record = RunRecord(
            h.ops, fi.faults, fi.rmpeers, final, healed_at, converged_at, conv_detail,
            {c.node.idx: ok for c, ok in zip(clients, healthy, strict=True)}, end_alloc,
            pods=unreachable)
        violations = check(record)
        acked = [o for o in h.ops if o.ok]
        lat = sorted(o.latency for o in acked)
        summary: dict[str, Any] = {
            "nodes": len(cl.nodes), "seed": seed, "fault_seconds": seconds,
            "fault_kinds": list(fi.kinds),
            "workers_per_node": workers, "ready_s": round(ready_s, 3),
            "ops": len(h.ops), "acknowledged": len(acked),
            "ops_by_kind": dict(Counter(o.op for o in acked)),
            "acknowledged_by_node": {n.idx: dict(Counter(o.op for o in acked if o.node == n.idx))
                                     for n in cl.nodes},
            "failed_by_kind": dict(Counter(o.op for o in h.ops if not o.ok)),
            "acknowledged_per_s": round(len(acked) / max(t_end, 1e-9), 1),
            "latency_ms": {"p50": round(1000 * lat[len(lat) // 2], 2) if lat else None,
                           "p99": round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None},
            "faults": len(fi.faults),
            "faults_by_kind": dict(Counter(f.kind for f in fi.faults)),
            "rmpeers": [f.detail for f in fi.faults if f.kind == "rmpeer"],
            "harness_errors": fi.errors,
            "time_to_converge_s": (None if converged_at is None
                                   else round(converged_at - healed_at, 3)),
            "end_allocations": end_alloc,
            "pod_probe": pod_summary,
            "violations": violations,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        with open(out / "history.jsonl", "w") as fh:
            for o in h.ops:
                fh.write(json.dumps(o.to_json()) + "\n")
        (out / "faults.json").write_text(json.dumps([f.to_json() for f in fi.faults],
                                                    indent=1) + "\n")
        timeline(out / "timeline.png", h.ops, fi.faults, shares, len(cl.nodes), healed_at,
                 f"weaveipam chaos: {len(cl.nodes)} nodes, seed {seed}, {seconds:.0f} s of "
                 f"faults, {len(acked)} acknowledged ops, {len(fi.faults)} faults, "
                 f"{len(violations)} violations",
                 marks=[float(x["t"]) for x in violations if "t" in x])
        summary["png"] = str(out / "timeline.png")
        return summary
    finally:
        for c in clients:
            await c.close()


def run_chaos(nodes: int = 5, seconds: float = 180.0, seed: int = 1, workers: int = 4,
              out: Path | None = None, keep: bool = False,
              kinds: list[str] | None = None, pods: bool = True) -> dict[str, Any]:
    """Runs everything and removes every namespace, link and process it made; `kinds`
    limits the faults (default: all of faults.KINDS); `pods`: the final pod-to-pod probe
    (pods.py)."""
    root = Path(tempfile.mkdtemp(prefix="wic-"))
    out = out or root / "out"
    cl = ChaosCluster(nodes, root)
    try:
        cl.setup()
        summary = asyncio.run(_run(cl, seconds, seed, workers, out, kinds, pods))
        summary["logs"] = str(root) if keep else None
        return summary
    finally:
        cl.close()
        if not keep:
            if out.is_relative_to(root):
                for p in root.iterdir():
                    if not out.is_relative_to(p):
                        shutil.rmtree(p, ignore_errors=True)
            else:
                shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the nodes' data dirs and logs")
    ap.add_argument("--faults", default="", help="comma-separated fault kinds (default all)")
    ap.add_argument("--no-pods", action="store_true", help="skip the pod-to-pod probe")
    a = ap.parse_args()
    kinds = [k for k in a.faults.split(",") if k] or None
    s = run_chaos(a.nodes, a.seconds, a.seed, a.workers, a.out, a.keep, kinds, not a.no_pods)
    print(json.dumps(s, indent=1))
    return 1 if s["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
