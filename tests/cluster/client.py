"""The daemons' local API over their unix sockets (aiohttp UnixConnector)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from .harness import ChaosNode

# (status, body); status -1 means no answer (connection refused, reset or timed out)
Answer = tuple[int, str]


class NodeClient:
    def __init__(self, node: ChaosNode, limit: int = 32) -> None:
        self.node = node
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(node.socket), limit=limit),
            headers={"Accept": "text/plain"})

    async def call(self, method: str, path: str, timeout: float = 8.0,
                   accept_json: bool = False) -> Answer:
        """Weave's text answers, or ours (JSON: precise status codes) with accept_json."""
        headers = {"Accept": "application/json"} if accept_json else None
        try:
            async with self.session.request(
                    method, "http://localhost" + path, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status, await r.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return -1, f"{type(e).__name__}: {e}"

    async def report(self, timeout: float = 2.0) -> dict[str, Any] | None:
        code, body = await self.call("GET", "/report", timeout)
        if code != 200:
            return None
        result: dict[str, Any] = json.loads(body)
        return result

    async def owned(self, timeout: float = 10.0) -> dict[str, list[str]] | None:
        """ident -> addresses (without prefix) held by this node, or None if unreachable."""
        code, body = await self.call("GET", "/ip", timeout, accept_json=True)
        if code != 200:
            return None
        return {o["containerid"]: [a.split("/")[0] for a in o["addrs"]]
                for o in json.loads(body)["owned"]}

    async def close(self) -> None:
        await self.session.close()


def ring_signature(report: dict[str, Any]) -> tuple[tuple[str, int, str, int], ...]:
    """The ring as every node must agree on it: free counts are hints and may lag."""
    return tuple((e["token"], e["size"], e["peer"] or "", e["version"])
                 for e in report["entries"])


def own_share(report: dict[str, Any]) -> float:
    size: int = sum(e["size"] for e in report["entries"]) or 1
    mine: int = sum(e["size"] for e in report["entries"] if e["peer"] == report["name"])
    return mine / size
