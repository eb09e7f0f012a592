"""Messages cross the simulated network as msgpack bytes, exactly as on TCP."""

from __future__ import annotations

from typing import Any

import msgpack


def transit(msg: dict[str, Any]) -> tuple[int, Any]:
    """Encode once: the bytes on the wire (counted) and what the receiver decodes."""
    data: bytes = msgpack.packb(msg, use_bin_type=True)
    return len(data), msgpack.unpackb(data, raw=False, strict_map_key=False)
