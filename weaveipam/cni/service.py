"""The CNI commands, served by the daemon for the shim.

Each command is parsed and validated completely (config.py) before the first allocator
call, so a bad input changes no state.  Allocator failures become the spec's codes:
"unavailable" (no consensus yet, restarting, shutting down, store failed, no space) is 11
so the runtime retries; a DEL is only a success once the allocator has freed the key or
said it holds nothing for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from ..core.addr import CIDR, Range, fmt
from ..core.allocator import Allocate, Allocator, Claim, Lookup, Prime, Release, Request
from ..node import ApiError
from .config import (
    E_CONFLICT,
    E_INTERNAL,
    E_INVALID_CONFIG,
    E_MISMATCH,
    E_NOT_AVAILABLE,
    E_TRY_AGAIN,
    E_UNKNOWN_CONTAINER,
    FIXED_GATEWAY_IDENT,
    CniError,
    Env,
    NetConf,
    add_result,
    check_command_version,
    decode_config,
    ident_for,
    ident_prefix,
    node_gateway_ident,
    parse_config,
    parse_env,
    peek_version,
    pod_note,
    subnet_of,
    version_result,
)

log = logging.getLogger("weaveipam.cni")

MAX_GATEWAY_SWAPS = 3
GATEWAY_NOTE = "gateway of this node"


class DaemonLike(Protocol):
    """What the service needs of the daemon (a fake in unit tests)."""

    stopping: bool
    store_error: str | None

    @property
    def allocator(self) -> Allocator: ...

    async def call(self, req: Request) -> Any: ...


def _map(e: ApiError, what: str) -> CniError:
    if e.code == "unavailable":
        return CniError(E_TRY_AGAIN, f"{what}: {e.message}", "the weaveipam daemon cannot "
                        "serve this now; the runtime should retry")
    if e.code == "conflict":
        return CniError(E_CONFLICT, f"{what}: {e.message}")
    if e.code == "bad-request":
        return CniError(E_INVALID_CONFIG, f"{what}: {e.message}")
    if e.code == "not-found":
        return CniError(E_UNKNOWN_CONTAINER, f"{what}: {e.message}")
    return CniError(E_INTERNAL, f"{what}: {e.message}", "see the weaveipam daemon's log")


class CniService:
    def __init__(self, d: DaemonLike) -> None:
        self.d = d

    async def handle(self, raw_env: Mapping[str, str | None] | CniError,
                     stdin: bytes) -> tuple[int, bytes]:
        """One invocation: (exit status, stdout).  Never raises."""
        version = peek_version(stdin)
        try:
            out = await self._handle(raw_env, stdin)
        except CniError as e:
            if e.code not in (E_TRY_AGAIN, E_NOT_AVAILABLE):
                log.info("CNI request refused (code %d): %s", e.code, e.msg)
            return 1, _dump(e.to_json(version))
        except Exception as e:  # a bug here must still give the runtime an error, not hang
            log.exception("CNI request failed")
            return 1, _dump(CniError(E_INTERNAL, f"internal error: {e!r}",
                                     "see the weaveipam daemon's log").to_json(version))
        return 0, (_dump(out) if out is not None else b"")

    async def _handle(self, raw_env: Mapping[str, str | None] | CniError,
                      stdin: bytes) -> dict[str, Any] | None:
        if isinstance(raw_env, CniError):
            raise raw_env
        env = parse_env(raw_env)
        if env.command == "VERSION":
            return version_result(stdin)
        obj, version = decode_config(stdin)
        check_command_version(env.command, version)
        a = self.d.allocator
        conf = parse_config(obj, version, env, a.universe, a.default_subnet)
        if env.command == "ADD":
            return await self.add(env, conf)
        if env.command == "DEL":
            await self.delete(env, conf)
        elif env.command == "CHECK":
            await self.check(env, conf)
        elif env.command == "STATUS":
            await self.status(conf)
        elif env.command == "GC":
            await self.gc(conf)
        return None

    async def _call(self, req: Request, what: str) -> Any:
        try:
            return await self.d.call(req)
        except ApiError as e:
            raise _map(e, what) from None

    async def _held(self, ident: str, what: str) -> list[int]:
        try:
            return list(await self.d.call(Lookup(ident)))
        except ApiError as e:
            if e.code == "not-found":
                return []
            raise _map(e, what) from None

    # ---- commands ------------------------------------------------------------------------

    async def add(self, env: Env, conf: NetConf) -> dict[str, Any]:
        a = self.d.allocator
        ident = ident_for(conf.name, env.container_id, env.ifname)
        note = pod_note(env.args)
        what = f"ADD {conf.name}/{env.container_id[:12]}/{env.ifname}"
        gateway: int | None = None
        if conf.gateway is not None:
            await self._reserve_fixed(conf.gateway, conf.name, what)
            gateway = conf.gateway
        elif conf.wants_gateway:
            gateway = self._node_gateway_held(conf)
        before = set(a.allocations().get(ident, {}))
        if conf.static:
            got = await self._claim_all(ident, conf, note, what)
        else:
            got = [await self._allocate(ident, conf, note, what)]
        if conf.wants_gateway and gateway is None:
            # after the pod's address, so a refused ADD has changed nothing
            try:
                gateway = await self._node_gateway(conf, what)
            except CniError:
                await self._undo(ident, [x for x in got if x not in before], what)
                raise
        addrs = [(x, subnet_of(x, conf.subnet, a.universe, a.default_subnet).prefix)
                 for x in got]
        log.info("CNI %s: %s%s", what, ", ".join(f"{fmt(x, a.universe.bits)}/{p}"
                                                  for x, p in addrs),
                 f" ({note})" if note else "")
        return add_result(conf, addrs, a.universe.bits, gateway)

    def _node_gateway_key(self, conf: NetConf) -> tuple[str, CIDR | None]:
        """One gateway per node per subnet; the default subnet's under the plain ident."""
        a = self.d.allocator
        subnet = None if conf.subnet == a.default_subnet else conf.subnet
        return node_gateway_ident(subnet), subnet

    def _node_gateway_held(self, conf: NetConf) -> int | None:
        """This node's gateway if it has one already (no allocator round trip per ADD)."""
        a = self.d.allocator
        gw_ident, subnet = self._node_gateway_key(conf)
        window = (subnet or a.default_subnet).usable()
        return next((x for x in a.allocations().get(gw_ident, {}) if x in window), None)

    async def _node_gateway(self, conf: NetConf, what: str) -> int:
        """The address every pod of this node (in this subnet) gets as its gateway: allocated
        once from this node's own space under a reserved ident, so it is durable, the same
        after a restart, never a pod's, and different on every node (all the nodes'
        bridges are on one cluster range)."""
        a = self.d.allocator
        gw_ident, subnet = self._node_gateway_key(conf)
        gw: int = await self._call(Allocate(gw_ident, subnet, GATEWAY_NOTE),
                                   f"{what}: allocating this node's gateway")
        log.info("CNI gateway of this node in %s: %s (held as %r)",
                 subnet or a.default_subnet, fmt(gw, a.universe.bits), gw_ident)
        return gw

    async def _reserve_fixed(self, gw: int, network: str, what: str) -> None:
        """Hold an explicit gateway if it lies in our space; one a pod already holds is a
        conflict the operator must resolve (the bridge would take the pod's address)."""
        a = self.d.allocator
        if gw in a.allocations().get(FIXED_GATEWAY_IDENT, {}) or not a.space.owns(gw):
            return  # held, or another peer's: _allocate never hands it out if it moves here
        try:
            await self.d.call(Claim(FIXED_GATEWAY_IDENT, gw, f"ipam.gateway of {network}"))
        except ApiError as e:
            if e.code == "conflict":
                raise CniError(E_CONFLICT, f"{what}: ipam.gateway {fmt(gw, a.universe.bits)} "
                               f"is already in use: {e.message}",
                               "choose another ipam.gateway, or leave it out and the "
                               "daemon gives each node its own") from None
            raise _map(e, what) from None

    async def _allocate(self, ident: str, conf: NetConf, note: str, what: str) -> int:
        addr: int = await self._call(Allocate(ident, conf.subnet, note), what)
        for _ in range(MAX_GATEWAY_SWAPS):
            if addr != conf.gateway:
                return addr
            # an explicit gateway handed out here (its range moved to us since the last
            # ADD): reserve it under the gateways' ident, then allocate again
            await self._call(Release(ident, addr), what)
            await self._reserve_fixed(addr, conf.name, what)
            addr = await self._call(Allocate(ident, conf.subnet, note), what)
        raise CniError(E_INTERNAL, f"{what}: the allocator keeps handing out the gateway "
                       f"{fmt(addr, self.d.allocator.universe.bits)}")

    async def _claim_all(self, ident: str, conf: NetConf, note: str,
                         what: str) -> list[int]:
        """Claim every static address or none: a failure releases what this call took.
        Each keeps the prefix the result gives it."""
        a = self.d.allocator
        before = set(await self._held(ident, what))
        taken: list[int] = []
        try:
            for x in conf.static:
                subnet = subnet_of(x, conf.subnet, a.universe, a.default_subnet)
                await self._call(Claim(ident, x, note, subnet), what)
                if x not in before:
                    taken.append(x)
        except CniError:
            await self._undo(ident, taken, what)
            raise
        return list(conf.static)

    async def _undo(self, ident: str, addrs: list[int], what: str) -> None:
        """Give back what a refused ADD took."""
        for x in addrs:
            try:
                await self.d.call(Release(ident, x))
            except ApiError as e:
                log.error("%s: could not give back %s: %s", what,
                          fmt(x, self.d.allocator.universe.bits), e.message)

    async def delete(self, env: Env, conf: NetConf) -> None:
        """Free the key's addresses; nothing held is a success, an unreachable store not."""
        ident = ident_for(conf.name, env.container_id, env.ifname)
        what = f"DEL {conf.name}/{env.container_id[:12]}/{env.ifname}"
        try:
            gone = await self.d.call(Release(ident, None))
        except ApiError as e:
            if e.code == "not-found":
                return
            raise _map(e, what) from None
        bits = self.d.allocator.universe.bits
        log.info("CNI %s: freed %s", what, ", ".join(fmt(x, bits) for x in gone))

    async def check(self, env: Env, conf: NetConf) -> None:
        a = self.d.allocator
        bits = a.universe.bits
        ident = ident_for(conf.name, env.container_id, env.ifname)
        what = f"CHECK {conf.name}/{env.container_id[:12]}/{env.ifname}"
        self._serving(what)
        held = await self._held(ident, what)
        if not held:
            raise CniError(E_UNKNOWN_CONTAINER, f"{what}: no address is held for container "
                           f"{env.container_id} interface {env.ifname} in network "
                           f"{conf.name}")
        prev = conf.prev_ips or ()
        shown = ", ".join(fmt(x, bits) for x in held)
        if not prev:
            raise CniError(E_MISMATCH, f"{what}: prevResult has no address from the range "
                           f"{a.universe}; the daemon holds {shown}")
        missing = [x for x in prev if x not in held]
        if missing:
            raise CniError(E_MISMATCH, f"{what}: {fmt(missing[0], bits)} in prevResult is not "
                           f"held for this container and interface; the daemon holds {shown}")

    async def status(self, conf: NetConf) -> None:
        """Ready means an ADD would be served now.  An idle ring is primed here: a runtime
        that waits for STATUS before its first ADD must not wait forever."""
        try:
            self._serving("STATUS")
        except CniError as e:
            raise CniError(E_NOT_AVAILABLE, e.msg) from None
        a = self.d.allocator
        if a.state() in ("idle", "awaiting-consensus"):
            try:
                await self.d.call(Prime())
            except ApiError as e:
                raise CniError(E_NOT_AVAILABLE, f"STATUS: {e.message}") from None
        window = (conf.subnet or a.default_subnet).usable()
        if a.state() not in ("ready", "waiting-for-space"):
            raise CniError(E_NOT_AVAILABLE, f"STATUS: not ready: {a.state_text()}")
        if not _can_serve(a, window):
            raise CniError(E_NOT_AVAILABLE, "STATUS: no free address in "
                           f"{conf.subnet or a.default_subnet} here or on any reachable peer")

    async def gc(self, conf: NetConf) -> None:
        """Free this network's allocations whose attachment the runtime no longer has."""
        self._serving("GC")
        keep = {ident_for(conf.name, cid, ifn) for cid, ifn in conf.attachments or ()}
        prefix = ident_prefix(conf.name)
        stale = [i for i in list(self.d.allocator.allocations())
                 if i.startswith(prefix) and i not in keep]
        for ident in stale:
            try:
                await self.d.call(Release(ident, None))
            except ApiError as e:
                if e.code != "not-found":  # freed meanwhile by a DEL: fine
                    raise _map(e, f"GC {conf.name}") from None
        if stale:
            log.info("CNI GC %s: freed %d stale allocation(s)", conf.name, len(stale))

    def _serving(self, what: str) -> None:
        """Refuse (11) while the daemon cannot vouch for its allocations."""
        d = self.d
        if d.stopping:
            raise CniError(E_TRY_AGAIN, f"{what}: the daemon is shutting down; retry shortly")
        if d.store_error is not None:
            raise CniError(E_TRY_AGAIN, f"{what}: {d.store_error}")
        s = d.allocator.state()
        if s in ("duplicate-name", "removed", "left"):
            raise CniError(E_TRY_AGAIN, f"{what}: {d.allocator.state_text()}")


def _can_serve(a: Allocator, window: Range) -> bool:
    """An allocation in `window` could be served: free space here or at a reachable peer."""
    if a.space.has_free(window):
        return True
    live = a.reachable()
    return any(p in live for p in a.ring.free_in(window, a.name))


def _dump(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()

