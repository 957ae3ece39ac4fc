"""The rules a root is kept by: which members are dead, what a directory in entries/ the index does not list is,
and which rows lost their files (which removed entries' files may go is `Transaction.reapable`). NvmeTier applies
them at open and in every sweep; `tiercache gc` plans with the same functions, reports, and acts on its plan
(tools/root.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...io.files import FileOps
from .format import StoredEntry, parse_group
from .index import Row, Transaction
from .lock import alive


@dataclass(frozen=True)
class DeadMember:
    token: str
    pid: int
    host: str
    opened_ns: int


def dead_members(tx: Transaction, members_dir: Path, own: str) -> list[DeadMember]:
    """Members whose lock another process can take (their process is gone): their leases, reservations and
    staging directories are to be recovered."""
    return [
        DeadMember(token, pid, host, opened)
        for token, pid, host, opened, _ in tx.members()
        if token != own and not alive(members_dir / f"{token}.lock")
    ]


@dataclass(frozen=True)
class Unindexed:
    """A directory in entries/ that the index does not list, as the rules see it: "withdrawn" (no manifest: a
    removal cut short or a write taken back; removed), "unreadable" (its manifest does not verify: never deleted by
    a cache, which skips it; gc verifies it and removes damage), "older" (an older version of a key the index
    lists live: never served; removed), or "new" (a cache indexes it; gc leaves that to the next cache)."""

    name: str
    kind: str
    stored: StoredEntry | None = None
    error: BaseException | None = None


def unindexed(name: str, entries_dir: Path, files: FileOps, tx: Transaction) -> Unindexed:
    """What the directory entries/`name`, which the index does not list, is."""
    path = entries_dir / name
    if files.is_dir(path) and not files.exists(path / "zarr.json"):
        return Unindexed(name, "withdrawn")
    try:
        stored = parse_group(path, files)
    except (OSError, ValueError) as exc:
        return Unindexed(name, "unreadable", error=exc)
    live = tx.live(stored.spec.key)
    if live is not None and live.written_ns >= stored.written_ns:
        return Unindexed(name, "older", stored)
    return Unindexed(name, "new", stored)


def vanished(rows: dict[str, Row], entries_dir: Path, files: FileOps) -> list[Row]:
    """Rows whose directories are gone: forgotten."""
    return [row for name, row in rows.items() if not files.exists(entries_dir / name)]
