"""CNI speed: the reference `bridge` plugin with weave-ipam vs with host-local, same run,
same machine, and the shim's own cost over the daemon's handling.

1. ADD+DEL through bridge (one netns per IPAM, new container id each time, DEL gets the
   ADD's result as prevResult as libcni passes it), interleaved so drift hits both alike:
   ms per ADD+DEL and the ratio weave-ipam / host-local.
2. The IPAM plugin alone (no bridge): the shim's ADD+DEL, host-local's ADD+DEL, and the
   same two requests sent straight to the daemon's socket (`POST /cni`, one connection
   each, as the shim does): the shim's process cost is the difference.  Also the shim's
   VERSION (answered without the daemon) and /bin/true run the same way, the cost of
   starting any process.
3. Through a real runtime: `ctr run --rm --cni` of a busybox /bin/true on a private
   containerd, with the shipped conflist (bridge, isGateway, portmap) and weave-ipam, the
   same conflist with host-local, and without --cni, interleaved.  The runtime's ADD+DEL
   is the difference to the run without --cni; CPU counts ctr with its plugins and the
   daemon (host-local works inside its plugin process, weave-ipam in the daemon).

Needs root, `ip netns`, containernetworking-plugins and a C compiler (builds the shim);
part 3 also containerd, runc and busybox-static (skipped, with the reason, without them).

    python benchmarks/bench_cni.py [--iterations 200] [--direct 400] [--containerd 60]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_daemon import _cpu_seconds  # noqa: E402
from daemons import Cluster, Node  # noqa: E402
from test_cni_runtime import containerd, runtime_missing  # noqa: E402
from test_cni_support import (  # noqa: E402
    CONFLIST,
    HOST_LOCAL,
    BridgeNet,
    host_scratch,
    netns_unavailable,
    reference_plugins,
    run_plugin,
    shim_binary,
)

T = TypeVar("T")
RANGE = "198.18.16.0/20"          # weave-ipam's range
HOST_LOCAL_SUBNET = "198.18.32.0/20"
CTR_HOST_LOCAL_SUBNET = "198.18.48.0/20"


def ms(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"mean": statistics.fmean(s) * 1000, "p50": s[len(s) // 2] * 1000,
            "p90": s[min(len(s) - 1, int(len(s) * 0.9))] * 1000}


def timed(fn: Callable[..., T], *a: Any, **kw: Any) -> tuple[float, T]:
    t = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t, out


def post_cni(sock: Path, env: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """What the shim sends, from here: one connection, Connection: close."""
    names = {"CNI_COMMAND": "X-CNI-Command", "CNI_CONTAINERID": "X-CNI-Containerid",
             "CNI_NETNS": "X-CNI-Netns", "CNI_IFNAME": "X-CNI-Ifname"}
    head = "".join(f"{names[k]}: {v}\r\n" for k, v in env.items())
    req = (f"POST /cni HTTP/1.1\r\nHost: weave-ipam\r\nConnection: close\r\n"
           f"Content-Length: {len(body)}\r\n{head}\r\n").encode() + body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    h, _, out = data.partition(b"\r\n\r\n")
    code = next(int(line.split(b":")[1]) for line in h.split(b"\r\n")
                if line.lower().startswith(b"x-cni-exit:"))
    return code, out


def bench_bridge(sock: Path, n: int, data_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with host_scratch() as h:
        nets = {
            "weave-ipam": BridgeNet(h, socket=sock),
            "host-local": BridgeNet(h, socket=None, ipam={
                "type": "host-local", "ranges": [[{"subnet": HOST_LOCAL_SUBNET}]],
                "dataDir": str(data_dir)}),
        }
        nss = {k: h.new_netns() for k in nets}
        times: dict[str, dict[str, list[float]]] = {
            k: {"add": [], "del": [], "pair": []} for k in nets}
        for i in range(n + 5):
            for k, net in nets.items():
                cid = f"bench{i:06d}{k[:1]}"
                ta, r = timed(net.add, nss[k], cid)
                assert r.rc == 0, f"{k} ADD: {r}"
                td, r2 = timed(net.delete, nss[k], cid, r.json)
                assert r2.rc == 0, f"{k} DEL: {r2}"
                if i >= 5:  # warm-up excluded
                    times[k]["add"].append(ta)
                    times[k]["del"].append(td)
                    times[k]["pair"].append(ta + td)
        for k in nets:
            out[k] = {m: ms(v) for m, v in times[k].items()}
    out["ratio_mean"] = out["weave-ipam"]["pair"]["mean"] / out["host-local"]["pair"]["mean"]
    out["ratio_p50"] = out["weave-ipam"]["pair"]["p50"] / out["host-local"]["pair"]["p50"]
    return out


def bench_direct(sock: Path, shim: Path, n: int, data_dir: Path) -> dict[str, Any]:
    conf = {"cniVersion": "1.0.0", "name": "benchnet", "ipam": {"type": "weave-ipam"}}
    hl = {"cniVersion": "1.0.0", "name": "benchhl",
          "ipam": {"type": "host-local", "ranges": [[{"subnet": HOST_LOCAL_SUBNET}]],
                   "dataDir": str(data_dir)}}
    body = json.dumps(conf).encode()
    res: dict[str, list[float]] = {"shim": [], "socket": [], "host-local": [], "version": [],
                                   "true": []}
    true = shutil.which("true") or "/bin/true"
    for i in range(n + 10):
        cid = f"direct{i:06d}"
        kw: dict[str, Any] = {"container_id": cid, "netns": "/run/netns/none",
                              "ifname": "eth0", "cni_path": str(HOST_LOCAL.parent)}
        t1, r = timed(run_plugin, shim, "ADD", conf, socket=sock, **kw)
        t2, r2 = timed(run_plugin, shim, "DEL", conf, socket=sock, **kw)
        assert r.rc == 0 and r2.rc == 0, f"{r} {r2}"
        env = {"CNI_CONTAINERID": cid + "s", "CNI_NETNS": "/run/netns/none",
               "CNI_IFNAME": "eth0"}
        t3, a = timed(post_cni, sock, {"CNI_COMMAND": "ADD", **env}, body)
        t4, b = timed(post_cni, sock, {"CNI_COMMAND": "DEL", **env}, body)
        assert a[0] == 0 and b[0] == 0, (a, b)
        t5, h1 = timed(run_plugin, HOST_LOCAL, "ADD", hl, **kw)
        t6, h2 = timed(run_plugin, HOST_LOCAL, "DEL", hl, **kw)
        assert h1.rc == 0 and h2.rc == 0, f"{h1} {h2}"
        t7, _ = timed(run_plugin, shim, "VERSION", conf)
        t8, _ = timed(run_plugin, Path(true), "VERSION", conf)  # same pipes as the shim
        if i >= 10:
            res["shim"].append(t1 + t2)
            res["socket"].append(t3 + t4)
            res["host-local"].append(t5 + t6)
            res["version"].append(t7)
            res["true"].append(t8)
    out: dict[str, Any] = {k: ms(v) for k, v in res.items()}
    out["shim_overhead_per_call_ms"] = (out["shim"]["p50"] - out["socket"]["p50"]) / 2
    return out


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench_containerd(node: Node, shim: Path, n: int, data_dir: Path) -> dict[str, Any]:
    """ctr run --rm of /bin/true: weave-ipam, host-local (shipped conflist otherwise), and
    no CNI, interleaved; wall ms and CPU ms (ctr + plugins + the daemon) per run."""
    shipped = CONFLIST.read_text()
    hl = json.loads(shipped)
    hl["plugins"][0]["ipam"] = {"type": "host-local", "dataDir": str(data_dir),
                                "ranges": [[{"subnet": CTR_HOST_LOCAL_SUBNET}]]}
    wall: dict[str, list[float]] = {"weave-ipam": [], "host-local": [], "no CNI": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    with containerd() as rt:
        nodes = {"weave-ipam": rt.node("bw", node.socket, shipped, shim),
                 "host-local": rt.node("bh", node.socket, json.dumps(hl), shim)}
        nodes["no CNI"] = nodes["weave-ipam"]
        for i in range(n + 5):
            for k, rn in nodes.items():
                c0, d0 = _children_cpu(), _cpu_seconds(node.pid)
                t, r = timed(rn.run, f"b{i}{k[0]}", "/bin/true", cni=k != "no CNI")
                c1, d1 = _children_cpu(), _cpu_seconds(node.pid)
                assert r.returncode == 0, f"{k}: {r.stderr}"
                if i >= 5:  # warm-up excluded
                    wall[k].append(t)
                    cpu[k].append(c1 - c0 + d1 - d0)
    out: dict[str, Any] = {"wall": {k: ms(v) for k, v in wall.items()},
                           "cpu": {k: ms(v) for k, v in cpu.items()}}
    base_wall, base_cpu = out["wall"]["no CNI"]["mean"], out["cpu"]["no CNI"]["mean"]
    for k in ("weave-ipam", "host-local"):
        out[k] = {"add_del_wall_mean": out["wall"][k]["mean"] - base_wall,
                  "add_del_cpu_mean": out["cpu"][k]["mean"] - base_cpu}
    out["ratio_wall"] = out["wall"]["weave-ipam"]["mean"] / out["wall"]["host-local"]["mean"]
    out["ratio_add_del_wall"] = (out["weave-ipam"]["add_del_wall_mean"]
                                 / out["host-local"]["add_del_wall_mean"])
    out["ratio_add_del_cpu"] = (out["weave-ipam"]["add_del_cpu_mean"]
                                / out["host-local"]["add_del_cpu_mean"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200,
                    help="ADD+DEL pairs through bridge (0: skip)")
    ap.add_argument("--direct", type=int, default=400, help="pairs without bridge (0: skip)")
    ap.add_argument("--containerd", type=int, default=60,
                    help="ctr runs per variant through a private containerd (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    why = netns_unavailable()
    if why:
        print(f"bench_cni: cannot run: {why}", file=sys.stderr)
        return 2
    reference_plugins()
    shim = shim_binary()
    root = Path(tempfile.mkdtemp(prefix="wb-"))
    c = Cluster(root)
    try:
        (node,) = c.add(1, range_=RANGE, init="consensus=1", connect=False)
        print(f"machine: {os.cpu_count()} CPUs; daemon range {RANGE}; host-local "
              f"{HOST_LOCAL_SUBNET} in {root}")
        figures: dict[str, Any] = {}
        if args.iterations:
            br = bench_bridge(node.socket, args.iterations, root / "hl-bridge")
            print(f"\n1. bridge ADD+DEL, {args.iterations} each, interleaved (ms)")
            print(f"{'':12} {'pair mean':>10} {'pair p50':>9} {'pair p90':>9} {'ADD p50':>8} "
                  f"{'DEL p50':>8}")
            for k in ("weave-ipam", "host-local"):
                d = br[k]
                print(f"{k:12} {d['pair']['mean']:10.2f} {d['pair']['p50']:9.2f} "
                      f"{d['pair']['p90']:9.2f} {d['add']['p50']:8.2f} {d['del']['p50']:8.2f}")
            print(f"ratio weave-ipam/host-local: {br['ratio_mean']:.2f} (mean), "
                  f"{br['ratio_p50']:.2f} (p50)")
            figures["bridge"] = br
        if args.direct:
            di = bench_direct(node.socket, shim, args.direct, root / "hl-direct")
            print(f"\n2. the IPAM alone, {args.direct} ADD+DEL pairs (ms, p50 / mean)")
            for k, label in (("shim", "weave-ipam shim ADD+DEL"),
                             ("socket", "same over the socket, no process"),
                             ("host-local", "host-local ADD+DEL"),
                             ("version", "shim VERSION (no daemon)"),
                             ("true", "/bin/true, same pipes (process start)")):
                print(f"{label:40} {di[k]['p50']:7.2f} / {di[k]['mean']:7.2f}")
            print(f"per call, shim minus a direct socket request: "
                  f"{di['shim_overhead_per_call_ms']:.2f} ms (p50); shim VERSION minus "
                  f"/bin/true: {di['version']['p50'] - di['true']['p50']:.2f} ms")
            figures["direct"] = di
        missing = runtime_missing()
        if args.containerd and missing:
            print(f"\n3. containerd: skipped, needs {'; '.join(missing)}")
        elif args.containerd:
            ct = bench_containerd(node, shim, args.containerd, root / "hl-ctr")
            figures["containerd"] = ct
            print(f"\n3. ctr run --rm of /bin/true, {args.containerd} each, interleaved "
                  "(ms; CPU: ctr, plugins and the daemon)")
            print(f"{'':12} {'wall p50':>9} {'wall mean':>10} {'CPU mean':>9} "
                  f"{'ADD+DEL wall':>13} {'ADD+DEL CPU':>12}  (means)")
            for k in ("weave-ipam", "host-local", "no CNI"):
                w, c_ = ct["wall"][k], ct["cpu"][k]
                extra = (f" {ct[k]['add_del_wall_mean']:13.2f} {ct[k]['add_del_cpu_mean']:12.2f}"
                         if k in ct else "")
                print(f"{k:12} {w['p50']:9.2f} {w['mean']:10.2f} {c_['mean']:9.2f}{extra}")
            print(f"ratio weave-ipam/host-local: whole run {ct['ratio_wall']:.2f} (wall mean); "
                  f"ADD+DEL (minus the run without CNI) {ct['ratio_add_del_wall']:.2f} "
                  f"(wall mean), {ct['ratio_add_del_cpu']:.2f} (CPU mean)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
