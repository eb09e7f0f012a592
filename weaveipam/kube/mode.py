"""Kubernetes mode inside the daemon: consensus count, peers from Nodes, reclaim.

The daemon calls three hooks: `before_allocator` (a first start counts Nodes for
consensus=N unless IPALLOC_INIT was given), `start` (after the mesh is up) and `stop`.
API server trouble is reported in the status and retried; it never stops allocation,
and /readyz does not look at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any

from ..core.allocator import InitMode, RmPeer
from .client import Driver, count_nodes, make_client, problem
from .config import KubeError, KubeSettings
from .reconcile import NodeInfo

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger("weaveipam.kube")

COUNT_RETRY_MAX = 10.0


COUNT_FILE = "kube-consensus"  # in the data dir: the Node count of the first start


class KubeMode:
    def __init__(self, d: Daemon, s: KubeSettings) -> None:
        self.d = d
        self.settings = s
        self.client = make_client(s)  # KubeError: bad config, said at start-up
        self.init_source = "--ipalloc-init / IPALLOC_INIT" if d.cfg.init_explicit else \
            "the state on disk"
        self.driver: Driver | None = None
        self.counting: str | None = None  # what the Node count waits for
        self._dialled: set[str] = set()

    async def before_allocator(self, first_start: bool) -> None:
        """consensus= defaults to the number of Node objects at a first start."""
        cfg = self.d.cfg
        if cfg.init_explicit or not first_start:
            return
        from ..node import StartupError

        # the count of a start that got no ring yet (nothing allocated from the ring): kept,
        # so a restart, also with the API server down, decides with the same number
        kept = cfg.data_dir / COUNT_FILE
        try:
            n = int(kept.read_text().strip())
        except (OSError, ValueError):
            n = 0
        if n > 0:
            cfg.init = InitMode("consensus", n)
            self.init_source = f"the number of Node objects ({n}) counted at the first start"
            log.info("consensus=%d: %s (%s)", n, self.init_source, kept)
            return
        delay = 0.5
        while True:
            try:
                n = await count_nodes(self.client)
                break
            except Exception as e:
                self.counting = problem(e, "list", "nodes").text()
                log.warning("counting Nodes for consensus=N (set IPALLOC_INIT to skip): %s",
                            self.counting)
            with contextlib.suppress(TimeoutError):  # SIGTERM ends the wait
                await asyncio.wait_for(self.d.stop_requested.wait(),
                                       delay * random.uniform(0.5, 1.0))
                raise StartupError("stopped while waiting for the API server to count Nodes")
            delay = min(delay * 2, COUNT_RETRY_MAX)
        self.counting = None
        cfg.init = InitMode("consensus", max(n, 1))
        self.init_source = f"the number of Node objects ({n}) at first start"
        with contextlib.suppress(OSError):  # without it a restart counts again
            kept.write_text(f"{max(n, 1)}\n")
        log.info("consensus=%d: %s", max(n, 1), self.init_source)

    def start(self) -> None:
        d = self.d
        self.driver = Driver(self.settings, self.client, peer_name=d.name,
                             set_peers=self._set_peers, rmpeer=self._rmpeer, ring=self._ring)
        self.driver.start()

    async def stop(self) -> None:
        if self.driver is not None:
            await self.driver.stop()
        else:
            await self.client.close()

    # ---- hooks the reconciler drives ---------------------------------------------------

    def _set_peers(self, addrs: frozenset[str]) -> None:
        mesh = self.d.mesh
        if mesh is None:
            return
        port = self.d.cfg.port
        # PEERS (and `weaveipam connect`'s) stay dialled whatever the API says
        given = set(self.d.direct)
        for a in sorted(addrs - self._dialled):
            log.info("dialling peer %s:%d (a Node)", a, port)
            mesh.add_peer(a, port)
        for a in sorted(self._dialled - addrs):
            if (a, port) not in given:
                log.info("no longer dialling %s:%d (its Node is gone)", a, port)
                mesh.forget_peer(a, port)
        self._dialled = set(addrs)

    async def _rmpeer(self, peer: str) -> tuple[str, str]:
        from ..node import ApiError

        try:
            v = await self.d.call(RmPeer(peer))
        except ApiError as e:
            if e.code == "not-found":
                return "gone", e.message
            if e.code == "conflict":
                return "refused", e.message
            return "error", e.message
        if v.get("already"):
            return "gone", f"already removed (heir {v.get('heir')})"
        return "done", f"{v.get('moved', 0)} IPs taken over by {v.get('heir')}"

    def own_node(self) -> tuple[bool, NodeInfo | None]:
        """Whether the Nodes were listed, and this node's Node, current through the watch
        (kube-node ranges: weaveipam/cni/nodelocal.py)."""
        if self.driver is None:
            return False, None
        return self.driver.rec.nodes_known, self.driver.rec.nodes.get(self.settings.node_name)

    def _ring(self) -> tuple[bool, Any]:
        a = self.d.allocator
        return (not a.ring.is_empty(), a.heir_for)

    # ---- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"init": self.d.cfg.init.kind + (
            f"={self.d.cfg.init.count}" if self.d.cfg.init.kind == "consensus" else ""),
            "init_source": self.init_source}
        if self.driver is not None:
            out |= self.driver.status()
        else:
            out["problems"] = {"nodes": self.counting} if self.counting else {}
        if self.d.node_local is not None:
            out["node_ranges"] = self.d.node_local.status()
        return out

    def lines(self) -> list[str]:
        """`weaveipam status` rows: where consensus came from, what the API says."""
        st = self.status()
        rows = [f"node {self.settings.node_name}, {self.settings.where()}, "
                f"{st.get('nodes', '?')} Nodes, map {st.get('map', '')} "
                f"({st.get('map_entries', '?')} entries)",
                f"init {st['init']} from {st['init_source']}",
                f"reclaimed {st.get('reclaimed_total', 0)} peer(s) of deleted or "
                "re-registered Nodes"]
        for r in st.get("reclaims", [])[-3:]:
            rows.append(f"  reclaimed {r['peer']} (Node {r['node']}): {r['result']}")
        for peer, why in sorted(st.get("waiting", {}).items()):
            rows.append(f"  reclaim of {peer}: {why}")
        for area, text in sorted(st.get("problems", {}).items()):
            rows.append(f"PROBLEM ({area}): {text}")
        if self.d.node_local is not None:
            rows += self.d.node_local.lines()
        return rows


def make(d: Daemon, s: KubeSettings) -> KubeMode:
    from ..node import StartupError

    try:
        return KubeMode(d, s)
    except KubeError as e:
        raise StartupError(str(e)) from e
