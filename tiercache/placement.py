"""Placement policies: which tier a new, demoted or promoted entry should go to.

A policy proposes an ordered list of attempts; the cache carries them out (making room by demotion where an
attempt allows it) and takes the first that succeeds. Policies never touch storage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from .config import TIER_NAMES, PlacementSettings, Tiers


@dataclass(frozen=True)
class Attempt:
    """Try to put the entry in `tier`; if `evict`, demote that tier's victims to make room."""

    tier: str
    evict: bool


class PlacementPolicy(ABC):
    name: str = ""

    def __init__(self, settings: PlacementSettings, budgets: Tiers) -> None:
        self.settings = settings
        self.budgets = budgets

    def eligible(self, nbytes: int, below: str | None = None) -> list[str]:
        """Tiers (fastest first, strictly below `below` if given) whose budget admits an entry of this size."""
        start = 0 if below is None else TIER_NAMES.index(below) + 1
        return [t for t in TIER_NAMES[start:] if self.budgets[t].admits(nbytes)]

    @abstractmethod
    def place(self, nbytes: int, free: Mapping[str, int]) -> list[Attempt]:
        """Attempts for a new entry; empty when no tier can ever hold it."""

    @abstractmethod
    def demote(self, nbytes: int, from_tier: str, free: Mapping[str, int]) -> list[Attempt]:
        """Attempts for a victim leaving `from_tier`; empty means it leaves the cache."""

    @abstractmethod
    def promote(self, nbytes: int, current: str, free: Mapping[str, int]) -> list[Attempt]:
        """Attempts to move a just-read entry to a faster tier; empty means it stays where it is."""


class SizePlacement(PlacementPolicy):
    """The fastest tier whose budget and `max_entry` threshold admit the entry's size.

    With on_full = "demote" a full tier demotes its victims to make room; with "next_tier" the entry goes to the
    fastest tier with free space, and only if none has any does the fastest tier demote.
    """

    name = "size"

    def _attempts(self, tiers: list[str], free: Mapping[str, int], nbytes: int) -> list[Attempt]:
        if self.settings.on_full == "demote":
            return [Attempt(t, evict=True) for t in tiers]
        return [Attempt(t, evict=False) for t in tiers if free[t] >= nbytes] + [Attempt(t, evict=True) for t in tiers]

    def place(self, nbytes: int, free: Mapping[str, int]) -> list[Attempt]:
        return self._attempts(self.eligible(nbytes), free, nbytes)

    def demote(self, nbytes: int, from_tier: str, free: Mapping[str, int]) -> list[Attempt]:
        return self._attempts(self.eligible(nbytes, below=from_tier), free, nbytes)

    def promote(self, nbytes: int, current: str, free: Mapping[str, int]) -> list[Attempt]:
        if not self.settings.promote_on_hit:
            return []
        faster = [t for t in self.eligible(nbytes) if TIER_NAMES.index(t) < TIER_NAMES.index(current)]
        evict = self.settings.on_full == "demote"
        return [Attempt(t, evict=evict) for t in faster[:1]]


PLACEMENT_RULES: dict[str, type[PlacementPolicy]] = {SizePlacement.name: SizePlacement}


def make_placement_policy(settings: PlacementSettings, budgets: Tiers) -> PlacementPolicy:
    return PLACEMENT_RULES[settings.rule](settings, budgets)
