"""`python -m weaveipam.sim --nodes N --seed S [--steps K] [--faults]`

Runs N allocators over a simulated network, checks the invariants after every step, then
heals everything, stops traffic and waits for the rings to converge and every node to be
able to allocate.  Exit 0 if every invariant held; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..core.allocator import GOSSIP_FANOUT, Allocate
from .cluster import Faults, SimNode, Simulator, Violation

CONVERGE_BOUND = 120.0  # simulated seconds after the last fault heals


def run(nodes: int, seed: int, steps: int, faults: bool, *, consensus: int | None = None,
        degree: int = 30, universe: str = "10.32.0.0/12", traffic: float = 5.0,
        join: int = 0, fanout: int = GOSSIP_FANOUT,
        rmpeer_rate: float | None = None, operator_rate: float | None = None,
        reply_crash: float = 0.0, measure_idle: float = 0.0,
        measure_fault: float = 0.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    f = Faults()
    if faults:
        f = Faults(loss=0.02, dup=0.01, latency=(0.001, 0.08), partition_rate=0.02,
                   crash_rate=0.05, join_rate=0.01, rmpeer_rate=0.05, operator_rate=0.02,
                   stranger_rate=0.02, stale_removed=0.5)
        if rmpeer_rate is not None:
            f.crash_rate = f.rmpeer_rate = rmpeer_rate
        if operator_rate is not None:
            # operators act on down nodes too: crash often enough to give them some
            f.operator_rate = f.stranger_rate = operator_rate
            f.crash_rate = max(f.crash_rate, operator_rate)
        f.reply_crash = reply_crash
    sim = Simulator(nodes=nodes, seed=seed, universe=universe, consensus=consensus,
                    degree=degree, faults=f, traffic=traffic, fanout=fanout)
    summary: dict[str, Any] = {"nodes": nodes, "seed": seed, "faults": faults}
    phase = "faults"
    try:
        for _ in range(steps):
            sim.step(faults=faults, traffic=True)
        for _ in range(join):  # nodes joining an established ring, a few per step
            sim._add_node()
            sim.stats["joins"] += 1
            sim.step(faults=False, traffic=False)
        phase = "heal"
        sim._heal()
        for n in sim.nodes:
            if n.alloc is None and n.respawn_at is None:
                sim._restart(n)
        healed = sim.now

        def settled() -> bool:
            return sim.converged() and not any(n.respawn_at is not None for n in sim.nodes)

        while not settled() and sim.now - healed < CONVERGE_BOUND:
            sim.step(faults=False, traffic=False)
        converged_after = sim.now - healed
        if not settled():
            raise Violation("not-converged",
                            f"rings did not converge within {CONVERGE_BOUND:g}s of healing")
        phase = "allocate"
        # every node allocates once more; one the operator restarts meanwhile asks again
        asked: dict[int, tuple[SimNode, int]] = {}
        start = sim.now
        while sim.now - start < CONVERGE_BOUND:
            todo = [n for n in sim.nodes
                    if n.alloc is None or f"final-{n.idx}" not in n.alloc.allocs]
            if not todo:
                break
            for n in todo:
                if n.alloc is not None and not (n.idx in asked and asked[n.idx][1]
                                                 in n.inflight):
                    asked[n.idx] = (n, sim.request(n, Allocate(f"final-{n.idx}")))
            sim.step(faults=False, traffic=False)
        all_allocated_after = sim.now - healed
        failed = [n for n in sim.nodes
                  if n.alloc is None or f"final-{n.idx}" not in n.alloc.allocs]
        if failed:
            why = failed[0].alloc
            raise Violation("not-allocating", f"{len(failed)} nodes could not allocate after "
                            f"healing, e.g. {failed[0].name}: "
                            f"{why.state_text() if why else 'down'}")
        sim.check_ledger()
        summary.update(violations=0, converged_after_s=round(converged_after, 3),
                       all_allocated_after_s=round(all_allocated_after, 3))
        if measure_idle > 0 or measure_fault > 0:
            from .rates import project

            phase = "measure"
            summary["rates"] = project(sim, measure_idle, measure_fault)
            sim.check_ledger()
    except Violation as v:
        summary.update(violations=1, violation=str(v), kind=v.kind, phase=phase,
                       step=sim.steps,
                       sim_time=round(sim.now, 3), converged_after_s=None)
        print(f"INVARIANT BROKEN seed={seed} step={sim.steps} t={sim.now:.3f}s: {v}",
              file=sys.stderr)
    total_bytes = sum(n.bytes_sent for n in sim.nodes)
    summary.update(
        nodes=len(sim.nodes), steps=sim.steps, sim_seconds=round(sim.now, 3),
        allocations=sim.stats["allocations"], **{k: v for k, v in sim.stats.items()
                                                 if k != "allocations"},
        bytes_per_node=round(total_bytes / max(1, len(sim.nodes))),
        ring_entries=len(sim.live()[0].alloc.ring) if sim.live() else 0,  # type: ignore[union-attr]
        wall_s=round(time.perf_counter() - t0, 3),
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weaveipam.sim", description=__doc__)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600, help="100 ms steps of traffic/faults")
    ap.add_argument("--faults", action="store_true")
    ap.add_argument("--consensus", type=int, default=None, help="default: --nodes")
    ap.add_argument("--degree", type=int, default=30, help="max neighbours per node")
    ap.add_argument("--range", default="10.32.0.0/12")
    ap.add_argument("--traffic", type=float, default=5.0, help="requests/s per 10 nodes")
    ap.add_argument("--join", type=int, default=0, help="nodes to join after the run")
    ap.add_argument("--operators", type=float, default=None, metavar="RATE",
                    help="with --faults: operator and stranger actions per second (other "
                         "--ipalloc-init, wiped stores, reset, forged hellos); default 0.02")
    ap.add_argument("--reply-crashes", type=float, default=0.0, metavar="P",
                    help="with --faults: chance that a node crashes right after a batch "
                         "that acknowledged an allocation (default 0)")
    ap.add_argument("--measure-idle", type=float, default=0.0, metavar="SECONDS",
                    help="after the run: per-node message and byte rates over this many "
                         "quiet simulated seconds (engine simulated, mesh modelled)")
    ap.add_argument("--measure-fault", type=float, default=0.0, metavar="SECONDS",
                    help="then the same over a window from a kill + restart, and from a "
                         "kill + rmpeer")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.steps < 0:
        ap.error("--nodes must be >= 1 and --steps >= 0")
    if not 0.0 <= args.reply_crashes <= 1.0:
        ap.error(f"--reply-crashes must be a chance between 0 and 1, not {args.reply_crashes:g}")
    if args.measure_idle < 0 or args.measure_fault < 0:
        ap.error("--measure-idle and --measure-fault are seconds >= 0")
    if args.measure_fault and args.nodes + args.join < 3:
        ap.error("--measure-fault needs at least 3 nodes (one killed, one left to rmpeer it)")
    s = run(args.nodes, args.seed, args.steps, args.faults, consensus=args.consensus,
            degree=args.degree, universe=args.range, traffic=args.traffic, join=args.join,
            operator_rate=args.operators, reply_crash=args.reply_crashes,
            measure_idle=args.measure_idle, measure_fault=args.measure_fault)
    print(json.dumps(s))
    return 1 if s["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
