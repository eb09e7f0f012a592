"""One TCP connection to a peer: handshake, reader, writer, liveness bookkeeping.

Each connection owns a reader task and a writer task.  Everything the mesh sends goes
through a bounded queue drained by the writer task, so a peer that stops reading can
only ever fill its own queue (and then gets dropped); nobody else waits on it.

Liveness costs nothing per frame here: the connection only notes when it last received
and sent, and the mesh's one liveness timer (``mesh.liveness``) decides about heartbeats
and deadlines for every connection at once.  A host that dies or a link that is cut is
noticed by the kernel (TCP keepalive and ``TCP_USER_TIMEOUT``, see ``tune_socket``), which
answers probes whatever our event loop is doing, so a starved peer is never taken for a
dead one.  Only the handshake keeps a hard timeout of its own, as a backstop.

Timeouts use ``asyncio.timeout()``, never ``asyncio.wait_for()``: on Python 3.11 the
latter can swallow a cancellation that races with its own timeout, which would leave a
cancelled loop running forever.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from . import crypto
from .frames import (
    DEFAULT_MAX_OBJECTS,
    HEARTBEAT_BYTES,
    Auth,
    ErrorFrame,
    Frame,
    FrameError,
    Hello,
    KeyExchange,
    VersionError,
    encode,
)
from .frames import read_frame as _read_frame
from .handshake import ConnIdentity, PeerRefused, receive_hello

log = logging.getLogger("weaveipam.mesh")

State = Literal["pending", "established", "closed"]


@dataclass(frozen=True)
class ConnConfig:
    max_frame: int
    heartbeat: float
    dead_timeout: float
    handshake_timeout: float
    queue_frames: int
    queue_bytes: int
    max_objects: int = DEFAULT_MAX_OBJECTS
    close_timeout: float = 0.5  # how long a closing socket may take to flush
    # the handshake's own hard timeout, a multiple of handshake_timeout: the mesh's
    # liveness timer enforces handshake_timeout itself, not counting time our own event
    # loop was stalled; this only bounds a handshake if that timer could not run
    handshake_backstop: float = 8.0
    # derived from --password (crypto.Keyring): None means plaintext peers only
    keys: crypto.Keyring | None = field(default=None, repr=False)


class ConnHandler(Protocol):
    """What a connection asks of its mesh."""

    def on_hello(self, conn: Connection, hello: Hello) -> None:
        """Accept (set ``conn.state = "established"``) or refuse (``conn.close``)."""

    async def on_frame(self, conn: Connection, frame: Frame) -> None:
        """A checked frame from an established connection; reading this connection
        waits until it returns (natural back-pressure, order preserved)."""


class Connection:
    """A peer connection; ``run()`` lasts for its whole life and cleans up after it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        outbound: bool,
        address: str,
        remote_host: str,
        ours: Hello,
        config: ConnConfig,
        handler: ConnHandler,
    ) -> None:
        self.outbound = outbound
        self.address = address  # what we dialled, or where the peer came from
        self.remote_host = remote_host  # the peer's IP/host, for its listen address
        self.ours = ours
        self.peer: Hello | None = None
        self.state: State = "pending"
        self.was_established = False
        self.established_at = 0.0  # loop time the handshake was accepted
        self.to_self = False
        self.close_reason = ""
        self._reader = reader
        self._writer = writer
        self._cfg = config
        self._handler = handler
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing = asyncio.Event()
        self._farewell: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._keys = crypto.KeyPair() if config.keys is not None else None
        self._sealer: crypto.Sealer | None = None
        self._opener: crypto.Opener | None = None
        # liveness bookkeeping (loop times; the mesh's liveness timer reads and keeps them)
        self.opened_at = asyncio.get_running_loop().time()
        self.last_rx = self.opened_at  # anything received, a chunk of a frame included
        # receipts so far, and as of the last liveness check: what tells the check that
        # something arrived (loop times of callbacks in one iteration may not be ordered)
        self.rx_count = 0
        self.rx_seen = 0
        self.last_tx = self.opened_at  # anything written to the socket
        self.silent = 0.0  # seconds with nothing received, our own stalls not counted
        self.age = 0.0  # seconds since opened, likewise (for the handshake deadline)
        self.stuck = 0.0  # seconds with a write buffer that did not shrink, likewise
        self.longest_gap = 0.0  # the longest silence seen on this link so far
        self.write_backlog = 0  # socket write buffer size at the last liveness check
        tune_socket(writer, config.dead_timeout)

    def __repr__(self) -> str:
        who = self.peer.name if self.peer else "?"
        arrow = "->" if self.outbound else "<-"
        return f"<Connection {arrow} {who} {self.address} {self.state}>"

    @property
    def encrypted(self) -> bool:
        """True once the encrypted session is set up (every later frame is sealed)."""
        return self._opener is not None

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def identity(self) -> ConnIdentity:
        assert self.peer is not None
        return ConnIdentity(self.outbound, self.ours, self.peer)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Handshake, then read and write until ``close()``; always releases the socket."""
        self._tasks = [
            asyncio.create_task(self._write_loop(), name=f"mesh-write {self.address}"),
            asyncio.create_task(self._read_loop(), name=f"mesh-read {self.address}"),
        ]
        self.send_frame(encode(self.ours))
        if self._keys is not None:  # pipelined: saves a round trip
            self.send_frame(encode(KeyExchange(self._keys.public)))
        try:
            await self._closing.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.state = "closed"
            await self._release()

    def close(self, reason: str, *, level: int = logging.INFO, farewell: str | None = None
              ) -> None:
        """Ask the connection to shut down (idempotent, callable from anywhere).

        ``farewell`` is sent as a final error frame so the other side can log why.
        """
        if self._closing.is_set():
            return
        self.close_reason = reason
        self._farewell = farewell
        log.log(level, "closing connection %s: %s", self._describe(), reason)
        self._closing.set()

    async def _release(self) -> None:
        writer = self._writer
        try:
            if self._farewell is not None and not writer.is_closing():
                farewell = encode(ErrorFrame(self._farewell))
                writer.write(self._sealer.seal(farewell) if self._sealer else farewell)
            writer.close()
            async with asyncio.timeout(self._cfg.close_timeout):
                await writer.wait_closed()
        except (OSError, TimeoutError, RuntimeError):
            writer.transport.abort()

    def _describe(self) -> str:
        who = f"{self.peer.name}({self.peer.nickname})" if self.peer else "unknown peer"
        return f"{'to' if self.outbound else 'from'} {who} at {self.address}"

    # ------------------------------------------------------------------ sending

    def send_frame(self, data: bytes) -> bool:
        """Queue encoded frame bytes; never blocks.  An overflowing queue means the peer
        is not keeping up, and we drop it rather than buffer without bound.
        """
        if self._closing.is_set():
            return False
        size = len(data) + (crypto.SEAL_OVERHEAD if self._sealer is not None else 0)
        if (len(self._queue) >= self._cfg.queue_frames
                or self._queued_bytes + size > self._cfg.queue_bytes):
            self.close(f"send queue overflow ({len(self._queue)} frames, "
                       f"{self._queued_bytes} bytes queued): peer too slow",
                       level=logging.WARNING)
            return False
        if self._sealer is not None:
            data = self._sealer.seal(data)  # at enqueue: queue order is counter order
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._wakeup.set()
        return True

    def send_heartbeat(self) -> None:
        """Queue a heartbeat (the mesh sends one only on a link that is otherwise silent)."""
        if self.state == "established":
            self.send_frame(HEARTBEAT_BYTES)

    def backlog(self) -> int:
        """Bytes written but not yet taken by the kernel (a peer that reads nothing keeps
        this from shrinking; the liveness timer drops it after a while)."""
        return self._writer.transport.get_write_buffer_size()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = b"".join(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                self._writer.write(batch)
                self.last_tx = loop.time()
                if self._writer.transport.get_write_buffer_size():
                    await self._writer.drain()  # the liveness timer watches for progress
        except (OSError, RuntimeError) as exc:
            self.close(f"write failed: {exc!r}")

    # ------------------------------------------------------------------ receiving

    def _received(self) -> None:
        self.rx_count += 1
        self.last_rx = asyncio.get_running_loop().time()

    async def _read_loop(self) -> None:
        cfg = self._cfg
        try:
            # hello, key exchange and authentication together within handshake_timeout
            # (enforced by the mesh's liveness timer; this is the backstop)
            async with asyncio.timeout(cfg.handshake_timeout * cfg.handshake_backstop):
                hello = await receive_hello(self._reader, cfg.max_frame,
                                            cfg.handshake_timeout, cfg.max_objects)
                self.peer = hello
                if not self._encryption_agrees(hello):
                    return
                if self._keys is not None:
                    if not await self._authenticate(hello, self._keys):
                        return
            self._handler.on_hello(self, hello)
            if self.state != "established":
                self.close("handshake refused")  # no-op if on_hello already closed us
                return
            self.was_established = True
            self.established_at = asyncio.get_running_loop().time()
            unseal = self._opener.open if self._opener is not None else None
            overhead = crypto.SEAL_OVERHEAD if unseal is not None else 0
            self._received()
            received = self._received
            while not self._closing.is_set():
                # no timeout: silence is judged by the mesh's liveness timer
                frame = await _read_frame(self._reader, cfg.max_frame, None,
                                          cfg.max_objects, unseal, overhead, received)
                await self._handler.on_frame(self, frame)
        except PeerRefused as exc:
            self.close(str(exc), level=logging.WARNING)
        except VersionError as exc:
            self.close(str(exc), level=logging.WARNING, farewell=str(exc))
        except FrameError as exc:
            reason = f"protocol error: {exc}"
            self.close(reason, level=logging.WARNING, farewell=reason)
        except TimeoutError as exc:
            if self.state == "established":  # the kernel gave up (TCP_USER_TIMEOUT)
                self.close(f"link timed out: {exc!r}", level=logging.WARNING)
            else:
                self.handshake_timed_out(cfg.handshake_timeout * cfg.handshake_backstop)
        except asyncio.IncompleteReadError:
            self.close("connection closed by peer")
        except OSError as exc:
            self.close(f"read failed: {exc!r}")
        except Exception:  # a bug in our own handling: drop this peer, keep the mesh
            log.exception("unexpected error handling %s", self._describe())
            self.close("internal error", level=logging.ERROR)

    def handshake_timed_out(self, after: float) -> None:
        self.close(f"handshake timed out after {after:g}s", level=logging.WARNING,
                   farewell="handshake timeout")

    # ------------------------------------------------------------------ encryption

    def _encryption_agrees(self, hello: Hello) -> bool:
        """Both ends must have a password, or neither; refuse (both sides log) if not."""
        if self._cfg.keys is not None and not hello.encrypt:
            self.close(f"peer {hello.name}({hello.nickname}) sent no encryption handshake: "
                       "it has no --password; give every daemon the same password",
                       level=logging.WARNING,
                       farewell="this peer requires encryption: start with --password")
            return False
        if self._cfg.keys is None and hello.encrypt:
            self.close(f"peer {hello.name}({hello.nickname}) requires encryption: start "
                       "this daemon with --password", level=logging.WARNING,
                       farewell="this peer has no --password: refusing encryption")
            return False
        return True

    async def _authenticate(self, hello: Hello, keys: crypto.KeyPair) -> bool:
        """X25519 exchange, mutual proof of the shared secret, session keys.  The caller
        bounds this by the handshake timeout.  The dialler proves its current secret
        first; the listener accepts any of its secrets (rotation) and answers under the
        one the dialler proved, never to a dialler it refused."""
        ring = self._cfg.keys
        assert ring is not None
        kx = await self._handshake_frame(KeyExchange)
        assert isinstance(kx, KeyExchange)
        shared = keys.shared(kx.pub)
        if self.outbound:
            th = crypto.transcript(encode(self.ours), encode(hello), keys.public, kx.pub)
            mine, theirs = crypto.DIALLER, crypto.LISTENER
        else:
            th = crypto.transcript(encode(hello), encode(self.ours), kx.pub, keys.public)
            mine, theirs = crypto.LISTENER, crypto.DIALLER
        if self.outbound:
            self.send_frame(encode(Auth(crypto.auth_tag(ring.dial, th, mine))))
        auth = await self._handshake_frame(Auth)
        assert isinstance(auth, Auth)
        # a listener answers under the secret we dialled with; we accept any from a dialler
        secret = ring.match(th, theirs, auth.mac, dial_only=self.outbound)
        if secret is None:
            self.close(f"peer {hello.name}({hello.nickname}) failed authentication: its "
                       "--password differs from ours (or its --ipalloc-range, which salts "
                       "the key)", level=logging.WARNING,
                       farewell="authentication failed: every daemon needs the same "
                       "--password and --ipalloc-range")
            return False
        if not self.outbound:
            self.send_frame(encode(Auth(crypto.auth_tag(secret, th, mine))))
        d2l, l2d = crypto.session_keys(secret, shared, th)
        out_key, in_key = (d2l, l2d) if self.outbound else (l2d, d2l)
        self._sealer = crypto.Sealer(out_key)
        self._opener = crypto.Opener(in_key)
        return True

    async def _handshake_frame(self, kind: type[KeyExchange] | type[Auth]
                               ) -> KeyExchange | Auth:
        cfg = self._cfg
        frame = await _read_frame(self._reader, cfg.max_frame,
                                  cfg.handshake_timeout * cfg.handshake_backstop,
                                  cfg.max_objects)
        if isinstance(frame, ErrorFrame):
            raise PeerRefused(f"refused by peer: {frame.reason!r}")
        if not isinstance(frame, kind):
            raise FrameError(f"expected {kind.__name__} in the encryption handshake, got "
                             f"{type(frame).__name__}")
        return frame


def tune_socket(writer: asyncio.StreamWriter, dead_timeout: float) -> None:
    """Let the kernel notice a dead host or a cut link: keepalive probes on an idle
    connection, and ``TCP_USER_TIMEOUT`` to give up once sent data or probes have gone
    unacknowledged.  The kernel checks that limit only when it retransmits, at doubling
    intervals (on loopback 0.2, 0.6, 1.4, 3.0, 6.2 s after a send), so a limit of 0.4 times
    ``dead_timeout`` ends a dead link by about
    ``dead_timeout``.  The peer's kernel answers even while its daemon is stopped or
    starved of CPU, so only the network or the host failing counts; and it costs our
    process nothing per connection.  Skipped where the options do not exist (the
    liveness timer's deadlines still apply)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    idle = max(1, round(dead_timeout / 5))
    opts = [(socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
            (socket.IPPROTO_TCP, "TCP_KEEPIDLE", idle),
            (socket.IPPROTO_TCP, "TCP_KEEPINTVL", idle),
            (socket.IPPROTO_TCP, "TCP_KEEPCNT", max(1, round(dead_timeout / idle))),
            (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", max(1, round(dead_timeout * 400)))]
    for level, name, value in opts:
        opt = getattr(socket, name, None)
        if opt is None:
            continue
        try:
            sock.setsockopt(level, opt, value)
        except OSError as exc:  # e.g. a unix socket in a test double
            log.debug("cannot set %s on a peer socket: %s", name, exc)
