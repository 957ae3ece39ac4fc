"""The simulator's tier: it accounts bytes and holds nothing, and logs the transfers a real tier would make."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..entry import EntrySpec, Tensors
from ..pathway import Pathway
from ..transfer import Event
from .base import DataPath, EntryId, Load, Tier, select

# The mode the cost model charges each simulated tier's reloads at: the host pool as if pageable (no CUDA assumed).
SIMULATED_MODES = {"host": "pageable"}


class SizeOnlyTier(Tier):
    """A tier of `capacity` bytes holding nothing (see SharedSizeOnlyTier for a shared tier's stand-in)."""

    def __init__(self, name: str, capacity: int, path: DataPath) -> None:
        super().__init__(name, capacity, path)

    @property
    def mode(self) -> str | None:
        return SIMULATED_MODES.get(self.name)

    def reload_pathway(self) -> Pathway | None:
        return None if self.name == "hbm" else super().reload_pathway()  # the simulated compute device itself

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
        self._admit(entry, spec)
        if source != self.name:
            self._log(source, self.name, spec.nbytes, 0.0, self.mode)

    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        spec = self.spec(entry)
        nbytes = sum(spec.tensors[i].nbytes for i in select(spec, names))
        if device is not None and self.name != "hbm":
            self._log(self.name, self.path.endpoint(device), nbytes, 0.0, self.mode)
        return Load({})

    def delete(self, entry: EntryId) -> None:
        self._forget(entry)

    def close(self) -> None:
        self._specs.clear()
        self._used = 0


class SharedSizeOnlyTier(SizeOnlyTier):
    """The stand-in for a shared tier (nvme on a root, remote, object): a replaced entry's room is free only once
    the new version is in, as in the real one, so a simulated full tier refuses the replacements a cache would."""

    shared = True


def size_only_tier(kind: type[Tier], name: str, capacity: int, path: DataPath) -> SizeOnlyTier:
    """The simulator's stand-in for a tier of class `kind`, with its flags."""
    return (SharedSizeOnlyTier if kind.shared else SizeOnlyTier)(name, capacity, path)
