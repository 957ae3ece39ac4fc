"""Placement policies: which tier a new, demoted or promoted entry should go to.

A policy proposes an ordered list of attempts with the reason for its choice; the engine carries them out
(making room by demotion where an attempt allows it) and takes the first that succeeds. Policies never touch
storage. A put may carry a reload deadline: the policy then picks the cheapest tier whose predicted reload
meets it, from the cost model, unless a faster tier that also meets it has room (a deadline says how slow a tier
may be, not that a fast one should be left empty); without one, the size thresholds of the policy file decide.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .schema import TIER_NAMES, PlacementSettings, Tiers

ReloadSeconds = Callable[[str, int], float]  # (tier, bytes) -> predicted seconds to bring it back to hbm


@dataclass(frozen=True)
class Attempt:
    """Try to put the entry in `tier`; if `evict`, demote that tier's victims to make room."""

    tier: str
    evict: bool


@dataclass(frozen=True)
class Plan:
    """Where a new entry should go, in order of preference, and why."""

    attempts: list[Attempt]
    reason: str
    reload_ms: dict[str, float] = field(default_factory=dict)  # predicted reload per admitting tier


class PlacementPolicy(ABC):
    name: str = ""

    def __init__(self, settings: PlacementSettings, budgets: Tiers, reload_seconds: ReloadSeconds) -> None:
        self.settings = settings
        self.budgets = budgets
        self.reload_seconds = reload_seconds

    def eligible(self, nbytes: int, below: str | None = None) -> list[str]:
        """Tiers (fastest first, strictly below `below` if given) whose budget admits an entry of this size."""
        start = 0 if below is None else TIER_NAMES.index(below) + 1
        return [t for t in TIER_NAMES[start:] if self.budgets[t].admits(nbytes)]

    @abstractmethod
    def place(self, nbytes: int, free: Mapping[str, int], deadline_ms: float | None = None) -> Plan:
        """Attempts for a new entry; none when no tier can ever hold it."""

    @abstractmethod
    def demote(self, nbytes: int, from_tier: str, free: Mapping[str, int]) -> list[Attempt]:
        """Attempts for a victim leaving `from_tier`; empty means it leaves the cache."""

    @abstractmethod
    def promote(self, nbytes: int, current: str, free: Mapping[str, int]) -> list[Attempt]:
        """Attempts to move a just-read entry to a faster tier; empty means it stays where it is."""


class SizePlacement(PlacementPolicy):
    """The fastest tier whose budget and `max_entry` threshold admit the entry's size.

    With on_full = "demote" a full tier demotes its victims to make room; with "next_tier" the entry goes to the
    fastest tier with free space, and only if none has any does the fastest tier demote. With a deadline, the
    fastest tier that meets it and has room for the entry comes first, so that a deadline never sends an entry
    below a faster tier with room; where none has room, the cheapest (slowest) admitting tier whose predicted
    reload meets it, making room there, then the faster ones.
    """

    name = "size"

    def _attempts(self, tiers: list[str], free: Mapping[str, int], nbytes: int) -> list[Attempt]:
        if self.settings.on_full == "demote":
            return [Attempt(t, evict=True) for t in tiers]
        return [Attempt(t, evict=False) for t in tiers if free[t] >= nbytes] + [Attempt(t, evict=True) for t in tiers]

    def _by_size(self, tiers: list[str], free: Mapping[str, int], nbytes: int, why: str, role: str) -> Plan:
        """The plan by size alone, `why` explaining tiers[0] first; where on_full = next_tier puts a tier with free
        room ahead of it, the reason names that tier instead (`role`: what tiers[0] is, in a phrase)."""
        attempts = self._attempts(tiers, free, nbytes)
        first = attempts[0].tier
        if first != tiers[0]:
            why = f"{first}: the fastest tier with free room for it (on_full = next_tier); {tiers[0]}, {role}, has none"
        return Plan(attempts, why, {t: self.reload_seconds(t, nbytes) * 1e3 for t in tiers})

    def place(self, nbytes: int, free: Mapping[str, int], deadline_ms: float | None = None) -> Plan:
        tiers = self.eligible(nbytes)
        if not tiers:
            return Plan([], "no tier's capacity and max_entry admit it", {})
        if deadline_ms is None:
            role = "the fastest tier that admits its size"
            return self._by_size(tiers, free, nbytes, f"{tiers[0]}: {role}", role)
        reload_ms = {t: self.reload_seconds(t, nbytes) * 1e3 for t in tiers}
        meeting = [t for t in tiers if reload_ms[t] <= deadline_ms]
        if not meeting:
            missed = f"no tier meets the {deadline_ms:g} ms deadline (fastest reload {reload_ms[tiers[0]]:.3g} ms)"
            why = f"{tiers[0]}: {missed}, so the fastest that admits it"
            return self._by_size(tiers, free, nbytes, why, f"the fastest that admits it, as {missed}")
        cheapest = meeting[-1]
        order = [cheapest, *reversed(meeting[:-1])]  # then the faster ones, nearest in cost first
        missing = [t for t in tiers if t not in meeting]  # a last resort when no tier that meets it has room
        roomy = next(t for t in meeting if free[t] >= nbytes or t == cheapest)  # cheapest only when none has room
        if roomy == cheapest:
            reason = (
                f"{cheapest}: the cheapest tier whose predicted reload ({reload_ms[cheapest]:.3g} ms) meets the "
                f"{deadline_ms:g} ms deadline"
            )
        else:  # filling free room costs no demotion: the slower tier is kept for when the faster ones are full
            order = [roomy, *(t for t in order if t != roomy)]
            reason = (
                f"{roomy}: a faster tier with room for it, whose predicted reload ({reload_ms[roomy]:.3g} ms) meets "
                f"the {deadline_ms:g} ms deadline; a deadline never sends an entry below a faster tier with room "
                f"({cheapest} is the cheapest that meets it)"
            )
        return Plan([Attempt(t, evict=True) for t in order + missing], reason, reload_ms)

    def demote(self, nbytes: int, from_tier: str, free: Mapping[str, int]) -> list[Attempt]:
        return self._attempts(self.eligible(nbytes, below=from_tier), free, nbytes)

    def promote(self, nbytes: int, current: str, free: Mapping[str, int]) -> list[Attempt]:
        if not self.settings.promote_on_hit:
            return []
        faster = [t for t in self.eligible(nbytes) if TIER_NAMES.index(t) < TIER_NAMES.index(current)]
        evict = self.settings.on_full == "demote"
        return [Attempt(t, evict=evict) for t in faster[:1]]


PLACEMENT_RULES: dict[str, type[PlacementPolicy]] = {SizePlacement.name: SizePlacement}


def make_placement_policy(
    settings: PlacementSettings, budgets: Tiers, reload_seconds: ReloadSeconds
) -> PlacementPolicy:
    return PLACEMENT_RULES[settings.rule](settings, budgets, reload_seconds)
