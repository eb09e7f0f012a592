"""Faults combined at random from a seed: SIGKILL + restart, SIGSTOP/SIGCONT, packet loss,
partitions, rmpeer of a killed node and its return with its old data (then a fresh reset),
CPU starvation (every daemon in a cgroup with a small CPU quota, or one daemon stopped for
longer than the heartbeat deadlines).

Two fault lanes run at once; a fault holds the nodes it touches, partitions and rmpeer hold
the topology, and rmpeer holds the whole cluster, so no two faults fight over one node.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import secrets
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .client import NodeClient
from .harness import ChaosNode, sh
from .workload import History

KINDS = {"kill": 3, "pause": 3, "loss": 2, "partition": 3, "rmpeer": 2, "starve": 2}
PROBE_TRIES = 3


@dataclass
class Fault:
    kind: str
    nodes: list[int]
    t0: float
    t1: float = -1.0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RmpeerEvent:
    node: int
    gen: int
    name: str
    t: float           # first rmpeer request sent: the node's allocations end here


async def ipt(node: ChaosNode, *args: str) -> None:
    await asyncio.to_thread(sh, "ip", "netns", "exec", node.ns, "iptables", "-w", *args)


async def wait_healthy(c: NodeClient, timeout: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if not c.node.running():
            return False
        if (await c.call("GET", "/healthz", 1.0))[0] == 200:
            return True
        await asyncio.sleep(0.1)
    return False


class FaultInjector:
    def __init__(self, clients: list[NodeClient], history: History, seed: int,
                 lanes: int = 2, kinds: list[str] | None = None) -> None:
        unknown = set(kinds or []) - set(KINDS)
        assert not unknown, f"unknown fault kinds {sorted(unknown)}: choose from {list(KINDS)}"
        self.kinds = {k: w for k, w in KINDS.items() if not kinds or k in kinds}
        self.clients = clients
        self.h = history
        self.rng = random.Random(seed)
        self.lanes = lanes
        self.faults: list[Fault] = []
        self.rmpeers: list[RmpeerEvent] = []
        self.busy: set[int] = set()
        self.topo = False
        self.exclusive = False
        self.draining = False
        self.cond = asyncio.Condition()
        self.errors: list[str] = []

    @property
    def n(self) -> int:
        return len(self.clients)

    async def run(self, seconds: float) -> None:
        end = self.h.now() + seconds
        first = list(self.kinds)
        self.rng.shuffle(first)
        await asyncio.gather(*(self._lane(end, random.Random(self.rng.random()),
                                          first if i == 0 else [])
                               for i in range(self.lanes)))

    async def _lane(self, end: float, rng: random.Random, first: list[str]) -> None:
        """Random faults until `end`; `first` are kinds to run before anything else (so a
        run covers every kind), each retried until it could run."""
        kinds, weights = zip(*self.kinds.items(), strict=True)
        while self.h.now() < end:
            await asyncio.sleep(rng.uniform(0.3, 2.0))
            kind = first[0] if first else rng.choices(kinds, weights)[0]
            try:
                if await self._inject(kind, rng, end) and first:
                    first.pop(0)
            except Exception as e:  # a harness failure must not stop the other lane
                self.errors.append(f"{kind}: {type(e).__name__}: {e}")
                if first:
                    first.pop(0)

    async def _acquire(self, kind: str, rng: random.Random) -> list[int] | None:
        """Nodes for `kind` (marked busy), or None if it cannot run now."""
        async with self.cond:
            if self.exclusive or (self.draining and kind != "rmpeer"):
                return None
            if kind == "partition":
                if self.topo:
                    return None
                self.topo = True
                return []
            free = [i for i in range(self.n) if i not in self.busy]
            if kind == "rmpeer":
                if self.topo or len(free) < self.n:
                    self.draining = True  # no new faults until this one could start
                    return None
                self.topo = self.exclusive = True
                self.draining = False
                pick = [rng.randrange(self.n)]
            else:
                # keep a majority of processes alive, so the workload keeps going
                if not free or (kind in ("kill", "pause", "starve") and len(self.busy) >= 1):
                    return None
                pick = [rng.choice(free)]
            self.busy.update(pick)
            return pick

    async def _release(self, kind: str, nodes: list[int]) -> None:
        async with self.cond:
            self.busy.difference_update(nodes)
            if kind in ("partition", "rmpeer"):
                self.topo = False
            if kind == "rmpeer":
                self.exclusive = False

    async def _inject(self, kind: str, rng: random.Random, end: float) -> bool:
        nodes = await self._acquire(kind, rng)
        if nodes is None:
            return False
        f = Fault(kind, nodes, self.h.now())
        self.faults.append(f)
        try:
            if kind == "kill":
                await self._kill(f, rng)
            elif kind == "pause":
                await self._pause(f, rng)
            elif kind == "loss":
                await self._loss(f, rng)
            elif kind == "partition":
                await self._partition(f, rng)
            elif kind == "rmpeer":
                await self._rmpeer(f, rng)
            elif kind == "starve":
                await starve(self.clients, f, rng)
        finally:
            f.t1 = self.h.now()
            await self._release(kind, nodes)
        return True

    async def _kill(self, f: Fault, rng: random.Random) -> None:
        c = self.clients[f.nodes[0]]
        c.node.signal(signal.SIGKILL)
        await asyncio.to_thread(c.node.kill)
        await asyncio.sleep(rng.uniform(1.0, 5.0))
        c.node.start()
        f.detail["up"] = await wait_healthy(c)

    async def _pause(self, f: Fault, rng: random.Random) -> None:
        node = self.clients[f.nodes[0]].node
        node.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(rng.uniform(1.0, 4.0))
        finally:
            node.signal(signal.SIGCONT)

    async def _loss(self, f: Fault, rng: random.Random) -> None:
        node = self.clients[f.nodes[0]].node
        p = rng.choice([0.05, 0.1, 0.2])
        f.detail["probability"] = p
        await ipt(node, "-A", "WICLOSS", "-m", "statistic", "--mode", "random",
                  "--probability", str(p), "-j", "DROP")
        try:
            await asyncio.sleep(rng.uniform(3.0, 10.0))
        finally:
            await ipt(node, "-F", "WICLOSS")

    async def _partition(self, f: Fault, rng: random.Random) -> None:
        size = rng.randint(1, max(1, (self.n - 1) // 2))
        a = sorted(rng.sample(range(self.n), size))
        b = [i for i in range(self.n) if i not in a]
        f.nodes = a
        f.detail["groups"] = [a, b]
        try:
            for side, other in ((a, b), (b, a)):
                for i in side:
                    for j in other:
                        await ipt(self.clients[i].node, "-A", "WICPART", "-s",
                                  self.clients[j].node.addr, "-j", "DROP")
            await asyncio.sleep(rng.uniform(3.0, 10.0))
        finally:
            for c in self.clients:
                await ipt(c.node, "-F", "WICPART")

    async def _rmpeer(self, f: Fault, rng: random.Random) -> None:
        x = self.clients[f.nodes[0]]
        others = [c for c in self.clients if c is not x]
        name, gen = x.node.name, x.node.gen
        f.detail["name"] = name
        await asyncio.to_thread(x.node.kill)
        # wait until a live peer sees it gone (rmpeer of a reachable peer is refused)
        asker = rng.choice(others)
        t_first = -1.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        answer: tuple[int, str] = (-1, "not tried")
        while loop.time() < deadline:
            if t_first < 0:
                rep = await asker.report()
                if rep is None or any(p["name"] == name and p["reachable"]
                                      for p in rep["peers"]):
                    await asyncio.sleep(0.3)
                    continue
                t_first = self.h.now()
            answer = await asker.call("DELETE", f"/peer/{name}", 10.0)
            if answer[0] == 200:
                break
            await asyncio.sleep(0.5)
        if t_first < 0:  # never seen as unreachable: cannot happen unless the mesh is stuck
            t_first = self.h.now()
        f.detail["rmpeer_answer"] = [answer[0], answer[1].strip()[:120]]
        f.detail["asker"] = asker.node.idx
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        x.node.start()  # with its old data dir: it must see that it was removed
        f.detail["old_up"] = await wait_healthy(x)
        state = ""
        deadline = loop.time() + (15.0 if answer[0] == 200 else 5.0)
        while loop.time() < deadline:
            rep = await x.report()
            state = rep["state"] if rep else ""
            if state == "removed":
                break
            await asyncio.sleep(0.3)
        removed = answer[0] == 200 or state == "removed"
        f.detail["returned_state"] = state
        f.detail["removed"] = removed
        if not removed:  # rmpeer never took effect: this was only a kill and restart
            return
        # its ranges may have gone to the heir from the first request on
        self.rmpeers.append(RmpeerEvent(x.node.idx, gen, name, t_first))
        # it must refuse to allocate; only an answer proves that (a timeout proves
        # nothing), so an unanswered probe is retried and, if never answered, reported
        probe: list[list[Any]] = []
        for _ in range(PROBE_TRIES):
            code, body = await x.call("POST", "/ip/wic-probe-removed", 5.0)
            probe.append([code, body.strip()[:160]])
            if code != -1:
                break
            await asyncio.sleep(1.0)
        f.detail["probe"] = probe
        # reset: forget the old state and start fresh under a new name
        await asyncio.to_thread(x.node.kill)
        await asyncio.to_thread(x.node.wipe)
        x.node.start()
        f.detail["fresh_up"] = await wait_healthy(x)
        f.detail["new_name"] = x.node.name


# ---- CPU starvation ------------------------------------------------------------------------

STARVE_QUOTA = 0.1   # of one CPU, for all daemons together, while a cgroup starves them
STARVE_STOP = (6.0, 9.0)  # seconds one daemon is stopped: beyond the 5 s of dead_timeout


def cpu_cgroup() -> tuple[Path, int] | str:
    """A writable cgroup hierarchy with the cpu controller, as (mount point, version),
    or why there is none.  cgroup v2 only where ``cpu`` is already delegated below the
    root: enabling it there would change the machine for everyone."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as e:
        return f"cannot read /proc/self/mountinfo: {e}"
    why = "no cgroup hierarchy with the cpu controller is mounted"
    for line in lines:
        parts = line.split()
        sep = parts.index("-")
        fstype, mnt, opts = parts[sep + 1], Path(parts[4]), parts[sep + 3].split(",")
        if fstype == "cgroup" and "cpu" in opts:
            version = 1
        elif fstype == "cgroup2":
            try:
                delegated = (mnt / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if "cpu" not in delegated:
                why = f"cgroup v2 at {mnt} does not delegate the cpu controller"
                continue
            version = 2
        else:
            continue
        if not os.access(mnt, os.W_OK):
            why = f"{mnt} is not writable (needs root)"
            continue
        return mnt, version
    return why


class CpuQuota:
    """A cgroup of our own (``wic-starve-<random>``) with a CPU quota; ``leave`` moves
    every process back where it was and removes the cgroup, also at exit if a run dies."""

    def __init__(self, mnt: Path, version: int, quota: float) -> None:
        self.mnt, self.version = mnt, version
        self.path = mnt / f"wic-starve-{secrets.token_hex(4)}"
        self.home: dict[int, Path] = {}
        self.path.mkdir()
        atexit.register(self.leave)
        period = 100_000
        if version == 2:
            (self.path / "cpu.max").write_text(f"{int(quota * period)} {period}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(quota * period)))

    def _own(self, pid: int) -> Path:
        """The cgroup of ``pid`` in this hierarchy (v1: the line naming ``cpu``)."""
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, ctrls, rel = line.split(":", 2)
            if (self.version == 2 and ctrls == "") or \
                    (self.version == 1 and "cpu" in ctrls.split(",")):
                return self.mnt / rel.lstrip("/")
        return self.mnt

    def enter(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            self.home[pid] = self._own(pid)
            (self.path / "cgroup.procs").write_text(str(pid))

    def leave(self) -> None:
        for pid, home in list(self.home.items()):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError, OSError):
                (home / "cgroup.procs").write_text(str(pid))
            del self.home[pid]
        with contextlib.suppress(FileNotFoundError, OSError):
            for stray in (self.path / "cgroup.procs").read_text().split():
                # a process that started in here (none should): to the hierarchy's root
                (self.mnt / "cgroup.procs").write_text(stray)
        with contextlib.suppress(FileNotFoundError):
            self.path.rmdir()
        atexit.unregister(self.leave)


async def starve(clients: list[NodeClient], f: Fault, rng: random.Random) -> None:
    """Starve the cluster of CPU: either every running daemon in a cgroup sharing
    STARVE_QUOTA of one CPU for 4 to 8 s, or (picked at random, and always where no cgroup
    can be made) the fault's one daemon stopped for longer than the heartbeat deadlines.
    Either way the cluster must keep allocating and converge: a late peer is slow, not dead."""
    where = cpu_cgroup()
    if isinstance(where, tuple) and rng.random() < 0.6:
        mnt, version = where
        quota = await asyncio.to_thread(CpuQuota, mnt, version, STARVE_QUOTA)
        f.nodes = [c.node.idx for c in clients if c.node.running()]
        f.detail.update(how="cgroup", quota=STARVE_QUOTA, cgroup=str(quota.path),
                        version=version)
        try:
            for c in clients:
                if c.node.proc is not None and c.node.running():
                    await asyncio.to_thread(quota.enter, c.node.proc.pid)
            await asyncio.sleep(rng.uniform(4.0, 8.0))
        finally:
            await asyncio.to_thread(quota.leave)
        return
    node = clients[f.nodes[0]].node
    f.detail["how"] = "sigstop"
    if isinstance(where, str):
        f.detail["no_cgroup"] = where
    node.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(rng.uniform(*STARVE_STOP))
    finally:
        node.signal(signal.SIGCONT)
