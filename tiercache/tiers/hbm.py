"""Memory tiers: `hbm` (the compute device) and `host` (CPU RAM). Entries are tensors held on the tier's device."""

from __future__ import annotations

import torch

from ..entry import EntrySpec, Tensors
from ..transfer import Event
from .base import EntryId, Tier


class MemoryTier(Tier):
    keeps_tensors = True

    def __init__(self, name: str, capacity: int, device: torch.device) -> None:
        super().__init__(name, capacity)
        self._device = device
        self._data: dict[EntryId, Tensors] = {}

    @property
    def device(self) -> torch.device:
        return self._device

    def put(
        self,
        entry: EntryId,
        spec: EntrySpec,
        tensors: Tensors | None,
        source: str | None = None,
        after: Event | None = None,
    ) -> None:
        if tensors is None:
            raise ValueError(f"tier {self.name} stores tensors; got none for {spec.key!r}")
        # Tensors already on this device are kept as handed over; others are copied here, before accounting,
        # so that a failed copy (out of memory) leaves the tier as it was.
        moved = {name: t.to(self._device) for name, t in tensors.items()}
        self._admit(entry, spec)
        self._data[entry] = moved

    def read(self, entry: EntryId) -> Tensors:
        return dict(self._data[entry])

    def delete(self, entry: EntryId) -> None:
        self._forget(entry)
        del self._data[entry]

    def close(self) -> None:
        for entry in list(self._data):
            self.delete(entry)
