"""The hbm tier: entries as tensors held on the compute device (CPU memory on a machine without CUDA)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..entry import EntrySpec, Tensors
from ..errors import DeviceMemoryError
from ..transfer import Event, consumer_stream
from .base import DataPath, EntryId, Load, Tier, same_device, select


class HbmTier(Tier):
    """Holds each entry's tensors with the event after which they hold their values (the caller's queued work for
    a put, the copy that filled them for a promotion): loads to the compute device hand out the tensors themselves
    with that event; loads elsewhere copy them after it."""

    def __init__(self, name: str, capacity: int, path: DataPath) -> None:
        super().__init__(name, capacity, path)
        self._data: dict[EntryId, tuple[Tensors, Event]] = {}

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
        device = self.path.device
        stream = consumer_stream(device)
        moves = copy or any(not same_device(t.device, device) for t in tensors.values())
        if moves and after is not None:
            stream.wait(after)  # the copies read values that another copy is still filling
        start = time.perf_counter()
        # Copied here, before accounting, so that a failed copy (out of memory) leaves the tier as it was.
        try:
            held = self._copy_in(tensors, device, copy)
        except torch.OutOfMemoryError as exc:
            raise DeviceMemoryError(
                f"tier {self.name}: {device} could not allocate {spec.nbytes} bytes for entry {spec.key!r} within "
                f"the budget ({self.free} of {self.capacity} free): other allocations on the device hold the memory"
            ) from exc
        self._admit(entry, spec)
        # The values are there once the device's queued work is done (the caller's, or these copies).
        self._data[entry] = (held, stream.record() if moves or after is None else after)
        if moves:
            self._log(source, self.name, spec.nbytes, time.perf_counter() - start)

    def _copy_in(self, tensors: Tensors, device: torch.device, copy: bool) -> Tensors:
        """The tensors on the device (copies, or themselves where they are there and `copy` is False)."""
        return {name: t.to(device, copy=copy) for name, t in tensors.items()}

    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        held, ready = self._data[entry]
        spec = self.spec(entry)
        chosen = {spec.tensors[i].name: held[spec.tensors[i].name] for i in select(spec, names)}
        if device is None or same_device(device, self.path.device):
            return Load(chosen, ready)
        consumer_stream(self.path.device).wait(ready)  # the copies come after whatever filled the tensors
        start = time.perf_counter()
        copies = {n: t.to(device, copy=True) for n, t in chosen.items()}
        nbytes = sum(t.nbytes for t in copies.values())
        self._log(self.name, self.path.endpoint(device), nbytes, time.perf_counter() - start)
        return Load(copies)

    def delete(self, entry: EntryId) -> None:
        self._forget(entry)
        del self._data[entry]

    def reload_pathway(self) -> None:
        return None  # already there

    def close(self) -> None:
        for entry in list(self._data):
            self.delete(entry)
