"""The checker: safety, durability and recovery over one run's whole record.

Answers are read as Jepsen reads them: an answer of 200/204 is a success, an answer of
4xx or 503 a refusal (nothing happened), and no answer at all (timeout, reset, refused
connection) or another 5xx is *indeterminate*: the operation may have taken effect at any
time after it was sent.

- **duplicate**: no address held by two idents at once.  An acknowledged allocate/claim
  holds its address from its answer until the first release of that ident that succeeded
  or is indeterminate (sent at t0), or until the first rmpeer request for its node's
  incarnation (its ranges may go to the heir then).  A refused release ends nothing.
- **lost**: a release answered 404 while the ident still held an acknowledged address
  (the node forgot it), and every hold never ended must be in its node's final GET /ip.
- **resurrected**: no acknowledged allocation on an incarnation after it was removed.
- **removed-node-allocated** / **probe-unanswered**: a removed node back with its old data
  must answer its probe allocation with a refusal; a probe that never got an answer
  proves nothing and is reported, never taken as a refusal.
- **restart-failed** / **unhealthy**: every restart of a fault (`up`, `old_up`,
  `fresh_up`) and every node after the final heal answers /healthz.
- **not-converged**: rings identical on every node within `limit_s` of the heal of the
  last fault.
- **cannot-allocate-at-end**, **final-duplicate**, **no-final-state**, **server-error**
  (an answered 5xx other than 503).

Operators and strangers (issue 9).  A node whose data dir or store was wiped lost its
holds: they are never expected in a final state, but stay held (no one else may hand them
out) until the operator's rmpeer of the old name; a forced reset ends its node's holds as
an rmpeer does.
- **split**: a node restarted or joining with another `--ipalloc-init` reported `split`.
- **lost-state-undetected** / **lost-state-allocated**: a node back with its store lost,
  its name kept and addresses in use became ready, or acknowledged an allocation.
- **empty-store-accepted**: a node started on a 0-byte store instead of refusing.
- **advice-failed**: doing what a stopped node advised (reset of the data dir, rmpeer of
  the old name) was refused.
- **reset-not-refused** / **reset-changed-state**: `DELETE /peer` on a node holding
  addresses went through, or the node lost an allocation it held.
- **stranger-accepted** / **stranger-disturbed**: a forged hello was not refused, or it
  left the node in `duplicate-name` or broke its link to the peer whose name it used.
- **pod-unreachable**: in the final probe a pod on one node did not answer a ping from a
  pod on another (see run.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .faults import Fault, RmpeerEvent
from .workload import Op

CONVERGE_LIMIT = 10.0
RESTARTS = ("up", "old_up", "fresh_up")  # Fault.detail keys: wait_healthy after a start


def succeeded(o: Op) -> bool:
    return o.status in (200, 204)


def indeterminate(o: Op) -> bool:
    """No answer, or a server error other than 503: it may have taken effect."""
    return o.status == -1 or (o.status >= 500 and o.status != 503)


@dataclass
class Held:
    address: str
    ident: str
    node: int
    gen: int
    start: float
    end: float      # math.inf while never released


@dataclass
class RunRecord:
    """Everything the runner saw; times are seconds since the workload started."""
    ops: list[Op]
    faults: list[Fault] = field(default_factory=list)
    rmpeers: list[RmpeerEvent] = field(default_factory=list)
    final: dict[int, dict[str, list[str]] | None] = field(default_factory=dict)
    healed_at: float = 0.0                 # the last fault healed
    converged_at: float | None = 0.0       # first time every ring was identical after it
    converge_detail: list[Any] = field(default_factory=list)
    healthy: dict[int, bool] = field(default_factory=dict)   # /healthz after the heal
    end_alloc: list[tuple[int, int, str]] = field(default_factory=list)
    limit_s: float = CONVERGE_LIMIT
    pods: list[dict[str, Any]] = field(default_factory=list)  # pod-unreachable, run.py


def intervals(ops: list[Op], rmpeers: list[RmpeerEvent]) -> list[Held]:
    ended: dict[str, float] = {}
    for o in ops:
        if o.op == "release" and (succeeded(o) or indeterminate(o)):
            ended[o.ident] = min(ended.get(o.ident, math.inf), o.t0)
    removed_at = {(r.node, r.gen): r.t for r in rmpeers}
    held = []
    for o in ops:
        if o.ok and o.op in ("allocate", "claim") and o.address:
            end = min(ended.get(o.ident, math.inf), removed_at.get((o.node, o.gen), math.inf))
            held.append(Held(o.address, o.ident, o.node, o.gen, o.t1, end))
    return held


def check(run: RunRecord) -> list[dict[str, Any]]:
    """Violations found, each with its `kind`; one per (kind, node, ident, address)."""
    held = intervals(run.ops, run.rmpeers)
    v = (_duplicates(held) + _lost(run, held) + _resurrected(run) + _faults(run)
         + _operators(run) + _recovery(run) + _final_duplicates(run) + run.pods)
    v += [{"kind": "server-error", "op": o.op, "node": o.node, "ident": o.ident,
           "answer": [o.status, o.detail], "t": round(o.t1, 3)}
          for o in run.ops if o.status >= 500 and o.status != 503]
    out, keys = [], set()
    for x in v:
        k = (x["kind"], x.get("node"), x.get("ident"), x.get("address"))
        if k not in keys:
            out.append(x)
            keys.add(k)
    return out


def _duplicates(held: list[Held]) -> list[dict[str, Any]]:
    v = []
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
    return v


def _lost(run: RunRecord, held: list[Held]) -> list[dict[str, Any]]:
    v: list[dict[str, Any]] = []
    by_ident: dict[str, list[Held]] = defaultdict(list)
    for h in held:
        by_ident[h.ident].append(h)
    for o in run.ops:
        if o.op == "release" and o.status == 404:
            for h in by_ident.get(o.ident, []):
                if h.start <= o.t0 < h.end:
                    v.append({"kind": "lost", "node": h.node, "ident": h.ident,
                              "address": h.address, "t": round(o.t1, 3),
                              "how": "release answered 404"})
    reset = {(r.node, r.gen) for r in run.rmpeers} | wiped(run)
    for h in held:
        if h.end != math.inf or (h.node, h.gen) in reset:
            continue
        owned = run.final.get(h.node)
        if owned is None:
            v.append({"kind": "no-final-state", "node": h.node})
        elif h.address not in owned.get(h.ident, []):
            v.append({"kind": "lost", "node": h.node, "ident": h.ident,
                      "address": h.address, "t": round(h.start, 3),
                      "how": "not in the node's final state"})
    return v


def wiped(run: RunRecord) -> set[tuple[int, int]]:
    """Incarnations whose state an operator fault wiped: their holds are lost on purpose."""
    return {(f.detail["wiped"][0], f.detail["wiped"][1]) for f in run.faults
            if "wiped" in f.detail}


def _refused(code: int) -> bool:
    return code == 503 or 400 <= code < 500


def _operators(run: RunRecord) -> list[dict[str, Any]]:
    v: list[dict[str, Any]] = []
    for f in run.faults:
        d, node, t = f.detail, f.nodes[0] if f.nodes else None, round(f.t1, 3)
        for key, states in d.items():
            if key.endswith("_states") and "split" in states:
                v.append({"kind": "split", "node": node, "fault": f.kind, "states": states,
                          "t": t})
        if f.kind == "wipe-store" and d.get("in_use") and "lost_gen" in d:
            if d.get("state") == "ready":
                v.append({"kind": "lost-state-undetected", "node": node, "detail": d,
                          "t": t})
            v += [{"kind": "lost-state-allocated", "node": o.node, "ident": o.ident,
                   "address": o.address, "t": round(o.t1, 3)}
                  for o in run.ops if o.ok and o.op in ("allocate", "claim")
                  and o.node == node and o.gen == d["lost_gen"]]
        if "empty_store" in d and d["empty_store"][0] in (None, 0):
            v.append({"kind": "empty-store-accepted", "node": node, "answer": d["empty_store"],
                      "t": t})
        if d.get("reset_data_dir", [0])[0] != 0 or (
                f.kind in ("wipe-data", "wipe-store")
                and _refused(d.get("rmpeer_answer", [200])[0])):
            v.append({"kind": "advice-failed", "node": node, "fault": f.kind,
                      "answer": d.get("rmpeer_answer"), "reset": d.get("reset_data_dir"),
                      "t": t})
        if f.kind == "reset" and "reset_answer" in d:
            if d["reset_answer"][0] in (200, 204):
                v.append({"kind": "reset-not-refused", "node": node,
                          "answer": d["reset_answer"], "t": t})
            addr, code, now = d["guard"]
            if code != -1 and (code, now) != (200, addr):
                v.append({"kind": "reset-changed-state", "node": node, "guard": d["guard"],
                          "t": t})
        if f.kind == "forged-hello":
            answers = d.get("answers", [])
            if any(a[1] or (a[0] is None and a[1] is not None) for a in answers):
                v.append({"kind": "stranger-accepted", "node": node, "answers": answers,
                          "t": t})
            if d.get("state") == "duplicate-name" or d.get("link_kept") is False:
                v.append({"kind": "stranger-disturbed", "node": node, "detail": d, "t": t})
    return v


def _resurrected(run: RunRecord) -> list[dict[str, Any]]:
    removed_at = {(r.node, r.gen): r.t for r in run.rmpeers}
    v = []
    for o in run.ops:
        t = removed_at.get((o.node, o.gen))
        if o.ok and o.op in ("allocate", "claim") and t is not None and o.t0 > t:
            v.append({"kind": "resurrected", "node": o.node, "ident": o.ident,
                      "address": o.address, "t": round(o.t1, 3)})
    return v


def _faults(run: RunRecord) -> list[dict[str, Any]]:
    v: list[dict[str, Any]] = []
    for f in run.faults:
        for key in RESTARTS:
            if f.detail.get(key) is False:
                v.append({"kind": "restart-failed", "node": f.nodes[0], "fault": f.kind,
                          "restart": key, "t": round(f.t1, 3)})
        if f.kind != "rmpeer" or not f.detail.get("removed"):
            continue
        answers = f.detail.get("probe", [])
        answered = [a for a in answers if a[0] != -1]
        if any(code == 200 for code, _ in answered):
            v.append({"kind": "removed-node-allocated", "node": f.nodes[0], "answer": answers,
                      "t": round(f.t1, 3)})
        elif not answered or not 400 <= answered[-1][0] < 600:
            v.append({"kind": "probe-unanswered", "node": f.nodes[0], "answer": answers,
                      "t": round(f.t1, 3)})
    return v


def _recovery(run: RunRecord) -> list[dict[str, Any]]:
    v: list[dict[str, Any]] = []
    took = None if run.converged_at is None else run.converged_at - run.healed_at
    if took is None or took > run.limit_s:
        v.append({"kind": "not-converged", "limit_s": run.limit_s,
                  "took_s": None if took is None else round(took, 3),
                  "entries": run.converge_detail, "t": round(run.healed_at, 3)})
    v += [{"kind": "unhealthy", "node": i} for i, ok in sorted(run.healthy.items()) if not ok]
    v += [{"kind": "cannot-allocate-at-end", "node": i, "answer": [code, body]}
          for i, code, body in run.end_alloc if code != 200]
    return v


def _final_duplicates(run: RunRecord) -> list[dict[str, Any]]:
    v: list[dict[str, Any]] = []
    seen: dict[str, tuple[int, str]] = {}
    for node, owned in run.final.items():
        for ident, addrs in (owned or {}).items():
            for a in addrs:
                if a in seen and seen[a] != (node, ident):
                    v.append({"kind": "final-duplicate", "address": a,
                              "holders": [list(seen[a]), [node, ident]]})
                seen[a] = (node, ident)
    return v
