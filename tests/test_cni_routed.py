"""Pods across nodes (issue 16): "nodes" as network namespaces on one bridge
(198.18.<run>.0/24, tests/cluster's harness), a daemon in each, pods as namespaces wired by
the reference plugins with our shim.

Routed (--pod-routes, `ptp`): every pod pings every other pod across nodes, the routes
carry the daemon's protocol number, follow the ring and go at reset.  Shared L2 (the
shipped `macvlan` conflist, no routes): pods on two nodes ping each other.  Everything
lives in namespaces made here and removed after.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster.harness import ChaosCluster, ChaosNode, netns_unavailable
from daemons import wait_for
from test_cni_runtime import BUSYBOX
from test_cni_support import REF, REPO, CniRun, HostScratch, host_scratch, run_plugin, shim_binary

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


@contextlib.contextmanager
def namespace_nodes(n: int, kind: type[ChaosNode]) -> Iterator[list[ChaosNode]]:
    """n ready daemons, each in its own namespace on one bridge; all removed after."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="wirt-"))
    c = ChaosCluster(n, root)
    c.range = f"198.19.{c.net.run}.0/24"
    try:
        c.net.setup(n)
        c.nodes = [kind(c.net, i, root, c.range, n) for i in range(n)]
        for node in c.nodes:
            node.peers = [f"{m.addr}:6783" for m in c.nodes if m is not node]
            node.start()
        for node in c.nodes:
            wait_for(lambda node=node: api(node, "GET", "/ring")[0] == 200,
                     timeout=60, what=f"{node.nickname} ready")
        yield c.nodes
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[ChaosNode]]:
    with namespace_nodes(3, RoutedNode) as ns:
        yield ns


PTP = {"cniVersion": "1.0.0", "name": "routed", "type": "ptp", "ipam": {"type": "weave-ipam"}}


def pod_add(n: ChaosNode, h: HostScratch, ip: str | None = None,
            conf: dict[str, Any] = PTP) -> tuple[str, str]:
    """A pod on node n (at a static address if given): (its namespace, its address)."""
    pod = h.new_netns()
    r: CniRun = run_plugin(REF / conf["type"], "ADD", conf,
                           container_id=secrets.token_hex(8),
                           netns=pod.path, ifname="eth0", socket=n.socket,
                           args=f"IP={ip}" if ip else None,
                           cni_path=f"{shim_binary().parent}:{REF}", in_netns=n.ns)
    assert r.rc == 0, str(r)
    (ipc,) = r.json["ips"]
    return pod.name, ipc["address"].split("/")[0]


def ping(pod_ns: str, addr: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", pod_ns, str(BUSYBOX), "ping", "-c", "1", "-W",
                        "3", addr], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{pod_ns} -> {addr}: {r.stdout} {r.stderr}"


def via(n: ChaosNode) -> set[str]:
    return {r.split(" via ")[1] for r in routes(n)}


def owned_by(n: ChaosNode, name: str) -> list[tuple[int, int]]:
    code, body = api(n, "GET", "/ip")  # any call: the report is on the status port
    rep = subprocess.run(["ip", "netns", "exec", n.ns, sys.executable, "-c",
                          "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                          "'http://127.0.0.1:6782/report').read().decode())"],
                         capture_output=True, text=True, timeout=30)
    out = []
    for e in json.loads(rep.stdout)["entries"]:
        if e["peer"] == name:
            start = int(ipaddress.ip_address(e["token"]))
            out.append((start, start + e["size"]))
    return out


def test_routes_follow_the_ring(nodes: list[ChaosNode]) -> None:
    n0, n1, n2 = nodes
    with host_scratch() as h:
        # every pod reaches every other pod, across nodes
        pods = [pod_add(n, h) for n in nodes]
        for n in nodes:
            others = {m.addr for m in nodes if m is not n}
            wait_for(lambda n=n, others=others: via(n) == others, timeout=10,
                     what=f"{n.nickname}'s routes to its peers")
        for i, (ns, _) in enumerate(pods):
            for j, (_, addr) in enumerate(pods):
                if i != j:
                    ping(ns, addr)

        # a restart keeps the routes (pods stay reachable meanwhile) and puts back the same
        before = sorted(routes(n1))
        n1.signal(signal.SIGTERM)
        assert n1.proc is not None and n1.proc.wait(30) == 0
        assert sorted(routes(n1)) == before
        ping(pods[0][0], pods[1][1])
        n1.start()
        wait_for(lambda: api(n1, "GET", "/ring")[0] == 200, timeout=60,
                 what="node1 ready again")
        assert sorted(routes(n1)) == before

        # a donation: node 0 runs out and takes space from a peer; traffic follows
        mine = owned_by(n0, n0.name)
        need = sum(e - s for s, e in mine)
        for k in range(need):
            code, body = api(n0, "POST", f"/ip/fill-{k}")
            assert code == 200, body
        grown = [r for r in owned_by(n0, n0.name) if r not in mine]
        assert grown, "node 0 took no space from a peer"
        got = [(f"fill-{k}", api(n0, "GET", f"/ip/fill-{k}")[1].split("/")[0])
               for k in range(need)]
        ident, addr = next((i, a) for i, a in got
                           if any(s <= int(ipaddress.ip_address(a)) < e for s, e in grown))
        api(n0, "DELETE", f"/ip/{ident}")
        pod_ns, pod_addr = pod_add(n0, h, addr)
        for other in (n1, n2):  # both peers: the answer to node2's pod comes back too
            wait_for(lambda o=other: any(r.endswith(f"via {n0.addr}") and
                                         ipaddress.ip_address(pod_addr) in
                                         ipaddress.ip_network(r.split()[0])
                                         for r in routes(o)),
                     timeout=10, what=f"{other.nickname} routes the donated range via node0")
        ping(pods[1][0], pod_addr)
        ping(pod_ns, pods[2][1])

        # rmpeer of a dead node: its routes disappear everywhere
        n2.kill()
        wait_for(lambda: api(n0, "DELETE", f"/peer/{n2.name}")[0] == 200, timeout=30,
                 interval=0.5, what="rmpeer once node2 is seen dead")
        for n in (n0, n1):
            wait_for(lambda n=n: via(n) and n2.addr not in via(n), timeout=15,
                     what=f"{n.nickname} stops routing via the removed node")
        ping(pods[0][0], pods[1][1])

        # reset: nothing the daemon added survives, and the peer stops routing via it
        code, body = api(n1, "DELETE", "/peer?force=true")  # its pods are still there
        assert code in (200, 204), body
        wait_for(lambda: routes(n1) == [], timeout=10, what="no routes after reset")
        wait_for(lambda: n1.addr not in via(n0), timeout=15,
                 what="node0 stops routing via the reset node")


def test_shared_l2_macvlan_needs_no_routes() -> None:
    """The shipped macvlan conflist (Multus-style secondary network): two nodes on one L2
    segment, no --pod-routes, no gateway; pods on both nodes reach each other."""
    shipped = json.loads((REPO / "docker" / "weave-ipam-macvlan.conflist").read_text())
    conf = {"cniVersion": shipped["cniVersion"], "name": shipped["name"],
            **shipped["plugins"][0]}
    with namespace_nodes(2, ChaosNode) as (n0, n1), host_scratch() as h:
        (a_ns, a), (b_ns, b) = pod_add(n0, h, conf=conf), pod_add(n1, h, conf=conf)
        assert a != b and routes(n0) == [] and routes(n1) == []
        ping(a_ns, b)
        ping(b_ns, a)
