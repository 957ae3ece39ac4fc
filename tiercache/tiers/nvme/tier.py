"""The nvme tier: entries as zarr v3 groups under the cache's root, read and written by an I/O backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ...entry import EntrySpec, Tensors
from ...errors import StorageError
from ...io import PosixIO
from ...io.device_io import KvikioIO, why_not_kvikio
from ...policy.schema import NvmeBudget, TierBudget
from ...transfer import Event, all_of
from ..base import DataPath, EntryId, Found, Load, Tier, TierState, select
from .format import StoredEntry
from .layout import DiskLayout


class NvmeTier(Tier):
    """Host memory moves through the POSIX backend; tensors on the compute device through kvikio where it works
    (`device_io`), without a stop in host memory. The POSIX backend and the layout make their system calls through
    `DataPath.files` (kvikio makes its own)."""

    persistent = True

    def __init__(self, name: str, budget: NvmeBudget, path: DataPath) -> None:
        super().__init__(name, budget.capacity, path)
        if path.root is None:
            raise ValueError("the nvme tier keeps files: DataPath.root is required")
        root = path.root
        path.files.mkdir(root, parents=True, exist_ok=True)
        self.verify = budget.verify_checksums
        self.io = PosixIO(root, threads=budget.threads, task_size=budget.task_size, io=budget.io, files=path.files)
        try:
            self.device_io, self.why_not_device_io = _open_device_io(root, budget, path.device)
            self.layout = DiskLayout(root, self.io, self.device_io, path.buffers, path.files)
        except BaseException:
            self.io.close()
            raise
        self._stored: dict[EntryId, StoredEntry] = {}

    @classmethod
    def open(cls, name: str, budget: TierBudget, path: DataPath) -> NvmeTier:
        return cls(name, budget if isinstance(budget, NvmeBudget) else NvmeBudget(capacity=budget.capacity), path)

    @property
    def mode(self) -> str:
        """How host memory moves to and from the files: "o_direct" or "buffered"."""
        return self.io.mode

    def mode_for(self, device: torch.device | None) -> str:
        """How a transfer to or from `device` runs: "gds" / "compat" (kvikio) or "o_direct" / "buffered" (POSIX)."""
        if self.device_io is not None and device == self.device_io.device:
            return self.device_io.mode
        return self.io.mode

    def describe(self) -> TierState:
        notes = []
        if self.io.mode == "buffered":
            notes.append(f"nvme: buffered I/O because {self.io.why_buffered}")
        if self.device_io is None:
            notes.append(f"nvme: no kvikio path to the device because {self.why_not_device_io}")
        else:
            carried = self.device_io.bytes_by_backend().items()
            notes.append(
                f"nvme: kvikio in {self.device_io.mode} mode (cuFile reports GDS "
                f"{'available' if self.device_io.gds_available else 'unavailable'}); bytes by backend: "
                + (", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in carried) or "n/a")
            )
        return TierState(self.io.mode, self.device_io.mode if self.device_io is not None else None, tuple(notes))

    # ---- entries found on disk --------------------------------------------------------------------------------
    def scan(self) -> list[Found]:
        return [Found(s.spec, s.written_ns, s) for s in self.layout.scan()]

    def adopt(self, entry: EntryId, found: Found) -> None:
        self._admit(entry, found.spec)
        self._stored[entry] = found.handle

    def discard(self, found: Found) -> None:
        self.layout.remove(found.handle)

    # ---- the verbs --------------------------------------------------------------------------------------------
    def put(
        self, entry: EntryId, spec: EntrySpec, tensors: Tensors, *, source: str, copy: bool, after: Event | None
    ) -> None:
        if after is not None:  # tensors a copy is still filling (an entry promoted moments ago)
            after.synchronize()
        self._admit(entry, spec)
        devices = {t.device for t in tensors.values()}
        mode = self.mode_for(devices.pop()) if len(devices) == 1 else self.io.mode
        start = time.perf_counter()
        try:
            self._stored[entry] = self.layout.write(spec, [tensors[t.name] for t in spec.tensors])
        except BaseException:
            self._forget(entry)
            raise
        self._log(source, self.name, spec.nbytes, time.perf_counter() - start, mode)

    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        """Queue the reads now, on the calling thread (its warm memory; no hand-off before the disk starts); the
        Load's host work waits for them, checks them and moves them to `device` where kvikio did not read there."""
        stored = self._stored[entry]
        start = time.perf_counter()
        if names is None:
            landing: Callable[[], Tensors] = self.layout.start_entry_read(stored, self.verify, device)
        else:
            landing = self.layout.start_reads(stored, select(stored.spec, names), self.verify, device)
        dest = self.path.endpoint(device) if device is not None else "host"
        mode = self.mode_for(device)

        def finish() -> tuple[Tensors, Event]:
            tensors = landing()
            if device is not None:
                tensors = {n: t.to(device) for n, t in tensors.items()}
            self._log(self.name, dest, sum(t.nbytes for t in tensors.values()), time.perf_counter() - start, mode)
            return tensors, all_of(())

        return Load(finish=finish)

    def delete(self, entry: EntryId) -> None:
        self._forget(entry)
        self.layout.remove(self._stored.pop(entry))

    def close(self) -> None:
        self._stored.clear()
        self._specs.clear()
        self.used = 0
        try:
            self.layout.close()  # releases the root's lock
        finally:
            self.io.close()


def _open_device_io(root: Path, budget: NvmeBudget, device: torch.device) -> tuple[KvikioIO | None, str | None]:
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
