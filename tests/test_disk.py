"""Disks in trouble under a real daemon (issue 9, item 6): each cause is named for what it
is at start-up and while running, discarding the state is advised only for a file that
is not a usable store, there is never a traceback, /healthz fails once the store has
failed, and after the fix every acknowledged allocation is back."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import disks
from daemons import Node, temp_cluster, wait_for


@contextlib.contextmanager
def node_on(fs: Path | None) -> Iterator[Node]:
    """One consensus=1 daemon whose data dir is on ``fs`` (or the test's temp dir)."""
    with temp_cluster("wi-ops-") as c:
        (n,) = c.add(1, init="consensus=1", start=False)
        if fs is not None:
            n.data_dir = fs / "data"
        n.start()
        wait_for(lambda: n.status("/readyz")[0] == 200, what="ready")
        yield n


def this_start(n: Node) -> str:
    text = n.log.read_text(errors="replace")
    return text[text.rindex("--- start"):]


def refused(n: Node) -> str:
    """Start the daemon, which must refuse to start; what it said."""
    n.start(wait=False)
    assert n.proc is not None
    assert n.proc.wait(30) == 1, this_start(n)
    out = this_start(n)
    assert "Traceback" not in out, out
    return out


def restarted_intact(n: Node, acked: dict[str, str]) -> None:
    n.start()
    assert n.status("/healthz") == (200, "ok\n")
    assert {k: n.lookup(k) for k in acked} == {k: [v] for k, v in acked.items()}


def test_full_disk_at_startup_is_named_and_the_store_kept() -> None:
    with disks.tmpfs("2m") as fs, node_on(fs) as n:
        acked = {f"a{i}": n.allocate(f"a{i}") for i in range(3)}
        assert n.stop() == 0
        disks.fill(fs)
        out = refused(n)
        assert "is full (no space left on device)" in out and "free some space" in out
        assert "reset" not in out.replace("do not reset", ""), out
        disks.free_up(fs)
        restarted_intact(n, acked)
        acked |= {f"b{i}": n.allocate(f"b{i}") for i in range(3)}
        n.kill()  # SIGKILL: the WAL is left behind, start-up gets further
        disks.fill(fs)
        out = refused(n)
        assert "is full (no space left on device)" in out
        assert "reset" not in out.replace("do not reset", ""), out
        disks.free_up(fs)
        restarted_intact(n, acked)


def test_full_disk_while_running_fails_health_and_shows_nothing_unacknowledged() -> None:
    with disks.tmpfs("2m") as fs, node_on(fs) as n:
        acked = {f"a{i}": n.allocate(f"a{i}") for i in range(3)}
        disks.fill(fs)
        failed = None
        for i in range(500):
            code, text = n.api("POST", f"/ip/late{i}")
            if code != 200:
                failed = f"late{i}"
                break
            acked[f"late{i}"] = text.split("/")[0]
        assert failed is not None, "the disk never filled up"
        assert code == 503 and "is full" in text, (code, text)
        code, listing = n.api("GET", "/ip", json_=True)
        assert code == 503 and failed not in listing, (code, listing)
        code, why = n.status("/healthz")
        assert code == 503 and "is full" in why and "restart" in why, (code, why)
        assert "Traceback" not in this_start(n)
        disks.free_up(fs)
        n.signal(signal.SIGTERM)
        assert n.proc is not None and n.proc.wait(20) == 0
        restarted_intact(n, acked)
        assert n.lookup(failed) == []


def test_read_only_filesystem_at_startup_is_named() -> None:
    with disks.tmpfs("2m") as fs, node_on(fs) as n:
        acked = {f"a{i}": n.allocate(f"a{i}") for i in range(3)}
        assert n.stop() == 0
        disks.remount(fs, "ro")
        try:
            out = refused(n)
        finally:
            disks.remount(fs, "rw")
        assert "is mounted read-only" in out and "remount it read-write" in out, out
        assert "reset" not in out.replace("do not reset", ""), out
        restarted_intact(n, acked)


def test_immutable_data_dir_or_store_is_named() -> None:
    with disks.ext4() as fs, node_on(fs) as n:
        acked = {f"a{i}": n.allocate(f"a{i}") for i in range(3)}
        wal = n.data_dir / "ipam.db-wal"
        disks.chattr("+i", wal)  # while running: the next commit cannot be written
        try:
            code, text = n.api("POST", "/ip/late")
            health = n.status("/healthz")
        finally:
            disks.chattr("-i", wal)
        assert code == 503 and "not permitted" in text and f"lsattr -d {wal}" in text, text
        assert health[0] == 503 and "not permitted" in health[1], health
        assert n.stop() == 0
        for victim in (n.data_dir, n.data_dir / "ipam.db"):
            disks.chattr("+i", victim)
            try:
                out = refused(n)
            finally:
                disks.chattr("-i", victim)
            assert "not permitted" in out and f"lsattr -d {victim}" in out, out
            assert "reset" not in out.replace("do not reset", ""), out
        restarted_intact(n, acked)


def test_empty_or_garbage_store_is_never_replaced() -> None:
    with node_on(None) as n:
        n.allocate("a")
        assert n.stop() == 0
        db = n.data_dir / "ipam.db"
        os.truncate(db, 0)
        out = refused(n)
        assert "is empty (0 bytes)" in out and "never replaces a store silently" in out, out
        assert f"weaveipam reset --data-dir {n.data_dir}" in out
        assert db.stat().st_size == 0  # left as it was
        garbage = b"not a database at all\n" * 300
        db.write_bytes(garbage)
        out = refused(n)
        assert "is not an sqlite database" in out and "move" in out, out
        assert f"weaveipam reset --data-dir {n.data_dir}" in out
        assert db.read_bytes() == garbage
