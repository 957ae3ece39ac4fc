"""The contract every tier keeps, run against each tier through one factory per tier name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import KiB, assert_same, kv

from tiercache import CapacityError, EntrySpec
from tiercache.policy.schema import TIER_NAMES, NvmeBudget
from tiercache.tiers import HostTier, MemoryTier, NvmeTier, Tier
from tiercache.transfer import Transfers

CAPACITY = 256 * KiB

TIER_FACTORIES: dict[str, Callable[[Path], Tier]] = {
    "hbm": lambda root: MemoryTier("hbm", CAPACITY, torch.device("cpu")),
    "host": lambda root: HostTier(
        CAPACITY, pin=True, transfers=Transfers(torch.device("cpu"), 64 * KiB), on_copy=lambda *_: None
    ),
    "nvme": lambda root: NvmeTier(root, NvmeBudget(capacity=CAPACITY, task_size=16 * KiB), torch.device("cpu")),
}


def test_every_tier_has_a_factory() -> None:
    assert set(TIER_FACTORIES) == set(TIER_NAMES)


@pytest.fixture
def tier(tier_name: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    t = TIER_FACTORIES[tier_name](tmp_path / "root")
    yield t
    t.close()
    if isinstance(t, HostTier):
        t.transfers.close()


def test_put_read_round_trips_and_accounts_exactly(tier: Tier) -> None:
    data = kv(1, 100 * KiB)
    spec = EntrySpec.of("a", data)
    tier.put(1, spec, data)
    assert 1 in tier and len(tier) == 1 and tier.used == spec.nbytes and tier.free == CAPACITY - spec.nbytes
    got = tier.read(1)
    assert_same(got, data)
    assert all(t.device.type == tier.device.type for t in got.values())
    tier.delete(1)
    assert 1 not in tier and len(tier) == 0 and tier.used == 0


def test_a_put_beyond_the_budget_is_refused_and_stores_nothing(tier: Tier) -> None:
    first = kv(1, 200 * KiB)
    tier.put(1, EntrySpec.of("a", first), first)
    used = tier.used
    second = kv(2, 100 * KiB)
    with pytest.raises(CapacityError, match=tier.name):
        tier.put(2, EntrySpec.of("b", second), second)
    assert tier.used == used and 2 not in tier
    assert_same(tier.read(1), first)


def test_an_entry_id_is_stored_once(tier: Tier) -> None:
    data = kv(1, 4 * KiB)
    tier.put(1, EntrySpec.of("a", data), data)
    with pytest.raises(ValueError, match="already holds"):
        tier.put(1, EntrySpec.of("a", data), data)


def test_two_versions_of_one_key_live_side_by_side(tier: Tier) -> None:
    old, new = kv(1, 8 * KiB), kv(2, 8 * KiB)
    tier.put(1, EntrySpec.of("same", old), old)
    tier.put(2, EntrySpec.of("same", new), new)
    tier.delete(1)
    assert_same(tier.read(2), new)
