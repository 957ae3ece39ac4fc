"""The nvme tier: entries as zarr v3 groups under a root directory, read and written by an I/O backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import NvmeBudget
from ..entry import EntrySpec, Tensors
from ..io import PosixIO
from ..layout import DiskLayout, StoredEntry
from .base import EntryId, Tier


class NvmeTier(Tier):
    def __init__(self, root: Path, budget: NvmeBudget) -> None:
        super().__init__("nvme", budget.capacity)
        root.mkdir(parents=True, exist_ok=True)
        self.verify = budget.verify_checksums
        self.io = PosixIO(root, threads=budget.threads, task_size=budget.task_size, io=budget.io)
        try:
            self.layout = DiskLayout(root, self.io)
        except BaseException:
            self.io.close()
            raise
        self._stored: dict[EntryId, StoredEntry] = {}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def io_mode(self) -> str:
        return self.io.mode

    def scan(self) -> list[StoredEntry]:
        """Entries found on disk, oldest first; the caller adopts those it keeps."""
        return self.layout.scan()

    def adopt(self, entry: EntryId, stored: StoredEntry) -> None:
        """Account an entry that is already on disk."""
        self._admit(entry, stored.spec)
        self._stored[entry] = stored

    def discard(self, stored: StoredEntry) -> None:
        """Remove an on-disk entry that was never adopted."""
        self.layout.remove(stored)

    def put(self, entry: EntryId, spec: EntrySpec, tensors: Tensors | None, source: str | None = None) -> None:
        if tensors is None:
            raise ValueError(f"tier nvme stores tensors; got none for {spec.key!r}")
        self._admit(entry, spec)
        try:
            self._stored[entry] = self.layout.write(spec, [tensors[t.name] for t in spec.tensors])
        except BaseException:
            self._forget(entry)
            raise

    def read(self, entry: EntryId) -> Tensors:
        return self.layout.read(self._stored[entry], verify=self.verify)

    def start_read(self, entry: EntryId, index: int) -> Callable[[], torch.Tensor]:
        """Start reading one tensor of an entry; the returned call waits for it (see DiskLayout.start_read)."""
        return self.layout.start_read(self._stored[entry], index, verify=self.verify)

    def stored(self, entry: EntryId) -> StoredEntry:
        return self._stored[entry]

    def delete(self, entry: EntryId) -> None:
        self._forget(entry)
        self.layout.remove(self._stored.pop(entry))

    def close(self) -> None:
        self._stored.clear()
        self._specs.clear()
        self.used = 0
        self.layout.close()
        self.io.close()
