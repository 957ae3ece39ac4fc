"""TierCache: the front door. Checks input, keeps the engine's bookkeeping under one lock, and delegates the data
path to the tiers: every read is `tier.load(...)` -> a `Load`, whatever the tier.

Loads run outside the lock; writes and demotions run under it. The bookkeeping itself (placement, eviction,
promotion, accounting) lives in `engine.py`; tensors, events and files live in the tiers.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import torch

from . import messages
from .engine import Engine
from .entry import EntrySpec, Tensors, check_key, convert_tensors, normalize_tensors
from .errors import CacheClosedError, EntryNotFoundError, EntryValueError, TierCacheError
from .io.buffers import HostBuffers
from .io.files import FileOps
from .policy import Machine, Policy, Profile, load_policy
from .policy.schema import SHARED_TIERS
from .prefetch import PrefetchHandle
from .records import Decision, EntryInfo, Moved, PutHints, Read
from .stats import CacheStats, TierStats, TransferLog
from .tiers import DataPath, Load, Tier, open_tiers
from .tiers.base import same_device
from .tiers.nvme.index import stored_bytes
from .tools.progress import progress_callback
from .transfer import Event, Stream, Transfers, consumer_stream
from .units import format_size, parse_size

log = logging.getLogger(__name__)

__all__ = ["Decision", "EntryInfo", "Moved", "PrefetchHandle", "TierCache", "default_device"]

FLUSH_BAR_FROM = 256 << 20  # a flush of this many bytes or more shows a progress bar (on a terminal)


def default_device() -> torch.device:
    """The compute device: the current CUDA device where CUDA works, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TierCache:
    """A three-tier tensor cache: `hbm` (compute device), `host` (CPU RAM) and `nvme` (zarr v3 files under root).

    >>> with TierCache(root="/mnt/nvme/tc", policy="cpu") as cache:
    ...     cache.put("flux/seed42/kv", {"block0.k": k0, "block0.v": v0})
    ...     kv = cache.get("flux/seed42/kv")

    `policy` is "auto" (the default: the preset for this machine's device, its budgets fitted to the machine), a
    preset name ("cpu", "h100", ...), a path to a TOML policy file or a `Policy`; a budget above what the machine
    has is a PolicyError. `root` is the
    nvme tier's directory; entries that reach it survive the process. With `root=None` a temporary directory
    is used and removed at close. `files` is the system calls the nvme tier makes (`tiercache.io.FileOps`, the
    real ones by default; a test's subclass injects faults or delays).

    Any number of caches, in any processes, may open one root together: each sees the entries the others commit
    to nvme, the nvme budget is shared, and an entry one is reading is never removed under it; the memory tiers
    stay per cache. `read_only=True` reads what others wrote and never writes or removes an entry. A cache waits
    up to `lock_timeout` seconds for another's transaction on the root's index before RootInUseError.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        policy: str | Path | Policy | None = "auto",
        *,
        device: str | torch.device | None = None,
        clock: Callable[[], float] | None = None,
        files: FileOps | None = None,
        lock_timeout: float = 30.0,
        read_only: bool = False,
    ) -> None:
        self.device: torch.device = default_device() if device is None else _device(device, "TierCache(device=)")
        # The policy is fitted to (policy="auto", the default) or checked against the machine: the device's memory,
        # the RAM available, the disk under the root (counting what the root already stores as the budget's own).
        machine = Machine.detect(self.device, Path(root) if root is not None else Path(tempfile.gettempdir()))
        stored = stored_bytes(Path(root)) if root is not None else 0
        self.policy: Policy
        self.profile: Profile
        self.policy, self.profile = load_policy(policy, machine=machine, stored_bytes=stored)
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
            raise EntryValueError(f"TierCache(lock_timeout=): a number of seconds >= 0, got {lock_timeout!r}")
        self._temp_root = Path(tempfile.mkdtemp(prefix="tiercache-")) if root is None else None
        self.root = self._temp_root or Path(root)  # type: ignore[arg-type]
        self._log = TransferLog()
        # One pool of reused host memory for what lands in CPU memory: nvme reads and reloads from the host tier.
        # Shared, the memory one pathway gave back serves the other, and at most one pool's worth waits idle.
        self._landing = HostBuffers(max_idle=8)  # as many regions as two pools kept, in one pool's bytes
        self._transfers = Transfers(self.device, self.policy.transfer.chunk_size, self._landing)
        files = files if files is not None else FileOps()
        if not isinstance(read_only, bool):
            raise EntryValueError(f"TierCache(read_only=): True or False, got {read_only!r}")
        if read_only and root is None:
            raise EntryValueError("TierCache(read_only=True) needs the root= of entries another cache wrote")
        self.read_only = read_only
        self._lock = threading.RLock()
        path = DataPath(
            self.device,
            self._transfers,
            self._landing,
            self.root,
            self._log.record,
            files,
            lock_timeout,
            read_only,
            unlocked=self._unlocked,
        )
        try:
            self._tiers: dict[str, Tier] = open_tiers(self.policy.tiers, path)
        except BaseException:
            self._transfers.close()
            raise
        self._engine = Engine(
            self.policy, self._tiers, self.profile, clock=time.perf_counter if clock is None else clock
        )
        self._prefetcher = ThreadPoolExecutor(2, thread_name_prefix="tiercache-prefetch")
        self._finalizer = weakref.finalize(
            self, _shut_down, self._engine, self._transfers, self._prefetcher, self._temp_root, os.getpid()
        )
        self._active_reads = 0  # reads in flight and disk writes running outside the lock: close() waits for them
        self._open_streams: weakref.WeakSet[Iterator[Any]] = weakref.WeakSet()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        # placement.write = "behind": puts are written down by a background thread, which reads overtake.
        self._behind: collections.deque[str] = collections.deque()
        self._behind_work = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        if self.policy.placement.write == "behind" and not read_only:
            self._writer = threading.Thread(target=self._write_behind, name="tiercache-write-behind", daemon=True)
        try:
            self._adopt_found()
        except BaseException:
            self._finalizer()
            raise
        if self._writer is not None:
            self._writer.start()

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
        meets it is chosen, unless a faster tier has free room for it (see `explain(key)`). `priority`: the put
        may demote entries of this priority or lower to make room, and entries of lower priority cannot demote it.
        `write_through`: also write it to nvme now (default: the policy's placement.write). Replaces an existing
        entry of that key (its pins carry over). With `copy=False` the cache may keep the given tensors themselves
        when they are already on the chosen tier's device: do not modify them afterwards. Raises CapacityError,
        leaving everything stored as it was, when no tier can take it.
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
            if self._writer is not None and not self._tiers[tier].durable:
                self._behind.append(key)
                self._behind_work.notify()
            return tier

    def get(
        self, key: str, default: Any = None, *, device: str | torch.device | None = None, as_: str = "torch"
    ) -> Tensors | Any:
        """The entry's tensors on `device` (default: the compute device), bit-exact; `default` on a miss, as
        `dict.get` (`cache[key]` raises instead). `device` is keyword-only: `get(key, "cuda")` would be a default.

        On CUDA the current stream is made to wait for the copies (the host does not block on them), as with
        `tensor.to(device, non_blocking=True)`: use the tensors on the current stream, or synchronize first.
        `as_="cupy"` (CUDA) or `"numpy"` (CPU) returns arrays of that library sharing the tensors' memory.
        The result may be the cache's own tensors (an hbm hit, or an entry this get promoted): read them, or
        clone them before modifying them.
        """
        try:
            return self._get(key, device, as_)
        except EntryNotFoundError:
            return default

    def __getitem__(self, key: str) -> Tensors:
        """The entry's tensors on the compute device; a miss raises EntryNotFoundError (a KeyError) saying why."""
        return self._get(key, None, "torch")

    def __delitem__(self, key: str) -> None:
        self.delete(key)

    def __iter__(self) -> Iterator[str]:
        """The keys, as `keys()` lists them now (entries put or removed meanwhile do not disturb the iteration)."""
        return iter(self.keys())

    def _get(self, key: str, device: str | torch.device | None, as_: str) -> Tensors:
        convert_tensors({}, as_)  # refuse an unknown as_ before anything moves
        target = self._target(device)
        read = self._begin_read(key)
        tensors, ready = self._finish(read, self._start(read, target), target)
        self._transfers.deliver(tensors.values(), ready, consumer_stream(target))
        return convert_tensors(tensors, as_)

    def prefetch(self, key: str, device: str | torch.device | None = None) -> PrefetchHandle:
        """Start loading an entry in the background and return at once; `handle.wait()` gives the tensors and
        `handle.wait(stream=s)` makes stream `s` wait for them on the GPU instead of blocking the host.

        A miss raises KeyError here, at once. The entry cannot be evicted or freed until the load completes.
        """
        target = self._target(device)
        read = self._begin_read(key)
        load = self._start(read, target)  # copies enqueued or reads queued here, on this thread's warm memory
        future: Future[tuple[Tensors, Event]] = Future()
        if load.landed():  # nothing left for a host thread to wait for: no hand-off
            try:
                future.set_result(self._finish(read, load, target))
            except BaseException as exc:  # noqa: BLE001 - handed to wait(), as a background load's error is
                future.set_exception(exc)
            return PrefetchHandle(key, future, target, self._transfers)
        try:
            future = self._prefetcher.submit(self._finish, read, load, target)
        except RuntimeError:
            load.settle()  # the reads started must end (their files closed) before the entry is released
            self._end_read(read)
            raise CacheClosedError("prefetch() on a closed TierCache") from None
        return PrefetchHandle(key, future, target, self._transfers)

    def stream(
        self, key: str, device: str | torch.device | None = None, *, lookahead: int = 2, stream: Any = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the entry's `(name, tensor)` pairs in stored order while the next `lookahead` tensors are already
        being loaded: layer i computes while layer i+1 reloads.

        Each tensor is ready for use when yielded: the host waited for it (CPU), or `stream` / the current CUDA
        stream was made to wait for it (GPU). Streaming reads do not promote the entry (it is counted as used).
        A miss raises KeyError here, at once. `stream_groups` yields several tensors a step (a layer's K and V).
        """
        groups = self._stream_groups(key, device, 1, lookahead, stream)
        return ((name, tensors[name]) for name, tensors in groups)

    def stream_groups(
        self,
        key: str,
        group: int | Callable[[str], str],
        device: str | torch.device | None = None,
        *,
        lookahead: int = 2,
        stream: Any = None,
    ) -> Iterator[tuple[str, Tensors]]:
        """Yield the entry's tensors a group at a time, `(label, {name: tensor})`, while the next `lookahead` groups
        load: attention needs a layer's K and V together. `group`: how many consecutive tensors make a group
        (labelled "0", "1", ...), or a function of a tensor's name giving its group's label (consecutive tensors
        with one label are one group: `lambda name: name.split(".")[0]` for "0.k", "0.v", "1.k", ...). A group's
        tensors are read together. Otherwise as `stream`."""
        return self._stream_groups(key, device, group, lookahead, stream)

    def _stream_groups(
        self,
        key: str,
        device: str | torch.device | None,
        group: int | Callable[[str], str],
        lookahead: int,
        stream: Any,
    ) -> Iterator[tuple[str, Tensors]]:
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise EntryValueError(f"stream({key!r}): lookahead must be an integer >= 0, got {lookahead!r}")
        if not callable(group) and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise EntryValueError(f"stream_groups({key!r}): group must be an integer >= 1 or a function of a name")
        target = self._target(device)
        consumer = consumer_stream(target, stream)  # a bad stream= raises here, before any read begins
        names = [t.name for t in self.info(key).tensors]  # a miss raises now, not at the first next()
        groups = _grouped(names, group)
        iterator = self._stream(key, target, groups, lookahead, consumer)
        self._open_streams.add(iterator)
        return iterator

    @property
    def tiers(self) -> Mapping[str, Tier]:
        """The cache's tiers by name, fastest first, for inspection (`describe()`, budgets) and contract tests;
        entries are put, read and deleted through the cache, never through these."""
        return MappingProxyType(self._tiers)

    def tier_of(self, key: str) -> str:
        """The fastest tier holding the entry: "hbm", "host" or "nvme"."""
        return self.info(key).tiers[0]

    def info(self, key: str) -> EntryInfo:
        """Where an entry lives (every tier holding it), its size, pins, uses, priority and placement decision."""
        with self._checked(key):
            return self._engine.info(key)

    def explain(self, key: str) -> str:
        """Why the entry is where it is, in words: the placement decision, its reason, the predicted reloads."""
        return messages.explain(key, self.info(key), self.profile, self.policy.chosen)

    def delete(self, key: str | None = None, *, prefix: str | None = None) -> int:
        """Remove an entry from every tier (pinned or not), or with `prefix=` every entry whose key starts with it (a
        request's or a tenant's group: "tenant7/"); returns how many. A miss on `key` raises KeyError."""
        if (key is None) == (prefix is None):
            raise EntryValueError("delete(): give a key or prefix=, not both")
        if key is not None:
            with self._checked(key):
                self._engine.delete(key)
            return 1
        with self._lock:
            self._check_open()
            matching = self._engine.keys(_prefix(prefix, "delete"))
            for k in matching:
                self._engine.delete(k)
            return len(matching)

    def offload(self, keys: str | Iterable[str] | None = None, *, prefix: str | None = None, to: str = "host") -> Moved:
        """Move entries down now, to `to` ("host", "remote", "nvme" or "object"; the shared ones where the policy has
        them; further down where it cannot take one), to hand their memory to the next stage, or (remote, object)
        to another machine: the keys given,
        those starting with `prefix`, or (neither) every entry. Room is made below by the policy's eviction rules.
        Pinned entries and entries being read stay, named in the result with the reason; entries already at or
        below `to` are left as they are."""
        below = [t for t in self._tiers if t != "hbm" and (t not in SHARED_TIERS or self._tiers[t].capacity > 0)]
        if to not in below:
            raise EntryValueError(f"offload(to=): one of {', '.join(map(repr, below))}, got {to!r}")
        self._check_open()
        with self._lock:
            self._check_open()
            wanted = self._select(keys, prefix, "offload")
            return self._engine.offload(wanted, to)

    def set_capacity(self, tier: str, nbytes: int | str) -> None:
        """Change a tier's budget now: shrinking demotes what no longer fits (any priority; a CapacityError,
        changing nothing, where pinned entries or entries being read alone exceed it); growing makes room for
        more. The host tier's pinned pool keeps its size: budget beyond it is held in pageable memory. On CUDA,
        shrinking hbm hands the freed device memory back to the driver for other processes."""
        size = self._budget_size(tier, nbytes, "set_capacity")
        with self._lock:
            self._check_open()
            self._engine.set_capacity(tier, size)
            self._release_device_memory(tier)

    @contextlib.contextmanager
    def reserved(self, tier: str, nbytes: int | str) -> Iterator[None]:
        """Keep `nbytes` of a tier's budget free for what runs inside (the next stage's model on the GPU): the budget
        shrinks by that much, demoting what no longer fits, and is given back after."""
        size = self._budget_size(tier, nbytes, "reserved")
        with self._lock:
            self._check_open()
            before = self._tiers[tier].capacity
            taken = min(size, before)
            self._engine.set_capacity(tier, before - taken)
            self._release_device_memory(tier)
        try:
            yield
        finally:
            with self._lock:
                if not self._closed:
                    self._engine.set_capacity(tier, self._tiers[tier].capacity + taken)

    def _budget_size(self, tier: str, nbytes: int | str, where: str) -> int:
        if tier not in self._tiers:
            raise EntryValueError(f"{where}(): tier is one of {', '.join(map(repr, self._tiers))}, got {tier!r}")
        try:
            size = parse_size(nbytes) if isinstance(nbytes, str) else nbytes
        except ValueError as exc:
            raise EntryValueError(f"{where}({tier!r}, {nbytes!r}): {exc}") from None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise EntryValueError(f"{where}({tier!r}, {nbytes!r}): a number of bytes >= 0 or a size such as '4GiB'")
        return size

    def _release_device_memory(self, tier: str) -> None:
        """What the hbm tier let go of goes back to the CUDA driver, not only to this process's allocator cache."""
        if tier == "hbm" and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _select(self, keys: str | Iterable[str] | None, prefix: str | None, where: str) -> list[str]:
        if keys is not None and prefix is not None:
            raise EntryValueError(f"{where}(): give keys or prefix=, not both")
        if keys is None:
            return self._engine.keys(_prefix(prefix, where) if prefix is not None else "")
        return _checked_keys(keys)

    def pin(self, key: str) -> None:
        """Keep an entry from being evicted until a matching unpin(); pins nest."""
        with self._checked(key):
            self._engine.pin(key)

    def unpin(self, key: str) -> None:
        with self._checked(key):
            self._engine.unpin(key)

    def keys(self, prefix: str = "") -> list[str]:
        """The keys of every entry, or of those starting with `prefix` ("tenant7/", "request-42/")."""
        prefix = _prefix(prefix, "keys") if prefix else ""
        with self._lock:
            self._check_open()
            return self._engine.keys(prefix)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            self._check_open()
            return isinstance(key, str) and key in self._engine

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._engine)

    def stats(self) -> CacheStats:
        self._transfers.deferred.collect()  # copies done since the last transfer: their figures join the log
        with self._lock:
            if not self._closed:
                self._engine.refresh()  # what other caches on the root committed counts in the shared budget
            usage = self._engine.usage()
            states = {name: tier.describe() for name, tier in self._tiers.items()}
            counters = self._engine.counters()
        tiers = {
            name: TierStats(name, u.capacity, u.used, u.entries, u.pinned, u.hits, states[name].mode)
            for name, u in usage.items()
        }
        landing = self._landing
        notes = [f"cost model: {self.profile.describe()}"]
        if self.policy.chosen:
            notes.append(f"policy {self.policy.chosen}")
        notes += [note for state in states.values() for note in state.notes]
        notes.append(
            f"host buffers for nvme reads and reloads: {landing.reused} reused, {landing.fresh} fresh; "
            f"{format_size(landing.idle_bytes)} idle, kept for the next ones"
        )
        return CacheStats(
            policy=f"{self.policy.name} ({self.policy.source})",
            device=str(self.device),
            nvme_io=states["nvme"].mode or "none",
            nvme_device_io=states["nvme"].device_mode or "none",
            tiers=tiers,
            pathways=self._log.snapshot(),
            misses=counters.misses,
            evicted=counters.evicted,
            expired=counters.expired,
            profile=self.profile.name,
            profile_measured=self.profile.measured,
            notes=notes,
        )

    def flush(self, keys: str | Iterable[str] | None = None) -> Moved:
        """Write every entry (or the keys given) not yet on nvme down to it now, within its budget (nothing there
        is evicted for it), the most recently used first; the memory copies stay. Returns what was written and,
        for each entry not written, why. A bar shows progress on a terminal for long flushes."""
        self._check_open()
        wanted = None if keys is None else _checked_keys(keys)
        with self._lock:
            self._check_open()
            return self._flush(wanted)

    def _flush(self, keys: list[str] | None) -> Moved:
        pending = self._engine.flush_size(keys)
        bar = progress_callback(pending, f"tiercache: writing to {self.root}") if pending >= FLUSH_BAR_FROM else None
        try:
            return self._engine.flush(keys, bar.relative_update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

    def close(self) -> None:
        """Wait for gets and prefetches in flight, write what is only in memory down to nvme (with a root you gave
        and `placement.flush_on_close`, the default; `flush()`), free the memory tiers and leave the root. Entries
        in nvme stay on disk; a later miss on one that could not be kept says why. A cache that is never closed
        releases its root when it is garbage-collected (without flushing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no new reads start from here on
            self._behind_work.notify_all()
        if self._writer is not None and self._writer.is_alive():
            self._writer.join()  # its write in progress ends; close's flush writes what it had queued
        self._prefetcher.shutdown(wait=True)
        for iterator in list(self._open_streams):  # a stream() its consumer left half-read ends here
            try:
                iterator.close()  # type: ignore[attr-defined]
            except ValueError:  # running in another thread right now: it ends by itself
                pass
        try:
            with self._lock:
                self._idle.wait_for(lambda: self._active_reads == 0)
                self._keep_at_close()
                self._engine.close()  # under the lock: a stats() or info() running now sees all or nothing
        finally:
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
            f"entries={'closed' if self._closed else len(self._engine)})"
        )

    # ---- reads ------------------------------------------------------------------------------------------------
    def _begin_read(self, key: str) -> Read:
        self._check_open()
        check_key(key)
        with self._lock:
            self._check_open()
            read = self._engine.begin_read(key)
            self._active_reads += 1
            return read

    def _start(self, read: Read, target: torch.device, names: list[str] | None = None) -> Load:
        """The tier's load, outside the lock; a load that fails to start ends the read."""
        try:
            return read.tier.load(read.entry, target, names)
        except BaseException:
            self._end_read(read)
            raise

    def _finish(self, read: Read, load: Load, target: torch.device) -> tuple[Tensors, Event]:
        """Wait for the load's host work (disk reads), then end the read, promoting the entry when it was loaded
        to the compute device. Returns the tensors and the event after which they hold their values."""
        try:
            landed = load.result()
        except BaseException:
            self._end_read(read)
            raise
        self._end_read(read, landed if same_device(target, self.device) else None)
        return landed

    def _stream(
        self, key: str, target: torch.device, groups: list[tuple[str, list[str]]], lookahead: int, consumer: Stream
    ) -> Iterator[tuple[str, Tensors]]:
        read = self._begin_read(key)
        if [t.name for t in read.spec.tensors] != [n for _, names in groups for n in names]:
            self._end_read(read)  # replaced between info() and here by a version of other tensors
            raise EntryValueError(f"stream({key!r}): the entry was replaced by one of other tensors; stream again")
        started: collections.deque[tuple[str, Load]] = collections.deque()
        try:
            with read.tier.hold(read.entry):  # one lease to the end: another cache's delete cannot cut it
                try:
                    for index in range(len(groups)):
                        while len(started) <= lookahead and index + len(started) < len(groups):
                            label, names = groups[index + len(started)]
                            started.append((label, read.tier.load(read.entry, target, names)))
                        label, load = started.popleft()
                        loaded, ready = load.result()
                        del load  # a small tensor's padded read buffer must not outlive its delivery
                        self._transfers.deliver(loaded.values(), ready, consumer)
                        yield label, loaded
                        del loaded
                finally:
                    for _, load in started:  # loads in flight finish (files closed) before the entry is released
                        load.settle()
        finally:
            self._end_read(read)

    def _end_read(self, read: Read, promote: tuple[Tensors, Event] | None = None) -> None:
        with self._lock:
            try:
                self._engine.end_read(read, None if self._closed else promote)
            except (TierCacheError, OSError) as exc:  # the read itself succeeded; moving others down did not
                log.warning("tiercache: promoting %r after a read failed: %s", read.key, exc)
            finally:
                self._active_reads -= 1
                if self._active_reads == 0:
                    self._idle.notify_all()

    def _keep_at_close(self) -> None:
        """With a root the user gave: flush (or not, by the policy), then remember in the root what was let go of
        and why, and say so. Never stops the close."""
        if self._temp_root is not None or self.read_only:
            return
        try:
            if self.policy.placement.flush_on_close:
                flushed = self._flush(None)
            else:
                reason = "placement.flush_on_close is false in the policy"
                flushed = Moved(left=dict.fromkeys(self._engine.memory_only(), reason))
            self._tiers["nvme"].remember_dropped(flushed.left)
        except (TierCacheError, OSError) as exc:
            log.warning("tiercache: closing %s: entries in memory could not be written down: %s", self.root, exc)
            return
        if flushed.left and self.policy.placement.flush_on_close and self._tiers["nvme"].capacity > 0:
            log.warning("tiercache: closing %s: %s", self.root, flushed.describe())  # a policy with no nvme: info
        elif flushed.moved or flushed.left:
            log.info("tiercache: closing %s: %s", self.root, flushed.describe())

    def _write_behind(self) -> None:
        """The background queue of placement.write = "behind": write each queued put down to nvme, one at a time,
        and only while no read is in flight (reads overtake it: a write waits for them to end)."""
        with self._lock:
            while True:
                self._behind_work.wait_for(lambda: bool(self._behind) or self._closed)
                if self._closed:
                    return
                self._idle.wait_for(lambda: self._active_reads == 0 or self._closed)
                if self._closed:
                    return
                key = self._behind.popleft()
                if key not in self._engine:
                    continue  # deleted, evicted or replaced (its new version is queued too) meanwhile
                try:
                    left = self._engine.flush([key]).left
                except TierCacheError as exc:  # removed by another cache meanwhile, or the index refused
                    left = {key: str(exc)}
                if left:
                    log.info("tiercache: write-behind left %r in memory: %s", key, left[key])

    @contextlib.contextmanager
    def _unlocked(self) -> Iterator[None]:
        """Let go of the cache's lock for a disk write (a tier's slow part: plan under the lock, write outside it,
        commit under it), so that gets, puts and stats of other entries never wait on the disk. The engine's
        records stay consistent meanwhile: the entry being written is protected as if read, and an old version of
        its key is served until the new one commits. close() waits for the write."""
        self._active_reads += 1  # the caller (the engine, inside a call of ours) holds the lock
        state = self._lock._release_save()  # type: ignore[attr-defined]  # every level, as Condition.wait does
        try:
            yield
        finally:
            self._lock._acquire_restore(state)  # type: ignore[attr-defined]
            self._active_reads -= 1
            if self._active_reads == 0:
                self._idle.notify_all()

    # ---- small helpers ----------------------------------------------------------------------------------------
    def _adopt_found(self) -> None:
        """Index the entries persistent tiers hold (written by earlier processes, or by caches open on the root now);
        a shared store's entries as far as its first listing has got (its lister goes on after the open)."""
        self._engine.refresh(whole=False)
        for name, tier in self._tiers.items():
            if tier.persistent and tier.used > tier.capacity:
                log.warning(
                    "tiercache: the entries in %s (%s) exceed this policy's %s budget (%s, %s): puts there will "
                    "evict the least recently used first; open the root with a larger tiers.%s.capacity to keep them",
                    self.root,
                    format_size(tier.used),
                    name,
                    format_size(tier.capacity),
                    self.policy.source,
                    name,
                )

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
        return self.device if device is None else _device(device, "device=")


def _checked_keys(keys: str | Iterable[str]) -> list[str]:
    """One key or several, each checked."""
    return [check_key(k) for k in ([keys] if isinstance(keys, str) else keys)]


def _prefix(prefix: object, where: str) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise EntryValueError(f"{where}(prefix=): a non-empty string, got {prefix!r}")
    return prefix


def _device(device: object, where: str) -> torch.device:
    """A device the cache can move tensors to, checked before any work: the CPU, or a CUDA device that exists
    ("cuda" means the current one); anything else raises EntryValueError saying what is available."""
    try:
        target = device if isinstance(device, torch.device) else torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError) as exc:
        raise EntryValueError(f"{where}{device!r} is not a device: {exc}; use 'cpu' or 'cuda[:N]'") from None
    if target.type == "cpu":
        return target
    if target.type != "cuda":
        raise EntryValueError(f"{where}{device!r}: tiercache moves tensors to 'cpu' or 'cuda[:N]' devices only")
    if not torch.cuda.is_available():
        raise EntryValueError(f"{where}{device!r}: CUDA is not available on this machine; use 'cpu'")
    count = torch.cuda.device_count()
    if target.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if target.index >= count:
        raise EntryValueError(f"{where}{device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return target


def _shut_down(
    engine: Engine, transfers: Transfers, prefetcher: ThreadPoolExecutor, temp_root: Path | None, pid: int
) -> None:
    """Release what outlives a cache's Python object: the prefetch threads, the tiers (the host pool, the root's
    membership), the copy streams, a temporary root. Not in a forked child: all of that is its parent's."""
    if os.getpid() != pid:
        return
    prefetcher.shutdown(wait=False)  # close() has already waited; the garbage collector must not block
    try:
        engine.close()
    finally:
        try:
            transfers.close()
        finally:
            if temp_root is not None:
                shutil.rmtree(temp_root, ignore_errors=True)


def _grouped(names: list[str], group: int | Callable[[str], str]) -> list[tuple[str, list[str]]]:
    """The entry's tensor names in stored order, cut into (label, names) groups (see TierCache.stream_groups)."""
    if not callable(group):
        starts = range(0, len(names), group)
        return [(names[i] if group == 1 else str(i // group), names[i : i + group]) for i in starts]
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        label = str(group(name))
        if groups and groups[-1][0] == label:
            groups[-1][1].append(name)
        else:
            groups.append((label, [name]))
    return groups
