"""The checker: safety and durability over the recorded history and the final states.

- no address held by two idents at once: an acknowledged allocate/claim holds its address
  from its answer until the first release request for that ident was sent, or until the
  first rmpeer request for its node's incarnation (its ranges may go to the heir then);
- no acknowledged allocation on an incarnation after it was removed (no resurrection);
- no acknowledged allocation lost: every one never released (nor rmpeer'd) is in its node's
  final GET /ip;
- the final states hold no address twice;
- rings identical on every node within the limit after the last fault healed, and every
  node allocates at the end (both measured by the runner and passed in).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .faults import RmpeerEvent
from .workload import Op


@dataclass
class Held:
    address: str
    ident: str
    node: int
    gen: int
    start: float
    end: float      # math.inf while never released


def intervals(ops: list[Op], rmpeers: list[RmpeerEvent]) -> list[Held]:
    first_release: dict[str, float] = {}
    for o in ops:
        if o.op == "release":
            first_release[o.ident] = min(first_release.get(o.ident, math.inf), o.t0)
    removed_at = {(r.node, r.gen): r.t for r in rmpeers}
    held = []
    for o in ops:
        if o.ok and o.op in ("allocate", "claim") and o.address:
            end = min(first_release.get(o.ident, math.inf),
                      removed_at.get((o.node, o.gen), math.inf))
            held.append(Held(o.address, o.ident, o.node, o.gen, o.t1, end))
    return held


def check(ops: list[Op], rmpeers: list[RmpeerEvent],
          final: dict[int, dict[str, list[str]] | None],
          reset_nodes: set[tuple[int, int]]) -> list[dict[str, Any]]:
    """Violations found; `final` is node -> ident -> addresses (None: no answer);
    `reset_nodes` are (node, gen) incarnations wiped after rmpeer."""
    v: list[dict[str, Any]] = []
    held = intervals(ops, rmpeers)
    by_addr: dict[str, list[Held]] = defaultdict(list)
    for h in held:
        by_addr[h.address].append(h)
    for addr, hs in by_addr.items():
        hs.sort(key=lambda h: h.start)
        cur = hs[0]
        for h in hs[1:]:
            if h.start < cur.end:
                v.append({"kind": "duplicate", "address": addr,
                          "first": [cur.ident, cur.node, round(cur.start, 3)],
                          "second": [h.ident, h.node, round(h.start, 3)],
                          "t": round(h.start, 3)})
            if h.end > cur.end:
                cur = h
    removed_at = {(r.node, r.gen): r.t for r in rmpeers}
    for o in ops:
        t = removed_at.get((o.node, o.gen))
        if o.ok and o.op in ("allocate", "claim") and t is not None and o.t0 > t:
            v.append({"kind": "resurrected", "node": o.node, "ident": o.ident,
                      "address": o.address, "t": round(o.t1, 3)})
    for h in held:
        if h.end != math.inf or (h.node, h.gen) in reset_nodes:
            continue
        owned = final.get(h.node)
        if owned is None:
            v.append({"kind": "no-final-state", "node": h.node})
            continue
        if h.address not in owned.get(h.ident, []):
            v.append({"kind": "lost", "node": h.node, "ident": h.ident,
                      "address": h.address, "t": round(h.start, 3)})
    seen: dict[str, tuple[int, str]] = {}
    for node, owned in final.items():
        for ident, addrs in (owned or {}).items():
            for a in addrs:
                if a in seen and seen[a] != (node, ident):
                    v.append({"kind": "final-duplicate", "address": a,
                              "holders": [list(seen[a]), [node, ident]]})
                seen[a] = (node, ident)
    # one violation per node for 'no-final-state'
    out, keys = [], set()
    for x in v:
        k = (x["kind"], x.get("node")) if x["kind"] == "no-final-state" else None
        if k is None or k not in keys:
            out.append(x)
            if k is not None:
                keys.add(k)
    return out
