"""Engine speed: ring merge and allocate/free, in-process (figures go in the README)."""

from __future__ import annotations

import json
import random
import time

from weaveipam.core.addr import CIDR, Range
from weaveipam.core.allocator import Allocate, Allocator, InitMode, Release
from weaveipam.core.ring import Ring


def ring_of(n: int, rng: random.Random, version_skew: int) -> Ring:
    """A valid seeded ring with n entries, owners and versions varied."""
    u = CIDR.parse("10.32.0.0/12")
    r = Ring(u)
    r.seed([f"p{i:03d}" for i in range(100)])
    step = u.size // n
    for i in range(1, n):
        t = u.start + i * step
        if t not in r.entries:
            r._set(t, (rng.randrange(version_skew), f"p{rng.randrange(100):03d}", 0))
    return r


def bench_merge(n: int = 10_000, reps: int = 20) -> float:
    rng = random.Random(1)
    a, b = ring_of(n, rng, 5), ring_of(n, rng, 5)
    best = float("inf")
    for _ in range(reps):
        x = a.copy()
        t = time.perf_counter()
        x.merge(b)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def bench_alloc(n: int = 50_000) -> tuple[float, float]:
    a = Allocator(name="p0", nickname="n", universe=CIDR.parse("10.32.0.0/12"),
                  init=InitMode("consensus", 1), rng=random.Random(1), now=0.0)
    a.request(0, Allocate("warm"), 0.0)
    a.take_outputs()
    t = time.perf_counter()
    for i in range(n):
        a.request(i, Allocate(f"c{i}"), 1.0)
        a.out.clear()
    t_alloc = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for i in range(n):
        a.request(i, Release(f"c{i}"), 1.0)
        a.out.clear()
    t_free = (time.perf_counter() - t) / n
    return t_alloc * 1e6, t_free * 1e6


def bench_space(n: int = 200_000) -> float:
    from weaveipam.core.space import Space
    s = Space()
    s.set_owned([Range(0, 1 << 20)])
    w = Range(1, (1 << 20) - 1)
    cur = 0
    t = time.perf_counter()
    for _ in range(n):
        a = s.next_free(w, cur + 1)
        assert a is not None
        s.take(a)
        s.free(a)
        cur = a
    return (time.perf_counter() - t) / n * 1e6


if __name__ == "__main__":
    alloc_us, free_us = bench_alloc()
    print(json.dumps({
        "ring_merge_10k_ms": round(bench_merge(), 2),
        "allocator_allocate_us": round(alloc_us, 2),
        "allocator_release_us": round(free_us, 2),
        "space_alloc_plus_free_us": round(bench_space(), 2),
    }))
