"""Disks that misbehave: subclasses of tiercache's FileOps (the nvme data path's system calls) that inject faults
and delays, handed to TierCache(files=...) or PosixIO(files=...). Each starts healthy; a test turns its fault on
once the setup it needs is written. Calls arrive from the I/O pool's threads: state is kept under a lock."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence

from tiercache.io import FileOps
from tiercache.io.files import StrPath
from tiercache.io.posix import O_DIRECT


def os_error(code: int, detail: str) -> OSError:
    """The OSError the kernel's `code` would raise, its message marked as injected."""
    return OSError(code, f"{os.strerror(code)} (injected: {detail})")


class FillingDisk(FileOps):
    """A disk that fills up: after fill(after=n), the write n + 1 from then on and every later one raise ENOSPC,
    metadata and data alike, until free()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left: int | None = None  # writes that still fit; None: not full
        self.refused = 0

    def fill(self, after: int = 0) -> None:
        with self._lock:
            self._left = after

    def free(self) -> None:
        with self._lock:
            self._left = None

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        with self._lock:
            if self._left is not None:
                if self._left == 0:
                    self.refused += 1
                    raise os_error(errno.ENOSPC, "the disk filled up")
                self._left -= 1
        return super().pwritev(fd, buffers, offset)


class FailingReads(FileOps):
    """A drive whose reads fail with EIO while `failing` is set."""

    def __init__(self) -> None:
        self.failing = threading.Event()

    def preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        if self.failing.is_set():
            raise os_error(errno.EIO, "a media error")
        return super().preadv(fd, buffers, offset)


class FailingFsync(FileOps):
    """A drive that reports EIO from fsync (the writes it had accepted were lost) while `failing` is set."""

    def __init__(self) -> None:
        self.failing = threading.Event()

    def fsync(self, fd: int) -> None:
        if self.failing.is_set():
            raise os_error(errno.EIO, "fsync lost the writes")
        super().fsync(fd)


class FailingClose(FileOps):
    """close() reports EIO while `failing` is set (as NFS may, for writes it deferred); the descriptor is released
    all the same, as Linux releases it."""

    def __init__(self) -> None:
        self.failing = threading.Event()

    def close(self, fd: int) -> None:
        super().close(fd)
        if self.failing.is_set():
            raise os_error(errno.EIO, "close reported a deferred write error")


class SlowReads(FileOps):
    """Reads that wait: each read sets `reading`, then waits for `go` before it touches the file; `closed_under_a_read`
    lists the descriptors found closed once it may go on (the bug these reads are slowed to catch)."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.go = threading.Event()
        self.closed_under_a_read: list[int] = []

    def preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        self.reading.set()
        if not self.go.wait(timeout=60):
            raise TimeoutError("SlowReads: the test never let the read go on")
        try:
            os.fstat(fd)
        except OSError:
            self.closed_under_a_read.append(fd)
        return super().preadv(fd, buffers, offset)


class NoDirectIO(FileOps):
    """A filesystem that refuses O_DIRECT, as tmpfs on older kernels, FUSE and some network filesystems do."""

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        if O_DIRECT and flags & O_DIRECT:
            raise os_error(errno.EINVAL, "this filesystem has no O_DIRECT")
        return super().open(path, flags, mode)


class CreationLog(FileOps):
    """The real calls, remembering every path opened with O_CREAT."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT:
            self.created.append(str(path))
        return super().open(path, flags, mode)


class UnlistableDisk(FileOps):
    """A directory listing that fails with EIO while `failing` is set."""

    def __init__(self) -> None:
        self.failing = threading.Event()

    def listdir(self, path: StrPath) -> list[str]:
        if self.failing.is_set():
            raise os_error(errno.EIO, "cannot list entries")
        return super().listdir(path)


class FaultAt(FileOps):
    """Counts every system call the nvme path makes; once armed with arm(nth), the call `nth` (0-based, counted
    from arming) raises OSError(`code`) and later calls go through. `calls` after a disarmed run says how many
    injection points an operation has; `failed` names the call that was failed."""

    CALLS = (
        "open", "close", "fstat", "preadv", "pwritev", "ftruncate", "fsync", "lockf", "fallocate",
        "mkdir", "rename", "listdir", "unlink", "stat", "free_bytes",
    )  # fmt: skip

    def __init__(self, code: int = errno.EIO) -> None:
        self._lock = threading.Lock()
        self.code = code
        self.calls = 0
        self._nth: int | None = None
        self.failed: str | None = None

    def arm(self, nth: int | None) -> None:
        """Fail the `nth` call from now (None: count only)."""
        with self._lock:
            self.calls = 0
            self._nth = nth
            self.failed = None

    def _tick(self, name: str) -> bool:
        with self._lock:
            hit = self._nth is not None and self.calls == self._nth
            self.calls += 1
            if hit:
                self.failed = name
        return hit

    def __getattribute__(self, name: str):  # type: ignore[no-untyped-def]
        call = super().__getattribute__(name)
        if name not in FaultAt.CALLS:
            return call

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            if not self._tick(name):
                return call(*args, **kwargs)
            error = os_error(self.code, f"call {self._nth} ({name})")
            if name == "close":  # Linux releases the descriptor even when close reports an error
                call(*args, **kwargs)
            raise error

        return counted


class HeldRemoval(FileOps):
    """A disk whose removal of trashed entries' files waits until `release()` (or 10 s): what a slow unlink of a
    large entry looks like to whoever runs it."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.held: list[str] = []

    def release(self) -> None:
        self.released.set()

    def remove_tree(self, path: StrPath) -> None:
        if os.path.basename(os.path.dirname(path)) == "trash":
            self.held.append(os.fspath(path))
            self.released.wait(10)
        super().remove_tree(path)
