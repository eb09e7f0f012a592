"""What a daemon's start costs, and whether uvloop pays for its import: side by side.

1. CPU-seconds from exec to the first allocation of a lone daemon (`consensus=1`), for
   each `--repo` given, interleaved run by run so a shared machine's drift hits all
   alike; medians.  With `--uvloop`, each repo also without uvloop.
2. `--imports`: CPU of a process that only imports what a plain daemon imports (as the
   daemon does), interleaved likewise: the part of the start that imports decide.
3. `--importtime`: the slowest imports of one daemon start (`-X importtime`, self time
   summed per top-level package); inflated by the tracing, so compare within a run.
4. `--ops SECONDS`: the daemon's CPU per allocate+release with and without uvloop, at 32
   clients with the minimal client of `bench_api_raw.py` (CPU from /proc, which a loaded
   machine moves far less than ops/s), and so after how many operations uvloop's import
   is paid back.

    python3 benchmarks/bench_start.py --repo /work/main --repo . --runs 7
    python3 benchmarks/bench_start.py --repo . --uvloop --ops 5 --importtime
    python3 benchmarks/bench_start.py --repo /work/main --repo . --runs 12 --imports

uvloop is hidden from a daemon by a shim module earlier on its PYTHONPATH whose import
fails, as on a machine without uvloop (the daemon then runs asyncio's own loop).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_api_raw import measure  # noqa: E402
from bench_scale import ScaleNode, cluster, cpu_seconds  # noqa: E402

NO_UVLOOP = 'raise ImportError("uvloop hidden by benchmarks/bench_start.py")\n'


def _node(root: Path, repo: Path, uvloop: bool, shim: Path) -> ScaleNode:
    node = ScaleNode(0, root, "127.0.0.1", repo, 1, [])
    if not uvloop:
        node.env["PYTHONPATH"] = f"{shim}:{repo}"
    return node


def start_cpu(repo: Path, uvloop: bool, shim: Path) -> float:
    """CPU-seconds of a lone daemon from exec to its first allocation."""
    root = Path(tempfile.mkdtemp(prefix="wsb-"))
    with cluster(root, keep=False) as c:
        node = _node(root, repo, uvloop, shim)
        c.nodes.append(node)
        node.start(wait=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if node.api("POST", "/ip/first", unix=True)[0] == 200:
                    break
            except OSError:
                pass
            if not node.running():
                raise SystemExit(f"daemon exited:\n{node.log_tail()}")
            time.sleep(0.01)
        else:
            raise SystemExit(f"no allocation in 60 s:\n{node.log_tail()}")
        assert node.pid is not None
        cpu = cpu_seconds(node.pid)
        node.stop()
    return cpu


IMPORTS = ("from weaveipam.cli import _import_aiohttp; _import_aiohttp(); import uvloop, "
           "weaveipam.daemon, weaveipam.api, weaveipam.status, weaveipam.metrics, "
           "weaveipam.kube.config")


def import_cpu(repo: Path) -> float:
    """CPU-seconds of an interpreter that imports what a plain daemon imports."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", IMPORTS], check=True, cwd=tempfile.gettempdir(),
                   env=dict(os.environ, PYTHONPATH=str(repo)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def importtime(repo: Path, top: int = 14) -> None:
    root = Path(tempfile.mkdtemp(prefix="wsb-"))
    with cluster(root, keep=False) as c:
        node = _node(root, repo, True, root)
        node.env["PYTHONPROFILEIMPORTTIME"] = "1"
        c.nodes.append(node)
        node.start()
        node.allocate("first")
        node.stop()
        per: collections.Counter[str] = collections.Counter()
        for line in node.log.read_text(errors="replace").splitlines():
            if line.startswith("import time:") and "self [us]" not in line:
                self_us, _, name = line.split(":", 1)[1].split("|")
                per[name.strip().split(".")[0]] += int(self_us)
    total = sum(per.values()) / 1000
    print(f"-X importtime, {repo}: {total:.0f} ms of imports; by top-level package (self ms):")
    print("  " + ", ".join(f"{k} {v / 1000:.0f}" for k, v in per.most_common(top)))


def ops_cpu(repo: Path, uvloop: bool, shim: Path, seconds: float) -> tuple[float, int]:
    """(daemon CPU-microseconds per operation, ops/s) at 32 clients."""
    root = Path(tempfile.mkdtemp(prefix="wsb-"))
    with cluster(root, keep=False) as c:
        node = _node(root, repo, uvloop, shim)
        c.nodes.append(node)
        node.start()
        node.allocate("warm")
        assert node.pid is not None
        c0 = cpu_seconds(node.pid)
        t0 = time.perf_counter()
        ops, lat = asyncio.run(measure(str(node.socket), 32, seconds))
        n = len(lat)
        cpu = cpu_seconds(node.pid) - c0
        del t0
        node.stop()
    return cpu / max(n, 1) * 1e6, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, action="append",
                    help="a checkout to measure (repeatable); default this one")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--uvloop", action="store_true", help="also each repo without uvloop")
    ap.add_argument("--imports", action="store_true",
                    help="only the imports' CPU, instead of the lone-daemon starts")
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--ops", type=float, default=0.0,
                    help="seconds of allocate+release load per run, with and without uvloop")
    args = ap.parse_args()
    repos = [r.resolve() for r in (args.repo or [HERE.parent])]
    shim = Path(tempfile.mkdtemp(prefix="wsb-shim-"))
    try:
        (shim / "uvloop.py").write_text(NO_UVLOOP)
        import compileall

        for repo in repos:
            compileall.compile_dir(repo / "weaveipam", quiet=1)
        variants = [(r, True) for r in repos] + ([(r, False) for r in repos]
                                                 if args.uvloop else [])
        if args.imports:
            got: dict[Path, list[float]] = {r: [] for r in repos}
            for _ in range(args.runs):
                for repo in repos:
                    got[repo].append(import_cpu(repo))
            for repo, xs in got.items():
                print(f"imports of a plain daemon: median {statistics.median(xs):.3f} CPU-s "
                      f"(min {min(xs):.3f}, max {max(xs):.3f}, {len(xs)} runs) {repo}")
            return
        cpu: dict[tuple[Path, bool], list[float]] = {v: [] for v in variants}
        for _ in range(args.runs):
            for v in variants:
                cpu[v].append(start_cpu(v[0], v[1], shim))
        for (repo, uv), xs in cpu.items():
            print(f"lone daemon, exec to first allocation: median {statistics.median(xs):.3f} "
                  f"CPU-s (min {min(xs):.3f}, max {max(xs):.3f}, {len(xs)} runs) "
                  f"{'' if uv else 'without uvloop '}{repo}")
        if args.importtime:
            for repo in repos:
                importtime(repo)
        if args.ops:
            for repo in repos:
                per: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
                for _ in range(max(1, args.runs // 2)):
                    for uv in (True, False):
                        per[uv].append(ops_cpu(repo, uv, shim, args.ops))
                us = {uv: statistics.median(x[0] for x in v) for uv, v in per.items()}
                rate = {uv: statistics.median(x[1] for x in v) for uv, v in per.items()}
                print(f"allocate+release, 32 clients, daemon CPU per op: {us[True]:.0f} us "
                      f"with uvloop ({rate[True]} ops/s), {us[False]:.0f} us without "
                      f"({rate[False]} ops/s) {repo}")
                if args.uvloop and us[False] > us[True]:
                    imp = (statistics.median(cpu[(repo, True)])
                           - statistics.median(cpu[(repo, False)]))
                    print(f"  uvloop's start cost {imp * 1000:+.0f} ms is paid back after "
                          f"{max(0.0, imp) / ((us[False] - us[True]) / 1e6):.0f} operations")
    finally:
        shutil.rmtree(shim, ignore_errors=True)


if __name__ == "__main__":
    main()
