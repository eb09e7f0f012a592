"""The daemon shell: one Allocator, the Mesh and the Store, wired on one event loop.

The allocator is sans-IO and every call to it is followed by `take_outputs()`.  The
outputs of one call form a batch: its `Persist` records are committed (fsync'd) before
any of its `Send`s or `Reply`s leave, and batches are delivered strictly in order, so
nothing that was acknowledged or gossiped can be lost by a crash.  Commits of successive
batches are queued at once, so the store group-commits them under load.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import ipaddress
import itertools
import json
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .core.addr import CIDR
from .core.allocator import (
    GOSSIP_FANOUT,
    Allocator,
    Event,
    InitMode,
    Persist,
    Reply,
    Request,
    Send,
)
from .core.records import Record, Snapshot
from .mesh import ConnInfo, Mesh, MeshError, PeerInfo
from .names import check_name, default_nickname, new_name, new_uid, read_name, write_name
from .node import ApiError, StartupError
from .store import Store, StoreError, disk_error

__all__ = ["ApiError", "Config", "Daemon", "StartupError", "default_socket", "parse_hostport"]

log = logging.getLogger("weaveipam.daemon")

STORE_FILE = "ipam.db"
LOCK_FILE = "lock"
SOCKET_RECORD = "api-socket"  # the socket's path, for clients given only --data-dir
TICK = 0.1
# Idle (ready, nothing waiting, nothing but anti-entropy digests for IDLE_AFTER seconds),
# the allocator's clock ticks every IDLE_TICK instead: its only periodic work then is a
# digest every few seconds, and ten ticks a second were a third of an idle daemon's CPU.
# Any request, reachability change or message that makes work switches back at once.
IDLE_TICK = 1.0
IDLE_AFTER = 2.0
DEFAULT_PORT = 6783
MESH_STOP_TIMEOUT = 3.0
REPLY_GRACE = 5.0
FLUSH_DELAY = 0.1
PEERS_FILE = "peers.json"  # peers added or forgotten at run time (weave connect/forget)


@dataclass
class Config:
    universe: CIDR
    init: InitMode
    data_dir: Path
    default_subnet: CIDR | None = None
    peers: list[tuple[str, int]] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    conn_limit: int = 100
    name: str | None = None
    nickname: str = field(default_factory=default_nickname)
    socket: Path | None = None
    http_addr: tuple[str, int] | None = ("127.0.0.1", 6784)
    status_addr: tuple[str, int] | None = ("127.0.0.1", 6782)
    op_timeout: float = 30.0
    shutdown_grace: float = 10.0
    heartbeat: float = 5.0  # on a silent link, longer with many links (mesh/liveness.py)
    dead_timeout: float = 5.0  # a dead host or cut link (the kernel's keepalive)
    max_frame: int = 8 << 20
    pod_routes: bool = False  # route other peers' ranges via their node (routes.py)
    # --password: peers authenticate and encrypt; kept out of repr (never logged)
    password: bytes | None = field(default=None, repr=False)
    # while rotating: also accepted from peers that dial us (never used to dial)
    second_password: bytes | None = field(default=None, repr=False)
    # Kubernetes mode (weaveipam.kube.config.KubeSettings), and whether --ipalloc-init or
    # IPALLOC_INIT was given (else a first start counts Nodes for consensus=N)
    kube: Any = None
    init_explicit: bool = True

    @property
    def store_path(self) -> Path:
        return self.data_dir / STORE_FILE


def default_socket(data_dir: Path) -> Path:
    """Weave-like system path when root, else beside the state (no root needed)."""
    if os.geteuid() == 0:
        return Path("/run/weave-ipam/ipam.sock")
    return data_dir / "ipam.sock"


def parse_hostport(text: str, default_port: int | None) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address."""
    t = text.strip()
    if not t:
        raise ValueError("empty address")
    host, port_s = t, ""
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = t[1:end], t[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected :PORT after ']'")
            port_s = rest[1:]
    elif t.count(":") == 1:
        host, port_s = t.split(":")
    elif ":" in t:
        try:
            ipaddress.IPv6Address(t)
        except ValueError:
            raise ValueError(f"{text!r}: not HOST[:PORT] (write an IPv6 address with a "
                             "port as [ADDR]:PORT)") from None
    if not port_s:
        if default_port is None:
            raise ValueError(f"{text!r}: needs a port, e.g. 127.0.0.1:6784")
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: bad port {port_s!r}")
    if not host:
        raise ValueError(f"{text!r}: missing host")
    return host, int(port_s)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Closable(Protocol):
    where: str  # for the start-up log line, e.g. "API on ..., status on ..."

    async def cleanup(self) -> None: ...


# Starts the daemon's HTTP side (server.serve); what it returns is closed at shutdown.
Serve = Callable[["Daemon"], Awaitable[Closable]]


class Daemon:
    """Owns the allocator, the mesh and the store; `serve` puts it on its listeners."""

    def __init__(self, cfg: Config, serve: Serve | None = None) -> None:
        self.cfg = cfg
        self._serve = serve
        self.name = ""
        self.uid = new_uid()
        self.alloc: Allocator | None = None
        self.mesh: Mesh | None = None
        self.store: Store | None = None
        self.started_at = time.time()
        self.stopping = False
        self.store_error: str | None = None
        self.wipe_on_exit = False
        self.conn_terminations = 0
        self._rids = itertools.count(1)
        self._rng = random.Random()
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        # (deadline, rid) in deadline order: all requests share one timeout
        self._deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self._tail: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[Closable] = []
        # peers we dial as given: the command line, as changed by connect/forget
        self.direct: list[tuple[str, int]] = []
        self._lock_fd: int | None = None
        self._closed = False  # after shutdown drained the pipeline: no more engine calls
        self._busy_until = 0.0  # monotonic: tick every TICK until then (see IDLE_TICK)
        self._idle_wait: asyncio.Future[None] | None = None
        self.metrics: Any = None
        self.kube: Any = None  # weaveipam.kube.mode.KubeMode in Kubernetes mode
        self.node_local: Any = None  # weaveipam.cni.nodelocal.NodeLocal: kube-node ranges
        self.started = False  # "stopped" is logged only for a daemon that started
        # recent allocator events (takeovers, donations, seeding) for the status page
        self.events: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=50)

    # ---- public --------------------------------------------------------------------------

    @property
    def allocator(self) -> Allocator:
        assert self.alloc is not None, "daemon not started"
        return self.alloc

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or a stop request), then shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    @property
    def stop_requested(self) -> asyncio.Event:
        """Set by SIGTERM/SIGINT: long waits during start-up end on it."""
        return self._stop

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping")
        self._stop.set()

    async def call(self, req: Request) -> Any:
        """Run one API request through the allocator; its reply arrives after its batch
        (and every earlier one) is durable."""
        if self.stopping:
            raise ApiError("unavailable", "the daemon is shutting down; retry shortly")
        if self.store_error is not None:
            raise ApiError("unavailable", self.store_error)
        alloc = self.allocator
        rid = next(self._rids)
        self._busy()
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        self._deadlines.append((time.monotonic() + self.cfg.op_timeout + REPLY_GRACE, rid))
        try:
            try:
                alloc.request(rid, req, time.monotonic())
            except Exception as e:  # an engine bug must not hang the caller
                log.exception("allocator failed on %r", req)
                fut.set_exception(ApiError("internal", f"internal error: {e!r}"))
            self._drain()
            reply = await fut
        finally:
            self._waiters.pop(rid, None)
        if reply.error is not None:
            raise ApiError(reply.error.code, reply.error.message)
        return reply.value

    def allocations(self) -> dict[str, dict[int, str]]:
        """Everything held here, for `GET /ip`; refused like any request once the store
        has failed, as memory may then hold allocations that were never acknowledged."""
        if self.store_error is not None:
            raise ApiError("unavailable", self.store_error)
        return self.allocator.allocations()

    def inflight(self) -> int:
        return len(self._waiters)

    def connections(self) -> list[ConnInfo]:
        return self.mesh.connections() if self.mesh is not None else []

    def peer_nickname(self, name: str) -> str:
        if name == self.name:
            return self.cfg.nickname
        return self.allocator.nickname_of(name)

    # ---- peers added and forgotten at run time (weave connect / forget) --------------------

    def direct_peers(self) -> list[str]:
        return [addr_text(p) for p in self.direct]

    def connect_peers(self, peers: Sequence[str], replace: bool) -> None:
        """Dial these peers from now on (instead of all others, with `replace`), and
        after a restart too.  A bad address refuses the whole call: nothing changes."""
        new = self._parse_peers(peers)
        keep = [] if replace else list(self.direct)
        wanted = keep + [p for p in new if p not in keep]
        self._set_direct(wanted)

    def forget_peers(self, peers: Sequence[str]) -> None:
        """Stop dialling these peers (a connection that is up stays up, as Weave's)."""
        gone = self._parse_peers(peers)
        self._set_direct([p for p in self.direct if p not in gone])

    def _parse_peers(self, peers: Sequence[str]) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        bad: list[str] = []
        for text in peers:
            try:
                host, port = parse_hostport(text, DEFAULT_PORT)
            except ValueError as e:
                bad.append(str(e))
                continue
            if (len(host) > 255 or not host.isprintable() or port == 0
                    or any(c.isspace() for c in host)):
                bad.append(f"{text!r}: not a HOST[:PORT] to dial")
                continue
            out.append((host, port))
        if bad:
            raise ApiError("bad-request", "bad peer address: " + "; ".join(bad)
                           + " (give HOST or HOST:PORT; nothing was changed)")
        return out

    def _set_direct(self, wanted: list[tuple[str, int]]) -> None:
        """Record the new peer list durably first, then make the mesh dial it."""
        self._save_peers(wanted)
        old, self.direct = self.direct, wanted
        if self.mesh is None:
            return
        for host, port in old:
            if (host, port) not in wanted:
                self.mesh.forget_peer(host, port)
        for host, port in wanted:
            self.mesh.add_peer(host, port)

    def _save_peers(self, peers: list[tuple[str, int]]) -> None:
        """`peers`: the list to dial; `launch`: the command line it was made against, so
        a peer added to the command line later is still dialled after a restart."""
        path = self.cfg.data_dir / PEERS_FILE
        tmp = path.with_suffix(".tmp")
        doc = {"peers": [addr_text(p) for p in peers],
               "launch": [addr_text(p) for p in self.cfg.peers]}
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise ApiError("unavailable", f"cannot record the peer list in {path}: {e}; "
                           "nothing was changed") from e

    def _initial_peers(self) -> list[tuple[str, int]]:
        """The command line's peers, as changed at run time before the last stop."""
        path = self.cfg.data_dir / PEERS_FILE
        launch = list(dict.fromkeys(self.cfg.peers))
        try:
            doc = json.loads(path.read_text())
            saved = [parse_hostport(t, DEFAULT_PORT) for t in doc["peers"]]
            before = {parse_hostport(t, DEFAULT_PORT) for t in doc["launch"]}
        except FileNotFoundError:
            return launch
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s (%s): dialling the command line's peers only", path, e)
            return launch
        return list(dict.fromkeys(saved + [p for p in launch if p not in before]))

    # ---- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.default_subnet is not None and not cfg.universe.contains_cidr(cfg.default_subnet):
            raise StartupError(f"--ipalloc-default-subnet {cfg.default_subnet} is not inside "
                               f"--ipalloc-range {cfg.universe}")
        self._lock_data_dir()
        self.store = self._open_store()
        snap = self._load(self.store)
        self.name = self._resolve_name(snap)
        self._check_identity(snap)
        if cfg.kube is not None:
            from .kube.mode import make  # the client library only in Kubernetes mode

            self.kube = make(self, cfg.kube)
            await self.kube.before_allocator(first_start=snap.ring is None)
        self.direct = self._initial_peers()
        try:
            self.alloc = Allocator(name=self.name, nickname=cfg.nickname, universe=cfg.universe,
                                   init=cfg.init, rng=random.Random(),
                                   now=time.monotonic(), default_subnet=cfg.default_subnet,
                                   snapshot=snap, op_timeout=cfg.op_timeout,
                                   # consensus starts without waiting for the first pod:
                                   # /readyz (the DaemonSet's readiness) needs a ring
                                   auto_prime=True,
                                   # given peers: hear whether they hold a ring before
                                   # seeding one of our own (a joiner must not split them)
                                   expect_peers=bool(self.direct))
        except ValueError as e:
            raise StartupError(f"cannot restore state from {cfg.store_path}: {e}. "
                               + self._discard_hint()) from e
        self._keep_name()
        # the constructor's records (identity, a seed ring) are durable before we talk
        await self._commit_now(self.alloc.take_outputs())
        try:
            self.mesh = Mesh(name=self.name, nickname=cfg.nickname, uid=self.uid,
                             host=cfg.host, port=cfg.port, conn_limit=cfg.conn_limit,
                             on_message=self._on_message, on_peer_up=self._on_peer_up,
                             on_peer_down=self._on_peer_down,
                             heartbeat=cfg.heartbeat, dead_timeout=cfg.dead_timeout,
                             max_frame=cfg.max_frame, password=cfg.password,
                             second_password=cfg.second_password,
                             cluster=str(cfg.universe))
            await self.mesh.start()
        except MeshError as e:
            self.mesh = None
            hint = ("; another process holds it: give this daemon a free --port (or "
                    "another --host)" if "cannot listen" in str(e) else "")
            raise StartupError(f"peer network: {e}{hint}") from e
        for host, port in self.direct:
            try:
                self.mesh.add_peer(host, port)
            except MeshError as e:
                log.warning("ignoring peer %s:%d: %s", host, port, e)
        if self._serve is not None:
            self._runners.append(await self._serve(self))
        self._tasks.append(asyncio.create_task(self._ticker(), name="weaveipam-tick"))
        if cfg.pod_routes:
            from .routes import keep_routes
            self._tasks.append(asyncio.create_task(keep_routes(self), name="weaveipam-routes"))
        if self.kube is not None:
            self.kube.start()
        self.started = True

        log.info("weaveipam %s(%s) started: range %s, init %s, peer port %d, %d peer(s) "
                 "to dial, peer encryption %s, %s, state %s",
                 self.name, cfg.nickname,
                 cfg.universe, _init_text(cfg.init), self.mesh.listen_port, len(self.direct),
                 "enabled" if self.mesh.encrypted else "disabled",
                 ", ".join(r.where for r in self._runners) or "no API", self.alloc.state())

    def _lock_data_dir(self) -> None:
        d = self.cfg.data_dir
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StartupError(f"cannot use data dir {d}: "
                               f"{disk_error(e, e.filename or d)}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StartupError(f"another weaveipam daemon (pid {other or '?'}) is using data "
                               f"dir {d}; stop it first, or give this one its own --data-dir"
                               ) from None
        self._lock_fd = fd
        try:  # only for the message above: a full disk must not stop us here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            log.debug("could not record our pid in %s: %s", d / LOCK_FILE, e)

    def _open_store(self) -> Store:
        """The store's errors say what is wrong and what to do; discarding the state is
        advised only for a file that is not a usable store."""
        try:
            return Store(self.cfg.store_path)
        except StoreError as e:
            raise StartupError(str(e)) from e

    def _load(self, store: Store) -> Snapshot:
        try:
            return store.load()
        except StoreError as e:
            raise StartupError(str(e)) from e

    def _keep_name(self) -> None:
        """Keep the name beside the state (no write at all when it is already there)."""
        d = self.cfg.data_dir
        try:
            if read_name(d) != self.name:
                write_name(d, self.name)
        except OSError as e:
            raise StartupError(f"cannot record this peer's name in {d}: "
                               f"{disk_error(e, e.filename or d)}") from e

    def _discard_hint(self) -> str:
        d = self.cfg.data_dir
        return (f"To discard it (this peer's recorded allocations are lost), run "
                f"`weaveipam reset --data-dir {d} --force` or delete {self.cfg.store_path}* "
                "while the daemon is stopped")

    def _resolve_name(self, snap: Snapshot) -> str:
        cfg = self.cfg
        try:
            kept = read_name(cfg.data_dir)
        except OSError as e:
            raise StartupError(f"cannot read this peer's name from {cfg.data_dir}: "
                               f"{disk_error(e, e.filename or cfg.data_dir)}") from e
        if snap.name is None and not cfg.name:
            # New state is a new peer: a name kept from state that is gone would let the
            # cluster hand its old ranges back to us as if empty while its pods still hold
            # addresses there (Weave #2610). The old name's ranges wait for rmpeer.
            name = new_name()
            if kept and kept != name:
                log.warning("no state in %s: starting as a new peer %s. The earlier peer "
                            "%s of this data dir lost its state; once its pods are gone, "
                            "run `weaveipam rmpeer %s` on another node to free its ranges",
                            cfg.store_path, name, kept, kept)
            return name
        name = cfg.name or snap.name or kept or new_name()
        err = check_name(name)
        if err:
            raise StartupError(f"--name {name!r}: {err}")
        return name

    def _check_identity(self, snap: Snapshot) -> None:
        """Never drop state silently (Weave discarded it; its #2610 duplicated addresses)."""
        if snap.name is None:
            return
        uni = str(self.cfg.universe)
        if snap.name == self.name and snap.universe == uni:
            return
        keep = []
        if snap.universe != uni:
            keep.append(f"--ipalloc-range {snap.universe}")
        if snap.name != self.name:
            keep.append(f"--name {snap.name}")
        raise StartupError(
            f"the state in {self.cfg.store_path} belongs to peer {snap.name} with range "
            f"{snap.universe}, but this daemon is peer {self.name} with range {uni}; "
            f"refusing to start rather than drop it. To keep it, start with "
            f"{' '.join(keep)}. " + self._discard_hint())

    # ---- the output pipeline ---------------------------------------------------------------

    def _run(self, what: str, fn: Callable[[float], None]) -> None:
        """Call into the allocator; its bugs are logged, never fatal to the daemon."""
        if self.alloc is None or self._closed:
            return
        try:
            fn(time.monotonic())
        except Exception:
            log.exception("allocator failed handling %s", what)
        self._drain()

    def _drain(self) -> None:
        assert self.alloc is not None
        outs = self.alloc.take_outputs()
        if not outs:
            return
        if any(not isinstance(o, Send) or o.msg.get("t") != "digest" for o in outs):
            self._busy()
        records: list[Record] = []
        deliver: list[Reply | Send] = []
        for o in outs:
            if isinstance(o, Persist):
                records.append(o.record)
            elif isinstance(o, Event):
                self._event(o)
            else:
                deliver.append(o)
        if not records and (self._tail is None or self._tail.done()):
            self._deliver(deliver)  # nothing to persist and nothing ahead: no task needed
            return
        if not records and not deliver:
            return
        self._tail = asyncio.create_task(self._finish(self._tail, records, deliver))

    async def _finish(self, prev: asyncio.Task[None] | None, records: list[Record],
                      deliver: list[Reply | Send]) -> None:
        err: BaseException | None = None
        try:
            if records:
                assert self.store is not None
                try:
                    await self.store.commit(records)
                except (StoreError, OSError) as e:
                    err = e
            if prev is not None:
                await prev  # never raises: every _finish catches its own errors
            if err is not None:
                self._store_failed(err, deliver)
            else:
                self._deliver(deliver)
        except Exception:
            log.exception("output delivery failed")

    def _deliver(self, outs: list[Reply | Send]) -> None:
        broken = self.store_error is not None
        for o in outs:
            if isinstance(o, Reply):
                fut = self._waiters.get(o.rid)
                if fut is None or fut.done():
                    continue
                if broken:
                    fut.set_exception(ApiError("unavailable", self.store_error or ""))
                else:
                    fut.set_result(o)
            elif not broken and self.mesh is not None:
                try:
                    if o.dest is None:
                        self._gossip(o.msg)
                    else:
                        self.mesh.send(o.dest, o.msg)
                except MeshError as e:
                    log.warning("could not send %s to %s: %s", o.msg.get("t"),
                                o.dest or "neighbours", e)

    def _event(self, e: Event) -> None:
        """Log an allocator event, and keep it for the status page's recent events."""
        log.log(_LEVELS.get(e.level, logging.INFO), "%s", e.text)
        self.events.append((time.time(), e.level, e.text))

    def _gossip(self, msg: dict[str, Any]) -> None:
        """Push gossip: at most GOSSIP_FANOUT random direct neighbours (as the simulator)."""
        assert self.mesh is not None
        nbrs = self.mesh.neighbours()
        if len(nbrs) <= GOSSIP_FANOUT:
            self.mesh.broadcast(msg)
            return
        for name in self._rng.sample(nbrs, GOSSIP_FANOUT):
            self.mesh.send(name, msg)

    def fail_store(self, err: BaseException) -> None:
        """A commit outside the allocator's pipeline (kube-node ranges) failed."""
        self._store_failed(err, [])

    def _store_failed(self, err: BaseException, outs: list[Reply | Send]) -> None:
        """Memory is now ahead of disk: acknowledge nothing more until a restart reloads."""
        if self.store_error is None:
            self.store_error = (f"the store failed, so this peer answers no request until "
                                "it is restarted (what it holds in memory may be ahead of "
                                f"the disk) and /healthz fails: {err}")
            log.error("%s", self.store_error)
        self._deliver(outs)

    async def _commit_now(self, outs: list[Any]) -> None:
        assert self.store is not None
        records = [o.record for o in outs if isinstance(o, Persist)]
        for o in outs:
            if isinstance(o, Event):
                self._event(o)
        if records:
            try:
                await self.store.commit(records)
            except StoreError as e:
                raise StartupError(str(e)) from e
        sends = [o for o in outs if isinstance(o, Send)]
        if sends:  # none before the mesh exists; kept for the allocator's sake
            log.debug("dropping %d startup message(s): no peers yet", len(sends))

    # ---- mesh callbacks --------------------------------------------------------------------

    def _on_message(self, origin: str, payload: dict[str, Any]) -> None:
        self._run(f"a message from {origin}",
                  lambda now: self.allocator.receive(origin, payload, now))

    def _on_peer_up(self, p: PeerInfo) -> None:
        log.info("peer %s(%s) reachable", p.name, p.nickname)
        self._busy()
        self._run("peer up", lambda now: self.allocator.peer_up(p.name, p.nickname, now))

    def _on_peer_down(self, name: str) -> None:
        log.info("peer %s unreachable", name)
        self._busy()
        self._run("peer down", lambda now: self.allocator.peer_down(name, now))

    # ---- timers ----------------------------------------------------------------------------

    def _busy(self) -> None:
        """Something happened: tick every TICK for a while (and now, if idling)."""
        self._busy_until = time.monotonic() + IDLE_AFTER
        if self._idle_wait is not None and not self._idle_wait.done():
            self._idle_wait.set_result(None)

    def _idle(self) -> bool:
        return (time.monotonic() >= self._busy_until and not self._waiters
                and self.allocator.state() == "ready" and not self.allocator.pending_ops())

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._idle():
                self._idle_wait = wait = loop.create_future()
                timer = loop.call_later(IDLE_TICK, _wake, wait)
                await wait
                timer.cancel()
            else:
                await asyncio.sleep(TICK)
            if self.allocator.expect_peers and self.mesh is not None \
                    and self.mesh.only_ourselves():
                self.allocator.no_other_peers()  # a shared peer list on its only node
            self._run("tick", lambda now: self.allocator.tick(now))
            self._expire_waiters()

    def _expire_waiters(self) -> None:
        """The engine answers every request within op_timeout; this only matters if an
        engine bug dropped a reply, so that the caller is not left hanging."""
        now = time.monotonic()
        dl = self._deadlines
        while dl and (dl[0][0] <= now or dl[0][1] not in self._waiters):
            _, rid = dl.popleft()
            fut = self._waiters.get(rid)
            if fut is not None and not fut.done():
                log.error("no reply from the allocator for request %d", rid)
                fut.set_exception(ApiError("unavailable", "no answer from the allocator in "
                                           "time (an internal error: see the daemon log); "
                                           "retry"))

    def poll_connections(self) -> None:
        """weave_connection_terminations_total: established connections that ended, as
        the mesh counts them (read at each scrape)."""
        if self.mesh is not None:
            self.conn_terminations = self.mesh.terminations

    # ---- stop ------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop promptly: work still waiting in the engine (for consensus, space, a ring or
        an heir) is failed with "shutting down"; only batches already being committed are
        waited for.  Then close the servers, the mesh and the store."""
        self.stopping = True
        if self.kube is not None:
            await self.kube.stop()
        # Nothing more reaches the engine: waiting work could only finish by handing out
        # an address nobody may hear about, and a peer's message could make it promise
        # what it can no longer keep.
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._tail is not None:  # committed and handed on (e.g. a reset's handover)
            done, _ = await asyncio.wait({self._tail}, timeout=self.cfg.shutdown_grace)
            if not done:
                log.warning("store commits still in flight after %gs; stopping anyway",
                            self.cfg.shutdown_grace)
        waiting = [f for f in self._waiters.values() if not f.done()]
        if waiting:
            log.info("stopping: %d request(s) waiting for consensus, space or a peer "
                     "answered \"shutting down\"", len(waiting))
        for fut in waiting:
            fut.set_exception(ApiError("unavailable", "the daemon is shutting down; this "
                                       "request was still waiting and nothing was done: "
                                       "retry once the daemon is back"))
        if self.mesh is not None:
            await asyncio.sleep(FLUSH_DELAY)  # the mesh drops unwritten frames at stop
            stop = asyncio.create_task(self.mesh.stop())
            done, _ = await asyncio.wait({stop}, timeout=MESH_STOP_TIMEOUT)
            if not done:
                log.warning("the peer network did not stop within %gs; exiting anyway",
                            MESH_STOP_TIMEOUT)
                _log_tasks()
                stop.cancel()
            elif stop.exception() is not None:
                log.error("stopping the peer network failed", exc_info=stop.exception())
        if self._tail is not None:
            await self._tail  # every batch durable, every reply handed to its handler
        for r in reversed(self._runners):
            with contextlib.suppress(Exception):
                await r.cleanup()
        self._runners.clear()
        if self.store is not None:
            if self.wipe_on_exit and self.store_error is None:
                try:
                    self.store.wipe()
                    log.info("state in %s discarded (reset)", self.cfg.store_path)
                except StoreError as e:
                    log.error("%s", e)
            await self.store.aclose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.started:
            log.info("stopped")


def _log_tasks() -> None:
    """Where every task is stuck: for diagnosing a shutdown that hangs."""
    import io

    for t in asyncio.all_tasks():
        buf = io.StringIO()
        t.print_stack(file=buf)
        log.warning("task %s:\n%s", t.get_name(), buf.getvalue())


_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def addr_text(a: tuple[str, int] | None, before: str = "") -> str:
    if a is None:
        return ""
    host = f"[{a[0]}]" if ":" in a[0] else a[0]
    return f"{before}{host}:{a[1]}"


def _init_text(m: InitMode) -> str:
    if m.kind == "consensus":
        return f"consensus={m.count}"
    if m.kind == "seed":
        return "seed=" + ",".join(m.seeds)
    return m.kind


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
