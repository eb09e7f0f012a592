"""Prometheus metrics with Weave's names, read from the daemon at scrape time.

A custom collector computes the gauges on each scrape instead of updating them on every
allocation: the hot path stays free of metric bookkeeping.  Each daemon has its own
CollectorRegistry so tests (and embedders) can run several in one process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .core.allocator import Allocate

if TYPE_CHECKING:
    from .node import Node

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def unreachable_owners(d: Node) -> tuple[int, int]:
    """(unreachable peers owning space, addresses they own)."""
    a = d.allocator
    live = a.reachable() | {a.name}
    peers = a.ring.peers()
    dead = {p: n for p, n in peers.items() if p not in live}
    return len(dead), sum(dead.values())


class _IpamCollector(Collector):
    def __init__(self, d: Node) -> None:
        self.d = d

    def collect(self) -> Iterator[Metric]:
        d = self.d
        a = d.allocator
        used = sum(len(v) for v in a.allocations().values())
        ips = GaugeMetricFamily("weave_ips", "Number of IP addresses.", labels=["state"])
        ips.add_metric(["local-used"], used)
        ips.add_metric(["local-free"], a.free_total())
        yield ips
        yield GaugeMetricFamily("weave_max_ips", "Size of the IP allocation range.",
                                value=a.universe.size)
        n_dead, dead_ips = unreachable_owners(d)
        yield GaugeMetricFamily("weave_ipam_unreachable_count",
                                "Number of unreachable peers that own IP space.", value=n_dead)
        yield GaugeMetricFamily("weave_ipam_unreachable_percentage",
                                "Percentage of IP addresses owned by unreachable peers.",
                                value=100.0 * dead_ips / a.universe.size)
        ops = a.pending_ops()
        allocs = sum(1 for op, _ in ops if isinstance(op, Allocate))
        yield GaugeMetricFamily("weave_ipam_pending_allocates",
                                "Number of pending allocates.", value=allocs)
        yield GaugeMetricFamily("weave_ipam_pending_claims", "Number of pending claims.",
                                value=len(ops) - allocs)
        conns = GaugeMetricFamily("weave_connections", "Number of peer connections.",
                                  labels=["state", "type", "encryption"])
        d.poll_connections()  # a connection seen by a scrape is counted when it ends
        counts = Counter((c.state, c.encrypted) for c in d.connections())
        # Weave's labels: without a password every connection is "no"; with one, a
        # connection is "yes" once its encrypted session is up (before that it is "no")
        encrypting = d.cfg.password is not None
        for state in ("established", "connecting", "failed", "pending"):
            conns.add_metric([state, "tcp", "no"], counts.get((state, False), 0))
            if encrypting:
                conns.add_metric([state, "tcp", "yes"], counts.get((state, True), 0))
        yield conns
        term = CounterMetricFamily("weave_connection_terminations",
                                   "Number of peer connections terminated.")
        term.add_metric([], d.conn_terminations)
        yield term
        if d.mesh is not None:
            refused = CounterMetricFamily(
                "weaveipam_peer_hello_refused",
                "Peer hellos refused for claiming a name in use: our own (own-name) or "
                "that of a peer we are connected to (name-in-use).", labels=["reason"])
            for reason, n in sorted(d.mesh.refused_hellos().items()):
                refused.add_metric([reason], n)
            yield refused
        yield GaugeMetricFamily("weaveipam_up", "1 while this peer can allocate.",
                                value=1.0 if a.can_allocate() else 0.0)
        yield GaugeMetricFamily("weaveipam_peer_auth_enabled",
                                "1 if peers must prove the password (and traffic is "
                                "encrypted), 0 if anyone reaching the peer port can join.",
                                value=1.0 if encrypting else 0.0)
        yield GaugeMetricFamily("weaveipam_peer_auth_second_password",
                                "1 while a second password is accepted too (rotation).",
                                value=1.0 if d.cfg.second_password is not None else 0.0)
        if d.kube is not None:
            st = d.kube.status()
            k = CounterMetricFamily("weaveipam_kube_reclaims",
                                    "Peers of deleted Nodes this peer reclaimed (rmpeer).")
            k.add_metric([], st.get("reclaimed_total", 0))
            yield k
            yield GaugeMetricFamily("weaveipam_kube_api_problems",
                                    "Kubernetes API areas (nodes, peer map) failing now.",
                                    value=len(st.get("problems", {})))
        if d.store is not None:
            c = CounterMetricFamily("weaveipam_store_transactions",
                                    "Store transactions committed (fsyncs).")
            c.add_metric([], d.store.transactions)
            yield c


class Metrics:
    """One daemon's registry: the Weave gauges plus our latency histograms."""

    def __init__(self, d: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_IpamCollector(d))
        self.allocate_seconds = Histogram(
            "weaveipam_allocate_seconds", "Time to answer an allocate or claim request.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.release_seconds = Histogram(
            "weaveipam_release_seconds", "Time to answer a release request.",
            buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
