"""The mesh's own traffic, which the simulator does not carry, as a cost model.

The simulator delivers the engine's messages between allocators; the daemon's mesh adds
heartbeats, topology gossip and connection handshakes, and wraps every engine message in
a `Message` frame.  This model counts them from the mesh's own settings (the defaults of
`Mesh`, read from its signature, so a change there changes the projection) and from real
frames encoded with the mesh's encoder: nothing is sent, no clock is read.

Idle, per node with C connections in a cluster of R reachable peers, per second:
- heartbeats: one per connection per heartbeat interval (an upper bound: a connection
  that carried anything else in the interval sends none), where the mesh spreads them
  (liveness.HB_LINKS) the interval grows with C;
- periodic topology gossip: every gossip_interval, all R entries (each listing that
  peer's neighbours) to each of the C connections, or to REPAIR_FANOUT of them where the
  mesh bounds it, in frames of at most _TOPO_CHUNK.
A node's connections change (a peer dies, restarts, is removed): each peer whose
neighbour list changed floods its new entry, which every node passes on once to each of
its connections; a new connection starts with both hellos and a full topology exchange.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..mesh.frames import (
    HEARTBEAT_BYTES,
    PROTOCOL_VERSION,
    Hello,
    Message,
    Neighbour,
    PeerEntry,
    TopologyFrame,
    encode,
)
from ..mesh.mesh import _TOPO_CHUNK, Mesh


@dataclass(frozen=True)
class MeshSettings:
    heartbeat: float
    dead_timeout: float
    gossip_interval: float
    # periodic full topology to this many neighbours per round; None: to every one
    repair_fanout: int | None = None
    # heartbeats spread so that this many links get one per heartbeat interval; None: a
    # heartbeat on every link every interval
    hb_links: int | None = None

    @classmethod
    def defaults(cls) -> MeshSettings:
        """The daemon's: `Mesh`'s keyword defaults (the daemon passes its own heartbeat
        and dead_timeout, whose defaults are the same), and the mesh's bounds on periodic
        repair and heartbeats where the mesh has them (mesh.REPAIR_FANOUT, liveness.HB_LINKS)."""
        params = inspect.signature(Mesh.__init__).parameters

        def default(name: str) -> Any:
            return params[name].default

        try:
            hb_links = importlib.import_module(f"{Mesh.__module__.rsplit('.', 1)[0]}.liveness"
                                               ).HB_LINKS
        except (ImportError, AttributeError):
            hb_links = None
        return cls(default("heartbeat"), default("dead_timeout"), default("gossip_interval"),
                   getattr(sys.modules[Mesh.__module__], "REPAIR_FANOUT", None), hb_links)

    def heartbeat_interval(self, links: int) -> float:
        """Seconds between heartbeats on one silent link of a node with `links` links."""
        if self.hb_links is None:
            return self.heartbeat
        return self.heartbeat * max(1.0, links / self.hb_links)

    def repair_targets(self, links: int) -> int:
        return links if self.repair_fanout is None else min(links, self.repair_fanout)


_NAME = "aa:bb:cc:dd:ee:ff"


@cache
def entry_bytes(neighbours: int) -> int:
    """Encoded size of one topology entry with that many neighbours (realistic names,
    198.18.0.0/15 addresses, 64-bit uid and version)."""
    nb = tuple(Neighbour(_NAME, "198.18.123.234", 6783) for _ in range(neighbours))
    e = PeerEntry(_NAME, "node-0123", (1 << 63) - 1, (1 << 53) + 1, nb)
    return len(encode(TopologyFrame((e, e)))) - len(encode(TopologyFrame((e,))))


@cache
def frame_overhead() -> int:
    """A topology frame's own bytes besides its entries."""
    return len(encode(TopologyFrame(()))) + 2  # + a list header past 15 entries


@cache
def message_overhead() -> int:
    """The Message frame around one engine payload (src, dst, ttl, header)."""
    return len(encode(Message(_NAME, _NAME, 64, b"")))


@cache
def hello_bytes() -> int:
    return len(encode(Hello(PROTOCOL_VERSION, _NAME, "node-0123", (1 << 63) - 1, 6783,
                            (1 << 63) - 1, (1 << 63) - 1)))


def topology_cost(entry_neighbours: Sequence[int]) -> tuple[int, int]:
    """(frames, bytes) to send these entries over one connection."""
    n = len(entry_neighbours)
    frames = math.ceil(n / _TOPO_CHUNK)
    return frames, frames * frame_overhead() + sum(entry_bytes(k) for k in entry_neighbours)


@dataclass
class Traffic:
    """Frames and bytes one node sends."""

    msgs: float = 0.0
    bytes: float = 0.0

    def add(self, msgs: float, nbytes: float) -> None:
        self.msgs += msgs
        self.bytes += nbytes


def idle(degrees: Sequence[int], seconds: float, s: MeshSettings) -> list[Traffic]:
    """Each node's heartbeats and periodic topology gossip over `seconds` of quiet."""
    frames, nbytes = topology_cost(degrees)
    out = []
    for c in degrees:
        t = Traffic()
        beats = c * seconds / s.heartbeat_interval(c)
        t.add(beats, beats * len(HEARTBEAT_BYTES))
        rounds = seconds / s.gossip_interval
        to = s.repair_targets(c)
        t.add(to * frames * rounds, to * nbytes * rounds)
        out.append(t)
    return out


def flood(degrees: Sequence[int], changed: Sequence[int]) -> list[Traffic]:
    """Each node passing on the new entries of the peers whose connections changed
    (`changed`: their neighbour counts after the change) once to each connection."""
    per = sum(entry_bytes(k) + frame_overhead() for k in changed)
    return [Traffic(c * len(changed), c * per) for c in degrees]


def connect(degrees: Sequence[int], a: int, b: int) -> dict[int, Traffic]:
    """A new connection between nodes a and b: hellos and a full topology each way."""
    frames, nbytes = topology_cost(degrees)
    return {i: Traffic(1 + frames, hello_bytes() + nbytes) for i in (a, b)}


def wrap(engine_msgs: float) -> float:
    """Bytes the Message frames add around that many engine payloads."""
    return engine_msgs * message_overhead()
