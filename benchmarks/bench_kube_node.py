"""kube-node networks against ring networks: the daemon's CPU per CNI ADD+DEL.

One daemon in Kubernetes mode against the fake API server (tests/kubefake.py), its Node
dual-stack.  Blocks of ADD+DEL pairs sent straight to the daemon's socket (`POST /cni`, as
the shim sends them) alternate between a ring network (one IPv4 address) and a kube-node
network (`"ranges": "podCIDRs"`: one IPv4 and one IPv6 address, two records), so drift
hits both alike.  CPU is the daemon's user+system time from /proc over each block; wall
time per pair is a figure too.  No root needed.

    python benchmarks/bench_kube_node.py [--blocks 10] [--pairs 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_cni import post_cni  # noqa: E402
from bench_daemon import _cpu_seconds  # noqa: E402
from daemons import free_ports, temp_cluster, wait_for  # noqa: E402
from kubefake import running  # noqa: E402
from test_kube_daemon import KubeNode  # noqa: E402

PODS = ["198.18.96.0/20", "fd00:198:18:96::/64"]
NETS = {
    "ring": {"cniVersion": "1.0.0", "name": "ringnet", "ipam": {"type": "weave-ipam"}},
    "kube-node": {"cniVersion": "1.0.0", "name": "nodenet",
                  "ipam": {"type": "weave-ipam", "ranges": "podCIDRs"}},
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=50)
    args = ap.parse_args()
    with running() as fake, temp_cluster("wkb-") as c:
        (port,) = free_ports(1)
        n = KubeNode(1, c.root, ip="127.0.0.61", port=port,
                     kubeconfig=fake.kubeconfig(c.root / "kubeconfig"))
        fake.add_node(n.node_name, n.ip, PODS)
        c.nodes.append(n)
        n.start()
        wait_for(lambda: n.kube().get("nodes") == 1 and n.ready(), timeout=60,
                 what="the Node read and the ring ready")
        cpu = {k: 0.0 for k in NETS}
        wall: dict[str, list[float]] = {k: [] for k in NETS}
        seq = 0
        for block in range(args.blocks + 1):  # block 0 warms up
            for kind, conf in NETS.items():
                body = json.dumps(conf).encode()
                c0 = _cpu_seconds(n.pid)
                for _ in range(args.pairs):
                    seq += 1
                    env = {"CNI_CONTAINERID": f"b{seq:07d}", "CNI_NETNS": "/run/netns/none",
                           "CNI_IFNAME": "eth0"}
                    t = time.perf_counter()
                    a = post_cni(n.socket, {"CNI_COMMAND": "ADD", **env}, body)
                    d = post_cni(n.socket, {"CNI_COMMAND": "DEL", **env}, body)
                    assert a[0] == 0 and d[0] == 0, (kind, a, d)
                    if block:
                        wall[kind].append(time.perf_counter() - t)
                if block:
                    cpu[kind] += _cpu_seconds(n.pid) - c0
        pairs = args.blocks * args.pairs
        out = {k: {"cpu_ms_per_pair": cpu[k] / pairs * 1000,
                   "wall_ms_p50": statistics.median(wall[k]) * 1000} for k in NETS}
        out["cpu_ratio_kube_node_over_ring"] = (out["kube-node"]["cpu_ms_per_pair"]
                                                / out["ring"]["cpu_ms_per_pair"])
        out["pairs_each"] = pairs
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
