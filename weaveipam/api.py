"""The local HTTP API: Weave's IPAM and peer calls, answered as Weave's daemon answers them.

Served on the unix socket (the CNI shim and the CLI) and on --http-addr (Weave's
127.0.0.1:6784).  Every call has ONE handler, which produces an `Answer`: the outcome in
Weave's words (status code and plain-text body, byte for byte what Weave's daemon sends,
so Weave's Go client, CNI plugin and `weave` script work unchanged) and in ours (a JSON
body with a machine-readable error code and the precise reason, and our status codes).
`render` picks one: JSON when the caller sends `Accept: application/json`, else Weave's
text.  Our error code also travels in the `X-Weaveipam-Error` header of both forms.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .cni.config import reserved_ident
from .core.addr import CIDR, AddrError, fmt, parse_addr
from .core.allocator import Allocate, Claim, Leave, Lookup, Prime, Release, RmPeer
from .node import ApiError, Node
from .status import state_text

MAX_BODY = 64 * 1024
STATUS = {"bad-request": 400, "not-found": 404, "conflict": 409, "too-large": 413,
          "unavailable": 503, "internal": 500}
ERROR_HEADER = "X-Weaveipam-Error"
MIN_SUBNET_SIZE = 4  # Weave's: the network and broadcast addresses leave 2 for hosts
OPENAPI = Path(__file__).with_name("openapi.yaml")
# gorilla/mux's answers for an unknown path and a known path with the wrong verb
NOT_FOUND_TEXT = "404 page not found\n"
RING_POLL = 0.05


def wants_json(req: web.Request) -> bool:
    return "application/json" in req.headers.get("Accept", "")


@dataclass
class Answer:
    """One call's outcome before rendering: Weave's form and ours."""

    text: str = ""                # Weave's body
    status: int = 200             # Weave's status code (204: no body)
    data: Any = None              # our JSON body
    json_status: int | None = None  # our status code, when it is not Weave's
    error: str | None = None      # our error code, for failures


class Refusal(ApiError):
    """A refusal with Weave's words for it; `weave` None means Weave had no answer for
    this case (we refuse where Weave would block or misbehave): ours is sent in both."""

    def __init__(self, code: str, message: str, weave: str | None = None,
                 weave_status: int = 400) -> None:
        super().__init__(code, message)
        self.weave = weave
        self.weave_status = weave_status


def refused(e: ApiError) -> Answer:
    ours = STATUS.get(e.code, 500)
    weave = e.weave if isinstance(e, Refusal) else None
    if weave is None:
        text, status = e.message.rstrip("\n") + "\n", ours
    else:  # Go's http.Error: the text and a newline
        assert isinstance(e, Refusal)
        text, status = weave + "\n", e.weave_status
    return Answer(text=text, status=status, data={"error": e.code, "message": e.message},
                  json_status=ours, error=e.code)


def render(req: web.Request, ans: Answer) -> web.Response:
    headers = {ERROR_HEADER: ans.error} if ans.error else {}
    if wants_json(req):
        status = ans.json_status or (200 if ans.status == 204 else ans.status)
        return web.json_response(ans.data, status=status, headers=headers)
    if ans.status == 204:
        return web.Response(status=204, headers=headers)
    if ans.status >= 400:  # Go's http.Error
        headers["X-Content-Type-Options"] = "nosniff"
    return web.Response(status=ans.status, text=ans.text, headers=headers)


def too_large() -> ApiError:
    return ApiError("too-large", f"request body over {MAX_BODY} bytes")


@web.middleware
async def weave_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bounded bodies; refusals, unknown paths and wrong verbs answered as Weave's mux."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return render(request, refused(too_large()))
    if request.body_exists:
        try:
            await request.read()
        except web.HTTPRequestEntityTooLarge:
            return render(request, refused(too_large()))
    try:
        return await handler(request)
    except ApiError as e:
        return render(request, refused(e))
    except web.HTTPMethodNotAllowed as e:
        if wants_json(request):
            return web.json_response(
                {"error": "method-not-allowed",
                 "message": f"{request.method} is not allowed on {request.path}; use "
                            f"{', '.join(sorted(e.allowed_methods))}"},
                status=405, headers={ERROR_HEADER: "method-not-allowed"})
        return web.Response(status=405)
    except web.HTTPNotFound:
        if wants_json(request):
            return web.json_response(
                {"error": "no-such-path", "message": f"no such path: {request.path}"},
                status=404, headers={ERROR_HEADER: "no-such-path"})
        return web.Response(status=404, text=NOT_FOUND_TEXT,
                            headers={"X-Content-Type-Options": "nosniff"})


def _writable(ident: str) -> str:
    """Refuse the idents the daemon keeps for itself (the CNI gateways)."""
    why = reserved_ident(ident)
    if why:
        raise Refusal("bad-request", why)
    return ident


class Api:
    def __init__(self, d: Node) -> None:
        self.d = d

    @property
    def universe(self) -> CIDR:
        return self.d.allocator.universe

    # ---- parsing: our reason, and Weave's words for the same mistake ------------------------

    def _cidr(self, ip: str, prefixlen: str, subnet: bool) -> CIDR:
        """`ip/prefixlen`; with `subnet`, as Weave's ParseCIDRSubnet (host bits zero, at
        least 4 addresses), else any address in its subnet (a claim)."""
        text = f"{ip}/{prefixlen}"
        if not prefixlen.isdigit():
            raise Refusal("bad-request", f"prefix length {prefixlen!r} is not a number",
                          f"invalid CIDR address: {text}")
        try:
            c = CIDR.parse(text, strict=False)
        except AddrError as e:
            raise Refusal("bad-request", str(e), f"invalid CIDR address: {text}") from None
        if c.bits != self.universe.bits:
            raise Refusal("bad-request", f"{text} is not of the same family as the range "
                          f"{self.universe}")
        if subnet:
            if parse_addr(ip)[0] != c.start:
                raise Refusal("bad-request", f"{text} has host bits set: give the subnet "
                              f"itself, {c}",
                              "invalid subnet - bits after network prefix are not all "
                              f"zero: {text}")
            if c.size < MIN_SUBNET_SIZE:
                raise Refusal("bad-request", f"{text} is too small to allocate in: a subnet "
                              f"needs at least {MIN_SUBNET_SIZE} addresses",
                              f"invalid subnet - smaller than minimum size {MIN_SUBNET_SIZE}"
                              f": {text}")
        return c

    def _addr(self, ip: str) -> int:
        try:
            a, bits = parse_addr(ip)
        except AddrError as e:
            raise Refusal("bad-request", str(e), f"invalid IP Address: {ip}") from None
        if bits != self.universe.bits:
            raise Refusal("bad-request",
                          f"{ip} is not of the same family as the range {self.universe}")
        return a

    def _text(self, a: int, prefix: int | None = None) -> str:
        if prefix is None:
            prefix = self.d.allocator.prefix_of(a)
        return f"{fmt(a, self.universe.bits)}/{prefix}"

    # ---- handlers: one per call ----------------------------------------------------------

    async def _allocate(self, req: web.Request, subnet: CIDR | None) -> web.Response:
        ident = _writable(req.match_info["id"])
        t0 = time.perf_counter()
        try:
            a = await self.d.call(Allocate(ident, subnet, req.query.get("note", "")))
        except ApiError as e:
            out = subnet or self.d.allocator.default_subnet
            if e.code == "bad-request" and not self.universe.contains_cidr(out):
                raise Refusal(e.code, e.message,
                              f"range {out} out of bounds: {self.universe}") from None
            raise
        finally:
            self._observe("allocate", t0)
        text = self._text(a, (subnet or self.d.allocator.default_subnet).prefix)
        return render(req, Answer(text=text, data={
            "containerid": ident, "address": text, "ip": fmt(a, self.universe.bits),
            "prefix": int(text.rsplit("/", 1)[1])}))

    async def allocate_default(self, req: web.Request) -> web.Response:
        return await self._allocate(req, None)

    async def allocate_in(self, req: web.Request) -> web.Response:
        return await self._allocate(req, self._cidr(req.match_info["ip"],
                                                    req.match_info["prefixlen"], subnet=True))

    async def claim(self, req: web.Request) -> web.Response:
        ident = _writable(req.match_info["id"])
        cidr = self._cidr(req.match_info["ip"], req.match_info["prefixlen"], subnet=False)
        a = self._addr(req.match_info["ip"])
        text = self._text(a, cidr.prefix)
        t0 = time.perf_counter()
        try:
            await self.d.call(Claim(ident, a, req.query.get("note", ""), cidr))
        except ApiError as e:
            raise Refusal(e.code, e.message, self._claim_words(a, text, e)) from None
        finally:
            self._observe("allocate", t0)
        return render(req, Answer(status=204, data={"containerid": ident, "address": text}))

    def _claim_words(self, a: int, text: str, e: ApiError) -> str | None:
        """Weave's `Unable to claim: ...` for the same refusal."""
        al = self.d.allocator
        if e.code == "conflict":
            held = al.holder.get(a)
            if held is not None:
                return f"Unable to claim: address {text} is already owned by {held}"
            owner = al.ring.owner(a)
            if owner:
                nick = al.nickname_of(owner)
                return (f"Unable to claim: address {text} is owned by other peer {owner}"
                        + (f" ({nick})" if nick else ""))
        if e.code in ("bad-request", "conflict"):
            return f"Unable to claim: {e.message}"
        return None

    async def _lookup(self, req: web.Request, within: CIDR) -> web.Response:
        """Weave lists only the addresses inside the subnet's host range (the default
        subnet's for `GET /ip/{id}`), space-separated, and 200 with nothing for none."""
        ident = req.match_info["id"]
        try:
            addrs: list[int] = await self.d.call(Lookup(ident))
        except ApiError as e:
            if e.code == "unavailable":
                raise
            # Weave: nothing, whatever the id; ours: 404 (none held), 400 (a bad id)
            return render(req, Answer(text="", json_status=STATUS.get(e.code, 500),
                                      error=e.code,
                                      data={"error": e.code, "message": e.message}))
        usable = within.usable()
        texts = [self._text(a) for a in addrs]
        shown = [t for a, t in zip(addrs, texts, strict=True) if a in usable]
        return render(req, Answer(text=" ".join(shown),
                                  data={"containerid": ident, "addrs": texts}))

    async def lookup(self, req: web.Request) -> web.Response:
        return await self._lookup(req, self.d.allocator.default_subnet)

    async def lookup_in(self, req: web.Request) -> web.Response:
        return await self._lookup(req, self._cidr(req.match_info["ip"],
                                                  req.match_info["prefixlen"], subnet=True))

    async def owned(self, req: web.Request) -> web.Response:
        mine = self.d.allocations().items()
        weave = [{"containerid": ident, "addrs": [self._text(a) for a in addrs]}
                 for ident, addrs in mine]
        ours = [{**w, "notes": list(addrs.values())}
                for w, (_, addrs) in zip(weave, mine, strict=True)]
        # Go's encoder: compact, a newline after, and null for no entries
        ans = Answer(text=go_json({"owned": weave or None}) + "\n", data={"owned": ours})
        if wants_json(req):
            return render(req, ans)
        return web.Response(body=ans.text.encode(),
                            headers={"Content-Type": "application/json"})

    async def release(self, req: web.Request) -> web.Response:
        ident = _writable(req.match_info["id"])
        ip = req.match_info.get("ip")
        addr = self._addr(ip) if ip is not None else None
        texts = {} if addr is None else {addr: self._text(addr)}
        t0 = time.perf_counter()
        try:
            gone = await self.d.call(Release(ident, addr))
        except ApiError as e:
            if e.code == "unavailable":
                raise
            # Weave knows one refusal: nothing of that id (or that address) is held
            weave = (f"Delete: no addresses for {ident}" if addr is None else
                     f"Unable to free: Free: address {ip} not found for {ident}")
            raise Refusal(e.code, e.message, weave) from None
        finally:
            self._observe("release", t0)
        return render(req, Answer(status=204, data={
            "containerid": ident, "released": [texts.get(a) or self._text(a) for a in gone]}))

    async def rmpeer(self, req: web.Request) -> web.Response:
        """Weave answers 200 "N IPs taken over from X" whatever happened (0 for a peer it
        does not know); we also refuse a reachable peer (409), as Weave should have."""
        given = req.match_info["name"]
        # ?gone=A,B: other peers the operator says are gone too (RmPeer.gone)
        gone = tuple(g for g in req.query.get("gone", "").split(",") if g)
        try:
            res: dict[str, Any] = await self.d.call(RmPeer(given, gone))
        except ApiError as e:
            if e.code in ("conflict", "unavailable"):
                raise  # a reachable peer, or no answer in time: Weave had no such refusal
            return render(req, Answer(text=f"0 IPs taken over from {given}\n",
                                      json_status=STATUS.get(e.code, 500), error=e.code,
                                      data={"error": e.code, "message": e.message}))
        moved = 0 if res.get("already") else res.get("moved", 0)
        return render(req, Answer(text=f"{moved} IPs taken over from {given}\n", data=res))

    async def leave(self, req: web.Request) -> web.Response:
        """Weave's reset: hand every range to a live peer; `?forget=true` also discards
        this peer's state and stops the daemon once the answer is sent.  Refused (409)
        while addresses are allocated here, unless `?force=true`."""
        force = req.query.get("force", "") in ("1", "true", "yes")
        res: dict[str, Any] = await self.d.call(Leave(force=force))
        if req.query.get("forget", "") in ("1", "true", "yes"):
            self.d.wipe_on_exit = True
            self.d.request_stop()
        return render(req, Answer(status=204, data=res))

    async def prime(self, req: web.Request) -> web.Response:
        """Weave's `weave prime`: start consensus and answer once the ring exists (we give
        up after --op-timeout with the reason, where Weave would wait for ever)."""
        state = await self.d.call(Prime())
        deadline = time.monotonic() + self.d.cfg.op_timeout
        while self.d.allocator.ring.is_empty():
            if time.monotonic() >= deadline or self.d.stopping:
                raise ApiError("unavailable", "no ring yet: " + state_text(self.d))
            await asyncio.sleep(RING_POLL)
            state = self.d.allocator.state()
        return render(req, Answer(text="", data={"state": state}))

    async def default_subnet(self, req: web.Request) -> web.Response:
        text = str(self.d.allocator.default_subnet)
        return render(req, Answer(text=text, data={"subnet": text,
                                                    "range": str(self.universe)}))

    async def tracker(self, req: web.Request) -> web.Response:
        """Weave's range tracker name (awsvpc or nothing): we have none."""
        return render(req, Answer(text="", data={"tracker": None}))

    async def _peers_form(self, req: web.Request) -> tuple[list[str], bool]:
        """Weave's form, as Go's ParseForm reads it: the query, and a urlencoded body
        (others are ignored); `peer` repeated, `replace=true`."""
        fields = list(req.query.items())
        if req.content_type == "application/x-www-form-urlencoded":
            raw = await req.read()
            try:
                fields += urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True,
                                                 errors="strict")
            except (UnicodeDecodeError, ValueError) as e:
                raise ApiError("bad-request", f"unable to parse form: {e}") from None
        peers = [v for k, v in fields if k == "peer"]
        replace = next((v for k, v in fields if k == "replace"), "") == "true"
        return peers, replace

    async def connect(self, req: web.Request) -> web.Response:
        peers, replace = await self._peers_form(req)
        self.d.connect_peers(peers, replace)
        return render(req, Answer(data={"peers": self.d.direct_peers()}))

    async def forget(self, req: web.Request) -> web.Response:
        peers, _ = await self._peers_form(req)
        self.d.forget_peers(peers)
        return render(req, Answer(data={"peers": self.d.direct_peers()}))

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


_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
               "\u2029": "\\u2029"}


def go_json(obj: Any) -> str:
    """JSON as Go's encoding/json writes it: compact, UTF-8, HTML characters escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in _GO_ESCAPES.items():
        text = text.replace(ch, esc)
    return text


def add_api_routes(app: web.Application, d: Node) -> None:
    """Weave's IPAM and peer routes (ipam/http.go, router/http.go, weaver's /peer)."""
    api = Api(d)
    r = app.router
    r.add_post("/ip/{id}", api.allocate_default)
    r.add_post("/ip/{id}/{ip}/{prefixlen}", api.allocate_in)
    r.add_put("/ip/{id}/{ip}/{prefixlen}", api.claim)
    r.add_get("/ip/{id}/{ip}/{prefixlen}", api.lookup_in)
    r.add_get("/ip/{id}", api.lookup)
    r.add_get("/ip", api.owned)
    r.add_delete("/ip/{id}", api.release)
    r.add_delete("/ip/{id}/{ip}", api.release)
    r.add_delete("/peer/{name}", api.rmpeer)
    r.add_delete("/peer", api.leave)
    r.add_get("/ring", api.prime)
    r.add_get("/ipinfo/defaultsubnet", api.default_subnet)
    r.add_get("/ipinfo/tracker", api.tracker)
    r.add_post("/connect", api.connect)
    r.add_post("/forget", api.forget)
    r.add_get("/openapi.yaml", api.openapi)
