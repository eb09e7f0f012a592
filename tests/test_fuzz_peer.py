"""Fuzz one live daemon's peer port: random bytes, mutated hello and post-handshake frames,
oversized lengths, half-open and trickling connections, and a burst of sockets.

After every case the daemon must still answer its local API; after every batch, inside
the same test, it must also allocate and release, stay under an RSS bound and have logged
why it closed the bad connections.  API timeouts are deadlines that catch a hang, not
speeds.  The cases tried are counted and printed at the end (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemons import Node, single_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

RSS_LIMIT_KB = 200 * 1024
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
CASES: Counter[str] = Counter()
_names = itertools.count(1)


# ---- the daemon ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with single_node("wi-fp-") as n:
        yield n
        total = sum(CASES.values())
        print(f"\nfuzz peer cases: {dict(CASES)} total={total}")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


API_DEADLINE = 10.0  # seconds: catches a daemon that stopped answering, not a slow one


def assert_answers(n: Node) -> None:
    """After one case: alive, and its API answers (a lookup of nothing is our 404)."""
    assert n.running(), "daemon died:\n" + n.log_tail()
    code, body = n.api("GET", "/ip/fuzz-nobody", timeout=API_DEADLINE, unix=True, json_=True)
    assert code == 404, (code, body)


def assert_healthy(n: Node) -> None:
    """After a batch: it still allocates and releases, within its memory bound."""
    assert n.running(), "daemon died:\n" + n.log_tail()
    ident = f"fuzz-health-{next(_names)}"
    code, body = n.api("POST", f"/ip/{ident}", timeout=API_DEADLINE, unix=True)
    assert code == 200, (code, body)
    code, body = n.api("DELETE", f"/ip/{ident}", timeout=API_DEADLINE, unix=True)
    assert code == 204, (code, body)
    assert n.pid is not None
    rss = rss_kb(n.pid)
    assert rss < RSS_LIMIT_KB, f"RSS {rss} kB"


def log_text(n: Node) -> str:
    return n.log.read_text(errors="replace")


# ---- frames ----------------------------------------------------------------------------------


def frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def fake_name() -> str:
    i = next(_names)
    return f"02:fe:{(os.getpid() >> 8) & 0xff:02x}:{os.getpid() & 0xff:02x}:" \
           f"{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


def hello(name: str | None = None, nonce: int | None = None) -> dict[str, Any]:
    return {"t": "hello", "v": 1, "name": name or fake_name(), "nick": "fuzzer", "uid": 12345,
            "port": 0, "session": 7, "nonce": next(_names) if nonce is None else nonce}


def connect(n: Node, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", n.peer_port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, k: int) -> bytes:
    data = b""
    while len(data) < k:
        chunk = s.recv(k - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)}/{k} bytes")
        data += chunk
    return data


def read_frame(s: socket.socket) -> Any:
    length = int.from_bytes(recv_exact(s, 4), "big")
    return msgpack.unpackb(recv_exact(s, length), raw=False)


def drain_until_closed(s: socket.socket, timeout: float = 3.0) -> bool:
    """Read until the daemon closes; True if it did within ``timeout``."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except OSError:  # includes TimeoutError
        return False
    return False


def send_and_finish(n: Node, data: bytes) -> None:
    """Fresh connection: send ``data``, half-close, wait for the daemon to close."""
    with contextlib.closing(connect(n)) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        drain_until_closed(s)


def handshaken(n: Node) -> tuple[socket.socket, str, str]:
    """A connection after a real hello exchange as a fake peer: (socket, ours, theirs)."""
    s = connect(n)
    ours = hello()
    s.sendall(frame(ours))
    theirs = read_frame(s)
    assert isinstance(theirs, dict) and theirs.get("t") == "hello", theirs
    return s, ours["name"], theirs["name"]


# ---- mutation --------------------------------------------------------------------------------

msgpack_scalar = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
                  | st.floats(allow_nan=False) | st.text(max_size=40) | st.binary(max_size=40))
msgpack_value = st.recursive(
    msgpack_scalar,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """Flip, insert, delete bytes or rewrite the length prefix of a valid frame."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "length", "truncate", "append"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and len(data) > 1:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 4))]
        elif op == "length" and len(data) >= 4:
            length = draw(st.integers(0, (1 << 32) - 1)
                          | st.integers(max(0, len(data) - 8), len(data) + 8))
            data[:4] = length.to_bytes(4, "big")
        elif op == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


HELLO_FIELDS = ["t", "v", "name", "nick", "uid", "port", "session", "nonce", "enc"]


@st.composite
def bad_hello(draw: st.DrawFn) -> bytes:
    """A hello with a field given a wrong type / value, or missing, or extra."""
    # fixed values: the strategy must draw the same way every time it replays
    h: dict[Any, Any] = hello(name="02:fe:00:00:ff:ff", nonce=1)
    kind = draw(st.sampled_from(["wrong", "missing", "extra", "mutate"]))
    if kind == "wrong":
        h[draw(st.sampled_from(HELLO_FIELDS))] = draw(msgpack_value)
    elif kind == "missing":
        del h[draw(st.sampled_from(HELLO_FIELDS[:-1]))]
    elif kind == "extra":
        h[draw(st.text(min_size=1, max_size=10))] = draw(msgpack_value)
    else:
        return draw(mutated(frame(h)))
    return frame(h)


def valid_messages(src: str, dst: str) -> list[dict[str, Any]]:
    payloads: list[dict[str, Any]] = [
        {"t": "digest", "d": 1}, {"t": "paxos", "c": {}}, {"t": "ring", "full": True,
                                                           "ring": {}},
        {"t": "space?", "w": [5, 3]}]
    msgs: list[dict[str, Any]] = [{"t": "hb"}, {"t": "topo", "peers": []}]
    msgs += [{"t": "msg", "src": src, "dst": dst, "ttl": 8,
              "body": msgpack.packb(p, use_bin_type=True)} for p in payloads]
    return msgs


def post_handshake_frame(data: st.DataObject, src: str, dst: str) -> bytes:
    """One frame sent after the handshake: a mutated valid one, a msg with a random
    payload, a valid one with a field of the wrong type, or raw bytes."""
    valid = valid_messages(src, dst)
    kind = data.draw(st.sampled_from(["mutated", "payload", "wrong", "raw"]))
    i = data.draw(st.integers(0, len(valid) - 1))
    if kind == "mutated":
        return data.draw(mutated(frame(valid[i])))
    if kind == "payload":
        t = data.draw(st.sampled_from(["ring", "paxos", "digest", "space?", "x"]))
        value = data.draw(msgpack_value)
        body = dict(value) if isinstance(value, dict) else {"x": value}
        body.setdefault("t", t)
        return frame({"t": "msg", "src": src, "dst": dst, "ttl": 8,
                      "body": msgpack.packb(body, use_bin_type=True)})
    if kind == "wrong":
        m = dict(valid[i])
        m[data.draw(st.sampled_from(["t", "src", "dst", "ttl", "body", "peers", "zz"]))] = \
            data.draw(msgpack_value)
        return frame(m)
    return data.draw(st.binary(max_size=64))


# ---- tests -----------------------------------------------------------------------------------


def test_random_bytes(node: Node) -> None:
    @FUZZ
    @given(data=st.binary(max_size=512))
    def case(data: bytes) -> None:
        CASES["random-bytes"] += 1
        send_and_finish(node, data)
        assert_answers(node)

    case()
    assert_healthy(node)
    assert "closing connection" in log_text(node)


def test_bad_hello(node: Node) -> None:
    @FUZZ
    @given(data=bad_hello())
    def case(data: bytes) -> None:
        CASES["bad-hello"] += 1
        send_and_finish(node, data)
        assert_answers(node)

    case()
    assert_healthy(node)
    log = log_text(node)
    assert "protocol error" in log
    assert "incompatible protocol version" in log or "hello" in log


def test_after_handshake(node: Node) -> None:
    @FUZZ
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        CASES["after-handshake"] += 1
        s, ours, theirs = handshaken(node)
        with contextlib.closing(s):
            with contextlib.suppress(OSError):
                for _ in range(data.draw(st.integers(1, 3))):
                    s.sendall(post_handshake_frame(data, ours, theirs))
                s.shutdown(socket.SHUT_WR)
            drain_until_closed(s)
        assert_answers(node)

    case()
    assert_healthy(node)
    log = log_text(node)
    assert "established" in log
    assert "bad message from" in log  # payloads reached the engine, which refused them
    assert "Traceback" not in log


@pytest.mark.parametrize("length", [0, 1 << 24, (8 << 20) + 1, 1 << 31, (1 << 32) - 1])
@pytest.mark.parametrize("after_hello", [False, True])
def test_oversized_length(node: Node, length: int, after_hello: bool) -> None:
    CASES["oversized"] += 1
    if after_hello:
        s, _, _ = handshaken(node)
    else:
        s = connect(node)
    with contextlib.closing(s):
        s.sendall(length.to_bytes(4, "big") + b"\x80" * 16)
        assert drain_until_closed(s, 20.0), "daemon kept a connection with an oversized frame"
    assert_healthy(node)
    log = log_text(node)
    assert ("exceeds max_frame" in log) or ("zero-length" in log)


def test_half_open_and_slowloris(node: Node) -> None:
    # connect and send nothing; connect and send half a frame; hold them a while
    held: list[socket.socket] = []
    try:
        for i in range(6):
            s = connect(node)
            if i % 2:
                f = frame(hello())
                s.sendall(f[: len(f) // 2])
            held.append(s)
            CASES["half-open"] += 1
        assert_healthy(node)
        # slowloris: a hello trickled 1 byte per 0.2 s; the handshake timeout (5 s) ends it
        s = connect(node)
        held.append(s)
        CASES["slowloris"] += 1
        f = frame(hello())
        t0 = time.monotonic()
        closed = False
        for b in itertools.cycle(f[:4] + b"\x87" + b"\xa1" * 200):
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            s.settimeout(0.2)
            try:
                if s.recv(65536) == b"" or _peer_closed(s):
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
            if time.monotonic() - t0 > 30:  # a deadline for a hang (timeout: 5 s)
                break
        assert closed, "a trickling peer was not dropped within 30 s"
        assert_healthy(node)
        # the held half-open connections are dropped by the handshake timeout too
        for h in held[:-1]:
            assert drain_until_closed(h, 20.0), "a half-open connection was kept"
        assert "handshake timed out" in log_text(node)
    finally:
        for h in held:
            h.close()
    assert_healthy(node)


def _peer_closed(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    finally:
        s.setblocking(True)


def test_connection_burst(node: Node) -> None:
    def opener(_: int) -> socket.socket | None:
        try:
            return socket.create_connection(("127.0.0.1", node.peer_port), timeout=5)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=50) as pool:
        socks = list(pool.map(opener, range(500)))
    CASES["burst"] += len(socks)
    opened = [s for s in socks if s is not None]
    assert len(opened) >= 400, f"only {len(opened)} of 500 connected"
    assert_healthy(node)
    for s in opened:
        s.close()
    # the daemon settles: the next healthy check and a fresh real handshake work
    time.sleep(0.5)
    assert_healthy(node)
    s, _, _ = handshaken(node)
    s.close()
    assert_healthy(node)
    log = log_text(node)
    assert "too many connections from" in log
    assert "Traceback" not in log
