"""Status server: Weave's `status ipam` text, a JSON report, metrics and health checks.

The text follows Weave's layout so operators' habits and scripts carry over, and adds
what Weave left out: when a peer is waiting, the status says what it waits for and what
to do about it (Weave #760, #1559, #3955).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import __version__
from .core.addr import fmt
from .core.allocator import Allocate, Claim
from .metrics import CONTENT_TYPE, unreachable_owners

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("weaveipam.status")


def state_text(d: Node) -> str:
    """The allocator's explanation, or its bare state if explaining fails."""
    a = d.allocator
    try:
        return a.state_text()
    except Exception:  # status must render even if the engine's wording breaks
        log.exception("allocator state_text failed")
        return a.state()


def weave_state(d: Node) -> str:
    """The one-line IPAM status, in Weave's words where Weave had them."""
    a = d.allocator
    s = a.state()
    if d.store_error is not None:
        return "store failed"
    px = a.paxos_view()
    if s == "awaiting-consensus" and px is not None:
        return f"awaiting consensus (quorum: {px['quorum']}, known: {px['known']})"
    if s == "awaiting-ring":
        return "observer: awaiting a ring from a peer"
    if s == "waiting-for-space":
        return "waiting for IP(s) to become available"
    if s == "ready":
        peers = a.ring.peers()
        live = a.reachable() | {a.name}
        if a.name not in peers and peers and not set(peers) & live:
            return "all IP ranges owned by unreachable peers"
        return "ready"
    return {"rejoining": "rejoining: waiting for a peer's copy of the ring",
            "split": "seeded by different peers",
            "duplicate-name": "duplicate peer name",
            "removed": "removed by rmpeer",
            "left": "left (reset)"}.get(s, s)


def advice(d: Node) -> str | None:
    """What the operator should know or do, when the peer is not simply ready."""
    if d.store_error is not None:
        return d.store_error
    a = d.allocator
    s = a.state()
    if s == "ready":
        n, _ = unreachable_owners(d)
        if n:
            return (f"{n} peer(s) owning IP space are unreachable; if they are gone for good, "
                    "run `weaveipam rmpeer NAME` for each (on any one live node)")
        return None
    if s == "idle":
        text = state_text(d)  # consensus=N>1 waits for its peers: the engine says so
        return text if text != "idle" else \
            "idle: the ring is seeded at the first allocation, or now with `weaveipam prime`"
    return state_text(d)


def _count_active(d: Node) -> int:
    return sum(len(v) for v in d.allocator.allocations().values())


STRIP_WIDTH = 64
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _label(d: Node, name: str) -> str:
    """`name(nickname)`, or the bare name while its nickname is unknown."""
    nick = d.peer_nickname(name)
    return f"{name}({nick})" if nick else name


def _owners(d: Node) -> list[str]:
    """Peers owning space, in the table's order: this peer first, then by name."""
    a = d.allocator
    owned = a.ring.peers()
    return ([a.name] if a.name in owned else []) + sorted(p for p in owned if p != a.name)


def ring_strip(d: Node, width: int = STRIP_WIDTH) -> str:
    """The range drawn as `width` letters, each the owner (by its table letter) of the
    address in the middle of that column; `.` where the owner is not known yet."""
    a = d.allocator
    letter = {p: LETTERS[i] if i < len(LETTERS) else "*" for i, p in enumerate(_owners(d))}
    spans = [(s, e, peer) for s, e, (_, peer, _) in a.ring.iter_ranges()]
    if not spans:
        return "." * width
    out, j = [], 0
    start, size = a.universe.start, a.universe.size
    for i in range(width):
        addr = start + (2 * i + 1) * size // (2 * width)
        while j + 1 < len(spans) and spans[j][1] <= addr:
            j += 1
        s, e, peer = spans[j]
        out.append(letter.get(peer, ".") if s <= addr < e else ".")
    return "".join(out)


def ipam_lines(d: Node, letters: bool = False) -> list[str]:
    """A line per peer owning space, as `weave status ipam` (with `letters`, each starts
    with the peer's letter in the ring strip)."""
    a = d.allocator
    total = a.universe.size
    live = a.reachable()
    owned = a.ring.peers()
    lines = []
    for i, p in enumerate(_owners(d)):
        size = owned[p]
        line = f"{_label(d, p):<40} {size:>8} IPs ({100.0 * size / total:04.1f}% of total)"
        if p == a.name:
            line += f" ({_count_active(d)} active)"
        elif p not in live:
            line += " - unreachable!"
        if letters:
            line = f"{LETTERS[i] if i < len(LETTERS) else '*'} {line}"
        lines.append(line)
    if not owned:
        lines.append(f"{a.name}({d.cfg.nickname}): no IP ranges yet")
    return lines


def ipam_text(d: Node) -> str:
    """`weave status ipam`: a line per peer owning space, then the state."""
    lines = ipam_lines(d)
    lines.append("")
    lines.append(f"Status: {weave_state(d)}")
    hint = advice(d)
    if hint and hint != weave_state(d):
        lines.append(hint)
    return "\n".join(lines) + "\n"


def encryption_text(d: Node) -> str:
    """Weave's "enabled"/"disabled", and whether peers are authenticated (and by which
    passwords, while one is being rotated)."""
    if d.cfg.password is None:
        return "disabled (peers are not authenticated: anyone reaching the peer port can join)"
    if d.cfg.second_password is not None:
        return "enabled (peers authenticated; a second password is accepted too)"
    return "enabled (peers authenticated)"


def known_peers(d: Node) -> set[str]:
    """Every peer this one knows of (connected, heard of, or owning space), itself included,
    without those removed by rmpeer: the `Peers:` count, consistent with the ring."""
    a = d.allocator
    return (set(a.peers) | set(a.ring.peers()) | {a.name}) - set(a.ring.removed)


def status_text(d: Node, ipam: bool = False) -> str:
    """`weave status`: identity, connections and the IPAM block; with `ipam` (what
    `weaveipam status` prints) also the ring strip and the peers' lines, each state line
    once."""
    a = d.allocator
    conns = d.connections()
    est = sum(1 for c in conns if c.state == "established")
    known = known_peers(d)
    down = len(known - a.reachable() - {a.name})
    rows = [
        ("Version", f"weaveipam {__version__}"),
        ("Name", f"{a.name}({d.cfg.nickname})"),
        ("Encryption", encryption_text(d)),
        ("Peers", f"{len(known)} (with {est} established connection{'' if est == 1 else 's'}"
                  + (f", {down} unreachable)" if down else ")")),
        ("Connections", f"{len(conns)} (established {est})"),
        ("", ""),
        ("Service", "ipam"),
        ("Status", weave_state(d)),
        ("Range", str(a.universe)),
        ("DefaultSubnet", str(a.default_subnet)),
    ]
    out = [f"{k:>15}: {v}" if k else "" for k, v in rows]
    hint = advice(d)
    if hint and hint != weave_state(d):
        out.append(f"{'':>15}  {hint}")
    if ipam:
        r = a.universe
        out += ["", f"{'Ring':>15}: {ring_strip(d)}", f"{'':>17}{r} in {STRIP_WIDTH} "
                "parts, a letter per owner (as below)", ""]
        out += ipam_lines(d, letters=True)
    if d.kube is not None:
        out.append("")
        out += [f"{'Kubernetes' if i == 0 else '':>15}{':' if i == 0 else ' '} {line}"
                for i, line in enumerate(d.kube.lines())]
    if conns:  # like `weave status connections`
        out.append("")
        for c in conns:
            nick = c.nickname or (d.peer_nickname(c.name) if c.name else "")
            who = (f"{c.name}({nick})" if nick else c.name) if c.name else ""
            crypt = "encrypted" if c.encrypted else "unencrypted"
            info = f" {c.info}" if c.info else ""
            out.append(f"{'->' if c.outbound else '<-'} {c.address:<22} {c.state:<11} "
                       f"{crypt:<11} {who}{info}".rstrip())
    return "\n".join(out) + "\n"


def report(d: Node) -> dict[str, Any]:
    """Everything an operator or a test needs to see the ring and this peer's view."""
    a = d.allocator
    bits = a.universe.bits
    live = a.reachable()
    entries = []
    for s, e, (ver, peer, free) in a.ring.iter_ranges():
        # peer "" is a boundary marker: a segment whose owner we have not heard of yet
        entries.append({"token": fmt(s, bits), "last": fmt(e - 1, bits),
                        "offset": s - a.universe.start, "size": e - s, "peer": peer or None,
                        "nickname": d.peer_nickname(peer) if peer else "",
                        "reachable": peer == a.name or peer in live,
                        "version": ver, "free": free})
    now = time.monotonic()
    pending = []
    for op, since in a.pending_ops():
        item: dict[str, Any] = {"waiting_s": round(now - since, 3)}
        if isinstance(op, Allocate):
            item |= {"op": "allocate", "ident": op.ident,
                     "subnet": str(op.subnet or a.default_subnet)}
        elif isinstance(op, Claim):
            item |= {"op": "claim", "ident": op.ident, "address": fmt(op.addr, bits)}
        pending.append(item)
    out: dict[str, Any] = {
        "version": __version__,
        "name": a.name,
        "nickname": d.cfg.nickname,
        "state": a.state(),
        "status": weave_state(d),
        "advice": advice(d),
        "ready": a.can_allocate() and d.store_error is None,
        "range": str(a.universe),
        "size": a.universe.size,
        "default_subnet": str(a.default_subnet),
        "active": _count_active(d),
        "free": a.free_total(),
        "seeds": list(a.ring.seeds),
        "removed": dict(a.ring.removed),
        "entries": entries,
        "pending": pending,
        "peers": _peer_rows(d),
        "events": [{"time": round(t, 3), "level": lvl, "text": text}
                   for t, lvl, text in list(d.events)[-20:]],
        "direct_peers": d.direct_peers(),
        "owned": {ident: [f"{fmt(x, bits)}/{a.prefix_of(x)}" for x in addrs]
                  for ident, addrs in a.allocations().items()},
        "connections": [{"name": c.name, "nickname": c.nickname, "address": c.address,
                         "state": c.state, "outbound": c.outbound,
                         "encrypted": c.encrypted, "info": c.info}
                        for c in d.connections()],
    }
    px = a.paxos_view()
    if px is not None:
        out["paxos"] = px
    if d.kube is not None:
        out["kubernetes"] = d.kube.status()
    return out


def _peer_rows(d: Node) -> list[dict[str, Any]]:
    """A row per known peer for the status page: its connection, share and use."""
    a = d.allocator
    live = a.reachable()
    conns: dict[str, Any] = {}
    for c in d.connections():  # an established connection describes the peer best
        if c.name and (c.name not in conns or c.state == "established"):
            conns[c.name] = c
    size: dict[str, int] = {}
    used: dict[str, int] = {}
    for s, e, (_, peer, free) in a.ring.iter_ranges():
        if peer:
            size[peer] = size.get(peer, 0) + (e - s)
            used[peer] = used.get(peer, 0) + max(0, (e - s) - free)
    order = _owners(d)
    rows = []
    for n in order + sorted(known_peers(d) - set(order)):
        conn = conns.get(n)
        rows.append({
            "name": n, "nickname": d.peer_nickname(n), "me": n == a.name,
            "reachable": n == a.name or n in live,
            "letter": LETTERS[order.index(n)] if n in order[:len(LETTERS)] else "",
            "address": conn.address if conn is not None else "",
            "connection": "this peer" if n == a.name else (conn.state if conn is not None else
                                                           "via other peers" if n in live
                                                           else "none"),
            "size": size.get(n, 0), "share": size.get(n, 0) / a.universe.size,
            # ours exactly; others' from their gossiped free counts (hints, maybe stale)
            "in_use": _count_active(d) if n == a.name else used.get(n, 0)})
    return rows


def _ready(d: Node) -> tuple[bool, str]:
    if d.stopping:
        return False, "shutting down"
    if d.store_error is not None:
        return False, d.store_error
    a = d.allocator
    if a.state() not in ("ready", "waiting-for-space"):
        return False, advice(d) or weave_state(d)
    if not a.can_allocate():
        return False, "no free address here and no reachable peer with free space: " \
            + (advice(d) or "the range is full")
    return True, "ready"


def add_status_routes(app: web.Application, d: Node) -> None:
    async def status(req: web.Request) -> web.Response:
        return web.Response(text=status_text(d, ipam=req.query.get("ipam") == "1"))

    async def status_ipam(_: web.Request) -> web.Response:
        return web.Response(text=ipam_text(d))

    async def report_h(_: web.Request) -> web.Response:
        return web.json_response(report(d))

    async def metrics(_: web.Request) -> web.Response:
        body = d.metrics.render() if d.metrics is not None else b""
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        # the one failure a restart mends (once the disk is fixed): liveness says so
        if d.store_error is not None:
            return web.Response(status=503, text=d.store_error + "\n")
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, why = _ready(d)
        return web.Response(status=200 if ok else 503, text=why + "\n")

    app.router.add_get("/status", status)
    app.router.add_get("/status/ipam", status_ipam)
    app.router.add_get("/report", report_h)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
