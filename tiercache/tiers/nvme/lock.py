"""The root's lock: one open cache per root, across threads and processes, that no forked child holds.

A POSIX record lock (fcntl F_SETLK) on ROOT/.lock keeps other processes out. It belongs to this process: the
kernel drops it when the process dies (a dead holder's lock is simply taken) and a forked child never has it, so
workers forked while a root was open cannot keep it locked after the parent closes it (an flock, shared with
children through the open file description, would). Record locks do not tell two caches of one process apart,
and closing any descriptor of the file drops them, so caches of this process find each other in a table of the
lock files held here, before anything opens the file. The holder's PID and host are written into it for the
message of whoever is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

from ...errors import RootInUseError, StorageError, caused_by
from ...io.files import FileOps

POLL_S = 0.05  # how often a waiting open tries the lock again

FileId = tuple[int, int]  # (st_dev, st_ino) of a lock file: one root however its path is spelled
_HELD: dict[FileId, RootLock] = {}  # the lock files this process holds
_HELD_LOCK = threading.Lock()  # taken around every acquisition and release


class RootLock:
    """Holds ROOT/.lock from construction until `release()`; waits up to `timeout` seconds for another holder."""

    def __init__(self, root: Path, files: FileOps, *, timeout: float = 0.0) -> None:
        self.path = root / ".lock"
        self._files = files
        self._fd: int | None = None
        deadline = time.monotonic() + timeout
        while True:
            with _HELD_LOCK:
                refusal = self._try()
            if refusal is None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
                raise RootInUseError(f"{root} is already open{waited}: {refusal} holds {self.path}. " + _FIX)
            time.sleep(min(POLL_S, left))

    def _try(self) -> str | None:
        """Take the lock (None), or say who holds it. Runs under _HELD_LOCK."""
        files = self._files
        with contextlib.suppress(FileNotFoundError):  # no file yet: nobody holds it
            if _file_id(os.stat(self.path)) in _HELD:  # opening the file would drop that cache's lock: never
                return "another TierCache in this process"
        try:
            fd = files.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise caused_by(
                StorageError(f"nvme tier: cannot open the root's lock {self.path}: {exc}; make the root writable"),
                exc,
            ) from exc
        try:
            try:
                files.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: another process holds it
                files.close(fd)  # holds no lock of ours: closing it drops nothing
                return _describe_holder(self.path)
            holder = f"{os.getpid()} {socket.gethostname()}\n".encode()
            files.ftruncate(fd, 0)
            files.pwritev(fd, [memoryview(holder)], 0)
            key = _file_id(files.fstat(fd))
        except BaseException as exc:
            with contextlib.suppress(OSError):
                files.close(fd)  # whatever stopped the lock, the descriptor does not outlive it
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise caused_by(
                    StorageError(f"nvme tier: cannot take the root's lock {self.path}: {exc}; check the root"), exc
                ) from exc
            raise
        self._fd, self._key = fd, key
        _HELD[key] = self
        return None

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        with _HELD_LOCK:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            if _HELD.get(self._key) is self:
                del _HELD[self._key]
            with contextlib.suppress(OSError):  # Linux frees the descriptor, and so the lock, even when close fails
                self._files.close(fd)


_FIX = (
    "Close that cache (or end the process), pass TierCache(..., lock_timeout=seconds) to wait for it, or give this "
    "cache a different root="
)


def _file_id(st: os.stat_result) -> FileId:
    return st.st_dev, st.st_ino


def _describe_holder(path: Path) -> str:
    """The process another process's lock file names, and its state, as far as they can be read."""
    try:
        fields = path.read_text().split()  # not our lock: reading it (open, close) drops nothing of ours
        pid, host = int(fields[0]), fields[1] if len(fields) > 1 else ""
    except (OSError, ValueError, IndexError):
        return "another process (its PID is not recorded)"
    return f"process {pid}{f' on {host}' if host else ''} ({_state(pid)})"


def _state(pid: int) -> str:
    """A process's state in words, from /proc where there is one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "no longer running here: on another host, or in another PID namespace"
    except PermissionError:
        return "running as another user"
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "running"
    return {
        "T": "stopped: resume it with kill -CONT, or end it",
        "t": "stopped by a debugger",
        "Z": "exited, not yet reaped by its parent",
        "D": "waiting on the disk",
    }.get(state, "running")


def _after_fork_in_child() -> None:
    """A child holds no record lock: it forgets the parent's table (and its descriptors) so that it can open a
    root the parent has closed, and is refused, naming the parent, one the parent holds."""
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # a thread of the parent may have held it at the fork: it never lets go here
    for lock in _HELD.values():
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # the child's copy; closing it drops nothing of the parent's
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
