"""The simulator's per-node rates (`--measure-idle`, `--measure-fault`) and the mesh cost
model they add: what the README's projection table is made of."""

from __future__ import annotations

import json
import subprocess
import sys

from daemons import REPO

from weaveipam.mesh.frames import HEARTBEAT_BYTES
from weaveipam.sim import meshcost
from weaveipam.sim.__main__ import run


def test_sim_command_reports_idle_and_fault_rates() -> None:
    proc = subprocess.run([sys.executable, "-m", "weaveipam.sim", "--nodes", "8", "--steps",
                           "30", "--measure-idle", "10", "--measure-fault", "10"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout.splitlines()[-1])
    assert s["violations"] == 0
    r = s["rates"]
    assert r["nodes"] == 8 and r["connections_per_node"] == 7  # degree 30: a full mesh
    idle, restart, rmpeer = r["idle"], r["restart"], r["rmpeer"]
    # idle: a heartbeat per connection per heartbeat interval, plus periodic topology
    hb = r["connections_per_node"] / r["mesh"]["heartbeat"]
    assert hb < idle["mesh_msgs_per_s"] < hb + 8
    assert idle["engine_msgs_per_s"] > 0  # anti-entropy digests go on when idle
    # a kill + restart reconnects and re-floods topology; both faults cost more than idle
    assert restart["bytes_per_s"] > rmpeer["bytes_per_s"] > idle["bytes_per_s"]
    assert restart["max_bytes_per_s"] >= restart["bytes_per_s"]


def test_rates_are_deterministic_per_seed_and_grow_with_the_cluster() -> None:
    a = run(10, 3, 30, False, measure_idle=6, measure_fault=6)["rates"]
    b = run(10, 3, 30, False, measure_idle=6, measure_fault=6)["rates"]
    assert a == b
    big = run(20, 3, 30, False, measure_idle=6)["rates"]
    assert big["idle"]["mesh_bytes_per_s"] > a["idle"]["mesh_bytes_per_s"]


def test_cost_model_uses_real_frames_and_the_mesh_settings() -> None:
    s = meshcost.MeshSettings.defaults()
    assert 0 < s.heartbeat <= s.dead_timeout  # the mesh drops a peer only after several
    # one more neighbour costs one encoded Neighbour in the entry (past msgpack's small
    # array sizes, whose header is a byte shorter)
    step = meshcost.entry_bytes(21) - meshcost.entry_bytes(20)
    assert meshcost.entry_bytes(30) - meshcost.entry_bytes(20) == 10 * step > 0
    (t,) = meshcost.idle([4], 10.0, s)
    frames, nbytes = meshcost.topology_cost([4])
    beats = 4 * 10 / s.heartbeat_interval(4)
    to = s.repair_targets(4)
    assert t.msgs == beats + to * frames * 10 / s.gossip_interval
    assert t.bytes == beats * len(HEARTBEAT_BYTES) + to * nbytes * 10 / s.gossip_interval
    # where the mesh bounds them, heartbeats and repair stop growing with connections
    bounded = meshcost.MeshSettings(1.0, 5.0, 10.0, repair_fanout=1, hb_links=10)
    few, many = meshcost.idle([10, 100], 10.0, bounded)
    assert many.msgs - few.msgs < 1
    # 65 entries do not fit one topology frame
    assert meshcost.topology_cost([3] * 65)[0] == 2
