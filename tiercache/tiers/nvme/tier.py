"""The nvme tier: entries as zarr v3 groups under the cache's root, read and written by an I/O backend."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ...entry import EntrySpec, Tensors
from ...errors import CapacityError, EntryNotFoundError, StorageError, caused_by
from ...io import PosixIO
from ...io.device_io import KvikioIO, why_not_kvikio
from ...policy.schema import NvmeBudget, TierBudget
from ...transfer import Event, all_of
from ...units import format_size
from ..base import DataPath, EntryId, Found, Load, Refresh, Tier, TierState, select
from . import upkeep
from .failures import describe, disk_errors
from .format import StoredEntry
from .index import RootIndex, Transaction
from .layout import DiskLayout

log = logging.getLogger(__name__)


RETRY_S, RETRY_MAX_S = 1.0, 60.0  # an entry whose manifest could not be read is tried again, waits doubling
SWEEP_EVERY_S = 1.0  # how often a member recovers dead members' leases and removes the files of removed entries


class NvmeTier(Tier):
    """Host memory moves through the POSIX backend; tensors on the compute device through kvikio where it works
    (`device_io`), without a stop in host memory. The POSIX backend and the layout make their system calls through
    `DataPath.files` (kvikio and SQLite make their own).

    The root is shared: every cache that opens it, in any process, is a member of its index (index.py), which
    holds the entries committed, the budget taken, and the leases of readers. An entry is written under tmp/ with
    room reserved in the index, then published (renamed into entries/) and indexed in one transaction; a removal
    marks it in the index, then its metadata goes, and its chunks once nobody reads it."""

    persistent = True
    durable = True
    shared = True

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
        self.read_only = path.read_only
        self.verify = budget.verify_checksums
        self.grace_ns = int(budget.removal_grace_s * 1e9)
        self._stored: dict[EntryId, StoredEntry] = {}
        self._held: dict[EntryId, tuple[StoredEntry, int]] = {}  # held by streams (hold()), even once removed
        self._uids: dict[str, EntryId] = {}  # directory name -> entry id, for what this cache has indexed
        self._ignored: set[str] = set()  # found but not taken: an older version than this cache's, or withdrawn
        # found but unreadable (an I/O error, damage): name -> (when to try again, monotonic; the wait after that)
        self._unreadable: dict[str, tuple[float, float]] = {}
        self._used_here: dict[str, int] = {}  # name -> time.time_ns() just after this cache last leased or put it
        self._total = 0  # the budget taken, by every member: refreshed after each transaction
        self._root_budget: int | None = None  # the smallest budget of the members open on the root
        self._last_sweep = 0.0
        self._closed = False
        self.index = RootIndex(
            root, path.files, capacity=budget.capacity, read_only=self.read_only, timeout=path.lock_timeout
        )
        try:
            self.io = PosixIO(
                root,
                threads=budget.threads,
                task_size=budget.task_size,
                io=budget.io,
                files=path.files,
                probe_file=self.index.path if self.read_only else None,  # a reader writes no POSIX probe file
            )
            try:
                self.device_io, self.why_not_device_io = _open_device_io(root, budget, path.device)
                self.layout = DiskLayout(root, self.io, self.device_io, path.buffers, path.files)
                self._reconcile()
            except BaseException:
                self.io.close()
                raise
        except BaseException:
            self.index.close()
            raise

    @classmethod
    def open(cls, name: str, budget: TierBudget, path: DataPath) -> NvmeTier:
        return cls(name, budget if isinstance(budget, NvmeBudget) else NvmeBudget(capacity=budget.capacity), path)

    @property
    def used(self) -> int:
        """Bytes of the root's budget taken, by every member (index.py says what counts)."""
        return self._total

    @property
    def capacity(self) -> int:
        """This cache's budget, or the root's where a member with a smaller one is open: the budget is shared."""
        own = self._own_capacity
        return own if self._root_budget is None else min(own, self._root_budget)

    @capacity.setter
    def capacity(self, nbytes: int) -> None:
        self._own_capacity = nbytes
        if hasattr(self, "index"):  # a resize at run time (not the base class's first assignment)
            with self.index.transaction() as tx:
                tx.set_capacity(nbytes)
                self._account(tx)

    def _account(self, tx: Transaction) -> None:
        self._total = tx.total()
        self._root_budget = tx.budget()

    @property
    def writable(self) -> bool:
        return not self.read_only

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
        with contextlib.suppress(StorageError):
            members = [m for m in self.index.members() if m.alive]
            others = [f"{m.pid}{' (read-only)' if m.read_only else ''}" for m in members if m.token != self.index.token]
            notes.append(
                f"nvme: root {self.layout.root} shared by {len(members)} open cache(s)"
                + (f"; other processes: {', '.join(others)}" if others else "")
                + ("; this one read-only" if self.read_only else "")
            )
        return TierState(self.io.mode, self.device_io.mode if self.device_io is not None else None, tuple(notes))

    # ---- the shared index -------------------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """At open: recover dead members, index entries on disk the index lacks (a crash between publish and
        commit, or a root from before the index), forget rows whose directories are gone, clear tmp/ and trash/.
        Runs under the index's write lock: no member publishes meanwhile."""
        if self.read_only:
            self._sweep(now=True)
            return
        layout = self.layout
        with self.index.transaction() as tx:
            self._recover(tx)
            rows = {row.name: row for row in tx.all_rows()}
            in_progress = tx.staging_names()  # a write publishing, or one whose commit failed and is taken back
            for name in layout.entry_names():
                if name in rows or name in in_progress:
                    continue
                found = upkeep.unindexed(name, layout.entries_dir, layout.files, tx)
                if found.kind in ("withdrawn", "older"):  # an older version is never served
                    with contextlib.suppress(OSError):
                        layout.remove_by_name(name)
                elif found.kind == "unreadable":  # never delete what does not verify
                    assert found.error is not None
                    self._skip(name, found.error)
                else:
                    assert found.stored is not None
                    stored = found.stored
                    tx.insert(name, stored.spec.key, stored.spec.nbytes, stored.written_ns)
            for row in upkeep.vanished(rows, layout.entries_dir, self.path.files):
                if row.doomed_ns is None:
                    log.warning("tiercache: entry %r (%s) is indexed but its files are gone", row.key, row.name)
                tx.forget(row.name)
            layout.clear(layout.tmp_dir, keep=in_progress)
            layout.clear(layout.trash_dir)
        self._sweep(now=True)
        with contextlib.suppress(OSError):
            free = self.path.files.free_bytes(layout.root)
            if self.capacity > free + self._total:
                log.warning(
                    "tiercache: tiers.nvme.capacity is %s but the filesystem of %s has %s free (%s more in entries "
                    "found there): puts will fail with ENOSPC before the budget is reached; lower the capacity or "
                    "free space",
                    format_size(self.capacity),
                    layout.root,
                    format_size(free),
                    format_size(self._total),
                )

    def _recover(self, tx: Transaction) -> None:
        """Drop the leases, reservations and staging directories of members whose process is gone."""
        for member in upkeep.dead_members(tx, self.index.members_dir, self.index.token):
            for staging in tx.drop_member(member.token):
                self.layout.remove_later(self.layout.tmp_dir / staging)
            with contextlib.suppress(OSError):
                self.path.files.unlink(self.index.members_dir / f"{member.token}.lock", missing_ok=True)

    def _sweep(self, wait: bool = True, *, now: bool = False) -> None:
        """Recover dead members, then remove the files of removed entries nobody reads (after the grace period):
        on the layout's remover thread, or before returning with `now` (at open and close, where nobody waits on
        a hot read). With `wait` False, a member holding the index now means the sweep is left to a later call
        (Busy)."""
        self._last_sweep = time.monotonic()
        trashed = []
        with self.index.transaction(wait=wait) as tx:
            self._recover(tx)
            if not self.read_only:
                for row in tx.reapable(self.grace_ns):  # _recover dropped the dead members' leases
                    try:
                        trashed.append(self.layout.to_trash(row.name))
                    except OSError as exc:  # counted from now on; the next sweep tries again
                        log.warning("tiercache: the files of removed entry %r stay for now: %s", row.key, exc)
                        tx.stuck(row.name)
                        continue
                    tx.forget(row.name)
                tx.prune_removed()
            self._account(tx)
        for target in trashed:
            if target is not None:
                (self.layout.discard if now else self.layout.remove_later)(target)

    def _sweep_in_background(self) -> None:
        """The periodic sweep, on the layout's remover thread: a write transaction (and the disk behind it) is no
        work for the get that happens to notice the time; best effort (another member may hold the index: Busy)."""
        if self._closed:
            return
        try:
            self._sweep(wait=False)
        except StorageError:
            pass
        except Exception:  # noqa: BLE001 - a thread of ours: say it, and let the next sweep try again
            log.exception("tiercache: nvme tier: the periodic sweep of %s failed", self.layout.root)

    def refresh(self) -> Refresh:
        if time.monotonic() - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = time.monotonic()  # one queued at a time
            self.layout.in_background(self._sweep_in_background)
        changed = self.index.changed()
        now = time.monotonic()
        if not changed and not any(due <= now for due, _ in self._unreadable.values()):
            return Refresh()
        found: list[Found] = []
        gone: list[EntryId] = []
        deleted: list[EntryId] = []
        if changed:
            changes = self.index.changes()
            self._total, self._root_budget = self.index.usage()
            gone = [self._uids[name] for name, _ in changes.removed if name in self._uids]
            deleted = [self._uids[name] for name, why in changes.removed if why == "delete" and name in self._uids]
            for name, _ in changes.removed:
                self._ignored.discard(name)
                self._unreadable.pop(name, None)
            if changes.everything:
                live = {row.name for row in changes.added}
                gone += [uid for name, uid in self._uids.items() if name not in live and uid not in gone]
                self._unreadable = {n: retry for n, retry in self._unreadable.items() if n in live}
            for uid in gone:
                self._forget_local(uid)
            for row in changes.added:
                if row.name not in self._uids and row.name not in self._ignored and row.name not in self._unreadable:
                    found += self._found(row.name, None)
        for name, (due, wait) in list(self._unreadable.items()):
            if due <= now:
                found += self._found(name, wait)
        return Refresh(found, gone, deleted)

    def _found(self, name: str, waited: float | None) -> list[Found]:
        """The live entry `name` another member indexed, read from its manifest; none where it cannot be read yet
        (tried again later, the waits doubling: `waited` is the last one, None at the first try) or is gone."""
        try:
            stored = self.layout.parse(name)
        except (OSError, ValueError) as exc:  # removed meanwhile (its manifest goes first), or damaged
            self._unreadable.pop(name, None)
            if self.path.files.exists(self.layout.entries_dir / name / "zarr.json"):
                wait = RETRY_S if waited is None else min(2 * waited, RETRY_MAX_S)
                if waited is None:
                    log.warning(
                        "tiercache: skipping entry %s for now (tried again in %g s, then less often; delete it to "
                        "reclaim if it stays damaged): %s",
                        self.layout.entries_dir / name,
                        wait,
                        exc,
                    )
                self._unreadable[name] = (time.monotonic() + wait, wait)
            else:
                self._ignored.add(name)
            return []
        self._unreadable.pop(name, None)
        return [Found(stored.spec, stored.written_ns, stored)]

    def _skip(self, name: str, exc: BaseException) -> None:
        log.warning(
            "tiercache: skipping entry %s (left on disk; delete it to reclaim): %s", self.layout.entries_dir / name, exc
        )

    def adopt(self, entry: EntryId, found: Found) -> None:
        stored: StoredEntry = found.handle
        self._specs[entry] = stored.spec
        self._stored[entry] = stored
        self._uids[stored.path.name] = entry

    def ignore(self, found: Found) -> None:
        self._ignored.add(found.handle.path.name)

    def _forget_local(self, entry: EntryId) -> None:
        stored = self._stored.pop(entry)
        self._uids.pop(stored.path.name, None)
        self._used_here.pop(stored.path.name, None)
        self._specs.pop(entry, None)

    @contextlib.contextmanager
    def hold(self, entry: EntryId) -> Iterator[None]:
        """One lease for a series of loads: another cache's removal meanwhile leaves the files, and this tier the
        entry's handle, until the last load is done."""
        stored = self._lease(entry)
        _, holders = self._held.get(entry, (stored, 0))
        self._held[entry] = (stored, holders + 1)
        try:
            yield
        finally:
            stored, holders = self._held.pop(entry)
            if holders > 1:
                self._held[entry] = (stored, holders - 1)
            self._unlease(stored)

    def revive(self, entry: EntryId) -> bool:
        stored = self._stored.get(entry)
        if stored is None or self.read_only:
            return stored is not None
        if not self.path.files.exists(stored.path / "zarr.json"):
            return False
        try:
            with self.index.transaction() as tx:
                live = tx.live(stored.spec.key)
                alive = (live is not None and live.name == stored.path.name) or tx.revive(stored.path.name)
                self._account(tx)
        except StorageError:
            return False
        return alive

    def remember_dropped(self, dropped: dict[str, str]) -> None:
        if self.read_only or not dropped:
            return
        with self.index.transaction() as tx:
            for key, reason in dropped.items():
                tx.drop(key, reason)

    def why_missing(self, key: str) -> str | None:
        try:
            with self.index.snapshot() as tx:
                found = tx.dropped(key)
        except StorageError:
            return None
        if found is None:
            return None
        reason, when, pid = found
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when / 1e9))
        return f"process {pid} held it in memory only and let go of it when its cache closed ({stamp}): {reason}"

    def _read_only_error(self, what: str, key: str) -> StorageError:
        return StorageError(
            f"nvme tier: cannot {what} entry {key!r}: this cache opened {self.layout.root} read-only; open it with "
            "read_only=False to write"
        )

    # ---- the verbs --------------------------------------------------------------------------------------------
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
        if self.read_only:
            raise self._read_only_error("write", spec.key)
        if entry in self._specs:
            raise ValueError(f"tier {self.name} already holds entry {entry!r}")
        if after is not None:  # tensors a copy is still filling (an entry promoted moments ago)
            after.synchronize()
        name = self.layout.new_name(spec.key)
        self._reserve(name, spec)
        devices = {t.device for t in tensors.values()}
        mode = self.mode_for(devices.pop()) if len(devices) == 1 else self.io.mode
        start = time.perf_counter()
        published: StoredEntry | None = None
        try:
            with self.path.unlocked():  # the slow part, outside the cache's lock: the room is reserved already
                # a copy from another tier (a demotion, a flush, write-behind) is nobody's wait: off this process's GIL
                staged = self.layout.stage(
                    name, spec, [tensors[t.name] for t in spec.tensors], written_ns, background=source != "put"
                )
            with self.index.transaction() as tx:
                published = self.layout.publish(staged)
                if not tx.insert(name, spec.key, spec.nbytes, published.written_ns):
                    log.debug("tiercache: %r was written to nvme after a newer version: indexed as removed", spec.key)
                tx.cancel(name)
                self._account(tx)
        except BaseException:
            if published is not None:  # renamed in, but the index did not commit it: never served
                self.layout.withdraw(published.path, spec.key)
            with contextlib.suppress(StorageError), self.index.transaction() as tx:
                tx.cancel(name)
                self._account(tx)
            raise
        self._specs[entry] = spec
        self._stored[entry] = published
        self._uids[name] = entry
        self._used_here[name] = time.time_ns()
        self._log(source, self.name, spec.nbytes, time.perf_counter() - start, mode)

    def _reserve(self, name: str, spec: EntrySpec) -> None:
        """Take the entry's room in the shared budget, or raise CapacityError when it is not there."""
        with self.index.transaction() as tx:
            self._account(tx)
            if self._total + spec.nbytes > self.capacity:
                raise CapacityError(
                    f"tier {self.name}: entry {spec.key!r} needs {spec.nbytes} bytes, {self.capacity - self._total} "
                    f"of {self.capacity} free in {self.layout.root} (its budget is shared by every cache open on it)"
                )
            tx.reserve(name, spec.key, spec.nbytes)
            self._total += spec.nbytes

    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        """Lease the entry (its files stay while this read runs, whoever removes it), then queue the reads on the
        calling thread (its warm memory; no hand-off before the disk starts); the Load's host work waits for them,
        checks them and moves them to `device` where kvikio did not read there. Every disk error is the entry's
        StorageError; a chunk missing, truncated or failing its checksum is a CorruptEntryError."""
        stored = self._lease(entry)
        start = time.perf_counter()
        reading = functools.partial(
            disk_errors, "reading", self.layout.root, stored.path, stored.spec.key, stored.spec.nbytes, reading=True
        )
        try:
            with reading():
                if names is None:
                    landing: Callable[[], Tensors] = self.layout.start_entry_read(stored, self.verify, device)
                else:
                    landing = self.layout.start_reads(stored, select(stored.spec, names), self.verify, device)
        except BaseException:
            self._unlease(stored)
            raise
        dest = self.path.endpoint(device) if device is not None else "host"
        mode = self.mode_for(device)

        def finish() -> tuple[Tensors, Event]:
            try:
                with reading():
                    tensors = landing()
            finally:
                self._unlease(stored)
            if device is not None:
                tensors = {n: t.to(device) for n, t in tensors.items()}
            self._log(self.name, dest, sum(t.nbytes for t in tensors.values()), time.perf_counter() - start, mode)
            return tensors, all_of(())

        return Load(finish=finish)

    def used_elsewhere(self, entry: EntryId) -> float | None:
        """Every member's lease and put stamps the entry's row (`last_used_ns`); a stamp later than this cache's own
        last one is another member's use."""
        stored = self._stored.get(entry)
        if stored is None:
            return None
        with self.index.snapshot() as tx:
            row = tx.live(stored.spec.key)
        if row is None or row.name != stored.path.name or row.last_used_ns <= self._used_here.get(row.name, 0):
            return None
        return max(0.0, (time.time_ns() - row.last_used_ns) / 1e9)

    def _lease(self, entry: EntryId) -> StoredEntry:
        """Lease an entry for one load; EntryNotFoundError where another cache removed it first."""
        stored = self._stored.get(entry) or self._held.get(entry, (None, 0))[0]
        if stored is None:  # another cache removed it since this read began (refresh forgot it here)
            raise EntryNotFoundError(f"an entry in {self.layout.root} was removed by another cache as it was read")
        with self.index.transaction() as tx:
            leased = tx.lease(stored.path.name)
        self._used_here[stored.path.name] = time.time_ns()  # not before the row's time: not a use "elsewhere"
        if not leased:
            raise EntryNotFoundError(
                f"entry {stored.spec.key!r} was removed from {self.layout.root} by another cache just before this "
                "read; nothing was read"
            )
        return stored

    def _unlease(self, stored: StoredEntry) -> None:
        try:
            with self.index.transaction() as tx:
                tx.unlease(stored.path.name)
        except StorageError as exc:  # the lease ends with this cache at the latest
            log.warning("tiercache: the lease on entry %r stays until this cache closes: %s", stored.spec.key, exc)

    def delete(self, entry: EntryId) -> None:
        """Remove the entry for every member (their memory copies too): committed in the index (an index that refuses
        raises StorageError with the entry still stored), then its metadata files go, and its chunks once nobody
        reads them."""
        self._remove(entry, "delete")

    def _remove(self, entry: EntryId, why: str) -> None:
        stored = self._stored[entry]
        if self.read_only:
            raise self._read_only_error("remove", stored.spec.key)
        with self.index.transaction() as tx:
            tx.doom(stored.path.name, why)
            self._account(tx)
        self.layout.unpublish(stored)
        self._forget_local(entry)
        if self.grace_ns == 0:
            with contextlib.suppress(StorageError):  # the removal has happened; its files wait for the next sweep
                self._sweep(wait=False)

    def release(self, entry: EntryId) -> None:
        """Remove an entry evicted or replaced (other members keep their memory copies), or where the index refuses,
        forget it here (the other members may still serve it: it is whole) and say so. A read-only cache only
        forgets it."""
        stored = self._stored[entry]
        if self.read_only:
            self._forget_local(entry)
            return
        try:
            self._remove(entry, "evict")
        except StorageError as exc:  # raised before _remove forgot it here
            self._forget_local(entry)
            self._ignored.add(stored.path.name)
            log.warning(
                "tiercache: nvme tier: entry %r at %s could not be removed from the index (%s); it stays on disk, "
                "whole, for the next cache that opens the root",
                stored.spec.key,
                stored.path,
                exc,
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(StorageError):
                self._sweep(now=True)
        finally:
            self._stored.clear()
            self._specs.clear()
            self._uids.clear()
            try:
                self.index.close()
            finally:
                try:
                    self.layout.close()
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
