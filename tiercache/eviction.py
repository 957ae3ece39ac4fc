"""Eviction policies: which entries of a full tier to demote first.

A policy only orders entries; it never touches storage. The cache walks `victims()` and skips the entries it
may not move (pinned, being read), so a policy needs no knowledge of pins or I/O. One instance per tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterator


class EvictionPolicy(ABC):
    """Tracks the entries of one tier and nominates victims in the order they should leave."""

    name: str = ""

    @abstractmethod
    def inserted(self, entry: Hashable, nbytes: int) -> None:
        """An entry arrived in the tier."""

    @abstractmethod
    def accessed(self, entry: Hashable) -> None:
        """An entry of the tier was read."""

    @abstractmethod
    def removed(self, entry: Hashable) -> None:
        """An entry left the tier (demoted, promoted or deleted)."""

    @abstractmethod
    def victims(self) -> Iterator[Hashable]:
        """Every tracked entry, first victim first. Iterates over a snapshot: removal while iterating is safe."""

    @abstractmethod
    def __len__(self) -> int: ...

    def __contains__(self, entry: object) -> bool:
        return any(entry == e for e in self.victims())


class LruPolicy(EvictionPolicy):
    """Least recently used leaves first; an insert counts as a use."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def inserted(self, entry: Hashable, nbytes: int) -> None:
        self._order[entry] = None
        self._order.move_to_end(entry)

    def accessed(self, entry: Hashable) -> None:
        if entry in self._order:
            self._order.move_to_end(entry)

    def removed(self, entry: Hashable) -> None:
        self._order.pop(entry, None)

    def victims(self) -> Iterator[Hashable]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, entry: object) -> bool:
        return entry in self._order


EVICTION_RULES: dict[str, type[EvictionPolicy]] = {LruPolicy.name: LruPolicy}


def make_eviction_policy(rule: str) -> EvictionPolicy:
    return EVICTION_RULES[rule]()
