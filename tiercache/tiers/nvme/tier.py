"""The nvme tier: entries as zarr v3 groups under the cache's root, read and written by an I/O backend."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ...entry import EntrySpec, Tensors
from ...errors import StorageError, caused_by
from ...io import PosixIO
from ...io.device_io import KvikioIO, why_not_kvikio
from ...policy.schema import NvmeBudget, TierBudget
from ...transfer import Event, all_of
from ...units import format_size
from ..base import DataPath, EntryId, Found, Load, Tier, TierState, select
from .failures import describe, disk_errors
from .format import StoredEntry
from .layout import DiskLayout
from .lock import RootLock

log = logging.getLogger(__name__)


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
        try:
            path.files.mkdir(root, parents=True, exist_ok=True)
            if not path.files.is_dir(root):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(root))
        except OSError as exc:
            raise caused_by(
                StorageError(
                    f"nvme tier: {root} cannot be the cache's root: {describe(exc)}; give root= a directory (or a "
                    "path to create one) on a writable local filesystem"
                ),
                exc,
            ) from exc
        self.lock = RootLock(root, path.files, timeout=path.lock_timeout)  # before any work: a held root is refused
        self.verify = budget.verify_checksums
        self._leftovers: list[StoredEntry] = []  # unindexed, files not yet removed; their bytes still counted
        try:
            self.io = PosixIO(root, threads=budget.threads, task_size=budget.task_size, io=budget.io, files=path.files)
            try:
                self.device_io, self.why_not_device_io = _open_device_io(root, budget, path.device)
                self.layout = DiskLayout(root, self.io, self.device_io, path.buffers, path.files, self.lock)
            except BaseException:
                self.io.close()
                raise
        except BaseException:
            self.lock.release()
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
        found = [Found(s.spec, s.written_ns, s) for s in self.layout.scan()]
        on_disk = sum(f.spec.nbytes for f in found)
        with contextlib.suppress(OSError):
            free = self.path.files.free_bytes(self.layout.root)
            if self.capacity > free + on_disk:
                log.warning(
                    "tiercache: tiers.nvme.capacity is %s but the filesystem of %s has %s free (%s more in entries "
                    "found there): puts will fail with ENOSPC before the budget is reached; lower the capacity or "
                    "free space",
                    format_size(self.capacity),
                    self.layout.root,
                    format_size(free),
                    format_size(on_disk),
                )
        return found

    def adopt(self, entry: EntryId, found: Found) -> None:
        self._admit(entry, found.spec)
        self._stored[entry] = found.handle

    # ---- the verbs --------------------------------------------------------------------------------------------
    def put(
        self, entry: EntryId, spec: EntrySpec, tensors: Tensors, *, source: str, copy: bool, after: Event | None
    ) -> None:
        if after is not None:  # tensors a copy is still filling (an entry promoted moments ago)
            after.synchronize()
        self._clear_leftovers()
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
        Load's host work waits for them, checks them and moves them to `device` where kvikio did not read there.
        Every disk error is the entry's StorageError; a chunk missing, truncated or failing its checksum is a
        CorruptEntryError."""
        stored = self._stored[entry]
        start = time.perf_counter()
        reading = functools.partial(
            disk_errors, "reading", self.layout.root, stored.path, stored.spec.key, stored.spec.nbytes, reading=True
        )
        with reading():
            if names is None:
                landing: Callable[[], Tensors] = self.layout.start_entry_read(stored, self.verify, device)
            else:
                landing = self.layout.start_reads(stored, select(stored.spec, names), self.verify, device)
        dest = self.path.endpoint(device) if device is not None else "host"
        mode = self.mode_for(device)

        def finish() -> tuple[Tensors, Event]:
            with reading():
                tensors = landing()
            if device is not None:
                tensors = {n: t.to(device) for n, t in tensors.items()}
            self._log(self.name, dest, sum(t.nbytes for t in tensors.values()), time.perf_counter() - start, mode)
            return tensors, all_of(())

        return Load(finish=finish)

    def delete(self, entry: EntryId) -> None:
        """Remove the entry's files; a disk that refuses raises StorageError with the entry still stored."""
        self.layout.remove(self._stored[entry])
        del self._stored[entry]
        self._forget(entry)

    def release(self, entry: EntryId) -> None:
        """Delete, or where the disk refuses, unpublish the entry (never served again) and keep its files as
        leftovers, counted in `used`, removed at a later put, at close, or (a directory without its manifest) at
        the next open."""
        try:
            self.delete(entry)
        except StorageError as exc:
            stored = self._stored.pop(entry)
            self._forget(entry)
            if not self.layout.withdraw(stored.path, stored.spec.key):  # a second try (rename) may yet work
                self.used += stored.spec.nbytes  # _forget took them out of `used`; on disk, they count
                self._leftovers.append(stored)
                log.warning(
                    "tiercache: nvme tier: the files of entry %r at %s could not be removed (%s); it is unpublished "
                    "(never served), and its bytes stay counted until a later removal succeeds",
                    stored.spec.key,
                    stored.path,
                    describe(exc.__cause__ or exc),
                )

    def _clear_leftovers(self) -> None:
        for leftover in list(self._leftovers):
            try:
                self.layout.remove(leftover)
            except StorageError:
                return  # the disk still refuses; the next put tries again
            self._leftovers.remove(leftover)
            self.used -= leftover.spec.nbytes

    def close(self) -> None:
        with contextlib.suppress(StorageError):
            self._clear_leftovers()
        self._stored.clear()
        self._specs.clear()
        self._leftovers.clear()
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
