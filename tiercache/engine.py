"""The engine: which entry lives in which tier, placement, eviction by demotion, promotion, expiry.

It moves data only by handing it from tier to tier, so the same code runs the real cache (tiers holding
tensors and files) and the trace simulator (tiers holding sizes only, data None). Not thread-safe: the
caller holds one lock around every call.

Invariants:
- an entry lives in one memory tier at most (hbm or host) and may also keep a copy in nvme: promotion out of
  nvme and write-through leave the disk copy in place, so it survives the process and demotion is free;
- every tier's `used` is the exact payload of the entries it holds and never exceeds its capacity;
- pinned entries, entries being read or moved, and entries of higher priority than the one making room are
  never victims; a deleted entry that is still being read keeps its bytes until the last reader is done.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from .entry import EntrySpec, Tensors, TensorSpec
from .errors import CapacityError, EntryNotFoundError, EntryValueError
from .policy.costmodel import Profile
from .policy.eviction import EvictionPolicy, Usage, make_eviction_policy
from .policy.placement import Attempt, PlacementPolicy, Plan, make_placement_policy
from .policy.schema import TIER_NAMES, Policy
from .tiers import Tier
from .transfer import Event
from .units import format_size

Data = Tensors | None  # None in simulation: tiers account sizes only
OnTransfer = Callable[[str, str, int, float], None]  # (source, destination, bytes, seconds spent)
Clock = Callable[[], float]


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
    ready: Event | None = None  # data path: the event to wait on before using its hbm tensors

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


class Engine:
    def __init__(
        self, policy: Policy, tiers: Mapping[str, Tier], profile: Profile, *, clock: Clock, on_transfer: OnTransfer
    ) -> None:
        self.policy = policy
        self.tiers = dict(tiers)
        self.profile = profile
        self.clock = clock
        self.on_transfer = on_transfer
        # What a reload from each tier costs in the cost model: the host tier is pinned memory where CUDA works.
        host = "host(pinned)" if self.tiers["host"].label == "host(pinned)" else "host(pageable)"
        self.reload_pathway = {"host": f"{host}->hbm", "nvme": "nvme->hbm"}
        self.orders: dict[str, EvictionPolicy] = {t: make_eviction_policy(policy.eviction.rule) for t in TIER_NAMES}
        self.placement: PlacementPolicy = make_placement_policy(policy.placement, policy.tiers, self.reload_seconds)
        self.records: dict[str, Record] = {}
        self.by_uid: dict[int, Record] = {}
        self._uids = itertools.count()
        self.hits = dict.fromkeys(TIER_NAMES, 0)
        self.misses = 0
        self.evicted = 0  # left the cache from the bottom tier
        self.expired = 0

    # ---- the cost model -----------------------------------------------------------------------------------
    def reload_seconds(self, tier: str, nbytes: int) -> float:
        return 0.0 if tier == "hbm" else self.profile.seconds(self.reload_pathway[tier], nbytes)

    def _usage(self, record: Record, tier: str) -> Usage:
        """What eviction weighs: a victim of `tier` would next be reloaded from the tier below (or nvme)."""
        below = [t for t in TIER_NAMES[TIER_NAMES.index(tier) + 1 :] if self.policy.tiers[t].admits(record.spec.nbytes)]
        source = below[0] if below else "nvme"
        return Usage(record.spec.nbytes, record.uses, self.reload_seconds(source, record.spec.nbytes))

    # ---- entries --------------------------------------------------------------------------------------------
    def put(self, spec: EntrySpec, data: Data, *, copy: bool, hints: PutHints = PutHints()) -> str:
        """Place a new entry (or a new version of a key); returns its tier. Raises CapacityError, changing
        nothing, when no tier can take it."""
        self.expire()
        old = self.records.get(spec.key)
        plan = self.placement.place(spec.nbytes, self.free(), hints.deadline_ms)
        if not plan.attempts:
            raise CapacityError(self._no_tier_admits(spec))
        feasible = [a for a in plan.attempts if self._can_make_room(a, spec.nbytes, old, hints.priority)]
        if not feasible:
            raise CapacityError(self._tiers_full(spec, plan.attempts))
        through = self.policy.placement.write == "through" if hints.write_through is None else hints.write_through
        through = through and feasible[0].tier != "nvme"  # an entry placed in nvme is written through already
        nvme_copy = Attempt("nvme", evict=True)
        if through and not (
            self.policy.tiers.nvme.admits(spec.nbytes)
            and self._can_make_room(nvme_copy, spec.nbytes, old, hints.priority)
        ):
            raise CapacityError(self._no_write_through(spec))
        record = Record(
            uid=next(self._uids),
            spec=spec,
            pins=old.pins if old else 0,
            priority=hints.priority,
            deadline_ms=hints.deadline_ms,
            last_used=self.clock(),
        )
        if old is not None:
            self._unindex(old)  # out of sight, but its bytes stay until the new version is stored
        self.by_uid[record.uid] = record
        record.readers += 1  # not a victim of its own placement
        try:
            if through:  # the disk copy first: if it fails, the old version has lost nothing yet
                if self._first_fit([nvme_copy], spec.nbytes, record.priority, sacrifice=old) != "nvme":
                    raise CapacityError(self._no_write_through(spec))
                self._store(record, "nvme", data, copy=False, source="put")
                feasible = [a for a in feasible if a.tier != "nvme"] or [nvme_copy]
            tier = self._first_fit(feasible, spec.nbytes, record.priority, sacrifice=old)
            if tier is None:  # _can_make_room said otherwise; refuse rather than keep half an entry
                raise CapacityError(self._tiers_full(spec, plan.attempts))
            if tier not in record.tiers:
                self._store(record, tier, data, copy=copy, source="put")
        except BaseException:
            for tier_name in list(record.tiers):
                self._drop(record, tier_name)
            del self.by_uid[record.uid]
            if old is not None and old.tiers:  # its bytes were not needed: the old version stays
                self._reindex(old)
            elif old is not None:
                self.by_uid.pop(old.uid, None)
            raise
        finally:
            record.readers -= 1
        record.decision = Decision(
            tier,
            self._reason(tier, plan, hints.deadline_ms),
            hints.deadline_ms,
            hints.priority,
            through,
            plan.reload_ms,
        )
        self.records[spec.key] = record
        if old is not None:
            self._retire(old)
        return tier

    def _reason(self, tier: str, plan: Plan, deadline_ms: float | None) -> str:
        """The plan's reason when its first choice was taken; otherwise where the entry went instead, and why."""
        first = plan.attempts[0].tier
        if tier == first:
            return plan.reason
        reason = f"{tier}: {first} could not make room (pinned, in-use or higher-priority entries); "
        reason += f"the plan was {plan.reason}"
        if deadline_ms is not None and plan.reload_ms.get(tier, 0.0) > deadline_ms:
            reason += f"; {tier}'s predicted reload ({plan.reload_ms[tier]:.3g} ms) misses the deadline"
        return reason

    def begin_read(self, key: str) -> tuple[Record, str, Data]:
        """Count the hit, protect the entry from eviction and deletion; memory tiers hand over their tensors."""
        self.expire()
        record = self.records.get(key)
        if record is None:
            self.misses += 1
            raise EntryNotFoundError(self._miss_message(key))
        tier = record.tiers[0]
        self.hits[tier] += 1
        record.uses += 1
        record.last_used = self.clock()
        self.orders[tier].accessed(record.uid, self._usage(record, tier))
        record.readers += 1
        return record, tier, self.tiers[tier].read(record.uid) if self.tiers[tier].keeps_tensors else None

    def end_read(self, record: Record, promote: tuple[str, Data] | None = None) -> None:
        """The read is over; free a deleted entry, or move the entry up (`promote` = (tier read from, data))."""
        record.readers -= 1
        if record.deleted:
            if record.readers == 0:
                self._release(record)
        elif promote is not None and record.tiers and record.tiers[0] == promote[0]:
            self._promote(record, *promote)

    def delete(self, key: str) -> None:
        self._remove(self.record(key))

    def pin(self, key: str) -> None:
        self.record(key).pins += 1

    def unpin(self, key: str) -> None:
        record = self.record(key)
        if record.pins == 0:
            raise EntryValueError(f"unpin({key!r}): the entry is not pinned")
        record.pins -= 1

    def info(self, key: str) -> EntryInfo:
        r = self.record(key)
        return EntryInfo(
            r.spec.key, r.spec.nbytes, tuple(r.tiers), r.pins, r.spec.tensors, r.uses, r.priority, r.decision
        )

    def record(self, key: str) -> Record:
        record = self.records.get(key)
        if record is None:
            raise EntryNotFoundError(self._miss_message(key))
        return record

    def adopt(self, spec: EntrySpec, tier: str, attach: Callable[[int], None], *, written: float) -> None:
        """Index an entry a tier already holds (nvme entries found on disk); `attach(uid)` accounts it there."""
        record = Record(uid=next(self._uids), spec=spec, last_used=written)
        attach(record.uid)
        record.tiers.append(tier)
        self.orders[tier].inserted(record.uid, self._usage(record, tier))
        self.records[spec.key] = record
        self.by_uid[record.uid] = record

    def expire(self) -> None:
        """Remove entries unused for longer than eviction.ttl_s (never pinned or busy ones)."""
        ttl = self.policy.eviction.ttl_s
        if ttl <= 0:
            return
        deadline = self.clock() - ttl
        for record in [r for r in self.records.values() if r.last_used < deadline and not r.busy]:
            self._remove(record)
            self.expired += 1

    def free(self) -> dict[str, int]:
        return {name: tier.free for name, tier in self.tiers.items()}

    # ---- placement, eviction, promotion ---------------------------------------------------------------------
    def _promote(self, record: Record, current: str, data: Data) -> None:
        if record.readers > 0:  # another read still copies from the current tier: a later read promotes
            return
        attempts = self.placement.promote(record.spec.nbytes, current, self.free())
        record.readers += 1  # making room below must not demote the entry being promoted
        try:
            target = self._first_fit(attempts, record.spec.nbytes, record.priority)
            if target is not None:
                # The read logged the bytes it moved; a tier that copies again (the host pool) logs its own copy.
                source = current if self.tiers[target].logs_transfers else None
                self._store(record, target, data, copy=False, source=source)
                if current != "nvme":  # memory tiers are exclusive; the nvme copy stays
                    self._drop(record, current)
        finally:
            record.readers -= 1

    def _can_make_room(self, attempt: Attempt, nbytes: int, replacing: Record | None, priority: int) -> bool:
        """Whether `_make_room` would succeed, computed without moving anything."""
        tier = self.tiers[attempt.tier]
        free = tier.free
        if replacing is not None and attempt.tier in replacing.tiers and replacing.readers == 0:
            free += replacing.spec.nbytes
        if free >= nbytes or not attempt.evict:
            return free >= nbytes
        reclaimable = 0
        for uid in tier:
            victim = self.by_uid[uid]
            if victim is not replacing and self._may_evict(victim, priority):
                reclaimable += victim.spec.nbytes
        return free + reclaimable >= nbytes

    def _may_evict(self, victim: Record, priority: int) -> bool:
        return not victim.busy and victim.priority <= priority

    def _first_fit(
        self, attempts: list[Attempt], nbytes: int, priority: int, sacrifice: Record | None = None
    ) -> str | None:
        """The first attempt's tier that has, or can be given, `nbytes` of room; nothing moves for the others."""
        for a in attempts:
            if self._can_make_room(a, nbytes, sacrifice, priority) and self._make_room(
                a.tier, nbytes, a.evict, priority, sacrifice
            ):
                return a.tier
        return None

    def _make_room(
        self, tier_name: str, nbytes: int, evict: bool, priority: int, sacrifice: Record | None = None
    ) -> bool:
        """Free `nbytes` in a tier: first the old version being replaced (`sacrifice`), then, if `evict`, by
        demoting the tier's victims in policy order. False if it cannot."""
        tier = self.tiers[tier_name]
        if tier.free >= nbytes:
            return True
        if sacrifice is not None and tier_name in sacrifice.tiers and sacrifice.readers == 0:
            self._drop(sacrifice, tier_name)
            if tier.free >= nbytes:
                return True
        if not evict:
            return False
        # Entries whose demotion would break their reload deadline go last: only when nothing else frees enough.
        for keep_deadlines in (True, False):
            for uid in self.orders[tier_name].victims():
                victim = self.by_uid.get(cast(int, uid))
                if victim is None or not self._may_evict(victim, priority) or tier_name not in victim.tiers:
                    continue
                if keep_deadlines and self._demotion_misses_deadline(victim, tier_name):
                    continue
                self._demote(victim, tier_name)
                if tier.free >= nbytes:
                    return True
        return False

    def _demotion_misses_deadline(self, record: Record, tier_name: str) -> bool:
        if record.deadline_ms is None:
            return False
        below = self.placement.eligible(record.spec.nbytes, below=tier_name)
        return not below or self.reload_seconds(below[0], record.spec.nbytes) * 1e3 > record.deadline_ms

    def _demote(self, record: Record, from_tier: str) -> None:
        """Move a victim one tier down (or further, if the next refuses its size); out of the cache from the
        bottom, or when nvme's admission rule refuses an entry used too few times."""
        size = record.spec.nbytes
        below = TIER_NAMES.index(from_tier)
        admit_after = self.policy.eviction.nvme_admit_after
        record.readers += 1
        try:
            attempts = [
                a
                for a in self.placement.demote(size, from_tier, self.free())
                if a.tier != "nvme" or record.uses >= admit_after
            ]
            if attempts and not any(TIER_NAMES.index(t) > below for t in record.tiers):  # no copy below yet
                target = self._first_fit(attempts, size, record.priority)
                if target is not None:
                    self._store(record, target, self.tiers[from_tier].read(record.uid), copy=False, source=from_tier)
            self._drop(record, from_tier, evicted=True)
        finally:
            record.readers -= 1
        if not record.tiers:  # nothing below took it: it has left the cache
            self.evicted += 1
            if self.records.get(record.spec.key) is record:
                del self.records[record.spec.key]
            self.by_uid.pop(record.uid, None)

    def _store(self, record: Record, tier_name: str, data: Data, *, copy: bool, source: str | None) -> None:
        """Put the record's data in a tier and account it. `source` names the pathway (None: no data moved)."""
        tier = self.tiers[tier_name]
        start = self.clock()
        if data is not None and tier.keeps_tensors:
            if copy:
                data = {n: t.to(tier.device, copy=True) for n, t in data.items()}
            elif source is None and any(t.device != tier.device for t in data.values()):
                source = "hbm" if tier_name == "host" else "host"  # a promotion that does move bytes
        tier.put(record.uid, record.spec, data, source=source, after=record.ready)
        if source is not None and not tier.logs_transfers:
            self.on_transfer(source, tier_name, record.spec.nbytes, self.clock() - start)
        record.tiers.append(tier_name)
        record.tiers.sort(key=TIER_NAMES.index)
        self.orders[tier_name].inserted(record.uid, self._usage(record, tier_name))

    def _drop(self, record: Record, tier_name: str, *, evicted: bool = False) -> None:
        self.tiers[tier_name].delete(record.uid)
        record.tiers.remove(tier_name)
        self.orders[tier_name].removed(record.uid, evicted=evicted)

    def _remove(self, record: Record) -> None:
        """Take an entry out of the cache; its storage goes now, or when its last reader is done."""
        self._unindex(record)
        self._retire(record)

    def _unindex(self, record: Record) -> None:
        """Hide an entry from lookups and from eviction; its storage and accounting stay."""
        if self.records.get(record.spec.key) is record:
            del self.records[record.spec.key]
        for tier_name in record.tiers:
            self.orders[tier_name].removed(record.uid)

    def _reindex(self, record: Record) -> None:
        self.records[record.spec.key] = record
        for tier_name in record.tiers:
            self.orders[tier_name].inserted(record.uid, self._usage(record, tier_name))

    def _retire(self, record: Record) -> None:
        record.deleted = True
        if record.readers == 0:
            self._release(record)

    def _release(self, record: Record) -> None:
        for tier_name in list(record.tiers):
            self._drop(record, tier_name)
        self.by_uid.pop(record.uid, None)

    # ---- messages ---------------------------------------------------------------------------------------------
    def _miss_message(self, key: str) -> str:
        return (
            f"{key!r} is not in the cache (never put, deleted, expired, or evicted from the last tier); "
            f"{len(self.records)} entries are cached. put() it again."
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
            f"{t}: {format_size(self.tiers[t].free)} free of {format_size(self.tiers[t].capacity)}, "
            f"{sum(1 for u in self.tiers[t] if self.by_uid[u].busy)} pinned or in use"
            for t in dict.fromkeys(a.tier for a in attempts)
        )
        return (
            f"put({spec.key!r}): the entry is {format_size(spec.nbytes)} ({spec.nbytes} bytes) and the tiers that "
            f"admit it cannot make room ({states}; entries of higher priority are not demoted for it). Unpin or "
            f"delete entries, or raise capacities in {self.policy.source}. Nothing stored was changed."
        )

    def _no_write_through(self, spec: EntrySpec) -> str:
        nvme = self.tiers["nvme"]
        return (
            f"put({spec.key!r}): write-through needs {format_size(spec.nbytes)} in nvme, which has "
            f"{format_size(nvme.free)} free of {format_size(nvme.capacity)} and cannot make room. Raise "
            f"tiers.nvme.capacity in {self.policy.source} or put without write-through. Nothing stored was changed."
        )
