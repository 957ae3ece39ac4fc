"""An nvme root seen from outside the caches that use it: what `tiercache ls / info / verify / du / stats / gc` read
and do (the command line itself is cli.py).

The read-only commands never join the root. They read the index through a read-only SQLite connection (WAL lets it
read while members commit) in one snapshot, and the entries' files directly, so nothing a member reads changes.
Where no process has the index open, SQLite would create its -wal and -shm files to read it: the file is read as it
is instead (`immutable`), and that read is kept only if no writer came meanwhile.

`gc` joins as a member and makes every decision inside one index write transaction (BEGIN IMMEDIATE), as a member's
open does (NvmeTier._reconcile): no member publishes, removes, leases or recovers meanwhile. Reading every chunk is
too slow to do under that lock (it would make other members' transactions time out), so the chunks are verified
first, without it, and only the entries that failed are verified again under it: an entry's files never change once
published, so one that verifies under the lock is never removed, and one that failed and is still live then is
damaged, not being removed by someone else.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..io.checksum import crc32c_address
from ..io.files import FileOps
from ..io.posix import PosixIO
from ..tiers.nvme import upkeep
from ..tiers.nvme.failures import describe
from ..tiers.nvme.format import CHECKSUM_BYTES, ENTRY_NAME, FORMAT, FORMAT_VERSION, DamagedEntry, parse_group
from ..tiers.nvme.index import SCHEMA_VERSION, Member, RootIndex, Row, Transaction
from ..tiers.nvme.layout import DiskLayout
from ..tiers.nvme.lock import alive
from ..units import format_size
from .progress import Callback

INDEX = "index.sqlite3"
READ_BLOCK = 8 << 20  # bytes one read of a chunk moves while verifying
DEFAULT_GRACE_S = 1.0  # tiers.nvme.removal_grace_s's default: the index does not record the members' own
NO_BUDGET = 2**63 - 1  # gc's capacity as a member: the root's budget is the smallest member's, and gc must not
# lower it for the caches that write while it runs
ORPHAN_LOCK_AGE_S = 60.0  # a lock file no member row names is a dead joiner's only once this old: a joiner creates
# its file before it locks it, and unlinking it in between would make a live member look dead to everyone
DAMAGE_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EIO, errno.EBADMSG, errno.EUCLEAN, errno.ENODATA}

T = TypeVar("T")


class RootError(ValueError):
    """The directory cannot be read as a root: the command exits 2 with this message."""


# ---- the index, read without joining --------------------------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    name: str  # the entry's directory
    token: str  # the member reading it
    count: int


@dataclass(frozen=True)
class Reservation:
    staging: str  # its directory under tmp/
    token: str
    key: str
    nbytes: int


@dataclass(frozen=True)
class Snapshot:
    """The index at one instant, members' liveness probed just after; `indexed` False: read from the manifests
    (the root has no index), so uses, leases and removals are unknown."""

    root: Path
    rows: tuple[Row, ...]
    members: tuple[Member, ...] = ()
    leases: tuple[Lease, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    indexed: bool = True
    counted: int | None = None  # the bytes the root's budget counts now, by the index's own rule (Transaction.total)
    budget: int | None = None  # the root's budget: the smallest capacity of the members open on it
    capacities: dict[str, int] = field(default_factory=dict)  # each member's own capacity, by token

    @property
    def live(self) -> list[Row]:
        return sorted((r for r in self.rows if r.doomed_ns is None), key=lambda r: r.key)

    @property
    def removed(self) -> list[Row]:
        return [r for r in self.rows if r.doomed_ns is not None]

    def member(self, token: str) -> Member | None:
        return next((m for m in self.members if m.token == token), None)

    def leases_of(self, name: str) -> list[Lease]:
        """The leases on an entry held by live members (a dead member's stay in the index until recovered)."""
        living = {m.token for m in self.members if m.alive}
        return [lease for lease in self.leases if lease.name == name and lease.token in living]


def require_root(root: Path) -> None:
    if not root.exists():
        raise RootError(f"{root}: no such directory")
    if not root.is_dir():
        raise RootError(f"{root}: not a directory")


def no_index(root: Path) -> RootError:
    return RootError(
        f"{root} has no index ({root / INDEX} is missing): it is not a tiercache root, or its index was lost (the "
        "first TierCache to open it rebuilds the index from the entries)"
    )


def read_snapshot(root: Path, *, from_manifests: bool = False) -> Snapshot:
    """The index of `root`, read-only; where it has none, the entries' manifests if `from_manifests`, else RootError."""
    require_root(root)
    if (root / INDEX).is_file():
        return read_index(root, lambda tx: _snapshot(root, tx))
    if from_manifests and (root / "entries").is_dir():
        return _from_manifests(root)
    raise no_index(root)


def read_index(root: Path, read: Callable[[Transaction], T]) -> T:
    """`read` run on one read-only snapshot of the index (a Transaction for its SELECTs only)."""
    path = root / INDEX
    wal = path.with_name(INDEX + "-wal")
    try:
        if not wal.exists():
            # Nobody has the index open. Read the file as it is (SQLite would otherwise create -wal and -shm), and
            # keep that read only if no writer came meanwhile: it would have made a -wal, or changed the file.
            before = _stamp(path)
            with contextlib.suppress(sqlite3.DatabaseError):
                result = _read(path, "immutable=1", read)
                if not wal.exists() and _stamp(path) == before:
                    return result
        return _read(path, "mode=ro", read)
    except sqlite3.DatabaseError as exc:
        raise RootError(f"{path} cannot be read as a tiercache index: {exc}") from exc


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read(path: Path, options: str, read: Callable[[Transaction], T]) -> T:
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?{options}"  # a '?', '#' or '%' in the path stays a path
    db = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)
    try:
        db.execute("BEGIN")  # one snapshot for every query; closing the connection ends it
        found = db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
        if found is None or found[0] != SCHEMA_VERSION:
            raise RootError(
                f"{path} is index schema {found[0] if found else 'unknown'}; this tiercache reads "
                f"{SCHEMA_VERSION}: use the tiercache that wrote it"
            )
        return read(Transaction(db, ""))
    finally:
        db.close()


def _leases(tx: Transaction) -> list[Lease]:
    return [Lease(*r) for r in tx.db.execute("SELECT name, token, count FROM leases ORDER BY name, token")]


def _reservations(tx: Transaction) -> list[Reservation]:
    return [Reservation(*r) for r in tx.db.execute("SELECT staging, token, key, nbytes FROM reservations")]


def _snapshot(root: Path, tx: Transaction) -> Snapshot:
    members = [Member(t, p, h, o, r, alive(root / "members" / f"{t}.lock")) for t, p, h, o, r in tx.members()]
    counted = budget = None
    capacities: dict[str, int] = {}
    with contextlib.suppress(sqlite3.Error, TypeError):  # figures an index of an older layout may lack
        counted, budget = tx.total(), tx.budget()
        capacities = {t: int(c) for t, c in tx.db.execute("SELECT token, capacity FROM members")}
    return Snapshot(
        root,
        tuple(tx.all_rows()),
        tuple(members),
        tuple(_leases(tx)),
        tuple(_reservations(tx)),
        counted=counted,
        budget=budget,
        capacities=capacities,
    )


def _from_manifests(root: Path) -> Snapshot:
    """What a cache opening the root would index: every entry whose manifest verifies, the newest of each key."""
    newest: dict[str, Row] = {}
    for name in entry_names(root):
        with contextlib.suppress(OSError, ValueError):
            stored = parse_group(root / "entries" / name, FileOps())
            key = stored.spec.key
            if key not in newest or newest[key].written_ns < stored.written_ns:
                newest[key] = Row(name, key, stored.spec.nbytes, stored.written_ns, 0, stored.written_ns)
    return Snapshot(root, tuple(newest.values()), indexed=False)


def entry_names(root: Path) -> list[str]:
    """The <H>-<U> directories of entries/ (empty where it is missing)."""
    try:
        names = os.listdir(root / "entries")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if ENTRY_NAME.fullmatch(n) and (root / "entries" / n).is_dir())


# ---- verifying an entry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One entry directory verified: its problems (none: it verifies); `damaged` when they are damage (gc may
    remove it) rather than a read refused (EACCES) or a manifest of another format version."""

    name: str
    key: str | None  # None where neither the index nor the manifest gives it
    nbytes: int
    tensors: int | None
    problems: tuple[str, ...] = ()
    damaged: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def is_damage(exc: OSError) -> bool:
    return exc.errno in DAMAGE_ERRNOS


def other_version(path: Path) -> bool:
    """Whether entries/<name>/zarr.json is a tiercache manifest of another format version (never deleted)."""
    try:
        manifest = json.loads((path / "zarr.json").read_bytes())["attributes"]["tiercache"]
        return bool(manifest["format"] == FORMAT and manifest["version"] != FORMAT_VERSION)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify_entry(
    root: Path,
    name: str,
    key: str | None = None,
    advance: Callable[[int], None] = lambda n: None,
    chunks: bool = True,
) -> Check:
    """Read every chunk of entries/<name>: each CRC32C must equal its file's trailer and the manifest's, and the
    manifest its seal (parse_group). `advance` is told the bytes as they are read. `chunks` False: the manifest
    only (its seal, key and chunk sizes), no chunk read."""
    path = root / "entries" / name
    files = FileOps()
    try:
        stored = parse_group(path, files)
    except DamagedEntry as exc:
        return Check(name, key, 0, None, (f"manifest: {exc}",), damaged=not other_version(path))
    except OSError as exc:
        return Check(name, key, 0, None, (f"manifest: {describe(exc)}",), damaged=is_damage(exc))
    problems: list[str] = []
    damaged = False
    for index, tspec in enumerate(stored.spec.tensors):
        if not (tspec.nbytes and chunks):
            continue
        chunk = stored.chunk_files[index]
        try:
            computed, trailer = _crc_file(chunk, tspec.nbytes, files, advance)
        except DamagedEntry as exc:
            problems.append(f"tensor {tspec.name!r}: {exc}")
            damaged = True
            continue
        except OSError as exc:
            problems.append(f"tensor {tspec.name!r}: {describe(exc)}")
            damaged = damaged or is_damage(exc)
            continue
        expected = stored.checksums[index]
        if computed != trailer or computed != expected:
            problems.append(
                f"tensor {tspec.name!r} in {chunk} fails its checksum (computed crc32c {computed:#010x}, file says "
                f"{trailer:#010x}, manifest says {expected:#010x})"
            )
            damaged = True
    return Check(name, stored.spec.key, stored.spec.nbytes, len(stored.spec.tensors), tuple(problems), damaged)


def _crc_file(path: str, nbytes: int, files: FileOps, advance: Callable[[int], None]) -> tuple[int, int]:
    """(CRC32C of the first `nbytes`, the CRC stored after them) of a chunk file, read a block at a time."""
    fd = files.open(path, os.O_RDONLY)
    try:
        size = files.fstat(fd).st_size
        if size != nbytes + CHECKSUM_BYTES:
            raise DamagedEntry(f"{path} holds {size} bytes, the manifest says {nbytes + CHECKSUM_BYTES}")
        view = memoryview(bytearray(min(READ_BLOCK, nbytes)))
        crc = offset = 0
        while offset < nbytes:
            got = files.preadv(fd, [view[: min(len(view), nbytes - offset)]], offset)
            if got == 0:
                raise DamagedEntry(f"{path} ended at {offset} bytes while being read")
            crc = crc32c_address(view, got, crc)
            offset += got
            advance(got)
        tail = bytearray(CHECKSUM_BYTES)
        if files.preadv(fd, [memoryview(tail)], nbytes) != CHECKSUM_BYTES:
            raise DamagedEntry(f"{path} has no complete CRC32C after its data")
        return crc, int.from_bytes(tail, "little")
    finally:
        files.close(fd)


def verify_entries(
    root: Path, targets: list[tuple[str, str | None, int]], progress: Callback, jobs: int = 4, chunks: bool = True
) -> list[Check]:
    """Verify entries (name, key, payload bytes) `jobs` at a time (the reads and the CRC release the GIL); the bar
    counts payload bytes, an entry that fails early counted whole."""
    progress.set_size(sum(nbytes for _, _, nbytes in targets))
    lock = threading.Lock()

    def one(target: tuple[str, str | None, int]) -> Check:
        name, key, nbytes = target
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            with lock:
                progress.relative_update(count)

        check = verify_entry(root, name, key, advance, chunks)
        if nbytes > done:
            with lock:
                progress.relative_update(nbytes - done)
        return check

    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="tiercache-verify") as pool:
        return list(pool.map(one, targets))


def unindexed(root: Path, snapshot: Snapshot) -> list[str]:
    """Directories of entries/ the index has no row for (`tiercache gc` says what becomes of them)."""
    names = {r.name for r in snapshot.rows}
    return [n for n in entry_names(root) if n not in names]


# ---- sizes and times ------------------------------------------------------------------------------------------
def tree_bytes(path: Path) -> tuple[int, int]:
    """(apparent, allocated) bytes of the files under `path` (or of `path`); what vanishes meanwhile counts 0."""
    try:
        st = path.lstat()
    except OSError:
        return 0, 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size, st.st_blocks * 512
    apparent = allocated = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            a, b = tree_bytes(Path(entry.path))
            apparent, allocated = apparent + a, allocated + b
    return apparent, allocated


def when(ns: int) -> str:
    """A local time to the second, and how long ago."""
    stamp = datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="seconds")
    return f"{stamp} ({ago(ns)} ago)"


def ago(ns: int) -> str:
    seconds = max(0.0, time.time() - ns / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def show_key(key: str) -> str:
    """A key as it can be printed on one line: itself, or its repr where it has control or edge spaces."""
    return key if key and key.isprintable() and key.strip() == key else repr(key)


# ---- ls, info, stats, du --------------------------------------------------------------------------------------
def listing(snapshot: Snapshot) -> list[dict[str, Any]]:
    """One object per live entry, sorted by key (`tiercache ls --json`)."""
    now = time.time_ns()
    entries = []
    for row in snapshot.live:
        try:
            tensors: int | None = len(parse_group(snapshot.root / "entries" / row.name, FileOps()).spec.tensors)
        except (OSError, ValueError):  # damaged, or removed since the snapshot
            tensors = None
        leases = sum(lease.count for lease in snapshot.leases_of(row.name))
        entries.append(
            {
                "key": row.key,
                "name": row.name,
                "nbytes": row.nbytes,
                "tensors": tensors,
                "written_ns": row.written_ns,
                "age_s": round(max(0, now - row.written_ns) / 1e9, 3),
                "uses": row.uses if snapshot.indexed else None,
                "last_used_ns": row.last_used_ns if snapshot.indexed else None,
                "leases": leases if snapshot.indexed else None,
                "leased": leases > 0 if snapshot.indexed else None,
            }
        )
    return entries


def format_listing(entries: list[dict[str, Any]]) -> str:
    def cell(value: object) -> str:
        return "-" if value is None else str(value)

    rows = [("SIZE", "TENSORS", "AGE", "USES", "LEASED", "KEY")]
    for e in entries:
        leased = None if e["leased"] is None else ("yes" if e["leased"] else "no")
        age = ago(e["written_ns"])
        rows.append(
            (format_size(e["nbytes"]), cell(e["tensors"]), age, cell(e["uses"]), cell(leased), show_key(e["key"]))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows)


def entry_info(snapshot: Snapshot, key: str) -> dict[str, Any] | None:
    """Everything about the live entry of `key` (None: no such entry), its manifest read from its directory."""
    row = next((r for r in snapshot.live if r.key == key), None)
    if row is None:
        return None
    path = snapshot.root / "entries" / row.name
    info: dict[str, Any] = {
        "key": row.key,
        "name": row.name,
        "directory": str(path),
        "written_ns": row.written_ns,
        "nbytes": row.nbytes,
        "uses": row.uses if snapshot.indexed else None,
        "last_used_ns": row.last_used_ns if snapshot.indexed else None,
        "leases": [_lease_info(snapshot, lease) for lease in snapshot.leases if lease.name == row.name],
        "tensors": None,
        "problem": None,
    }
    try:
        stored = parse_group(path, FileOps())
    except (OSError, ValueError) as exc:
        info["problem"] = f"its manifest cannot be read: {describe(exc)}"
        return info
    info["tensors"] = [
        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "crc32c": crc}
        for t, crc in zip(stored.spec.tensors, stored.checksums, strict=True)
    ]
    return info


def _lease_info(snapshot: Snapshot, lease: Lease) -> dict[str, Any]:
    member = snapshot.member(lease.token)
    return {
        "token": lease.token,
        "count": lease.count,
        "pid": member.pid if member else None,
        "host": member.host if member else None,
        "alive": bool(member and member.alive),
    }


def format_info(info: dict[str, Any]) -> str:
    size = f"{format_size(info['nbytes'])} ({info['nbytes']} bytes)"
    lines = [
        f"key        {show_key(info['key'])}",
        f"directory  {info['directory']}",
        f"written    {when(info['written_ns'])}",
        f"size       {size}" + (f" in {len(info['tensors'])} tensor(s)" if info["tensors"] is not None else ""),
    ]
    if info["uses"] is None:
        lines.append("uses       unknown (no index)")
    else:
        lines.append(f"uses       {info['uses']}, last used {when(info['last_used_ns'])}")
    leases = [
        f"process {lease['pid']} on {lease['host']} x{lease['count']} ({'alive' if lease['alive'] else 'dead'})"
        for lease in info["leases"]
    ]
    lines.append(f"leases     {'; '.join(leases) or 'none'}")
    if info["problem"]:
        lines.append(f"problem    {info['problem']}")
    else:
        lines.append("tensors:")
        table = [("NAME", "DTYPE", "SHAPE", "BYTES", "CRC32C")]
        for t in info["tensors"]:
            crc = "-" if t["crc32c"] is None else f"{t['crc32c']:#010x}"
            table.append((show_key(t["name"]), t["dtype"], str(tuple(t["shape"])), str(t["nbytes"]), crc))
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines)


def root_stats(snapshot: Snapshot) -> dict[str, Any]:
    """Who uses the root now and what it holds (`tiercache stats`)."""
    live, removed = snapshot.live, snapshot.removed
    names = {r.name: r.key for r in snapshot.rows}

    def pid(token: str) -> int | None:
        member = snapshot.member(token)
        return member.pid if member else None

    return {
        "root": str(snapshot.root),
        "members": [
            {
                "token": m.token,
                "pid": m.pid,
                "host": m.host,
                "opened_ns": m.opened_ns,
                "read_only": m.read_only,
                "alive": m.alive,
                "capacity": snapshot.capacities.get(m.token),
            }
            for m in sorted(snapshot.members, key=lambda m: m.opened_ns)
        ],
        "counted": snapshot.counted,
        "budget": snapshot.budget,
        "leases": [
            {"key": names.get(lease.name), **_lease_info(snapshot, lease), "name": lease.name}
            for lease in snapshot.leases
        ],
        "reservations": [
            {"key": r.key, "nbytes": r.nbytes, "staging": r.staging, "token": r.token, "pid": pid(r.token)}
            for r in snapshot.reservations
        ],
        "entries": {"count": len(live), "nbytes": sum(r.nbytes for r in live)},
        "removed": {"count": len(removed), "nbytes": sum(r.nbytes for r in removed)},
        "uses": sum(r.uses for r in snapshot.rows),
    }


def format_stats(stats: dict[str, Any]) -> str:
    entries, removed = stats["entries"], stats["removed"]
    alive_count = sum(m["alive"] for m in stats["members"])
    lines = [
        f"root {stats['root']}",
        f"entries       {entries['count']} ({format_size(entries['nbytes'])}), {stats['uses']} use(s) in all",
        f"removed       {removed['count']} not yet swept ({format_size(removed['nbytes'])})",
        f"members       {len(stats['members'])} listed, {alive_count} alive",
    ]
    for m in stats["members"]:
        mode = "read-only" if m["read_only"] else "read-write"
        state = "alive" if m["alive"] else "dead (recovered by the next member's sweep, or tiercache gc)"
        capacity = "" if m["capacity"] is None else f", capacity {format_size(m['capacity'])}"
        lines.append(f"  process {m['pid']} on {m['host']}, {mode}{capacity}, opened {when(m['opened_ns'])}: {state}")
    lines.append(f"leases        {len(stats['leases'])}")
    for lease in stats["leases"]:
        key = "?" if lease["key"] is None else show_key(lease["key"])
        lines.append(f"  {key} read by process {lease['pid']} x{lease['count']}{'' if lease['alive'] else ' (dead)'}")
    lines.append(f"reservations  {len(stats['reservations'])} (writes in progress)")
    for r in stats["reservations"]:
        lines.append(f"  {show_key(r['key'])}: {format_size(r['nbytes'])} by process {r['pid']} (tmp/{r['staging']})")
    if stats["counted"] is not None:
        lines.append(f"counted       {format_size(stats['counted'])} against the shared budget")
    lines.append(_budget_line(stats["budget"]))
    return "\n".join(lines)


USAGE_PARTS = ("live", "removed", "unindexed", "tmp", "trash", "index", "members", "other")


def disk_usage(snapshot: Snapshot) -> dict[str, Any]:
    """Bytes by what holds them (`tiercache du`): every file under the root lands in exactly one part, so the
    parts' `files` add up to the total; `payload` is what the index counts (tensor bytes, no metadata)."""
    root = snapshot.root
    state = {r.name: ("live" if r.doomed_ns is None else "removed") for r in snapshot.rows}
    parts: dict[str, dict[str, int]] = {p: {"count": 0, "files": 0, "allocated": 0} for p in USAGE_PARTS}

    def add(part: str, path: Path, counted: bool = True) -> None:
        apparent, allocated = tree_bytes(path)
        parts[part]["count"] += counted
        parts[part]["files"] += apparent
        parts[part]["allocated"] += allocated

    with contextlib.suppress(FileNotFoundError):
        for top in sorted(os.listdir(root)):
            path = root / top
            if top == "entries" and path.is_dir():
                for name in sorted(os.listdir(path)):
                    if ENTRY_NAME.fullmatch(name) and (path / name).is_dir():
                        add(state.get(name, "unindexed"), path / name)
                    else:
                        add("other", path / name, counted=False)  # entries/zarr.json
            elif top in ("tmp", "trash", "members") and path.is_dir():
                for name in os.listdir(path):
                    add(top, path / name)
            elif top.startswith(INDEX):
                add("index", path, counted=False)
            else:
                add("other", path, counted=False)
    for part, rows in (("live", snapshot.live), ("removed", snapshot.removed)):
        parts[part]["payload"] = sum(r.nbytes for r in rows)
    reserved = sum(r.nbytes for r in snapshot.reservations)
    return {
        "root": str(root),
        "indexed": snapshot.indexed,
        **parts,
        "reservations": {"count": len(snapshot.reservations), "payload": reserved},
        "total": {
            "files": sum(p["files"] for p in parts.values()),
            "allocated": sum(p["allocated"] for p in parts.values()),
        },
        # The index's own figures (index.py says what counts); without an index, the live payload.
        "counted": snapshot.counted if snapshot.indexed else parts["live"]["payload"],
        "budget": snapshot.budget,
    }


def format_usage(usage: dict[str, Any]) -> str:
    labels = {
        "live": "live entries",
        "removed": "removed, not yet swept",
        "unindexed": "entries/ not in the index",
        "tmp": "tmp/ (writes in progress)",
        "trash": "trash/",
        "index": "index",
        "members": "members/ (lock files)",
        "other": "other",
    }
    lines = [f"root {usage['root']}" + ("" if usage["indexed"] else " (no index: read from the manifests)")]
    for part, label in labels.items():
        p = usage[part]
        count = str(p["count"]) if part not in ("index", "other") else ""
        payload = f"payload {format_size(p['payload'])}" if "payload" in p else ""
        lines.append(f"  {label:<27}{count:>6}  {payload:<18}  files {format_size(p['files'])}")
    r = usage["reservations"]
    lines.append(f"  {'reservations':<27}{r['count']:>6}  payload {format_size(r['payload']):<10}  (their files: tmp/)")
    total = usage["total"]
    lines.append(
        f"  {'total on disk':<27}{'':>6}  {'':<18}  files {format_size(total['files'])} "
        f"({total['files']} bytes; {format_size(total['allocated'])} allocated)"
    )
    if usage["counted"] is not None:
        lines.append(f"counted against the shared budget: {format_size(usage['counted'])} ({usage['counted']} bytes)")
    lines.append(_budget_line(usage["budget"]))
    return "\n".join(lines)


def _budget_line(budget: int | None) -> str:
    if budget is None:
        return "the root's budget: none now (no cache is open on it)"
    return f"the root's budget: {format_size(budget)} (the smallest tiers.nvme.capacity of the caches open on it)"


# ---- gc -------------------------------------------------------------------------------------------------------
@dataclass
class Action:
    """One thing gc removes: `kind` is member, lock, removed, damaged, withdrawn, older, forget, tmp or trash."""

    kind: str
    path: Path | None
    nbytes: int  # bytes of files it frees
    why: str
    name: str = ""  # the entry directory, member token or staging directory it acts on
    key: str | None = None
    indexed: bool = False  # a damaged entry the index lists (doomed first, so every member stops serving it)
    leased: bool = False  # ... and a live member is reading it: its files go once the read ends
    error: str | None = None  # why it could not be done


@dataclass
class GcPlan:
    actions: list[Action] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # what gc leaves, and why
    dry_run: bool = True

    @property
    def freed(self) -> int:
        return sum(a.nbytes for a in self.actions if a.error is None and not a.leased)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def plan_gc(
    tx: Transaction,
    root: Path,
    own: str,
    suspects: dict[str, Check],
    grace_ns: int,
    recheck: Callable[[str, str | None], Check],
) -> GcPlan:
    """What gc removes, decided from one snapshot of the index (a write transaction in a real run: nothing changes
    before `apply_gc` acts on it). `suspects`: entries that failed verification before; `recheck` verifies one
    again. The rules are NvmeTier's, from the same functions (tiers/nvme/upkeep.py: dead members, removed entries
    whose files may go, what an unindexed directory is), plus removing what does not verify."""
    entries_dir, members_dir = root / "entries", root / "members"
    plan = GcPlan()
    tokens = {m[0] for m in tx.members()}
    dead = {m.token: m for m in upkeep.dead_members(tx, members_dir, own)}
    leases = _leases(tx)
    reservations = _reservations(tx)
    for member in dead.values():
        lock = members_dir / f"{member.token}.lock"
        held = sum(1 for lease in leases if lease.token == member.token)
        reserved = sum(1 for r in reservations if r.token == member.token)
        why = (
            f"dead member: process {member.pid} on {member.host}, opened {when(member.opened_ns)}: {held} lease(s), "
            f"{reserved} reservation(s)"
        )
        plan.actions.append(Action("member", lock, tree_bytes(lock)[0], why, name=member.token))
    for file in _listdir(members_dir):
        path = members_dir / file
        if file.endswith(".lock") and file[:-5] not in tokens and not alive(path):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime >= ORPHAN_LOCK_AGE_S:
                    why = "a lock file no member names (a process that died joining or leaving)"
                    plan.actions.append(Action("lock", path, tree_bytes(path)[0], why, name=file[:-5]))

    reading = {lease.name for lease in leases if lease.token not in dead}
    # A live write's staging name in entries/ is one whose commit failed, being taken back by its writer.
    writing = {r.staging for r in reservations if r.token not in dead}
    rows = {r.name: r for r in tx.all_rows()}
    reap = {r.name for r in tx.reapable(grace_ns, ignoring=dead)}  # the dead's leases go in this transaction
    acted: set[str] = set()
    for row in rows.values():
        if row.doomed_ns is None:
            continue
        path = entries_dir / row.name
        if row.name in reap:
            why = f"removed {ago(row.doomed_ns)} ago, nobody reads it"
            plan.actions.append(Action("removed", path, tree_bytes(path)[0], why, name=row.name, key=row.key))
            acted.add(row.name)
        elif path.exists():
            why = "being read by a live member" if row.name in reading else "inside its grace period"
            plan.kept.append((path, f"key {row.key!r}: removed, {why}: its files go by themselves"))

    for name in entry_names(root):
        path = entries_dir / name
        listed = rows.get(name)
        if listed is None and name in writing:
            plan.kept.append((path, "a write whose commit failed, being taken back by its writer"))
            continue
        if listed is not None:
            if listed.doomed_ns is None and name in suspects:
                _damaged(plan, recheck(name, listed.key), path, indexed=True, leased=name in reading)
            continue
        found = upkeep.unindexed(name, entries_dir, FileOps(), tx)
        if found.kind == "withdrawn":
            why = "a directory without its manifest (a removal cut short, or a write taken back)"
            plan.actions.append(Action("withdrawn", path, tree_bytes(path)[0], why, name=name))
            continue
        if found.kind == "unreadable":
            _damaged(plan, recheck(name, None), path, indexed=False, leased=False)
            continue
        assert found.stored is not None
        key = found.stored.spec.key
        if found.kind == "older":
            why = f"key {key!r}: an older version the index does not list, never served"
            plan.actions.append(Action("older", path, tree_bytes(path)[0], why, name=name, key=key))
        elif name in suspects:
            _damaged(plan, recheck(name, key), path, indexed=False, leased=False)
        else:
            plan.kept.append((path, f"key {key!r}: not in the index (the next cache to open the root adds it)"))

    for row in upkeep.vanished(rows, entries_dir, FileOps()):
        if row.name not in acted:
            why = f"key {row.key!r}: indexed{' (removed)' if row.doomed_ns else ''} but its files are gone"
            plan.actions.append(Action("forget", None, 0, why, name=row.name, key=row.key))

    staging = {r.staging: r.token for r in reservations}
    for name in _listdir(root / "tmp"):
        owner = staging.get(name)
        if owner is None or owner in dead:
            path = root / "tmp" / name
            why = (
                f"a write of dead process {dead[owner].pid}"
                if owner
                else "a staging directory no write in progress names"
            )
            plan.actions.append(Action("tmp", path, tree_bytes(path)[0], why, name=name))
    for name in _listdir(root / "trash"):
        path = root / "trash" / name
        plan.actions.append(
            Action(
                "trash",
                path,
                tree_bytes(path)[0],
                "in trash/ (a removal's files on their way out, or left by one cut short)",
                name=name,
            )
        )
    return plan


def _damaged(plan: GcPlan, check: Check, path: Path, *, indexed: bool, leased: bool) -> None:
    """Remove an entry that does not verify (checked again now); keep one that does, or whose fault is no damage."""
    key = f"key {check.key!r}" if check.key is not None else "an entry"
    if check.ok:
        plan.kept.append((path, f"{key}: verifies now (a read of it failed before)"))
        return
    problems = "; ".join(check.problems)
    if not check.damaged:
        plan.kept.append((path, f"{key}: {problems}: not damage, never deleted"))
        return
    why = f"{key}{'' if indexed else ' (not indexed)'} does not verify: {problems}"
    plan.actions.append(
        Action("damaged", path, tree_bytes(path)[0], why, name=path.name, key=check.key, indexed=indexed, leased=leased)
    )


def apply_gc(plan: GcPlan, tx: Transaction, layout: DiskLayout) -> list[Path]:
    """Act on the plan inside the transaction that made it; returns the directories renamed into trash/, whose
    files the caller deletes after the commit (no member waits on the lock for that)."""
    files = layout.files
    trashed: list[Path] = []

    def trash(name: str) -> None:
        target = layout.to_trash(name)
        if target is not None:
            trashed.append(target)

    for action in plan.actions:
        try:
            if action.kind == "member":
                tx.drop_member(action.name)  # its staging directories are "tmp" actions
                assert action.path is not None
                files.unlink(action.path, missing_ok=True)
            elif action.kind == "lock":
                assert action.path is not None
                if not alive(action.path):
                    files.unlink(action.path, missing_ok=True)
            elif action.kind == "removed":
                try:
                    trash(action.name)
                except OSError:
                    tx.stuck(action.name)  # counted against the budget until a sweep manages (as NvmeTier._sweep)
                    raise
                tx.forget(action.name)
            elif action.kind == "damaged" and action.indexed:
                # Every member stops serving it, learning so from the index's log; "evict": only this copy is bad,
                # so the members keep what their memory tiers hold of the key.
                tx.doom(action.name, "evict")
                _unpublish(action.path, files)
                if not action.leased:
                    trash(action.name)
                    tx.forget(action.name)
            elif action.kind in ("damaged", "withdrawn", "older"):
                trash(action.name)
            elif action.kind == "forget":
                tx.forget(action.name)
            elif action.kind == "tmp":
                assert action.path is not None
                target = layout.trash_dir / action.name
                try:
                    files.rename(action.path, target)
                    trashed.append(target)
                except OSError:  # trash/ holds that name already: delete it in place
                    files.remove_tree(action.path)
        except OSError as exc:  # left for the next sweep or gc; counted as not freed
            action.error = describe(exc)
    tx.prune_removed()
    return trashed


def _unpublish(path: Path | None, files: FileOps) -> None:
    """Unlink an entry's metadata, the group's first, so that a zarr reader opening it fails from now on."""
    if path is None:
        return
    for meta in [path / "zarr.json", *sorted(path.glob("t*/zarr.json"))]:
        with contextlib.suppress(OSError):
            files.unlink(meta, missing_ok=True)


def collect_garbage(
    root: Path,
    *,
    dry_run: bool,
    grace_s: float = DEFAULT_GRACE_S,
    lock_timeout: float = 30.0,
    jobs: int = 4,
    progress: Callback | None = None,
    chunks: bool = True,
) -> GcPlan:
    """`tiercache gc`: verify every entry (no lock held), then plan and act in one index write transaction as a
    member; `dry_run` plans from a read-only snapshot and changes nothing. `chunks` False: damage is found from the
    manifests only (verify_entry)."""
    require_root(root)
    if not (root / INDEX).is_file():
        raise no_index(root)
    grace_ns = int(grace_s * 1e9)
    snapshot = read_snapshot(root)
    targets: list[tuple[str, str | None, int]] = [(r.name, r.key, r.nbytes) for r in snapshot.live]
    targets += [(n, None, 0) for n in unindexed(root, snapshot) if (root / "entries" / n / "zarr.json").exists()]
    checks = verify_entries(root, targets, progress or Callback(), jobs, chunks)
    suspects = {c.name: c for c in checks if not c.ok}

    def recheck(name: str, key: str | None) -> Check:
        # A dry run takes what the verification found; a real run verifies again, under the lock.
        return suspects[name] if dry_run and name in suspects else verify_entry(root, name, key, chunks=chunks)

    if dry_run:
        return read_index(root, lambda tx: plan_gc(tx, root, "", suspects, grace_ns, recheck))

    files = FileOps()
    index = RootIndex(root, files, capacity=NO_BUDGET, timeout=lock_timeout)
    try:
        io = PosixIO(root, threads=1, task_size=1 << 20, io="buffered", files=files)
        try:
            layout = DiskLayout(root, io, files=files)
            try:
                with index.transaction() as tx:
                    plan = plan_gc(tx, root, index.token, suspects, grace_ns, recheck)
                    trashed = apply_gc(plan, tx, layout)
                plan.dry_run = False
                for target in trashed:
                    layout.discard(target)
                layout.clear(layout.trash_dir)  # what other removals left; one running now ignores a file gone
            finally:
                layout.close()
        finally:
            io.close()
    finally:
        index.close()
    return plan


def format_gc(plan: GcPlan) -> str:
    verb = "would remove" if plan.dry_run else "removed"
    lines = []
    done = [a for a in plan.actions if a.error is None]
    failed = [a for a in plan.actions if a.error is not None]
    for a in done:
        where = str(a.path) if a.path is not None else f"index row {a.name}"
        later = " (out of the index now; its files go once the read in progress ends)" if a.leased else ""
        kind = f"[{a.kind}]"
        lines.append(f"{verb} {kind:<11} {format_size(a.nbytes):>10}  {where}: {a.why}{later}")
    for a in failed:
        lines.append(f"could not remove {a.kind} {a.path}: {a.error} (left for the next sweep)")
    for path, why in plan.kept:
        lines.append(f"kept {path}: {why}")
    total = f"{len(done)} item(s), {format_size(plan.freed)} ({plan.freed} bytes)"
    lines.append(f"{'dry run: would free' if plan.dry_run else 'freed'} {total}" if done else "nothing to remove")
    return "\n".join(lines)


def gc_json(plan: GcPlan) -> dict[str, Any]:
    return {
        "dry_run": plan.dry_run,
        "freed": plan.freed,
        "actions": [
            {
                "kind": a.kind,
                "path": None if a.path is None else str(a.path),
                "nbytes": a.nbytes,
                "why": a.why,
                "name": a.name,
                "key": a.key,
                "leased": a.leased,
                "error": a.error,
            }
            for a in plan.actions
        ],
        "kept": [{"path": str(path), "why": why} for path, why in plan.kept],
    }
