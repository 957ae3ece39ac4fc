"""One exception tree. Every error is a `TierCacheError` and also the built-in a caller would catch."""

from __future__ import annotations

from typing import TypeVar


class TierCacheError(Exception):
    """Base of every error tiercache raises."""


class EntryNotFoundError(TierCacheError, KeyError):
    """A key that is not in the cache (a miss)."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it as written
        return str(self.args[0]) if self.args else ""


class EntryTypeError(TierCacheError, TypeError):
    """A key or a tensor of a type the cache cannot store."""


class EntryValueError(TierCacheError, ValueError):
    """A well-typed argument with a value the cache refuses (an empty key, unpin of an unpinned entry, ...)."""


class CapacityError(TierCacheError, MemoryError):
    """An entry that no tier can hold, even after evicting everything evictable."""


class DeviceMemoryError(CapacityError):
    """The device refused memory its tier's budget allowed (a CUDA out-of-memory): the cache demotes and retries,
    then falls back to the next tier, so this reaches a caller only where no tier could take the entry."""


class PolicyError(TierCacheError, ValueError):
    """A policy file or object that is malformed: unknown key, wrong type, bad size."""


class StorageError(TierCacheError, OSError):
    """The nvme tier's files could not be read or written. `errno` is the system call's (ENOSPC, EIO, ...) where
    one failed; the message names the key, the bytes, the path and what to do."""


class CorruptEntryError(StorageError):
    """Stored bytes that fail their checksum or do not match their manifest; never returned as data."""


class RootInUseError(StorageError):
    """Another cache on the same root held its index longer than `lock_timeout`; the message names its PID."""


class CacheClosedError(TierCacheError, RuntimeError):
    """An operation on a cache after `close()`."""


StorageErrorT = TypeVar("StorageErrorT", bound=StorageError)


def caused_by(error: StorageErrorT, cause: BaseException) -> StorageErrorT:
    """`error`, chained to `cause` and keeping its errno (a caller tells ENOSPC from EIO by `error.errno`)."""
    if isinstance(cause, OSError) and cause.errno is not None:
        error.errno = cause.errno
    error.__cause__ = cause
    return error
