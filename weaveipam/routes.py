"""Pod routes between nodes (issue 16): every ring range another peer owns is routed via
that peer's node address, so pods behind a routed plugin (`ptp`) reach pods on every node.

The ring says who owns what; the mesh says where each peer is (the address of our
connection to it).  Routes carry their own protocol number, ROUTE_PROTO, so the daemon
only ever reads, changes or removes its own; they are kept while the daemon restarts (its
pods stay reachable) and removed at `reset`.  A peer that is not on a connected network of
this node (its address needs a router) gets no route: the kernel refuses a next hop that is
not on-link, and the route is logged as skipped.  Netlink is pyroute2's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .core.addr import Range, aligned_pieces, fmt

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("weaveipam.routes")

ROUTE_PROTO = 229        # "weaveipam": no routing daemon in /etc/iproute2/rt_protos uses it
SYNC_INTERVAL = 0.25     # seconds between checks of the ring and the peers
RESYNC_EVERY = 60.0      # read the kernel's routes back (someone deleted one of ours)


def desired_routes(ranges: Iterable[tuple[int, int, str]], me: str,
                   node_addr: Mapping[str, str], bits: int) -> dict[str, str]:
    """CIDR -> next hop for every range owned by a peer whose node address we know."""
    out: dict[str, str] = {}
    for start, end, peer in ranges:
        if not peer or peer == me or peer not in node_addr:
            continue
        for s, size in aligned_pieces(Range(start, end)):
            out[f"{fmt(s, bits)}/{bits - size.bit_length() + 1}"] = node_addr[peer]
    return out


class RouteTable:
    """This daemon's routes in the kernel's main table (blocking netlink calls: the
    daemon runs them on a worker thread)."""

    def __init__(self) -> None:
        self.ipr = IPRoute()
        self.refused: set[tuple[str, str]] = set()
        self.installed: dict[str, str] | None = None  # what we last left in the kernel

    def current(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for family in (2, 10):  # AF_INET, AF_INET6
            for r in self.ipr.route("dump", family=family, proto=ROUTE_PROTO):
                if r.get("proto") != ROUTE_PROTO:
                    continue
                gw = r.get("gateway") or ""
                out[f"{r.get('dst')}/{r['dst_len']}"] = gw
        return out

    def sync(self, want: Mapping[str, str], verify: bool = False) -> tuple[int, int]:
        """Make our routes exactly `want`; (added or changed, removed).  Compares with what
        the last sync left unless `verify` (reading every route back costs far more than a
        change: 0.5 CPU-seconds for 3,000 routes)."""
        have = self.current() if verify or self.installed is None else self.installed
        done: dict[str, str] = dict(have)
        removed = 0
        for dst in have.keys() - want.keys():
            try:
                self.ipr.route("del", dst=dst, proto=ROUTE_PROTO)
                removed += 1
                del done[dst]
            except NetlinkError as e:
                if e.code == 3:  # ESRCH: already gone
                    del done[dst]
                else:
                    log.warning("could not remove route %s: %s", dst, e)
        changed = 0
        for dst, via in want.items():
            cur = have.get(dst)
            if cur is not None and (cur == via or cur == _norm(via)):
                continue
            try:
                self.ipr.route("replace", dst=dst, gateway=via, proto=ROUTE_PROTO)
                changed += 1
                done[dst] = _norm(via)
                self.refused.discard((dst, via))
            except NetlinkError as e:
                done.pop(dst, None)  # replace failed: whatever was there may be gone
                if (dst, via) not in self.refused:  # log once, not at every sync
                    self.refused.add((dst, via))
                    log.warning("no route for %s via %s (%s): is that node on a network "
                                "connected to this one? Peers behind a router need routes "
                                "from the network (see `weaveipam` README, routed pods)",
                                dst, via, e.args[-1] if e.args else e)
        self.installed = done
        return changed, removed

    def close(self) -> None:
        self.ipr.close()


def _norm(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


def _inputs(d: Daemon, node_addr: dict[str, str]) -> tuple[object, ...]:
    """What the wanted routes depend on (the ring's cached digest changes with the ring).
    A peer's last known address is kept while it is away, so its routes do not flap."""
    from .daemon import parse_hostport
    for c in d.connections():
        if c.state == "established" and c.name:
            node_addr[c.name] = parse_hostport(c.address, None)[0]
    a = d.allocator
    return a.ring.digest(), tuple(sorted(node_addr.items())), a.state() == "left"


def _wanted(d: Daemon, node_addr: dict[str, str]) -> dict[str, str]:
    """Routes the ring and the mesh ask for now; none once this peer has left (reset)."""
    a = d.allocator
    if a.state() == "left" or a.ring.is_empty():
        return {}
    return desired_routes(((s, e, v[1]) for s, e, v in a.ring.iter_ranges()), d.name,
                          node_addr, a.universe.bits)


async def keep_routes(d: Daemon) -> None:
    """The daemon's task for --pod-routes: routes follow the ring within SYNC_INTERVAL."""
    table = await asyncio.to_thread(RouteTable)
    node_addr: dict[str, str] = {}
    seen: tuple[object, ...] | None = None
    synced = 0.0
    try:
        while True:
            inputs = _inputs(d, node_addr)
            verify = time.monotonic() - synced > RESYNC_EVERY
            if inputs != seen or verify:
                want = _wanted(d, node_addr)
                changed, removed = await asyncio.to_thread(table.sync, want, verify)
                if changed or removed:
                    log.info("pod routes: %d added or changed, %d removed (%d in all)",
                             changed, removed, len(want))
                seen, synced = inputs, time.monotonic()
            await asyncio.sleep(SYNC_INTERVAL)
    finally:
        if d.allocator.state() == "left":
            # reset: nothing of ours stays behind. In a thread, as every sync: pyroute2 on
            # the loop's own thread tries to use the running loop and fails
            await asyncio.to_thread(table.sync, {}, True)
        table.close()
