"""allocate+release over the local API with a minimal keep-alive HTTP/1.1 client.

`bench_daemon.py` drives the daemon with aiohttp's client, which on a 2-core machine takes
about half the CPU away from the daemon being measured; this one costs almost nothing, so
it shows what the daemon itself sustains. One op is one POST /ip/{id} or DELETE /ip/{id}.

    python benchmarks/bench_api_raw.py SOCKET [CLIENTS] [SECONDS]
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _worker(path: str, w: int, stop: float, lat: list[float]) -> None:
    r, wr = await asyncio.open_unix_connection(path)
    i = 0
    while time.perf_counter() < stop:
        ident = f"raw{w}-{i}"
        i += 1
        for verb in ("POST", "DELETE"):
            t = time.perf_counter()
            wr.write(f"{verb} /ip/{ident} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                     .encode())
            head = await r.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 2"):
                raise SystemExit(f"{verb} {ident}: {head[:80]!r}")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await r.readexactly(int(line.split(b":")[1]))
            lat.append(time.perf_counter() - t)
    wr.close()


async def measure(path: str, clients: int, seconds: float) -> tuple[int, list[float]]:
    """(ops/s, every op's latency in seconds)."""
    lat: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_worker(path, w, t0 + seconds, lat) for w in range(clients)))
    return int(len(lat) / (time.perf_counter() - t0)), lat


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    ops, lat = asyncio.run(measure(sys.argv[1], n, float(sys.argv[3]) if len(sys.argv) > 3
                                   else 5.0))
    lat.sort()
    print(f"{n} client(s): {ops} ops/s  p50 {lat[len(lat) // 2] * 1e3:.2f} ms  "
          f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
