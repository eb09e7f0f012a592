"""The IO side of Kubernetes mode: lightkube calls that carry out a Reconciler's outputs.

lightkube was chosen over kubernetes_asyncio by start-up cost (benchmarks/
bench_kube_client.py): importing what we use costs about a third of the CPU and a sixth
of the memory.  It is imported only here, and this module only in Kubernetes mode.
The client re-reads the projected ServiceAccount token when the server answers 401
(rotation), buffers watch lines across chunks, and turns the ERROR event of a watch
(410 Expired inside a 200 stream) into an exception, which we turn into a re-list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Node

from .config import KubeError, KubeSettings
from .reconcile import (
    MAP_NAME,
    ApiProblem,
    ListNodes,
    NodeInfo,
    Note,
    Output,
    ReadMap,
    Reconciler,
    RmPeer,
    SetPeers,
    WatchNodes,
    WriteMap,
)

log = logging.getLogger("weaveipam.kube")

TICK = 0.2
WATCH_SERVER_TIMEOUT = 300  # the server ends the stream; lightkube re-watches from the last rv
WATCH_IDLE = WATCH_SERVER_TIMEOUT + 60  # no line for this long: the server is gone silently
REQUEST_TIMEOUT = 10.0


def make_client(s: KubeSettings) -> AsyncClient:
    try:
        if s.kubeconfig is not None:
            cfg = KubeConfig.from_file(s.kubeconfig)
        else:
            cfg = KubeConfig.from_service_account(s.service_account)
    except Exception as e:  # lightkube raises ConfigError, KeyError, OSError, YAML errors
        raise KubeError(f"cannot load the Kubernetes config ({s.where()}): {e}") from e
    # no proxy from the environment: the API server is reached directly
    return AsyncClient(cfg, timeout=httpx2.Timeout(REQUEST_TIMEOUT), trust_env=False,
                       field_manager="weave-ipam")


def problem(e: BaseException, verb: str, resource: str) -> ApiProblem:
    if isinstance(e, ApiError):
        st = e.status
        return ApiProblem(verb, resource, st.code, st.reason or "", st.message or "")
    return ApiProblem(verb, resource, None, "", str(e) or type(e).__name__)


async def count_nodes(client: AsyncClient) -> int:
    n = 0
    async for _ in client.list(Node):
        n += 1
    return n


RmPeerFn = Callable[[str], Awaitable[tuple[str, str]]]
RingFn = Callable[[], tuple[bool, Callable[[str], str] | None]]


class Driver:
    """Runs one Reconciler on the daemon's loop: executes its outputs, feeds back results."""

    def __init__(self, s: KubeSettings, client: AsyncClient, *, peer_name: str,
                 set_peers: Callable[[frozenset[str]], None], rmpeer: RmPeerFn,
                 ring: RingFn) -> None:
        self.settings = s
        self.client = client
        self.namespace = client.namespace
        self.rec = Reconciler(node_name=s.node_name, peer_name=peer_name,
                              rng=random.Random(), now=time.monotonic(),
                              address_types=s.address_types)
        self._set_peers = set_peers
        self._rmpeer = rmpeer
        self._ring = ring
        self._watch: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self.rec.start(time.monotonic())
        self._main = asyncio.create_task(self._ticker(), name="weaveipam-kube")
        self._pump()

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._main, self._watch, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.client.close()

    def status(self) -> dict[str, Any]:
        return {"node": self.settings.node_name, "config": self.settings.where(),
                "namespace": self.namespace, "map": MAP_NAME, **self.rec.status()}

    # ---- the loop ---------------------------------------------------------------------

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            try:
                # heir_for reads the live ring: hand it over every tick (cheap)
                ready, heir_of = self._ring()
                self.rec.ring_changed(ready, heir_of, now)
                self.rec.tick(now)
            except Exception:
                log.exception("Kubernetes reconciler failed")
            self._pump()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        t = asyncio.ensure_future(coro)
        t.set_name(name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _pump(self) -> None:
        if self._stopping:
            return
        for o in self.rec.take_outputs():
            self._do(o)

    def _do(self, o: Output) -> None:
        if isinstance(o, Note):
            log.log({"warning": logging.WARNING, "error": logging.ERROR}.get(
                o.level, logging.INFO), "%s", o.text)
        elif isinstance(o, SetPeers):
            self._set_peers(o.addresses)
        elif isinstance(o, ListNodes):
            self._new_watch(self._list())
        elif isinstance(o, WatchNodes):
            self._new_watch(self._watch_nodes(o.resource_version))
        elif isinstance(o, ReadMap):
            self._spawn(self._read_map(), "weaveipam-kube-map")
        elif isinstance(o, WriteMap):
            self._spawn(self._write_map(o), "weaveipam-kube-map")
        elif isinstance(o, RmPeer):
            self._spawn(self._do_rmpeer(o), "weaveipam-kube-rmpeer")

    def _new_watch(self, coro: Awaitable[None]) -> None:
        """One Nodes operation at a time: a list or watch replaces the previous one."""
        if self._watch is not None and not self._watch.done() \
                and self._watch is not asyncio.current_task():
            self._watch.cancel()
        self._watch = asyncio.ensure_future(coro)

    def _feed(self, fn: Callable[[float], None]) -> None:
        try:
            fn(time.monotonic())
        except Exception:
            log.exception("Kubernetes reconciler failed")
        self._pump()

    # ---- Nodes ------------------------------------------------------------------------

    async def _list(self) -> None:
        try:
            it = self.client.list(Node)  # no resourceVersion: a quorum read, fresh
            items = [NodeInfo.from_json(n.to_dict()) async for n in it]
            rv = it.resourceVersion
        except asyncio.CancelledError:
            raise
        except Exception as e:
            p = problem(e, "list", "nodes")
            self._feed(lambda now: self.rec.nodes_failed(p, now))
            return
        nodes = [n for n in items if n is not None]
        self._feed(lambda now: self.rec.nodes_listed(nodes, rv, now))

    async def _watch_nodes(self, rv: str) -> None:
        gen = self.client.watch(Node, resource_version=rv,
                                server_timeout=WATCH_SERVER_TIMEOUT).__aiter__()
        try:
            while True:
                kind, obj = await asyncio.wait_for(gen.__anext__(), WATCH_IDLE)
                self._feed(partial(self._event, kind, obj.to_dict()))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # ERROR events (410 Expired) arrive as ApiError
            p = problem(e, "watch", "nodes")
            self._feed(lambda now: self.rec.nodes_failed(p, now))
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _event(self, kind: str, raw: dict[str, Any], now: float) -> None:
        self.rec.node_event(kind, raw, now)

    # ---- the map ----------------------------------------------------------------------

    async def _read_map(self) -> None:
        try:
            cm = await self.client.get(ConfigMap, MAP_NAME, namespace=self.namespace)
        except ApiError as e:
            if e.status.code == 404:
                self._feed(lambda now: self.rec.map_read(None, None, now))
                return
            p = problem(e, "get", "configmaps")
            self._feed(lambda now: self.rec.map_failed(p, now))
            return
        except Exception as e:
            p = problem(e, "get", "configmaps")
            self._feed(lambda now: self.rec.map_failed(p, now))
            return
        data, rv = dict(cm.data or {}), cm.metadata.resourceVersion if cm.metadata else None
        self._feed(lambda now: self.rec.map_read(data, rv, now))

    async def _write_map(self, o: WriteMap) -> None:
        verb = "create" if o.resource_version is None else "update"
        cm = ConfigMap(metadata=ObjectMeta(name=MAP_NAME, namespace=self.namespace,
                                           resourceVersion=o.resource_version),
                       data=o.data)
        try:
            if o.resource_version is None:
                out = await self.client.create(cm)
            else:
                out = await self.client.replace(cm)
        except ApiError as e:
            if e.status.code == 409:  # Conflict (stale) or AlreadyExists: re-read
                self._feed(self.rec.map_conflict)
                return
            p = problem(e, verb, "configmaps")
            self._feed(lambda now: self.rec.map_failed(p, now))
            return
        except Exception as e:
            p = problem(e, verb, "configmaps")
            self._feed(lambda now: self.rec.map_failed(p, now))
            return
        data = dict(out.data or {})
        rv = (out.metadata.resourceVersion if out.metadata else None) or ""
        self._feed(lambda now: self.rec.map_written(data, rv, now))

    # ---- reclaim ----------------------------------------------------------------------

    async def _do_rmpeer(self, o: RmPeer) -> None:
        try:
            outcome, msg = await self._rmpeer(o.peer)
        except Exception as e:
            outcome, msg = "error", str(e)
        self._feed(lambda now: self.rec.rmpeer_done(o.peer, o.node, outcome, msg, now))
