"""A writer process for background writes (demotions, flushes, write-behind): disk work with no share of our GIL.

On a machine with few cores, any thread of ours that writes (even one keeping several requests in flight) hands
the GIL back and forth with the caller's hot loop at every system call: CPython lets a thread that releases and
retakes the GIL often starve one that waits for it, so either the hot gets lag or the write crawls. A process of
its own does the writing: it copies the bytes straight out of our tensors (process_vm_readv: no shared allocation
needed), checksums them, writes and fsyncs, and answers once per request, while the thread that asked waits on a
pipe with the GIL released. The child's program is writer_child.py; it imports nothing of tiercache.

Where the child cannot run or cannot read our memory (not Linux, a ptrace policy that forbids it), the request
raises WriterGone and `usable` turns False: the caller writes in-process, as it does for every write when faults or
delays are injected through its own FileOps.
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
from pathlib import Path
from typing import Any

from ..errors import StorageError

log = logging.getLogger(__name__)

_PROGRAM = Path(__file__).with_name("writer_child.py")
PR_SET_PTRACER = 0x59616D61  # Yama: let this PID read our memory (ptrace_scope 1 allows only our ancestors)


class WriterGone(StorageError):
    """The writer process ended, or cannot read our memory; the caller writes this request itself."""


class WriterProcess:
    """One child process that performs lists of file steps (writer_child.py's), one request at a time.
    Thread-safe; started at the first request (in a forked child of ours too: the parent's belongs to the
    parent); `close` ends it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: subprocess.Popen[str] | None = None
        self._pid = os.getpid()
        self.usable = sys.platform == "linux"
        self.why_not: str | None = None if self.usable else "the writer process needs Linux (process_vm_readv)"

    @property
    def pid(self) -> int | None:
        """The running child's process ID; None before the first request, after close, and in a forked child."""
        child = self._child
        return child.pid if child is not None and self._pid == os.getpid() and child.poll() is None else None

    def run(self, steps: list[dict[str, Any]]) -> list[int]:
        """Do `steps` in the child; returns the CRC32C of each chunk step. A step's failure raises its OSError
        (errno, strerror and the path as the child saw them); WriterGone when the child could not do it at all.
        The memory that chunk steps name must stay alive and unchanged until this returns."""
        with self._lock:
            if not self.usable:
                raise WriterGone(f"the writer process is off: {self.why_not}")
            child = self._started()
            assert child.stdin is not None
            try:
                child.stdin.write(json.dumps(steps) + "\n")
                child.stdin.flush()
            except OSError as exc:
                self._lost(f"it could not be sent a request ({exc})")
            answer = self._answer(child)
        if "error" not in answer:
            return list(answer["crc32c"])
        error = answer["error"]
        if error["memory"]:
            self.usable = False
            self.why_not = f"it cannot read this process's memory: {error['strerror']}"
            log.info("tiercache: background writes stay in this process: %s", self.why_not)
            raise WriterGone(f"the writer process is off: {self.why_not}")
        raise OSError(error["errno"], error["strerror"], error["filename"])

    def _answer(self, child: subprocess.Popen[str]) -> dict[str, Any]:
        """The child's answer to the request in flight, waited for through Ctrl-C: the child may still be reading
        our tensors, which must outlive its read. The interrupt is raised once it has answered."""
        assert child.stdout is not None
        interrupted: KeyboardInterrupt | None = None
        while True:
            try:
                line = child.stdout.readline()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        if not line:
            self._lost(f"it exited with {child.wait()}")
        if interrupted is not None:
            raise interrupted
        return json.loads(line)  # type: ignore[no-any-return]

    def _started(self) -> subprocess.Popen[str]:
        if self._pid != os.getpid():  # forked: that child reads the parent's memory, not ours; start our own
            self._child, self._pid = None, os.getpid()
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen(
                [sys.executable, str(_PROGRAM), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                close_fds=True,
            )
            with contextlib.suppress(OSError, AttributeError):  # no Yama (EINVAL) or no libc: nothing to allow
                ctypes.CDLL(None).prctl(PR_SET_PTRACER, self._child.pid, 0, 0, 0)
        return self._child

    def _lost(self, why: str) -> None:
        """The child is gone mid-request: reap it; the next request starts a new one."""
        child, self._child = self._child, None
        if child is not None:
            _stop(child)
        raise WriterGone(f"the writer process was lost: {why}")

    def close(self) -> None:
        with self._lock:
            child, self._child = self._child, None
        if child is not None and self._pid == os.getpid():
            _stop(child)


def _stop(child: subprocess.Popen[str]) -> None:
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
