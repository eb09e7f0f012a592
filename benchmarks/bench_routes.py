"""Cost of keeping pod routes in step with the ring (--pod-routes), in a network namespace
made here (`wirb-*`, removed after): N peers on one /24 (198.18.250.0/24), each owning K
ranges of the range 198.19.0.0/16.

Measures, in CPU-seconds of this process (netlink calls included): computing the wanted
routes from the ring, the first sync (every route added), a sync with nothing to change,
reading our routes back from the kernel (done every 60 s), and a sync after one range
changed owner (a donation).  Needs root.

    python benchmarks/bench_routes.py [--peers 50] [--ranges 8] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
