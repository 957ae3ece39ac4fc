"""The POSIX nvme backend: files read and written in large aligned pieces by a pool of threads.

`os.preadv` / `os.pwritev` release the GIL, so N threads keep N requests in flight on the drive. With O_DIRECT
(where the filesystem allows it) the bytes go between the drive and our buffers without the page cache;
unaligned sources are staged through a per-thread aligned buffer that is allocated once and reused.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from ..errors import StorageError
from .aligned import ALIGN, aligned_empty, buffer_of, round_up

O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def drop_page_cache(path: str | Path) -> None:
    """Ask the kernel to forget a file's cached pages, so that the next read comes from the drive."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def probe_direct_io(directory: Path) -> str | None:
    """None if O_DIRECT works for files in `directory`, else why it does not."""
    if not O_DIRECT:
        return "this platform has no O_DIRECT"
    probe = directory / f".direct-probe-{uuid.uuid4().hex}"
    block = aligned_empty(ALIGN)
    block.fill_(7)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_RDWR | O_DIRECT, 0o600)
        try:
            os.pwritev(fd, [buffer_of(block)], 0)
            os.preadv(fd, [buffer_of(block)], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    finally:
        probe.unlink(missing_ok=True)
    return None


class PendingRead:
    """A file being read by the pool: its pieces complete in any order and are consumed in file order."""

    def __init__(
        self,
        path: Path,
        fd: int,
        size: int,
        pieces: list[tuple[int, int, Future[int]]],
        digest: list[int] | None = None,
    ) -> None:
        self.path = path
        self.size = size
        self._fd = fd
        self._pieces = pieces
        self._digest = digest

    @property
    def digested(self) -> bool:
        """Whether the I/O thread that read the (single-piece) file also computed its digest."""
        return self._digest is not None

    @property
    def digest(self) -> int:
        """The digest computed by the reading thread; valid after finish()."""
        if not self._digest:
            raise ValueError(f"{self.path}: no digest was computed")
        return self._digest[0]

    def ranges(self) -> Iterator[tuple[int, int]]:
        """(start, end) of each piece of the file's bytes, in order, as soon as it has landed."""
        for start, length, future in self._pieces:
            future.result()
            yield start, min(start + length, self.size)

    def finish(self) -> None:
        """Wait for every piece, close the file, and check that exactly `size` bytes arrived."""
        try:
            got = 0
            first_error: BaseException | None = None
            for _, _, future in self._pieces:  # wait for all before closing: a running preadv still uses the fd
                try:
                    got += future.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after the fd is safe to close
                    first_error = first_error or exc
        finally:
            os.close(self._fd)
        if first_error is not None:
            raise StorageError(f"reading {self.path} failed: {first_error}") from first_error
        if got != self.size:
            raise StorageError(f"{self.path}: read {got} bytes, expected {self.size}; the file was truncated")


class PosixIO:
    """Parallel, chunked file I/O with O_DIRECT where the filesystem supports it ("o_direct"), else "buffered"."""

    def __init__(self, directory: Path, *, threads: int, task_size: int, io: str = "auto") -> None:
        if task_size <= 0 or task_size % ALIGN:
            raise ValueError(f"task_size must be a positive multiple of {ALIGN}, got {task_size}")
        self.task_size = task_size
        self.threads = threads
        why_not = probe_direct_io(directory) if io != "buffered" else "buffered I/O requested"
        if io == "direct" and why_not:
            raise StorageError(
                f"O_DIRECT is not usable in {directory}: {why_not}; "
                "set tiers.nvme.io = 'auto' or 'buffered' in the policy, or use a directory on a real filesystem"
            )
        self.mode = "o_direct" if why_not is None else "buffered"
        self.why_buffered = why_not
        self._flags = O_DIRECT if self.mode == "o_direct" else 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tiercache-io")
        self._local = threading.local()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ---- writing ----------------------------------------------------------------------------------------------
    def write_file(self, path: Path, data: torch.Tensor, trailer: bytes = b"") -> None:
        """Create `path` holding `data` (a contiguous uint8 CPU tensor) followed by `trailer`, and fsync it."""
        size = data.numel() + len(trailer)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | self._flags, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc}") from exc
        try:
            direct = self.mode == "o_direct"
            body = (data.numel() // ALIGN) * ALIGN if direct else data.numel()
            futures: list[Future[None]] = []
            try:
                for start in range(0, body, self.task_size):
                    futures.append(
                        self._pool.submit(self._write_piece, fd, data[start : min(start + self.task_size, body)], start)
                    )
            finally:
                wait(futures)  # every piece has stopped using fd before it can be closed (and its number reused)
            for future in futures:
                future.result()
            tail = (
                torch.cat([data[body:], torch.frombuffer(bytearray(trailer), dtype=torch.uint8)])
                if trailer
                else data[body:]
            )
            if tail.numel():
                if direct:  # O_DIRECT writes whole blocks: pad the tail, then cut the file to its true size
                    padded = aligned_empty(tail.numel())
                    padded[tail.numel() :].zero_()
                    padded[: tail.numel()].copy_(tail)
                    _pwrite_all(fd, buffer_of(padded), body)
                    os.ftruncate(fd, size)
                else:
                    _pwrite_all(fd, buffer_of(tail), body)
            os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"writing {size} bytes to {path} failed: {exc}") from exc
        finally:
            os.close(fd)

    def _write_piece(self, fd: int, piece: torch.Tensor, offset: int) -> None:
        if self.mode == "o_direct" and piece.data_ptr() % ALIGN:
            staging = self._staging()[: piece.numel()]
            staging.copy_(piece)  # torch copies release the GIL
            piece = staging
        _pwrite_all(fd, buffer_of(piece), offset)

    def _staging(self) -> torch.Tensor:
        buffer = getattr(self._local, "staging", None)
        if buffer is None:
            buffer = self._local.staging = aligned_empty(self.task_size)
        return buffer

    # ---- reading ----------------------------------------------------------------------------------------------
    def read_file(
        self,
        path: Path,
        dest: torch.Tensor,
        size: int,
        digest: Callable[[torch.Tensor], int] | None = None,
        digest_bytes: int = 0,
    ) -> PendingRead:
        """Start reading all `size` bytes of `path` into `dest` (from `aligned_empty(size)` or as large and aligned).

        Returns at once; the pool reads the pieces in parallel. A file that is one piece is also digested
        (`digest(dest[:digest_bytes])`) by the thread that read it, when `digest` is given: one hand-off per
        small file instead of two.
        """
        span = round_up(size) if self.mode == "o_direct" else size
        if dest.numel() < span or (self.mode == "o_direct" and dest.data_ptr() % ALIGN):
            raise ValueError(f"destination for {path} must be {span} bytes and {ALIGN}-aligned")
        try:
            fd = os.open(path, os.O_RDONLY | self._flags)
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc}") from exc
        pieces: list[tuple[int, int, Future[int]]] = []
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise StorageError(f"{path} holds {actual} bytes, its manifest says {size}; the entry is damaged")
            holder: list[int] | None = None
            if digest is not None and span <= self.task_size:
                holder = []
                job = self._pool.submit(
                    _pread_then_digest, fd, buffer_of(dest[:span]), dest[:digest_bytes], digest, holder
                )
                pieces.append((0, self.task_size, job))
            else:
                for start in range(0, span, self.task_size):
                    piece = buffer_of(dest[start : min(start + self.task_size, span)])
                    pieces.append((start, self.task_size, self._pool.submit(_pread_all, fd, piece, start)))
        except BaseException:
            wait([future for _, _, future in pieces])
            os.close(fd)
            raise
        return PendingRead(path, fd, size, pieces, holder)


def _pread_then_digest(
    fd: int, buffer: memoryview, prefix: torch.Tensor, digest: Callable[[torch.Tensor], int], out: list[int]
) -> int:
    count = _pread_all(fd, buffer, 0)
    out.append(digest(prefix))
    return count


def _pread_all(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` from `offset`, looping over short reads; stops early only at end of file."""
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


def _pwrite_all(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        done += os.pwritev(fd, [buffer[done:]], offset + done)
