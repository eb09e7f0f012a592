"""Durable sqlite store for the allocator's records.

The allocator is sans-IO: it emits `Record`s and the shell must make every record of
one output batch durable before it replies or gossips anything from that batch.  This
module is that durability: a single sqlite file in WAL mode with ``synchronous=FULL``,
so a returned commit has been fsync'd.

Async callers go through `Store.commit`: its records are applied in a transaction on
the caller's thread and one writer thread does the COMMIT (the fsync).  While a COMMIT
is in flight, further commits queue up and go together into the next transaction
("group commit"), so many concurrent allocations cost one fsync instead of one each.
Each caller's future resolves only after the transaction holding its records has
committed; if that transaction fails, exactly the callers in it get a `StoreError` and
none of their records are kept.

A store file is only ever opened by one `Store` (one daemon) at a time; the ordering
counter is kept in memory on that assumption.

Errors are named for what they are (Weave #2610 was a store silently replaced): a full,
read-only, forbidden (immutable) or failing disk is found with plain syscalls, because
sqlite reports most of them as "disk I/O error" or "unable to open"; only a file that
really is not a usable store (empty, not sqlite, damaged, another program's) gets the
advice to discard it.  A new store is built beside its final name and renamed into
place, so an empty or half-made file at the final name always means damage.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

from weaveipam.core.records import (
    ClearAllocations,
    DelAllocation,
    PutAllocation,
    Record,
    SetIdentity,
    SetPaxos,
    SetRing,
    SetWitnessed,
    Snapshot,
)
from weaveipam.kube.nodealloc import DelNodeAddress, NodeRecord, PutNodeAddress, SetNodeRanges

__all__ = ["SCHEMA_VERSION", "Store", "StoreError", "check_disk", "discard_files", "disk_error"]

SCHEMA_VERSION: Final = 1
_ADDRESS_BYTES: Final = 16  # IPv6 ints exceed sqlite's 64-bit INTEGER: store 16-byte BE
_ADDRESS_LIMIT: Final = 1 << (8 * _ADDRESS_BYTES)
_RECORD_TYPES: Final = (
    SetIdentity,
    SetRing,
    SetPaxos,
    SetWitnessed,
    PutAllocation,
    DelAllocation,
    ClearAllocations,
    PutNodeAddress,
    DelNodeAddress,
    SetNodeRanges,
)

# `idents` is not strictly needed to hold the data, but Snapshot.apply keeps an ident
# at its first-insertion position even after that first address is deleted, and a
# reload must reproduce that order exactly.
_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)",
    "CREATE TABLE idents (ident TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
    "CREATE TABLE allocations ("
    " ident TEXT NOT NULL, address BLOB NOT NULL, note TEXT NOT NULL,"
    " seq INTEGER NOT NULL, prefix INTEGER, PRIMARY KEY (ident, address))",
)
# Stores written before the subnet prefix was kept lack the column; it is added on open
# (NULL: the default subnet's prefix), which older releases still read.
_ADD_PREFIX: Final = "ALTER TABLE allocations ADD COLUMN prefix INTEGER"
_TABLES: Final = frozenset({"meta", "idents", "allocations"})
# kube-node allocations (this node's own ranges, weaveipam/kube/nodealloc.py): added to
# schema 1 without a version bump, created when missing, so an existing store keeps
# working; an older weaveipam ignores them (it checks only for its own tables)
_NODE_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS node_allocations ("
    " ident TEXT NOT NULL, family INTEGER NOT NULL, address BLOB NOT NULL,"
    " note TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (ident, family, address))",
    "CREATE TABLE IF NOT EXISTS node_ranges ("
    " source TEXT PRIMARY KEY, ranges TEXT NOT NULL, previous TEXT NOT NULL)",
    # the last address handed out per family: no immediate reuse across a restart either
    "CREATE TABLE IF NOT EXISTS node_cursor (family INTEGER PRIMARY KEY, address BLOB NOT NULL)",
)


class StoreError(Exception):
    """The store cannot do what was asked; the message says what is wrong and the fix.

    ``kind`` names the cause for callers that act on it: a disk problem ("full",
    "read-only", "immutable", "permission", "io", "disk"), a file that is not a usable
    store ("empty", "not-a-database", "corrupt", "foreign"), or "error" for the rest.
    """

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def unusable(self) -> bool:
        """Only then is discarding the file advice worth giving: nothing in it can be used."""
        return self.kind in _UNUSABLE


_UNUSABLE: Final = frozenset({"empty", "not-a-database", "corrupt"})
_PROBE_BYTES: Final = 8192  # a WAL commit needs at least a couple of pages
_KEEP: Final = ("The store itself was not changed: do not reset or delete it, that would "
                "lose this peer's allocations")
# errno -> (kind, what is wrong, what to do); {where} is the file or directory
_DISK: Final[dict[int, tuple[str, str, str]]] = {
    errno.ENOSPC: ("full", "the filesystem holding {where} is full (no space left on device)",
                   "free some space on it, or grow the volume"),
    errno.EDQUOT: ("full", "the disk quota for {where} is used up",
                   "raise the quota or free some space"),
    errno.EROFS: ("read-only", "the filesystem holding {where} is mounted read-only",
                  "remount it read-write (if it turned read-only by itself, the kernel saw "
                  "a disk error: check `dmesg` first)"),
    errno.EPERM: ("immutable", "writing {where} is not permitted: it or its directory is "
                  "probably immutable or append-only",
                  "check with `lsattr -d {where}` and clear the flag with `chattr -i`"),
    errno.EACCES: ("permission", "permission denied on {where}",
                   "give the daemon's user (uid {uid}) read and write access to the data "
                   "dir and the files in it"),
    errno.EIO: ("io", "the disk returned an I/O error (EIO) for {where}",
                "the device or its filesystem is failing: check `dmesg`, repair or replace "
                "it, and restore the data dir from a backup if the store turns out damaged"),
}


def disk_error(err: OSError, where: str | os.PathLike[str]) -> StoreError:
    """A StoreError that names an OS-level failure for what it is and says what to do."""
    kind, what, fix = _DISK.get(err.errno or 0, (
        "disk", f"{{where}}: {err.strerror or err} "
        f"({errno.errorcode.get(err.errno or 0, 'error')})",
        "check the disk and the data dir's permissions"))
    text = f"{what}; {fix}, then restart the daemon. {_KEEP}"
    return StoreError(text.format(where=where, uid=os.geteuid()), kind)


def check_disk(directory: Path, files: Iterable[Path] = ()) -> StoreError | None:
    """Why the store in ``directory`` cannot be written, found with plain syscalls (sqlite
    says "disk I/O error" or "unable to open" for most causes), or None if it can."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return disk_error(OSError(errno.EROFS, os.strerror(errno.EROFS)), directory)
    except OSError as e:
        return disk_error(e, directory)
    for f in files:
        try:
            fd = os.open(f, os.O_RDWR)
        except FileNotFoundError:
            continue
        except OSError as e:
            return disk_error(e, f)
        try:
            os.pread(fd, 4096, 0)
        except OSError as e:
            return disk_error(e, f)
        finally:
            os.close(fd)
    probe = directory / f".probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as e:
        return disk_error(e, directory)
    return None


@dataclass(slots=True)
class _Pending:
    """One awaiting `commit` call, queued for the writer thread."""

    records: tuple[Record | NodeRecord, ...]
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Batch:
    """A transaction `_kick` began, for the writer thread to COMMIT."""

    callers: list[_Pending]
    seq: int  # the ordering counter before it, restored if the COMMIT fails
    n: int


class _Stop:
    """Queue sentinel: the writer finishes what is queued before it, then exits."""


_STOP: Final = _Stop()
_T = TypeVar("_T")


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    """Runs on the caller's loop; a caller that was cancelled just isn't told."""
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


def _encode_address(address: int) -> bytes:
    return address.to_bytes(_ADDRESS_BYTES, "big")


def _check_records(records: Iterable[Record | NodeRecord]) -> tuple[Record | NodeRecord, ...]:
    """Reject malformed records before they are queued.

    A bad record found inside the writer would fail the whole group-commit batch,
    punishing unrelated callers; checking up front fails only the caller at fault.
    """
    out = tuple(records)
    for rec in out:
        if not isinstance(rec, _RECORD_TYPES):
            raise StoreError(
                f"cannot store {rec!r}: not a weaveipam record; pass only the record "
                "types from weaveipam.core.records"
            )
        if isinstance(rec, PutAllocation | DelAllocation | PutNodeAddress | DelNodeAddress):
            addr = rec.address
            if isinstance(addr, bool) or not isinstance(addr, int):
                raise StoreError(f"cannot store {rec!r}: address must be an int")
            if not 0 <= addr < _ADDRESS_LIMIT:
                raise StoreError(f"cannot store {rec!r}: address {addr} is outside 0..2**128-1")
            if not isinstance(rec.ident, str):
                raise StoreError(f"cannot store {rec!r}: ident must be a str")
            if isinstance(rec, PutAllocation | PutNodeAddress) and not isinstance(rec.note, str):
                raise StoreError(f"cannot store {rec!r}: note must be a str")
            if isinstance(rec, PutAllocation) and rec.prefix is not None and (
                    isinstance(rec.prefix, bool) or not isinstance(rec.prefix, int)
                    or not 0 <= rec.prefix <= 128):
                raise StoreError(f"cannot store {rec!r}: prefix must be None or 0..128")
            if isinstance(rec, PutNodeAddress | DelNodeAddress) and rec.bits not in (32, 128):
                raise StoreError(f"cannot store {rec!r}: bits must be 32 or 128")
        elif isinstance(rec, SetNodeRanges):
            if not isinstance(rec.source, str) or not isinstance(rec.ranges, str) \
                    or not isinstance(rec.previous, str):
                raise StoreError(f"cannot store {rec!r}: source and ranges must be str")
        elif isinstance(rec, SetRing | SetPaxos | SetWitnessed):
            if not isinstance(rec.data, bytes | bytearray | memoryview):
                raise StoreError(f"cannot store {rec!r}: data must be bytes")
        elif isinstance(rec, SetIdentity):
            if not isinstance(rec.name, str) or not isinstance(rec.universe, str):
                raise StoreError(f"cannot store {rec!r}: name and universe must be str")
    return out


class Store:
    """The allocator's durable state in one sqlite file.

    `commit_sync`, `load` and `wipe` may be called from any thread; `commit` from any
    event loop.  All database access is serialised on one connection.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()  # error messages name the real file
        #: committed transactions so far (commit_sync, commit batches, wipe); lets
        #: tests and metrics see how well group commit is batching
        self.transactions = 0
        #: records written by those transactions
        self.records_written = 0
        self._db_lock = threading.Lock()  # guards _conn, _seq and the counters
        # _db_lock is also held from `_kick`'s BEGIN until the writer's COMMIT is done,
        # across the two threads (a Lock, not an RLock, may be released by another)
        self._state_lock = threading.Lock()  # guards _closed, _writer and _waiting
        self._waiting: list[_Pending] = []  # commit() calls not yet in a transaction
        self._queue: queue.SimpleQueue[_Batch | _Stop] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._closed = False
        self._conn: sqlite3.Connection | None = self._open()
        self._seq = self._max_seq()

    # ------------------------------------------------------------------ opening

    def _fix(self) -> str:
        return (f"move {self.path} aside (keep it for diagnosis; its -wal and -shm files "
                f"belong to it) and, if there is no backup to restore, run `weaveipam reset "
                f"--data-dir {self.path.parent}` to start this peer with empty state (its "
                "recorded allocations are lost)")

    def _files(self) -> tuple[Path, Path, Path]:
        return self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")

    def _sqlite_error(self, e: sqlite3.Error, doing: str) -> StoreError:
        """Name an sqlite failure: the disk's fault if a probe finds one, else the file's."""
        trouble = check_disk(self.path.parent, self._files())
        if trouble is not None:
            return trouble
        path = self.path
        code = str(getattr(e, "sqlite_errorname", ""))
        if code == "SQLITE_NOTADB":
            return StoreError(f"store {path} is not an sqlite database ({e}): it was "
                              "overwritten, or is not weaveipam's file; " + self._fix(),
                              "not-a-database")
        if code.startswith("SQLITE_CORRUPT"):
            return StoreError(f"store {path} is damaged ({e}); " + self._fix(), "corrupt")
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return StoreError(f"store {path} is locked by another program ({e}); stop "
                              "whatever else has it open, then restart the daemon", "busy")
        if code == "SQLITE_FULL":
            return disk_error(OSError(errno.ENOSPC, str(e)), path)
        return StoreError(f"sqlite could not {doing} store {path} ({e}, {code or 'error'}); "
                          f"check the disk and permissions, then restart the daemon. {_KEEP}",
                          "disk" if code.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN",
                                                     "SQLITE_READONLY", "SQLITE_PERM"))
                          else "error")

    def _open(self) -> sqlite3.Connection:
        path = self.path
        parent = path.parent
        try:
            if not parent.exists():
                parent.mkdir(parents=True, mode=0o700)
                os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
            created = not path.exists()
            if not created and not path.is_file():
                raise StoreError(
                    f"store path {path} exists but is not a regular file; "
                    "point weaveipam at a file path"
                )
            wal = Path(f"{path}-wal")
            if created and wal.exists():
                # sqlite would replay it into the new store: old records in a fresh state
                raise StoreError(
                    f"{wal} is there without its store {path} (was the store moved away "
                    "without it?): move it back beside the store, or run `weaveipam reset "
                    f"--data-dir {parent}` to discard it and start with empty state")
            if not created and path.stat().st_size == 0:
                raise StoreError(
                    f"store {path} is empty (0 bytes): what it recorded is gone (the file "
                    "was truncated, or lost with its disk), and weaveipam never replaces a "
                    "store silently (Weave #2610); restore it from a backup, or "
                    + self._fix(), "empty")
            trouble = check_disk(parent, self._files())
            if trouble is not None:
                raise trouble
            if created:
                self._create()
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=5.0)
        except OSError as e:
            raise disk_error(e, e.filename or path) from e
        except sqlite3.Error as e:
            raise self._sqlite_error(e, "open") from e
        try:
            self._init_db(conn)
            _fsync_dir(parent)  # make the db and -wal directory entries durable too
        except BaseException:
            conn.close()
            raise
        return conn

    def _create(self) -> None:
        """Build an empty store beside the final name and rename it into place: a crash
        part-way never leaves an empty or half-made file where a store is expected."""
        path = self.path
        tmp = path.with_name(f".{path.name}.new")
        discard_files(tmp)  # a leftover of a crash during an earlier creation
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            os.chmod(tmp, 0o600)  # allocations name pods: not world-readable
            self._init_db(conn)
        finally:
            conn.close()  # checkpoints the WAL into the file and removes it
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def _init_db(self, conn: sqlite3.Connection) -> None:
        """Set durability pragmas, verify the file, create or check the schema."""
        path = self.path
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreError(
                    f"store {path} could not be switched to WAL mode (got {mode!r}); "
                    "put it on a local filesystem that supports shared memory"
                )
            conn.execute("PRAGMA synchronous=FULL")
            # The file is small (one row per allocation), so a full check at start-up
            # is cheap and beats discovering corruption halfway through a restore.
            check = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                raise StoreError(
                    f"store {path} is damaged ({'; '.join(check[:3])}); " + self._fix(),
                    "corrupt")
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._init_schema(conn)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            raise self._sqlite_error(e, "read") from e

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        path = self.path
        tables = {
            str(row[0])
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            for stmt in (*_SCHEMA, *_NODE_SCHEMA):
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            return
        if "meta" not in tables:
            raise StoreError(
                f"{path} is an sqlite database but not a weaveipam store (no meta "
                "table): another program's file; move it aside, or point --data-dir "
                "elsewhere", "foreign")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = None if row is None else row[0]
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"store {path} has schema version {version!r} but this weaveipam only "
                f"understands version {SCHEMA_VERSION}; run the weaveipam release that "
                "wrote it", "schema")
        missing = _TABLES - tables
        if missing:
            raise StoreError(
                f"store {path} is missing table(s) {', '.join(sorted(missing))}; "
                + self._fix(), "corrupt")
        columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(allocations)")}
        if "prefix" not in columns:
            conn.execute(_ADD_PREFIX)
        for stmt in _NODE_SCHEMA:  # a store from before kube-node ranges
            conn.execute(stmt)

    def _max_seq(self) -> int:
        conn = self._require_conn()
        try:
            row = conn.execute(
                "SELECT max(COALESCE((SELECT max(seq) FROM allocations), 0),"
                " COALESCE((SELECT max(seq) FROM idents), 0),"
                " COALESCE((SELECT max(seq) FROM node_allocations), 0))"
            ).fetchone()
        except sqlite3.Error as e:
            conn.close()
            self._conn = None
            raise self._sqlite_error(e, "read") from e
        return int(row[0])

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed; open a new Store to use it")
        return self._conn

    # ------------------------------------------------------------------ reading

    def load(self) -> Snapshot:
        """Rebuild the Snapshot the committed records describe.

        Idents and each ident's addresses come back in first-insertion order, as
        `Snapshot.apply` would have left them.
        """
        with self._db_lock:
            conn = self._require_conn()
            try:
                conn.execute("BEGIN")  # one consistent read across the tables
                try:
                    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                    idents = conn.execute("SELECT ident FROM idents ORDER BY seq").fetchall()
                    allocs = conn.execute(
                        "SELECT ident, address, note, prefix FROM allocations ORDER BY seq"
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._sqlite_error(e, "read") from e
        self._kick()  # commit() calls that arrived while we held the database
        snap = Snapshot(
            name=self._meta(meta, "name", str),
            universe=self._meta(meta, "universe", str),
            ring=self._meta(meta, "ring", bytes),
            paxos=self._meta(meta, "paxos", bytes),
            witnessed=self._meta(meta, "witnessed", bytes),
        )
        for (ident,) in idents:
            snap.allocations[ident] = {}
        for ident, address, note, prefix in allocs:
            addrs = snap.allocations.get(ident)
            if addrs is None or not isinstance(address, bytes):
                raise StoreError(
                    f"store {self.path} has an inconsistent allocation row "
                    f"({ident!r}, {address!r}); " + self._fix(), "corrupt")
            if len(address) != _ADDRESS_BYTES:
                raise StoreError(
                    f"store {self.path} has a {len(address)}-byte address for {ident!r}"
                    f" (expected {_ADDRESS_BYTES}); " + self._fix(), "corrupt")
            a = int.from_bytes(address, "big")
            addrs[a] = note
            if isinstance(prefix, int):
                snap.prefixes[(ident, a)] = prefix
        empty = [ident for ident, addrs in snap.allocations.items() if not addrs]
        if empty:
            raise StoreError(
                f"store {self.path} lists idents without addresses ({empty[:3]!r}); "
                + self._fix(), "corrupt")
        return snap

    def load_node(self) -> tuple[list[tuple[str, int, int, str]], dict[str, tuple[str, str]],
                                 dict[int, int]]:
        """The kube-node allocations as (ident, bits, address, note) in the order written,
        each source's (ranges, previous ranges), and the last address handed out per
        family."""
        with self._db_lock:
            conn = self._require_conn()
            try:
                conn.execute("BEGIN")
                try:
                    rows = conn.execute("SELECT ident, family, address, note FROM "
                                        "node_allocations ORDER BY seq").fetchall()
                    srcs = conn.execute("SELECT source, ranges, previous FROM "
                                        "node_ranges").fetchall()
                    cursors = conn.execute("SELECT family, address FROM node_cursor"
                                           ).fetchall()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._sqlite_error(e, "read") from e
        self._kick()
        out = []
        for ident, bits, address, note in rows:
            if not isinstance(address, bytes) or len(address) != _ADDRESS_BYTES \
                    or bits not in (32, 128):
                raise StoreError(f"store {self.path} has an inconsistent kube-node "
                                 f"allocation row ({ident!r}, {bits!r}, {address!r}); "
                                 + self._fix(), "corrupt")
            out.append((str(ident), int(bits), int.from_bytes(address, "big"), str(note)))
        return out, {str(s): (str(r), str(p)) for s, r, p in srcs}, \
            {int(b): int.from_bytes(a, "big") for b, a in cursors if isinstance(a, bytes)}

    def _meta(self, meta: dict[str, object], key: str, kind: type[_T]) -> _T | None:
        value = meta.get(key)
        if value is None or isinstance(value, kind):
            return value
        raise StoreError(
            f"store {self.path} has a {type(value).__name__} for {key!r} where a "
            f"{kind.__name__} belongs; " + self._fix(), "corrupt")

    # ------------------------------------------------------------------ writing

    def _apply(self, conn: sqlite3.Connection, rec: Record | NodeRecord) -> None:
        """One record, with exactly the meaning of Snapshot.apply."""
        if isinstance(rec, PutAllocation):
            self._seq += 1
            conn.execute(
                "INSERT INTO idents (ident, seq) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (rec.ident, self._seq),
            )
            # an existing (ident, address) keeps its place and only takes the new note
            conn.execute(
                "INSERT INTO allocations (ident, address, note, seq, prefix)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (ident, address)"
                " DO UPDATE SET note = excluded.note, prefix = excluded.prefix",
                (rec.ident, _encode_address(rec.address), rec.note, self._seq, rec.prefix),
            )
        elif isinstance(rec, DelAllocation):
            cur = conn.execute(
                "DELETE FROM allocations WHERE ident = ? AND address = ?",
                (rec.ident, _encode_address(rec.address)),
            )
            if cur.rowcount:
                conn.execute(
                    "DELETE FROM idents WHERE ident = ? AND NOT EXISTS"
                    " (SELECT 1 FROM allocations WHERE ident = ?)",
                    (rec.ident, rec.ident),
                )
        elif isinstance(rec, SetRing):
            self._put_meta(conn, "ring", bytes(rec.data))
        elif isinstance(rec, SetPaxos):
            self._put_meta(conn, "paxos", bytes(rec.data))
        elif isinstance(rec, SetWitnessed):
            self._put_meta(conn, "witnessed", bytes(rec.data))
        elif isinstance(rec, SetIdentity):
            self._put_meta(conn, "name", rec.name)
            self._put_meta(conn, "universe", rec.universe)
        elif isinstance(rec, ClearAllocations):
            conn.execute("DELETE FROM allocations")
            conn.execute("DELETE FROM idents")
        elif isinstance(rec, PutNodeAddress):
            self._seq += 1
            conn.execute(
                "INSERT INTO node_allocations (ident, family, address, note, seq)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (ident, family, address)"
                " DO UPDATE SET note = excluded.note",
                (rec.ident, rec.bits, _encode_address(rec.address), rec.note, self._seq))
            conn.execute("INSERT OR REPLACE INTO node_cursor (family, address) VALUES (?, ?)",
                         (rec.bits, _encode_address(rec.address)))
        elif isinstance(rec, DelNodeAddress):
            conn.execute("DELETE FROM node_allocations WHERE ident = ? AND family = ?"
                         " AND address = ?", (rec.ident, rec.bits,
                                               _encode_address(rec.address)))
        elif isinstance(rec, SetNodeRanges):
            conn.execute("INSERT OR REPLACE INTO node_ranges (source, ranges, previous)"
                         " VALUES (?, ?, ?)", (rec.source, rec.ranges, rec.previous))
        else:  # pragma: no cover - _check_records rejects these first
            raise StoreError(f"cannot store {rec!r}: not a weaveipam record")

    @staticmethod
    def _put_meta(conn: sqlite3.Connection, key: str, value: str | bytes) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _begin(self, conn: sqlite3.Connection,
               records: Iterable[Record | NodeRecord]) -> tuple[int, int]:
        """Open a transaction and apply records; returns (seq before, records applied).
        On error everything is rolled back and a StoreError raised."""
        seq = self._seq
        n = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            for rec in records:
                self._apply(conn, rec)
                n += 1
        except BaseException as e:
            self._abort(conn, seq)
            raise self._commit_error(e) from e
        return seq, n

    def _end(self, conn: sqlite3.Connection, seq: int, n: int) -> None:
        """COMMIT what `_begin` applied: durable on return, rolled back on error."""
        try:
            conn.execute("COMMIT")  # synchronous=FULL: the WAL is fsync'd here
        except BaseException as e:
            self._abort(conn, seq)
            raise self._commit_error(e) from e
        self.transactions += 1
        self.records_written += n

    def _abort(self, conn: sqlite3.Connection, seq: int) -> None:
        self._seq = seq
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one worth reporting

    def _commit_error(self, e: BaseException) -> BaseException:
        if isinstance(e, sqlite3.Error | OSError):
            cause = (self._sqlite_error(e, "write") if isinstance(e, sqlite3.Error)
                     else disk_error(e, self.path))
            return StoreError(f"could not commit to store {self.path}, nothing from this "
                              f"commit was kept: {cause}", cause.kind)
        return e

    def _write(self, records: Iterable[Record | NodeRecord]) -> None:
        """Apply records in one transaction; durable on return, untouched on error."""
        with self._db_lock:
            conn = self._require_conn()
            seq, n = self._begin(conn, records)
            self._end(conn, seq, n)

    def commit_sync(self, records: Sequence[Record | NodeRecord]) -> None:
        """Make records durable in one transaction before returning (blocks)."""
        recs = _check_records(records)
        if recs:
            self._write(recs)
        self._kick()  # commit() calls that arrived while we held the database

    async def commit(self, records: Sequence[Record | NodeRecord]) -> None:
        """Make records durable, sharing the transaction with concurrent callers.

        Returns only after the transaction holding these records has been fsync'd.
        Cancelling the awaiting task does not withdraw the records: they may still be
        committed.  Committing no records is a barrier: it returns once everything
        queued before it is durable.
        """
        recs = _check_records(records)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._state_lock:
            if self._closed:
                raise StoreError(f"store {self.path} is closed; open a new Store to commit")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._writer_main,
                    name=f"weaveipam-store:{self.path.name}",
                    daemon=True,
                )
                self._writer.start()
            self._waiting.append(_Pending(recs, fut, loop))
        self._kick()
        await fut

    def _kick(self) -> None:
        """Start the next transaction unless one is in flight (its writer kicks again).

        The statements run here, on the caller's thread: they are quick, and running
        them on the writer thread made it wait for the event loop's GIL before each one
        (a 20-record batch took 3 ms instead of 0.6).  Only the COMMIT, the fsync, goes
        to the writer thread.
        """
        while self._waiting and self._db_lock.acquire(blocking=False):
            batch, records = self._take_waiting()
            if not batch:  # another kick took them meanwhile
                self._db_lock.release()
                continue
            if not records:  # only barriers: everything before them is durable
                self._db_lock.release()
                self._resolve(batch, None)
                continue
            try:
                conn = self._require_conn()
                seq, n = self._begin(conn, records)
            except BaseException as e:
                self._db_lock.release()
                self._resolve(batch, e)
                if not isinstance(e, Exception):
                    raise
                continue
            self._queue.put(_Batch(batch, seq, n))  # the writer releases _db_lock
            return

    def _take_waiting(self) -> tuple[list[_Pending], list[Record | NodeRecord]]:
        """Every commit() call not yet in a transaction, and their records in order."""
        with self._state_lock:
            batch, self._waiting = self._waiting, []
        return batch, [rec for p in batch for rec in p.records]

    def _writer_main(self) -> None:
        """Writer thread: COMMIT each transaction `_kick` began, then kick the next."""
        while True:
            item = self._queue.get()
            if isinstance(item, _Stop):
                return
            err: BaseException | None = None
            try:
                self._end(self._require_conn(), item.seq, item.n)
            except Exception as e:  # keep the writer alive for later batches
                err = e
            finally:
                self._db_lock.release()
            self._resolve(item.callers, err)
            with self._state_lock:
                loop = self._waiting[0].loop if self._waiting else None
            if loop is not None:
                # the next transaction's statements run on its callers' loop (see _kick)
                try:
                    loop.call_soon_threadsafe(self._kick)
                except RuntimeError:
                    self._kick()  # that loop is closed: do it here rather than strand it

    def _resolve(self, batch: list[_Pending], err: BaseException | None) -> None:
        """Tell each caller of a transaction how it ended, on the caller's own loop."""
        for p in batch:
            # one exception object per caller: they are raised in separate tasks
            mine: BaseException | None = None
            if err is not None:
                mine = StoreError(
                    str(err)
                    if isinstance(err, StoreError)
                    else f"could not commit to store {self.path}: {err!r}; nothing from "
                    "this commit was kept - retry, and report this if it persists",
                    err.kind if isinstance(err, StoreError) else "error",
                )
                mine.__cause__ = err.__cause__ if isinstance(err, StoreError) else err
            try:
                p.loop.call_soon_threadsafe(_settle, p.future, mine)
            except RuntimeError:
                pass  # that caller's loop is closed; nobody is waiting any more

    def wipe(self) -> None:
        """Forget everything durably, keeping an empty store of the current schema.

        Rows are deleted in one transaction rather than the file being removed, so a
        crash mid-wipe leaves either the old state or none, never a mixture.
        """
        with self._db_lock:
            conn = self._require_conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("DELETE FROM allocations")
                conn.execute("DELETE FROM idents")
                conn.execute("DELETE FROM node_allocations")
                conn.execute("DELETE FROM node_ranges")
                conn.execute("DELETE FROM node_cursor")
                conn.execute("DELETE FROM meta WHERE key != 'schema_version'")
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # report the original error
                raise StoreError(
                    f"could not wipe store {self.path}: {e}; stop weaveipam and delete "
                    "the file with its -wal/-shm companions (discard_files does this)"
                ) from e
            self.transactions += 1
        self._kick()

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Write everything already queued, stop the writer, close the file.

        Blocks until queued commits are durable; from a coroutine prefer `aclose`.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True  # later commit() calls are refused
            writer = self._writer
        # Commit what is still waiting here: its loop may be the one blocked in close().
        # Nothing new arrives once closed, and _write waits for a transaction in flight.
        while True:
            batch, records = self._take_waiting()
            if not batch:
                break
            err: BaseException | None = None
            try:
                self._write(records)
            except Exception as e:
                err = e
            self._resolve(batch, err)
        if writer is not None:
            self._queue.put(_STOP)
            if writer is not threading.current_thread():
                writer.join()
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()  # last connection: sqlite checkpoints the WAL
                self._conn = None

    async def aclose(self) -> None:
        """`close` without blocking the event loop while the queue drains."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def discard_files(path: str | os.PathLike[str]) -> None:
    """Delete a store file and its -wal/-shm companions, e.g. one too corrupt to open.

    `Store.wipe` needs a readable file; this is the fallback for `weaveipam reset`
    when opening fails.  Only call it while no process has the store open.
    """
    base = Path(path).absolute()
    # the database itself last: a crash part-way must not leave a stale WAL that
    # sqlite would replay into a fresh database of the same name
    for victim in (Path(f"{base}-wal"), Path(f"{base}-shm"), base):
        try:
            victim.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(
                f"cannot delete {victim}: {e}; remove it by hand while weaveipam is stopped"
            ) from e
    _fsync_dir(base.parent)


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so newly created files in it survive a power cut."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some platforms); sqlite's own syncs remain
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
