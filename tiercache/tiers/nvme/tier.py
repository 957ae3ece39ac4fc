"""The nvme tier: entries as zarr v3 groups under a root directory, read and written by an I/O backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ...entry import EntrySpec, Tensors
from ...errors import StorageError
from ...io import PosixIO
from ...io.buffers import HostBuffers
from ...io.device_io import KvikioIO, why_not_kvikio
from ...policy.schema import NvmeBudget
from ...transfer import Event
from ..base import EntryId, Tier
from .layout import DiskLayout, StoredEntry


class NvmeTier(Tier):
    """Host memory moves through the POSIX backend; tensors on the compute device through kvikio where it works
    (`direct`), without a stop in host memory."""

    def __init__(
        self, root: Path, budget: NvmeBudget, device: torch.device, buffers: HostBuffers | None = None
    ) -> None:
        super().__init__("nvme", budget.capacity)
        root.mkdir(parents=True, exist_ok=True)
        self.verify = budget.verify_checksums
        self.io = PosixIO(root, threads=budget.threads, task_size=budget.task_size, io=budget.io)
        try:
            self.direct, self.why_not_direct = _open_direct(root, budget, device)
            self.layout = DiskLayout(root, self.io, self.direct, buffers)
        except BaseException:
            self.io.close()
            raise
        self.last_write_mode = self.io.mode  # how the latest put moved its bytes, for the pathway's name
        self._stored: dict[EntryId, StoredEntry] = {}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def io_mode(self) -> str:
        return self.io.mode

    def mode_for(self, device: torch.device) -> str:
        """How a transfer to or from `device` runs: "gds" / "compat" (kvikio) or "o_direct" / "buffered" (POSIX)."""
        return self.direct.mode if self.direct is not None and device == self.direct.device else self.io.mode

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

    def put(
        self,
        entry: EntryId,
        spec: EntrySpec,
        tensors: Tensors | None,
        source: str | None = None,
        after: Event | None = None,
    ) -> None:
        if tensors is None:
            raise ValueError(f"tier nvme stores tensors; got none for {spec.key!r}")
        if after is not None:  # tensors a copy is still filling (an entry promoted moments ago)
            after.synchronize()
        self._admit(entry, spec)
        devices = {t.device for t in tensors.values()}
        self.last_write_mode = self.mode_for(devices.pop()) if len(devices) == 1 else self.io.mode
        try:
            self._stored[entry] = self.layout.write(spec, [tensors[t.name] for t in spec.tensors])
        except BaseException:
            self._forget(entry)
            raise

    def read(self, entry: EntryId, device: torch.device | None = None) -> Tensors:
        """The entry's tensors: on `device` where kvikio serves it, else in host memory."""
        return self.layout.read(self._stored[entry], verify=self.verify, device=device)

    def start_entry_read(self, entry: EntryId, device: torch.device | None = None) -> Callable[[], Tensors]:
        """Queue the reads of a whole entry now; the returned call waits for its tensors (DiskLayout)."""
        return self.layout.start_entry_read(self._stored[entry], verify=self.verify, device=device)

    def start_read(self, entry: EntryId, index: int, device: torch.device | None = None) -> Callable[[], torch.Tensor]:
        """Start reading one tensor of an entry; the returned call waits for it (see DiskLayout.start_read)."""
        return self.layout.start_read(self._stored[entry], index, verify=self.verify, device=device)

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


def _open_direct(root: Path, budget: NvmeBudget, device: torch.device) -> tuple[KvikioIO | None, str | None]:
    """The kvikio backend for `device` when the policy allows it and it works here; else None and the reason."""
    if budget.backend == "posix":
        return None, "tiers.nvme.backend is 'posix' in the policy"
    why_not = why_not_kvikio(device, forced=budget.backend == "kvikio")
    if why_not is None:
        try:
            return KvikioIO(root, device, threads=budget.threads, task_size=budget.task_size), None
        except StorageError as exc:
            why_not = str(exc)
    if budget.backend == "kvikio":
        raise StorageError(f"tiers.nvme.backend = 'kvikio' cannot be used: {why_not}")
    return None, why_not
