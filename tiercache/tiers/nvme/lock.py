"""The root's lock: one open cache per root, across threads and processes, that no forked child keeps.

`flock` on ROOT/.lock, held by an open file description of this process: a second cache on the same root, in this
process or another, is refused with `RootInUseError` naming the holder's PID (written into the file), and the
kernel releases it when the holder dies, so a dead holder's lock is simply taken. Fork shares the description,
which would leave a closed root locked by every worker forked while it was open: each child closes its copies at
once (`os.register_at_fork`); exec'd children never have them (Python opens descriptors close-on-exec).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import weakref
from pathlib import Path

from ...errors import RootInUseError, StorageError, caused_by
from ...io.files import FileOps

POLL_S = 0.05  # how often a waiting open tries the lock again


class RootLock:
    """Holds ROOT/.lock from construction until `release()`; waits up to `timeout` seconds for another holder."""

    def __init__(self, root: Path, files: FileOps, *, timeout: float = 0.0) -> None:
        self.path = root / ".lock"
        self._files = files
        try:
            fd = files.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise caused_by(
                StorageError(f"nvme tier: cannot open the root's lock {self.path}: {exc}; make {root} writable"), exc
            ) from exc
        try:
            self._take(fd, timeout)
            holder = f"{os.getpid()} {socket.gethostname()}\n".encode()
            files.ftruncate(fd, 0)
            files.pwritev(fd, [memoryview(holder)], 0)
        except BaseException as exc:
            files.close(fd)  # whatever stopped the lock, the descriptor does not outlive it
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise caused_by(
                    StorageError(f"nvme tier: cannot take the root's lock {self.path}: {exc}; check {root}"), exc
                ) from exc
            raise
        self._fd: int | None = fd
        with _HELD_LOCK:
            _HELD.add(self)

    def _take(self, fd: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._files.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RootInUseError(self._held_by(timeout)) from None
                time.sleep(min(POLL_S, left))

    def _held_by(self, timeout: float) -> str:
        root = self.path.parent
        waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
        pid, host = _holder(self.path)
        if pid is None:
            who = "another TierCache (its PID is not recorded)"
        elif pid == os.getpid() and host == socket.gethostname():
            who = "another TierCache in this process"
        else:
            who = f"process {pid}{f' on {host}' if host else ''} ({_state(pid)})"
        return (
            f"{root} is already open{waited}: {who} holds {self.path}. Close that cache (or end the process), pass "
            "TierCache(..., lock_timeout=seconds) to wait for it, or give this cache a different root="
        )

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        with _HELD_LOCK:
            _HELD.discard(self)
            fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):  # Linux frees the descriptor, and so the lock, even when close fails
                self._files.close(fd)

    def _drop_in_child(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # the child's reference only; the parent still holds the lock


def _holder(path: Path) -> tuple[int | None, str]:
    """The PID and host written into a lock file by its holder, as far as they can be read."""
    try:
        fields = path.read_text().split()
        return int(fields[0]), fields[1] if len(fields) > 1 else ""
    except (OSError, ValueError, IndexError):
        return None, ""


def _state(pid: int) -> str:
    """A process's state in words, from /proc where there is one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "no longer running; a process it forked, or one sharing its descriptor, still holds the lock"
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


_HELD: weakref.WeakSet[RootLock] = weakref.WeakSet()
_HELD_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # a thread of the parent may have held it at the fork: it never lets go here
    for lock in list(_HELD):
        lock._drop_in_child()
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
