"""Wire format: length-prefixed msgpack frames, each strictly schema-checked.

Every frame is ``4-byte big-endian length`` + ``msgpack map``.  The map always has a
``"t"`` (type) key and exactly the keys its type defines; anything else is a protocol
error that closes the connection.  Decoding yields typed, frozen dataclasses so the rest
of the mesh (and, above all, the engine's ``on_message`` callback) never sees unchecked
data.

Engine payloads travel as an opaque ``bin`` inside ``msg`` frames: relays forward the
bytes without decoding them, and only the final recipient unpacks and checks them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack

PROTOCOL_VERSION = 1
HEADER_LEN = 4
MAX_NAME_LEN = 255
MAX_REASON_LEN = 1024
MAX_TTL = 255
DEFAULT_TTL = 64
MAX_TOPO_ENTRIES = 65536
MAX_NEIGHBOURS = 65536
MAX_PAYLOAD_DEPTH = 32
# Entry versions start at the wall clock in microseconds (~2**51); the cap leaves room to
# bump past any accepted version without ever producing one a peer would refuse.
MAX_VERSION = 1 << 62
DEFAULT_MAX_OBJECTS = 1 << 17  # msgpack objects (keys, values, containers) per frame/payload
_U64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)


class MeshError(Exception):
    """Misuse of the mesh API, or a configuration the mesh refuses."""


class FrameError(MeshError):
    """A frame that is malformed, oversized or violates the schema."""


class VersionError(FrameError):
    """The peer speaks a protocol version we do not."""


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Hello:
    """First frame each way.  ``session`` is random per mesh start, ``nonce`` per
    connection: together they let both ends break duplicate-connection ties the same way.
    """

    version: int
    name: str
    nickname: str
    uid: int
    port: int
    session: int
    nonce: int
    encrypt: bool = False  # sent as "enc": true only by a peer with a --password


@dataclass(frozen=True)
class KeyExchange:
    """Encrypting peers only, right after the hello: an ephemeral X25519 public key."""

    pub: bytes


@dataclass(frozen=True)
class Auth:
    """Encrypting peers only: MAC proving knowledge of the shared secret."""

    mac: bytes


@dataclass(frozen=True)
class Heartbeat:
    """Keeps an idle connection from hitting the peer's dead timeout."""


@dataclass(frozen=True)
class ErrorFrame:
    """Last frame before we close: tells the other side why (e.g. refused handshake)."""

    reason: str


@dataclass(frozen=True)
class Neighbour:
    """One direct connection of a peer, with the listen address seen from that peer."""

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class PeerEntry:
    """A peer's own view of its direct connections; higher ``version`` wins on merge."""

    name: str
    nickname: str
    uid: int
    version: int
    neighbours: tuple[Neighbour, ...]


@dataclass(frozen=True)
class TopologyFrame:
    entries: tuple[PeerEntry, ...]


@dataclass(frozen=True)
class Message:
    """Unicast engine payload; ``body`` is the packed payload, opaque to relays."""

    src: str
    dst: str
    ttl: int
    body: bytes


Frame = Hello | Heartbeat | ErrorFrame | TopologyFrame | Message | KeyExchange | Auth


# --------------------------------------------------------------------------- checks

Check = Callable[[Any, str], Any]


def _short(obj: Any) -> str:
    """A peer-controlled value, cut down for logs and error frames."""
    text = repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(where: str, what: str) -> FrameError:
    return FrameError(f"{where}: {what}")


def _is_name(obj: Any) -> TypeGuard[str]:
    return isinstance(obj, str) and 0 < len(obj) <= MAX_NAME_LEN and obj.isprintable()


def _name(obj: Any, where: str) -> str:
    if not _is_name(obj):
        raise _fail(where, "expected a printable string of 1..255 characters")
    return obj


def _text(obj: Any, where: str) -> str:
    if not isinstance(obj, str) or len(obj) > MAX_NAME_LEN or not obj.isprintable():
        raise _fail(where, "expected a printable string of at most 255 characters")
    return obj


def _reason(obj: Any, where: str) -> str:
    if not isinstance(obj, str) or len(obj) > MAX_REASON_LEN:
        raise _fail(where, "expected a string of at most 1024 characters")
    return obj


def _int_range(lo: int, hi: int) -> Check:
    def check(obj: Any, where: str) -> int:
        # bool is an int subclass; msgpack keeps them distinct, and so do we.
        if type(obj) is not int or not lo <= obj <= hi:
            raise _fail(where, f"expected an integer in {lo}..{hi}")
        return obj

    return check


_u64 = _int_range(0, _U64)
_port = _int_range(0, 65535)
_ttl = _int_range(1, MAX_TTL)
_version = _int_range(0, MAX_VERSION)


def _bin(obj: Any, where: str) -> bytes:
    if not isinstance(obj, bytes):
        raise _fail(where, "expected bytes")
    return obj


def _list(obj: Any, where: str, max_len: int) -> list[Any]:
    if not isinstance(obj, list) or len(obj) > max_len:
        raise _fail(where, f"expected a list of at most {max_len} items")
    return obj


def _record(obj: Any, where: str, keys: Mapping[str, Check]) -> dict[str, Any]:
    """Check a map has exactly ``keys`` and each value passes its check."""
    if not isinstance(obj, dict):
        raise _fail(where, "expected a map")
    if obj.keys() != keys.keys():
        missing = sorted(set(keys) - set(obj))
        extra = sorted(_short(k) for k in set(obj) - set(keys))[:5]
        raise _fail(where, f"wrong keys (missing {missing}, unexpected {extra})")
    return {k: check(obj[k], f"{where}.{k}") for k, check in keys.items()}


def _neighbour(obj: Any, where: str) -> Neighbour:
    if not isinstance(obj, list) or len(obj) != 3:
        raise _fail(where, "expected [name, host, port]")
    return Neighbour(_name(obj[0], where + "[0]"), _name(obj[1], where + "[1]"),
                     _port(obj[2], where + "[2]"))


def _entry(obj: Any, where: str) -> PeerEntry:
    rec = _record(obj, where, {
        "name": _name, "nick": _text, "uid": _u64, "ver": _version,
        "nbrs": lambda o, w: _list(o, w, MAX_NEIGHBOURS),
    })
    return PeerEntry(rec["name"], rec["nick"], rec["uid"], rec["ver"],
                     _neighbours(rec["nbrs"], where))


def _neighbours(objs: list[Any], where: str) -> tuple[Neighbour, ...]:
    # topology frames are most of what a starting mesh parses: check each [name, host,
    # port] inline and build the error's location text only if one is bad
    out = []
    for o in objs:
        if not (type(o) is list and len(o) == 3 and _is_name(o[0]) and _is_name(o[1])
                and type(o[2]) is int and 0 <= o[2] <= 65535):
            return tuple(_neighbour(n, f"{where}.nbrs[{i}]") for i, n in enumerate(objs))
        out.append(Neighbour(o[0], o[1], o[2]))
    return tuple(out)


_HELLO_KEYS: dict[str, Check] = {
    "t": lambda o, w: o, "v": lambda o, w: o, "name": _name, "nick": _text, "uid": _u64,
    "port": _port, "session": _u64, "nonce": _u64,
}
_HELLO_ENC_KEYS: dict[str, Check] = {**_HELLO_KEYS, "enc": lambda o, w: _true(o, w)}
KEY_BYTES = 32


def _true(obj: Any, where: str) -> bool:
    if obj is not True:
        raise _fail(where, "expected true")
    return True


def _key_bytes(obj: Any, where: str) -> bytes:
    if not isinstance(obj, bytes) or len(obj) != KEY_BYTES:
        raise _fail(where, f"expected {KEY_BYTES} bytes")
    return obj


def _parse(obj: Any) -> Frame:
    if not isinstance(obj, dict):
        raise FrameError("frame: expected a map")
    kind = obj.get("t")
    if kind == "hb":
        _record(obj, "hb", {"t": lambda o, w: o})
        return Heartbeat()
    if kind == "msg":
        rec = _record(obj, "msg", {"t": lambda o, w: o, "src": _name, "dst": _name,
                                   "ttl": _ttl, "body": _bin})
        return Message(rec["src"], rec["dst"], rec["ttl"], rec["body"])
    if kind == "topo":
        rec = _record(obj, "topo", {
            "t": lambda o, w: o, "peers": lambda o, w: _list(o, w, MAX_TOPO_ENTRIES)})
        return TopologyFrame(tuple(_entry(e, f"topo.peers[{i}]")
                                   for i, e in enumerate(rec["peers"])))
    if kind == "hello":
        # Check the version before the shape: a future version may add keys, and the
        # operator needs "incompatible version", not "unexpected key".
        version = obj.get("v")
        if type(version) is not int:
            raise FrameError("hello.v: expected an integer protocol version")
        if version != PROTOCOL_VERSION:
            raise VersionError(f"incompatible protocol version {version} "
                               f"(we speak {PROTOCOL_VERSION})")
        rec = _record(obj, "hello", _HELLO_ENC_KEYS if "enc" in obj else _HELLO_KEYS)
        return Hello(version, rec["name"], rec["nick"], rec["uid"], rec["port"],
                     rec["session"], rec["nonce"], "enc" in rec)
    if kind == "kx":
        rec = _record(obj, "kx", {"t": lambda o, w: o, "pub": _key_bytes})
        return KeyExchange(rec["pub"])
    if kind == "auth":
        rec = _record(obj, "auth", {"t": lambda o, w: o, "mac": _key_bytes})
        return Auth(rec["mac"])
    if kind == "err":
        rec = _record(obj, "err", {"t": lambda o, w: o, "reason": _reason})
        return ErrorFrame(rec["reason"])
    raise FrameError(f"frame: unknown type {_short(kind)}")


# --------------------------------------------------------------------------- scanning
#
# msgpack.unpackb is C, but building millions of tiny containers still takes seconds
# (an 8 MiB frame of empty arrays is ~7M objects) and never yields to the event loop.
# So before unpacking we walk the encoding in pure Python, a slice at a time, counting
# objects without building any; a frame with more than ``max_objects`` is refused, which
# bounds the synchronous unpack and schema check that follow.

_SKIP, _ARRAY, _MAP, _RAW, _FIXARRAY, _FIXMAP, _BAD = range(7)


def _scan_table() -> tuple[tuple[int, int], ...]:
    table: list[tuple[int, int]] = [(_BAD, 0)] * 256
    for b in range(256):
        if b <= 0x7F or b >= 0xE0:
            table[b] = (_SKIP, 0)  # fixint
        elif b <= 0x8F:
            table[b] = (_FIXMAP, b & 0x0F)
        elif b <= 0x9F:
            table[b] = (_FIXARRAY, b & 0x0F)
        elif b <= 0xBF:
            table[b] = (_SKIP, b & 0x1F)  # fixstr
    sized = {
        0xC0: (_SKIP, 0), 0xC2: (_SKIP, 0), 0xC3: (_SKIP, 0),  # nil, false, true
        0xC4: (_RAW, 1), 0xC5: (_RAW, 2), 0xC6: (_RAW, 4),  # bin
        0xCA: (_SKIP, 4), 0xCB: (_SKIP, 8),  # float
        0xCC: (_SKIP, 1), 0xCD: (_SKIP, 2), 0xCE: (_SKIP, 4), 0xCF: (_SKIP, 8),  # uint
        0xD0: (_SKIP, 1), 0xD1: (_SKIP, 2), 0xD2: (_SKIP, 4), 0xD3: (_SKIP, 8),  # int
        0xD9: (_RAW, 1), 0xDA: (_RAW, 2), 0xDB: (_RAW, 4),  # str
        0xDC: (_ARRAY, 2), 0xDD: (_ARRAY, 4), 0xDE: (_MAP, 2), 0xDF: (_MAP, 4),
    }  # everything else (0xC1, ext types) is refused
    for b, kind in sized.items():
        table[b] = kind
    return tuple(table)


_SCAN = _scan_table()
_SCAN_SLICE = 16384  # objects per slice between yields to the event loop


class _Scan:
    """Resumable count of the msgpack objects in one buffer."""

    def __init__(self, data: bytes, max_objects: int) -> None:
        self.data = data
        self.max_objects = max_objects
        self.pos = 0
        self.pending = 1  # objects still to visit
        self.count = 0

    def step(self, budget: int) -> bool:
        """Visit up to ``budget`` objects; True when the whole buffer checked out."""
        data, pos, pending, count = self.data, self.pos, self.pending, self.count
        n, stop, table = len(data), min(self.count + budget, self.max_objects), _SCAN
        while pending:
            if count >= stop:
                if count >= self.max_objects:
                    raise FrameError(f"more than {self.max_objects} msgpack objects")
                self.pos, self.pending, self.count = pos, pending, count
                return False
            if pos >= n:
                raise FrameError("truncated msgpack")
            kind, arg = table[data[pos]]
            pos += 1
            pending -= 1
            count += 1
            if kind == _SKIP:
                pos += arg
                continue
            if kind == _FIXARRAY:
                pending += arg
            elif kind == _FIXMAP:
                pending += 2 * arg
            elif kind == _BAD:
                raise FrameError(f"unsupported msgpack type byte 0x{data[pos - 1]:02x}")
            else:
                length = int.from_bytes(data[pos:pos + arg], "big")
                pos += arg
                if kind == _RAW:
                    pos += length
                else:
                    pending += length if kind == _ARRAY else 2 * length
            if pending > n - pos:  # every object needs at least one byte
                raise FrameError("truncated msgpack")
        if pos != n:
            raise FrameError(f"{n - pos} bytes of trailing data")
        return True


def scan(data: bytes, max_objects: int) -> None:
    """Check ``data`` is one msgpack object of at most ``max_objects`` objects (sync)."""
    _Scan(data, max_objects).step(max_objects)


async def scan_async(data: bytes, max_objects: int) -> None:
    """Like ``scan`` but yields to the event loop between slices."""
    state = _Scan(data, max_objects)
    while not state.step(_SCAN_SLICE):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- codec


def _pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate map key")
    return out


def _unpack(data: bytes) -> Any:
    """msgpack with limits: str keys only, no ext types, no duplicate keys."""
    n = len(data)
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, timestamp=0,
            object_pairs_hook=_pairs_hook, max_str_len=n, max_bin_len=n,
            max_array_len=n, max_map_len=n, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, FormatError, ...)
        raise FrameError(f"undecodable msgpack: {type(exc).__name__}: {exc}") from None


def decode_body(data: bytes, max_objects: int = DEFAULT_MAX_OBJECTS) -> Frame:
    """Decode and schema-check one frame body (without its length prefix)."""
    scan(data, max_objects)
    return _parse(_unpack(data))


def _wire(frame: Frame) -> dict[str, Any]:
    if isinstance(frame, Heartbeat):
        return {"t": "hb"}
    if isinstance(frame, Message):
        return {"t": "msg", "src": frame.src, "dst": frame.dst, "ttl": frame.ttl,
                "body": frame.body}
    if isinstance(frame, TopologyFrame):
        return {"t": "topo", "peers": [
            {"name": e.name, "nick": e.nickname, "uid": e.uid, "ver": e.version,
             "nbrs": [[n.name, n.host, n.port] for n in e.neighbours]}
            for e in frame.entries]}
    if isinstance(frame, Hello):
        hello: dict[str, Any] = {
            "t": "hello", "v": frame.version, "name": frame.name, "nick": frame.nickname,
            "uid": frame.uid, "port": frame.port, "session": frame.session,
            "nonce": frame.nonce}
        if frame.encrypt:
            hello["enc"] = True
        return hello
    if isinstance(frame, KeyExchange):
        return {"t": "kx", "pub": frame.pub}
    if isinstance(frame, Auth):
        return {"t": "auth", "mac": frame.mac}
    return {"t": "err", "reason": frame.reason[:MAX_REASON_LEN]}


def encode(frame: Frame) -> bytes:
    """Frame bytes ready to write: length prefix + msgpack body."""
    body: bytes = msgpack.packb(_wire(frame), use_bin_type=True)
    return len(body).to_bytes(HEADER_LEN, "big") + body


HEARTBEAT_BYTES = encode(Heartbeat())


async def read_frame(reader: asyncio.StreamReader, max_frame: int,
                     idle_timeout: float | None, max_objects: int = DEFAULT_MAX_OBJECTS,
                     unseal: Callable[[bytes], bytes] | None = None, overhead: int = 0,
                     received: Callable[[], None] | None = None) -> Frame:
    """Read one frame.  The length is checked against ``max_frame`` (+ ``overhead``, the
    sealing overhead on an encrypted connection) before any body byte is read, and every
    chunk must arrive within ``idle_timeout`` (so a trickling peer cannot hold a read
    open forever).  ``unseal`` (encrypted connections) turns the read bytes into the
    plaintext body, raising FrameError for a forged, tampered or replayed frame.
    ``idle_timeout`` None waits for ever (an established connection, whose silence the
    mesh judges); ``received`` is then called whenever bytes arrive, a chunk included.

    Raises FrameError for protocol violations, TimeoutError when the peer goes quiet,
    asyncio.IncompleteReadError on EOF at a frame boundary.
    """
    if idle_timeout is None:
        header = await reader.readexactly(HEADER_LEN)
    else:
        async with asyncio.timeout(idle_timeout):
            header = await reader.readexactly(HEADER_LEN)
    if received is not None:
        received()
    length = int.from_bytes(header, "big")
    if length == 0:
        raise FrameError("zero-length frame")
    if length > max_frame + overhead:
        raise FrameError(f"frame length {length} exceeds max_frame {max_frame}"
                         + (f" + {overhead}" if overhead else ""))
    body = bytearray()
    while len(body) < length:
        async with asyncio.timeout(idle_timeout):
            chunk = await reader.read(min(length - len(body), 1 << 16))
        if not chunk:
            raise FrameError(f"connection closed mid-frame ({len(body)}/{length} bytes)")
        body += chunk
        if received is not None:
            received()
    data = bytes(body)
    if unseal is not None:
        data = unseal(data)
        if not data:
            raise FrameError("zero-length frame")
    await scan_async(data, max_objects)
    return _parse(_unpack(data))


# --------------------------------------------------------------------------- payloads


_SCALARS = frozenset({type(None), bool, float, str, bytes})


def _scalar_ok(obj: Any) -> bool:
    """True for an acceptable scalar, False for a container; raises for anything else."""
    kind = type(obj)
    if kind in _SCALARS:
        return True
    if kind is int or (isinstance(obj, int) and not isinstance(obj, bool)):
        if not _I64_MIN <= obj <= _U64:
            raise FrameError("payload: integer out of msgpack range")
        return True
    if kind is list or kind is dict or isinstance(obj, list | tuple | dict):
        return False
    if isinstance(obj, bool | float | str | bytes):  # subclasses (e.g. enums) pack fine
        return True
    raise FrameError(f"payload: unsupported type {kind.__name__}")


def _check_value(obj: Any, depth: int) -> None:
    # Hot path (every object of every payload): exact-type set lookups, no per-item
    # path strings, no call per scalar.
    if _scalar_ok(obj):
        return
    if depth >= MAX_PAYLOAD_DEPTH:
        raise FrameError(f"payload: nested deeper than {MAX_PAYLOAD_DEPTH}")
    scalars, lo, hi = _SCALARS, _I64_MIN, _U64
    if isinstance(obj, dict):
        for key, value in obj.items():
            if type(key) is not str and not isinstance(key, str):
                raise FrameError(f"payload: map key {_short(key)} is not a string")
            kind = type(value)
            if kind not in scalars and not (kind is int and lo <= value <= hi):
                _check_value(value, depth + 1)
    else:
        for item in obj:
            kind = type(item)
            if kind not in scalars and not (kind is int and lo <= item <= hi):
                _check_value(item, depth + 1)


def check_payload(payload: Any) -> dict[str, Any]:
    """An engine payload: a str-keyed map of nil/bool/int/float/str/bytes/list/map."""
    if not isinstance(payload, dict):
        raise FrameError("payload: expected a map")
    _check_value(payload, 0)
    return payload


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Check and pack an outgoing payload (raises MeshError on anything unsendable)."""
    try:
        check_payload(payload)
    except FrameError as exc:
        raise MeshError(f"unsendable payload: {exc}") from None
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return packed


def decode_payload(data: bytes, max_objects: int = DEFAULT_MAX_OBJECTS) -> dict[str, Any]:
    """Unpack and check an incoming payload (raises FrameError)."""
    scan(data, max_objects)
    return check_payload(_unpack(data))


async def decode_payload_async(data: bytes, max_objects: int = DEFAULT_MAX_OBJECTS
                               ) -> dict[str, Any]:
    """``decode_payload`` that yields to the event loop while scanning."""
    await scan_async(data, max_objects)
    return check_payload(_unpack(data))
