"""The POSIX nvme backend: both modes, odd sizes and unaligned sources, fallback, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiercache import StorageError
from tiercache.io import ALIGN, PosixIO, aligned_empty, drop_page_cache, posix
from tiercache.io.posix import probe_direct_io


@pytest.fixture(params=["direct", "buffered"])
def io(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    backend = PosixIO(tmp_path, threads=3, task_size=2 * ALIGN, io=str(request.param))
    yield backend
    backend.close()


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 3 * 8192 + 5, 100_003])
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
    job = io.read_file(path, dest, size + 4)
    ranges = list(job.ranges())
    job.finish()
    assert ranges[0][0] == 0 and ranges[-1][1] == size + 4
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # in order, no gaps
    assert torch.equal(dest[:size], data) and bytes(dest[size : size + 4].numpy()) == b"TAIL"


def test_auto_falls_back_to_buffered_where_o_direct_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(posix, "probe_direct_io", lambda directory: "EINVAL from this filesystem")
    backend = PosixIO(tmp_path, threads=1, task_size=ALIGN, io="auto")
    assert backend.mode == "buffered" and "EINVAL" in (backend.why_buffered or "")
    backend.close()
    with pytest.raises(StorageError, match="tiers.nvme.io"):
        PosixIO(tmp_path, threads=1, task_size=ALIGN, io="direct")


def test_o_direct_works_on_this_filesystem(tmp_path: Path) -> None:
    # CI's and developers' /tmp is ext4; if this fails the figures of `make bench` are of buffered I/O.
    assert probe_direct_io(tmp_path) is None


def test_a_missing_or_resized_file_is_a_storage_error(io: PosixIO, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open"):
        io.read_file(tmp_path / "absent", aligned_empty(10), 10)
    path = tmp_path / "short"
    io.write_file(path, torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(StorageError, match="holds 100 bytes"):
        io.read_file(path, aligned_empty(200), 200)


def test_writes_never_overwrite_an_existing_file(io: PosixIO, tmp_path: Path) -> None:
    path = tmp_path / "once"
    io.write_file(path, torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(StorageError):
        io.write_file(path, torch.ones(10, dtype=torch.uint8))


def test_a_misaligned_destination_is_refused(tmp_path: Path) -> None:
    backend = PosixIO(tmp_path, threads=1, task_size=ALIGN, io="direct")
    path = tmp_path / "f"
    backend.write_file(path, torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="aligned"):
        backend.read_file(path, aligned_empty(2 * ALIGN)[1:], 10)
    backend.close()
