"""Bad input is refused with the library's own errors before any work: policy files, capacities, roots, devices,
a closed cache, and broadcast views too large for every tier (refused without materialising them)."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CacheFactory
from helpers import MiB, kv, policy

import tiercache
from tiercache.errors import CacheClosedError, CapacityError, EntryValueError, PolicyError, StorageError

# ---- policy files ----------------------------------------------------------------------------------------------


def test_a_policy_file_that_is_not_utf8_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(b"\xff\xfe[tiers]")
    with pytest.raises(PolicyError) as caught:
        tiercache.TierCache(tmp_path / "root", policy=path)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "root").exists()  # refused before the root was made


def test_a_policy_path_that_is_a_directory_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.mkdir()
    with pytest.raises(PolicyError) as caught:
        tiercache.TierCache(tmp_path / "root", policy=path)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "root").exists()


# ---- capacity ----------------------------------------------------------------------------------------------------


def test_a_host_tier_far_above_ram_is_a_policy_error_naming_the_key_and_figure(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(PolicyError) as caught:
        tiercache.TierCache(root, policy=policy(tiers={"host": {"capacity": "1024TiB"}}))
    message = str(caught.value)
    assert "tiers.host.capacity" in message and "1024 TiB" in message and "RAM available" in message, message
    assert 'policy="auto"' in message
    with tiercache.TierCache(root, policy=policy()) as cache:  # nothing of the refused open is left
        assert len(cache) == 0


# ---- roots -------------------------------------------------------------------------------------------------------


def _a_regular_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


def _under_a_regular_file(tmp_path: Path) -> Path:
    return _a_regular_file(tmp_path) / "sub"


def _under_proc(tmp_path: Path) -> Path:
    return Path("/proc/tiercache-test")


@pytest.mark.parametrize("make_root", [_a_regular_file, _under_a_regular_file, _under_proc], ids=lambda f: f.__name__)
def test_a_root_that_cannot_be_a_directory_is_a_storage_error(
    tmp_path: Path, make_root: Callable[[Path], Path]
) -> None:
    root = make_root(tmp_path)
    with pytest.raises(StorageError) as caught:
        tiercache.TierCache(root, policy=policy())
    assert str(root) in str(caught.value)


# ---- devices -----------------------------------------------------------------------------------------------------


def test_get_to_a_bogus_device_is_an_entry_value_error(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(), device="cpu")
    cache.put("k", kv(0))
    with pytest.raises(EntryValueError, match="bogus"):
        cache.get("k", device="bogus")
    assert "k" in cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: device='cuda' is a real device")
def test_get_to_cuda_without_cuda_is_an_entry_value_error(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(), device="cpu")
    cache.put("k", kv(0))
    with pytest.raises(EntryValueError, match="CUDA"):
        cache.get("k", device="cuda")


def test_a_cache_on_a_bogus_device_is_an_entry_value_error(tmp_path: Path) -> None:
    with pytest.raises(EntryValueError, match="bogus"):
        tiercache.TierCache(tmp_path / "root", policy=policy(), device="bogus")
    assert not (tmp_path / "root").exists()


# ---- a closed cache ----------------------------------------------------------------------------------------------

AFTER_CLOSE: dict[str, Callable[[tiercache.TierCache], Any]] = {
    "keys": lambda cache: cache.keys(),
    "len": lambda cache: len(cache),
    "contains": lambda cache: "k" in cache,
    "get": lambda cache: cache.get("k"),
    "put": lambda cache: cache.put("k2", kv(1)),
}


@pytest.mark.parametrize("operation", list(AFTER_CLOSE))
def test_a_closed_cache_refuses_every_operation(make_cache: CacheFactory, operation: str) -> None:
    cache = make_cache(policy(), device="cpu")
    cache.put("k", kv(0))
    cache.close()
    with pytest.raises(CacheClosedError):
        AFTER_CLOSE[operation](cache)
    assert "closed" in repr(cache)


# ---- broadcast views ---------------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) for this process; False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """This process's peak resident memory, in bytes: VmHWM, else getrusage's ru_maxrss (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def test_a_broadcast_view_refused_by_capacity_is_never_materialised(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(), device="cpu")  # hbm 1 MiB, host 2 MiB, nvme 16 MiB
    view = torch.zeros(1, dtype=torch.uint8).expand(1 << 30)  # 1 GiB of values, one byte of memory
    _reset_peak_rss()  # where it cannot be reset, ru_maxrss only grows if this put's peak is a new high
    before = _peak_rss()
    with pytest.raises(CapacityError):
        cache.put("big", {"x": view})
    grew = _peak_rss() - before
    assert grew < 256 * MiB, f"put() of a refused 1 GiB broadcast view raised the peak RSS by {grew >> 20} MiB"
    assert "big" not in cache and len(cache) == 0


@contextlib.contextmanager
def _address_space_capped(headroom: int) -> Iterator[None]:
    """At most `headroom` more bytes of address space for this process meanwhile (RLIMIT_AS): a library that
    tried to materialise a huge view gets an allocation error, not the OOM killer, wherever the kernel overcommits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                size = int(line.split()[1]) << 10
    if size == 0:
        yield
        return
    cap = size + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_4_tib_broadcast_view_is_a_capacity_error(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(), device="cpu")
    view = torch.zeros(1, dtype=torch.uint8).expand(4 << 40)
    with _address_space_capped(1 << 40), pytest.raises(CapacityError):
        cache.put("huge", {"x": view})
    assert "huge" not in cache and len(cache) == 0
