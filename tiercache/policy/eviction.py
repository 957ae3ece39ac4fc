"""Eviction policies: which entries of a full tier to demote first.

A policy only orders entries; it never touches storage. The engine walks `victims()` and skips the entries it
may not move (pinned, being read, of higher priority), so a policy needs no knowledge of pins or I/O. One
instance per tier. What a policy may weigh is handed to it as `Usage`.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    """What the engine knows of an entry when it arrives in a tier or is used there."""

    nbytes: int
    uses: int  # puts and gets of this entry so far
    reload_s: float  # predicted seconds to bring it back to hbm if it leaves this tier


class EvictionPolicy(ABC):
    """Tracks the entries of one tier and nominates victims in the order they should leave."""

    name: str = ""

    @abstractmethod
    def inserted(self, entry: Hashable, usage: Usage) -> None:
        """An entry arrived in the tier."""

    @abstractmethod
    def accessed(self, entry: Hashable, usage: Usage) -> None:
        """An entry of the tier was read."""

    @abstractmethod
    def removed(self, entry: Hashable, evicted: bool = False) -> None:
        """An entry left the tier: `evicted` when it was a victim, else promoted, replaced or deleted."""

    @abstractmethod
    def victims(self) -> Iterator[Hashable]:
        """Every tracked entry, first victim first. Iterates over a snapshot: removal while iterating is safe."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, entry: object) -> bool: ...


class LruPolicy(EvictionPolicy):
    """Least recently used leaves first; an insert counts as a use."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def inserted(self, entry: Hashable, usage: Usage) -> None:
        self._order[entry] = None
        self._order.move_to_end(entry)

    def accessed(self, entry: Hashable, usage: Usage) -> None:
        if entry in self._order:
            self._order.move_to_end(entry)

    def removed(self, entry: Hashable, evicted: bool = False) -> None:
        self._order.pop(entry, None)

    def victims(self) -> Iterator[Hashable]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, entry: object) -> bool:
        return entry in self._order


class FifoPolicy(LruPolicy):
    """First in, first out: uses do not reorder."""

    name = "fifo"

    def accessed(self, entry: Hashable, usage: Usage) -> None:
        pass


class _ScoredPolicy(EvictionPolicy):
    """Victims in ascending score; ties broken by least recent use."""

    def __init__(self) -> None:
        self._scores: dict[Hashable, tuple[float, int]] = {}
        self._clock = itertools.count()

    @abstractmethod
    def score(self, usage: Usage) -> float: ...

    def inserted(self, entry: Hashable, usage: Usage) -> None:
        self._scores[entry] = (self.score(usage), next(self._clock))

    def accessed(self, entry: Hashable, usage: Usage) -> None:
        if entry in self._scores:
            self._scores[entry] = (self.score(usage), next(self._clock))

    def removed(self, entry: Hashable, evicted: bool = False) -> None:
        self._scores.pop(entry, None)

    def victims(self) -> Iterator[Hashable]:
        return iter(sorted(self._scores, key=self._scores.__getitem__))

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, entry: object) -> bool:
        return entry in self._scores


class LfuPolicy(_ScoredPolicy):
    """Least frequently used leaves first (uses over the entry's life, not just in this tier)."""

    name = "lfu"

    def score(self, usage: Usage) -> float:
        return float(usage.uses)


class GdsfPolicy(_ScoredPolicy):
    """Greedy-Dual-Size-Frequency: value = L + uses x reload cost / size; the lowest value leaves first.

    L ("inflation") rises to the value of each evicted entry, so entries that were valuable long ago age out
    instead of staying forever on old counts. The reload cost is the cost model's time to bring the entry back
    from the tier it would fall to: where that is latency + bytes / bandwidth, small entries (latency-bound)
    are kept before large ones; with a bandwidth-only profile the size cancels out and the value ranks uses
    and how slow the tier below is per byte.
    """

    name = "gdsf"

    def __init__(self) -> None:
        super().__init__()
        self.inflation = 0.0

    def score(self, usage: Usage) -> float:
        return self.inflation + usage.uses * usage.reload_s / max(usage.nbytes, 1)

    def removed(self, entry: Hashable, evicted: bool = False) -> None:
        scored = self._scores.pop(entry, None)
        if evicted and scored is not None:
            self.inflation = max(self.inflation, scored[0])


EVICTION_RULES: dict[str, type[EvictionPolicy]] = {
    rule.name: rule for rule in (LruPolicy, LfuPolicy, FifoPolicy, GdsfPolicy)
}


def make_eviction_policy(rule: str) -> EvictionPolicy:
    return EVICTION_RULES[rule]()
