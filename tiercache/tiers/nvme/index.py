"""The root's shared index: the entries committed, who reads them, the budget taken, and which caches have it open.

Every cache that opens a root (in any process) is a member and keeps the index in ROOT/index.sqlite3, a SQLite
database in WAL mode, in transactions. Why SQLite: it is in the standard library; a transaction (BEGIN IMMEDIATE
takes the one write lock) checks the shared budget and commits an entry atomically across processes; WAL lets
readers run while a writer commits; a process killed mid-transaction leaves nothing half-done (its journal rolls
back); `PRAGMA data_version` tells a member in microseconds whether another one committed since it last looked.
A journal of our own would have to rebuild all of that. The data stays where it was: an entry is its directory
with a sealed manifest (format.py), and the index is rebuilt from the directories when it is lost or damaged.

Rows: `entries` (one live version per key; a removed one is `doomed` until its files go), `removed` (what left, in
commit order, so members apply others' changes without re-listing), `members` (token, PID, host), `leases` (a
member reading an entry: its files stay), `reservations` (room taken by a write in progress, and its staging
directory), `dropped` (keys a cache held in memory only and let go of at close, and why, for a later miss). A
member is alive while it holds its lock file (lock.py); a dead member's leases, reservations and staging
directories are recovered by whoever notices first.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import RootInUseError, StorageError, caused_by
from ...io.files import FileOps
from .failures import describe
from .lock import MemberLock, alive, describe_holder

SCHEMA_VERSION = 1
KEEP_REMOVED = 100_000  # rows of `removed` kept for members catching up; one further behind re-reads every entry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    name TEXT PRIMARY KEY, key TEXT NOT NULL, nbytes INTEGER NOT NULL, written_ns INTEGER NOT NULL,
    seq INTEGER NOT NULL, doomed_ns INTEGER, uses INTEGER NOT NULL DEFAULT 0, last_used_ns INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_version ON entries (key) WHERE doomed_ns IS NULL;
CREATE INDEX IF NOT EXISTS entries_by_seq ON entries (seq);
CREATE TABLE IF NOT EXISTS removed (seq INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    token TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, opened_ns INTEGER NOT NULL,
    read_only INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT NOT NULL, token TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (name, token)
);
CREATE TABLE IF NOT EXISTS reservations (
    staging TEXT PRIMARY KEY, token TEXT NOT NULL, key TEXT NOT NULL, nbytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    key TEXT PRIMARY KEY, reason TEXT NOT NULL, dropped_ns INTEGER NOT NULL, pid INTEGER NOT NULL
);
"""

# Bytes the budget counts: every entry whose files are on disk (live, or removed and not yet swept: still read by
# a member, inside its grace period, or refused by the disk) and every write in progress. Counting them all keeps
# the budget exact whenever it is read; `_LEAVING` is the part that goes by itself within the grace period.
_TOTAL = """
SELECT (SELECT COALESCE(SUM(nbytes), 0) FROM entries) + (SELECT COALESCE(SUM(nbytes), 0) FROM reservations)
"""
_LEAVING = """
SELECT COALESCE(SUM(nbytes), 0), MIN(doomed_ns) FROM entries e WHERE doomed_ns IS NOT NULL AND doomed_ns > :cutoff
    AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.name = e.name)
"""


@dataclass(frozen=True)
class Row:
    """An entry as the index lists it."""

    name: str  # its directory under entries/
    key: str
    nbytes: int
    written_ns: int
    uses: int
    last_used_ns: int
    doomed_ns: int | None = None


@dataclass(frozen=True)
class Changes:
    """What other members committed since a member last looked: entries added (live) and directory names removed;
    `everything` means the log no longer reaches back that far, and `added` lists every live entry."""

    added: list[Row]
    removed: list[str]
    everything: bool
    seq: int


@dataclass(frozen=True)
class Member:
    token: str
    pid: int
    host: str
    opened_ns: int
    read_only: bool
    alive: bool


class Transaction:
    """The statements one member runs inside one write transaction (RootIndex.transaction)."""

    def __init__(self, db: sqlite3.Connection, token: str) -> None:
        self.db = db
        self.token = token

    def _next_seq(self) -> int:
        return int(self.db.execute("UPDATE meta SET v = v + 1 WHERE k = 'seq' RETURNING v").fetchone()[0])

    def total(self) -> int:
        return int(self.db.execute(_TOTAL).fetchone()[0])

    def leaving(self, grace_ns: int) -> tuple[int, int | None]:
        """Bytes of removed entries nobody reads that are inside their grace period (they go by themselves), and
        when the oldest of them was removed."""
        nbytes, oldest = self.db.execute(_LEAVING, {"cutoff": time.time_ns() - grace_ns}).fetchone()
        return int(nbytes), oldest

    def reserve(self, staging: str, key: str, nbytes: int) -> None:
        self.db.execute(
            "INSERT INTO reservations (staging, token, key, nbytes) VALUES (?, ?, ?, ?)",
            (staging, self.token, key, nbytes),
        )

    def cancel(self, staging: str) -> None:
        self.db.execute("DELETE FROM reservations WHERE staging = ?", (staging,))

    def live(self, key: str) -> Row | None:
        row = self.db.execute(
            "SELECT name, key, nbytes, written_ns, uses, last_used_ns FROM entries WHERE key = ? AND doomed_ns IS NULL",
            (key,),
        ).fetchone()
        return Row(*row) if row else None

    def insert(self, name: str, key: str, nbytes: int, written_ns: int) -> None:
        """Index an entry (its reservation, if any, is the caller's to cancel); an older live version is doomed."""
        older = self.live(key)
        if older is not None:
            self.doom(older.name)
        self.db.execute("DELETE FROM dropped WHERE key = ?", (key,))
        self.db.execute(
            "INSERT INTO entries (name, key, nbytes, written_ns, seq, last_used_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (name, key, nbytes, written_ns, self._next_seq(), time.time_ns()),
        )

    def doom(self, name: str) -> bool:
        """Mark an entry removed (hidden from every member; its files stay while leased). False if it was not live."""
        cursor = self.db.execute(
            "UPDATE entries SET doomed_ns = ? WHERE name = ? AND doomed_ns IS NULL", (time.time_ns(), name)
        )
        if cursor.rowcount == 0:
            return False
        self.db.execute("INSERT INTO removed (seq, name) VALUES (?, ?)", (self._next_seq(), name))
        return True

    def forget(self, name: str) -> None:
        """Drop an entry's row (its files are gone, or never were)."""
        self.db.execute("DELETE FROM entries WHERE name = ?", (name,))
        self.db.execute("DELETE FROM leases WHERE name = ?", (name,))

    def lease(self, name: str) -> bool:
        """Start a read of a live entry: its files stay until `unlease`. False if it is no longer live."""
        cursor = self.db.execute(
            "UPDATE entries SET uses = uses + 1, last_used_ns = ? WHERE name = ? AND doomed_ns IS NULL",
            (time.time_ns(), name),
        )
        if cursor.rowcount == 0:
            return False
        self.db.execute(
            "INSERT INTO leases (name, token, count) VALUES (?, ?, 1) "
            "ON CONFLICT (name, token) DO UPDATE SET count = count + 1",
            (name, self.token),
        )
        return True

    def unlease(self, name: str) -> None:
        self.db.execute("UPDATE leases SET count = count - 1 WHERE name = ? AND token = ?", (name, self.token))
        self.db.execute("DELETE FROM leases WHERE name = ? AND token = ? AND count <= 0", (name, self.token))

    def reapable(self, grace_ns: int) -> list[Row]:
        """Doomed entries nobody reads, removed at least `grace_ns` ago: their files may go."""
        rows = self.db.execute(
            "SELECT name, key, nbytes, written_ns, uses, last_used_ns, doomed_ns FROM entries e "
            "WHERE doomed_ns IS NOT NULL AND doomed_ns <= ? "
            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.name = e.name)",
            (time.time_ns() - grace_ns,),
        ).fetchall()
        return [Row(*r) for r in rows]

    def members(self) -> list[tuple[str, int, str, int, bool]]:
        return [
            (t, p, h, o, bool(r))
            for t, p, h, o, r in self.db.execute("SELECT token, pid, host, opened_ns, read_only FROM members")
        ]

    def drop_member(self, token: str) -> list[str]:
        """Remove a dead member's leases, reservations and row; returns the staging directories it left."""
        staging = [s for (s,) in self.db.execute("SELECT staging FROM reservations WHERE token = ?", (token,))]
        self.db.execute("DELETE FROM reservations WHERE token = ?", (token,))
        self.db.execute("DELETE FROM leases WHERE token = ?", (token,))
        self.db.execute("DELETE FROM members WHERE token = ?", (token,))
        return staging

    def staging_names(self) -> set[str]:
        return {s for (s,) in self.db.execute("SELECT staging FROM reservations")}

    def all_rows(self) -> list[Row]:
        rows = self.db.execute(
            "SELECT name, key, nbytes, written_ns, uses, last_used_ns, doomed_ns FROM entries ORDER BY written_ns"
        ).fetchall()
        return [Row(*r) for r in rows]

    def drop(self, key: str, reason: str) -> None:
        """Remember that a cache let go of `key` at close without writing it here, and why."""
        self.db.execute(
            "INSERT OR REPLACE INTO dropped (key, reason, dropped_ns, pid) VALUES (?, ?, ?, ?)",
            (key, reason, time.time_ns(), os.getpid()),
        )

    def dropped(self, key: str) -> tuple[str, int, int] | None:
        """(reason, when, by which PID) a cache let go of `key` at close, or None."""
        row = self.db.execute("SELECT reason, dropped_ns, pid FROM dropped WHERE key = ?", (key,)).fetchone()
        return (str(row[0]), int(row[1]), int(row[2])) if row else None

    def prune_removed(self) -> None:
        """Keep the last KEEP_REMOVED removals; a member further behind re-reads every entry (Changes.everything)."""
        cutoff = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM removed").fetchone()[0] - KEEP_REMOVED
        if cutoff > 0 and self.db.execute("DELETE FROM removed WHERE seq <= ?", (cutoff,)).rowcount:
            self.db.execute("UPDATE meta SET v = MAX(v, ?) WHERE k = 'pruned_to'", (cutoff,))


def stored_bytes(root: Path) -> int:
    """What the root's index counts now (0 where it has none yet), read without joining: for fitting a budget
    before the cache opens."""
    path = root / "index.sqlite3"
    if not path.is_file():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(db.execute(_TOTAL).fetchone()[0])
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return 0


_OPEN: weakref.WeakSet[RootIndex] = weakref.WeakSet()


class RootIndex:
    """One member's connection to the root's index. Thread-safe: one transaction at a time per member."""

    def __init__(self, root: Path, files: FileOps, *, read_only: bool = False, timeout: float = 0.0) -> None:
        self.root = root
        self.path = root / "index.sqlite3"
        self.read_only = read_only
        self.timeout = timeout
        self._mutex = threading.RLock()
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.members_dir = root / "members"
        self._seq = 0
        self._version = -1
        self._forked = False
        try:
            files.mkdir(self.members_dir, exist_ok=True)
            # The lock first: from the moment this member is listed, others can tell whether it is alive.
            self.lock = MemberLock(self.members_dir / f"{self.token}.lock", files)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            error = StorageError(f"nvme tier: cannot join the root {root}: {describe(exc)}; make the root writable")
            raise caused_by(error, exc) from exc
        try:
            self.db = self._connect()
            with self.transaction() as tx:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        tx.db.execute(statement)
                tx.db.execute(
                    "INSERT OR IGNORE INTO meta (k, v) VALUES ('schema', ?), ('seq', 0), ('pruned_to', 0)",
                    (SCHEMA_VERSION,),
                )
                version = tx.db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()[0]
                if version != SCHEMA_VERSION:
                    raise StorageError(
                        f"nvme tier: {self.path} is index schema {version}; this tiercache reads {SCHEMA_VERSION}. "
                        "Open the root with the tiercache that wrote it, or remove the index (it is rebuilt from "
                        "the entries)"
                    )
                tx.db.execute(
                    "INSERT INTO members (token, pid, host, opened_ns, read_only) VALUES (?, ?, ?, ?, ?)",
                    (self.token, os.getpid(), socket.gethostname(), time.time_ns(), int(read_only)),
                )
        except BaseException:
            self.lock.release()
            with contextlib.suppress(Exception):
                self.db.close()
            raise
        _OPEN.add(self)

    def _check_fork(self) -> None:
        if self._forked:
            raise StorageError(
                f"nvme tier: this cache on {self.root} was opened by the parent of this forked process; a SQLite "
                "connection must not cross a fork: open a new TierCache in the child"
            )

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self.path, timeout=max(self.timeout, 0.0), isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode = WAL")
            # A process crash loses nothing committed in WAL mode; a power loss may lose the last commits, and the
            # index is then rebuilt from the entries' manifests at the next open (every entry is fsynced first).
            db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:
            raise StorageError(
                f"nvme tier: cannot open the index {self.path}: {exc}; if it is damaged, remove it (with every "
                "process on the root closed): it is rebuilt from the entries"
            ) from exc
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction: everything inside commits together or not at all. Waits up to `timeout` seconds
        for another member's transaction, then raises RootInUseError naming the members."""
        with self._mutex:
            self._check_fork()
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise RootInUseError(
                        f"{self.root}: its index stayed locked for {self.timeout:g} s by another process "
                        f"({self._holders()}). Pass TierCache(..., lock_timeout=seconds) to wait longer"
                    ) from exc
                raise StorageError(f"nvme tier: the index {self.path} cannot be written: {exc}") from exc
            try:
                yield Transaction(self.db, self.token)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            try:
                self.db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                with contextlib.suppress(sqlite3.DatabaseError):
                    self.db.execute("ROLLBACK")
                raise StorageError(f"nvme tier: the index {self.path} could not commit: {exc}") from exc

    def _holders(self) -> str:
        names = sorted(self.members_dir.glob("*.lock"))
        return "; ".join(describe_holder(p) for p in names if p.name != f"{self.token}.lock") or "no member listed"

    def changed(self) -> bool:
        """Whether another member committed since the last call (a microsecond check)."""
        with self._mutex:
            self._check_fork()
            version = self.db.execute("PRAGMA data_version").fetchone()[0]
            changed, self._version = version != self._version, version
            return changed

    def changes(self) -> Changes:
        """Entries other members added and removed since the last call (this member's own are included: the
        caller knows them by name and skips them)."""
        with self._mutex:
            self._check_fork()
            db = self.db
            db.execute("BEGIN")  # one snapshot for both queries
            try:
                seq = int(db.execute("SELECT v FROM meta WHERE k = 'seq'").fetchone()[0])
                pruned_to = int(db.execute("SELECT v FROM meta WHERE k = 'pruned_to'").fetchone()[0])
                everything = self._seq == 0 or self._seq < pruned_to
                since = 0 if everything else self._seq
                added = [
                    Row(*r)
                    for r in db.execute(
                        "SELECT name, key, nbytes, written_ns, uses, last_used_ns FROM entries "
                        "WHERE seq > ? AND doomed_ns IS NULL ORDER BY written_ns",
                        (since,),
                    )
                ]
                removed = (
                    [] if everything else [n for (n,) in db.execute("SELECT name FROM removed WHERE seq > ?", (since,))]
                )
            finally:
                db.execute("COMMIT")
            self._seq = seq
            return Changes(added, removed, everything, seq)

    def usage(self, grace_ns: int) -> tuple[int, int]:
        """(bytes counted, of which leaving by themselves within the grace period), in one snapshot."""
        with self._mutex:
            self._check_fork()
            self.db.execute("BEGIN")
            try:
                return Transaction(self.db, self.token).total(), Transaction(self.db, self.token).leaving(grace_ns)[0]
            finally:
                self.db.execute("COMMIT")

    def members(self) -> list[Member]:
        with self.transaction() as tx:
            listed = tx.members()
        return [Member(t, p, h, o, r, alive(self.members_dir / f"{t}.lock")) for t, p, h, o, r in listed]

    def close(self) -> None:
        """Leave the root: this member's leases, reservations and row go (idempotent)."""
        with self._mutex:
            if getattr(self, "_closed", False):
                return
            self._closed = True
            if self._forked:
                return  # the parent's member: the child neither commits for it nor closes its connection
            try:
                with contextlib.suppress(StorageError, sqlite3.DatabaseError), self.transaction() as tx:
                    tx.drop_member(self.token)
                with contextlib.suppress(sqlite3.DatabaseError):
                    self.db.close()
            finally:
                self.lock.release()


def _after_fork_in_child() -> None:
    for index in list(_OPEN):
        index._forked = True
        index._mutex = threading.RLock()  # a parent's thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)
