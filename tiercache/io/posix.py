"""The POSIX nvme backend: files read and written in large aligned pieces by a pool of threads.

`os.preadv` / `os.pwritev` release the GIL, so N threads keep N requests in flight on the drive. With O_DIRECT
(where the filesystem allows it) the bytes go between the drive and our buffers without the page cache;
unaligned sources are staged through a per-thread aligned buffer that is allocated once and reused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import CorruptEntryError, StorageError, caused_by
from .aligned import ALIGN, aligned_empty, buffer_of, round_up
from .checksum import crc32c_address, crc32c_combine
from .files import FileOps

log = logging.getLogger(__name__)

O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def drop_page_cache(path: str | Path) -> None:
    """Ask the kernel to forget a file's cached pages, so that the next read comes from the drive."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def probe_direct_io(directory: Path, files: FileOps | None = None, *, existing: Path | None = None) -> str | None:
    """None if O_DIRECT works for files in `directory` (through `files`, the real calls by default), else why not.

    With `existing`, a file already in `directory`, only its first block is read: a reader that writes nothing
    else creates nothing for the probe either, and skips the create, write and unlink. Without it, or if it is
    gone, a probe file is written, read back and removed."""
    if not O_DIRECT:
        return "this platform has no O_DIRECT"
    files = files if files is not None else FileOps()
    block = aligned_empty(ALIGN)
    if existing is not None:
        try:
            fd = files.open(existing, os.O_RDONLY | O_DIRECT)
            try:
                files.preadv(fd, [buffer_of(block)], 0)
            finally:
                files.close(fd)
            return None
        except FileNotFoundError:
            pass  # gone: write a probe of our own instead
        except OSError as exc:
            return _why(exc)
    probe = directory / f".direct-probe-{uuid.uuid4().hex}"
    block.fill_(7)
    try:
        fd = files.open(probe, os.O_CREAT | os.O_EXCL | os.O_RDWR | O_DIRECT, 0o600)
        try:
            files.pwritev(fd, [buffer_of(block)], 0)
            files.preadv(fd, [buffer_of(block)], 0)
        finally:
            files.close(fd)
    except OSError as exc:
        return _why(exc)
    finally:
        with contextlib.suppress(OSError):  # a probe file left behind is harmless: its name is never an entry's
            files.unlink(probe, missing_ok=True)
    return None


def _why(exc: OSError) -> str:
    return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, exc.errno)})"


class PendingRead:
    """An open file being read by the pool in pieces; each piece's reading thread also checksums it."""

    def __init__(
        self,
        path: str | Path,
        size: int,
        pieces: list[tuple[int, Future[tuple[int, int]]]],
        file: OpenFile,
        digest_bytes: int | None = None,
    ) -> None:
        """`pieces`: (start, future of (bytes read, CRC32C of the piece's part of the first `digest_bytes`));
        `file` is closed by finish() (or already, by the thread that read a file of one piece: closing is
        idempotent)."""
        self.path = path
        self.size = size
        self._file = file
        self._pieces = pieces
        self._digest_bytes = digest_bytes
        self._digest: int | None = None

    @property
    def digest(self) -> int:
        """CRC32C of the file's first `digest_bytes` bytes; valid after finish()."""
        if self._digest is None:
            raise ValueError(f"{self.path}: no digest was asked for, or finish() has not run")
        return self._digest

    def finish(self) -> None:
        """Wait for every piece, close the file, check that exactly `size` bytes arrived, combine the digests.

        An interrupt (Ctrl-C) while waiting is raised as it is, but only once every piece has stopped using the
        file: closing it under a running preadv would let the next open reuse its number."""
        interrupted = wait_through_interrupts([future for _, future in self._pieces])
        got, crc = 0, 0
        failed: BaseException | None = None
        error: BaseException | None = None
        try:
            for start, future in self._pieces:
                if future.cancelled():
                    failed = failed or interrupted or StorageError(f"reading {self.path} was cancelled")
                    continue
                error = future.exception()
                if error is not None:
                    # The pool thread's frames in its traceback hold the destination buffer: clear them, so that a
                    # kept error (a prefetch handle's) does not keep the buffer.
                    traceback.clear_frames(error.__traceback__)
                    failed = failed or error
                    continue
                count, piece_crc = future.result()
                got += count
                if self._digest_bytes is not None:
                    crc = crc32c_combine(crc, piece_crc, max(0, min(start + count, self._digest_bytes) - start))
        finally:
            self._file.close()
        try:
            if interrupted is not None:
                raise interrupted
            if failed is not None and not isinstance(failed, Exception):
                raise failed
            if isinstance(failed, StorageError):
                raise failed
            if failed is not None:
                raise caused_by(StorageError(f"reading {self.path} failed: {failed}"), failed)
        finally:
            interrupted = failed = error = None  # no frame -> exception -> traceback -> frame cycle
        if got != self.size:
            raise CorruptEntryError(f"{self.path}: read {got} bytes, expected {self.size}; the file was truncated")
        if self._digest_bytes is not None:
            self._digest = crc


def wait_through_interrupts(futures: Sequence[Future[Any]]) -> BaseException | None:
    """Wait until every future is done, even across interrupts; returns the first interrupt, to be raised once
    nothing uses what the futures use (an fd, a buffer)."""
    interrupted: BaseException | None = None
    while True:
        try:
            wait(futures)
            return interrupted
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt and the like: returned, raised by the caller
            interrupted = interrupted or exc


Pool = Callable[[int], Executor]  # given the thread count, the executor that runs the pieces


def io_threads(threads: int) -> Executor:
    """The default pool of PosixIO's pieces, its threads already running. Started lazily, each would be started
    by a read's submit, and its start would wait for the GIL that the threads already reading take between
    pieces: time taken from a fresh process's first get (the handoff)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tiercache-io")
    started = threading.Barrier(threads + 1)
    try:
        for _ in range(threads):  # each task holds its thread until all are submitted, so none is reused: N threads
            pool.submit(started.wait)
        started.wait()
    except BaseException:  # a thread that could not start: let the started ones go, not wait at exit for ever
        started.abort()
        pool.shutdown(wait=False)
        raise
    return pool


class PosixIO:
    """Parallel, chunked file I/O with O_DIRECT where the filesystem supports it ("o_direct"), else "buffered".

    Every system call goes through `files` (the real ones by default); the pieces run on the executor that `pool`
    makes for `threads` (a thread pool by default; a test's own to act between a piece's queueing and its run).
    `probe_file`: a file in `directory` that the O_DIRECT probe may read instead of writing one (probe_direct_io).
    """

    def __init__(
        self,
        directory: Path,
        *,
        threads: int,
        task_size: int,
        io: str = "auto",
        files: FileOps | None = None,
        pool: Pool = io_threads,
        probe_file: Path | None = None,
    ) -> None:
        if task_size <= 0 or task_size % ALIGN:
            raise ValueError(f"task_size must be a positive multiple of {ALIGN}, got {task_size}")
        self.task_size = task_size
        self.threads = threads
        self.files = files if files is not None else FileOps()
        why_not: str | None = "buffered I/O requested"
        if io != "buffered":
            why_not = probe_direct_io(directory, self.files, existing=probe_file)
        if io == "o_direct" and why_not:
            raise StorageError(
                f"O_DIRECT is not usable in {directory}: {why_not}; "
                "set tiers.nvme.io = 'auto' or 'buffered' in the policy, or use a directory on a real filesystem"
            )
        self.mode = "o_direct" if why_not is None else "buffered"
        self.why_buffered = why_not
        self._flags = O_DIRECT if self.mode == "o_direct" else 0
        self._pool = pool(threads)
        self._local = threading.local()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ---- writing ----------------------------------------------------------------------------------------------
    def write_file(self, path: Path, data: torch.Tensor, trailer: bytes = b"") -> None:
        """Create `path` holding `data` (a contiguous uint8 CPU tensor) followed by `trailer`, and fsync it. The
        file's blocks are reserved first (fallocate, where the filesystem has it)."""
        size = data.numel() + len(trailer)
        files = self.files
        try:
            fd = files.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | self._flags, 0o644)
        except OSError as exc:
            raise caused_by(StorageError(f"cannot create {path}: {exc}"), exc) from exc
        try:
            files.fallocate(fd, size)  # a full disk refuses here, before any byte is written
            direct = self.mode == "o_direct"
            body = (data.numel() // ALIGN) * ALIGN if direct else data.numel()
            futures: list[Future[None]] = []
            try:
                for start in range(0, body, self.task_size):
                    futures.append(
                        self._pool.submit(self._write_piece, fd, data[start : min(start + self.task_size, body)], start)
                    )
            finally:
                # every piece has stopped using fd before it can be closed (and its number reused), Ctrl-C or not
                interrupted = wait_through_interrupts(futures)
            if interrupted is not None:
                raise interrupted
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
                    _pwrite_all(files, fd, buffer_of(padded), body)
                    files.ftruncate(fd, size)
                else:
                    _pwrite_all(files, fd, buffer_of(tail), body)
            files.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the write's error is the one to report
                files.close(fd)
            raise caused_by(StorageError(f"writing {size} bytes to {path} failed: {exc}"), exc) from exc
        except BaseException:
            with contextlib.suppress(OSError):  # an interrupt stays the error raised
                files.close(fd)
            raise
        try:
            files.close(fd)  # a deferred write error (NFS, a full thin volume) may surface only here
        except OSError as exc:
            raise caused_by(StorageError(f"closing {path} after writing {size} bytes failed: {exc}"), exc) from exc

    def _write_piece(self, fd: int, piece: torch.Tensor, offset: int) -> None:
        if self.mode == "o_direct" and piece.data_ptr() % ALIGN:
            staging = self._staging()[: piece.numel()]
            staging.copy_(piece)  # torch copies release the GIL
            piece = staging
        _pwrite_all(self.files, fd, buffer_of(piece), offset)

    def _staging(self) -> torch.Tensor:
        buffer = getattr(self._local, "staging", None)
        if buffer is None:
            buffer = self._local.staging = aligned_empty(self.task_size)
        return buffer

    # ---- reading ----------------------------------------------------------------------------------------------
    def read_file(
        self, path: str | Path, dest: torch.Tensor, size: int, digest_bytes: int | None = None
    ) -> PendingRead:
        """Start reading all `size` bytes of `path` into `dest` (see read_files)."""
        return self.read_files([FileRead(path, dest, size, digest_bytes)])[0]

    def read_files(self, reads: Iterable[FileRead]) -> list[PendingRead]:
        """Start reading files, each into its `dest` (from `aligned_empty(size)` or as large and aligned), and,
        where `digest_bytes` is given, the CRC32C of its first `digest_bytes` bytes (PendingRead.digest).

        Returns at once, every piece of every file queued on the pool, each file as soon as `reads` yields it; the
        thread that reads a piece also checksums it (the CRCs are combined in finish()), so a file is verified as
        fast as it is read. Files are opened here, one after another while the first ones are already being read
        (opening them in the pool threads measured slower). If one cannot be started, none is left running or
        open."""
        pending: list[PendingRead] = []
        try:
            for path, dest, size, digest_bytes in reads:
                span = round_up(size) if self.mode == "o_direct" else size
                if dest.numel() < span or (self.mode == "o_direct" and dest.data_ptr() % ALIGN):
                    raise ValueError(f"destination for {path} must be {span} bytes and {ALIGN}-aligned")
                file = OpenFile(_open_sized(self.files, path, self._flags, size), self.files)
                pieces: list[tuple[int, Future[tuple[int, int]]]] = []
                pending.append(PendingRead(path, size, pieces, file, digest_bytes))  # finish() closes the file
                # Pieces of equal size, none above task_size: a file of task_size plus its 4-byte checksum is two
                # halves, not a full piece and a 4 KiB one.
                piece = max(ALIGN, round_up(-(-span // max(1, -(-span // self.task_size)))))  # an empty file: none
                alone = span <= piece  # one piece: its thread closes the file, off the caller's path
                for start in range(0, span, piece):
                    end = min(start + piece, span)
                    checked = max(0, min(end, digest_bytes) - start) if digest_bytes is not None else None
                    pieces.append((start, self._pool.submit(_read_piece, file, dest, start, end, checked, alone)))
        except BaseException:
            for job in pending:
                with contextlib.suppress(BaseException):
                    job.finish()  # waits for its pieces, closes its file
            raise
        return pending


class FileRead(NamedTuple):
    """One file to read: all `size` bytes of `path` into `dest`, and the CRC32C of the first `digest_bytes`."""

    path: str | Path
    dest: torch.Tensor
    size: int
    digest_bytes: int | None = None


def _open_sized(files: FileOps, path: str | Path, flags: int, size: int) -> int:
    """Open `path` for reading; it must hold exactly `size` bytes."""
    try:
        fd = files.open(path, os.O_RDONLY | flags)
    except OSError as exc:
        raise caused_by(StorageError(f"cannot open {path}: {exc}"), exc) from exc
    try:
        actual = files.fstat(fd).st_size
    except OSError as exc:
        files.close(fd)
        raise caused_by(StorageError(f"cannot stat {path}: {exc}"), exc) from exc
    if actual != size:
        files.close(fd)
        raise CorruptEntryError(f"{path} holds {actual} bytes, its manifest says {size}")
    return fd


class OpenFile:
    """A file descriptor that pieces read from; closed once, when it is closed and no piece is using it.

    An interrupt can leave a piece queued (or running) that its caller never learned of; such a piece finds the
    file closed and reads nothing, or holds it open until it is done: a descriptor is never closed under a read,
    whose number the next open would reuse."""

    def __init__(self, fd: int, files: FileOps) -> None:
        self.fd = fd
        self.files = files
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    def acquire(self) -> int | None:
        with self._lock:
            if self._closing:
                return None
            self._users += 1
            return self.fd

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and self._users == 0
        if last:
            self._close_fd()

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            idle = self._users == 0
        if idle:
            self._close_fd()

    def _close_fd(self) -> None:
        # A descriptor opened for reading holds nothing unwritten: a failing close loses nothing a read returned
        # (whose bytes are checked), so it is logged, not raised over a read that succeeded.
        try:
            self.files.close(self.fd)
        except OSError as exc:
            log.warning("tiercache: closing a file after reading it failed (fd %d): %s", self.fd, exc)


def _read_piece(
    file: OpenFile, dest: torch.Tensor, start: int, end: int, digest_bytes: int | None, close: bool = False
) -> tuple[int, int]:
    """Fill bytes [start, end) of `dest` from the same offsets of the file; returns the bytes read and the CRC32C
    of the first `digest_bytes` of them (0 when not asked), computed by this thread while they are hot in its
    cache; closes the file after, where `close`. Memoryview slices and addresses, not torch slicing: a torch call
    lets another thread take the GIL."""
    fd = file.acquire()
    if fd is None:  # closed by a caller that was interrupted while queueing this piece: nothing to read
        return 0, 0
    try:
        count = _pread_all(file.files, fd, buffer_of(dest)[start:end], start)
    finally:
        file.release()
        if close:
            file.close()
    if not digest_bytes or not count:
        return count, 0
    return count, crc32c_address(dest.data_ptr() + start, min(digest_bytes, count))


def _pread_all(files: FileOps, fd: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` from `offset`, looping over short reads; stops early only at end of file."""
    preadv = files.preadv
    done = 0
    while done < len(buffer):
        count = preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


def _pwrite_all(files: FileOps, fd: int, buffer: memoryview, offset: int) -> None:
    pwritev = files.pwritev
    done = 0
    while done < len(buffer):
        done += pwritev(fd, [buffer[done:]], offset + done)
