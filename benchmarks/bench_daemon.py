"""Daemon benchmarks with real processes on 127.0.0.1.

1. allocate+release over the unix socket: ops/s at 32 concurrent clients, p50/p99, and
   p50 at 1 client (one op = one POST /ip/{id} or one DELETE /ip/{id}); once with the
   minimal client of `bench_api_raw.py` (what the daemon sustains) and once with
   aiohttp's (which takes much of the 2 cores itself).
2. `--ipalloc-init consensus=N`: from starting N daemons to every one having allocated
   an address (process start included, and also from "all answering /healthz").

    python benchmarks/bench_daemon.py [--seconds 5] [--nodes 3,10,25]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemons import Cluster, Node  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api_raw import measure  # noqa: E402


async def _load(node: Node, clients: int, seconds: float) -> tuple[int, list[float]]:
    lat: list[float] = []
    conn = aiohttp.UnixConnector(path=str(node.socket), limit=clients)
    async with aiohttp.ClientSession(connector=conn) as s:
        stop = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < stop:
                ident = f"b{w}-{i}"
                i += 1
                t = time.perf_counter()
                async with s.post(f"http://x/ip/{ident}") as r:
                    await r.read()
                    assert r.status == 200, r.status
                t2 = time.perf_counter()
                async with s.delete(f"http://x/ip/{ident}") as r:
                    await r.read()
                    assert r.status == 204, r.status
                t3 = time.perf_counter()
                lat.extend((t2 - t, t3 - t2))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - t0
    return int(len(lat) / elapsed), lat


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


def _transactions(node: Node) -> float:
    for line in node.status("/metrics")[1].splitlines():
        if line.startswith("weaveipam_store_transactions_total "):
            return float(line.split()[1])
    return 0.0


def bench_ops(seconds: float) -> None:
    c = Cluster(Path(tempfile.mkdtemp(prefix="wb-")))
    try:
        (n,) = c.add(1, init="consensus=1", connect=False)
        n.allocate("warm")
        for client, load in (("minimal", lambda k: measure(str(n.socket), k, seconds)),
                             ("aiohttp", lambda k: _load(n, k, seconds))):
            for clients in (32, 1):
                tx0 = _transactions(n)
                ops, lat = asyncio.run(load(clients))
                tx = _transactions(n) - tx0
                print(f"allocate+release, {clients:2d} client(s), {client} client: "
                      f"{ops:6d} ops/s  p50 {_pct(lat, 0.5):6.2f} ms  "
                      f"p99 {_pct(lat, 0.99):6.2f} ms  "
                      f"({len(lat)} ops, {len(lat) / max(tx, 1):.1f} ops per fsync)")
        rss = [ln for ln in Path(f"/proc/{n.pid}/status").read_text().splitlines()
               if ln.startswith("VmRSS")]
        print(f"daemon resident memory after the load: {rss[0].split(':')[1].strip()}")
    finally:
        c.close()


def _cpu_seconds(pid: int | None) -> float:
    """user+system CPU a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bare_start_cpu(code: str) -> float:
    """CPU of starting this interpreter and running `code`: the floor under any daemon."""
    env = dict(os.environ, SSL_CERT_FILE=os.devnull)  # as the daemon imports aiohttp
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(5):
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 5


def bench_consensus(n: int) -> None:
    c = Cluster(Path(tempfile.mkdtemp(prefix="wb-")))
    try:
        t0 = time.perf_counter()
        nodes = c.add(n, start=False)
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_up(60)
        t_up = time.perf_counter()
        with ThreadPoolExecutor(n) as ex:
            addrs = list(ex.map(lambda nd: nd.allocate(f"first-{nd.idx}"), nodes))
        t_all = time.perf_counter()
        assert len(set(addrs)) == n
        cpu = sum(_cpu_seconds(nd.pid) for nd in nodes)
        print(f"consensus={n:<3d} start to all allocated {t_all - t0:6.2f} s "
              f"(all answering after {t_up - t0:5.2f} s; then {t_all - t_up:5.2f} s); "
              f"daemons used {cpu:5.2f} CPU-s, {cpu / n:4.2f} each, "
              f"{cpu / (os.cpu_count() or 1):5.2f} s of all {os.cpu_count()} cores")
    finally:
        c.close()


def bench_start_floor() -> None:
    bare = _bare_start_cpu("pass")
    aio = _bare_start_cpu("import asyncio")
    web = _bare_start_cpu("import asyncio, aiohttp.web")
    print(f"floor: an interpreter start costs {bare:4.2f} CPU-s, {aio:4.2f} importing asyncio, "
          f"{web:4.2f} importing asyncio and aiohttp.web")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--nodes", default="3,10,25")
    ap.add_argument("--skip-ops", action="store_true")
    args = ap.parse_args()
    if not args.skip_ops:
        bench_ops(args.seconds)
    if args.nodes:
        bench_start_floor()
    for n in (int(x) for x in args.nodes.split(",") if x):
        bench_consensus(n)


if __name__ == "__main__":
    main()
