"""TierCache: the front door. Owns the tiers, the placement and eviction policies, and the bookkeeping.

Invariants kept under one lock:
- an entry lives in one memory tier at most (hbm or host) and may also keep a copy in nvme: a read from nvme
  that promotes the entry leaves its disk copy in place, so it survives the process and its later demotion is free;
- every tier's `used` is the exact payload of the entries it holds and never exceeds its capacity;
- pinned entries and entries being read or moved are never chosen as victims; a deleted entry that is still
  being read keeps its bytes (and its budget) until the last reader is done.
Disk reads and memory copies for `get`/`prefetch` run outside the lock; writes and demotions run under it.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch

from .config import TIER_NAMES, Policy, resolve_policy
from .entry import EntrySpec, Tensors, TensorSpec, check_key, normalize_tensors
from .errors import CacheClosedError, CapacityError, EntryNotFoundError, EntryValueError, TierCacheError
from .eviction import EvictionPolicy, make_eviction_policy
from .layout import StoredEntry
from .placement import Attempt, PlacementPolicy, make_placement_policy
from .stats import CacheStats, TierStats, TransferLog
from .tiers import MemoryTier, NvmeTier, Tier
from .units import format_size

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """The compute device: the current CUDA device where CUDA works, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class _Record:
    uid: int
    spec: EntrySpec
    tiers: list[str] = field(default_factory=list)  # where it lives, fastest first
    pins: int = 0
    readers: int = 0  # gets, prefetches and moves in progress: not evictable, storage kept if deleted
    deleted: bool = False

    @property
    def busy(self) -> bool:
        return self.pins > 0 or self.readers > 0


@dataclass(frozen=True)
class EntryInfo:
    """Where an entry lives and what it holds."""

    key: str
    nbytes: int
    tiers: tuple[str, ...]  # fastest first; tiers[0] is what tier_of() returns
    pins: int
    tensors: tuple[TensorSpec, ...]


class PrefetchHandle:
    """A load running in the background. `wait()` returns the tensors, or raises what the load raised."""

    def __init__(self, key: str, future: Future[Tensors]) -> None:
        self.key = key
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Tensors:
        return self._future.result(timeout)


class TierCache:
    """A three-tier tensor cache: `hbm` (compute device), `host` (CPU RAM) and `nvme` (zarr v3 files under root).

    >>> with TierCache(root="/mnt/nvme/tc", policy="cpu") as cache:
    ...     cache.put("flux/seed42/kv", {"block0.k": k0, "block0.v": v0})
    ...     kv = cache.get("flux/seed42/kv")

    `policy` is a `Policy`, a path to a TOML policy file or a preset name ("cpu", "h100", ...). `root` is the
    nvme tier's directory; entries that reach it survive the process. With `root=None` a temporary directory
    is used and removed at close.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        policy: str | Path | Policy | None = None,
        *,
        device: str | torch.device | None = None,
    ) -> None:
        self.policy: Policy = resolve_policy(policy)
        self.device: torch.device = torch.device(device) if device is not None else default_device()
        self._temp_root = Path(tempfile.mkdtemp(prefix="tiercache-")) if root is None else None
        self.root = self._temp_root or Path(root)  # type: ignore[arg-type]
        budgets = self.policy.tiers
        self._nvme = NvmeTier(self.root, budgets.nvme)
        self._prefetcher = ThreadPoolExecutor(2, thread_name_prefix="tiercache-prefetch")
        self._finalizer = weakref.finalize(self, _shut_down, self._nvme, self._prefetcher, self._temp_root)
        self._tiers: dict[str, Tier] = {
            "hbm": MemoryTier("hbm", budgets.hbm.capacity, self.device),
            "host": MemoryTier("host", budgets.host.capacity, torch.device("cpu")),
            "nvme": self._nvme,
        }
        self._order: dict[str, EvictionPolicy] = {
            t: make_eviction_policy(self.policy.eviction.rule) for t in TIER_NAMES
        }
        self._placement: PlacementPolicy = make_placement_policy(self.policy.placement, budgets)
        self._lock = threading.RLock()
        self._records: dict[str, _Record] = {}
        self._by_uid: dict[int, _Record] = {}
        self._uids = itertools.count()
        self._hits = dict.fromkeys(TIER_NAMES, 0)
        self._misses = 0
        self._evicted = 0
        self._log = TransferLog()
        self._active_reads = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False
        try:
            self._adopt_disk_entries()
        except BaseException:
            self._finalizer()
            raise

    # ---- the public contract ----------------------------------------------------------------------------------
    def put(self, key: str, tensors: Mapping[str, Any], *, copy: bool = True) -> str:
        """Store `tensors` (a mapping of names to torch tensors or numpy arrays) under `key`; returns the tier.

        Replaces an existing entry of that key (its pins carry over). With `copy=False` the cache may keep the
        given tensors themselves when they are already contiguous on the chosen tier's device: do not modify
        them afterwards. Raises CapacityError, leaving everything stored as it was, when no tier can take it.
        """
        self._check_open()
        key = check_key(key)
        data = normalize_tensors(key, tensors)
        spec = EntrySpec.of(key, data)
        with self._lock:
            self._check_open()
            old = self._records.get(key)
            attempts = self._placement.place(spec.nbytes, self._free())
            if not attempts:
                raise CapacityError(self._no_tier_admits(spec))
            feasible = [a for a in attempts if self._can_make_room(a, spec.nbytes, old)]
            if not feasible:
                raise CapacityError(self._tiers_full(spec, attempts))
            record = _Record(uid=next(self._uids), spec=spec, pins=old.pins if old else 0)
            if old is not None:
                self._unindex(old)  # out of sight, but its bytes stay until the new version is stored
            self._by_uid[record.uid] = record
            record.readers += 1  # not a victim of its own placement
            try:
                tier = self._first_fit(feasible, spec.nbytes, sacrifice=old)
                if tier is None:  # _can_make_room said otherwise; refuse rather than keep half an entry
                    raise CapacityError(self._tiers_full(spec, attempts))
                self._store(record, tier, data, copy=copy, source="put")
            except BaseException:
                del self._by_uid[record.uid]
                if old is not None and old.tiers:  # its bytes were not needed: the old version stays
                    self._reindex(old)
                elif old is not None:
                    self._by_uid.pop(old.uid, None)
                raise
            finally:
                record.readers -= 1
            self._records[key] = record
            if old is not None:
                self._retire(old)
            return tier

    def get(self, key: str, device: str | torch.device | None = None) -> Tensors:
        """The entry's tensors on `device` (default: the compute device), bit-exact. A miss raises KeyError.

        The result may be the cache's own tensors (an hbm hit, or an entry this get promoted): read them, or
        clone them before modifying them.
        """
        record, tier, held = self._begin_read(key)
        return self._finish_read(record, tier, held, device)

    def prefetch(self, key: str, device: str | torch.device | None = None) -> PrefetchHandle:
        """Start loading an entry in the background and return at once; `handle.wait()` gives the tensors.

        A miss raises KeyError here, at once. The entry cannot be evicted or freed until the load completes.
        """
        record, tier, held = self._begin_read(key)
        try:
            future = self._prefetcher.submit(self._finish_read, record, tier, held, device)
        except RuntimeError:
            self._end_read(record)
            raise CacheClosedError("prefetch() on a closed TierCache") from None
        return PrefetchHandle(key, future)

    def tier_of(self, key: str) -> str:
        """The fastest tier holding the entry: "hbm", "host" or "nvme"."""
        with self._lock:
            return self._record(key).tiers[0]

    def info(self, key: str) -> EntryInfo:
        with self._lock:
            r = self._record(key)
            return EntryInfo(r.spec.key, r.spec.nbytes, tuple(r.tiers), r.pins, r.spec.tensors)

    def delete(self, key: str) -> None:
        """Remove an entry from every tier (pinned or not). A miss raises KeyError."""
        with self._lock:
            self._remove(self._record(key))

    def pin(self, key: str) -> None:
        """Keep an entry from being evicted until a matching unpin(); pins nest."""
        with self._lock:
            self._record(key).pins += 1

    def unpin(self, key: str) -> None:
        with self._lock:
            record = self._record(key)
            if record.pins == 0:
                raise EntryValueError(f"unpin({key!r}): the entry is not pinned")
            record.pins -= 1

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._records)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return isinstance(key, str) and key in self._records

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def stats(self) -> CacheStats:
        with self._lock:
            tiers = {
                name: TierStats(
                    name=name,
                    capacity=tier.capacity,
                    used=tier.used,
                    entries=len(tier),
                    pinned=sum(1 for uid in tier if self._by_uid[uid].pins),
                    hits=self._hits[name],
                )
                for name, tier in self._tiers.items()
            }
            notes = (
                [f"nvme: buffered I/O because {self._nvme.io.why_buffered}"] if self._nvme.io_mode == "buffered" else []
            )
            return CacheStats(
                policy=f"{self.policy.name} ({self.policy.source})",
                device=str(self.device),
                nvme_io=self._nvme.io_mode,
                tiers=tiers,
                pathways=self._log.snapshot(),
                misses=self._misses,
                evicted=self._evicted,
                notes=notes,
            )

    def close(self) -> None:
        """Wait for gets and prefetches in flight, free the memory tiers and release the root. Entries in nvme
        stay on disk. A cache that is never closed releases its root when it is garbage-collected."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no new reads start from here on
        self._prefetcher.shutdown(wait=True)
        with self._lock:
            self._idle.wait_for(lambda: self._active_reads == 0)
            for tier in self._tiers.values():
                if tier is not self._nvme:
                    tier.close()
            self._records.clear()
            self._by_uid.clear()
        self._finalizer()

    def __enter__(self) -> TierCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TierCache(root={str(self.root)!r}, policy={self.policy.name!r}, device={str(self.device)!r}, "
            f"entries={len(self)})"
        )

    # ---- reads ------------------------------------------------------------------------------------------------
    def _begin_read(self, key: str) -> tuple[_Record, str, Tensors | None]:
        """Count the hit, protect the entry from eviction and deletion, and take memory-tier tensors under the lock."""
        self._check_open()
        check_key(key)
        with self._lock:
            self._check_open()
            record = self._records.get(key)
            if record is None:
                self._misses += 1
                raise EntryNotFoundError(self._miss_message(key))
            tier = record.tiers[0]
            self._active_reads += 1
            self._hits[tier] += 1
            self._order[tier].accessed(record.uid)
            record.readers += 1
            held = self._tiers[tier].read(record.uid) if tier != "nvme" else None
            return record, tier, held

    def _finish_read(
        self, record: _Record, tier: str, held: Tensors | None, device: str | torch.device | None
    ) -> Tensors:
        target = torch.device(device) if device is not None else self.device
        hit = tier == "hbm" and _same_device(target, self.device)
        try:
            start = time.perf_counter()
            if hit:
                tensors = held or {}  # no transfer: the cached tensors themselves
            elif held is None:
                tensors = {n: t.to(target) for n, t in self._nvme.read(record.uid).items()}
            else:
                tensors = {n: t.to(target, copy=True) for n, t in held.items()}
            if not hit:
                self._log.record(
                    self._pathway(tier, self._tier_name_of(target)), record.spec.nbytes, time.perf_counter() - start
                )
        except BaseException:
            self._end_read(record)
            raise
        promote = (tier, tensors) if not hit and _same_device(target, self.device) else None
        self._end_read(record, promote)
        return tensors

    def _end_read(self, record: _Record, promote: tuple[str, Tensors] | None = None) -> None:
        with self._lock:
            record.readers -= 1
            try:
                if record.deleted:
                    if record.readers == 0:
                        self._release(record)
                elif promote is not None and not self._closed and record.tiers and record.tiers[0] == promote[0]:
                    self._promote(record, *promote)
            except (TierCacheError, OSError) as exc:  # the read itself succeeded; moving others down did not
                log.warning("tiercache: promoting %r after a read failed: %s", record.spec.key, exc)
            finally:
                self._active_reads -= 1
                if self._active_reads == 0:
                    self._idle.notify_all()

    def _promote(self, record: _Record, current: str, tensors: Tensors) -> None:
        if record.readers > 0:  # another read still copies from the current tier: a later read promotes
            return
        attempts = self._placement.promote(record.spec.nbytes, current, self._free())
        record.readers += 1  # making room below must not demote the entry being promoted
        try:
            target = self._first_fit(attempts, record.spec.nbytes)
            if target is not None:
                self._store(record, target, tensors, copy=False, source=None)
                if current != "nvme":  # memory tiers are exclusive; the nvme copy stays
                    self._drop(record, current)
        finally:
            record.readers -= 1

    # ---- placement, eviction, bookkeeping ---------------------------------------------------------------------
    def _free(self) -> dict[str, int]:
        return {name: tier.free for name, tier in self._tiers.items()}

    def _can_make_room(self, attempt: Attempt, nbytes: int, replacing: _Record | None) -> bool:
        """Whether `_make_room` would succeed, computed without moving anything."""
        tier = self._tiers[attempt.tier]
        free = tier.free
        if replacing is not None and attempt.tier in replacing.tiers and replacing.readers == 0:
            free += replacing.spec.nbytes
        if free >= nbytes or not attempt.evict:
            return free >= nbytes
        reclaimable = sum(
            self._by_uid[uid].spec.nbytes
            for uid in tier
            if self._by_uid[uid] is not replacing and not self._by_uid[uid].busy
        )
        return free + reclaimable >= nbytes

    def _first_fit(self, attempts: list[Attempt], nbytes: int, sacrifice: _Record | None = None) -> str | None:
        """The first attempt's tier that has, or can be given, `nbytes` of room; nothing moves for the others."""
        for attempt in attempts:
            if self._can_make_room(attempt, nbytes, sacrifice) and self._make_room(
                attempt.tier, nbytes, attempt.evict, sacrifice
            ):
                return attempt.tier
        return None

    def _make_room(self, tier_name: str, nbytes: int, evict: bool, sacrifice: _Record | None = None) -> bool:
        """Free `nbytes` in a tier: first the old version being replaced (`sacrifice`), then, if `evict`, by
        demoting the tier's victims in policy order. False if it cannot."""
        tier = self._tiers[tier_name]
        if tier.free >= nbytes:
            return True
        if sacrifice is not None and tier_name in sacrifice.tiers and sacrifice.readers == 0:
            self._drop(sacrifice, tier_name)
            if tier.free >= nbytes:
                return True
        if not evict:
            return False
        for uid in self._order[tier_name].victims():
            record = self._by_uid[cast(int, uid)]
            if record.busy:
                continue
            self._demote(record, tier_name)
            if tier.free >= nbytes:
                return True
        return False

    def _demote(self, record: _Record, from_tier: str) -> None:
        """Move a victim one tier down (or further, if the next refuses its size); out of the cache from the bottom."""
        size = record.spec.nbytes
        below = TIER_NAMES.index(from_tier)
        record.readers += 1
        try:
            attempts = self._placement.demote(size, from_tier, self._free())
            if attempts and not any(TIER_NAMES.index(t) > below for t in record.tiers):  # no copy below yet
                target = self._first_fit(attempts, size)
                if target is not None:
                    self._store(record, target, self._tiers[from_tier].read(record.uid), copy=False, source=from_tier)
            self._drop(record, from_tier)
        finally:
            record.readers -= 1
        if not record.tiers:  # nothing below could take it: it has left the cache
            self._evicted += 1
            if self._records.get(record.spec.key) is record:
                del self._records[record.spec.key]
            self._by_uid.pop(record.uid, None)

    def _store(self, record: _Record, tier_name: str, data: Tensors, *, copy: bool, source: str | None) -> None:
        """Put the record's data in a tier and account it. `source` names the pathway (None: no data moved)."""
        tier = self._tiers[tier_name]
        start = time.perf_counter()
        if copy and isinstance(tier, MemoryTier):
            data = {n: t.to(tier.device, copy=True) for n, t in data.items()}
        elif isinstance(tier, MemoryTier) and source is None and any(t.device != tier.device for t in data.values()):
            source = self._tier_name_of(next(iter(data.values())).device)
        tier.put(record.uid, record.spec, data)
        if source is not None:
            self._log.record(self._pathway(source, tier_name), record.spec.nbytes, time.perf_counter() - start)
        record.tiers.append(tier_name)
        record.tiers.sort(key=TIER_NAMES.index)
        self._order[tier_name].inserted(record.uid, record.spec.nbytes)

    def _drop(self, record: _Record, tier_name: str) -> None:
        self._tiers[tier_name].delete(record.uid)
        record.tiers.remove(tier_name)
        self._order[tier_name].removed(record.uid)

    def _remove(self, record: _Record) -> None:
        """Take an entry out of the cache; its storage goes now, or when its last reader is done."""
        self._unindex(record)
        self._retire(record)

    def _unindex(self, record: _Record) -> None:
        """Hide an entry from lookups and from eviction; its storage and accounting stay."""
        if self._records.get(record.spec.key) is record:
            del self._records[record.spec.key]
        for tier_name in record.tiers:
            self._order[tier_name].removed(record.uid)

    def _reindex(self, record: _Record) -> None:
        self._records[record.spec.key] = record
        for tier_name in record.tiers:
            self._order[tier_name].inserted(record.uid, record.spec.nbytes)

    def _retire(self, record: _Record) -> None:
        record.deleted = True
        if record.readers == 0:
            self._release(record)

    def _release(self, record: _Record) -> None:
        for tier_name in list(record.tiers):
            self._drop(record, tier_name)
        self._by_uid.pop(record.uid, None)

    def _adopt_disk_entries(self) -> None:
        """Index the entries a previous process left in nvme, newest first while they fit the budget. Entries
        that do not fit stay on disk, unindexed, for a cache opened with a larger budget: never deleted here."""
        budget = self.policy.tiers.nvme
        room = self._nvme.capacity
        keep: list[tuple[_Record, StoredEntry]] = []
        left: list[StoredEntry] = []
        for stored in reversed(self._nvme.scan()):  # newest first
            if budget.admits(stored.spec.nbytes) and stored.spec.nbytes <= room:
                room -= stored.spec.nbytes
                keep.append((_Record(uid=next(self._uids), spec=stored.spec), stored))
            else:
                left.append(stored)
        if left:
            log.warning(
                "tiercache: %d entries (%s) in %s exceed this policy's nvme budget (%s, %s) and were left on disk "
                "unindexed; open the root with a larger tiers.nvme.capacity to use or delete them",
                len(left),
                format_size(sum(s.spec.nbytes for s in left)),
                self.root,
                format_size(budget.capacity),
                self.policy.source,
            )
        for record, stored in reversed(keep):  # oldest first, so LRU order follows write time
            self._nvme.adopt(record.uid, stored)
            record.tiers.append("nvme")
            self._order["nvme"].inserted(record.uid, record.spec.nbytes)
            self._records[record.spec.key] = record
            self._by_uid[record.uid] = record

    # ---- small helpers ----------------------------------------------------------------------------------------
    def _record(self, key: str) -> _Record:
        self._check_open()
        check_key(key)
        record = self._records.get(key)
        if record is None:
            raise EntryNotFoundError(self._miss_message(key))
        return record

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError(f"this TierCache (root {self.root}) is closed; open a new one")

    def _pathway(self, source: str, dest: str) -> str:
        def label(name: str) -> str:
            return f"nvme({self._nvme.io_mode})" if name == "nvme" else name

        return f"{label(source)}->{label(dest)}"

    def _tier_name_of(self, device: torch.device) -> str:
        if _same_device(device, self.device):
            return "hbm"
        return "host" if device.type == "cpu" else str(device)

    def _miss_message(self, key: str) -> str:
        return (
            f"{key!r} is not in the cache (never put, deleted, or evicted from the last tier); "
            f"{len(self._records)} entries are cached. put() it again."
        )

    def _no_tier_admits(self, spec: EntrySpec) -> str:
        limits = "; ".join(
            f"{t}: capacity {format_size(b.capacity)}"
            + (f", max_entry {format_size(b.max_entry)}" if b.max_entry is not None else "")
            for t in TIER_NAMES
            for b in [self.policy.tiers[t]]
        )
        return (
            f"put({spec.key!r}): the entry is {format_size(spec.nbytes)} ({spec.nbytes} bytes) and no tier admits "
            f"it ({limits}). Raise tiers.nvme.capacity (or another tier's) in {self.policy.source}, or split the "
            "entry. Nothing stored was changed."
        )

    def _tiers_full(self, spec: EntrySpec, attempts: list[Attempt]) -> str:
        states = "; ".join(
            f"{t}: {format_size(self._tiers[t].free)} free of {format_size(self._tiers[t].capacity)}, "
            f"{sum(1 for u in self._tiers[t] if self._by_uid[u].busy)} pinned or in use"
            for t in dict.fromkeys(a.tier for a in attempts)
        )
        return (
            f"put({spec.key!r}): the entry is {format_size(spec.nbytes)} ({spec.nbytes} bytes) and the tiers that "
            f"admit it cannot make room ({states}). Unpin or delete entries, or raise capacities in "
            f"{self.policy.source}. Nothing stored was changed."
        )


def _shut_down(nvme: NvmeTier, prefetcher: ThreadPoolExecutor, temp_root: Path | None) -> None:
    """Release what outlives a cache's Python object: the prefetch threads, the root's lock, a temporary root."""
    prefetcher.shutdown(wait=False)  # close() has already waited; the garbage collector must not block
    nvme.close()
    if temp_root is not None:
        shutil.rmtree(temp_root, ignore_errors=True)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        index_a = a.index if a.index is not None else torch.cuda.current_device()
        index_b = b.index if b.index is not None else torch.cuda.current_device()
        return index_a == index_b
    return True
