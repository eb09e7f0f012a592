"""The C shim against a fake daemon on a unix socket: what it sends, what it refuses to
send, and how it treats replies that are slow, short, malformed or absent.  No root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from capability import missing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cni_support import SHIM_DIR, CniRun, run_plugin, shim, shim_binary  # noqa: F401

__all__ = ["shim"]

VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
Behave = Callable[[socket.socket, bytes], None]


def reply(body: bytes = b"", exit_code: int | None = 0, status: str = "200 OK",
          extra: bytes = b"") -> bytes:
    h = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n".encode()
    if exit_code is not None:
        h += f"X-CNI-Exit: {exit_code}\r\n".encode()
    return h + f"Content-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body


def answer(data: bytes) -> Behave:
    def b(conn: socket.socket, _req: bytes) -> None:
        conn.sendall(data)
    return b


class FakeDaemon:
    """Accepts on a unix socket, reads one HTTP request, lets `behave` answer it."""

    def __init__(self, path: Path, behave: Behave) -> None:
        self.path = path
        self.behave = behave
        self.requests: list[bytes] = []
        self.accepts = 0
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepts += 1
            with conn:
                conn.settimeout(5)
                req = self._read(conn)
                self.requests.append(req)
                with contextlib.suppress(OSError):
                    self.behave(conn, req)

    @staticmethod
    def _read(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                n = int(v)
        while len(body) < n:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ws-"))  # short: unix socket paths max 107 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sockdir: Path) -> Iterator[Callable[[Behave], FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(behave: Behave) -> FakeDaemon:
        f = FakeDaemon(sockdir / f"d{len(made)}.sock", behave)
        made.append(f)
        return f
    try:
        yield make
    finally:
        for f in made:
            f.close()


ENV: dict[str, Any] = {"container_id": "abc", "netns": "/run/netns/x", "ifname": "eth0"}
CONF = {"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "weave-ipam"}}


def parse_request(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, body


def cni_error(r: CniRun, code: int) -> dict[str, Any]:
    assert r.rc != 0, str(r)
    j = json.loads(r.out)  # valid JSON on stdout, always
    assert j["code"] == code, str(r)
    assert set(j) <= {"cniVersion", "code", "msg", "details"}
    return dict(j)


# ---- what goes out ----------------------------------------------------------------------------

def test_request_framing(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    f = fake(answer(reply(b'{"answer":1}\n')))
    stdin = b'{"cniVersion":"1.0.0"}\r\n\x00\xff and more'
    r = run_plugin(shim, "ADD", stdin, container_id="abc", netns="", ifname="eth0",
                   args="K8S_POD_NAME=a b%\u00f6", socket=f.path)
    assert r.rc == 0 and r.out == '{"answer":1}\n', str(r)
    line, h, body = parse_request(f.requests[0])
    assert line == "POST /cni HTTP/1.1"
    assert h["x-cni-command"] == "ADD" and h["x-cni-containerid"] == "abc"
    assert h["x-cni-args"] == "K8S_POD_NAME=a%20b%25%C3%B6"
    assert h["x-cni-netns"] == ""             # set but empty: sent empty
    assert "x-cni-path" not in h              # unset: not sent
    assert h["content-length"] == str(len(stdin)) and body == stdin
    assert h["connection"] == "close"


def test_exit_status_and_body_pass_through(shim: Path,
                                           fake: Callable[[Behave], FakeDaemon]) -> None:
    body = b'{"cniVersion":"1.0.0","code":3,"msg":"no"}\n'
    f = fake(answer(reply(body, 3, extra=b"x-cni-exit-note: ignored\r\n")))
    r = run_plugin(shim, "CHECK", CONF, **ENV, socket=f.path)
    assert r.rc == 3 and r.out == body.decode()
    f2 = fake(answer(b"HTTP/1.1 200 OK\r\nx-cni-exit:  7 \r\ncontent-length: 2\r\n\r\nokEXTRA"))
    r = run_plugin(shim, "ADD", CONF, **ENV, socket=f2.path)
    assert r.rc == 7 and r.out == "ok"


def test_unknown_command_is_the_daemons_business(shim: Path,
                                                 fake: Callable[[Behave], FakeDaemon]) -> None:
    f = fake(answer(reply(b"x", 1)))
    assert run_plugin(shim, "FROB", CONF, socket=f.path).rc == 1
    assert parse_request(f.requests[0])[1]["x-cni-command"] == "FROB"
    assert run_plugin(shim, None, CONF, socket=f.path).rc == 1
    assert "x-cni-command" not in parse_request(f.requests[1])[1]


def test_no_stdin(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    f = fake(answer(reply(b"", 0)))
    r = subprocess.run([str(shim)], stdin=subprocess.DEVNULL, capture_output=True,
                       env={"CNI_COMMAND": "DEL", "WEAVE_IPAM_SOCKET": str(f.path)}, timeout=30)
    assert r.returncode == 0
    assert parse_request(f.requests[0])[1]["content-length"] == "0"


@pytest.mark.parametrize("var", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
                                 "CNI_ARGS", "CNI_PATH"])
@pytest.mark.parametrize("bad", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\tb", "a\x7fb",
                                 "x" * 4097, "\u00e9" * 1400])
def test_unframeable_values_are_refused_before_connecting(
        shim: Path, fake: Callable[[Behave], FakeDaemon], var: str, bad: str) -> None:
    f = fake(answer(reply(b"", 0)))
    r = run_plugin(shim, "ADD", CONF, **ENV, socket=f.path, extra_env={var: bad})
    j = cni_error(r, 4)
    assert var in j["msg"]
    time.sleep(0.05)
    assert f.accepts == 0


def test_longest_values_pass(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    f = fake(answer(reply(b"", 0)))
    long = "p" * 4096
    r = run_plugin(shim, "ADD", CONF, **ENV, socket=f.path, extra_env={"CNI_PATH": long})
    assert r.rc == 0, str(r)
    assert parse_request(f.requests[0])[1]["x-cni-path"] == long


def test_stdin_cap(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    f = fake(answer(reply(b"", 0)))
    big = b" " * (1 << 20)
    assert run_plugin(shim, "ADD", big, **ENV, socket=f.path).rc == 0
    assert len(parse_request(f.requests[0])[2]) == 1 << 20
    cni_error(run_plugin(shim, "ADD", big + b" ", **ENV, socket=f.path), 7)
    assert f.accepts == 1


# ---- what comes back ---------------------------------------------------------------------------

BAD_REPLIES = [
    b"",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-CNI-Exit: 0\r\n",                      # headers never end
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-CNI-Exit: 0\r\n\r\nshort",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-CNI-Exit: 0\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-CNI-Exit: 256\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-CNI-Exit: -1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-CNI-Exit: 0\r\nContent-Length: 99999999999\r\n\r\n",
    b"HTTP/2 200\r\nX-CNI-Exit: 0\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nX-CNI-Exit: 0\r\n\r\n",
]


@pytest.mark.parametrize("data", BAD_REPLIES)
def test_bad_replies_are_try_again(shim: Path, fake: Callable[[Behave], FakeDaemon],
                                   data: bytes) -> None:
    f = fake(answer(data))
    for cmd in ("ADD", "DEL"):
        j = cni_error(run_plugin(shim, cmd, CONF, **ENV, socket=f.path), 11)
        assert str(f.path) in j["msg"] and j["details"]
        assert j["cniVersion"] == "1.0.0"


def test_too_large_is_a_config_error(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    f = fake(answer(reply(b"request body over 65536 bytes\n", None,
                          "413 Request Entity Too Large")))
    j = cni_error(run_plugin(shim, "ADD", CONF, **ENV, socket=f.path), 7)
    assert "413" in j["details"] and "65536" in j["details"]


def test_body_to_eof_without_length(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    f = fake(answer(b"HTTP/1.1 200 OK\r\nX-CNI-Exit: 0\r\n\r\n{\"a\": 1}"))
    r = run_plugin(shim, "ADD", CONF, **ENV, socket=f.path)
    assert r.rc == 0 and r.out == '{"a": 1}'


def test_dribbled_reply(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    data = reply(b'{"ips":[]}', 0)

    def slow(conn: socket.socket, _req: bytes) -> None:
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(0.001)
    f = fake(slow)
    r = run_plugin(shim, "ADD", CONF, **ENV, socket=f.path)
    assert r.rc == 0 and r.out == '{"ips":[]}'


def test_large_reply(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    body = b"x" * (3 << 20)
    f = fake(answer(reply(body, 0)))
    r = run_plugin(shim, "ADD", CONF, **ENV, socket=f.path)
    assert r.rc == 0 and len(r.out) == len(body)


def test_reply_timeout(shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    answered = threading.Event()

    def hang(conn: socket.socket, _req: bytes) -> None:
        answered.wait(60)  # never answers while the shim waits
    f = fake(hang)
    try:
        # the shim gives up by itself: without its timeout it would hang past this deadline
        r = run_plugin(shim, "ADD", CONF, **ENV, socket=f.path,
                       extra_env={"WEAVE_IPAM_TIMEOUT": "1"}, timeout=30)
    finally:
        answered.set()
    j = cni_error(r, 11)
    assert "within 1 s" in j["details"]


def test_daemon_reads_nothing_and_closes(shim: Path, sockdir: Path) -> None:
    """The daemon goes away mid-request: an error, never a success."""
    path = sockdir / "rude.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)

    def rude() -> None:
        conn, _ = s.accept()
        conn.close()
    t = threading.Thread(target=rude, daemon=True)
    t.start()
    try:
        j = cni_error(run_plugin(shim, "DEL", b"{" + b" " * 900_000 + b"}", **ENV,
                                 socket=path), 11)
        assert j["details"]
    finally:
        t.join(5)
        s.close()


# ---- no daemon -------------------------------------------------------------------------------

def test_unreachable(shim: Path, sockdir: Path) -> None:
    missing = sockdir / "missing.sock"
    for cmd in ("ADD", "DEL", "CHECK", "GC"):
        j = cni_error(run_plugin(shim, cmd, {**CONF, "cniVersion": "0.4.0"}, **ENV,
                                 socket=missing), 11)
        assert str(missing) in j["msg"] and "No such file" in j["details"]
        assert j["cniVersion"] == "0.4.0"
    j = cni_error(run_plugin(shim, "STATUS", CONF, socket=missing), 50)
    stale = sockdir / "stale.sock"  # a socket file nobody listens on (a crashed daemon)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    j = cni_error(run_plugin(shim, "ADD", CONF, **ENV, socket=stale), 11)
    assert "refused" in j["details"]
    plain = sockdir / "file"
    plain.write_text("")
    cni_error(run_plugin(shim, "ADD", CONF, **ENV, socket=plain), 11)
    cni_error(run_plugin(shim, "ADD", CONF, **ENV, socket="/" + "x" * 200), 4)


def test_default_socket_path_is_compiled_in(shim: Path) -> None:
    if os.path.exists("/run/weave-ipam/ipam.sock"):
        pytest.skip("a daemon runs on the default socket here")
    j = cni_error(run_plugin(shim, "DEL", CONF, **ENV), 11)
    assert "/run/weave-ipam/ipam.sock" in j["msg"]
    j = cni_error(run_plugin(shim, "DEL", CONF, **ENV, socket=""), 11)
    assert "/run/weave-ipam/ipam.sock" in j["msg"]


def test_timeout_variable(shim: Path) -> None:
    for bad in ("abc", "0", "-1", "3601", "1.5"):
        cni_error(run_plugin(shim, "ADD", CONF, **ENV, socket="/nonexistent",
                             extra_env={"WEAVE_IPAM_TIMEOUT": bad}), 4)


@pytest.mark.parametrize("stdin,version", [
    *[(json.dumps({"cniVersion": v}), v) for v in VERSIONS],
    ("", "1.1.0"),
    ("not json", "1.1.0"),
    ('{"cniVersion": 5}', "1.1.0"),
    ('{"cniVersion": "1.0.0\\", \\"x\\": \\"y"}', "1.1.0"),
    ('{"cniVersion": "' + "9" * 40 + '"}', "1.1.0"),
    ('{"a": {"cniVersion": "9.9.9"}, "b": [1, "}", {"c": "]"}], "cniVersion": "0.4.0"}',
     "0.4.0"),
    ('  {\n"name":"x" ,\t"cniVersion" : "0.3.1"}', "0.3.1"),
])
def test_version_is_local(shim: Path, stdin: str, version: str) -> None:
    r = run_plugin(shim, "VERSION", stdin, socket="/nonexistent/x.sock")
    assert r.rc == 0, str(r)
    assert json.loads(r.out) == {"cniVersion": version, "supportedVersions": VERSIONS}


def test_shim_is_static(shim: Path) -> None:
    data = shim.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert b"/lib64/ld-linux" not in data and b"/lib/ld-linux" not in data  # no interpreter


# ---- a sanitizer build, fed random replies ---------------------------------------------------

@pytest.fixture(scope="module")
def asan_shim() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="wasan-"))
    out = d / "weave-ipam"
    r = subprocess.run(["cc", "-O1", "-g", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror",
                        "-o", str(out), str(SHIM_DIR / "shim.c")],
                       capture_output=True, text=True, timeout=120)
    try:
        if r.returncode != 0:
            missing(f"no C compiler with a sanitizer runtime here: {r.stderr.strip()[:200]}")
        yield out
    finally:
        shutil.rmtree(d, ignore_errors=True)


_replies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda status, hdrs, body: b"HTTP/1.1 " + status + b"\r\n" + hdrs + b"\r\n\r\n"
              + body,
              st.sampled_from([b"200 OK", b"500 x", b"413 x", b"", b"99"]),
              st.lists(st.sampled_from([b"X-CNI-Exit: 0", b"X-CNI-Exit: 300",
                                        b"X-CNI-Exit:", b"Content-Length: 3",
                                        b"Content-Length: 0", b"Content-Length: x",
                                        b"content-length:99", b"Transfer-Encoding: x",
                                        b"\r", b":", b"X-CNI-Exit: 1\n"]),
                       max_size=4).map(lambda xs: b"\r\n".join(xs)),
              st.binary(max_size=50)))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_replies)
def test_random_replies_never_crash(asan_shim: Path, data: bytes) -> None:
    d = Path(tempfile.mkdtemp(prefix="wf-"))
    f = FakeDaemon(d / "f.sock", answer(data))
    try:
        r = run_plugin(asan_shim, "ADD", CONF, **ENV, socket=f.path,
                       extra_env={"WEAVE_IPAM_TIMEOUT": "2"})
        assert "Sanitizer" not in r.err and "runtime error" not in r.err, r.err
        if r.rc != 0 and r.out.startswith("{\"cniVersion\""):
            json.loads(r.out)  # our own errors are always valid JSON
        assert r.rc < 128  # no signal
    finally:
        f.close()
        shutil.rmtree(d, ignore_errors=True)


def test_asan_build_happy_paths(asan_shim: Path, fake: Callable[[Behave], FakeDaemon]) -> None:
    f = fake(answer(reply(b'{"ok":true}', 0)))
    r = run_plugin(asan_shim, "ADD", b"{\"cniVersion\":\"0.4.0\"}" + b" " * 200000, **ENV,
                   args="K8S_POD_NAME=%\u00e9", socket=f.path)
    assert r.rc == 0 and "Sanitizer" not in r.err, str(r)
    for stdin in (b"", b"{", b'{"cniVersion":"', b'{"cniVersion"', b'{"a":[[[[', b"\"\\"):
        r = run_plugin(asan_shim, "VERSION", stdin)
        assert r.rc == 0 and "Sanitizer" not in r.err, str(r)
    r = run_plugin(asan_shim, "ADD", CONF, **ENV, extra_env={"CNI_ARGS": "x" * 5000},
                   socket=f.path)
    assert r.rc == 1 and "Sanitizer" not in r.err
    assert shim_binary().exists()
