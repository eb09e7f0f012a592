"""Start real `weaveipam daemon` processes on 127.0.0.1 for tests and benchmarks.

Every process is tracked by its PID and killed at cleanup, whatever the test did.  Ports
are picked free by the kernel just before start; each node gets its own short tmp data
dir (unix socket paths must stay under 108 bytes).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from weaveipam.cli import UnixHTTPConnection

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def mac(i: int) -> str:
    return "02:00:00:00:" + f"{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


class Node:
    """One daemon process with its ports, data dir and log."""

    def __init__(self, idx: int, root: Path, *, range_: str, init: str,
                 extra: list[str] | None = None, name: str | None = None) -> None:
        self.idx = idx
        self.name = name or mac(idx + 1)
        self.nickname = f"node{idx}"
        self.dir = root / f"n{idx}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.socket = self.dir / "api.sock"
        self.log = self.dir / "log"
        self.peer_port, self.http_port, self.status_port = free_ports(3)
        self.range = range_
        self.init = init
        self.extra = list(extra or [])
        self.peers: list[str] = []
        self.env: dict[str, str] = {}  # on top of a cleaned copy of ours
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def peer_addr(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "weaveipam", "daemon", *self.peers,
                "--name", self.name, "--nickname", self.nickname,
                "--ipalloc-range", self.range, "--ipalloc-init", self.init,
                "--host", "127.0.0.1", "--port", str(self.peer_port),
                "--data-dir", str(self.data_dir), "--socket", str(self.socket),
                "--http-addr", f"127.0.0.1:{self.http_port}",
                "--status-addr", f"127.0.0.1:{self.status_port}", *self.extra]

    def start(self, wait: bool = True) -> Node:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        logf = open(self.log, "ab")  # noqa: SIM115 - kept by the child
        logf.write(f"--- start {self.starts}\n".encode())
        logf.flush()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        # no Kubernetes mode or password from the environment (a test run inside a Pod)
        for k in ("PEERS", "IPALLOC_RANGE", "IPALLOC_INIT", "WEAVEIPAM_SOCKET",
                  "KUBERNETES_SERVICE_HOST", "NODE_NAME", "WEAVE_PASSWORD",
                  "WEAVEIPAM_INSECURE_PEERS"):
            env.pop(k, None)
        env.update(self.env)
        self.proc = subprocess.Popen(self.argv(), stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=self.dir)
        logf.close()
        if wait:
            self.wait_up()
        return self

    def wait_up(self, timeout: float = 20.0, retries: int = 3) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_tail(5)
                if retries and ("in use" in tail or "cannot listen" in tail):
                    # a port picked free was taken meanwhile by another process: new ports
                    self.peer_port, self.http_port, self.status_port = free_ports(3)
                    self.start(wait=False)
                    return self.wait_up(timeout, retries - 1)
                raise AssertionError(f"node{self.idx} exited {self.proc.returncode}:\n"
                                     + self.log_tail())
            try:
                if self.status("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"node{self.idx} did not come up:\n" + self.log_tail())

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node{self.idx} ignored SIGTERM:\n" + self.log_tail()) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by PID: only our own child
            self.proc.wait(10)

    # ---- HTTP ------------------------------------------------------------------------

    def _do(self, conn: http.client.HTTPConnection, method: str, path: str,
            body: bytes | None, headers: dict[str, str]) -> tuple[int, str]:
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace")
        except http.client.HTTPException as e:
            raise OSError(str(e)) from e
        finally:
            conn.close()

    def api(self, method: str, path: str, *, body: bytes | None = None, json_: bool = False,
            timeout: float = 60.0, unix: bool = False) -> tuple[int, str]:
        headers = {"Accept": "application/json"} if json_ else {}
        conn: http.client.HTTPConnection
        if unix:
            conn = UnixHTTPConnection(str(self.socket), timeout)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        return self._do(conn, method, path, body, headers)

    def status(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.status_port, timeout=timeout)
        return self._do(conn, "GET", path, None, {})

    def report(self) -> dict[str, Any]:
        code, body = self.status("/report")
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def allocate(self, ident: str, subnet: str = "", timeout: float = 60.0) -> str:
        """The address (without prefix) or an AssertionError with the reason."""
        code, body = self.api("POST", f"/ip/{ident}{subnet}", timeout=timeout)
        assert code == 200, f"allocate {ident} on node{self.idx}: {code} {body}"
        return body.split("/")[0]

    def lookup(self, ident: str) -> list[str]:
        code, body = self.api("GET", f"/ip/{ident}")  # Weave's: 200, space-separated
        assert code == 200, body
        return [a.split("/")[0] for a in body.split()]


class Cluster:
    """Nodes that know each other's peer ports; everything is killed at close()."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[Node] = []

    def add(self, n: int, *, range_: str = "10.32.0.0/12", init: str | None = None,
            extra: list[str] | None = None, connect: bool = True, start: bool = True
            ) -> list[Node]:
        new = [Node(len(self.nodes) + i, self.root, range_=range_,
                    init=init or f"consensus={n}", extra=extra) for i in range(n)]
        allnodes = self.nodes + new
        if connect:
            for node in new:
                node.peers = [m.peer_addr for m in allnodes if m is not node]
        self.nodes.extend(new)
        if start:
            for node in new:
                node.start(wait=False)
            for node in new:
                node.wait_up()
        return new

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.signal(signal.SIGCONT)
            with contextlib.suppress(Exception):
                node.kill()


def wait_for(pred: Any, timeout: float = 20.0, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (OSError, AssertionError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or pred}: last {last!r}")


@contextlib.contextmanager
def temp_cluster(prefix: str = "wi-") -> Iterator[Cluster]:
    """A Cluster in a fresh temp dir; its daemons are stopped and the dir removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    c = Cluster(root)
    try:
        yield c
    finally:
        c.close()
        if not os.environ.get("WEAVEIPAM_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with temp_cluster() as c:
        yield c


@contextlib.contextmanager
def single_node(prefix: str) -> Iterator[Node]:
    """One ready daemon (consensus=1) in a temp dir, stopped and removed afterwards."""
    with temp_cluster(prefix) as c:
        (n,) = c.add(1, init="consensus=1")
        wait_for(lambda: n.api("GET", "/ring", timeout=10)[0] == 200
                 and n.status("/readyz")[0] == 200, timeout=30, what="ready")
        yield n
