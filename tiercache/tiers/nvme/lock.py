"""Membership locks: how the processes sharing a root know which of them are alive.

Each open cache holds ROOT/members/<token>.lock with a POSIX record lock (fcntl F_SETLK). The kernel drops the lock
when the process dies, however it dies, so a lock another process can take belongs to a dead member: its leases
and reservations are recovered (index.py). A forked child never holds its parent's record locks, so a worker
forked while a cache was open never keeps a dead parent looking alive (an flock, shared with children through the
open file description, would). Record locks do not tell two caches of one process apart, and closing any
descriptor of a file drops them, so the lock files this process holds are kept in a table, consulted before any
probe opens a file. The holder's PID and host are written into the file for messages.

Every cache also holds a shared record lock on ROOT/.lock (one per process, counted): tiercache 0.1, which opened a
root for one cache only, took that file's lock exclusively, so an old version is refused a root that newer ones
share, and a root an old version holds is refused here, naming its holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
from pathlib import Path

from ...errors import RootInUseError, StorageError, caused_by
from ...io.files import FileOps

FileId = tuple[int, int]  # (st_dev, st_ino): one lock file however its path is spelled (relative, symlinked)
_HELD: dict[FileId, MemberLock] = {}  # this process's lock files
_HELD_LOCK = threading.Lock()  # taken around every acquisition, probe and release
_SHARING: dict[FileId, list[int]] = {}  # ROOT/.lock files this process holds shared: [descriptor, caches using it]
ROOT_LOCK = ".lock"  # the file tiercache 0.1 locked exclusively for its one cache per root


class MemberLock:
    """Holds `path` (created) from construction until `release()`."""

    def __init__(self, path: Path, files: FileOps) -> None:
        self.path = path
        self._files = files
        with _HELD_LOCK:
            try:
                fd = files.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as exc:
                raise caused_by(
                    StorageError(f"nvme tier: cannot create the member lock {path}: {exc}; make the root writable"),
                    exc,
                ) from exc
            try:
                files.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh, unique name: nobody else holds it
                files.ftruncate(fd, 0)
                files.pwritev(fd, [memoryview(f"{os.getpid()} {socket.gethostname()}\n".encode())], 0)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    files.close(fd)
                raise caused_by(
                    StorageError(f"nvme tier: cannot take the member lock {path}: {exc}; check the root"), exc
                ) from exc
            self._fd: int | None = fd
            self._id = _file_id(os.fstat(fd))
            _HELD[self._id] = self

    def release(self) -> None:
        """Let go of the lock and remove its file (idempotent)."""
        with _HELD_LOCK:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            if _HELD.get(self._id) is self:
                del _HELD[self._id]
            with contextlib.suppress(OSError):
                self._files.unlink(self.path, missing_ok=True)  # while still held: nobody probes a half-gone file
            with contextlib.suppress(OSError):  # Linux frees the descriptor, and so the lock, even when close fails
                self._files.close(fd)


class RootShare:
    """A shared record lock on ROOT/.lock from construction until `release()`, counted across this process's caches
    (closing any descriptor of the file would drop the process's lock: it is opened once). A read-only member of a
    root that has no such file and cannot create it holds nothing (no old version has the root either)."""

    def __init__(self, root: Path, files: FileOps, read_only: bool) -> None:
        self.path = root / ROOT_LOCK
        self._id: FileId | None = None
        with _HELD_LOCK:
            with contextlib.suppress(FileNotFoundError):
                held = _file_id(os.stat(self.path))
                if held in _SHARING:
                    _SHARING[held][1] += 1
                    self._id = held
                    return
            try:
                fd = files.open(self.path, os.O_RDONLY if read_only else os.O_CREAT | os.O_RDWR, 0o644)
            except FileNotFoundError:
                if read_only:
                    return
                raise
            except OSError as exc:
                if read_only:
                    return
                raise caused_by(
                    StorageError(f"nvme tier: cannot open {self.path}: {exc}; make the root writable"), exc
                ) from exc
            try:
                files.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    files.close(fd)  # holds no lock of ours: closing it drops nothing
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise RootInUseError(
                        f"{root} is open in an older tiercache (0.1), which keeps a root to one cache: "
                        f"{describe_holder(self.path)} holds {self.path}. Close that cache, or upgrade it to share "
                        "the root"
                    ) from exc
                raise caused_by(
                    StorageError(f"nvme tier: cannot lock {self.path}: {exc}; check the root"), exc
                ) from exc
            self._id = _file_id(os.fstat(fd))
            _SHARING[self._id] = [fd, 1]

    def release(self) -> None:
        """This cache's share of the lock goes; the last one of the process closes the file (idempotent)."""
        with _HELD_LOCK:
            key, self._id = self._id, None
            shared = _SHARING.get(key) if key is not None else None
            if shared is None:
                return
            shared[1] -= 1
            if shared[1] == 0:
                del _SHARING[key]  # type: ignore[arg-type]
                with contextlib.suppress(OSError):
                    os.close(shared[0])


def _file_id(st: os.stat_result) -> FileId:
    return st.st_dev, st.st_ino


def held_here(path: Path) -> bool:
    """Whether this process holds the lock file `path` (one of its caches is that member). Opening such a file,
    even to read it, and closing it would drop that lock: callers check this first."""
    try:
        return _file_id(os.stat(path)) in _HELD
    except OSError:
        return False


def alive(path: Path) -> bool:
    """Whether the member whose lock file is `path` is alive: held by this process, or locked by another. A file
    nobody holds (its process died) or that is gone is a dead member's."""
    with _HELD_LOCK:
        try:
            if _file_id(os.stat(path)) in _HELD:
                return True
            fd = os.open(path, os.O_RDONLY)  # read access suffices for a shared probe, whoever owns the file
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell: never recover the leases of a member that may be alive
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with the holder's exclusive lock
        except OSError:  # EAGAIN / EACCES: its holder is running (or we cannot tell: the same answer)
            return True
        finally:
            os.close(fd)  # not one of ours: closing it drops only the probe's own lock
        return False


def describe_holder(path: Path) -> str:
    """The process a lock file names, and its state, as far as they can be read."""
    if held_here(path):
        return f"another TierCache in this process ({os.getpid()})"
    try:
        fields = path.read_text().split()
        pid, host = int(fields[0]), fields[1] if len(fields) > 1 else ""
    except (OSError, ValueError, IndexError):
        return "a process whose PID is not recorded"
    return f"process {pid}{f' on {host}' if host else ''} ({state(pid)})"


def state(pid: int) -> str:
    """A process's state in words, from /proc where there is one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "no longer running here: on another host, or in another PID namespace"
    except PermissionError:
        return "running as another user"
    try:
        code = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "running"
    return {
        "T": "stopped: resume it with kill -CONT, or end it",
        "t": "stopped by a debugger",
        "Z": "exited, not yet reaped by its parent",
        "D": "waiting on the disk",
    }.get(code, "running")


def _after_fork_in_child() -> None:
    """A child holds no record lock: it forgets the parent's table and closes its copies of the descriptors (which
    drops nothing of the parent's), so that it never passes for the parent's caches."""
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # a thread of the parent may have held it at the fork: it never lets go here
    for lock in _HELD.values():
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD.clear()
    for fd, _ in _SHARING.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _SHARING.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
