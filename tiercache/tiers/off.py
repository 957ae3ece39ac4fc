"""The tier a cache opens in place of a persistent one whose capacity is 0: it holds nothing and touches nothing.

A disk or a store that a cache does not use is not opened at all: no root index to join (whose budget is the
smallest member's, so an nvme tier of capacity 0 would take every other cache's nvme budget on the root to 0), no
I/O threads, no server to connect to."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..entry import EntrySpec, Tensors
from ..errors import EntryValueError, StorageError
from ..policy.schema import TierBudget
from ..transfer import Event
from .base import DataPath, EntryId, Load, Tier, TierState


class OffTier(Tier):
    """A tier a policy turned off (capacity 0): admits nothing, finds nothing, and cannot be given a budget later
    (the store behind it was never opened)."""

    def __init__(self, name: str, path: DataPath) -> None:
        super().__init__(name, 0, path)

    @classmethod
    def open(cls, name: str, budget: TierBudget, path: DataPath) -> Tier:
        return cls(name, path)

    @property
    def capacity(self) -> int:
        return 0

    @capacity.setter
    def capacity(self, nbytes: int) -> None:
        if nbytes:
            raise EntryValueError(
                f"the {self.name} tier is off in this cache (tiers.{self.name}.capacity was 0 when it opened), so "
                f"it cannot be given a budget now; open a cache whose policy gives tiers.{self.name} a capacity"
            )

    def describe(self) -> TierState:
        return TierState(None, None, (f"{self.name}: off (capacity 0)",))

    def put(
        self,
        entry: EntryId,
        spec: EntrySpec,
        tensors: Tensors,
        *,
        source: str,
        copy: bool,
        after: Event | None,
        written_ns: int | None = None,
    ) -> None:
        raise StorageError(
            f"{self.name} tier: put({spec.key!r}) of {spec.nbytes} bytes: the tier is off "
            f"(tiers.{self.name}.capacity is 0); give it a capacity"
        )

    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        raise KeyError(entry)  # holds nothing: the engine never asks

    def delete(self, entry: EntryId) -> None:
        raise KeyError(entry)

    def close(self) -> None:
        pass
