"""Projected per-node message and byte rates at 100, 500 and 1,000 nodes, from the simulator.

Each cluster is built as in `bench_sim.py`'s join run (a ring seeded by consensus among 3,
then one node joining per 100 ms step, at most `--degree` connections each, then every
node allocates), and then measured without client traffic: idle, around a kill and
restart, and around a kill and rmpeer (`python -m weaveipam.sim --measure-idle
--measure-fault`).  The engine's messages are simulated; the mesh's heartbeats, topology
gossip and handshakes are the cost model of `weaveipam/sim/meshcost.py`, with the mesh's
own settings.

    python3 benchmarks/bench_sim_scale.py [--nodes 100,500,1000] [--window 30] [--degree 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weaveipam.sim.__main__ import run  # noqa: E402


def kb(x: float) -> str:
    return f"{x / 1000:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="100,500,1000")
    ap.add_argument("--window", type=float, default=30.0, help="simulated seconds per window")
    ap.add_argument("--degree", type=int, default=30, help="connections per node at most")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.nodes.split(",") if x):
        s = run(3, args.seed, 20, False, consensus=3, join=n - 3, degree=args.degree,
                measure_idle=args.window, measure_fault=args.window)
        if s["violations"]:
            raise SystemExit(f"{n} nodes: {s.get('violation')}")
        print(json.dumps({"nodes": n, "wall_s": s["wall_s"], **s["rates"]}), flush=True)
        rows.append(s["rates"])
    print(f"{'nodes':>5} {'conns':>5} | {'window':<8} {'msgs/s':>7} {'KB/s':>7} "
          f"{'engine KB/s':>11} {'mesh KB/s':>9} {'max KB/s':>8}")
    for r in rows:
        for w in ("idle", "restart", "rmpeer"):
            x = r[w]
            print(f"{r['nodes']:>5} {r['connections_per_node']:>5} | {w:<8} "
                  f"{x['msgs_per_s']:>7.1f} {kb(x['bytes_per_s']):>7} "
                  f"{kb(x['engine_bytes_per_s']):>11} {kb(x['mesh_bytes_per_s']):>9} "
                  f"{kb(x['max_bytes_per_s']):>8}")
    print(f"per node, means over all nodes (max: the busiest node), {args.window:g} s windows "
          "starting at the kill; mesh: heartbeat and topology model")


if __name__ == "__main__":
    main()
