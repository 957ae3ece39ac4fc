"""The kvikio backend of the nvme tier: its logic on CPU through a stand-in kvikio (tests/fake_kvikio.py), and the
real thing on a CUDA machine (marked gpu). The on-disk format is the same whichever backend wrote it."""

from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import CacheFactory
from fake_kvikio import CALLS, DEFAULTS, MOVED, SETTINGS, CompatMode, install
from helpers import MiB, assert_same, kv, only_tier
from test_entries import DTYPES, sample
from test_layout import entry_dirs, flip_a_byte

import tiercache
from tiercache.errors import CorruptEntryError, StorageError
from tiercache.io.device_io import KvikioIO


def kvikio_policy(backend: str = "kvikio", threads: int = 8) -> tiercache.Policy:
    """Every entry in nvme, through the given backend."""
    nvme = {"capacity": "64MiB", "backend": backend, "threads": threads, "task_size": "1MiB"}
    return tiercache.Policy.from_dict({"tiers": {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": nvme}})


@pytest.fixture
def fake_kvikio(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)


def every_dtype() -> dict[str, torch.Tensor]:
    entry = {f"t{i}": sample(d, (5, 7), seed=i) for i, d in enumerate(DTYPES)}
    entry |= {"scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "big": torch.randn(300_000)}
    return entry


@pytest.mark.usefixtures("fake_kvikio")
def test_puts_and_gets_go_through_kvikio_with_the_policy_settings(make_cache: CacheFactory) -> None:
    before = MOVED["POSIX"]
    cache = make_cache(kvikio_policy(threads=8))
    assert SETTINGS["num_threads"] == 8  # kvikio's one pool, grown to the policy's threads
    entry = every_dtype()
    cache.put("e", entry)
    assert_same(cache.get("e"), entry)
    assert {c.task_size for c in CALLS} == {1 * MiB} and SETTINGS["task_size"] == DEFAULTS["task_size"]  # per call
    stats = cache.stats()
    assert stats.nvme_device_io == "compat"
    assert "put->nvme(compat)" in stats.pathways and "nvme(compat)->hbm" in stats.pathways
    assert MOVED["POSIX"] - before >= 2 * sum(t.nbytes for t in entry.values())
    assert any("kvikio in compat mode" in note for note in stats.notes)


@pytest.mark.usefixtures("fake_kvikio")
def test_two_backends_with_different_settings_keep_their_own(tmp_path: Path) -> None:
    """kvikio's settings are process-wide defaults: a second backend (a second cache) must not change the first's
    task size or compat mode, nor shrink the thread pool it asked for; and kvikio's defaults stay as they were."""
    import kvikio  # the fake

    cpu = torch.device("cpu")
    with kvikio.defaults.set("compat_mode", CompatMode.ON):  # the caller's own setting while the first one opens
        first = KvikioIO(tmp_path, cpu, threads=8, task_size=1 * MiB)
    second = KvikioIO(tmp_path, cpu, threads=2, task_size=3 * MiB)
    assert SETTINGS == DEFAULTS | {"num_threads": 8}  # only the pool changed: grown for the first, not shrunk
    data = torch.arange(5 * MiB, dtype=torch.int32).to(torch.uint8)
    for name, backend in (("a", first), ("b", second), ("c", first)):
        CALLS.clear()
        backend.write_file(tmp_path / name, data)
        back = torch.empty_like(data)
        backend.read_file(tmp_path / name, back, data.numel())()
        assert torch.equal(back, data)
        want = (1 * MiB, CompatMode.ON) if backend is first else (3 * MiB, CompatMode.AUTO)
        assert [(c.op, c.task_size, c.compat_mode) for c in CALLS] == [("pwrite", *want), ("pread", *want)]
        assert all(c.num_threads == 8 for c in CALLS)
    assert SETTINGS == DEFAULTS | {"num_threads": 8}  # the first one's opens put AUTO back each time
    kvikio.defaults.set("task_size", 64 * MiB)  # the caller's own later change of the defaults
    first.write_file(tmp_path / "d", data)
    assert CALLS[-1].task_size == 1 * MiB
    assert (first.mode, second.mode) == ("compat", "compat")


@pytest.mark.usefixtures("fake_kvikio")
def test_what_kvikio_wrote_is_the_same_zarr_format(make_cache: CacheFactory) -> None:
    cache = make_cache(kvikio_policy())
    entry = {"zeros": torch.zeros(64, 64), "x": torch.arange(10.0)}
    cache.put("k", entry)
    cache.close()
    group = zarr.open_group(entry_dirs(cache.root)[0], mode="r")
    np.testing.assert_array_equal(group["t0"][...], np.zeros((64, 64), dtype=np.float32))
    np.testing.assert_array_equal(group["t1"][...], np.arange(10.0, dtype=np.float32))
    with tiercache.TierCache(root=cache.root, policy=only_tier("nvme")) as posix:  # read back by the other backend
        assert_same(posix.get("k"), entry)


@pytest.mark.usefixtures("fake_kvikio")
def test_a_flipped_bit_is_caught_on_the_kvikio_path(make_cache: CacheFactory) -> None:
    cache = make_cache(kvikio_policy())
    cache.put("victim", {"a": torch.arange(1000.0)})
    flip_a_byte(entry_dirs(cache.root)[0] / "t0" / "c" / "0")
    with pytest.raises(CorruptEntryError, match="victim"):
        cache.get("victim")


@pytest.mark.usefixtures("fake_kvikio")
def test_layerwise_streaming_reads_through_kvikio(make_cache: CacheFactory) -> None:
    cache = make_cache(kvikio_policy())
    entry = {f"layer{i}": kv(i)["k"] for i in range(5)}
    cache.put("m", entry)
    assert_same(dict(cache.stream("m", lookahead=2)), entry)
    assert "nvme(compat)->hbm" in cache.stats().pathways


def test_asking_for_kvikio_where_it_is_missing_fails_at_open_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kvikio", None)  # import kvikio raises ImportError
    with pytest.raises(StorageError, match=r"tiers\.nvme\.backend = 'kvikio'.*kvikio is not installed"):
        tiercache.TierCache(root=tmp_path, policy=kvikio_policy())
    with tiercache.TierCache(root=tmp_path, policy=kvikio_policy("auto")) as cache:  # auto falls back
        stats = cache.stats()
        assert stats.nvme_device_io == "none" and any("no kvikio path" in n for n in stats.notes)


class _UnloadableKvikio(importlib.abc.MetaPathFinder):
    """kvikio 26 loads libcufile when imported: without it, `import kvikio` raises a RuntimeError subclass."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "kvikio":
            raise RuntimeError('DynamicLibNotFoundError: no library "cufile" found')


def test_a_kvikio_that_does_not_load_is_a_reason_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "kvikio", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_UnloadableKvikio(), *sys.meta_path])
    with pytest.raises(StorageError, match=r"kvikio is installed but does not load \(RuntimeError: .*cufile"):
        tiercache.TierCache(root=tmp_path, policy=kvikio_policy())
    with tiercache.TierCache(root=tmp_path, policy=kvikio_policy("auto")) as cache:  # auto falls back
        assert cache.stats().nvme_device_io == "none"


@pytest.mark.usefixtures("fake_kvikio")
def test_kvikio_read_buffers_start_on_a_page(make_cache: CacheFactory) -> None:
    """GDS reads straight into device memory only at page-aligned addresses (the CUDA allocator aligns to 512)."""
    device_io = make_cache(kvikio_policy()).tiers["nvme"].device_io
    assert isinstance(device_io, KvikioIO)
    for size in (1, 4096, 12345, 3 << 20):
        torch.empty(size % 1000 + 1, device=device_io.device)  # shift the allocator's next block
        buffer = device_io.empty(size)
        assert buffer.data_ptr() % 4096 == 0 and buffer.numel() == size


def test_a_kvikio_that_cannot_do_io_fails_at_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(sys.modules["kvikio"], "CuFile", broken)
    with pytest.raises(StorageError, match="libcuda.so.1.*backend = 'posix'"):
        tiercache.TierCache(root=tmp_path, policy=kvikio_policy())
    assert not (tmp_path / ".kvikio-probe").exists()


@pytest.mark.gpu
def test_real_kvikio_moves_device_tensors_without_the_host(make_cache: CacheFactory) -> None:
    pytest.importorskip("kvikio", reason="kvikio is not installed: pip install 'tiercache-gpu[cuda13]'")
    cache = make_cache(kvikio_policy())
    entry = {n: t.cuda() for n, t in every_dtype().items()}
    cache.put("e", entry)
    got = cache.get("e")
    assert all(t.is_cuda for t in got.values())
    assert_same(got, entry)
    mode = cache.stats().nvme_device_io
    assert mode in ("gds", "compat")
    assert f"put->nvme({mode})" in cache.stats().pathways and f"nvme({mode})->hbm" in cache.stats().pathways
    flip_a_byte(entry_dirs(cache.root)[0] / "t0" / "c" / "0" / "0", offset=10)
    with pytest.raises(CorruptEntryError):  # verified on the device
        cache.get("e")


@pytest.mark.gpu
def test_real_kvikio_backends_leave_the_defaults_and_each_other_as_they_were(tmp_path: Path) -> None:
    """The real kvikio: opening backends changes no default but the pool (grown, never shrunk); one opened under
    compat mode ON reports compat and reads and writes after the caller's setting has gone, and leaves it gone."""
    kvikio = pytest.importorskip("kvikio", reason="kvikio is not installed: pip install 'tiercache-gpu[cuda13]'")
    pytest.importorskip("kvikio.defaults")
    device = torch.device("cuda")
    keys = ("task_size", "compat_mode")
    before = {key: kvikio.defaults.get(key) for key in keys}
    threads = kvikio.defaults.get("num_threads")
    with kvikio.defaults.set("compat_mode", kvikio.CompatMode.ON):
        first = KvikioIO(tmp_path, device, threads=threads + 3, task_size=1 * MiB)
    second = KvikioIO(tmp_path, device, threads=1, task_size=3 * MiB)
    assert {key: kvikio.defaults.get(key) for key in keys} == before
    assert kvikio.defaults.get("num_threads") == threads + 3
    assert first.mode == "compat"
    data = torch.arange(5 * MiB, dtype=torch.int32, device=device).to(torch.uint8)
    torch.cuda.synchronize()
    for name, backend in (("a", first), ("b", second)):
        backend.write_file(tmp_path / name, data)
        back = backend.empty(data.numel())
        backend.read_file(tmp_path / name, back, data.numel())()
        assert torch.equal(back, data)
    assert {key: kvikio.defaults.get(key) for key in keys} == before
