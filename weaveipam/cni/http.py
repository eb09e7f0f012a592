"""`POST /cni`: one CNI invocation from the shim, answered as the shim prints it.

The CNI_* variables arrive as percent-escaped `X-CNI-*` headers, stdin as the body.  The
answer is always HTTP 200 with the CNI output as the body and the plugin's exit status in
`X-CNI-Exit`, so the shim needs no CNI knowledge; any other answer (say, 413 from the size
limit) is not a CNI answer and the shim reports it as an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .config import CniError, env_from_headers
from .service import CniService

if TYPE_CHECKING:
    from ..node import Node

EXIT_HEADER = "X-CNI-Exit"


def add_cni_routes(app: web.Application, d: Node) -> None:
    """Register the CNI endpoint on the local API app (unix socket and --http-addr)."""
    svc = CniService(d)

    async def cni(req: web.Request) -> web.Response:
        raw: dict[str, str | None] | CniError
        try:
            raw = env_from_headers(req.headers)
        except CniError as e:
            raw = e
        body = await req.read()
        code, out = await svc.handle(raw, body)
        return web.Response(body=out, headers={EXIT_HEADER: str(code)},
                            content_type="application/json")

    app.router.add_post("/cni", cni)
