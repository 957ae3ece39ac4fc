"""The Tier interface: a byte budget and a store of entries keyed by entry id. Tiers never pick victims."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from ..entry import EntrySpec, Tensors
from ..errors import CapacityError
from ..transfer import Event

EntryId = int  # unique per stored version of an entry, so a replaced key never collides with itself


class Tier(ABC):
    """One level of the cache. Accounting is exact: `used` is the payload bytes of the entries held, and a put
    that would take it over `capacity` raises instead of storing (the cache makes room first)."""

    name: str
    keeps_tensors: bool = False  # True: read() returns the tier's own tensors, cheap to hand over under a lock
    logs_transfers: bool = False  # True: put() records its own transfer (it completes asynchronously)

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.used = 0
        self._specs: dict[EntryId, EntrySpec] = {}

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def __contains__(self, entry: object) -> bool:
        return entry in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[EntryId]:
        return iter(list(self._specs))

    def spec(self, entry: EntryId) -> EntrySpec:
        return self._specs[entry]

    def _admit(self, entry: EntryId, spec: EntrySpec) -> None:
        if entry in self._specs:
            raise ValueError(f"tier {self.name} already holds entry {entry!r}")
        if spec.nbytes > self.free:
            raise CapacityError(
                f"tier {self.name}: entry {spec.key!r} needs {spec.nbytes} bytes, {self.free} of {self.capacity} free"
            )
        self._specs[entry] = spec
        self.used += spec.nbytes

    def _forget(self, entry: EntryId) -> EntrySpec:
        spec = self._specs.pop(entry)
        self.used -= spec.nbytes
        return spec

    @property
    def label(self) -> str:
        """The tier as a pathway names it, e.g. "host(pinned)"."""
        return self.name

    @abstractmethod
    def put(
        self,
        entry: EntryId,
        spec: EntrySpec,
        tensors: Tensors | None,
        source: str | None = None,
        after: Event | None = None,
    ) -> None:
        """Store an entry. The tier may keep the given tensors (the caller hands them over). `source` names where
        they come from, for tiers that log their own transfers; `after` is an event the tensors' values wait on
        (a copy still filling them), which the tier must order its reads after."""

    @abstractmethod
    def read(self, entry: EntryId) -> Tensors:
        """The entry's tensors. Memory tiers return their own tensors (callers copy before handing them out)."""

    @abstractmethod
    def delete(self, entry: EntryId) -> None:
        """Drop an entry and release its bytes."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where `read()` returns tensors."""

    @abstractmethod
    def close(self) -> None:
        """Release what the tier holds in memory (on-disk entries stay)."""
