"""What the HTTP apps (API, status, metrics, CNI) need of the daemon, as a Protocol.

The apps depend on this small interface, not on daemon.py: the daemon shell is given to
them by the composition point (server.py), so nothing imports daemon.py back and a fake
node can stand in for it in tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections import deque

    from .core.allocator import Allocator, Request
    from .mesh import ConnInfo, Mesh
    from .store import Store


class StartupError(Exception):
    """The daemon refuses to start; the message says why and what to do."""


class ApiError(Exception):
    """An allocator Fail (or a shell-side refusal) for the API to map to a status code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NodeConfig(Protocol):
    """The part of the daemon's configuration the HTTP side reads."""

    @property
    def nickname(self) -> str: ...
    @property
    def password(self) -> bytes | None: ...
    @property
    def second_password(self) -> bytes | None: ...
    @property
    def op_timeout(self) -> float: ...
    @property
    def data_dir(self) -> Path: ...
    @property
    def socket(self) -> Path | None: ...
    @property
    def http_addr(self) -> tuple[str, int] | None: ...
    @property
    def status_addr(self) -> tuple[str, int] | None: ...


class Node(Protocol):
    """One running peer as the HTTP apps see it (daemon.Daemon is the real one)."""

    name: str
    stopping: bool
    store_error: str | None
    wipe_on_exit: bool
    conn_terminations: int
    metrics: Any  # metrics.Metrics once the servers are up
    kube: Any  # kube.mode.KubeMode in Kubernetes mode, else None
    events: deque[tuple[float, str, str]]  # recent allocator events: (time, level, text)
    mesh: Mesh | None

    @property
    def cfg(self) -> NodeConfig: ...
    @property
    def allocator(self) -> Allocator: ...
    @property
    def store(self) -> Store | None: ...

    async def call(self, req: Request) -> Any: ...
    def allocations(self) -> dict[str, dict[int, str]]: ...
    def request_stop(self) -> None: ...
    def connections(self) -> list[ConnInfo]: ...
    def poll_connections(self) -> None: ...
    def peer_nickname(self, name: str) -> str: ...
    def connect_peers(self, peers: Sequence[str], replace: bool) -> None: ...
    def forget_peers(self, peers: Sequence[str]) -> None: ...
    def direct_peers(self) -> list[str]: ...
