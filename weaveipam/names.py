"""Peer names: stable 48-bit MAC-like names, kept in the data dir.

Weave derived the name from the machine id, so cloned machines got identical names and
identical ranges (Weave #2606).  We still start from /etc/machine-id (a stable name across
reinstalls of the daemon is useful), but mix in the data dir so two daemons on one host
differ, and keep the name in the data dir so it never changes under a peer's state.
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
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


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


def machine_id() -> str | None:
    for f in MACHINE_ID_FILES:
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def derive_name(data_dir: Path) -> str:
    """A new name: from the machine id and the data dir, or random without a machine id."""
    mid = machine_id()
    if mid is None:
        return _mac_from(secrets.token_bytes(16))
    return _mac_from(f"weaveipam\0{mid}\0{data_dir.absolute()}".encode())


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
