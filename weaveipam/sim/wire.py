"""Messages cross the simulated network as msgpack bytes, exactly as on TCP."""

from __future__ import annotations

from typing import Any

import msgpack


def encode(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)  # type: ignore[no-any-return]


def size_of(msg: dict[str, Any]) -> int:
    return len(encode(msg))


def roundtrip(msg: dict[str, Any]) -> Any:
    return msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
