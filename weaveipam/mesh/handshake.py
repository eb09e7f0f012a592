"""Handshake: the first frame each way, and the rules for accepting a peer.

Kept free of sockets so the rules (self/duplicate-name detection, which of two
connections to the same peer survives) can be reasoned about and tested on their own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

from .frames import DEFAULT_MAX_OBJECTS, ErrorFrame, FrameError, Hello, read_frame


class Verdict(Enum):
    OK = "ok"
    SELF = "self"  # we dialled our own listen address
    DUPLICATE_NAME = "duplicate-name"  # another machine uses our name (cloned VM, Weave #2606)


class PeerRefused(FrameError):
    """The peer sent an error frame instead of (or after) its hello."""


def judge(ours: Hello, theirs: Hello) -> Verdict:
    """Same name + same uid is ourselves; same name + other uid is a clone."""
    if theirs.name != ours.name:
        return Verdict.OK
    return Verdict.SELF if theirs.uid == ours.uid else Verdict.DUPLICATE_NAME


@dataclass(frozen=True)
class ConnIdentity:
    """What both ends know about one connection, for tie-breaking."""

    outbound: bool  # dialled by us
    ours: Hello
    theirs: Hello

    @property
    def dialler(self) -> str:
        return self.ours.name if self.outbound else self.theirs.name

    @property
    def dialler_nonce(self) -> int:
        return self.ours.nonce if self.outbound else self.theirs.nonce


def keep_new(existing: ConnIdentity, new: ConnIdentity) -> bool:
    """Whether ``new`` should replace ``existing``: both to the same peer name, dialled
    at about the same time by the same peer process (the mesh asks only then).

    Both ends evaluate this on the same pair and reach the same answer, so exactly one
    connection survives: prefer the one dialled by the lower name, then the higher
    dialler nonce.  Any other newcomer under a name we are connected to is refused:
    a name is not a credential, and a peer that really restarted gets in once its old
    connection has closed (at once when its process died, else after dead_timeout).
    """
    if (existing.theirs.session, existing.theirs.uid) != (new.theirs.session, new.theirs.uid):
        return False
    lower = min(new.ours.name, new.theirs.name)
    ex_pref = (existing.dialler == lower, existing.dialler_nonce)
    new_pref = (new.dialler == lower, new.dialler_nonce)
    return new_pref > ex_pref


async def receive_hello(reader: asyncio.StreamReader, max_frame: int, timeout: float,
                        max_objects: int = DEFAULT_MAX_OBJECTS) -> Hello:
    """Wait for the peer's hello; the whole exchange is bounded by ``timeout`` so a peer
    that sends half a frame and sits there is dropped.  An error frame in its place is
    reported as PeerRefused.
    """
    async with asyncio.timeout(timeout):
        frame = await read_frame(reader, max_frame, timeout, max_objects)
    if isinstance(frame, ErrorFrame):
        raise PeerRefused(f"refused by peer: {frame.reason!r}")
    if not isinstance(frame, Hello):
        raise FrameError(f"expected hello, got {type(frame).__name__}")
    return frame
