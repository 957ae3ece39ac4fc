"""tiercache: a tiered tensor cache for GPU pipelines (hbm -> host -> nvme)."""

from __future__ import annotations

from .cache import Decision, EntryInfo, Moved, PrefetchHandle, TierCache, default_device
from .entry import DTYPES, EntrySpec, TensorSpec
from .errors import (
    CacheClosedError,
    CapacityError,
    CorruptEntryError,
    DeviceMemoryError,
    EntryNotFoundError,
    EntryTypeError,
    EntryValueError,
    PolicyError,
    RootInUseError,
    StorageError,
    TierCacheError,
)
from .policy.schema import TIER_NAMES, Policy, preset_names
from .stats import CacheStats, PathwayStats, TierStats
from .units import format_size, parse_size

__version__ = "0.2.0"

__all__ = [
    "CacheClosedError",
    "Decision",
    "CacheStats",
    "CapacityError",
    "DeviceMemoryError",
    "CorruptEntryError",
    "DTYPES",
    "EntryInfo",
    "Moved",
    "EntryNotFoundError",
    "EntrySpec",
    "EntryTypeError",
    "EntryValueError",
    "PathwayStats",
    "Policy",
    "PolicyError",
    "PrefetchHandle",
    "RootInUseError",
    "StorageError",
    "TIER_NAMES",
    "TensorSpec",
    "TierCache",
    "TierCacheError",
    "TierStats",
    "default_device",
    "format_size",
    "parse_size",
    "preset_names",
    "__version__",
]
