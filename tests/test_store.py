"""Tests for the sqlite store: same meaning as Snapshot.apply, durable, group-committed."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import random
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import weaveipam
from weaveipam.core.records import (
    ClearAllocations,
    DelAllocation,
    PutAllocation,
    Record,
    SetIdentity,
    SetPaxos,
    SetRing,
    Snapshot,
)
from weaveipam.store import SCHEMA_VERSION, Store, StoreError, discard_files, disk_error

V6_A = int(ipaddress.IPv6Address("fd00::1"))
V6_MAX = 2**128 - 1
V4_A = int(ipaddress.IPv4Address("10.32.0.1"))


def replay(records: Iterable[Record]) -> Snapshot:
    snap = Snapshot()
    for rec in records:
        snap.apply(rec)
    return snap


def ordered(snap: Snapshot) -> tuple[object, ...]:
    """Snapshot as a tuple that also compares insertion order (dict == ignores it)."""
    allocs = [(ident, list(addrs.items())) for ident, addrs in snap.allocations.items()]
    return (snap.name, snap.universe, snap.ring, snap.paxos, allocs,
            sorted(snap.prefixes.items()))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "weaveipam.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db)
    yield s
    s.close()


def test_roundtrip_every_record_type(store: Store, db: Path) -> None:
    records: list[Record] = [
        SetIdentity("peer-a", "fd00::/64"),
        SetRing(b"\x81\xa4ring\x00\xff"),
        SetPaxos(b""),
        PutAllocation("c1", V6_A, "default/pod-1"),
        PutAllocation("c1", V6_MAX, "ünïcødé ✓"),
        PutAllocation("c2", 0),
        PutAllocation("c2", V4_A, "kube-system/dns"),
        DelAllocation("c2", 0),
        SetIdentity("peer-a", "10.32.0.0/12"),
        SetRing(b"ring-2"),
    ]
    store.commit_sync(records)
    want = replay(records)
    assert want.paxos == b""  # empty bytes is a value, not "absent"
    assert ordered(store.load()) == ordered(want)
    store.close()
    with Store(db) as again:
        got = again.load()
    assert ordered(got) == ordered(want)
    assert got.allocations["c1"] == {V6_A: "default/pod-1", V6_MAX: "ünïcødé ✓"}


def test_empty_store_loads_empty_snapshot(store: Store) -> None:
    assert store.load() == Snapshot()


def test_ordering_matches_snapshot_apply(store: Store) -> None:
    records: list[Record] = [
        PutAllocation("a", 3),
        PutAllocation("b", 1),
        PutAllocation("a", 1),
        PutAllocation("a", 2),
        DelAllocation("a", 3),  # a keeps its place ahead of b
        PutAllocation("a", 3),  # ... and address 3 goes to the end of a
        PutAllocation("a", 1, "new note"),  # an update keeps the address's place
        PutAllocation("c", 9),
        DelAllocation("b", 1),  # b gone ...
        PutAllocation("b", 1),  # ... and back, now after c
    ]
    for rec in records:  # one transaction per record
        store.commit_sync([rec])
    snap = store.load()
    assert list(snap.allocations) == ["a", "c", "b"]
    assert list(snap.allocations["a"].items()) == [(1, "new note"), (2, ""), (3, "")]
    assert ordered(snap) == ordered(replay(records))


def test_del_last_address_removes_ident(store: Store) -> None:
    store.commit_sync([PutAllocation("c", 1), PutAllocation("c", 2), PutAllocation("d", 5)])
    store.commit_sync([DelAllocation("c", 1)])
    assert store.load().allocations == {"c": {2: ""}, "d": {5: ""}}
    store.commit_sync([DelAllocation("c", 2), DelAllocation("nobody", 7), DelAllocation("d", 6)])
    assert store.load().allocations == {"d": {5: ""}}


def test_clear_allocations_keeps_identity_ring_and_paxos(store: Store) -> None:
    store.commit_sync(
        [
            SetIdentity("p", "10.0.0.0/8"),
            SetRing(b"r"),
            SetPaxos(b"x"),
            PutAllocation("c", 1),
            PutAllocation("d", V6_MAX),
        ]
    )
    store.commit_sync([ClearAllocations(), PutAllocation("e", 4)])
    snap = store.load()
    assert (snap.name, snap.universe, snap.ring, snap.paxos) == ("p", "10.0.0.0/8", b"r", b"x")
    assert snap.allocations == {"e": {4: ""}}


@pytest.mark.parametrize("seed", range(5))
def test_random_histories_reload_to_replayed_snapshot(db: Path, seed: int) -> None:
    rng = random.Random(seed)
    idents = [f"c{i}" for i in range(6)]
    addresses = [0, 1, V4_A, V6_A, V6_MAX, 2**64, 2**64 - 1]
    history: list[Record] = []
    with Store(db) as store:
        for _ in range(40):
            batch: list[Record] = []
            for _ in range(rng.randint(0, 6)):
                roll = rng.random()
                if roll < 0.5:
                    rec: Record = PutAllocation(
                        rng.choice(idents), rng.choice(addresses), rng.choice(["", "x", "y"]),
                        rng.choice([None, 0, 12, 24, 128]),
                    )
                elif roll < 0.85:
                    rec = DelAllocation(rng.choice(idents), rng.choice(addresses))
                elif roll < 0.9:
                    rec = ClearAllocations()
                elif roll < 0.95:
                    rec = SetRing(rng.randbytes(rng.randint(0, 8)))
                else:
                    rec = SetIdentity(f"n{rng.randint(0, 2)}", "fd00::/8")
                batch.append(rec)
            store.commit_sync(batch)
            history.extend(batch)
            assert ordered(store.load()) == ordered(replay(history))
    with Store(db) as again:
        assert ordered(again.load()) == ordered(replay(history))


def test_creates_private_parent_dir_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "w.db"
    with Store(path) as store:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        conn = store._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == (SCHEMA_VERSION,)
    assert Store(str(path)).load() == Snapshot()  # str paths too


def test_wipe_forgets_everything_durably(store: Store, db: Path) -> None:
    store.commit_sync([SetIdentity("p", "10.0.0.0/8"), SetRing(b"r"), PutAllocation("c", 1)])
    store.wipe()
    assert store.load() == Snapshot()
    store.commit_sync([PutAllocation("d", 2)])
    store.close()
    with Store(db) as again:
        assert again.load().allocations == {"d": {2: ""}}
        again.wipe()
    with Store(db) as again:
        assert again.load() == Snapshot()


async def test_concurrent_commits_are_batched_and_durable(store: Store, db: Path) -> None:
    async def one(i: int) -> None:
        await store.commit([PutAllocation(f"c{i}", V6_A + i, f"pod{i}"), SetPaxos(b"%d" % i)])

    await asyncio.gather(*(one(i) for i in range(200)))
    assert store.records_written == 400
    assert 1 <= store.transactions < 200
    snap = store.load()
    assert list(snap.allocations) == [f"c{i}" for i in range(200)]  # FIFO order kept
    assert snap.paxos == b"199"
    await store.aclose()
    with Store(db) as again:
        assert ordered(again.load()) == ordered(snap)


async def test_commit_order_is_submission_order(store: Store) -> None:
    await asyncio.gather(
        store.commit([PutAllocation("x", 1)]),
        store.commit([DelAllocation("x", 1)]),
        store.commit([PutAllocation("y", 2)]),
    )
    assert store.load().allocations == {"y": {2: ""}}
    await store.commit([])  # a barrier: nothing to write, still fine


async def test_failed_batch_fails_exactly_its_callers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real_end, real_apply = store._end, store._apply
    calls = 0

    def gated_end(conn: sqlite3.Connection, seq: int, n: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # hold the first COMMIT so the next three queue up together
            entered.set()
            assert release.wait(5)
        real_end(conn, seq, n)

    def poisoned_apply(conn: sqlite3.Connection, rec: Record) -> None:
        if isinstance(rec, PutAllocation) and rec.ident == "poison":
            raise sqlite3.OperationalError("disk I/O error")
        real_apply(conn, rec)

    monkeypatch.setattr(store, "_end", gated_end)
    monkeypatch.setattr(store, "_apply", poisoned_apply)

    plug = asyncio.create_task(store.commit([PutAllocation("plug", 1)]))
    assert await asyncio.to_thread(entered.wait, 5)
    same_batch = [
        asyncio.create_task(store.commit([PutAllocation(name, 2)]))
        for name in ("good1", "poison", "good2")
    ]
    await asyncio.sleep(0.01)  # let all three reach the queue
    release.set()
    await plug
    results = await asyncio.gather(*same_batch, return_exceptions=True)
    for res in results:
        assert isinstance(res, StoreError)
        assert "disk I/O error" in str(res) and str(store.path) in str(res)
    assert len({id(r) for r in results}) == 3  # each caller gets its own exception

    await store.commit([PutAllocation("later", 3)])  # the writer survived
    assert store.load().allocations == {"plug": {1: ""}, "later": {3: ""}}
    assert store.transactions == 2


async def test_commits_queued_behind_a_reader_are_not_stranded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that takes the database between two transactions must start the next one:
    the writer's own hand-over finds the database busy and leaves it to whoever holds it."""
    entered, release = threading.Event(), threading.Event()
    real_end = store._end
    calls = 0

    def gated_end(conn: sqlite3.Connection, seq: int, n: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            assert release.wait(5)
        real_end(conn, seq, n)

    real_conn = store._require_conn

    def slow_reader_conn() -> sqlite3.Connection:
        if threading.current_thread().name == "reader":
            time.sleep(0.2)  # holds the database while the writer's hand-over runs
        return real_conn()

    monkeypatch.setattr(store, "_end", gated_end)
    monkeypatch.setattr(store, "_require_conn", slow_reader_conn)
    first = asyncio.create_task(store.commit([PutAllocation("first", 1)]))
    assert await asyncio.to_thread(entered.wait, 5)
    second = asyncio.create_task(store.commit([PutAllocation("second", 2)]))
    await asyncio.sleep(0.01)  # queued behind the COMMIT in flight
    reader = threading.Thread(target=store.load, name="reader")
    reader.start()  # waits for the database
    await asyncio.sleep(0.01)
    release.set()
    time.sleep(0.1)  # the loop is busy: the reader takes the database before the hand-over
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    reader.join(5)
    assert store.load().allocations == {"first": {1: ""}, "second": {2: ""}}


async def test_write_failure_reports_and_recovers(store: Store) -> None:
    await store.commit([PutAllocation("kept", 1)])
    conn = store._conn
    assert conn is not None
    with store._db_lock:
        conn.execute("PRAGMA query_only = ON")  # every write now fails inside sqlite
    results = await asyncio.gather(
        *(store.commit([PutAllocation(f"lost{i}", i)]) for i in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreError) and "readonly" in str(r) for r in results)
    with pytest.raises(StoreError, match="could not commit"):
        store.commit_sync([PutAllocation("lost-sync", 9)])
    with store._db_lock:
        conn.execute("PRAGMA query_only = OFF")
    await store.commit([PutAllocation("after", 2)])
    assert store.load().allocations == {"kept": {1: ""}, "after": {2: ""}}


async def test_closed_store_fails_clearly(store: Store) -> None:
    await store.commit([PutAllocation("c", 1)])
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.commit([PutAllocation("c", 2)])
    with pytest.raises(StoreError, match="closed"):
        store.commit_sync([PutAllocation("c", 2)])
    with pytest.raises(StoreError, match="closed"):
        store.load()
    store.close()  # idempotent


async def test_aclose_flushes_queued_commits(db: Path) -> None:
    store = Store(db)
    tasks = [asyncio.create_task(store.commit([PutAllocation(f"c{i}", i)])) for i in range(50)]
    await asyncio.sleep(0)  # they are queued, maybe not yet written
    await store.aclose()
    await asyncio.gather(*tasks)
    with Store(db) as again:
        assert len(again.load().allocations) == 50


async def test_cancelled_caller_does_not_break_the_writer(store: Store) -> None:
    task = asyncio.create_task(store.commit([PutAllocation("c", 1)]))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.commit([PutAllocation("d", 2)])
    assert "d" in store.load().allocations


@pytest.mark.parametrize(
    "bad",
    [
        PutAllocation("c", -1),
        PutAllocation("c", 2**128),
        DelAllocation("c", True),
        PutAllocation("c", 1, None),  # type: ignore[arg-type]
        SetRing("text"),  # type: ignore[arg-type]
        "not a record",
    ],
)
async def test_malformed_records_fail_only_their_caller(store: Store, bad: object) -> None:
    good = asyncio.create_task(store.commit([PutAllocation("good", 1)]))
    with pytest.raises(StoreError, match="cannot store"):
        await store.commit([PutAllocation("ok", 2), bad])  # type: ignore[list-item]
    with pytest.raises(StoreError, match="cannot store"):
        store.commit_sync([bad])  # type: ignore[list-item]
    await good
    assert store.load().allocations == {"good": {1: ""}}


def test_garbage_file_raises_naming_file_and_fix(db: Path) -> None:
    db.parent.mkdir()
    db.write_bytes(b"this is not sqlite at all\n" * 200)
    with pytest.raises(StoreError) as info:
        Store(db)
    msg = str(info.value)
    assert str(db) in msg and "weaveipam reset" in msg and info.value.unusable
    assert db.read_bytes().startswith(b"this is not sqlite")  # left untouched


def test_discard_files_removes_an_unopenable_store(db: Path) -> None:
    db.parent.mkdir()
    db.write_bytes(b"garbage" * 100)
    Path(f"{db}-wal").write_bytes(b"stale wal")
    with pytest.raises(StoreError):
        Store(db)
    discard_files(db)
    discard_files(db)  # nothing left: still fine
    assert list(db.parent.iterdir()) == []
    with Store(db) as store:
        assert store.load() == Snapshot()


def test_damaged_database_pages_raise(db: Path) -> None:
    with Store(db) as store:
        for i in range(20):
            store.commit_sync([PutAllocation(f"container-{i:04d}" * 8, i, "n" * 300)])
    data = bytearray(db.read_bytes())
    assert len(data) > 3 * 4096
    data[4096 : 3 * 4096] = b"\xa5" * (2 * 4096)  # clobber the pages after the header page
    db.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=str(db)):
        Store(db).load()


def test_store_from_before_prefixes_loads_and_keeps_them_from_then_on(db: Path) -> None:
    """A store written before the subnet prefix was kept (no `prefix` column) opens: its
    allocations have no prefix (the default subnet's is shown), new ones keep theirs."""
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB);"
        "CREATE TABLE idents (ident TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
        "CREATE TABLE allocations (ident TEXT NOT NULL, address BLOB NOT NULL,"
        " note TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (ident, address));"
        f"INSERT INTO meta VALUES ('schema_version', {SCHEMA_VERSION});"
        "INSERT INTO idents VALUES ('old', 1);")
    conn.execute("INSERT INTO allocations VALUES ('old', ?, 'a pod', 1)",
                 (V4_A.to_bytes(16, "big"),))
    conn.close()
    with Store(db) as store:
        snap = store.load()
        assert snap.allocations == {"old": {V4_A: "a pod"}} and snap.prefixes == {}
        store.commit_sync([PutAllocation("new", V4_A + 1, "", 24)])
    with Store(db) as again:
        snap = again.load()
        assert snap.prefixes == {("new", V4_A + 1): 24}
        assert snap.allocations["old"] == {V4_A: "a pod"}


def test_unknown_schema_version_raises(db: Path) -> None:
    Store(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(db)


def test_foreign_sqlite_database_raises(db: Path) -> None:
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="not a weaveipam store"):
        Store(db)


def test_path_that_is_a_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a regular file"):
        Store(tmp_path)


_CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from weaveipam.core.records import PutAllocation, SetIdentity
    from weaveipam.store import Store

    path, how = sys.argv[1], sys.argv[2]
    store = Store(path)
    store.commit_sync([SetIdentity("peer", "fd00::/64")])
    print("ack -1", flush=True)

    def die():
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)

    async def one(i):
        await store.commit([PutAllocation(f"c{i}", (0xFD00 << 112) + i, f"pod{i}"),
                            PutAllocation(f"c{i}", 2**128 - 1 - i)])
        print(f"ack {i}", flush=True)

    async def main():
        tasks = [asyncio.create_task(one(i)) for i in range(300)]
        for n, t in enumerate(asyncio.as_completed(tasks), 1):
            await t
            if n == 150:
                die()  # mid-stream: later commits may or may not have been written

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_acknowledged_commits_survive_process_death(db: Path, how: str) -> None:
    env = dict(os.environ)
    root = str(Path(weaveipam.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(db), how],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == (-9 if how == "sigkill" else 0), proc.stderr
    acked = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("ack")]
    assert acked[0] == -1 and len(acked) >= 151
    with Store(db) as store:
        snap = store.load()
    assert (snap.name, snap.universe) == ("peer", "fd00::/64")
    for i in acked[1:]:
        assert snap.allocations[f"c{i}"] == {(0xFD00 << 112) + i: f"pod{i}", 2**128 - 1 - i: ""}


def _eio_on(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of the store's files fail with EIO, as on a failing disk (device-mapper's
    `error` target is not available everywhere, so the kernel's answer is injected)."""
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(db)):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)


async def test_eio_is_named_while_running_and_at_open(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(db)
    await store.commit([PutAllocation("kept", 1)])
    conn = store._conn
    assert conn is not None
    with store._db_lock:
        conn.execute("PRAGMA query_only = ON")  # sqlite's own write fails, as it would
    _eio_on(db, monkeypatch)
    with pytest.raises(StoreError) as info:
        await store.commit([PutAllocation("lost", 2)])
    msg = str(info.value)
    assert info.value.kind == "io" and "I/O error (EIO)" in msg and "dmesg" in msg, msg
    assert "weaveipam reset" not in msg and "do not reset" in msg
    with store._db_lock:
        conn.execute("PRAGMA query_only = OFF")
    store.close()
    with pytest.raises(StoreError) as info:
        Store(db)
    assert info.value.kind == "io" and "weaveipam reset" not in str(info.value)
    monkeypatch.undo()
    with Store(db) as again:
        assert again.load().allocations == {"kept": {1: ""}}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EPERM, errno.EACCES,
                                  errno.EIO, errno.EDQUOT])
def test_each_disk_error_has_its_own_words_and_never_advises_reset(code: int) -> None:
    err = disk_error(OSError(code, os.strerror(code)), "/var/lib/weave")
    others = {disk_error(OSError(c, os.strerror(c)), "/var/lib/weave").kind
              for c in (errno.ENOSPC, errno.EROFS, errno.EPERM, errno.EACCES, errno.EIO)}
    assert len(others) == 5
    assert "/var/lib/weave" in str(err) and "weaveipam reset" not in str(err)
    assert not err.unusable
