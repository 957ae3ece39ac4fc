"""The Tier interface: a byte budget and a store of entries keyed by entry id, with one verb each to store, to load
to a device, and to delete. Tiers never pick victims: the engine does, and moves entries by these verbs alone.

A load returns a `Load` (one noun, in the spirit of kvikio's IOFuture): `wait()` gives the tensors once they hold
their values, `done()` says whether that would block, and `event` is what a consumer's stream waits on instead of
blocking the host. Some loads finish on the calling thread (a copy enqueued on a copy stream); others have host work
still to do (disk reads landing): `landed()` tells them apart, so a prefetch needs a thread only for those.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..entry import EntrySpec, Tensors
from ..errors import CapacityError
from ..io.buffers import HostBuffers
from ..io.files import FileOps
from ..pathway import Pathway
from ..policy.schema import TierBudget
from ..transfer import Event, Transfers, all_of

EntryId = int  # unique per stored version of an entry, so a replaced key never collides with itself
OnTransfer = Callable[[Pathway, int, float], None]  # (pathway, bytes, seconds), once a transfer has completed
Finish = Callable[[], tuple[Tensors, Event]]


class Load:
    """A load of an entry's tensors in flight. Either already landed (tensors and the event after which they hold
    their values are known), or with host work left that `result()` runs on the thread that calls it first."""

    def __init__(self, tensors: Tensors | None = None, event: Event | None = None, *, finish: Finish | None = None):
        if (finish is None) == (tensors is None):
            raise ValueError("a Load is either landed (tensors, event) or has a finish call, not both or neither")
        self._finish = finish
        self._outcome: tuple[Tensors, Event] | None = None if tensors is None else (tensors, event or all_of(()))
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def landed(self) -> bool:
        """Whether no host work is left (the copies may still run on a stream: see `done()`)."""
        return self._outcome is not None or self._error is not None

    def result(self) -> tuple[Tensors, Event]:
        """The tensors and the event after which they hold their values, once the host work is done (runs it)."""
        with self._lock:
            if self._outcome is None and self._error is None:
                assert self._finish is not None
                finish, self._finish = self._finish, None
                try:
                    self._outcome = finish()
                except BaseException as exc:
                    self._error = exc
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    @property
    def event(self) -> Event:
        """What a consumer's stream waits on before using the tensors (runs the host work first if left)."""
        return self.result()[1]

    def wait(self) -> Tensors:
        """The tensors, the calling thread blocked until they hold their values."""
        tensors, event = self.result()
        event.synchronize()
        return tensors

    def done(self) -> bool:
        """Whether wait() would return (or raise) without blocking."""
        if self._error is not None:
            return True
        return self._outcome is not None and self._outcome[1].query()

    def settle(self) -> None:
        """End the load whatever happens (its files closed, its buffers released); its error, if any, is dropped:
        for a consumer that stopped early, whose own error wins."""
        try:
            self.wait()
        except BaseException:  # noqa: BLE001
            pass


@dataclass
class DataPath:
    """What every tier of one cache shares: the compute device, its copy streams, host buffers that reads land in,
    the root for tiers that keep files, where completed transfers are logged, and the system calls that files are
    read and written through (the real ones unless a test injects faults or delays), and how long to wait for a
    root another cache holds."""

    device: torch.device
    transfers: Transfers | None = None
    buffers: HostBuffers | None = None
    root: Path | None = None
    on_transfer: OnTransfer = field(default=lambda pathway, nbytes, seconds: None)
    files: FileOps = field(default_factory=FileOps)
    lock_timeout: float = 30.0  # seconds a tier sharing its root waits for another member's transaction
    read_only: bool = False  # persistent tiers: read entries others wrote, never write or remove any
    # Held around a tier's slow disk writes: lets go of the cache's lock meanwhile (the default: nothing to let go).
    unlocked: Callable[[], AbstractContextManager[None]] = field(default=contextlib.nullcontext)

    def endpoint(self, device: torch.device) -> str:
        """A device as a pathway names it: "hbm" (the compute device), "host" (CPU memory) or the device itself."""
        if same_device(device, self.device):
            return "hbm"
        return "host" if device.type == "cpu" else str(device)


@dataclass(frozen=True)
class TierState:
    """How a tier describes itself for stats()."""

    mode: str | None = None  # how it moves bytes to and from host memory (e.g. "pinned", "o_direct")
    device_mode: str | None = None  # how it moves them to the compute device where that differs ("gds", "compat")
    notes: tuple[str, ...] = ()  # lines for stats().notes: what it fell back to, and why


class Tier(ABC):
    """One level of the cache. Accounting is exact: `used` is the payload bytes of the entries held, and a put
    that would take it over `capacity` raises instead of storing (the cache makes room first)."""

    name: str
    persistent: ClassVar[bool] = False  # True: entries outlive the process (refresh() finds them at the next open)
    # True: entries also outlive a restart of whatever holds them (a disk, a bucket): flush() and write-behind count
    # them as kept. A persistent tier in servers' memory (remote) is not durable.
    durable: ClassVar[bool] = False
    # True: other caches (other processes) share the tier's entries and budget: `used` counts theirs too, `refresh`
    # reports what they added and removed, and an old version's room is free only once its replacement commits.
    shared: ClassVar[bool] = False

    def __init__(self, name: str, capacity: int, path: DataPath) -> None:
        self.name = name
        self.capacity = capacity
        self.path = path
        self._used = 0
        self._specs: dict[EntryId, EntrySpec] = {}

    @classmethod
    def open(cls, name: str, budget: TierBudget, path: DataPath) -> Tier:
        """The tier a cache opens for `budget` (a tier's section of the policy). Tiers that need more override it."""
        return cls(name, budget.capacity, path)

    @property
    def used(self) -> int:
        """Bytes of the budget taken: this cache's entries (and, in a shared tier, every other member's)."""
        return self._used

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def writable(self) -> bool:
        """Whether entries can be stored, demoted into or removed from this tier (False: a read-only cache's)."""
        return True

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
        self._used += spec.nbytes

    def _forget(self, entry: EntryId) -> EntrySpec:
        spec = self._specs.pop(entry)
        self._used -= spec.nbytes
        return spec

    def _log(self, source: str, dest: str, nbytes: int, seconds: float, mode: str | None = None) -> None:
        """Log a completed transfer; `mode` is this tier's, kept where the pathway's mode belongs to this tier's
        end (between host and nvme it is nvme's)."""
        own = mode is not None and Pathway(source, dest).mode_end == self.name
        self.path.on_transfer(Pathway(source, dest, mode if own else None), nbytes, seconds)

    @property
    def mode(self) -> str | None:
        """How the tier moves bytes to and from host memory, as a pathway's mode (None: it has no such choice)."""
        return None

    def describe(self) -> TierState:
        return TierState(self.mode)

    def reload_pathway(self) -> Pathway | None:
        """What bringing an entry from this tier back to the compute device costs in the cost model (None: free)."""
        return Pathway(self.name, "hbm", self.mode).costed()

    def refresh(self) -> Refresh:
        """Entries the tier holds that this cache does not know yet (persistent tiers: found at open; shared ones:
        committed by other caches since), and those it knew that are gone (another cache removed them; the tier
        has already forgotten them). A shared tier whose first listing of its store is still under way reports
        what it has so far: `find` looks a key up meanwhile, `wait_listed` waits for the rest. Nothing, by default."""
        return Refresh()

    def find(self, key: str) -> Refresh:
        """Versions of `key` this tier holds that refresh() has not reported yet, looked up now (a shared tier
        while its first listing is under way: a handoff's get need not wait for every other entry). Nothing, by
        default."""
        return Refresh()

    def listed(self) -> bool:
        """Whether refresh() has reported every entry the tier held when it opened (see wait_listed), without
        waiting; a shared tier still listing is asked to hurry. True by default."""
        return True

    def wait_listed(self) -> None:  # noqa: B027 - a no-op unless the tier lists a store in the background
        """Return once refresh() can report every entry the tier held when it opened (a shared tier's first
        listing); what needs them all (keys(), a budget) calls this first. Raises if that listing failed."""

    def adopt(self, entry: EntryId, found: Found) -> None:
        """Account an entry refresh() found, under a new entry id."""
        raise NotImplementedError(f"tier {self.name} finds no entries")

    def hold(self, entry: EntryId) -> AbstractContextManager[None]:
        """Keep an entry readable, whoever removes it, for a series of loads (a stream); nothing to do by default."""
        return contextlib.nullcontext()

    def used_elsewhere(self, entry: EntryId) -> float | None:
        """A shared tier that records every cache's uses: seconds since another cache last used the entry, where
        that was after this cache's last use of it here; None where it was not, or the tier cannot tell (then
        this cache's own uses decide its expiry)."""
        return None

    def revive(self, entry: EntryId) -> bool:
        """A shared tier: make an entry live again that a failed put's new version replaced (its commit marked it
        replaced for every cache); False where that is no longer possible (its files are gone). True by default."""
        return True

    def remember_dropped(self, dropped: dict[str, str]) -> None:  # noqa: B027 - persistent tiers remember
        """Keys this cache held in memory only and let go of at close, each with the reason, for a later miss."""

    def why_missing(self, key: str) -> str | None:
        """What this tier knows of a key it does not hold (a persistent tier: dropped at a cache's close), or None."""
        return None

    def ignore(self, found: Found) -> None:  # noqa: B027 - a no-op unless the tier reports found entries
        """The cache holds a newer version of a found entry's key: do not report that one again."""

    @abstractmethod
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
        """Store an entry. `source` names where the tensors come from ("put": the caller; else a tier's name), for
        the pathway logged. With `copy` False the tier may keep the given tensors. `after` is an event the
        tensors' values wait on (a copy still filling them), which the tier orders its reads after. `written_ns`:
        when this version of the entry was first put (kept through demotions), for tiers that compare versions."""

    @abstractmethod
    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        """Start loading the entry's tensors (or only those named, in the order given) to `device`; with device
        None, as the tier holds them, for moving them to another tier (no copy where the tier can avoid one)."""

    @abstractmethod
    def delete(self, entry: EntryId) -> None:
        """Drop an entry and release its bytes (once no load in flight uses them). A tier whose storage can refuse
        (a disk) raises StorageError with the entry still stored, readable and counted."""

    def release(self, entry: EntryId) -> None:
        """Drop an entry that must not be served again (replaced, evicted, a failed put's copy) and never raise
        for a storage fault: a tier whose storage refuses keeps the bytes as leftovers, counted, removed later."""
        self.delete(entry)

    def supersede(self, entry: EntryId) -> None:
        """A shared tier: stop serving an entry that a newer version of its key, in the same store, replaced, but
        leave its objects for readers in other caches that already hold it (the store's sweep removes them);
        `release` by default."""
        self.release(entry)

    @abstractmethod
    def close(self) -> None:
        """Release what the tier holds in memory (persistent entries stay). Idempotent."""


@dataclass(frozen=True)
class Refresh:
    """What `Tier.refresh` reports: entries found (oldest first) and entry ids gone."""

    found: list[Found] = field(default_factory=list)
    gone: list[EntryId] = field(default_factory=list)
    deleted: list[EntryId] = field(default_factory=list)  # of `gone`, those whose key another cache deleted


@dataclass(frozen=True)
class Found:
    """An entry a persistent tier found at open: its spec, when it was written, and the tier's own handle."""

    spec: EntrySpec
    written_ns: int
    handle: Any


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        index_a = a.index if a.index is not None else torch.cuda.current_device()
        index_b = b.index if b.index is not None else torch.cuda.current_device()
        return index_a == index_b
    return True


def select(spec: EntrySpec, names: Sequence[str] | None) -> list[int]:
    """Indices of the tensors a load asks for: all of them in stored order, or the named ones in the order given."""
    if names is None:
        return list(range(len(spec.tensors)))
    index = {t.name: i for i, t in enumerate(spec.tensors)}
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f"entry {spec.key!r} has no tensor named {', '.join(map(repr, missing))}")
    return [index[n] for n in names]
