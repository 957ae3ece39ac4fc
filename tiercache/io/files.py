"""The system calls of the nvme data path, behind one object: what PosixIO, DiskLayout and the on-disk format call.

`FileOps()` makes the real calls. A subclass overrides the calls it wants to change (a disk that fills up at the
Nth write, an EIO from fsync, a read that waits on an event, a close that fails) and is handed to
`TierCache(files=...)`, which puts it in the `DataPath` its tiers share, or to `PosixIO(files=...)` directly: faults
and delays reach the real code paths without patching module internals.

The calls on descriptors run on the I/O pool's threads, several at once: an override must be thread-safe. They
mirror `os` (same arguments, same errors: OSError with its errno), so an override can call `super()` and a fault
is an `OSError(errno.EIO, ...)` raised where the kernel would raise it. The helpers at the end (small files, a
directory's fsync) are built from those calls, so a fault injected in one reaches them too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

StrPath = str | os.PathLike[str]


class FileOps:
    """The real system calls; subclass to inject faults or delays (see the module's docstring)."""

    # ---- descriptors ------------------------------------------------------------------------------------------
    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        """Read into `buffers` from `offset`; may return fewer bytes than asked (the caller loops), 0 at the end."""
        return os.preadv(fd, buffers, offset)

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        """Write `buffers` at `offset`; may write fewer bytes than given (the caller loops)."""
        return os.pwritev(fd, buffers, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def lockf(self, fd: int, operation: int) -> None:
        """A POSIX record lock on the whole file (fcntl F_SETLK): held by this process, never by its children."""
        fcntl.lockf(fd, operation)

    def fallocate(self, fd: int, length: int) -> bool:
        """Reserve the file's first `length` bytes on the disk (Linux fallocate: a full disk fails here, before a
        byte is written); False where the platform or filesystem cannot (nothing is reserved then)."""
        call = _fallocate()
        if call is None or length <= 0:
            return False
        if call(fd, 0, 0, length) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(code, os.strerror(code))

    # ---- names ------------------------------------------------------------------------------------------------
    def mkdir(self, path: Path, *, parents: bool = False, exist_ok: bool = False) -> None:
        path.mkdir(parents=parents, exist_ok=exist_ok)

    def rename(self, source: StrPath, target: StrPath) -> None:
        os.rename(source, target)

    def stat(self, path: StrPath) -> os.stat_result:
        return os.stat(path)

    def free_bytes(self, path: StrPath) -> int:
        """Bytes an unprivileged writer can still use on the filesystem holding `path` (statvfs)."""
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def listdir(self, path: StrPath) -> list[str]:
        return os.listdir(path)

    def exists(self, path: StrPath) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: StrPath) -> bool:
        return os.path.isdir(path)

    def unlink(self, path: StrPath, *, missing_ok: bool = False) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self, path: StrPath) -> None:
        """Remove a directory and what it holds, as far as possible: what is left is cleared at the next open."""
        shutil.rmtree(path, ignore_errors=True)

    # ---- built from the calls above ---------------------------------------------------------------------------
    def write_bytes(self, path: StrPath, data: bytes, *, sync: bool = True) -> None:
        """Create or replace a small file (metadata) holding `data`; fsync it where `sync`."""
        fd = self.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o666)
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += self.pwritev(fd, [view[done:]], done)
            if sync:
                self.fsync(fd)
        finally:
            self.close(fd)

    def read_bytes(self, path: StrPath) -> bytes:
        """All of a small file (metadata)."""
        fd = self.open(path, os.O_RDONLY)
        try:
            data = bytearray(self.fstat(fd).st_size)
            view = memoryview(data)
            done = 0
            while done < len(view):
                count = self.preadv(fd, [view[done:]], done)
                if count == 0:  # shrank while being read: what is there
                    break
                done += count
            return bytes(view[:done])
        finally:
            self.close(fd)

    def fsync_path(self, path: StrPath) -> None:
        """Make a file's or a directory's contents (a directory's: its names) durable."""
        fd = self.open(path, os.O_RDONLY)
        try:
            self.fsync(fd)
        finally:
            self.close(fd)


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2) (GIL released while it runs), or None off Linux. Not posix_fallocate: glibc emulates that
    by writing a byte per block where the filesystem lacks it, which is slow and fails on O_DIRECT descriptors."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        call = libc.fallocate
    except (OSError, AttributeError, TypeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]
