"""Every tier passes the contract of tiercache.testing; every registered tier is tested here."""

from __future__ import annotations

from test_object_tier import TestObjectTierContract
from test_remote_tier import TestRemoteTierContract

from tiercache.policy.schema import HostBudget, NvmeBudget, TierBudget
from tiercache.testing import TierContract
from tiercache.testing.tiers import KiB
from tiercache.tiers import TIER_TYPES, HbmTier, HostTier, NvmeTier, SizeOnlyTier


class TestHbm(TierContract):
    tier_type = HbmTier
    name = "hbm"


class TestHost(TierContract):
    tier_type = HostTier
    name = "host"

    def budget(self, capacity: int) -> TierBudget:
        return HostBudget(capacity=capacity)


class TestNvme(TierContract):
    tier_type = NvmeTier
    name = "nvme"

    def budget(self, capacity: int) -> TierBudget:
        return NvmeBudget(capacity=capacity, task_size=16 * KiB)


class TestSizeOnly(TierContract):
    tier_type = SizeOnlyTier
    name = "host"
    holds_data = False


def test_every_registered_tier_has_a_contract_class() -> None:
    tested = {cls.tier_type for cls in (TestHbm, TestHost, TestNvme, TestObjectTierContract, TestRemoteTierContract)}
    assert set(TIER_TYPES.values()) <= tested
