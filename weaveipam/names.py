"""Peer names: 48-bit MAC-like names, kept in the data dir.

Weave derived the name from the machine id, so cloned machines got identical names and
identical ranges (Weave #2606), and a node that lost its data dir came back under its old
name and was handed its old ranges as if empty (#2610).  Here new state gets a new random
name, kept beside the store so it never changes under a peer's state.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from pathlib import Path

NAME_FILE = "peer-name"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_NAME = 64  # the ring's limit on peer names


def check_name(name: str) -> str | None:
    """Why `name` cannot be a peer name, or None if it can."""
    if not 0 < len(name) <= MAX_NAME:
        return f"peer name must be 1..{MAX_NAME} characters"
    if not name.isprintable() or any(c.isspace() or c in ",/" for c in name):
        return "peer name must be printable, without spaces, commas or slashes"
    return None


def format_mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b[:6])


def _mac_from(seed: bytes) -> str:
    b = bytearray(hashlib.sha256(seed).digest()[:6])
    b[0] = (b[0] | 0x02) & 0xFE  # locally administered, unicast: like Weave's names
    return format_mac(bytes(b))


def new_name() -> str:
    """A new random name, for new state only: a name derived again from the machine would
    come back after the data dir is lost and be handed the lost state's ranges."""
    return _mac_from(secrets.token_bytes(16))


def read_name(data_dir: Path) -> str | None:
    try:
        text = (data_dir / NAME_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_name(data_dir: Path, name: str) -> None:
    """Keep the name beside the store (atomically: a torn file would rename the peer)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = data_dir / f".{NAME_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, data_dir / NAME_FILE)


def default_nickname() -> str:
    return socket.gethostname()[:MAX_NAME] or "localhost"


def new_uid() -> int:
    """A fresh uid per start: a restarted peer is a new Paxos acceptor (as in Weave)."""
    return secrets.randbits(63) + 1
