"""Concurrent allocate / claim / release on every node, every answer recorded."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .client import NodeClient

# a 404 on release is not a success: the node forgot an address it acknowledged (the
# checker reports it unless an earlier release may have freed it)
OK_CODES = {"allocate": (200,), "claim": (204, 200), "release": (204, 200)}


@dataclass
class Op:
    op: str            # allocate | claim | release
    node: int
    gen: int           # the node's incarnation (bumped when it is wiped after rmpeer)
    ident: str
    address: str       # without prefix; "" when unknown
    t0: float          # request sent, seconds since the run started
    t1: float          # answer received (or gave up)
    status: int        # HTTP status, -1 for no answer
    ok: bool           # acknowledged (succeeded)
    detail: str = ""

    @property
    def latency(self) -> float:
        return self.t1 - self.t0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    t_start: float = field(default_factory=time.monotonic)
    ops: list[Op] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t_start


class Workload:
    def __init__(self, clients: list[NodeClient], history: History, seed: int,
                 workers_per_node: int = 4, prefix: int = 16, max_held: int = 12) -> None:
        self.clients = clients
        self.h = history
        self.rng = random.Random(seed)
        self.workers = workers_per_node
        self.prefix = prefix
        self.max_held = max_held
        self.stopping = asyncio.Event()
        self.seq = 0

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._worker(c, w, random.Random(self.rng.random())))
                 for c in self.clients for w in range(self.workers)]
        await asyncio.gather(*tasks)

    def stop(self) -> None:
        self.stopping.set()

    def _ident(self, node: int) -> str:
        self.seq += 1
        return f"c{node}-{self.seq}"

    async def _do(self, c: NodeClient, op: str, method: str, path: str, ident: str,
                  address: str) -> Op:
        node = c.node
        gen = node.gen
        t0 = self.h.now()
        # a release of what is no longer held is Weave's 400; ours says 404 (not-found)
        code, body = await c.call(method, path, accept_json=op == "release")
        t1 = self.h.now()
        ok = code in OK_CODES[op]
        if op == "allocate" and ok:
            address = body.strip().split("/")[0]
        rec = Op(op, node.idx, gen, ident, address, t0, t1, code, ok,
                 "" if ok else body.strip()[:160])
        self.h.ops.append(rec)
        return rec

    async def _worker(self, c: NodeClient, w: int, rng: random.Random) -> None:
        held: list[tuple[str, str]] = []       # (ident, address) acknowledged here
        released: list[str] = []               # addresses released here: claimed again later
        while not self.stopping.is_set():
            r = rng.random()
            if len(held) >= self.max_held:
                r = 1.0
            if not held or r < 0.45:
                ident = self._ident(c.node.idx)
                rec = await self._do(c, "allocate", "POST", f"/ip/{ident}", ident, "")
                if rec.ok:
                    held.append((ident, rec.address))
            elif released and r < 0.65:
                addr = released.pop(rng.randrange(len(released)))
                ident = self._ident(c.node.idx)
                rec = await self._do(c, "claim", "PUT", f"/ip/{ident}/{addr}/{self.prefix}",
                                     ident, addr)
                if rec.ok:
                    held.append((ident, addr))
            else:
                ident, addr = held.pop(rng.randrange(len(held)))
                rec = await self._do(c, "release", "DELETE", f"/ip/{ident}", ident, addr)
                if rec.ok:
                    released.append(addr)
                    del released[:-8]
                elif rec.status != 404:
                    held.append((ident, addr))  # refused or unknown: retried later
            if not rec.ok:
                await asyncio.sleep(0.2 + rng.random() * 0.3)  # node down: do not spin
