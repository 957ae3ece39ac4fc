"""TierCache: the front door. Checks input, runs the data path, and keeps the engine's bookkeeping under one lock.

Disk reads and memory copies for `get`/`prefetch` run outside the lock; writes and demotions run under it.
The bookkeeping itself (placement, eviction, promotion, accounting) lives in `engine.py`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from .engine import Decision, Engine, EntryInfo, PutHints, Record
from .entry import EntrySpec, Tensors, check_key, convert_tensors, normalize_tensors
from .errors import CacheClosedError, EntryValueError, TierCacheError
from .io.buffers import HostBuffers
from .policy.costmodel import Profile, profile_for
from .policy.schema import Policy, resolve_policy
from .stats import CacheStats, TierStats, TransferLog
from .tiers import HostTier, MemoryTier, NvmeTier, Tier
from .tiers.nvme.layout import StoredEntry
from .transfer import Event, Transfers, all_of, consumer_stream
from .units import format_size

log = logging.getLogger(__name__)

__all__ = ["Decision", "EntryInfo", "PrefetchHandle", "TierCache", "default_device"]


def default_device() -> torch.device:
    """The compute device: the current CUDA device where CUDA works, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PrefetchHandle:
    """A load running in the background. `wait()` returns the tensors, or raises what the load raised."""

    def __init__(self, key: str, future: Future[tuple[Tensors, Event]], device: torch.device, transfers: Transfers):
        self.key = key
        self.device = device
        self._future = future
        self._transfers = transfers

    def done(self) -> bool:
        """Whether wait() would return (or raise) without waiting."""
        if not self._future.done():
            return False
        return self._future.exception() is not None or self._future.result()[1].query()

    def wait(self, timeout: float | None = None, *, stream: Any = None) -> Tensors:
        """The tensors. Without `stream`, the calling thread blocks until they hold their values. With `stream` (a
        torch.cuda.Stream, or a tiercache Stream), that stream is made to wait for the copies instead and the host
        does not block on them (only on the load having been started, e.g. its nvme read): use the tensors on
        that stream. `timeout` bounds the wait for the load to start, in seconds."""
        tensors, ready = self._future.result(timeout)
        if stream is None:
            ready.synchronize()
        self._transfers.deliver(tensors.values(), ready, consumer_stream(self.device, stream))
        return tensors


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
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.policy: Policy = resolve_policy(policy)
        self.device: torch.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" means the current device: name it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.profile: Profile = profile_for(self.policy)
        self._temp_root = Path(tempfile.mkdtemp(prefix="tiercache-")) if root is None else None
        self.root = self._temp_root or Path(root)  # type: ignore[arg-type]
        budgets = self.policy.tiers
        self._log = TransferLog()
        # One pool of reused host memory for what lands in CPU memory: nvme reads and reloads from the host tier.
        # Shared, the memory one pathway gave back serves the other, and at most one pool's worth waits idle.
        self._landing = HostBuffers(max_idle=8)  # as many regions as two pools kept, in one pool's bytes
        self._nvme = NvmeTier(self.root, budgets.nvme, self.device, self._landing)
        self._transfers = Transfers(self.device, self.policy.transfer.chunk_size, self._landing)
        try:
            self._host = HostTier(
                budgets.host.capacity,
                pin=budgets.host.pinned and self.device.type == "cuda",  # pinning serves DMA to the device only
                transfers=self._transfers,
                on_copy=self._log.record,
            )
        except BaseException:
            self._transfers.close()
            self._nvme.close()
            raise
        self._prefetcher = ThreadPoolExecutor(2, thread_name_prefix="tiercache-prefetch")
        self._finalizer = weakref.finalize(
            self, _shut_down, self._nvme, self._host, self._transfers, self._prefetcher, self._temp_root
        )
        tiers: dict[str, Tier] = {
            "hbm": MemoryTier("hbm", budgets.hbm.capacity, self.device),
            "host": self._host,
            "nvme": self._nvme,
        }
        self._engine = Engine(
            self.policy,
            tiers,
            self.profile,
            clock=time.perf_counter if clock is None else clock,
            on_transfer=self._record_transfer,
        )
        self._lock = threading.RLock()
        self._active_reads = 0
        self._open_streams: weakref.WeakSet[Iterator[tuple[str, torch.Tensor]]] = weakref.WeakSet()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        try:
            self._adopt_disk_entries()
        except BaseException:
            self._finalizer()
            raise

    # ---- the public contract ----------------------------------------------------------------------------------
    def put(
        self,
        key: str,
        tensors: Mapping[str, Any],
        *,
        copy: bool = True,
        deadline_ms: float | None = None,
        priority: int = 0,
        write_through: bool | None = None,
    ) -> str:
        """Store `tensors` (a mapping of names to torch tensors or numpy arrays) under `key`; returns the tier.

        `deadline_ms`: the entry must reload to hbm within this time; the cheapest tier whose predicted reload
        meets it is chosen (see `explain(key)`). `priority`: the put may demote entries of this priority or lower
        to make room, and entries of lower priority cannot demote it. `write_through`: also write it to nvme
        now (default: the policy's placement.write). Replaces an existing entry of that key (its pins carry
        over). With `copy=False` the cache may keep the given tensors themselves when they are already on the
        chosen tier's device: do not modify them afterwards. Raises CapacityError, leaving everything stored as
        it was, when no tier can take it.
        """
        self._check_open()
        key = check_key(key)
        if deadline_ms is not None and (isinstance(deadline_ms, bool) or not deadline_ms >= 0):
            raise EntryValueError(
                f"put({key!r}): deadline_ms must be a number of milliseconds >= 0, got {deadline_ms!r}"
            )
        if write_through is not None and not isinstance(write_through, bool):
            raise EntryValueError(f"put({key!r}): write_through must be True, False or None, got {write_through!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise EntryValueError(f"put({key!r}): priority must be an integer, got {priority!r}")
        data = normalize_tensors(key, tensors)
        spec = EntrySpec.of(key, data)
        with self._lock:
            self._check_open()
            tier = self._engine.put(spec, data, copy=copy, hints=PutHints(deadline_ms, priority, write_through))
            if tier == "hbm":  # its tensors hold their values once the caller's queued work is done
                self._engine.records[key].ready = consumer_stream(self.device).record()
            return tier

    def get(self, key: str, device: str | torch.device | None = None, *, as_: str = "torch") -> Tensors:
        """The entry's tensors on `device` (default: the compute device), bit-exact. A miss raises KeyError.

        On CUDA the current stream is made to wait for the copies (the host does not block on them), as with
        `tensor.to(device, non_blocking=True)`: use the tensors on the current stream, or synchronize first.
        `as_="cupy"` (CUDA) or `"numpy"` (CPU) returns arrays of that library sharing the tensors' memory.
        The result may be the cache's own tensors (an hbm hit, or an entry this get promoted): read them, or
        clone them before modifying them.
        """
        convert_tensors({}, as_)  # refuse an unknown as_ before anything moves
        target = self._target(device)
        record, tier, held = self._begin_read(key)
        tensors, ready = self._load(record, tier, held, target)
        self._transfers.deliver(tensors.values(), ready, consumer_stream(target))
        return convert_tensors(tensors, as_)

    def prefetch(self, key: str, device: str | torch.device | None = None) -> PrefetchHandle:
        """Start loading an entry in the background and return at once; `handle.wait()` gives the tensors and
        `handle.wait(stream=s)` makes stream `s` wait for them on the GPU instead of blocking the host.

        A miss raises KeyError here, at once. The entry cannot be evicted or freed until the load completes.
        """
        target = self._target(device)
        record, tier, held = self._begin_read(key)
        if tier != "nvme":  # memory tiers only enqueue copies on a copy stream: no thread needed to start them
            future: Future[tuple[Tensors, Event]] = Future()
            try:
                future.set_result(self._load(record, tier, held, target))
            except BaseException as exc:  # noqa: BLE001 - handed to wait(), as a background load's error is
                future.set_exception(exc)
            return PrefetchHandle(key, future, target, self._transfers)
        # nvme: buffers are allocated and reads queued here (this thread's warm memory, no hand-off before the
        # disk starts); a prefetch thread waits for them, checks them and promotes.
        try:
            landing = self._nvme.start_entry_read(record.uid, target)
        except BaseException:
            self._end_read(record)
            raise
        try:
            future = self._prefetcher.submit(self._load, record, tier, held, target, landing)
        except RuntimeError:
            with contextlib.suppress(BaseException):
                landing()  # the reads started must end (their files closed) before the entry is released
            self._end_read(record)
            raise CacheClosedError("prefetch() on a closed TierCache") from None
        return PrefetchHandle(key, future, target, self._transfers)

    def stream(
        self, key: str, device: str | torch.device | None = None, *, lookahead: int = 2, stream: Any = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the entry's `(name, tensor)` pairs in stored order while the next `lookahead` tensors are already
        being loaded: layer i computes while layer i+1 reloads.

        Each tensor is ready for use when yielded: the host waited for it (CPU), or `stream` / the current CUDA
        stream was made to wait for it (GPU). Streaming reads do not promote the entry (it is counted as used).
        A miss raises KeyError here, at once.
        """
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise EntryValueError(f"stream({key!r}): lookahead must be an integer >= 0, got {lookahead!r}")
        target = self._target(device)
        self.info(key)  # a miss raises now, not at the first next()
        iterator = self._stream(key, target, lookahead, stream)
        self._open_streams.add(iterator)
        return iterator

    def tier_of(self, key: str) -> str:
        """The fastest tier holding the entry: "hbm", "host" or "nvme"."""
        return self.info(key).tiers[0]

    def info(self, key: str) -> EntryInfo:
        """Where an entry lives (every tier holding it), its size, pins, uses, priority and placement decision."""
        with self._checked(key):
            return self._engine.info(key)

    def explain(self, key: str) -> str:
        """Why the entry is where it is, in words: the placement decision, its reason, the predicted reloads."""
        info = self.info(key)
        d = info.decision
        times = "time" if info.uses == 1 else "times"
        lines = [f"{key!r}: {format_size(info.nbytes)} in {', '.join(info.tiers)}; used {info.uses} {times}"]
        if d is None:
            lines.append("found on disk when the cache opened (no placement decision recorded)")
        else:
            lines.append(f"placed in {d.reason}")
            hints = [f"deadline {d.deadline_ms:g} ms" if d.deadline_ms is not None else "no deadline"]
            hints += [f"priority {d.priority}", "written through to nvme" if d.write_through else "write-back"]
            lines.append(", ".join(hints))
            lines.append("predicted reload: " + ", ".join(f"{t} {ms:.3g} ms" for t, ms in d.reload_ms.items()))
            if d.tier != info.tiers[0]:
                lines.append(f"since moved to {info.tiers[0]} (promoted on a read, or demoted by eviction)")
        lines.append(f"cost model: {self.profile.describe()}")
        return "\n".join(lines)

    def delete(self, key: str) -> None:
        """Remove an entry from every tier (pinned or not). A miss raises KeyError."""
        with self._checked(key):
            self._engine.delete(key)

    def pin(self, key: str) -> None:
        """Keep an entry from being evicted until a matching unpin(); pins nest."""
        with self._checked(key):
            self._engine.pin(key)

    def unpin(self, key: str) -> None:
        with self._checked(key):
            self._engine.unpin(key)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._engine.records)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return isinstance(key, str) and key in self._engine.records

    def __len__(self) -> int:
        with self._lock:
            return len(self._engine.records)

    def stats(self) -> CacheStats:
        self._transfers.deferred.collect()  # copies done since the last transfer: their figures join the log
        with self._lock:
            engine = self._engine
            tiers = {
                name: TierStats(
                    name=name,
                    capacity=tier.capacity,
                    used=tier.used,
                    entries=len(tier),
                    pinned=sum(1 for uid in tier if engine.by_uid[uid].pins),
                    hits=engine.hits[name],
                )
                for name, tier in engine.tiers.items()
            }
            notes = [f"cost model: {self.profile.describe()}"]
            pool = self._host.pool
            notes.append(
                f"host pool: {format_size(pool.capacity)} "
                + ("pinned" if pool.pinned else f"pageable because {pool.why_pageable}")
                + (f"; {pool.fallbacks} entries stored in pageable memory outside it (full)" if pool.fallbacks else "")
            )
            landing = self._landing
            notes.append(
                f"host buffers for nvme reads and reloads: {landing.reused} reused, {landing.fresh} fresh; "
                f"{format_size(landing.idle_bytes)} idle, kept for the next ones"
            )
            if self._nvme.io_mode == "buffered":
                notes.append(f"nvme: buffered I/O because {self._nvme.io.why_buffered}")
            direct = self._nvme.direct
            if direct is None:
                notes.append(f"nvme: no kvikio path to the device because {self._nvme.why_not_direct}")
            else:
                carried = ", ".join(f"{k} {format_size(v)}" for k, v in direct.bytes_by_backend().items()) or "n/a"
                notes.append(
                    f"nvme: kvikio in {direct.mode} mode (cuFile reports GDS "
                    f"{'available' if direct.gds_available else 'unavailable'}); bytes by backend: {carried}"
                )
            return CacheStats(
                policy=f"{self.policy.name} ({self.policy.source})",
                device=str(self.device),
                nvme_io=self._nvme.io_mode,
                nvme_device_io=direct.mode if direct is not None else "none",
                tiers=tiers,
                pathways=self._log.snapshot(),
                misses=engine.misses,
                evicted=engine.evicted,
                expired=engine.expired,
                profile=self.profile.name,
                profile_measured=self.profile.measured,
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
        for iterator in list(self._open_streams):  # a stream() its consumer left half-read ends here
            try:
                iterator.close()  # type: ignore[attr-defined]
            except ValueError:  # running in another thread right now: it ends by itself
                pass
        with self._lock:
            self._idle.wait_for(lambda: self._active_reads == 0)
            for tier in self._engine.tiers.values():
                if tier is not self._nvme:
                    tier.close()
            self._engine.records.clear()
            self._engine.by_uid.clear()
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
    def _begin_read(self, key: str) -> tuple[Record, str, Tensors | None]:
        self._check_open()
        check_key(key)
        with self._lock:
            self._check_open()
            begun = self._engine.begin_read(key)
            self._active_reads += 1
            return begun

    def _load(
        self,
        record: Record,
        tier: str,
        held: Tensors | None,
        target: torch.device,
        landing: Callable[[], Tensors] | None = None,
    ) -> tuple[Tensors, Event]:
        """The data path of a read, outside the lock: start the copies to `target` (or collect the nvme reads
        `landing` started), then promote. Returns the tensors and the event after which they hold their values."""
        hit = tier == "hbm" and _same_device(target, self.device)
        try:
            if hit:  # no transfer: the cached tensors themselves, once the copy that promoted them is done
                tensors, ready = held or {}, record.ready or all_of(())
            elif tier == "host":
                tensors, ready = self._host.load(record.uid, target, dest=self._tier_name_of(target))
            else:
                start = time.perf_counter()
                if held is not None:
                    tensors = self._copy_from_hbm(record, held, target)
                else:
                    source = landing() if landing is not None else self._nvme.read(record.uid, target)
                    tensors = {n: t.to(target) for n, t in source.items()}
                self._record_transfer(tier, self._tier_name_of(target), record.spec.nbytes, time.perf_counter() - start)
                ready = all_of(())
        except BaseException:
            self._end_read(record)
            raise
        promote = not hit and _same_device(target, self.device)
        self._end_read(record, (tier, tensors) if promote else None, ready)
        return tensors, ready

    def _stream(
        self, key: str, target: torch.device, lookahead: int, stream: Any
    ) -> Iterator[tuple[str, torch.Tensor]]:
        record, tier, held = self._begin_read(key)
        consumer = consumer_stream(target, stream)
        names = [t.name for t in record.spec.tensors]
        started: collections.deque[tuple[str, Callable[[], tuple[torch.Tensor, Event]]]] = collections.deque()
        try:
            for index in range(len(names)):
                while len(started) <= lookahead and index + len(started) < len(names):
                    started.append(self._start_one(record, tier, held, target, index + len(started)))
                name, land = started.popleft()
                tensor, ready = land()
                del land  # its buffer (a small tensor's padded one) must not outlive the tensor's delivery
                self._transfers.deliver([tensor], ready, consumer)
                yield name, tensor
        finally:
            for _, land in started:  # loads still in flight finish (files closed) before the entry is released
                try:
                    land()
                except BaseException:  # noqa: BLE001 - the consumer stopped early; its error (if any) wins
                    pass
            self._end_read(record)

    def _copy_from_hbm(self, record: Record, held: Tensors, target: torch.device) -> Tensors:
        """Copies of hbm tensors on another device, made after the copy that filled them (a promotion) is done."""
        if record.ready is not None:
            consumer_stream(self.device).wait(record.ready)
        return {n: t.to(target, copy=True) for n, t in held.items()}

    def _start_one(
        self, record: Record, tier: str, held: Tensors | None, target: torch.device, index: int
    ) -> tuple[str, Callable[[], tuple[torch.Tensor, Event]]]:
        """Start loading one tensor of an entry; returns its name and a call that waits for it to be loaded."""
        name = record.spec.tensors[index].name
        if tier == "host":
            loaded, ready = self._host.load(record.uid, target, [name], dest=self._tier_name_of(target))
            return name, lambda: (loaded[name], ready)
        if held is not None:  # hbm
            ready = record.ready or all_of(())
            if _same_device(target, self.device):
                return name, lambda: (held[name], ready)
            tensor = self._copy_from_hbm(record, {name: held[name]}, target)[name]
            return name, lambda: (tensor, all_of(()))
        land = self._nvme.start_read(record.uid, index, target)

        def landed() -> tuple[torch.Tensor, Event]:
            start = time.perf_counter()
            tensor = land().to(target)
            self._record_transfer("nvme", self._tier_name_of(target), tensor.nbytes, time.perf_counter() - start)
            return tensor, all_of(())

        return name, landed

    def _end_read(self, record: Record, promote: tuple[str, Tensors] | None = None, ready: Event | None = None) -> None:
        with self._lock:
            try:
                if promote is not None:
                    record.ready = ready
                self._engine.end_read(record, None if self._closed else promote)
            except (TierCacheError, OSError) as exc:  # the read itself succeeded; moving others down did not
                log.warning("tiercache: promoting %r after a read failed: %s", record.spec.key, exc)
            finally:
                self._active_reads -= 1
                if self._active_reads == 0:
                    self._idle.notify_all()

    # ---- small helpers ----------------------------------------------------------------------------------------
    def _adopt_disk_entries(self) -> None:
        """Index the entries a previous process left in nvme, newest first while they fit the budget. Entries
        that do not fit stay on disk, unindexed, for a cache opened with a larger budget: never deleted here."""
        budget = self.policy.tiers.nvme
        room = self._nvme.capacity
        keep: list[StoredEntry] = []
        left: list[StoredEntry] = []
        for stored in reversed(self._nvme.scan()):  # newest first
            if budget.admits(stored.spec.nbytes) and stored.spec.nbytes <= room:
                room -= stored.spec.nbytes
                keep.append(stored)
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
        for stored in reversed(keep):  # oldest first, so LRU order follows write time
            self._engine.adopt(
                stored.spec, "nvme", functools.partial(self._nvme.adopt, stored=stored), written=self._engine.clock()
            )

    def _record_transfer(self, source: str, dest: str, nbytes: int, seconds: float) -> None:
        # nvme names its backend: reads to the compute device may go through kvikio, host memory through POSIX;
        # a write is named by how the put that the engine just ran moved its bytes.
        read_mode = self._nvme.mode_for(self.device) if dest == "hbm" else self._nvme.io_mode
        names = {"host": self._host.label, "nvme": f"nvme({read_mode})"}
        target = {"host": self._host.label, "nvme": f"nvme({self._nvme.last_write_mode})"}
        self._log.record(f"{names.get(source, source)}->{target.get(dest, dest)}", nbytes, seconds)

    @contextlib.contextmanager
    def _checked(self, key: str) -> Iterator[None]:
        """Hold the lock for an operation on one key, after checking the cache is open and the key well-formed."""
        self._check_open()
        check_key(key)
        with self._lock:
            self._check_open()
            yield

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError(f"this TierCache (root {self.root}) is closed; open a new one")

    def _target(self, device: str | torch.device | None) -> torch.device:
        if device is None:
            return self.device
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return target

    def _tier_name_of(self, device: torch.device) -> str:
        if _same_device(device, self.device):
            return "hbm"
        return "host" if device.type == "cpu" else str(device)


def _shut_down(
    nvme: NvmeTier, host: HostTier, transfers: Transfers, prefetcher: ThreadPoolExecutor, temp_root: Path | None
) -> None:
    """Release what outlives a cache's Python object: the prefetch threads, the copy streams and the host pool,
    the root's lock, a temporary root."""
    prefetcher.shutdown(wait=False)  # close() has already waited; the garbage collector must not block
    host.close()
    transfers.close()
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
