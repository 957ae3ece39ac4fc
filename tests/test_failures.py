"""Failure paths: refused or failed operations lose nothing, I/O errors never touch another file, close and
garbage collection while work is in flight. Ordering is forced with events, never with sleeps."""

from __future__ import annotations

import errno
import gc
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import CacheFactory
from faults import FailingClose, FailingFsync, FillingDisk, NoDirectIO, UnlistableDisk
from helpers import assert_same, disk_bytes, kv, only_tier, policy

import tiercache
from tiercache import CacheClosedError, Policy, StorageError
from tiercache.io import FileOps
from tiercache.io.files import StrPath
from tiercache.io.posix import PosixIO
from tiercache.tiers import Load


def uint8s(n: int) -> dict[str, torch.Tensor]:
    return {"x": torch.arange(n, dtype=torch.uint8)}


def test_a_put_moves_nothing_in_a_tier_it_cannot_use(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with tiercache.TierCache(root=root, policy=only_tier("nvme", capacity=40)) as cache:
        cache.put("D", uint8s(40))
    pol = Policy.from_dict({"tiers": {"hbm": {"capacity": 100}, "host": {"capacity": 80}, "nvme": {"capacity": 40}}})
    with tiercache.TierCache(root=root, policy=pol) as cache:
        cache.put("A", uint8s(60))
        cache.pin("A")
        cache.put("B", uint8s(40))
        # hbm cannot make room for C (A is pinned, B alone frees too little): C must go to host untouched by
        # any demotion from hbm, and D must not be pushed out of nvme.
        assert cache.put("C", uint8s(50)) == "host"
        assert {k: cache.tier_of(k) for k in "ABCD"} == {"A": "hbm", "B": "hbm", "C": "host", "D": "nvme"}
        assert cache.stats().evicted == 0


@pytest.mark.parametrize("fills_after", [0, 3, 6])  # of the entry's 7 writes: a tensor's metadata, one in the middle,
# the entry's own metadata last
def test_a_failed_replacement_keeps_the_old_version(make_cache: CacheFactory, fills_after: int) -> None:
    disk = FillingDisk()
    cache = make_cache(only_tier("nvme"), files=disk)
    cache.put("k", kv(1))
    disk.fill(after=fills_after)
    with pytest.raises(StorageError, match="No space left on device"):
        cache.put("k", kv(2))
    assert disk.refused >= 1
    assert_same(cache.get("k"), kv(1))
    assert cache.stats().tiers["nvme"].used == 64 * 1024
    assert not list((cache.root / "tmp").iterdir())  # the half-written version is gone
    disk.free()
    cache.put("k", kv(3))
    assert_same(cache.get("k"), kv(3))
    assert len(list((cache.root / "entries").glob("*/zarr.json"))) == 1  # the old version's files are gone


@pytest.mark.parametrize("faulty", [FailingFsync, FailingClose])
def test_a_write_the_disk_did_not_make_durable_fails_the_put_and_keeps_the_old_version(
    make_cache: CacheFactory, faulty: type[FailingFsync | FailingClose]
) -> None:
    """EIO from fsync (the writes were lost) or from close (a deferred write error): a StorageError, never an
    entry that may not be there after a crash."""
    disk = faulty()
    cache = make_cache(only_tier("nvme"), files=disk)
    cache.put("k", kv(1))
    disk.failing.set()
    with pytest.raises(StorageError, match="injected"):
        cache.put("k", kv(2))
    disk.failing.clear()
    assert_same(cache.get("k"), kv(1))
    assert not list((cache.root / "tmp").iterdir())
    cache.close()
    with tiercache.TierCache(root=cache.root, policy=only_tier("nvme")) as reopened:
        assert_same(reopened.get("k"), kv(1))


def test_a_replacement_that_needs_the_old_versions_room_gets_it(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("hbm", capacity=100 * 1024))
    cache.put("k", kv(1))
    assert cache.put("k", kv(2)) == "hbm"
    assert_same(cache.get("k"), kv(2))


class FirstPieceFails(FileOps):
    """The write at offset 0 fails with EIO; the one at 4096 waits for that failure, then writes. Records the
    writes and closes in the order they happen."""

    def __init__(self) -> None:
        self.first_failed = threading.Event()
        self.events: list[str] = []

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        if offset == 0:
            self.first_failed.set()
            raise OSError(errno.EIO, "media error")
        self.first_failed.wait()
        written = super().pwritev(fd, buffers, offset)
        self.events.append(f"wrote {offset}")
        return written

    def close(self, fd: int) -> None:
        self.events.append("close")
        super().close(fd)


def test_a_failed_piece_does_not_close_the_file_under_the_others(tmp_path: Path) -> None:
    files = FirstPieceFails()
    io = PosixIO(tmp_path, threads=2, task_size=4096, io="buffered", files=files)
    with pytest.raises(StorageError, match="media error"):
        io.write_file(tmp_path / "entry", torch.full((8192,), 0xAB, dtype=torch.uint8))
    io.close()
    assert files.events == ["wrote 4096", "close"]


def test_close_waits_for_a_get_in_flight(make_cache: CacheFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache(only_tier("nvme"))
    cache.put("k", kv(1))
    reading = threading.Event()
    real_load = cache.tiers["nvme"].load

    def slow_load(uid: int, device: torch.device | None, names: object = None) -> Load:
        reading.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until close() has begun: the cache refuses new work
            try:
                cache.info("k")
            except CacheClosedError:
                break
            time.sleep(0.001)
        return real_load(uid, device, names)  # type: ignore[arg-type]

    monkeypatch.setattr(cache.tiers["nvme"], "load", slow_load)
    result: dict[str, object] = {}
    reader = threading.Thread(target=lambda: result.update(got=cache.get("k")))
    reader.start()
    assert reading.wait(timeout=60), "the get never reached the read"
    cache.close()
    reader.join()
    assert_same(result["got"], kv(1))  # type: ignore[arg-type]


def test_an_unclosed_cache_releases_its_root_when_collected(tmp_path: Path) -> None:
    cache = tiercache.TierCache(root=tmp_path / "root", policy=only_tier("nvme"))
    cache.put("k", kv(1))
    del cache
    gc.collect()
    with tiercache.TierCache(root=tmp_path / "root", policy=only_tier("nvme")) as again:
        assert_same(again.get("k"), kv(1))


def test_a_failed_open_releases_the_root(tmp_path: Path) -> None:
    disk = UnlistableDisk()
    disk.failing.set()
    with pytest.raises(OSError, match="cannot list entries"):
        tiercache.TierCache(root=tmp_path / "root", policy=only_tier("nvme"), files=disk)
    tiercache.TierCache(root=tmp_path / "root", policy=only_tier("nvme")).close()


def test_a_policy_that_asks_for_o_direct_is_refused_where_the_filesystem_has_none(tmp_path: Path) -> None:
    strict = policy(tiers={"nvme": {"io": "o_direct"}})
    with pytest.raises(StorageError, match="O_DIRECT"):
        tiercache.TierCache(root=tmp_path / "root", policy=strict, files=NoDirectIO())
    with tiercache.TierCache(root=tmp_path / "root", policy=policy(), files=NoDirectIO()) as cache:  # auto
        assert cache.stats().nvme_io == "buffered"


@pytest.mark.parametrize("nbytes", [4 * 1024, 4 << 20])  # a file of one piece, and of several
def test_a_close_that_fails_after_a_read_loses_nothing_the_read_returned(
    tmp_path: Path, nbytes: int, caplog: pytest.LogCaptureFixture
) -> None:
    disk = FailingClose()
    with tiercache.TierCache(root=tmp_path / "root", policy=only_tier("nvme", 64 << 20), files=disk) as cache:
        entry = kv(1, nbytes)
        cache.put("k", entry)
        disk.failing.set()
        assert_same(cache.get("k"), entry)
        disk.failing.clear()
    assert "closing a file after reading it failed" in caplog.text


def test_a_bad_stream_argument_is_refused_before_any_read_begins(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    cache.put("k", kv(1))
    with pytest.raises(TypeError, match="stream must be"):
        cache.stream("k", stream="not a stream")
    cache.delete("k")  # no read is left in progress: the bytes go at once, and close() does not wait for one
    assert cache.stats().tiers["host"].used == 0
    cache.close()


class SmallDisk(FileOps):
    """A filesystem that reports `free` bytes free (statvfs), and whose fallocate refuses past `free` when `reserve`;
    counts data writes."""

    def __init__(self, free: int, reserve: bool = False) -> None:
        self.free = free
        self.reserve = reserve
        self.data_writes = 0

    def free_bytes(self, path: object) -> int:
        return self.free

    def fallocate(self, fd: int, length: int) -> bool:
        if self.reserve and length > self.free:
            raise OSError(errno.ENOSPC, "No space left on device (injected: fallocate)")
        return super().fallocate(fd, length)

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        self.data_writes += 1
        return super().pwritev(fd, buffers, offset)


def test_a_budget_above_the_free_space_is_a_warning_with_both_figures(
    make_cache: CacheFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        make_cache(only_tier("nvme", capacity=64 * 1024 * 1024), files=SmallDisk(free=1024 * 1024))
    assert "64 MiB" in caplog.text and "1 MiB free" in caplog.text


def test_an_entry_the_filesystem_has_no_room_for_is_refused_before_a_byte_is_written(
    make_cache: CacheFactory,
) -> None:
    disk = SmallDisk(free=1 << 40)
    cache = make_cache(only_tier("nvme"), files=disk)
    cache.put("k", kv(1))
    disk.free, disk.data_writes = 16 * 1024, 0
    with pytest.raises(StorageError, match="'k'.*needs about") as raised:
        cache.put("k", kv(2))
    assert raised.value.errno == errno.ENOSPC and disk.data_writes == 0
    assert_same(cache.get("k"), kv(1))
    assert not list((cache.root / "tmp").iterdir())


def test_a_chunk_whose_blocks_cannot_be_reserved_fails_the_put_cleanly(make_cache: CacheFactory) -> None:
    disk = SmallDisk(free=1 << 40)
    cache = make_cache(only_tier("nvme"), files=disk)
    cache.put("k", kv(1))
    disk.free, disk.reserve = 1024, True
    disk.free_bytes = lambda path: 1 << 40  # type: ignore[method-assign]  # statvfs says yes; fallocate says no
    with pytest.raises(StorageError, match="No space left") as raised:
        cache.put("k", kv(2))
    assert raised.value.errno == errno.ENOSPC
    assert_same(cache.get("k"), kv(1))


def test_a_replacement_that_fails_in_a_full_nvme_budget_keeps_the_old_version(make_cache: CacheFactory) -> None:
    """The new version is written beside the old one (a shared budget holds both until the new one commits), and
    the old one is there, served and counted, when the write fails for want of disk space."""
    disk = FillingDisk()
    cache = make_cache(only_tier("nvme", capacity=128 * 1024), files=disk)
    cache.put("k", kv(1))
    cache.pin("k")
    disk.fill(after=2)
    with pytest.raises(StorageError):
        cache.put("k", kv(2))
    disk.free()
    assert_same(cache.get("k"), kv(1))
    assert cache.stats().tiers["nvme"].used == 64 * 1024 and cache.info("k").pins == 1
    cache.close()
    with tiercache.TierCache(root=cache.root, policy=only_tier("nvme", capacity=64 * 1024)) as reopened:
        assert_same(reopened.get("k"), kv(1))


class RefusingTrash(FileOps):
    """While `failing`, renames into trash/ fail with EIO (and, with `keep_manifests`, so does unlinking a
    manifest): a disk on which removals fail for a while."""

    def __init__(self, keep_manifests: bool = False) -> None:
        self.failing = threading.Event()
        self.keep_manifests = keep_manifests

    def rename(self, source: StrPath, target: StrPath) -> None:
        if self.failing.is_set() and Path(target).parent.name == "trash":
            raise OSError(errno.EIO, "Input/output error (injected: rename into trash)")
        super().rename(source, target)

    def unlink(self, path: StrPath, *, missing_ok: bool = False) -> None:
        if self.failing.is_set() and self.keep_manifests and Path(path).name == "zarr.json":
            raise OSError(errno.EIO, "Input/output error (injected: unlink)")
        super().unlink(path, missing_ok=missing_ok)


@pytest.mark.parametrize("keep_manifests", [False, True])
def test_an_old_version_the_disk_will_not_remove_stays_counted_and_goes_at_the_next_open(
    make_cache: CacheFactory, keep_manifests: bool
) -> None:
    disk = RefusingTrash(keep_manifests)
    cache = make_cache(only_tier("nvme"), files=disk)
    cache.put("k", kv(1))
    disk.failing.set()
    cache.put("k", kv(2))  # the new version is stored; the old one's removal is refused
    assert_same(cache.get("k"), kv(2))
    assert cache.stats().tiers["nvme"].used == disk_bytes(cache.root) == 2 * 64 * 1024
    cache.close()  # still refusing: the old version is left on disk
    with tiercache.TierCache(root=cache.root, policy=only_tier("nvme")) as reopened:
        assert_same(reopened.get("k"), kv(2))
        assert reopened.stats().tiers["nvme"].used == disk_bytes(cache.root) == 64 * 1024
    assert len([d for d in (cache.root / "entries").iterdir() if d.is_dir()]) == 1
