"""What the engine knows of entries, and the values it hands out: decisions, entry infos, reads, tier usage."""

from __future__ import annotations

from dataclasses import dataclass, field

from .entry import EntrySpec, TensorSpec
from .tiers.base import EntryId, Tier
from .units import format_size


@dataclass(frozen=True)
class PutHints:
    """Optional hints a put may carry."""

    deadline_ms: float | None = None  # the entry must be reloadable to hbm within this time
    priority: int = 0  # may demote entries of this priority or lower to make room; protected from lower ones
    write_through: bool | None = None  # also write to nvme at once (None: the policy's placement.write)


@dataclass(frozen=True)
class Decision:
    """Why an entry was placed where it was."""

    tier: str
    reason: str
    deadline_ms: float | None
    priority: int
    write_through: bool
    reload_ms: dict[str, float]  # predicted reload to hbm from each tier that admits it


@dataclass
class Record:
    uid: int
    spec: EntrySpec
    tiers: list[str] = field(default_factory=list)  # where it lives, fastest first
    pins: int = 0
    readers: int = 0  # reads and moves in progress: not evictable, storage kept if deleted
    deleted: bool = False
    uses: int = 1  # the put, then every get
    last_used: float = 0.0
    priority: int = 0
    deadline_ms: float | None = None
    decision: Decision | None = None
    written_ns: int = 0  # wall-clock time of the put (or of the write a tier found): the newer version wins
    refused: list[str] = field(default_factory=list)  # tiers whose device ran out of memory placing it
    superseded: frozenset[str] = frozenset()  # shared tiers whose store holds a newer version (Tier.supersede)

    @property
    def busy(self) -> bool:
        return self.pins > 0 or self.readers > 0


@dataclass(frozen=True)
class EntryInfo:
    """Where an entry lives, what it holds, and why it was placed there."""

    key: str
    nbytes: int
    tiers: tuple[str, ...]  # fastest first; tiers[0] is what tier_of() returns
    pins: int
    tensors: tuple[TensorSpec, ...]
    uses: int
    priority: int
    decision: Decision | None


@dataclass(frozen=True)
class Read:
    """A read in progress, from `begin_read` to `end_read`: the entry cannot be evicted or freed meanwhile."""

    key: str
    entry: EntryId
    spec: EntrySpec
    tier: Tier  # the fastest tier holding it: the one to load from


@dataclass(frozen=True)
class Moved:
    """What a flush or an offload moved (`moved`, by key) and what it could not, each with the reason (`left`)."""

    moved: tuple[str, ...] = ()
    left: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0  # bytes moved
    to: str = "nvme"

    def describe(self) -> str:
        text = f"{len(self.moved)} entries ({format_size(self.nbytes)}) written to {self.to}"
        if self.left:
            text += f"; {len(self.left)} not kept: " + "; ".join(f"{k!r}: {why}" for k, why in self.left.items())
        return text


@dataclass(frozen=True)
class TierUsage:
    capacity: int
    used: int
    entries: int
    pinned: int  # entries pinned or being read
    hits: int


@dataclass(frozen=True)
class Counters:
    misses: int
    evicted: int  # entries that left the cache because no lower tier could take them
    expired: int  # entries removed by eviction.ttl_s
