"""Faults combined at random from a seed: SIGKILL + restart, SIGSTOP/SIGCONT, packet loss,
partitions, rmpeer of a killed node and its return with its old data (then a fresh reset),
and what operators and strangers do (issue 9): a restart with another `--ipalloc-init`, the
data dir or only the store lost (the operator then follows the node's advice), reset refused
with allocations and forced once the node's pods are gone, forged hellos; and CPU
starvation (every daemon in a cgroup with a small CPU quota, or one daemon stopped for
longer than the heartbeat deadlines).

Two fault lanes run at once; a fault holds the nodes it touches, partitions and rmpeer hold
the topology, and rmpeer (and the other EXCLUSIVE kinds) hold the whole cluster, so no two
faults fight over one node.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .client import NodeClient
from .harness import REPO, ChaosNode, sh
from .workload import History, Op, Workload

KINDS = {"kill": 3, "pause": 3, "loss": 2, "partition": 3, "rmpeer": 2,
         # operators and strangers (issue 9)
         "init": 2, "wipe-data": 1, "wipe-store": 1, "reset": 1, "reset-force": 1,
         "forged-hello": 2,
         "starve": 2}  # CPU starvation (issue 13)
EXCLUSIVE = {"rmpeer", "wipe-data", "wipe-store", "reset-force"}  # hold the whole cluster
DOWN = {"kill", "pause", "init", "starve"}  # take a process down: one at a time
OPERATOR = {"init": "_init", "wipe-data": "_wipe_data", "wipe-store": "_wipe_store",
            "reset": "_reset", "reset-force": "_reset_force", "forged-hello": "_forged_hello"}
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


async def watch_state(c: NodeClient, until: tuple[str, ...], timeout: float = 30.0
                      ) -> list[str]:
    """The states a node reports, in order without repeats, until one of `until`."""
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        rep = await c.report(1.0)
        state = rep["state"] if rep else ""
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        if state in until:
            break
        await asyncio.sleep(0.2)
    return seen


async def wait_exit(node: ChaosNode, timeout: float) -> int | None:
    """The exit code once the process ends, None if it still runs after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if node.proc is not None and node.proc.poll() is not None:
            return node.proc.returncode
        await asyncio.sleep(0.1)
    return None


def python(*argv: str, ns: str | None = None, timeout: float = 60.0
           ) -> subprocess.CompletedProcess[str]:
    """Our Python with this tree (and tests/) importable, in namespace `ns` if given."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    pre = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*pre, sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


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
        self.workload: Workload | None = None  # operator faults park a node's workers

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
            if self.exclusive or (self.draining and kind not in EXCLUSIVE):
                return None
            if kind == "partition":
                if self.topo:
                    return None
                self.topo = True
                return []
            free = [i for i in range(self.n) if i not in self.busy]
            if kind in EXCLUSIVE:
                if self.topo or len(free) < self.n:
                    self.draining = True  # no new faults until this one could start
                    return None
                self.topo = self.exclusive = True
                self.draining = False
                pick = [rng.randrange(self.n)]
            else:
                # keep a majority of processes alive, so the workload keeps going
                if not free or (kind in DOWN and len(self.busy) >= 1):
                    return None
                pick = [rng.choice(free)]
            self.busy.update(pick)
            return pick

    async def _release(self, kind: str, nodes: list[int]) -> None:
        async with self.cond:
            self.busy.difference_update(nodes)
            if kind == "partition" or kind in EXCLUSIVE:
                self.topo = False
            if kind in EXCLUSIVE:
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
            elif kind in OPERATOR:
                await getattr(self, OPERATOR[kind])(f, rng)
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

    async def _rmpeer_when_gone(self, asker: NodeClient, name: str, timeout: float = 30.0
                                ) -> tuple[float, tuple[int, str]]:
        """rmpeer `name` on `asker` once it sees that peer unreachable (rmpeer of a
        reachable peer is refused): when first asked, and the last answer."""
        t_first = -1.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        answer: tuple[int, str] = (-1, "not tried")
        while loop.time() < deadline:
            if t_first < 0:
                rep = await asker.report()
                if rep is None or any(p["name"] == name and p["reachable"]
                                      for p in rep["peers"]):
                    await asyncio.sleep(0.3)
                    continue
                t_first = self.h.now()
            # our form: Weave's text answers 200 "0 IPs" for a peer it cannot remove
            answer = await asker.call("DELETE", f"/peer/{name}", 10.0, accept_json=True)
            if answer[0] == 200:
                break
            await asyncio.sleep(0.5)
        if t_first < 0:  # never seen as unreachable: cannot happen unless the mesh is stuck
            t_first = self.h.now()
        return t_first, answer

    async def _rmpeer(self, f: Fault, rng: random.Random) -> None:
        x = self.clients[f.nodes[0]]
        others = [c for c in self.clients if c is not x]
        name, gen = x.node.name, x.node.gen
        f.detail["name"] = name
        await asyncio.to_thread(x.node.kill)
        asker = rng.choice(others)
        t_first, answer = await self._rmpeer_when_gone(asker, name)
        loop = asyncio.get_running_loop()
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

    # ---- operators and strangers (issue 9) ---------------------------------------------

    def _wl(self) -> Workload:
        assert self.workload is not None, "operator faults need FaultInjector.workload"
        return self.workload

    def _holding(self, idx: int, gen: int) -> int:
        """Addresses acknowledged on the node's incarnation and not (maybe) released."""
        ended = {o.ident for o in self.h.ops if o.op == "release" and o.node == idx
                 and (o.ok or o.status == -1 or o.status >= 500 and o.status != 503)}
        return sum(1 for o in self.h.ops if o.ok and o.op in ("allocate", "claim")
                   and o.node == idx and o.gen == gen and o.ident not in ended)

    def _other_init(self, x: NodeClient, rng: random.Random) -> str:
        """Another --ipalloc-init than the cluster's: the README's default, a count too
        big, a seed list of two other peers, or observer."""
        others = sorted(c.node.name for c in self.clients if c is not x)
        return rng.choice(["consensus=1", f"consensus={self.n + 2}",
                           "seed=" + ",".join(sorted(rng.sample(others, 2))), "observer"])

    async def _restart(self, f: Fault, x: NodeClient, key: str, init: str | None = None,
                       until: tuple[str, ...] = ("ready",)) -> None:
        """Start the node (with `init` for this start only) and record whether it came up
        and the states it went through until one of `until`."""
        x.node.init = init
        x.node.start()
        x.node.init = None
        f.detail[key] = await wait_healthy(x)
        f.detail[f"{key}_states"] = await watch_state(x, until)

    async def _init(self, f: Fault, rng: random.Random) -> None:
        """Restarted with another --ipalloc-init (a DaemonSet whose IPALLOC_INIT was
        edited): it must rejoin the ring it has, never seed or split one."""
        x = self.clients[f.nodes[0]]
        await asyncio.to_thread(x.node.kill)
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        f.detail["init"] = self._other_init(x, rng)
        await self._restart(f, x, "up", f.detail["init"])

    async def _advice_rmpeer(self, f: Fault, rng: random.Random, x: NodeClient, old: str,
                             gens: list[int]) -> None:
        """What the advice says once the old pods are gone: rmpeer the old name on another
        node.  The old incarnations' holds end at the first request (if it may have
        taken effect)."""
        asker = rng.choice([c for c in self.clients if c is not x])
        t_first, answer = await self._rmpeer_when_gone(asker, old)
        f.detail["rmpeer_answer"] = [answer[0], answer[1].strip()[:120]]
        f.detail["asker"] = asker.node.idx
        if answer[0] == 200 or answer[0] == -1 or answer[0] >= 500 and answer[0] != 503:
            for gen in gens:
                self.rmpeers.append(RmpeerEvent(x.node.idx, gen, old, t_first))

    async def _lose_state(self, f: Fault, x: NodeClient) -> tuple[int, str, int]:
        """Kill the node with its workers parked, which then forget what they held there
        (those pods' addresses stay held until the old name is rmpeered): the node's
        index, old name and incarnation."""
        wl = self._wl()
        idx, old, gen = x.node.idx, x.node.name, x.node.gen
        await wl.park(idx)
        await asyncio.to_thread(x.node.kill)
        wl.forget(idx)
        f.detail.update(name=old, wiped=[idx, gen], in_use=self._holding(idx, gen))
        return idx, old, gen

    async def _wipe_data(self, f: Fault, rng: random.Random) -> None:
        """The data dir lost: the node comes back as a new peer (a new name) and, as a
        joiner, with another --ipalloc-init.  Its old pods are taken to live on (their
        addresses stay held) until the operator rmpeers the old name."""
        x, wl = self.clients[f.nodes[0]], self._wl()
        idx, old, gen = await self._lose_state(f, x)
        await asyncio.to_thread(x.node.wipe)
        f.detail["init"] = self._other_init(x, rng)
        try:
            await self._restart(f, x, "fresh_up", f.detail["init"])
        finally:
            wl.unpark(idx)
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        await self._advice_rmpeer(f, rng, x, old, [gen])

    async def _wipe_store(self, f: Fault, rng: random.Random) -> None:
        """The store lost (deleted, or emptied to 0 bytes), the name kept (--name).  An
        empty file: the node refuses to start and says to move it aside and reset; then,
        with no records and its ranges marked in use, it must stop in `lost-state`.  The
        operator follows that advice: a new data dir (a new name), rmpeer the old name."""
        x, wl = self.clients[f.nodes[0]], self._wl()
        idx, old, gen = await self._lose_state(f, x)
        db = x.node.data_dir / "ipam.db"
        f.detail["store"] = how = rng.choice(["deleted", "emptied"])
        if how == "emptied":
            os.truncate(db, 0)
            x.node.start()
            code = await wait_exit(x.node, 30.0)
            if code is None:
                await asyncio.to_thread(x.node.kill)
            said = x.node.log_tail(1)
            f.detail["empty_store"] = [code, said.strip()[-300:]]
            # the advice: no backup, so move it aside (with its -wal and -shm: the advice
            # names only ipam.db, and a stale WAL left behind is replayed into the new
            # store, a strict xfail in tests/test_operator.py) and reset the data dir
            for p in x.node.data_dir.glob("ipam.db*"):
                p.rename(p.with_name(p.name + ".aside"))
            r = await asyncio.to_thread(python, "-m", "weaveipam", "reset", "--data-dir",
                                        str(x.node.data_dir), "--socket", str(x.node.socket))
            f.detail["reset_data_dir"] = [r.returncode, (r.stdout + r.stderr).strip()[:200]]
        else:
            for p in x.node.data_dir.glob("ipam.db*"):
                p.unlink()
        x.node.gen += 1  # the same name with new state: a new incarnation
        lost_gen = x.node.gen
        f.detail["lost_gen"] = lost_gen
        try:
            await self._restart(f, x, "up", until=("ready", "lost-state"))
        finally:
            wl.unpark(idx)
        await asyncio.sleep(rng.uniform(1.0, 3.0))  # the workload keeps asking it
        rep = await x.report()
        f.detail["state"] = rep["state"] if rep else ""
        f.detail["status"] = rep["status"][:300] if rep else ""
        # the advice: a new peer name (a new data dir gets one), rmpeer of the old name
        await wl.park(idx)
        await asyncio.to_thread(x.node.kill)
        wl.forget(idx)
        await asyncio.to_thread(x.node.wipe)
        try:
            await self._restart(f, x, "fresh_up")
        finally:
            wl.unpark(idx)
        await self._advice_rmpeer(f, rng, x, old, [gen, lost_gen])

    async def _reset(self, f: Fault, rng: random.Random) -> None:
        """`DELETE /peer` (weaveipam reset) on a node whose pods hold addresses: refused
        with the reason, and nothing changes (a guard allocation made first stays)."""
        x, wl = self.clients[f.nodes[0]], self._wl()
        ident = f"wic-guard-{len(self.faults)}"
        guard: Op = await wl.do(x, "allocate", "POST", f"/ip/{ident}", ident, "")
        if not guard.ok:  # maybe nothing held here: a reset would go through, legitimately
            f.detail["skipped"] = [guard.status, guard.detail]
            return
        code, body = await x.call("DELETE", "/peer", 10.0)
        f.detail["reset_answer"] = [code, body.strip()[:200]]
        code, body = await x.call("GET", f"/ip/{ident}")
        f.detail["guard"] = [guard.address, code, body.strip().split("/")[0]]
        await wl.do(x, "release", "DELETE", f"/ip/{ident}", ident, guard.address)

    async def _reset_force(self, f: Fault, rng: random.Random) -> None:
        """`weaveipam reset --force` once the node's pods are gone (the workload releases
        all it holds there): the ranges go to a peer, the state is discarded and the
        daemon stops; it comes back as a new peer."""
        x, wl = self.clients[f.nodes[0]], self._wl()
        idx, old, gen = x.node.idx, x.node.name, x.node.gen
        f.detail["name"] = old
        f.detail["drained"] = await wl.park(idx, drain=True)
        f.detail["left_held"] = self._holding(idx, gen)
        try:
            t = self.h.now()
            code, body = await x.call("DELETE", "/peer?force=true&forget=true", 15.0)
            f.detail["reset_answer"] = [code, body.strip()[:200]]
            if code == 503 or 400 <= code < 500:
                return  # refused (e.g. not in sync): nothing happened, it runs on
            self.rmpeers.append(RmpeerEvent(idx, gen, old, t))  # its holds end here
            f.detail["exit"] = await wait_exit(x.node, 30.0)
            await asyncio.to_thread(x.node.kill)
            wl.forget(idx)
            await asyncio.to_thread(x.node.wipe)
            await self._restart(f, x, "fresh_up")
        finally:
            wl.unpark(idx)

    async def _forged_hello(self, f: Fault, rng: random.Random) -> None:
        """A stranger on the node's peer port sends hellos under the node's own name or,
        when the topology is free, under the name of a peer it is connected to: each is
        refused; the node keeps its state and that peer's link."""
        x = self.clients[f.nodes[0]]
        rep = await x.report()
        links = {(c["name"], c["address"], c["outbound"]) for c in (rep or {}).get(
            "connections", []) if c["state"] == "established"}
        by_name = {c.node.name: c.node.idx for c in self.clients}
        third = None
        async with self.cond:
            free = [n for n, _, _ in sorted(links)
                    if by_name.get(n) is not None and by_name[n] not in self.busy]
            if free and not self.topo and not self.exclusive and rng.random() < 0.5:
                third = rng.choice(free)
                self.topo = True  # no partition may break that link meanwhile
                self.busy.add(by_name[third])
        try:
            name = third or x.node.name
            f.detail["as"] = "connected peer" if third else "own name"
            script = ("import asyncio, json, sys\n"
                      "from stranger import forge_hello\n"
                      "async def main():\n"
                      "    out = []\n"
                      "    for _ in range(3):\n"
                      f"        a = await forge_hello({x.node.addr!r}, 6783, name={name!r})\n"
                      "        out.append([a.refused, a.accepted])\n"
                      "    print(json.dumps(out))\n"
                      "asyncio.run(main())\n")
            r = await asyncio.to_thread(python, "-c", script, ns=x.node.ns, timeout=30.0)
            f.detail["answers"] = (json.loads(r.stdout) if r.returncode == 0
                                   else [[None, None, r.stderr.strip()[-200:]]])
            await asyncio.sleep(0.5)
            after = await x.report()
            f.detail["state"] = after["state"] if after else ""
            if third:
                kept = {c for c in links if c[0] == third}
                now = {(c["name"], c["address"], c["outbound"])
                       for c in (after or {}).get("connections", [])
                       if c["state"] == "established" and c["name"] == third}
                f.detail["link_kept"] = bool(after) and now == kept
        finally:
            if third:
                async with self.cond:
                    self.topo = False
                    self.busy.discard(by_name[third])


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
