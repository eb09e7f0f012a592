"""Heartbeats and deadlines for every connection, from one timer.

Why one timer and not one per connection: a timer per connection per frame was most of
what an idle daemon did (a heartbeat each way on every link every second, each with its
own timeouts), so idle cost grew with the number of peers.  Here a link costs a few
attribute reads per check, and the heartbeats themselves are spread so that a daemon
sends about ``HB_LINKS`` per ``heartbeat`` seconds however many links it has.

What is noticed, and how fast:

- a peer process that exits or crashes: at once (its kernel closes the connection);
- a host that dies or a link that is cut: after ``dead_timeout`` (the kernel's keepalive
  and ``TCP_USER_TIMEOUT``, set by ``connection.tune_socket``), costing us nothing;
- a peer whose process is alive but sends nothing (hung): after ``MISSED`` heartbeat
  intervals, at least ``dead_timeout``, and more for a link that was once slow;
- a peer that reads nothing while we have data for it: after the same time.

Late is not dead: a deadline only counts time in which our own event loop ran.  When the
timer itself runs late (our process was starved of CPU or stopped), at most
``STALL_CREDIT`` checks' worth of the gap counts; what arrived meanwhile is read before
the next check.  A link that survived a long silence gets ``LATE_FACTOR`` times that
silence as its deadline from then on.  A handshake needs both ends' event loops to run,
so while ours runs late (the machine is short of CPU: the peer's probably is too) its
deadline stretches with our lateness, up to ``HANDSHAKE_STRETCH`` times.

A heartbeat goes out only on a link where we sent nothing for an interval, and anything
received is answered with one by a peer that sent nothing for ``REPLY_AFTER``, so both
ends of a link settle on the shorter of their intervals, and a peer that still beats
every second and gives up after 5 s (an older version) always hears from us in time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("weaveipam.mesh")

HB_LINKS = 10        # links that get a heartbeat every `heartbeat`; more links: longer
MISSED = 3           # silent heartbeat intervals before a hung peer is dropped
REPLY_AFTER = 2.0    # answer a heartbeat if we sent nothing for this long (at most)
STALL_CREDIT = 2.0   # checks' worth of a late timer's gap that counts as silence
LATE_FACTOR = 2.0    # deadline for a link once silent this long: that many times more
CHECKS_PER_DEADLINE = 4  # checks per shortest deadline: how late a deadline may act
LAG_SHED = 0.5       # the timer this many periods late: the event loop is overloaded
HANDSHAKE_STRETCH = 6.0  # a handshake may take this many times longer on a loaded machine


class Liveness:
    """Keeps the liveness bookkeeping of connections; ``check`` runs every ``period``."""

    def __init__(self, heartbeat: float, dead_timeout: float, handshake_timeout: float,
                 now: float) -> None:
        self.heartbeat = heartbeat
        self.dead_timeout = dead_timeout
        self.handshake_timeout = handshake_timeout
        self.period = min(heartbeat, dead_timeout, handshake_timeout) / CHECKS_PER_DEADLINE
        self.last = now
        self.lag = 0.0  # how late the last check ran, in seconds
        self.lateness = 0.0  # recent lag, in periods (a moving average)

    def interval(self, links: int) -> float:
        """Seconds between heartbeats on a silent link, for a node with ``links`` links."""
        return self.heartbeat * max(1.0, links / HB_LINKS)

    def reply_after(self) -> float:
        return min(REPLY_AFTER, self.heartbeat)

    @property
    def overloaded(self) -> bool:
        """The last check ran late: our event loop has more work than time."""
        return self.lag > LAG_SHED * self.period

    def check(self, conns: Iterable[Connection], established: int, now: float) -> None:
        gap = now - self.last
        self.last = now
        self.lag = max(0.0, gap - self.period)
        self.lateness = 0.8 * self.lateness + 0.2 * min(self.lag / self.period, 8.0)
        handshake = self.handshake_timeout * min(HANDSHAKE_STRETCH, 1.0 + self.lateness)
        credit = min(gap, STALL_CREDIT * self.period)  # our own stall is not their silence
        interval = self.interval(established)
        base = max(self.dead_timeout, MISSED * interval)
        for conn in conns:
            if conn.closing:
                continue
            if conn.state != "established":
                conn.age += credit
                if conn.age >= handshake:
                    conn.handshake_timed_out(round(handshake, 1))
                continue
            deadline = min(max(base, LATE_FACTOR * conn.longest_gap), 2 * base)
            if conn.rx_count != conn.rx_seen:  # received since the last check
                conn.rx_seen = conn.rx_count
                conn.longest_gap = max(conn.longest_gap, conn.silent)
                conn.silent = min(max(0.0, now - conn.last_rx), credit)
            else:
                conn.silent += credit
                if conn.silent >= deadline:
                    conn.close(f"nothing received for {conn.silent:.1f}s (not counting "
                               "time this daemon was itself stalled)", level=logging.WARNING)
                    continue
            backlog = conn.backlog()
            if backlog and backlog >= conn.write_backlog:
                conn.stuck += credit
                if conn.stuck >= deadline:
                    conn.close(f"peer not reading: no send progress for {conn.stuck:.1f}s",
                               level=logging.WARNING)
                    continue
            else:
                conn.stuck = 0.0
            conn.write_backlog = backlog
            if now - conn.last_tx >= interval:
                conn.send_heartbeat()
