"""The POSIX nvme backend: both modes, odd sizes and unaligned sources, fallback, and errors."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
import torch
from faults import CreationLog, NoDirectIO, SlowReads
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache import StorageError
from tiercache.io import ALIGN, FileRead, PosixIO, aligned_empty, drop_page_cache, posix
from tiercache.io.checksum import crc32c, crc32c_combine
from tiercache.io.posix import O_DIRECT, probe_direct_io


@pytest.fixture(params=["o_direct", "buffered"])
def io(request: pytest.FixtureRequest, tmp_path: Path, direct_io_reason: str | None):  # type: ignore[no-untyped-def]
    if request.param == "o_direct" and direct_io_reason is not None:
        pytest.skip(direct_io_reason)
    backend = PosixIO(tmp_path, threads=3, task_size=2 * ALIGN, io=str(request.param))
    yield backend
    backend.close()


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 8188, 8192, 3 * 8192 + 5, 100_003])
@pytest.mark.parametrize("source_offset", [0, 1, 64])
def test_write_then_read_is_exact_for_any_size_and_source_alignment(
    io: PosixIO, tmp_path: Path, size: int, source_offset: int
) -> None:
    data = torch.randint(0, 256, (size + source_offset,), dtype=torch.uint8)[source_offset:]
    path = tmp_path / f"f-{size}-{source_offset}"
    io.write_file(path, data, trailer=b"TAIL")
    assert path.stat().st_size == size + 4
    drop_page_cache(path)
    dest = aligned_empty(size + 4)
    job = io.read_file(path, dest, size + 4, digest_bytes=size)
    job.finish()
    assert torch.equal(dest[:size], data) and bytes(dest[size : size + 4].numpy()) == b"TAIL"
    assert job.digest == crc32c(data.contiguous())  # the pieces' CRCs, combined in order


@pytest.mark.skipif(not O_DIRECT, reason="this platform has no O_DIRECT flag: there is nothing to fall back from")
def test_auto_falls_back_to_buffered_where_o_direct_fails(tmp_path: Path) -> None:
    backend = PosixIO(tmp_path, threads=1, task_size=ALIGN, io="auto", files=NoDirectIO())
    assert backend.mode == "buffered" and "EINVAL" in (backend.why_buffered or "")
    backend.write_file(tmp_path / "f", torch.full((10,), 3, dtype=torch.uint8))  # and works, buffered
    job = backend.read_file(tmp_path / "f", aligned_empty(10), 10, digest_bytes=10)
    job.finish()
    assert job.digest == crc32c(torch.full((10,), 3, dtype=torch.uint8))
    backend.close()
    assert not list(tmp_path.glob(".direct-probe-*"))  # the probe cleaned up after itself
    with pytest.raises(StorageError, match="tiers.nvme.io"):
        PosixIO(tmp_path, threads=1, task_size=ALIGN, io="o_direct", files=NoDirectIO())


@pytest.mark.direct_io
def test_o_direct_works_on_this_filesystem(tmp_path: Path) -> None:
    # Skipped, with the reason, where the filesystem refuses O_DIRECT: there `make bench` measures buffered I/O.
    assert probe_direct_io(tmp_path) is None
    backend = PosixIO(tmp_path, threads=1, task_size=ALIGN, io="auto")
    assert backend.mode == "o_direct" and backend.why_buffered is None
    backend.close()


@pytest.mark.direct_io
def test_the_probe_reads_a_file_already_there_instead_of_writing_one(tmp_path: Path) -> None:
    there = tmp_path / "there"
    there.write_bytes(b"x" * 10)  # shorter than a block: a short read is still an answer
    files = CreationLog()
    backend = PosixIO(tmp_path, threads=1, task_size=ALIGN, io="auto", files=files, probe_file=there)
    assert backend.mode == "o_direct" and files.created == []
    backend.close()
    assert "EINVAL" in (probe_direct_io(tmp_path, NoDirectIO(), existing=there) or "")
    # gone: the probe writes a file of its own, and removes it
    assert probe_direct_io(tmp_path, files, existing=tmp_path / "gone") is None
    assert [Path(p).name.startswith(".direct-probe-") for p in files.created] == [True]
    assert not list(tmp_path.glob(".direct-probe-*"))


def test_a_missing_or_resized_file_is_a_storage_error(io: PosixIO, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open .*absent"):
        io.read_file(tmp_path / "absent", aligned_empty(10), 10).finish()
    path = tmp_path / "short"
    io.write_file(path, torch.zeros(100, dtype=torch.uint8))
    for size in (200, 100 * ALIGN):  # one piece and several
        with pytest.raises(StorageError, match="holds 100 bytes"):
            io.read_file(path, aligned_empty(size), size).finish()


def test_writes_never_overwrite_an_existing_file(io: PosixIO, tmp_path: Path) -> None:
    path = tmp_path / "once"
    io.write_file(path, torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(StorageError):
        io.write_file(path, torch.ones(10, dtype=torch.uint8))


@pytest.mark.direct_io
def test_a_misaligned_destination_is_refused(tmp_path: Path) -> None:
    backend = PosixIO(tmp_path, threads=1, task_size=ALIGN, io="o_direct")
    path = tmp_path / "f"
    backend.write_file(path, torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="aligned"):
        backend.read_file(path, aligned_empty(2 * ALIGN)[1:], 10)
    backend.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32c_combine_equals_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), len(b)) == google_crc32c.value(a + b)


@pytest.mark.direct_io
def test_a_many_piece_file_with_its_checksum_in_the_last_piece_alone(tmp_path: Path) -> None:
    """The digested bytes end exactly at a piece boundary: the trailer's piece adds nothing to the CRC."""
    backend = PosixIO(tmp_path, threads=2, task_size=ALIGN, io="o_direct")
    data = torch.randint(0, 256, (3 * ALIGN,), dtype=torch.uint8)
    backend.write_file(tmp_path / "f", data, trailer=b"CRC!")
    job = backend.read_file(tmp_path / "f", aligned_empty(3 * ALIGN + 4), 3 * ALIGN + 4, digest_bytes=3 * ALIGN)
    job.finish()
    assert job.digest == crc32c(data)
    backend.close()


def _open_fds() -> int:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts this process's open files in /proc/self/fd, which only Linux's procfs has")
    return len(os.listdir("/proc/self/fd"))


def test_a_missing_file_among_many_fails_the_start_and_leaves_nothing_open(io: PosixIO, tmp_path: Path) -> None:
    data = [torch.full((100 + i,), i, dtype=torch.uint8) for i in range(9)]
    for i, d in enumerate(data):
        io.write_file(tmp_path / f"f{i}", d)
    (tmp_path / "f4").unlink()
    before = _open_fds()
    reads = [FileRead(tmp_path / f"f{i}", aligned_empty(d.numel()), d.numel(), d.numel()) for i, d in enumerate(data)]
    with pytest.raises(StorageError, match="cannot open .*f4"):
        io.read_files(reads)
    assert _open_fds() == before  # the four started were waited for and closed
    jobs = io.read_files(reads[:4] + reads[5:])
    for job, read, d in zip(jobs, reads[:4] + reads[5:], data[:4] + data[5:], strict=True):
        job.finish()
        assert torch.equal(read.dest[: d.numel()], d) and job.digest == crc32c(d)


@pytest.mark.direct_io
def test_a_refused_destination_starts_nothing_and_leaks_no_file(tmp_path: Path) -> None:
    backend = PosixIO(tmp_path, threads=2, task_size=ALIGN, io="o_direct")
    big = torch.randint(0, 256, (5 * ALIGN,), dtype=torch.uint8)
    backend.write_file(tmp_path / "big", big)
    backend.write_file(tmp_path / "small", big[:10])
    before = _open_fds()
    reads = [
        FileRead(tmp_path / "small", aligned_empty(10), 10),
        FileRead(tmp_path / "big", aligned_empty(5 * ALIGN), 5 * ALIGN),  # several pieces: opened by read_files
        FileRead(tmp_path / "small", aligned_empty(2 * ALIGN)[1:], 10),  # misaligned
    ]
    with pytest.raises(ValueError, match="aligned"):
        backend.read_files(reads)
    assert _open_fds() == before
    backend.close()


def test_an_empty_file_reads_as_nothing(io: PosixIO, tmp_path: Path) -> None:
    io.write_file(tmp_path / "empty", torch.empty(0, dtype=torch.uint8))
    job = io.read_file(tmp_path / "empty", aligned_empty(0), 0, digest_bytes=0)
    job.finish()
    assert job.digest == 0


def test_an_interrupt_while_waiting_closes_the_file_only_after_its_pieces(tmp_path: Path) -> None:
    """Ctrl-C during finish(): the KeyboardInterrupt is raised as it is, and not before every piece has stopped
    using the fd (closed under a running preadv, its number would go to the next open file; found by a review).
    The reads wait until the interrupt has been raised."""
    files = SlowReads()
    backend = PosixIO(tmp_path, threads=1, task_size=ALIGN, io="buffered", files=files)
    (tmp_path / "mine").write_bytes(b"M" * (2 * ALIGN))
    dest = aligned_empty(2 * ALIGN)
    job = backend.read_file(tmp_path / "mine", dest, 2 * ALIGN)
    assert files.reading.wait(timeout=60)  # the first piece holds the file

    def interrupt(*_: object) -> None:
        files.go.set()  # the reads go on only once the interrupt is on its way
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.1)  # lands while finish() waits for the pieces
    try:
        with pytest.raises(KeyboardInterrupt):
            job.finish()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert files.go.is_set()  # the interrupt, not a timeout, ended the wait
    assert not files.closed_under_a_read and bytes(dest.numpy()) == b"M" * (2 * ALIGN)
    backend.close()


def test_reads_of_one_piece_and_of_many_leave_no_file_open(io: PosixIO, tmp_path: Path) -> None:
    sizes = [10, 2 * ALIGN, 5 * ALIGN + 3]  # one piece (closed by its thread), exactly one, several (by finish)
    for i, size in enumerate(sizes):
        io.write_file(tmp_path / f"f{i}", torch.ones(size, dtype=torch.uint8))
    before = _open_fds()
    jobs = io.read_files([FileRead(tmp_path / f"f{i}", aligned_empty(s), s, s) for i, s in enumerate(sizes)])
    for job in jobs:
        job.finish()
    assert _open_fds() == before


class InterruptedSubmit(ThreadPoolExecutor):
    """A pool whose first submit() queues the piece and then raises KeyboardInterrupt, as a Ctrl-C landing at the
    end of ThreadPoolExecutor.submit does: the caller never gets the piece's future. Before raising it waits for
    `before_interrupt` (a piece holding the file); with `gate`, the piece waits for it before it runs (queued
    while the caller closes the file)."""

    def __init__(self, threads: int, before_interrupt: threading.Event | None, gate: threading.Event | None) -> None:
        super().__init__(threads)
        self.before_interrupt = before_interrupt
        self.gate = gate
        self.interrupted = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        gate = self.gate

        def gated() -> Any:
            if gate is not None and not gate.wait(timeout=60):
                raise TimeoutError("the test never let the queued piece run")
            return fn(*args, **kwargs)

        future = super().submit(gated)
        if not self.interrupted:
            self.interrupted = True
            if self.before_interrupt is not None and not self.before_interrupt.wait(timeout=60):
                raise TimeoutError("the piece never started reading")
            raise KeyboardInterrupt
        return future


@pytest.mark.parametrize("reading", [False, True], ids=["queued", "reading"])
@pytest.mark.parametrize("size", [10, 5 * ALIGN + 3])  # one piece (closed by its thread), several (by finish)
def test_an_interrupt_inside_submit_never_closes_a_file_twice_or_under_a_read(
    tmp_path: Path, size: int, reading: bool
) -> None:
    """Ctrl-C can land in ThreadPoolExecutor.submit after the piece was queued: the caller never learns of it.
    That piece must neither read from nor close a descriptor number that the next open reuses (found by a
    review: a one-piece file was closed twice, the second time someone else's file). The piece is either still
    queued when the caller closes the file, or already reading it."""
    files = SlowReads()
    go = files.go if not reading else None
    make_pool: Callable[[int], ThreadPoolExecutor] = lambda threads: InterruptedSubmit(  # noqa: E731
        threads, files.reading if reading else None, go
    )
    backend = PosixIO(tmp_path, threads=1, task_size=2 * ALIGN, io="buffered", files=files, pool=make_pool)
    (tmp_path / "mine").write_bytes(b"\x07" * size)  # not through the backend: its first submit is interrupted
    (tmp_path / "other").write_bytes(b"O" * size)
    dest = aligned_empty(size)
    dest.zero_()
    with pytest.raises(KeyboardInterrupt):
        backend.read_files([FileRead(tmp_path / "mine", dest, size, size)])
    other = os.open(tmp_path / "other", os.O_RDONLY)  # may get the number the interrupted read had
    try:
        files.go.set()  # the piece goes on
        backend.close()  # waits for the queued piece
        os.fstat(other)  # still open: nobody closed it
        assert b"O" not in bytes(dest.numpy())  # and nobody read it into this buffer
        assert not files.closed_under_a_read
    finally:
        os.close(other)


def _io_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tiercache-io")}


def test_the_default_pool_has_its_threads_running_before_the_first_read(tmp_path: Path) -> None:
    before = _io_threads()
    io = PosixIO(tmp_path, threads=3, task_size=ALIGN)
    try:
        assert len(_io_threads() - before) == 3
    finally:
        io.close()
    assert _io_threads() <= before


def test_a_pool_thread_that_cannot_start_lets_the_started_ones_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """The threads already started wait for the others; if one cannot start, they must not wait for ever (the
    interpreter joins pool threads at exit)."""

    class Refusing(ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
            Refusing.submitted += 1
            if Refusing.submitted == 3:
                raise RuntimeError("can't start new thread")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(posix, "ThreadPoolExecutor", Refusing)
    before = _io_threads()
    with pytest.raises(RuntimeError, match="can't start new thread"):
        posix.io_threads(4)
    for thread in _io_threads() - before:
        thread.join(timeout=5)
        assert not thread.is_alive()
