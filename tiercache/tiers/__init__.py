"""Tiers behind one interface (base.py), fastest first as `TIER_NAMES` orders them; `TIER_TYPES` registers the
class a cache opens for each name. A new tier is one module here, its entry in `TIER_TYPES`, and a policy section.
A persistent tier whose capacity is 0 opens as an `OffTier`: its disk or server is not touched."""

from __future__ import annotations

from ..policy.schema import TIER_NAMES, Tiers
from .base import DataPath, EntryId, Found, Load, Tier, TierState
from .hbm import HbmTier
from .host import HostTier
from .nvme import NvmeTier
from .object import ObjectTier
from .off import OffTier
from .remote import RemoteTier
from .sizes import SizeOnlyTier

TIER_TYPES: dict[str, type[Tier]] = {
    "hbm": HbmTier,
    "host": HostTier,
    "remote": RemoteTier,
    "nvme": NvmeTier,
    "object": ObjectTier,
}


def open_tiers(budgets: Tiers, path: DataPath, types: dict[str, type[Tier]] | None = None) -> dict[str, Tier]:
    """Every tier of a policy, fastest first; those opened are closed again if a later one fails to open. The
    slowest open first: a root another cache holds is refused before any memory is allocated."""
    opened: dict[str, Tier] = {}
    try:
        for name in reversed(TIER_NAMES):
            kind = (types or TIER_TYPES)[name]
            off = kind.persistent and budgets[name].capacity == 0
            opened[name] = (OffTier if off else kind).open(name, budgets[name], path)
    except BaseException:
        for tier in opened.values():
            tier.close()
        raise
    return {name: opened[name] for name in TIER_NAMES}


__all__ = [
    "DataPath",
    "EntryId",
    "Found",
    "HbmTier",
    "HostTier",
    "Load",
    "NvmeTier",
    "ObjectTier",
    "OffTier",
    "RemoteTier",
    "SizeOnlyTier",
    "TIER_NAMES",
    "TIER_TYPES",
    "Tier",
    "TierState",
    "open_tiers",
]
