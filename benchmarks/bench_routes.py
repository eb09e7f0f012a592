"""Pod routes (--pod-routes): how fast they follow the ring, and what keeping them costs.

1. Convergence: three daemons in network namespaces on one bridge (tests/cluster's
   harness, 198.18.<run>.0/24, range 198.19.<run>.0/24).  Node 0 allocates until it takes
   space from a peer (a donation); the time from the allocation that landed in the new
   range to node 1 routing that address via node 0 (polled every 10 ms).
2. Cost, in a network namespace made here (`wirb-*`, removed after): N peers on one /24
   (198.18.250.0/24), each owning K ranges of the range 198.19.0.0/16.

Measures, in CPU-seconds of this process (netlink calls included): computing the wanted
routes from the ring, the first sync (every route added), a sync with nothing to change,
reading our routes back from the kernel (done every 60 s), and a sync after one range
changed owner (a donation).  Needs root.

    python benchmarks/bench_routes.py [--donations 5] [--peers 50] [--ranges 8]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_cni_routed import RoutedNode, api, owned_by, routes  # noqa: E402

from weaveipam.routes import RouteTable, desired_routes  # noqa: E402

BASE = 0xC6130000  # 198.19.0.0
SIZE = 1 << 16


def cpu() -> float:
    return time.process_time()


def ring(peers: int, per_peer: int) -> list[tuple[int, int, str]]:
    """peers*per_peer equal ranges, owners round-robin (as gossip leaves them, interleaved)."""
    n = peers * per_peer
    step = 1 << ((SIZE // n).bit_length() - 1)  # aligned, as donations split the ring
    return [(BASE + i * step, BASE + (i + 1) * step, f"p{i % peers}") for i in range(n)]


def child(peers: int, per_peer: int, repeat: int) -> None:
    """Runs inside the namespace."""
    addrs = {f"p{i}": f"198.18.250.{i + 2}" for i in range(peers)}
    r = ring(peers, per_peer)
    t = cpu()
    for _ in range(repeat):
        want = desired_routes(r, "me", addrs, 32)
    compute = (cpu() - t) / repeat
    table = RouteTable()
    t = cpu()
    table.sync(want)
    first = cpu() - t
    t = cpu()
    table.sync(want, verify=True)
    verify = cpu() - t
    moved = list(r)
    s, e, p = moved[0]
    moved[0] = (s, e, "p1" if p != "p1" else "p2")
    want2 = desired_routes(moved, "me", addrs, 32)
    t = cpu()
    changed, removed = table.sync(want2)
    one = cpu() - t
    assert len(table.current()) == len(want2)
    table.sync({})
    table.close()
    print(f"{peers} peers, {len(r)} ranges, {len(want)} routes (CPU ms): compute "
          f"{compute * 1000:.2f}; first sync {first * 1000:.1f}; reading them back to "
          f"verify {verify * 1000:.1f}; sync after one donation {one * 1000:.2f} "
          f"({changed} changed, {removed} removed)")


def convergence(donations: int) -> None:
    from cluster.harness import ChaosCluster
    from daemons import wait_for
    root = Path(tempfile.mkdtemp(prefix="wirb-"))
    c = ChaosCluster(3, root)
    c.range = f"198.19.{c.net.run}.0/24"
    try:
        c.net.setup(3)
        c.nodes = [RoutedNode(c.net, i, root, c.range, 3) for i in range(3)]
        for node in c.nodes:
            node.peers = [f"{m.addr}:6783" for m in c.nodes if m is not node]
            node.start()
        for node in c.nodes:
            wait_for(lambda node=node: api(node, "GET", "/ring")[0] == 200,
                     timeout=60, what="ready")
        n0, n1 = c.nodes[0], c.nodes[1]
        times, k = [], 0
        for _ in range(donations):
            mine = owned_by(n0, n0.name)
            while True:
                code, body = api(n0, "POST", f"/ip/fill-{k}")
                k += 1
                if code != 200:
                    print(f"convergence: node 0 is full after {len(times)} donations")
                    break
                t0 = time.perf_counter()
                a = ipaddress.ip_address(body.split("/")[0])
                if not any(s <= int(a) < e for s, e in mine):
                    break
            if code != 200:
                break
            while not any(r.endswith(f"via {n0.addr}") and a in
                          ipaddress.ip_network(r.split()[0]) for r in routes(n1)):
                time.sleep(0.01)
            times.append(time.perf_counter() - t0)
        print(f"route convergence after a donation, {len(times)} donations (ms): "
              + ", ".join(f"{t * 1000:.0f}" for t in times)
              + (f"; median {statistics.median(times) * 1000:.0f}" if times else ""))
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--donations", type=int, default=5, help="convergence trials (0: skip)")
    ap.add_argument("--peers", type=int, default=50)
    ap.add_argument("--ranges", type=int, default=8, help="ranges per peer")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.peers, args.ranges, args.repeat)
        return 0
    if os.geteuid() != 0:
        print("bench_routes: needs root (a network namespace)", file=sys.stderr)
        return 2
    if args.donations:
        convergence(args.donations)
    ns = f"wirb-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                    ["addr", "add", "198.18.250.1/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "eth1", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--child",
                               "--peers", str(args.peers), "--ranges", str(args.ranges),
                               "--repeat", str(args.repeat)]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    sys.exit(main())
