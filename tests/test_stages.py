"""Handing memory back between stages: offload() moves entries down now, set_capacity() resizes a tier at run
time, reserved() keeps device memory free for the next stage, a device out-of-memory falls back instead of
escaping, and keys(prefix=) / delete(prefix=) work on a request's or a tenant's group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import KiB, MiB, assert_same, kv, policy

import tiercache
from tiercache import CapacityError, EntryValueError
from tiercache.tiers.hbm import HbmTier

ROOMY = policy(tiers={"hbm": {"capacity": 1 * MiB}, "host": {"capacity": 2 * MiB}, "nvme": {"capacity": 16 * MiB}})


def tiers_of(cache: tiercache.TierCache) -> dict[str, str]:
    return {k: cache.tier_of(k) for k in sorted(cache)}


def test_offload_moves_everything_down_now_and_values_stay(make_cache: Any) -> None:
    cache = make_cache(ROOMY)
    for i in range(4):
        cache.put(f"e{i}", kv(i))
    moved = cache.offload(to="host")
    assert sorted(moved.moved) == ["e0", "e1", "e2", "e3"] and moved.nbytes == 4 * 64 * KiB
    assert set(tiers_of(cache).values()) == {"host"} and cache.stats().tiers["hbm"].used == 0
    cache.offload(to="nvme")
    assert set(tiers_of(cache).values()) == {"nvme"} and cache.stats().tiers["host"].used == 0
    for i in range(4):
        assert_same(cache.get(f"e{i}", device="cpu"), kv(i))


def test_offload_by_prefix_and_keys_leaves_the_rest_and_names_what_it_cannot_move(make_cache: Any) -> None:
    cache = make_cache(ROOMY)
    for name in ("req1/a", "req1/b", "req2/a", "pinned"):
        cache.put(name, kv(len(name)))
    cache.pin("pinned")
    moved = cache.offload(prefix="req1/", to="nvme")
    assert sorted(moved.moved) == ["req1/a", "req1/b"]
    assert tiers_of(cache) == {"pinned": "hbm", "req1/a": "nvme", "req1/b": "nvme", "req2/a": "hbm"}
    assert cache.offload("pinned").left == {"pinned": "pinned"}
    assert cache.offload(["req1/a"], to="host").moved == ()  # already below host: left where it is
    with pytest.raises(EntryValueError, match="not both"):
        cache.offload(["req1/a"], prefix="req1/")
    with pytest.raises(EntryValueError, match="to="):
        cache.offload(to="hbm")


def test_offload_to_a_full_host_goes_on_down(make_cache: Any) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 1 * MiB}, "host": {"capacity": 0}}))
    cache.put("a", kv(1))
    assert cache.offload(to="host").moved == ("a",) and cache.tier_of("a") == "nvme"


def test_set_capacity_shrinks_by_demoting_and_grows_back(make_cache: Any) -> None:
    cache = make_cache(ROOMY)
    for i in range(8):
        cache.put(f"e{i}", kv(i))  # 8 x 64 KiB: all in hbm
    cache.set_capacity("hbm", "200KiB")
    stats = cache.stats().tiers
    assert stats["hbm"].capacity == 200 * KiB and stats["hbm"].used <= 200 * KiB and stats["hbm"].entries == 3
    assert [cache.tier_of(f"e{i}") for i in range(5)] == ["host"] * 5  # the least recently used went down
    cache.set_capacity("hbm", 1 * MiB)
    assert cache.put("new", kv(9)) == "hbm"
    for i in range(8):
        assert_same(cache.get(f"e{i}", device="cpu"), kv(i))


def test_set_capacity_refuses_below_what_is_pinned_and_changes_nothing(make_cache: Any) -> None:
    cache = make_cache(ROOMY)
    for i in range(3):
        cache.put(f"e{i}", kv(i))
        cache.pin(f"e{i}")
    with pytest.raises(CapacityError, match="pinned or being read"):
        cache.set_capacity("hbm", 64 * KiB)
    assert cache.stats().tiers["hbm"].capacity == 1 * MiB and set(tiers_of(cache).values()) == {"hbm"}
    with pytest.raises(EntryValueError, match="tier is one of"):
        cache.set_capacity("gpu", 0)
    with pytest.raises(EntryValueError, match="bytes >= 0"):
        cache.set_capacity("hbm", -1)


def test_reserved_keeps_room_free_inside_and_gives_it_back(make_cache: Any) -> None:
    cache = make_cache(ROOMY)
    for i in range(6):
        cache.put(f"e{i}", kv(i))
    with cache.reserved("hbm", "800KiB"):
        hbm = cache.stats().tiers["hbm"]
        assert hbm.capacity == 224 * KiB and hbm.used <= 224 * KiB
        assert cache.put("during", kv(7, 256 * KiB)) == "host"  # the next stage's room is not the cache's
    assert cache.stats().tiers["hbm"].capacity == 1 * MiB
    assert cache.put("after", kv(8, 256 * KiB)) == "hbm"


class RefusingDevice:
    """Makes the hbm tier's device refuse memory (a CUDA out-of-memory) for the next `times` copies into it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, times: int) -> None:
        self.left = times
        original = HbmTier._copy_in

        def copy_in(tier: HbmTier, tensors: Any, device: torch.device, copy: bool) -> Any:
            if self.left > 0:
                self.left -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 KiB (injected)")
            return original(tier, tensors, device, copy)

        monkeypatch.setattr(HbmTier, "_copy_in", copy_in)


def test_a_device_out_of_memory_demotes_and_retries(make_cache: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache(ROOMY)
    cache.put("old", kv(1))
    RefusingDevice(monkeypatch, times=1)
    assert cache.put("new", kv(2)) == "hbm"  # the retry, after demoting "old", got the memory
    assert cache.tier_of("old") == "host"
    assert_same(cache["new"], kv(2))


def test_a_device_that_stays_out_of_memory_falls_back_to_host(make_cache: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache(ROOMY)
    RefusingDevice(monkeypatch, times=100)
    assert cache.put("a", kv(1)) == "host"  # never a raw torch.OutOfMemoryError
    assert "the device refused hbm the memory" in cache.explain("a")
    assert_same(cache.get("a"), kv(1))  # its promotion to hbm fails the same way: it stays in host, served
    assert cache.tier_of("a") == "host"


def test_keys_and_delete_by_prefix_span_tiers_and_caches(tmp_path: Path, make_cache: Any) -> None:
    root = tmp_path / "root"
    first = make_cache(ROOMY, root=root)
    second = make_cache(ROOMY, root=root)
    first.put("tenant7/req1/kv", kv(1))
    first.put("tenant7/req2/kv", kv(2), write_through=True)
    first.put("tenant8/req1/kv", kv(3))
    assert first.keys(prefix="tenant7/") == ["tenant7/req1/kv", "tenant7/req2/kv"]
    assert second.keys(prefix="tenant7/") == ["tenant7/req2/kv"]  # only what reached the shared nvme
    assert first.delete(prefix="tenant7/") == 2
    assert first.keys() == ["tenant8/req1/kv"] and second.keys() == []
    assert first.delete(prefix="nobody/") == 0
    with pytest.raises(EntryValueError, match="not both"):
        first.delete()
    with pytest.raises(EntryValueError, match="prefix="):
        first.keys(prefix=3)  # type: ignore[arg-type]
