"""Tiers behind one interface; `TIER_NAMES` orders them fastest first."""

from __future__ import annotations

from ..config import TIER_NAMES
from .base import EntryId, Tier
from .host import HostTier
from .memory import MemoryTier
from .nvme import NvmeTier

__all__ = ["EntryId", "HostTier", "MemoryTier", "NvmeTier", "TIER_NAMES", "Tier"]
