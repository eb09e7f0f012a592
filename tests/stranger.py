"""A stranger on the peer port: sends a plaintext hello claiming any name it likes.

Without `--password` nothing stops anyone who reaches the peer port from doing this;
tests use it to check that a forged hello is refused without disturbing the real peers.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from weaveipam.mesh import PROTOCOL_VERSION
from weaveipam.mesh.frames import ErrorFrame, FrameError, Hello, encode, read_frame

MAX_FRAME = 1 << 20


@dataclass(frozen=True)
class Answer:
    """What the daemon did with the forged hello."""

    hello: Hello | None  # the daemon's own hello (it always sends one first)
    refused: str | None  # the reason in its farewell error frame, if it refused us
    accepted: bool  # it kept talking (sent frames other than an error) instead


async def forge_hello(host: str, port: int, *, name: str, uid: int | None = None,
                      nickname: str = "stranger", session: int | None = None,
                      timeout: float = 5.0) -> Answer:
    """Connect, send a hello under ``name`` and report how the daemon answered."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(encode(Hello(PROTOCOL_VERSION, name, nickname,
                                  uid if uid is not None else secrets.randbits(63),
                                  0, session if session is not None else secrets.randbits(63),
                                  secrets.randbits(63))))
        await writer.drain()
        theirs: Hello | None = None
        async with asyncio.timeout(timeout):
            while True:
                try:
                    frame = await read_frame(reader, MAX_FRAME, timeout)
                except (asyncio.IncompleteReadError, ConnectionError, FrameError):
                    return Answer(theirs, None, False)
                if isinstance(frame, Hello) and theirs is None:
                    theirs = frame
                elif isinstance(frame, ErrorFrame):
                    return Answer(theirs, frame.reason, False)
                else:
                    return Answer(theirs, None, True)
    finally:
        writer.transport.abort()
