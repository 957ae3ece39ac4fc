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
import mmap
import os
import random
import socket
import sqlite3
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import RootInUseError, StorageError, caused_by
from ...io.files import FileOps
from .failures import describe
from .lock import MemberLock, RootShare, alive, describe_holder

SCHEMA_VERSION = 2  # 2: removals say why, members their capacity, removed entries may be stuck, dropped keys
KEEP_REMOVED = 100_000  # rows of `removed` kept for members catching up; one further behind re-reads every entry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    name TEXT PRIMARY KEY, key TEXT NOT NULL, nbytes INTEGER NOT NULL, written_ns INTEGER NOT NULL,
    seq INTEGER NOT NULL, doomed_ns INTEGER, uses INTEGER NOT NULL DEFAULT 0, last_used_ns INTEGER NOT NULL,
    stuck INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_version ON entries (key) WHERE doomed_ns IS NULL;
CREATE INDEX IF NOT EXISTS entries_by_seq ON entries (seq);
CREATE INDEX IF NOT EXISTS entries_removed ON entries (doomed_ns) WHERE doomed_ns IS NOT NULL;
CREATE TABLE IF NOT EXISTS removed (seq INTEGER PRIMARY KEY, name TEXT NOT NULL, why TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    token TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, opened_ns INTEGER NOT NULL,
    read_only INTEGER NOT NULL, capacity INTEGER NOT NULL
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

# Bytes the budget counts: live entries (a running total in meta, kept by the transactions that change it, so that
# no call sums every row), removed ones a member still reads or whose files the disk refused to remove (`stuck`),
# and writes in progress. A removed
# entry nobody reads is on its way out: its files go at the next sweep after its grace period (for zarr readers),
# so the disk may hold more than the budget by what was removed in the last grace period.
_TOTAL = """
SELECT (SELECT v FROM meta WHERE k = 'live_bytes')
     + (SELECT COALESCE(SUM(nbytes), 0) FROM entries e WHERE doomed_ns IS NOT NULL
            AND (stuck OR EXISTS (SELECT 1 FROM leases l WHERE l.name = e.name)))
     + (SELECT COALESCE(SUM(nbytes), 0) FROM reservations)
"""
# The root's budget: the smallest of the open writing members' (each member's puts also keep within its own).
_BUDGET = "SELECT MIN(capacity) FROM members WHERE read_only = 0"  # a reader writes nothing: no say in it


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
    removed: list[tuple[str, str]]  # (directory name, why: "delete", "evict" or "replace")
    everything: bool
    seq: int


class Busy(StorageError):
    """Another member holds the index's write lock right now (a transaction that was asked not to wait)."""


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

    def budget(self) -> int | None:
        value = self.db.execute(_BUDGET).fetchone()[0]
        return None if value is None else int(value)

    def set_capacity(self, capacity: int) -> None:
        self.db.execute("UPDATE members SET capacity = ? WHERE token = ?", (capacity, self.token))

    def _add_live(self, nbytes: int) -> None:
        self.db.execute("UPDATE meta SET v = v + ? WHERE k = 'live_bytes'", (nbytes,))

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

    def insert(self, name: str, key: str, nbytes: int, written_ns: int) -> bool:
        """Index an entry (its reservation, if any, is the caller's to cancel) and mark the live version of its key
        replaced; True. Where that live version was written later (`written_ns`: a version's own time, kept through
        demotions), the new row is the one superseded: indexed as removed at once, never served; False."""
        older = self.live(key)
        superseded = older is not None and older.written_ns > written_ns
        now = time.time_ns()
        if superseded:
            self.db.execute(
                "INSERT INTO entries (name, key, nbytes, written_ns, seq, last_used_ns, doomed_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, key, nbytes, written_ns, self._next_seq(), now, now),
            )
            return False
        if older is not None:
            self.doom(older.name, "replace")
        self.db.execute("DELETE FROM dropped WHERE key = ?", (key,))
        self.db.execute(
            "INSERT INTO entries (name, key, nbytes, written_ns, seq, last_used_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (name, key, nbytes, written_ns, self._next_seq(), now),
        )
        self._add_live(nbytes)
        return True

    def doom(self, name: str, why: str) -> bool:
        """Mark an entry removed (hidden from every member; its files stay while leased), `why` being "delete",
        "evict" or "replace" (other members drop their memory copies of a deleted key). False if it was not live."""
        row = self.db.execute(
            "UPDATE entries SET doomed_ns = ? WHERE name = ? AND doomed_ns IS NULL RETURNING nbytes",
            (time.time_ns(), name),
        ).fetchone()
        if row is None:
            return False
        self._add_live(-int(row[0]))
        self.db.execute("INSERT INTO removed (seq, name, why) VALUES (?, ?, ?)", (self._next_seq(), name, why))
        return True

    def revive(self, name: str) -> bool:
        """Make a replaced entry live again (the put that replaced it failed), unless its key has another live version
        or its row is gone; a new sequence number, so that members that saw it leave see it again."""
        row = self.db.execute(
            "UPDATE entries SET doomed_ns = NULL, seq = ? WHERE name = ? AND doomed_ns IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM entries l WHERE l.key = entries.key AND l.doomed_ns IS NULL) RETURNING nbytes",
            (self._next_seq(), name),
        ).fetchone()
        if row is None:
            return False
        self._add_live(int(row[0]))
        return True

    def stuck(self, name: str) -> None:
        """The disk refused to remove a removed entry's files: they count against the budget until a sweep succeeds."""
        self.db.execute("UPDATE entries SET stuck = 1 WHERE name = ?", (name,))

    def forget(self, name: str) -> None:
        """Drop an entry's row (its files are gone, or never were)."""
        row = self.db.execute("DELETE FROM entries WHERE name = ? RETURNING nbytes, doomed_ns", (name,)).fetchone()
        if row is not None and row[1] is None:  # a live row (its directory vanished): tell the members too
            self._add_live(-int(row[0]))
            self.db.execute("INSERT INTO removed (seq, name, why) VALUES (?, ?, 'delete')", (self._next_seq(), name))
        self.db.execute("DELETE FROM leases WHERE name = ?", (name,))

    def lease(self, name: str) -> bool:
        """Start a read of a live entry: its files stay until `unlease`. False if it is no longer live, unless this
        member holds a lease on it already (a stream reading it tensor by tensor keeps it to the end)."""
        cursor = self.db.execute(
            "UPDATE entries SET uses = uses + 1, last_used_ns = ? WHERE name = ? AND (doomed_ns IS NULL OR EXISTS "
            "(SELECT 1 FROM leases l WHERE l.name = entries.name AND l.token = ?))",
            (time.time_ns(), name, self.token),
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

    def reapable(self, grace_ns: int, ignoring: Collection[str] = ()) -> list[Row]:
        """Doomed entries nobody reads, removed at least `grace_ns` ago: their files may go. Leases of the members
        in `ignoring` (dead ones, recovered in the same transaction) do not count."""
        tokens = list(ignoring)
        rows = self.db.execute(
            "SELECT name, key, nbytes, written_ns, uses, last_used_ns, doomed_ns FROM entries e "
            "WHERE doomed_ns IS NOT NULL AND doomed_ns <= ? "
            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.name = e.name "
            f"AND l.token NOT IN ({', '.join('?' * len(tokens))}))",
            (time.time_ns() - grace_ns, *tokens),
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
    try:  # immutable: an estimate, read without creating the -wal and -shm files of a root nobody has open
        db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1", uri=True, timeout=1.0)
        try:
            return int(db.execute(_TOTAL).fetchone()[0])
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return 0


_OPEN: weakref.WeakSet[RootIndex] = weakref.WeakSet()
FALLBACK_S = 2.0  # how stale a member may be about a commit whose signal never came (its process killed in between)


class ChangeSignal:
    """8 bytes in ROOT/index.sqlite3-signal that a member rewrites with a fresh random value after each commit that
    changed the index, mapped into every member's memory: "nobody committed since I looked" is one memory read, with no
    system call, no GIL handoff and no SQLite, whose reads waited up to ~100 ms behind a busy disk's queue during a
    1 GiB demotion. PRAGMA data_version stays the authority: it is asked when the value moved and at least every
    FALLBACK_S. None of it where the file cannot be mapped (a read-only root without it): data_version each time."""

    def __init__(self, path: Path, read_only: bool) -> None:
        self._map: mmap.mmap | None = None
        self._writable = not read_only
        try:
            fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            if not read_only and os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8, access=mmap.ACCESS_READ if read_only else mmap.ACCESS_WRITE)
        except (OSError, ValueError):
            self._map = None
        finally:
            os.close(fd)

    def value(self) -> bytes | None:
        return self._map[:8] if self._map is not None else None

    def signal(self) -> bytes | None:
        """Move the value; returns the one it held just before (None: no signal here)."""
        if self._map is None or not self._writable:
            return None
        before = self._map[:8]
        self._map[:8] = random.getrandbits(64).to_bytes(8, "little")  # one aligned 8-byte store
        return before

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class RootIndex:
    """One member's connection to the root's index. Thread-safe: one transaction at a time per member."""

    def __init__(
        self, root: Path, files: FileOps, *, capacity: int, read_only: bool = False, timeout: float = 0.0
    ) -> None:
        """Join the root as a member whose nvme budget is `capacity` (the root's budget is the smallest member's)."""
        self.root = root
        self.path = root / "index.sqlite3"
        self.read_only = read_only
        self.timeout = timeout
        self._mutex = threading.RLock()
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.members_dir = root / "members"
        self._seq: int | None = None  # the log position this member has applied (None: it has not looked yet)
        self._version = -1
        self._signal = ChangeSignal(root / "index.sqlite3-signal", read_only)
        self._changes_before = 0  # total_changes when the transaction in progress began
        self._signalled: bytes | None = None  # the signal's value when data_version was last asked
        self._asked = 0.0  # when that was (monotonic)
        self._forked = False
        self.share = RootShare(root, files, read_only)  # an old tiercache's exclusive open is refused, and refuses
        try:
            files.mkdir(self.members_dir, exist_ok=True)
            # The lock first: from the moment this member is listed, others can tell whether it is alive.
            self.lock = MemberLock(self.members_dir / f"{self.token}.lock", files)
        except OSError as exc:
            self.share.release()
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
                    "INSERT OR IGNORE INTO meta (k, v) VALUES ('schema', ?), ('seq', 0), ('pruned_to', 0), "
                    "('live_bytes', 0)",
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
                    "INSERT INTO members (token, pid, host, opened_ns, read_only, capacity) VALUES (?, ?, ?, ?, ?, ?)",
                    (self.token, os.getpid(), socket.gethostname(), time.time_ns(), int(read_only), capacity),
                )
        except BaseException:
            self.lock.release()
            self.share.release()
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
    def transaction(self, *, wait: bool = True) -> Iterator[Transaction]:
        """One write transaction: everything inside commits together or not at all. Waits up to `timeout` seconds
        for another member's transaction, then raises RootInUseError naming the members; with `wait` False, raises
        Busy at once instead (for work that can be left to the next call). Every SQLite error is a StorageError."""
        with self._mutex:
            self._check_fork()
            try:
                if not wait:
                    self.db.execute("PRAGMA busy_timeout = 0")
                try:
                    self.db.execute("BEGIN IMMEDIATE")
                    self._changes_before = self.db.total_changes
                finally:
                    if not wait:
                        self.db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    if not wait:
                        raise Busy(str(exc)) from exc
                    raise RootInUseError(
                        f"{self.root}: its index stayed locked for {self.timeout:g} s by another cache "
                        f"({self._holders()}). Pass TierCache(..., lock_timeout=seconds) to wait longer"
                    ) from exc
                raise StorageError(f"nvme tier: the index {self.path} cannot be written: {exc}") from exc
            except sqlite3.Error as exc:
                raise StorageError(f"nvme tier: the index {self.path} cannot be written: {exc}") from exc
            try:
                yield Transaction(self.db, self.token)
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back by itself (FULL, IOERR)
                    self.db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"nvme tier: the index {self.path} failed: {exc}") from exc
                raise
            try:
                changes = self.db.total_changes
                self.db.execute("COMMIT")
                if changes != self._changes_before:
                    before = self._signal.signal()
                    if before is not None and before == self._signalled:  # only ours since we last asked SQLite
                        self._signalled = self._signal.value()
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise StorageError(f"nvme tier: the index {self.path} could not commit: {exc}") from exc

    def _holders(self) -> str:
        names = sorted(self.members_dir.glob("*.lock"))  # describe_holder never opens one this process holds
        return "; ".join(describe_holder(p) for p in names if p.name != f"{self.token}.lock") or "no member listed"

    def changed(self) -> bool:
        """Whether another member committed since the last call: a memory read while the change signal stands
        still (see ChangeSignal), else PRAGMA data_version (a microsecond check while the disk is idle). A commit of
        ours that found the signal where we last saw it moves our mark with it: SQLite would not count it."""
        self._check_fork()
        signalled, now = self._signal.value(), time.monotonic()
        if signalled is not None and signalled == self._signalled and now - self._asked < FALLBACK_S:
            return False
        with self._mutex:
            self._check_fork()
            version = self.db.execute("PRAGMA data_version").fetchone()[0]
            changed, self._version = version != self._version, version
            self._signalled, self._asked = signalled, now
            return changed

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Transaction]:
        """A read transaction: one consistent view, taken without the write lock (WAL readers never wait for a
        writer). Only reads may run inside. Every SQLite error is a StorageError."""
        with self._mutex:
            self._check_fork()
            try:
                self.db.execute("BEGIN")
                try:
                    yield Transaction(self.db, self.token)
                finally:
                    self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"nvme tier: the index {self.path} cannot be read: {exc}") from exc

    def changes(self) -> Changes:
        """Entries other members added and removed since the last call (this member's own are included: the
        caller knows them by name and skips them)."""
        with self.snapshot() as tx:
            db = tx.db
            seq = int(db.execute("SELECT v FROM meta WHERE k = 'seq'").fetchone()[0])
            pruned_to = int(db.execute("SELECT v FROM meta WHERE k = 'pruned_to'").fetchone()[0])
            everything = self._seq is None or self._seq < pruned_to
            since = 0 if self._seq is None or everything else self._seq
            added = [
                Row(*r)
                for r in db.execute(
                    "SELECT name, key, nbytes, written_ns, uses, last_used_ns FROM entries "
                    "WHERE seq > ? AND doomed_ns IS NULL ORDER BY written_ns",
                    (since,),
                )
            ]
            removed: list[tuple[str, str]] = (
                []
                if everything
                else [(n, w) for n, w in db.execute("SELECT name, why FROM removed WHERE seq > ?", (since,))]
            )
            self._seq = seq
            return Changes(added, removed, everything, seq)

    def usage(self) -> tuple[int, int | None]:
        """(bytes the budget counts, the root's budget), in one snapshot."""
        with self.snapshot() as tx:
            return tx.total(), tx.budget()

    def members(self) -> list[Member]:
        with self.snapshot() as tx:
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
                self._signal.close()
                self.lock.release()
                self.share.release()


def _after_fork_in_child() -> None:
    for index in list(_OPEN):
        index._forked = True
        index._mutex = threading.RLock()  # a parent's thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)
