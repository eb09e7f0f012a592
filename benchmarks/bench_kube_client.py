"""Start-up cost of the two candidate Kubernetes clients, side by side in one run.

Each case runs in a fresh interpreter that first imports what the daemon already loads
(asyncio, aiohttp.web), then the client's modules needed to list/watch Nodes and
read/write a ConfigMap.  Reported: CPU-seconds (user+sys of the child, from
getrusage) and peak RSS, as the median of several runs, plus the extra over the base.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

BASE = "import asyncio, aiohttp.web"
CASES = {
    "base (asyncio + aiohttp.web)": BASE,
    "kubernetes_asyncio": BASE + "; import kubernetes_asyncio.client, "
                                 "kubernetes_asyncio.config, kubernetes_asyncio.watch",
    "lightkube": BASE + "; import lightkube, lightkube.resources.core_v1, "
                        "lightkube.config.kubeconfig",
}
PROBE = ("import resource, json, sys; exec(sys.argv[1]); "
         "r = resource.getrusage(resource.RUSAGE_SELF); "
         "print(json.dumps([r.ru_utime + r.ru_stime, r.ru_maxrss]))")


def measure(code: str, runs: int) -> tuple[float, float]:
    cpu, rss = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", PROBE, code], check=True,
                             capture_output=True, text=True).stdout
        c, r = json.loads(out)
        cpu.append(c)
        rss.append(r / 1024)
    return statistics.median(cpu), statistics.median(rss)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    res = {k: measure(v, runs) for k, v in CASES.items()}
    base_cpu, base_rss = res["base (asyncio + aiohttp.web)"]
    for k, (c, r) in res.items():
        print(f"{k:32s} {c:.3f} CPU-s ({c - base_cpu:+.3f})  {r:.1f} MB RSS ({r - base_rss:+.1f})")


if __name__ == "__main__":
    main()
