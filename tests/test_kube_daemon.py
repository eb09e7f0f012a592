"""Real daemon processes in Kubernetes mode against the fake API server, on loopback.

Each daemon listens for peers on its own loopback address (127.0.0.11, .12, ...) and the
same peer port, as DaemonSet pods on their nodes' InternalIPs; no PEERS, no IPALLOC_INIT.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import Cluster, Node, free_ports, temp_cluster, wait_for
from kubefake import FakeKube, running

from weaveipam.kube.reconcile import MapEntry


class KubeNode(Node):
    """A daemon that learns its peers and consensus count from the API server."""

    def __init__(self, idx: int, root: Path, *, ip: str, port: int, kubeconfig: Path) -> None:
        super().__init__(idx, root, range_="10.32.0.0/12", init="")
        self.ip, self.kube_port, self.kubeconfig = ip, port, kubeconfig
        self.node_name = f"node-{idx}"

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--ipalloc-init")
        del argv[i:i + 2]  # consensus= comes from the Node count
        argv[argv.index("--host") + 1] = self.ip
        argv[argv.index("--port") + 1] = str(self.kube_port)
        return [*argv, "--kubeconfig", str(self.kubeconfig), "--node-name", self.node_name]

    def kube(self) -> dict:
        return dict(self.report()["kubernetes"])

    def ready(self) -> bool:
        return self.status("/readyz")[0] == 200


@pytest.fixture
def kcluster() -> Iterator[tuple[FakeKube, Cluster, list[KubeNode]]]:
    with running() as fake, temp_cluster("wik-") as c:
        yield fake, c, []


def add(fake: FakeKube, c: Cluster, nodes: list[KubeNode], port: int) -> KubeNode:
    idx = len(nodes) + 1
    n = KubeNode(idx, c.root, ip=f"127.0.0.{10 + idx}", port=port,
                 kubeconfig=fake.kubeconfig(c.root / "kubeconfig"))
    fake.add_node(n.node_name, n.ip)
    c.nodes.append(n)  # killed at cleanup
    nodes.append(n)
    return n


def owners(n: KubeNode) -> set[str]:
    return {e["peer"] for e in n.report()["entries"] if e["peer"]}


def test_nodes_find_each_other_join_reclaim_and_survive_an_outage(
        kcluster: tuple[FakeKube, Cluster, list[KubeNode]]) -> None:
    fake, c, nodes = kcluster
    (port,) = free_ports(1)
    first = [add(fake, c, nodes, port) for _ in range(3)]
    for n in first:
        n.start(wait=False)
    for n in first:
        n.wait_up(timeout=60)
    wait_for(lambda: all(n.ready() for n in first), timeout=60, what="3 nodes ready")
    k = first[0].kube()
    assert k["init"] == "consensus=3" and "Node objects (3)" in k["init_source"]
    assert "Node objects (3)" in first[0].status("/status")[1]
    addrs = {n.allocate(f"pod-{n.idx}") for n in first}
    assert len(addrs) == 3
    wait_for(lambda: fake.configmap() is not None and len(fake.configmap()["data"]) == 3,
             what="every node in the peer map")
    data = fake.configmap()["data"]  # type: ignore[index]
    assert {MapEntry.decode(data[n.node_name]).peer for n in first} == {n.name for n in first}  # type: ignore[union-attr]

    # a 4th Node appears: it is dialled by the others and joins the ring
    fourth = add(fake, c, nodes, port)
    fourth.start()
    wait_for(fourth.ready, timeout=60, what="the 4th node ready")
    fourth.allocate("pod-4")
    wait_for(lambda: fourth.name in owners(first[0]), timeout=30, what="the 4th owns space")

    # node-2 dies, the others notice, then its Node is deleted: its range is reclaimed
    gone = first[1]
    gone_space = {e["token"] for e in first[0].report()["entries"] if e["peer"] == gone.name}
    assert gone_space
    gone.kill()
    wait_for(lambda: all(not p["reachable"] for p in first[0].report()["peers"]
                         if p["name"] == gone.name), timeout=30, what="node-2 unreachable")
    t0 = time.monotonic()
    fake.delete_node(gone.node_name)
    survivors = [first[0], first[2], fourth]
    wait_for(lambda: all(gone.name not in owners(n) for n in survivors), timeout=60,
             what="node-2's range taken over")
    reclaim_s = time.monotonic() - t0
    print(f"\nreclaim: Node deleted -> its range owned by a live peer on every node: "
          f"{reclaim_s:.2f} s")
    wait_for(lambda: "node-2" not in (fake.configmap() or {}).get("data", {}), timeout=30,
             what="node-2's map entry removed after the rmpeer")
    total = sum(n.kube()["reclaimed_total"] for n in survivors)
    assert total == 1  # exactly one reclaimer
    metrics = "".join(n.status("/metrics")[1] for n in survivors)
    assert "weaveipam_kube_reclaims_total 1.0" in metrics
    assert any("reclaimed 1 peer" in n.status("/status")[1] for n in survivors)
    # no longer dialled: no connection attempts to the deleted Node's address remain
    wait_for(lambda: not [x for x in first[0].report()["connections"]
                          if x["address"].startswith(gone.ip + ":")],
             timeout=30, what="node-2 no longer dialled")

    # the API server goes away: allocation goes on, /status says why, /readyz stays 200
    fake.down()
    try:
        wait_for(lambda: all(n.kube()["problems"] for n in survivors), timeout=30,
                 what="the outage in every status")
        for i, n in enumerate(survivors):
            n.allocate(f"during-outage-{i}")
            assert n.ready()
        assert "cannot reach the Kubernetes API server" in survivors[0].status("/status")[1]
        time.sleep(3)
        for i, n in enumerate(survivors):
            n.allocate(f"later-in-outage-{i}")
    finally:
        fake.up()
    wait_for(lambda: not any(n.kube()["problems"] for n in survivors), timeout=60,
             what="the API server back in every status")


def test_explicit_init_wins_and_403_is_reported(
        kcluster: tuple[FakeKube, Cluster, list[KubeNode]]) -> None:
    fake, c, nodes = kcluster
    (port,) = free_ports(1)
    fake.forbidden.add(("create", "configmaps"))
    fake.add_node("node-x", "127.0.0.99")  # another Node that has no daemon yet
    n = add(fake, c, nodes, port)
    n.extra += ["--ipalloc-init", "consensus=1"]
    n.start()
    wait_for(n.ready, timeout=60, what="ready with consensus=1")
    k = n.kube()
    assert k["init"] == "consensus=1" and "IPALLOC_INIT" in k["init_source"]
    wait_for(lambda: "peer map" in n.kube()["problems"], timeout=30, what="the 403")
    text = n.status("/status")[1]
    assert "'create' on 'configmaps'" in text, text
    n.allocate("pod-1")  # the API's refusal does not stop allocation


def test_first_start_waits_for_the_node_count(
        kcluster: tuple[FakeKube, Cluster, list[KubeNode]]) -> None:
    """consensus= needs the Node count: with the API server down, a first start waits
    (saying why in its log), then counts; SIGTERM ends the wait."""
    fake, c, nodes = kcluster
    (port,) = free_ports(1)
    n = add(fake, c, nodes, port)
    fake.down()
    try:
        n.start(wait=False)
        wait_for(lambda: "counting Nodes for consensus=N" in n.log_tail(), timeout=30,
                 what="the wait logged")
        assert n.running() and "cannot reach the Kubernetes API server" in n.log_tail()
    finally:
        fake.up()
    n.wait_up(timeout=60)
    wait_for(n.ready, timeout=60, what="ready after counting")
    assert n.kube()["init"] == "consensus=1"
    n.stop()
    # a second start keeps its ring: no count needed, the API server may be down
    fake.down()
    try:
        n.start()
        wait_for(n.ready, timeout=60, what="ready from its state on disk")
        assert n.kube()["init_source"] == "the state on disk"
        n.stop()
    finally:
        fake.up()
    # with nothing on disk and the API down, SIGTERM still stops it
    c2 = add(fake, c, nodes, port)
    fake.down()
    c2.start(wait=False)
    wait_for(lambda: "counting Nodes" in c2.log_tail(), timeout=30, what="waiting")
    assert c2.stop() != 0 and "stopped while waiting" in c2.log_tail()
