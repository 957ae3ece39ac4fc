"""A writer process for background writes (demotions, flushes, write-behind): disk work with no share of our GIL.

On a machine with few cores, any thread of ours that writes (even one keeping several requests in flight) hands
the GIL back and forth with the caller's hot loop at every system call: CPython lets a thread that releases and
retakes the GIL often starve one that waits for it, so either the hot gets lag or the write crawls. A process of
its own does the writing: it copies the bytes straight out of our tensors (process_vm_readv: no shared allocation
needed), checksums them, writes and fsyncs, and answers once per request, while the thread that asked waits with
the GIL released. The child's program is writer_child.py; it imports nothing of tiercache.

One child serves the whole process (`WriterProcess.attach()`, counted; the last `detach` ends it): a Yama ptrace
policy lets one process read ours, and background writes to one disk gain nothing from two writers. Each request's
exchange (send, then read the answer) runs on a thread of the writer's own, which no Ctrl-C reaches, so a request
and its answer never come apart; the caller waits for it through interrupts and raises the interrupt after.

Where the child cannot run or cannot read our memory (not Linux, a ptrace policy that forbids it, a child that
dies before answering MAX_LOSSES times in a row), the request raises WriterGone and `usable` turns False: the
caller writes in-process, as it does for every write when faults or delays are injected through its own FileOps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import subprocess
import sys
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from ..errors import StorageError
from .posix import wait_through_interrupts

log = logging.getLogger(__name__)

_PROGRAM = Path(__file__).with_name("writer_child.py")
PR_SET_PTRACER = 0x59616D61  # Yama: let this PID read our memory (ptrace_scope 1 allows only our ancestors)
MAX_LOSSES = 3  # children lost in a row before answering: the writer is turned off


class WriterGone(StorageError):
    """The writer process ended, or cannot read our memory; the caller writes this request itself."""


class WriterProcess:
    """One child process that performs lists of file steps (writer_child.py's), one request at a time.
    Thread-safe; the child starts at the first request (a forked process of ours starts its own: the parent's
    reads the parent's memory); `close` ends it."""

    _shared: ClassVar[WriterProcess | None] = None
    _users: ClassVar[int] = 0
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._exchanger: ThreadPoolExecutor | None = None
        self._losses = 0
        self.answered = 0  # requests the child answered, for stats and tests
        self.usable = sys.platform == "linux"
        self.why_not: str | None = None if self.usable else "the writer process needs Linux (process_vm_readv)"
        _WRITERS.add(self)

    @classmethod
    def attach(cls) -> WriterProcess:
        """The process's writer, counted until `detach`."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            cls._users += 1
            return cls._shared

    def detach(self) -> None:
        """One user of the process's writer is done; the last ends its child."""
        cls = type(self)
        with cls._shared_lock:
            if cls._shared is not self or cls._users == 0:
                return
            cls._users -= 1
            if cls._users:
                return
            cls._shared = None
        self.close()

    @property
    def pid(self) -> int | None:
        """The running child's process ID; None before the first request and after close."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def run(self, steps: list[dict[str, Any]]) -> list[int]:
        """Do `steps` in the child; returns the CRC32C of each chunk step. A step's failure raises its OSError
        (errno, strerror and the path as the child saw them); WriterGone when the child could not do it at all.
        The memory that chunk steps name must stay alive and unchanged until this returns (it does, Ctrl-C or
        not: an interrupt is raised once the child has answered)."""
        request = (json.dumps(steps) + "\n").encode()
        with self._lock:
            if not self.usable:
                raise WriterGone(f"the writer process is off: {self.why_not}")
            child = self._started()
            if self._exchanger is None:
                self._exchanger = ThreadPoolExecutor(1, thread_name_prefix="tiercache-writer")
            exchange: Future[dict[str, Any] | str] = self._exchanger.submit(_exchange, child, request)
            interrupted = wait_through_interrupts([exchange])
            answer = exchange.result()
            if isinstance(answer, str):  # the child is gone, or said something that is no answer
                self._lose(child, answer)
            else:
                self._losses = 0
                self.answered += 1
        if interrupted is not None:
            raise interrupted
        if isinstance(answer, str):
            raise WriterGone(f"the writer process was lost: {answer}")
        if "error" not in answer:
            return [int(crc) for crc in answer["crc32c"]]
        error = answer["error"]
        if error["memory"]:
            self.usable = False
            self.why_not = f"it cannot read this process's memory: {error['strerror']}"
            log.info("tiercache: background writes stay in this process: %s", self.why_not)
            raise WriterGone(f"the writer process is off: {self.why_not}")
        raise OSError(error["errno"], error["strerror"], error["filename"])

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen(
                [sys.executable, "-P", str(_PROGRAM), str(os.getpid())],  # -P: its folder is not on sys.path
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
            with contextlib.suppress(OSError, AttributeError):  # no Yama (EINVAL) or no libc: nothing to allow
                ctypes.CDLL(None).prctl(PR_SET_PTRACER, self._child.pid, 0, 0, 0)
        return self._child

    def _lose(self, child: subprocess.Popen[bytes], why: str) -> None:
        """The child is gone mid-request, or out of step: end it (nothing it does lands after this returns); the
        next request starts a new one, unless MAX_LOSSES in a row say it cannot run here."""
        self._child = None
        with contextlib.suppress(OSError):
            child.kill()
        _stop(child)
        self._losses += 1
        if self._losses >= MAX_LOSSES:
            self.usable = False
            self.why_not = f"{MAX_LOSSES} writer processes in a row ended before answering (the last: {why})"
            log.warning("tiercache: background writes stay in this process: %s", self.why_not)

    def close(self) -> None:
        with self._lock:
            child, self._child = self._child, None
            exchanger, self._exchanger = self._exchanger, None
        if child is not None:
            _stop(child)
        if exchanger is not None:
            exchanger.shutdown(wait=True)

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's writer is the parent's. Close our copies of its pipes (holding the
        write end would keep it from ever seeing EOF) without waiting for it, and start afresh."""
        self._lock = threading.Lock()  # a parent's thread may have held it at the fork
        self._exchanger = None  # its thread does not exist here
        child, self._child = self._child, None
        if child is not None:
            _ABANDONED.append(child)  # never closed or waited for by this process
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        os.close(pipe.fileno())


_ABANDONED: list[subprocess.Popen[bytes]] = []
_WRITERS: weakref.WeakSet[WriterProcess] = weakref.WeakSet()


def _exchange(child: subprocess.Popen[bytes], request: bytes) -> dict[str, Any] | str:
    """Send one request and read its answer (on the writer's own thread: no interrupt splits the two); a str says
    why there is no answer."""
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(request)
        child.stdin.flush()
    except OSError as exc:
        return f"it could not be sent a request ({exc})"
    line = child.stdout.readline()
    if not line:
        return f"it exited with {child.wait()}"
    try:
        answer = json.loads(line)
    except ValueError:
        return f"it answered {line[:80]!r}"
    return answer if isinstance(answer, dict) else f"it answered {line[:80]!r}"


def _stop(child: subprocess.Popen[bytes]) -> None:
    """End the child: EOF on its stdin ends it after the request in flight; a stuck one is killed."""
    with contextlib.suppress(OSError):
        if child.stdin is not None:
            child.stdin.close()
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    if child.stdout is not None:
        child.stdout.close()


def _after_fork_in_child() -> None:
    WriterProcess._shared_lock = threading.Lock()
    for writer in list(_WRITERS):
        writer._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
