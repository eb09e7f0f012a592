"""Where the daemon's HTTP apps are composed and put on their listeners.

The daemon shell (daemon.py) knows nothing of HTTP: it is given `serve`, which builds
the local API app (Weave's calls, the CNI endpoint, and status for the CLI) on the unix
socket and --http-addr, and the status app (status, report, metrics, health) on
--status-addr.  The apps see the daemon only through `node.Node`.  This module and the
CLI entry are the only importers of daemon.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .api import MAX_BODY, add_api_routes, weave_errors
from .cni import add_cni_routes
from .daemon import SOCKET_RECORD, Config, Daemon, addr_text, default_socket, is_loopback
from .metrics import Metrics
from .node import Node, StartupError
from .status import add_status_routes
from .web import add_page_route

log = logging.getLogger("weaveipam.server")

Routes = Callable[[web.Application, Node], None]

# Routes of the local API (unix socket and --http-addr).
API_ROUTES: list[Routes] = [add_api_routes, add_cni_routes, add_status_routes]
# Routes of the status listener (--status-addr).  A status page registers here, one line.
STATUS_ROUTES: list[Routes] = [add_status_routes, add_page_route]


def make_api_app(d: Node) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[weave_errors])
    for add in API_ROUTES:
        add(app, d)
    return app


def make_status_app(d: Node) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[weave_errors])
    for add in STATUS_ROUTES:
        add(app, d)
    return app


class Servers:
    """One daemon's listeners; cleanup() closes them and removes the socket file."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.socket: Path | None = None
        self.where = ""  # the listeners, for the daemon's start-up line

    async def cleanup(self) -> None:
        for r in reversed(self.runners):
            with contextlib.suppress(Exception):
                await r.cleanup()
        self.runners.clear()
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)
            self.socket = None


async def serve(d: Node) -> Servers:
    """Start the API and status listeners for `d`; StartupError if one cannot listen."""
    cfg = d.cfg
    d.metrics = Metrics(d)
    out = Servers()
    try:
        api = web.AppRunner(make_api_app(d), handle_signals=False, access_log=None,
                            shutdown_timeout=5.0, logger=http_log())
        await api.setup()
        out.runners.append(api)
        sock = cfg.socket or default_socket(cfg.data_dir)
        _prepare_socket(sock)
        old = os.umask(0o177)  # the socket is created 0600: only root/owner may allocate
        try:
            await web.UnixSite(api, str(sock)).start()
        except OSError as e:
            raise StartupError(f"cannot listen on socket {sock}: {e}") from e
        finally:
            os.umask(old)
        os.chmod(sock, 0o600)
        out.socket = sock
        # `weaveipam CMD --data-dir DIR` finds this daemon's socket from its data dir
        (cfg.data_dir / SOCKET_RECORD).write_text(f"{sock.absolute()}\n")
        if cfg.http_addr is not None:
            host, port = cfg.http_addr
            if not is_loopback(host):
                log.warning("--http-addr %s:%d is not a loopback address: anyone who can "
                            "reach it can allocate and release addresses", host, port)
            try:
                await web.TCPSite(api, host, port).start()
            except OSError as e:
                raise StartupError(f"cannot listen on --http-addr {host}:{port}: {e}") from e
        if cfg.status_addr is not None:
            st = web.AppRunner(make_status_app(d), handle_signals=False, access_log=None,
                               shutdown_timeout=2.0, logger=http_log())
            await st.setup()
            out.runners.append(st)
            host, port = cfg.status_addr
            try:
                await web.TCPSite(st, host, port).start()
            except OSError as e:
                raise StartupError(f"cannot listen on --status-addr {host}:{port}: {e}") from e
    except BaseException:
        await out.cleanup()
        raise
    out.where = (f"API on {sock}{addr_text(cfg.http_addr, ' and ')}, status on "
                 f"{addr_text(cfg.status_addr) or '(disabled)'}")
    return out


class _OneLine(logging.Filter):
    """aiohttp logs a request it cannot parse (an oversize or non-ASCII request line) with
    a full traceback; it is the client's mistake, and one line says all of it."""

    def __init__(self, bad: type[Exception]) -> None:
        super().__init__()
        self.bad = bad

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.bad):
            why = " ".join(str(getattr(exc, "message", exc)).split())
            record.msg, record.args = "%s: %s", (record.getMessage(), why[:200])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def http_log() -> logging.Logger:
    """The local servers' logger: aiohttp's, with bad requests on one line."""
    lg = logging.getLogger("weaveipam.http")
    if not lg.filters:
        lg.addFilter(_OneLine(HttpProcessingError))
    return lg


def make_daemon(cfg: Config) -> Daemon:
    """A daemon whose HTTP side is composed here."""
    return Daemon(cfg, serve=serve)


def _prepare_socket(sock: Path) -> None:
    """Remove a stale socket left by a crash; refuse if a daemon still listens there."""
    try:
        sock.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as e:
        raise StartupError(f"cannot create socket directory {sock.parent}: {e}") from e
    try:
        st = sock.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"--socket {sock} exists and is not a socket; remove it or "
                           "choose another path")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(sock))
    except OSError:
        sock.unlink(missing_ok=True)
        return
    finally:
        s.close()
    raise StartupError(f"another daemon is listening on socket {sock}; stop it, or "
                       "give this one its own --socket")
