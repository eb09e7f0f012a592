"""The local HTTP API: Weave's IPAM calls (same paths, verbs, bodies and status codes).

Served on the unix socket (the CNI shim and the CLI) and on --http-addr (Weave's
127.0.0.1:6784).  Plain text by default, as Weave; JSON with `Accept: application/json`.
Allocator failures map to status codes by their code, with the allocator's reason as the
body, so a caller always learns why (Weave answered most failures with a bare 400/500).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .cni import add_cni_routes
from .cni.config import reserved_ident
from .core.addr import CIDR, AddrError, fmt, parse_addr
from .core.allocator import Allocate, Claim, Leave, Lookup, Prime, Release, RmPeer
from .daemon import ApiError
from .status import add_status_routes

if TYPE_CHECKING:
    from .daemon import Daemon

MAX_BODY = 64 * 1024
STATUS = {"bad-request": 400, "not-found": 404, "conflict": 409, "too-large": 413,
          "unavailable": 503, "internal": 500}
OPENAPI = Path(__file__).with_name("openapi.yaml")


def wants_json(req: web.Request) -> bool:
    return "application/json" in req.headers.get("Accept", "")


def error_response(req: web.Request, code: str, message: str) -> web.Response:
    status = STATUS.get(code, 500)
    if wants_json(req):
        return web.json_response({"error": code, "message": message}, status=status)
    return web.Response(status=status, text=message.rstrip("\n") + "\n")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bounded bodies, and ApiError -> status code with the reason as the body."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return error_response(request, "too-large", f"request body over {MAX_BODY} bytes")
    if request.body_exists:
        try:
            await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(request, "too-large", f"request body over {MAX_BODY} bytes")
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(request, e.code, e.message)


def _bad(msg: str) -> ApiError:
    return ApiError("bad-request", msg)


def _writable(ident: str) -> str:
    """Refuse the idents the daemon keeps for itself (the CNI gateways)."""
    why = reserved_ident(ident)
    if why:
        raise _bad(why)
    return ident


class Api:
    def __init__(self, d: Daemon) -> None:
        self.d = d

    @property
    def universe(self) -> CIDR:
        return self.d.allocator.universe

    # ---- parsing ---------------------------------------------------------------------------

    def _subnet(self, ip: str, prefixlen: str) -> CIDR:
        if not prefixlen.isdigit():
            raise _bad(f"prefix length {prefixlen!r} is not a number")
        try:
            c = CIDR.parse(f"{ip}/{prefixlen}", strict=False)
        except AddrError as e:
            raise _bad(str(e)) from None
        if c.bits != self.universe.bits:
            raise _bad(f"{ip}/{prefixlen} is not of the same family as the range "
                       f"{self.universe}")
        return c

    def _addr(self, ip: str) -> int:
        try:
            a, bits = parse_addr(ip)
        except AddrError as e:
            raise _bad(str(e)) from None
        if bits != self.universe.bits:
            raise _bad(f"{ip} is not of the same family as the range {self.universe}")
        return a

    def _cidr_text(self, a: int, prefix: int | None = None) -> str:
        if prefix is None:
            a_ = self.d.allocator
            prefix = a_.default_subnet.prefix if a in a_.default_subnet else self.universe.prefix
        return f"{fmt(a, self.universe.bits)}/{prefix}"

    # ---- handlers --------------------------------------------------------------------------

    async def _allocate(self, req: web.Request, subnet: CIDR | None) -> web.Response:
        ident = _writable(req.match_info["id"])
        t0 = time.perf_counter()
        try:
            a = await self.d.call(Allocate(ident, subnet, req.query.get("note", "")))
        finally:
            self._observe("allocate", t0)
        prefix = (subnet or self.d.allocator.default_subnet).prefix
        text = self._cidr_text(a, prefix)
        if wants_json(req):
            return web.json_response({"containerid": ident, "address": text,
                                      "ip": fmt(a, self.universe.bits), "prefix": prefix})
        return web.Response(text=text)

    async def allocate_default(self, req: web.Request) -> web.Response:
        return await self._allocate(req, None)

    async def allocate_in(self, req: web.Request) -> web.Response:
        return await self._allocate(req, self._subnet(req.match_info["ip"],
                                                      req.match_info["prefixlen"]))

    async def claim(self, req: web.Request) -> web.Response:
        ident = _writable(req.match_info["id"])
        subnet = self._subnet(req.match_info["ip"], req.match_info["prefixlen"])
        a = self._addr(req.match_info["ip"])
        t0 = time.perf_counter()
        try:
            await self.d.call(Claim(ident, a, req.query.get("note", ""), subnet))
        finally:
            self._observe("allocate", t0)
        if wants_json(req):
            return web.json_response({"containerid": ident,
                                      "address": self._cidr_text(a, subnet.prefix)})
        return web.Response(status=204)

    async def lookup(self, req: web.Request) -> web.Response:
        ident = req.match_info["id"]
        addrs = await self.d.call(Lookup(ident))
        texts = [self._cidr_text(a) for a in addrs]
        if wants_json(req):
            return web.json_response({"containerid": ident, "addrs": texts})
        return web.Response(text="\n".join(texts))

    async def owned(self, req: web.Request) -> web.Response:
        owned = [{"containerid": ident, "addrs": [self._cidr_text(a) for a in addrs],
                  "notes": list(addrs.values())}
                 for ident, addrs in self.d.allocations().items()]
        return web.json_response({"owned": owned})

    async def release(self, req: web.Request) -> web.Response:
        ident = _writable(req.match_info["id"])
        ip = req.match_info.get("ip")
        addr = self._addr(ip) if ip is not None else None
        t0 = time.perf_counter()
        try:
            gone = await self.d.call(Release(ident, addr))
        finally:
            self._observe("release", t0)
        if wants_json(req):
            return web.json_response({"containerid": ident,
                                      "released": [self._cidr_text(a) for a in gone]})
        return web.Response(status=204)

    async def rmpeer(self, req: web.Request) -> web.Response:
        res: dict[str, Any] = await self.d.call(RmPeer(req.match_info["name"]))
        if wants_json(req):
            return web.json_response(res)
        if res.get("already"):
            return web.Response(text=f"0 IPs taken over from {res['peer']}: already removed, "
                                     f"its ranges went to {res['heir']}\n")
        return web.Response(text=f"{res['moved']} IPs taken over from {res['peer']}\n")

    async def leave(self, req: web.Request) -> web.Response:
        """Weave's reset: hand every range to a live peer; `?forget=true` also discards
        this peer's state and stops the daemon once the answer is sent.  Refused (409)
        while addresses are allocated here, unless `?force=true`."""
        force = req.query.get("force", "") in ("1", "true", "yes")
        res: dict[str, Any] = await self.d.call(Leave(force=force))
        if req.query.get("forget", "") in ("1", "true", "yes"):
            self.d.wipe_on_exit = True
            self.d.request_stop()
        if wants_json(req):
            return web.json_response(res)
        return web.Response(status=204)

    async def prime(self, req: web.Request) -> web.Response:
        state = await self.d.call(Prime())
        if wants_json(req):
            return web.json_response({"state": state})
        return web.Response(text=f"{state}\n")

    async def default_subnet(self, req: web.Request) -> web.Response:
        text = str(self.d.allocator.default_subnet)
        if wants_json(req):
            return web.json_response({"subnet": text, "range": str(self.universe)})
        return web.Response(text=text)

    async def openapi(self, _: web.Request) -> web.Response:
        try:
            body = OPENAPI.read_bytes()
        except OSError:
            return web.Response(status=404, text="openapi.yaml is not installed\n")
        return web.Response(body=body, content_type="application/yaml")

    def _observe(self, what: str, t0: float) -> None:
        m = self.d.metrics
        if m is None:
            return
        h = m.allocate_seconds if what == "allocate" else m.release_seconds
        h.observe(time.perf_counter() - t0)


def make_api_app(d: Daemon) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
    api = Api(d)
    r = app.router
    r.add_post("/ip/{id}", api.allocate_default)
    r.add_post("/ip/{id}/{ip}/{prefixlen}", api.allocate_in)
    r.add_put("/ip/{id}/{ip}/{prefixlen}", api.claim)
    r.add_get("/ip/{id}", api.lookup)
    r.add_get("/ip", api.owned)
    r.add_delete("/ip/{id}", api.release)
    r.add_delete("/ip/{id}/{ip}", api.release)
    r.add_delete("/peer/{name}", api.rmpeer)
    r.add_delete("/peer", api.leave)
    r.add_get("/ring", api.prime)
    r.add_get("/ipinfo/defaultsubnet", api.default_subnet)
    r.add_get("/openapi.yaml", api.openapi)
    add_status_routes(app, d)
    add_cni_routes(app, d)
    return app
