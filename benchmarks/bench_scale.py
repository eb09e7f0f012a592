"""Scale benchmark: N real daemons with full peer lists and `consensus=N`, as a DaemonSet.

Each daemon binds its peer port to its own loopback address (127.0.K.1, 127.0.K.2, ...,
never 0.0.0.0) and is given every other daemon's address.  Per N it reports

- wall time from starting the processes to every node having allocated one address
  through its own API (all started at once, one allocation per node, concurrently);
- CPU-seconds per daemon to that point, from /proc/PID/stat utime+stime (a daemon has no
  children), which machine noise hardly moves, unlike wall time;
- idle CPU per daemon per second over `--idle` seconds after convergence;
- connection terminations during that idle window (`weave_connection_terminations_total`);
- resident memory per daemon at the end;
- the daemons' log lines mentioning a timeout ("timeout", "timed out") or "nothing
  received", before and after convergence.

    python3 benchmarks/bench_scale.py --nodes 1,3,10 [--idle 20] [--runs 3]
    python3 benchmarks/bench_scale.py --repo /work/wt/other-branch --nodes 10
    flock /tmp/scale50.lock python3 benchmarks/bench_scale.py --nodes 50

`--repo PATH` runs the daemons of another checkout (PYTHONPATH=PATH); by default the
checkout this file is in.  Its package is byte-compiled first, as `make install` does
(this machine sets PYTHONDONTWRITEBYTECODE: uncompiled, every daemon would compile it).
One JSON line per run goes to stdout (and to `--jsonl FILE`), then a table.  N=50 loads
a 2-core machine fully: take the lock as above when others share it.  Every daemon is
stopped by its PID at the end, also when a run fails, and the temp dir is removed
(`--keep` keeps it for reading the logs).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
from daemons import Cluster, Node  # noqa: E402

TIMEOUT_RE = re.compile(r"timeout|timed out", re.I)
NOTHING_RE = re.compile(r"nothing received", re.I)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process so far (children none: a daemon starts none)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, to say how loaded it was meanwhile."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


class ScaleNode(Node):
    """A test-helper daemon whose peer port is bound to its own loopback address."""

    def __init__(self, idx: int, root: Path, addr: str, repo: Path, n: int,
                 extra: list[str]) -> None:
        # later flags win in argparse: --host overrides the helper's 127.0.0.1
        super().__init__(idx, root, range_="10.32.0.0/12", init=f"consensus={n}",
                         extra=["--host", addr, *extra])
        self.addr = addr
        self.env["PYTHONPATH"] = str(repo)

    @property
    def peer_addr(self) -> str:
        return f"{self.addr}:{self.peer_port}"

    def metric(self, name: str) -> float | None:
        code, body = self.status("/metrics")
        if code != 200:
            return None
        for line in body.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None


def allocate_until(node: ScaleNode, deadline: float) -> float | None:
    """Time (monotonic) the node's first allocation succeeded, None if not by deadline."""
    with contextlib.suppress(AssertionError):
        node.wait_up(max(0.1, deadline - time.monotonic()))
    while time.monotonic() < deadline:
        left = deadline - time.monotonic()
        try:
            code, _ = node.api("POST", f"/ip/scale-{node.idx}", timeout=max(1.0, left))
        except OSError:
            code = 0
        if code == 200:
            return time.monotonic()
        if not node.running():
            return None
        time.sleep(0.1 if code == 0 else 0.5)
    return None


def count_logs(nodes: list[ScaleNode], offsets: dict[int, int] | None = None
               ) -> tuple[int, int, dict[int, int]]:
    """(timeout lines, nothing-received lines, end offsets) from the given offsets on."""
    t = nr = 0
    ends: dict[int, int] = {}
    for node in nodes:
        try:
            data = node.log.read_bytes()
        except OSError:
            continue
        ends[node.idx] = len(data)
        for line in data[(offsets or {}).get(node.idx, 0):].decode(errors="replace").splitlines():
            t += bool(TIMEOUT_RE.search(line))
            nr += bool(NOTHING_RE.search(line))
    return t, nr, ends


@contextlib.contextmanager
def cluster(root: Path, keep: bool) -> Iterator[Cluster]:
    c = Cluster(root)
    try:
        yield c
    finally:
        c.close()  # SIGKILL by PID of every node still running
        if keep:
            print(f"# kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_once(n: int, args: argparse.Namespace, octet: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="wss-"))
    res: dict[str, Any] = {"nodes": n, "repo": str(args.repo), "idle_s": args.idle,
                           "loadavg_before": round(os.getloadavg()[0], 2)}
    with cluster(root, args.keep) as c:
        nodes = [ScaleNode(i, root, f"127.0.{octet}.{i + 1}", args.repo, n, args.extra)
                 for i in range(n)]
        for node in nodes:
            node.peers = [m.peer_addr for m in nodes if m is not node]
        c.nodes.extend(nodes)
        busy0, total0 = machine_busy()
        t0 = time.monotonic()
        for node in nodes:
            node.start(wait=False)
        deadline = t0 + args.timeout
        with ThreadPoolExecutor(n) as ex:
            done = list(ex.map(lambda nd: allocate_until(nd, deadline), nodes))
        t_all = time.monotonic()
        pids = {nd.idx: nd.pid for nd in nodes if nd.running() and nd.pid is not None}
        cpu = [cpu_seconds(p) for p in pids.values()]
        busy1, total1 = machine_busy()
        ok = [d for d in done if d is not None]
        res.update(allocated=len(ok), converged=len(ok) == n,
                   wall_s=round((max(ok) if len(ok) == n else t_all) - t0, 3),
                   first_alloc_s=round(min(ok) - t0, 3) if ok else None,
                   cpu_per_daemon_s=round(mean(cpu), 3) if cpu else None,
                   cpu_max_s=round(max(cpu), 3) if cpu else None,
                   machine_busy_pct=round(100 * (busy1 - busy0) / max(1, total1 - total0), 1))
        t_conv, nr_conv, offsets = count_logs(nodes)
        res.update(log_timeouts_to_conv=t_conv, log_nothing_received_to_conv=nr_conv)
        if res["converged"] and args.idle > 0:
            term0 = sum(nd.metric("weave_connection_terminations_total") or 0 for nd in nodes)
            c0 = {i: cpu_seconds(p) for i, p in pids.items()}
            w0 = time.monotonic()
            time.sleep(args.idle)
            c1 = {i: cpu_seconds(p) for i, p in pids.items() if Path(f"/proc/{p}").exists()}
            elapsed = time.monotonic() - w0
            term1 = sum(nd.metric("weave_connection_terminations_total") or 0 for nd in nodes)
            idle = [(c1[i] - c0[i]) / elapsed * 1000 for i in c1]
            res.update(idle_ms_per_s=round(mean(idle), 2), idle_max_ms_per_s=round(max(idle), 2),
                       idle_cluster_cores=round(sum(idle) / 1000, 3),
                       terminations_idle=int(term1 - term0))
        t_idle, nr_idle, _ = count_logs(nodes, offsets)
        res.update(log_timeouts_after=t_idle, log_nothing_received_after=nr_idle)
        rss = [rss_mib(p) for p in pids.values() if Path(f"/proc/{p}").exists()]
        res["rss_mib"] = round(mean(rss), 1) if rss else None
        for node in nodes:  # a clean stop by PID; close() kills whatever is left
            node.signal(15)
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop(10)
    return res


def fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'N':>3} {'alloc':>6} {'wall s':>7} {'CPU-s/d':>8} {'idle ms/s/d':>11} "
            f"{'cores idle':>10} {'term':>5} {'RSS MiB':>8} {'timeouts':>9} {'nothing rcv':>11} "
            f"{'busy%':>6}")
    out = [head]
    for r in rows:
        out.append(
            f"{r['nodes']:>3} {str(r['allocated']) + '/' + str(r['nodes']):>6} "
            f"{fmt(r['wall_s'], '.2f'):>7} {fmt(r['cpu_per_daemon_s'], '.3f'):>8} "
            f"{fmt(r.get('idle_ms_per_s'), '.2f'):>11} "
            f"{fmt(r.get('idle_cluster_cores'), '.3f'):>10} "
            f"{fmt(r.get('terminations_idle')):>5} {fmt(r['rss_mib'], '.1f'):>8} "
            f"{r['log_timeouts_to_conv']:>4}+{r['log_timeouts_after']:<4} "
            f"{r['log_nothing_received_to_conv']:>5}+{r['log_nothing_received_after']:<5} "
            f"{r['machine_busy_pct']:>6.1f}")
    out.append("CPU-s/d: per daemon from exec to every node allocated; idle: over the idle "
               "window after; term: connection terminations in it; timeouts, nothing rcv: "
               "log lines to convergence + after; busy%: whole machine until convergence")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,3,10,25,50", help="comma-separated cluster sizes")
    ap.add_argument("--runs", type=int, default=1, help="runs per cluster size")
    ap.add_argument("--idle", type=float, default=20.0,
                    help="seconds of idle measured after convergence (0: none)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds for every node to allocate before the run counts as failed")
    ap.add_argument("--repo", type=Path, default=HERE.parent,
                    help="checkout whose weaveipam the daemons run (PYTHONPATH)")
    ap.add_argument("--octet", type=int, default=None,
                    help="daemons listen on 127.0.OCTET.i (default: from our PID, 2-251)")
    ap.add_argument("--jsonl", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    ap.add_argument("--extra", default="", help="more daemon flags, e.g. '--conn-limit 30'")
    args = ap.parse_args()
    args.repo = args.repo.resolve()
    args.extra = args.extra.split()
    if not (args.repo / "weaveipam" / "__init__.py").exists():
        ap.error(f"--repo {args.repo}: no weaveipam package there; give a checkout's root")
    compileall.compile_dir(args.repo / "weaveipam", quiet=1)
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    if any(not 1 <= s <= 250 for s in sizes):
        ap.error("--nodes: sizes from 1 to 250 (one loopback address each)")
    octet = args.octet if args.octet is not None else 2 + os.getpid() % 250
    rows = []
    for n in sizes:
        for _ in range(args.runs):
            r = run_once(n, args, octet)
            rows.append(r)
            line = json.dumps(r)
            print(line, flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(line + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
