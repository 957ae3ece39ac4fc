"""Tiers behind one interface; `TIER_NAMES` orders them fastest first."""

from __future__ import annotations

from ..policy.schema import TIER_NAMES
from .base import EntryId, Tier
from .hbm import MemoryTier
from .host.tier import HostTier
from .nvme.tier import NvmeTier

__all__ = ["EntryId", "HostTier", "MemoryTier", "NvmeTier", "TIER_NAMES", "Tier"]
