"""Per-node message and byte rates of a settled simulated cluster: idle and around faults.

The engine's messages are the simulator's own (each delivery attempt counted, a broadcast
once per target); the mesh's heartbeats, topology gossip and handshakes come from the
cost model in `meshcost`, on the simulator's connection graph.  A window runs without
client traffic, so what is measured is what the cluster costs by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import mean
from typing import Any

from .cluster import SimNode, Simulator


def _degrees(sim: Simulator) -> dict[int, int]:
    up = {n.idx for n in sim.live()}
    return {n.idx: len(n.neighbours & up) for n in sim.live()}


def _window(sim: Simulator, seconds: float, actions: dict[int, Callable[[], None]]
            ) -> list[tuple[int, int]]:
    """Step through `seconds` (running each action at its step); each node's (messages,
    bytes) sent meanwhile."""
    before = [(n.msgs_out, n.bytes_out) for n in sim.nodes]
    for step in range(round(seconds / sim.tick_s)):
        if step in actions:
            actions[step]()
        sim.step(faults=False, traffic=False)
    return [(n.msgs_out - m, n.bytes_out - b) for n, (m, b) in zip(sim.nodes, before,
                                                                   strict=False)]


def _summary(sim: Simulator, seconds: float, engine: list[tuple[int, int]],
             mesh: dict[int, Any]) -> dict[str, Any]:
    from . import meshcost

    rows = []
    for n in sim.nodes:
        if n.idx >= len(engine):
            continue
        em, sent = engine[n.idx]
        eb = sent + meshcost.wrap(em)
        t = mesh.get(n.idx)
        mm, mb = (t.msgs, t.bytes) if t is not None else (0.0, 0.0)
        rows.append((em / seconds, eb / seconds, mm / seconds, mb / seconds))
    return {
        "engine_msgs_per_s": round(mean(r[0] for r in rows), 2),
        "engine_bytes_per_s": round(mean(r[1] for r in rows)),
        "mesh_msgs_per_s": round(mean(r[2] for r in rows), 2),
        "mesh_bytes_per_s": round(mean(r[3] for r in rows)),
        "msgs_per_s": round(mean(r[0] + r[2] for r in rows), 2),
        "bytes_per_s": round(mean(r[1] + r[3] for r in rows)),
        "max_bytes_per_s": round(max(r[1] + r[3] for r in rows)),
    }


def _add(total: dict[int, Any], more: dict[int, Any]) -> None:
    for i, t in more.items():
        total[i].add(t.msgs, t.bytes)


def project(sim: Simulator, idle_s: float, fault_s: float) -> dict[str, Any]:
    """Rates per node: idle (after as long again to settle), then around a kill +
    restart one second later, then around a kill + rmpeer (from one or two live peers)
    one second later; each fault's window starts at the kill."""
    from . import meshcost

    settings = meshcost.MeshSettings.defaults()
    deg = _degrees(sim)
    order = sorted(deg)
    out: dict[str, Any] = {
        "nodes": len(sim.live()), "connections_per_node": round(mean(deg.values()), 1),
        "mesh": {"heartbeat": settings.heartbeat, "gossip_interval": settings.gossip_interval,
                 "repair_fanout": settings.repair_fanout, "hb_links": settings.hb_links},
    }

    def baseline(seconds: float) -> dict[int, Any]:
        per = meshcost.idle([deg[i] for i in order], seconds, settings)
        return dict(zip(order, per, strict=True))

    if idle_s > 0:
        _window(sim, idle_s, {})  # the tail of the run's last allocations settles first
        out["idle"] = _summary(sim, idle_s, _window(sim, idle_s, {}), baseline(idle_s))
    if fault_s <= 0:
        return out
    one = round(1.0 / sim.tick_s)
    victims = [n for n in sim.live() if n.idx != 0]

    def changed_flood(mesh: dict[int, Any], victim: SimNode, up: bool) -> None:
        nbrs = [j for j in victim.neighbours if j in deg]
        after = [deg[j] + (0 if up else -1) for j in nbrs] + ([deg[victim.idx]] if up else [])
        _add(mesh, dict(zip(order, meshcost.flood([deg[i] for i in order], after),
                            strict=True)))

    # a kill, and the same process back a second later
    victim = victims[len(victims) // 2]
    mesh = baseline(fault_s)
    changed_flood(mesh, victim, up=False)
    for j in victim.neighbours:
        if j in deg:
            _add(mesh, meshcost.connect([deg[i] for i in order], victim.idx, j))
    changed_flood(mesh, victim, up=True)
    engine = _window(sim, fault_s, {0: lambda: sim._crash(victim),
                                    one: lambda: sim._restart(victim)})
    out["restart"] = _summary(sim, fault_s, engine, mesh)

    # a kill, and its rmpeer from one live peer a second later
    victim = victims[-1]
    mesh = baseline(fault_s)
    changed_flood(mesh, victim, up=False)
    engine = _window(sim, fault_s, {0: lambda: sim._crash(victim),
                                    one: lambda: sim._rmpeer(victim)})
    out["rmpeer"] = _summary(sim, fault_s, engine, mesh)
    return out
