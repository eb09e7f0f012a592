"""The live status page: one self-contained HTML file served at `GET /` on the status port.

Everything (CSS, script, the SVG ring) is inline and the page fetches only `/report` from the
same daemon, so it works on an air-gapped node; the Content-Security-Policy makes sure it
never loads anything from elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ..node import Node

PAGE_FILE = Path(__file__).with_name("status.html")
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
    "X-Content-Type-Options": "nosniff",
}


def add_page_route(app: web.Application, _: Node) -> None:
    """Serve the page at `/` (read once: the package does not change under a daemon); it
    reads the node through `/report`, not directly."""
    body = PAGE_FILE.read_bytes()

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8",
                            headers=HEADERS)

    app.router.add_get("/", page)
