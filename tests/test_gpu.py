"""The same contracts with a CUDA device as hbm. Skipped, with the reason shown, where CUDA is absent."""

from __future__ import annotations

import pytest
import torch
from conftest import CacheFactory
from helpers import KiB, assert_same, kv, only_tier, policy
from test_entries import DTYPES, sample

pytestmark = pytest.mark.gpu


def on_cuda(entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.cuda() for n, t in entry.items()}


def test_the_compute_device_is_cuda(make_cache: CacheFactory) -> None:
    cache = make_cache(policy())
    assert cache.device.type == "cuda" and cache.stats().device.startswith("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tensors_round_trip_through_every_tier(
    make_cache: CacheFactory, tier_name: str, dtype: torch.dtype
) -> None:
    cache = make_cache(only_tier(tier_name))
    entry = {
        "x": sample(dtype, (3, 5, 7)).cuda(),
        "scalar": sample(dtype, ()).cuda(),
        "empty": sample(dtype, (0, 4)).cuda(),
    }
    cache.put("k", entry)
    got = cache.get("k")
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same(got, entry)
    assert_same(cache.get("k", device="cpu"), entry)


def test_demotion_and_promotion_move_between_device_and_host(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 100 * KiB}, "host": {"capacity": 100 * KiB}}))
    for i in range(4):
        cache.put(f"e{i}", on_cuda(kv(i)))
    assert [cache.tier_of(f"e{i}") for i in range(4)] == ["nvme", "nvme", "host", "hbm"]
    for i in range(4):
        assert_same(cache.get(f"e{i}"), kv(i))
    paths = cache.stats().pathways
    assert (
        "hbm->host(pinned)" in paths
        and "host(pinned)->hbm" in paths
        and any(p.startswith("nvme(") and p.endswith("->hbm") for p in paths)
    )
    assert cache.get("e0")["k"].is_cuda


def test_a_hit_returns_the_cached_device_tensors(make_cache: CacheFactory) -> None:
    cache = make_cache(policy())
    cache.put("k", on_cuda(kv(1)))
    first, second = cache.get("k"), cache.get("k")
    assert first["k"].data_ptr() == second["k"].data_ptr()
