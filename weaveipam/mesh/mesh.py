"""The peer network: listener, dialler, topology gossip, routing and delivery.

The allocation engine is sans-IO; this is the IO half that carries its payloads.  All
state lives on one event loop and every mutation happens synchronously between awaits,
so there are no locks.  Engine callbacks are invoked synchronously and shielded: an
exception in one is logged and does not affect the mesh.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from . import crypto
from .connection import ConnConfig, Connection
from .frames import (
    DEFAULT_MAX_OBJECTS,
    DEFAULT_TTL,
    HEADER_LEN,
    MAX_NAME_LEN,
    PROTOCOL_VERSION,
    ErrorFrame,
    Frame,
    FrameError,
    Heartbeat,
    Hello,
    KeyExchange,
    MeshError,
    Message,
    Neighbour,
    PeerEntry,
    TopologyFrame,
    decode_payload_async,
    encode,
    encode_payload,
)
from .handshake import Verdict, judge, keep_new
from .liveness import Liveness
from .topology import Topology

log = logging.getLogger("weaveipam.mesh")

INITIAL_BACKOFF = 0.2
MAX_BACKOFF = 30.0
# a connection must have lasted this long for its redial to start from INITIAL_BACKOFF
# again; one that keeps failing soon after its handshake backs off like a failed dial
STABLE_AFTER = 10.0
# handshakes in progress at once: at most this many dials of ours, and this many
# inbound ones in all (besides max_per_ip per address); a handshake costs a task, a
# socket and, with a password, key agreement: a starting cluster must not drown in them
MAX_DIALS = 8
MAX_INBOUND_HANDSHAKES = 32
# periodic full topology goes to this many random neighbours per gossip_interval: it
# only repairs what a lost delta left behind, so its cost must not grow with N
REPAIR_FANOUT = 1
# a simultaneous dial by both ends is settled by the tie-break while the first
# connection is younger than this; later, the established connection simply stays
TIE_WINDOW = 1.0
_TOPO_CHUNK = 64  # entries per topology frame (split further if a chunk is too big)
# our own entry changes with every connection made or lost; changes this close together
# go out as one (a starting mesh makes dozens a second)
OWN_GOSSIP_DELAY = 0.02
_U64 = (1 << 64) - 1

ConnState = Literal["established", "connecting", "failed", "pending"]


@dataclass(frozen=True)
class PeerInfo:
    name: str
    nickname: str
    uid: int


@dataclass(frozen=True)
class ConnInfo:
    """One row of connection status: a live connection or a dial target."""

    name: str  # "" until the handshake tells us
    nickname: str
    address: str
    state: ConnState
    outbound: bool
    encrypted: bool
    info: str  # last error, for "failed" targets


@dataclass(eq=False)
class _Target:
    """An address we dial: given by add_peer (explicit) or learned through gossip."""

    host: str
    port: int
    explicit: bool
    peer_name: str | None = None  # who answered last time (or who gossip says is there)
    backoff: float = INITIAL_BACKOFF
    next_try: float = 0.0
    task: asyncio.Task[None] | None = None
    dialling: bool = False  # TCP connect in progress
    conn: Connection | None = None
    last_error: str = ""
    to_self: bool = False  # it is our own listen address: never dial again

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _host_port(host: str, port: int) -> tuple[str, int]:
    if not isinstance(host, str) or not 0 < len(host) <= MAX_NAME_LEN or not host.isprintable():
        raise MeshError(f"bad peer host {host!r}")
    if type(port) is not int or not 0 < port <= 65535:
        raise MeshError(f"bad peer port {port!r}")
    return host, port


class _ConnEvents:
    """Routes connection events to the mesh without making them public Mesh methods."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def on_hello(self, conn: Connection, hello: Hello) -> None:
        self._mesh._on_hello(conn, hello)

    async def on_frame(self, conn: Connection, frame: Frame) -> None:
        await self._mesh._on_frame(conn, frame)


class Mesh:
    """A node of the gossip mesh.  See the package docstring for the contract."""

    def __init__(
        self,
        *,
        name: str,
        nickname: str,
        uid: int,
        host: str = "0.0.0.0",
        port: int = 6783,
        conn_limit: int = 100,
        on_message: Callable[[str, dict[str, Any]], None],
        on_peer_up: Callable[[PeerInfo], None],
        on_peer_down: Callable[[str], None],
        heartbeat: float = 5.0,
        dead_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
        gossip_interval: float = 30.0,
        forget_after: float = 60.0,
        max_frame: int = 8 << 20,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        send_queue: int = 1024,
        send_queue_bytes: int | None = None,
        password: bytes | None = None,
        second_password: bytes | None = None,
        cluster: str = "",
        max_per_ip: int = 8,
    ) -> None:
        # Only the derived secrets are kept (inside ConnConfig, out of its repr); they
        # are derived here, once, as the KDF is deliberately slow.  ``cluster`` salts it.
        if second_password is not None and password is None:
            raise MeshError("a second password needs a first one")
        keys = (crypto.Keyring([p for p in (password, second_password) if p is not None],
                               cluster) if password is not None else None)
        if max_per_ip < 1:
            raise MeshError("max_per_ip must be at least 1")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN \
                or not name.isprintable():
            raise MeshError(f"bad peer name {name!r}")
        if not isinstance(nickname, str) or len(nickname) > MAX_NAME_LEN \
                or not nickname.isprintable():
            raise MeshError(f"bad nickname {nickname!r}")
        if type(uid) is not int or not 0 <= uid <= _U64:
            raise MeshError(f"uid must be an unsigned 64-bit integer, not {uid!r}")
        if not 0 <= port <= 65535:
            raise MeshError(f"bad listen port {port!r}")
        if conn_limit < 1:
            raise MeshError("conn_limit must be at least 1")
        if not (heartbeat > 0 and dead_timeout > 0 and handshake_timeout > 0):
            raise MeshError("heartbeat, dead_timeout and handshake_timeout must be positive")
        if max_frame < 1024:
            raise MeshError("max_frame must be at least 1024 bytes")
        self._name = name
        self._nickname = nickname
        self._uid = uid
        self._host = host
        self._port = port
        self._conn_limit = conn_limit
        self._on_message = on_message
        self._on_peer_up = on_peer_up
        self._on_peer_down = on_peer_down
        #: hellos refused because their name is in use, by reason (see _refuse)
        self._refused: Counter[str] = Counter({"own-name": 0, "name-in-use": 0})
        self._gossip_interval = gossip_interval
        self._forget_after = forget_after
        self._handshake_timeout = handshake_timeout
        self._max_frame = max_frame
        self._max_per_ip = max_per_ip
        self._cfg = ConnConfig(
            max_frame=max_frame, heartbeat=heartbeat, dead_timeout=dead_timeout,
            handshake_timeout=handshake_timeout, queue_frames=send_queue,
            max_objects=max_objects, keys=keys,
            queue_bytes=send_queue_bytes if send_queue_bytes is not None else 4 * max_frame,
        )
        self._session = secrets.randbits(64)
        self._rng = random.Random()
        # Versions start from the wall clock so a restarted peer's entry beats the
        # leftovers of its previous run that others still hold.
        self._topo = Topology(name, nickname, uid, time.time_ns() // 1000)
        self._conns: set[Connection] = set()
        self._established: dict[str, Connection] = {}
        self._targets: dict[tuple[str, int], _Target] = {}
        self._reachable: dict[str, PeerInfo] = {}
        self._next_hop: dict[str, str] = {}
        self._unreachable_since: dict[str, float] = {}
        self._server: asyncio.Server | None = None
        self._liveness: Liveness | None = None
        #: established connections that have ended (weave_connection_terminations_total)
        self.terminations = 0
        self._own_timer: asyncio.TimerHandle | None = None
        self._listen_port: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._events = _ConnEvents(self)
        self._wake = asyncio.Event()
        self._started = False
        self._stopping = False

    # ================================================================== public API

    @property
    def name(self) -> str:
        return self._name

    @property
    def nickname(self) -> str:
        return self._nickname

    @property
    def uid(self) -> int:
        return self._uid

    @property
    def encrypted(self) -> bool:
        """Whether this mesh was given a password (all its peer traffic is encrypted)."""
        return self._cfg.keys is not None

    @property
    def listen_port(self) -> int:
        if self._listen_port is None:
            raise MeshError("mesh not started")
        return self._listen_port

    async def start(self) -> None:
        """Listen for peers and start dialling (port=0 picks a free port)."""
        if self._started:
            raise MeshError("mesh already started")
        try:
            self._server = await asyncio.start_server(self._accept, self._host, self._port)
        except OSError as exc:
            raise MeshError(f"cannot listen on {self._host}:{self._port}: {exc}") from exc
        self._listen_port = int(self._server.sockets[0].getsockname()[1])
        self._started = True
        self._liveness = Liveness(self._cfg.heartbeat, self._cfg.dead_timeout,
                                  self._handshake_timeout, asyncio.get_running_loop().time())
        self._loops = [self._spawn(self._maker_loop(), "mesh-maker"),
                       self._spawn(self._gossip_loop(), "mesh-gossip"),
                       self._spawn(self._liveness_loop(), "mesh-liveness")]
        log.info("mesh %s(%s) listening on %s:%d", self._name, self._nickname, self._host,
                 self._listen_port)

    async def stop(self) -> None:
        """Close every connection and cancel every task.  Reachability callbacks are not
        called for the peers lost this way: the engine is going away too.
        """
        if not self._started or self._stopping:
            return
        self._stopping = True
        if self._own_timer is not None:
            self._own_timer.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.close("mesh stopping")
        for task in self._loops:
            task.cancel()
        for target in self._targets.values():
            if target.task is not None and target.dialling:
                target.task.cancel()
        # Handlers for connections accepted just before close() may still be starting,
        # hence the loop.  Closing flushes for at most ConnConfig.close_timeout, so this
        # is quick; anything still running after that is a bug, cancelled and logged.
        deadline = asyncio.get_running_loop().time() + 5.0
        while self._tasks:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.error("mesh tasks did not stop, cancelling: %s", self._tasks)
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
                break
            await asyncio.wait(list(self._tasks), timeout=remaining)
            await asyncio.sleep(0)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("mesh %s stopped", self._name)

    def add_peer(self, host: str, port: int) -> None:
        """Dial ``host:port`` now and re-dial whenever it is not connected, until
        stopped or forgotten.  Explicit peers are dialled even beyond ``conn_limit``.
        """
        key = _host_port(host, port)
        target = self._targets.get(key)
        if target is None:
            self._targets[key] = _Target(host, port, explicit=True)
        elif not target.explicit:
            target.explicit = True
            target.backoff, target.next_try, target.to_self = INITIAL_BACKOFF, 0.0, False
        self._wake.set()

    def only_ourselves(self) -> bool:
        """Was every peer address we were given our own (a shared peer list on a lone node)?"""
        given = [t for t in self._targets.values() if t.explicit]
        return bool(given) and all(t.to_self for t in given)

    def forget_peer(self, host: str, port: int) -> None:
        """Stop (re-)dialling ``host:port``.  Like Weave's ``forget``, a connection that
        is already up stays up; it just is not re-dialled once it drops.
        """
        target = self._targets.pop(_host_port(host, port), None)
        if target is not None and target.task is not None and target.dialling:
            target.task.cancel()

    def send(self, dest: str, payload: dict[str, Any]) -> bool:
        """Send to one peer, directly or relayed along a shortest path.

        Returns False if ``dest`` is unreachable (or is us), or the first hop's queue
        just overflowed.  Raises MeshError for a payload that cannot be sent at all.
        """
        if not self._started or self._stopping or dest == self._name:
            return False
        frame = self._message(dest, DEFAULT_TTL, encode_payload(payload))
        conn = self._route(dest)
        return conn is not None and conn.send_frame(frame)

    def broadcast(self, payload: dict[str, Any]) -> None:
        """Send to every directly connected peer (no relaying: the engine re-gossips)."""
        if not self._started or self._stopping:
            return
        body = encode_payload(payload)
        for name, conn in list(self._established.items()):
            conn.send_frame(self._message(name, 1, body))

    def neighbours(self) -> list[str]:
        """Names of the peers we have an established connection to."""
        return [name for name, conn in self._established.items() if not conn.closing]

    @property
    def overloaded(self) -> bool:
        """Our event loop ran late at the last liveness check: work is arriving faster
        than it is done, so optional work (periodic repair) waits."""
        return self._liveness is not None and self._liveness.overloaded

    def reachable(self) -> list[PeerInfo]:
        """Peers we can currently reach, directly or through relays."""
        return sorted(self._reachable.values(), key=lambda p: p.name)

    def refused_hellos(self) -> dict[str, int]:
        """How many hellos were refused for claiming a name in use, by reason:
        ``own-name`` (ours) or ``name-in-use`` (a peer we have a connection to)."""
        return dict(self._refused)

    def connections(self) -> list[ConnInfo]:
        """Live connections plus dial targets that are connecting or waiting to retry."""
        rows: list[ConnInfo] = []
        for conn in self._conns:
            if conn.closing or conn.state == "closed":
                continue
            rows.append(ConnInfo(
                name=conn.peer.name if conn.peer else "",
                nickname=conn.peer.nickname if conn.peer else "",
                address=conn.address, state=conn.state, outbound=conn.outbound,
                encrypted=conn.encrypted, info=""))
        for t in self._targets.values():
            state: ConnState
            if t.conn is not None or t.to_self or (t.peer_name is not None
                                                   and t.peer_name in self._established):
                continue  # our own address in a shared peer list is not a connection
            if t.dialling:
                state = "connecting"
            elif t.last_error:
                state = "failed"
            elif t.explicit:
                state = "connecting"
            else:
                continue
            rows.append(ConnInfo(name=t.peer_name or "", nickname="", address=t.address,
                                 state=state, outbound=True, encrypted=False,
                                 info=t.last_error))
        return sorted(rows, key=lambda r: (r.address, r.name))

    # ================================================================== tasks

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mesh task %s crashed", task.get_name(), exc_info=task.exception())

    def _call(self, what: str, fn: Callable[..., None] | None, *args: Any) -> None:
        """Run an engine callback; its bugs are logged, never allowed to break the mesh."""
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("%s callback raised", what)

    # ================================================================== connections

    def _new_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                  outbound: bool, address: str, remote_host: str) -> Connection:
        ours = Hello(PROTOCOL_VERSION, self._name, self._nickname, self._uid,
                     self._listen_port or 0, self._session, secrets.randbits(64),
                     encrypt=self._cfg.keys is not None)
        conn = Connection(reader, writer, outbound=outbound, address=address,
                          remote_host=remote_host, ours=ours, config=self._cfg,
                          handler=self._events)
        self._conns.add(conn)
        return conn

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._stopping or task is None:
            writer.transport.abort()
            return
        self._tasks.add(task)
        try:
            peer = writer.get_extra_info("peername")
            host = str(peer[0]) if peer else "unknown"
            address = f"[{host}]:{peer[1]}" if peer and ":" in host else \
                f"{host}:{peer[1] if peer else 0}"
            conn = self._new_conn(reader, writer, outbound=False, address=address,
                                  remote_host=host)
            # Half-done handshakes are what a flood from one address costs us (a task and
            # a socket each until handshake_timeout); established peers are bounded by
            # one per name and conn_limit, and with a password they are authenticated.
            # Counting only those keeps several daemons on one host (tests) working.
            same_ip = sum(1 for c in self._conns if not c.outbound and c.remote_host == host
                          and c.state == "pending" and not c.closing)
            if same_ip > self._max_per_ip:
                conn.close(f"too many connections from {host} (limit {self._max_per_ip} "
                           "per address in the handshake): refusing this one",
                           level=logging.WARNING,
                           farewell="too many connections from your address")
            elif len(self._conns) - 1 + self._dialling() >= self._conn_limit:
                conn.close("connection limit reached", farewell="connection limit reached")
            elif self._handshakes(inbound=True) > MAX_INBOUND_HANDSHAKES:
                conn.close(f"busy: {MAX_INBOUND_HANDSHAKES} handshakes in progress, refusing "
                           "this one (it is redialled later)",
                           farewell="busy: too many handshakes in progress, retry later")
            try:
                await conn.run()
            finally:
                self._conn_closed(conn)
        finally:
            self._tasks.discard(task)

    def _dialling(self) -> int:
        return sum(1 for t in self._targets.values() if t.dialling)

    def _handshakes(self, inbound: bool) -> int:
        """Connections of ours (or, ``inbound``, of others) still in the handshake, and
        for ours also the dials still connecting."""
        if inbound:
            return sum(1 for c in self._conns
                       if not c.outbound and c.state == "pending" and not c.closing)
        return sum(1 for t in self._targets.values() if t.task is not None and (
            t.dialling or (t.conn is not None and t.conn.state == "pending")))

    def _on_hello(self, conn: Connection, hello: Hello) -> None:
        """Handshake policy: refuse ourselves, clones of our name, and the losing half
        of a duplicate connection; otherwise the connection becomes established.
        """
        verdict = judge(conn.ours, hello)
        if verdict is Verdict.SELF:
            conn.to_self = True
            conn.close("connected to ourselves", level=logging.DEBUG,
                       farewell="connected to ourselves")
            return
        if verdict is Verdict.DUPLICATE_NAME:
            # A hello is not proof of anything (without --password anyone can send one):
            # refuse it and carry on.  Only ring entries we did not write would show a
            # second instance really acting under our name; the allocator judges those.
            self._refuse(conn, hello, "own-name",
                         f"it claims our own name (our uid is {self._uid}): a cloned "
                         "machine, or a stranger on the peer port",
                         f"peer name {hello.name!r} is this peer's own name")
            return
        if self._stopping:
            conn.close("mesh stopping")
            return
        existing = self._established.get(hello.name)
        if existing is not None and not existing.closing:
            assert existing.peer is not None
            if (existing.peer.session, existing.peer.uid) != (hello.session, hello.uid):
                self._refuse(conn, hello, "name-in-use",
                             f"we already have an established connection to {hello.name} "
                             f"at {existing.address} (uid {existing.peer.uid}), which stays",
                             f"peer name {hello.name!r} is already connected here")
                return
            # the same peer process dialled twice: a simultaneous dial is settled the same
            # way at both ends; later, the established connection simply stays
            young = asyncio.get_running_loop().time() - existing.established_at < TIE_WINDOW
            if not young or not keep_new(existing.identity(), conn.identity()):
                conn.close(f"duplicate connection to {hello.name}: keeping the other one")
                return
        if existing is not None:
            existing.close(f"duplicate connection to {hello.name}: superseded")
        conn.state = "established"
        self._established[hello.name] = conn
        log.info("connection %s %s(%s) at %s established", "to" if conn.outbound else "from",
                 hello.name, hello.nickname, conn.address)
        self._refresh_own()
        entries = self._gossipable()  # ours first, then those the new peer may lack:
        self._send_topology(conn, entries[:1] + self._unsent(entries[1:], hello.name))
        self._own_changed()
        self._recompute()
        self._wake.set()

    def _refuse(self, conn: Connection, hello: Hello, reason: str, why: str,
                farewell: str) -> None:
        """Close a connection whose hello claims a name that is in use; log and count it."""
        self._refused[reason] += 1
        conn.close(f"refusing hello from {conn.address} naming itself {hello.name}"
                   f"({hello.nickname}) with uid {hello.uid}: {why}", level=logging.WARNING,
                   farewell=farewell)

    def _conn_closed(self, conn: Connection) -> None:
        self._conns.discard(conn)
        peer = conn.peer
        if conn.was_established:
            self.terminations += 1
        if peer is not None and self._established.get(peer.name) is conn:
            del self._established[peer.name]
            if not self._stopping:
                if self._refresh_own():
                    self._own_changed()
                self._recompute()
        self._wake.set()

    async def _on_frame(self, conn: Connection, frame: Frame) -> None:
        # anything received is a sign of life; if this link has been silent our way, say
        # something back, so that a peer judging us by its own (maybe shorter, maybe an
        # older version's 5 s) deadline hears from us in time
        if self._liveness is not None and asyncio.get_running_loop().time() \
                - conn.last_tx >= self._liveness.reply_after():
            conn.send_heartbeat()
        if isinstance(frame, Message):
            await self._handle_message(conn, frame)
        elif isinstance(frame, TopologyFrame):
            self._handle_topology(conn, frame)
        elif isinstance(frame, Heartbeat):
            pass  # answered above if need be
        elif isinstance(frame, ErrorFrame):
            conn.close(f"peer reported error: {frame.reason!r}", level=logging.WARNING)
        elif isinstance(frame, Hello):
            conn.close("protocol error: unexpected second hello", level=logging.WARNING,
                       farewell="unexpected second hello")
        else:  # kx/auth belong to the handshake only
            what = "key exchange" if isinstance(frame, KeyExchange) else "auth"
            conn.close(f"protocol error: unexpected {what} frame after the handshake",
                       level=logging.WARNING, farewell=f"unexpected {what} frame")

    # ================================================================== messages

    def _message(self, dest: str, ttl: int, body: bytes) -> bytes:
        frame = encode(Message(self._name, dest, ttl, body))
        if len(frame) - HEADER_LEN > self._max_frame:
            raise MeshError(f"payload of {len(body)} bytes exceeds max_frame {self._max_frame}")
        return frame

    def _route(self, dest: str) -> Connection | None:
        conn = self._established.get(dest)
        if conn is None:
            hop = self._next_hop.get(dest)
            conn = self._established.get(hop) if hop is not None else None
        return None if conn is None or conn.closing else conn

    async def _handle_message(self, conn: Connection, msg: Message) -> None:
        assert conn.peer is not None
        if msg.src == self._name:
            log.warning("dropping message from %s that claims to come from us", conn.peer.name)
            return
        if msg.dst == self._name:
            try:
                payload = await decode_payload_async(msg.body, self._cfg.max_objects)
            except FrameError as exc:
                if msg.src == conn.peer.name:
                    reason = f"protocol error: bad payload: {exc}"
                    conn.close(reason, level=logging.WARNING, farewell=reason)
                else:  # the relay is not to blame for what it carried
                    log.warning("dropping message from %s relayed by %s: bad payload: %s",
                                msg.src, conn.peer.name, exc)
                return
            if not self._stopping:
                self._call("on_message", self._on_message, msg.src, payload)
            return
        if msg.ttl <= 1:
            log.debug("dropping message %s->%s: hop limit reached", msg.src, msg.dst)
            return
        nxt = self._route(msg.dst)
        if nxt is None:
            log.debug("dropping message %s->%s: no route", msg.src, msg.dst)
            return
        nxt.send_frame(encode(Message(msg.src, msg.dst, msg.ttl - 1, msg.body)))

    # ================================================================== topology

    def _refresh_own(self) -> bool:
        nbrs = [Neighbour(name, conn.remote_host, conn.peer.port)
                for name, conn in self._established.items() if conn.peer is not None]
        return self._topo.set_own_neighbours(nbrs)

    def _own_changed(self) -> None:
        if self._own_timer is None:
            self._own_timer = asyncio.get_running_loop().call_later(
                OWN_GOSSIP_DELAY, self._gossip_own)

    def _gossip_own(self) -> None:
        self._own_timer = None
        if not self._stopping:
            self._gossip([self._topo.own])

    def _gossipable(self, names: Iterable[str] | None = None) -> list[PeerEntry]:
        """Our own entry plus entries of reachable peers.  Unreachable (stale) entries
        are never passed on, so they die out instead of bouncing around forever.
        """
        wanted = self._reachable.keys() if names is None else names
        out = [self._topo.own]
        for name in wanted:
            entry = self._topo.get(name)
            if entry is not None and name in self._reachable and name != self._name:
                out.append(entry)
        return out

    def _topology_frames(self, entries: list[PeerEntry]) -> list[bytes]:
        """Split entries into frames the receiver accepts (max_frame, max_objects)."""
        frames: list[bytes] = []
        chunks: deque[list[PeerEntry]] = deque()
        limit = self._cfg.max_objects - 8  # the frame's own map, keys and list
        current: list[PeerEntry] = []
        objects = 0
        for entry in entries:
            cost = 12 + 4 * len(entry.neighbours)  # map, 5 keys, 4 values, list, nbrs
            if cost > limit:
                log.warning("not gossiping entry of %s: too many neighbours", entry.name)
                continue
            if current and (objects + cost > limit or len(current) >= _TOPO_CHUNK):
                chunks.append(current)
                current, objects = [], 0
            current.append(entry)
            objects += cost
        if current:
            chunks.append(current)
        while chunks:
            chunk = chunks.popleft()
            data = encode(TopologyFrame(tuple(chunk)))
            if len(data) - HEADER_LEN <= self._max_frame:
                frames.append(data)
            elif len(chunk) > 1:
                half = len(chunk) // 2
                chunks.extendleft([chunk[half:], chunk[:half]])
            else:
                log.warning("not gossiping entry of %s: larger than max_frame", chunk[0].name)
        return frames

    def _send_topology(self, conn: Connection, entries: list[PeerEntry]) -> None:
        for data in self._topology_frames(entries):
            conn.send_frame(data)

    def _gossip(self, entries: list[PeerEntry], exclude: Connection | None = None) -> None:
        if not entries:
            return
        frames = self._topology_frames(entries)
        for conn in list(self._established.values()):
            if conn is not exclude:
                for data in frames:
                    conn.send_frame(data)

    def _handle_topology(self, conn: Connection, frame: TopologyFrame) -> None:
        changed = self._topo.merge(frame.entries)
        if not changed:
            return
        own_bumped = any(e.name == self._name for e in changed)
        newly = self._recompute()
        names = {e.name for e in changed} | newly
        entries = self._gossipable(names)
        if own_bumped:
            self._gossip(entries[:1], exclude=conn)
        self._relay(entries[1:], exclude=conn)
        self._wake.set()

    def _relay(self, entries: list[PeerEntry], exclude: Connection) -> None:
        """Pass others' entries on, but not to the entry's owner or to the peers it lists
        as neighbours: the owner sends each new version to its neighbours itself.  In a
        full mesh that leaves nothing to relay; flooding every change to every peer cost
        O(N^2) frames per change and kept 25 starting daemons busy for tens of seconds."""
        if not entries:
            return
        encoded: dict[tuple[str, ...], list[bytes]] = {}
        for name, conn in list(self._established.items()):
            if conn is exclude:
                continue
            pick = self._unsent(entries, name)
            if not pick:
                continue
            key = tuple(e.name for e in pick)
            frames = encoded.get(key)
            if frames is None:
                frames = encoded[key] = self._topology_frames(pick)
            for data in frames:
                conn.send_frame(data)

    @staticmethod
    def _unsent(entries: list[PeerEntry], peer: str) -> list[PeerEntry]:
        """The entries that ``peer`` does not get from their owners directly."""
        return [e for e in entries
                if e.name != peer and all(n.name != peer for n in e.neighbours)]

    def _recompute(self) -> set[str]:
        """Recompute routes and reachability; fire callbacks; return newly reachable."""
        next_hop = self._topo.routes(self._established.keys())
        new: dict[str, PeerInfo] = {}
        for name in next_hop:
            conn = self._established.get(name)
            if conn is not None and conn.peer is not None:
                new[name] = PeerInfo(conn.peer.name, conn.peer.nickname, conn.peer.uid)
            else:
                entry = self._topo.get(name)
                new[name] = (PeerInfo(entry.name, entry.nickname, entry.uid) if entry
                             else PeerInfo(name, "", 0))
        old, self._reachable, self._next_hop = self._reachable, new, next_hop
        now = asyncio.get_running_loop().time()
        for name in new:
            self._unreachable_since.pop(name, None)
        downs = sorted(n for n, p in old.items() if n not in new or new[n].uid != p.uid)
        ups = [p for n, p in sorted(new.items()) if n not in old or old[n].uid != p.uid]
        for name in downs:
            if name not in new:
                self._unreachable_since.setdefault(name, now)
            log.info("peer %s unreachable", name)
            if not self._stopping:
                self._call("on_peer_down", self._on_peer_down, name)
        for info in ups:
            log.info("peer %s(%s) reachable via %s", info.name, info.nickname,
                     next_hop[info.name])
            if not self._stopping:
                self._call("on_peer_up", self._on_peer_up, info)
        return {p.name for p in ups}

    async def _liveness_loop(self) -> None:
        """Heartbeats and deadlines for every connection (see ``liveness``)."""
        live = self._liveness
        assert live is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(live.period)
            live.check(list(self._conns), len(self._established), loop.time())

    async def _gossip_loop(self) -> None:
        """Periodic full gossip to REPAIR_FANOUT random neighbours repairs anything a lost
        delta left behind (skipped while the event loop is overloaded: changes are still
        sent as they happen); also forgets peers that have been unreachable for
        ``forget_after`` seconds.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._gossip_interval)
            now = loop.time()
            for name in self._topo.names():
                if name != self._name and name not in self._reachable:
                    self._unreachable_since.setdefault(name, now)
            stale = [n for n, since in self._unreachable_since.items()
                     if now - since >= self._forget_after]
            if stale:
                log.debug("forgetting unreachable peers %s", stale)
                self._topo.forget(stale)
                for name in stale:
                    del self._unreachable_since[name]
            nbrs = [c for c in self._established.values() if not c.closing]
            if nbrs and not self.overloaded:
                frames = self._topology_frames(self._gossipable())
                for conn in self._rng.sample(nbrs, min(REPAIR_FANOUT, len(nbrs))):
                    for data in frames:
                        conn.send_frame(data)

    # ================================================================== dialling

    async def _maker_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            delay = self._make_connections(loop.time())
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _make_connections(self, now: float) -> float:
        """Start the dials that are due; return seconds until the next one is."""
        wanted: dict[tuple[str, int], str] = {}
        for name, addrs in self._topo.address_book().items():
            if name != self._name and name not in self._established:
                for addr in addrs:
                    wanted.setdefault(addr, name)
        for key, t in list(self._targets.items()):
            if not t.explicit and t.task is None and key not in wanted:
                del self._targets[key]
        for key, name in wanted.items():
            if key not in self._targets:
                self._targets[key] = _Target(key[0], key[1], explicit=False, peer_name=name)
        busy = {t.peer_name for t in self._targets.values() if t.task is not None}
        count = len(self._conns) + self._dialling()
        handshakes = self._handshakes(inbound=False)
        wake = now + MAX_BACKOFF
        for t in sorted(self._targets.values(), key=lambda t: (not t.explicit, t.next_try)):
            if t.task is not None or t.to_self:
                continue
            if t.peer_name is not None and (t.peer_name in self._established
                                            or t.peer_name in busy):
                continue
            if t.next_try > now:
                wake = min(wake, t.next_try)
                continue
            if not t.explicit and count >= self._conn_limit:
                continue
            if handshakes >= MAX_DIALS:
                break  # woken again when one of them is done
            handshakes += 1
            t.dialling = True
            t.task = self._spawn(self._dial(t), f"mesh-dial {t.address}")
            count += 1
            busy.add(t.peer_name)
        return max(0.01, wake - now)

    def _retry_later(self, t: _Target, reason: str) -> None:
        """Jittered exponential backoff between INITIAL_BACKOFF and MAX_BACKOFF."""
        if reason != t.last_error:
            log.info("peer %s: %s", t.address, reason)
        t.last_error = reason
        delay = min(MAX_BACKOFF, t.backoff * self._rng.uniform(1.0, 1.5))
        t.next_try = asyncio.get_running_loop().time() + delay
        t.backoff = min(MAX_BACKOFF, t.backoff * 2)

    async def _dial(self, t: _Target) -> None:
        try:
            try:
                async with asyncio.timeout(self._handshake_timeout):
                    reader, writer = await asyncio.open_connection(t.host, t.port)
            except (OSError, TimeoutError, ValueError) as exc:
                self._retry_later(t, f"dial failed: {exc!r}")
                return
            finally:
                t.dialling = False
            if self._stopping:
                writer.transport.abort()
                return
            conn = self._new_conn(reader, writer, outbound=True, address=t.address,
                                  remote_host=t.host)
            t.conn = conn
            try:
                await conn.run()
            finally:
                t.conn = None
                self._conn_closed(conn)
            if conn.peer is not None:
                t.peer_name = conn.peer.name
            if conn.to_self:
                t.to_self = True
                t.last_error = "connected to ourselves"
                log.info("peer %s is ourselves: not dialling it again", t.address)
                return
            if conn.was_established and asyncio.get_running_loop().time() \
                    - conn.established_at >= STABLE_AFTER:
                t.backoff = INITIAL_BACKOFF
            self._retry_later(t, conn.close_reason)
        finally:
            t.task = None
            t.dialling = False
            self._wake.set()
