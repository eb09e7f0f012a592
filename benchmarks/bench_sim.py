"""Scale in the simulator (wall time of the real engine code; figures go in the README).

- 100 nodes, consensus=100, partial mesh of at most 30 neighbours: consensus and an
  allocation on every node.
- 1,000 nodes joining a ring seeded by 3 (one join per 100 ms step), then an allocation on
  every node.
"""

from __future__ import annotations

import json
import sys

from weaveipam.sim.__main__ import run


def main() -> None:
    which = sys.argv[1:] or ["consensus100", "join1000"]
    out = {}
    if "consensus100" in which:
        s = run(100, 1, 0, False, consensus=100, degree=30)
        out["consensus100"] = {k: s[k] for k in ("violations", "wall_s", "sim_seconds",
                                                 "all_allocated_after_s", "bytes_per_node",
                                                 "messages")}
    if "join1000" in which:
        s = run(3, 1, 20, False, consensus=3, join=997, degree=30)
        out["join1000"] = {k: s[k] for k in ("violations", "wall_s", "sim_seconds",
                                             "all_allocated_after_s", "bytes_per_node",
                                             "messages", "ring_entries")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
