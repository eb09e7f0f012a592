"""Routed pods across nodes (issue 16, first part): three "nodes" as network namespaces on
one bridge (198.18.<run>.0/24, tests/cluster's harness), a daemon in each with
--pod-routes, pods as namespaces wired by the reference `ptp` plugin with our shim.  Every
pod pings every other pod across nodes; the routes carry the daemon's protocol number and
go at reset.  Everything lives in namespaces made here and removed after.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster.harness import ChaosCluster, ChaosNode, netns_unavailable
from daemons import wait_for
from test_cni_runtime import BUSYBOX
from test_cni_support import REF, CniRun, HostScratch, host_scratch, run_plugin, shim_binary

from weaveipam.cli import UnixHTTPConnection
from weaveipam.routes import ROUTE_PROTO


class RoutedNode(ChaosNode):
    def argv(self) -> list[str]:
        return [*super().argv(), "--pod-routes"]


def api(n: ChaosNode, method: str, path: str) -> tuple[int, str]:
    conn = UnixHTTPConnection(str(n.socket), 30)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def routes(n: ChaosNode) -> list[str]:
    out = subprocess.run(["ip", "-n", n.ns, "route", "show", "proto", str(ROUTE_PROTO)],
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] + " via " + line.split()[2] for line in out.splitlines()]


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[ChaosNode]]:
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="wirt-"))
    c = ChaosCluster(3, root)
    c.range = f"198.19.{c.net.run}.0/24"
    try:
        c.net.setup(3)
        c.nodes = [RoutedNode(c.net, i, root, c.range, 3) for i in range(3)]
        for node in c.nodes:
            node.peers = [f"{m.addr}:6783" for m in c.nodes if m is not node]
            node.start()
        for node in c.nodes:
            wait_for(lambda node=node: api(node, "GET", "/ring")[1].strip() == "ready",
                     timeout=60, what=f"{node.nickname} ready")
        yield c.nodes
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def ptp_add(n: ChaosNode, h: HostScratch) -> tuple[str, str]:
    """A pod on node n: (its namespace, its address)."""
    conf = {"cniVersion": "1.0.0", "name": "routed", "type": "ptp",
            "ipam": {"type": "weave-ipam"}}
    pod = h.new_netns()
    r: CniRun = run_plugin(REF / "ptp", "ADD", conf, container_id=secrets.token_hex(8),
                           netns=pod.path, ifname="eth0", socket=n.socket,
                           cni_path=f"{shim_binary().parent}:{REF}", in_netns=n.ns)
    assert r.rc == 0, str(r)
    (ipc,) = r.json["ips"]
    return pod.name, ipc["address"].split("/")[0]


def test_pods_reach_pods_on_every_node_and_reset_removes_routes(
        nodes: list[ChaosNode]) -> None:
    with host_scratch() as h:
        pods = [ptp_add(n, h) for n in nodes]
        for n in nodes:
            others = {m.addr for m in nodes if m is not n}
            wait_for(lambda n=n, others=others: {r.split(" via ")[1] for r in routes(n)}
                     == others, timeout=10, what=f"{n.nickname}'s routes to its peers")
        for i, (ns, _) in enumerate(pods):
            for j, (_, addr) in enumerate(pods):
                if i != j:
                    r = subprocess.run(["ip", "netns", "exec", ns, str(BUSYBOX), "ping", "-c",
                                        "1", "-W", "3", addr], capture_output=True, text=True,
                                       timeout=30)
                    assert r.returncode == 0, f"pod {i} -> pod {j} ({addr}): {r.stdout}"
        gone = nodes[2]
        code, body = api(gone, "DELETE", "/peer")
        assert code in (200, 204), body
        wait_for(lambda: routes(gone) == [], timeout=10, what="no routes after reset")
        # the others now route its ranges via their new owner, never via it
        for n in nodes[:2]:
            wait_for(lambda n=n: routes(n) and all(gone.addr not in r for r in routes(n)),
                     timeout=10, what=f"{n.nickname} stops routing via the reset node")
