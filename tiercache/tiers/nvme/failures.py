"""What a failed disk operation tells its caller: one StorageError (or CorruptEntryError) naming the entry's key,
its bytes, the path the system call failed on and what to do, with the call's errno kept."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from ...errors import CorruptEntryError, StorageError, caused_by
from ...units import format_size

FULL = {errno.ENOSPC, errno.EDQUOT}
DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def fix_for(code: int | None, root: Path) -> str:
    """What an operator does about a disk error of errno `code` under `root`."""
    if code in FULL:
        return f"free space on the filesystem of {root}, or lower tiers.nvme.capacity below its free space"
    if code in DENIED:
        return f"make {root} writable by this user (or mount it read-write), or open the cache on another root"
    if code == errno.EIO:
        return "the drive reported an I/O error: check the kernel log (dmesg) and the drive's health"
    return f"check the filesystem of {root}"


def describe(exc: BaseException) -> str:
    """An OSError as words, with the path the kernel reported where it reported one."""
    if isinstance(exc, OSError) and not isinstance(exc, StorageError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    return str(exc)


PREFIX = "nvme tier: "  # how the errors built here begin


def disk_error(
    action: str,
    root: Path,
    path: Path,
    exc: BaseException,
    key: str | None = None,
    nbytes: int = 0,
    *,
    outcome: str = "Nothing stored was changed",
) -> StorageError:
    """The StorageError for `action` ("writing", "removing", ...) of entry `key` (None: of the root itself)
    failing at `path` with `exc`; `outcome` says what the failure left."""
    code = exc.errno if isinstance(exc, OSError) else None
    name = errno.errorcode.get(code, "") if code is not None else ""
    what = f"entry {key!r} ({format_size(nbytes)})" if key is not None else "the root"
    return caused_by(
        StorageError(
            f"{PREFIX}{action} {what} at {path} failed: {describe(exc)}{f' [{name}]' if name else ''}; "
            f"{fix_for(code, root)}. {outcome}."
        ),
        exc,
    )


def corrupt(key: str, nbytes: int, path: Path, exc: BaseException) -> CorruptEntryError:
    return caused_by(
        CorruptEntryError(
            f"nvme tier: entry {key!r} ({format_size(nbytes)}) is damaged at {path}: {describe(exc)}; the data was "
            "not returned. Delete the entry and put it again."
        ),
        exc,
    )


@contextlib.contextmanager
def disk_errors(
    action: str, root: Path, path: Path, key: str | None = None, nbytes: int = 0, *, reading: bool = False
) -> Iterator[None]:
    """Raise every OSError of the block as one StorageError naming the entry (see disk_error). For a read
    (`reading`), a chunk that is missing, truncated or extended is a CorruptEntryError naming the key."""
    try:
        yield
    except CorruptEntryError as exc:
        if key is None or f"{key!r}" in str(exc):
            raise
        raise corrupt(key, nbytes, path, exc) from exc
    except OSError as exc:
        if isinstance(exc, StorageError) and str(exc).startswith(PREFIX):  # already this error, whole
            raise
        if reading and key is not None and exc.errno == errno.ENOENT:
            raise corrupt(key, nbytes, path, exc) from exc
        raise disk_error(action, root, path, exc, key, nbytes) from exc
