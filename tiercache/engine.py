"""The engine: which entry lives in which tier, placement, eviction by demotion, promotion, expiry.

It moves data only through the Tier interface (put, load, delete), so the same code runs the real cache (tiers
holding tensors and files) and the trace simulator (tiers holding sizes only). Not thread-safe: the caller holds
one lock around every call. Nothing outside reads or edits its records: callers use the query methods (`info`,
`keys`, `usage`, `counters`) and the read protocol (`begin_read` hands out a `Read`; `end_read` takes it back).

What it holds: per entry, where it lives, its pins, readers, uses, priority, deadline and placement decision; per
tier, the eviction order and the hit count; the miss, eviction and expiry counters. Data-path state (tensors,
events, files) lives in the tiers; an event only passes through, from a load to the put that promotes it.

Invariants:
- an entry lives in one memory tier at most (hbm or host) and may also keep a copy in nvme: promotion out of
  nvme and write-through leave the disk copy in place, so it survives the process and demotion is free;
- every tier's `used` is the exact payload of the entries it holds and never exceeds its capacity;
- pinned entries, entries being read or moved, and entries of higher priority than the one making room are
  never victims; a deleted entry that is still being read keeps its bytes until the last reader is done.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping
from typing import cast

from . import messages
from .entry import EntrySpec, Tensors
from .errors import CapacityError, DeviceMemoryError, EntryNotFoundError, EntryValueError, StorageError
from .policy.costmodel import Profile
from .policy.eviction import EvictionPolicy, Usage, make_eviction_policy
from .policy.placement import Attempt, PlacementPolicy, Plan, make_placement_policy
from .policy.schema import TIER_NAMES, Policy
from .records import Counters, Decision, EntryInfo, Moved, PutHints, Read, Record, TierUsage
from .tiers.base import Found, Refresh, Tier
from .transfer import Event
from .units import format_size

Clock = Callable[[], float]
ANY_PRIORITY = 1 << 62  # making room for an explicit resize: entries of every priority may be demoted
Landed = tuple[Tensors, Event]  # a load's tensors and the event after which they hold their values


class Engine:
    def __init__(self, policy: Policy, tiers: Mapping[str, Tier], profile: Profile, *, clock: Clock) -> None:
        self.policy = policy
        self.tiers = dict(tiers)
        self.profile = profile
        self.clock = clock
        # What a reload from each tier costs in the cost model (the host pool's mode is fixed at open).
        self._reload_pathways = {name: tier.reload_pathway() for name, tier in self.tiers.items()}
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
        pathway = self._reload_pathways[tier]
        return 0.0 if pathway is None else self.profile.seconds(pathway, nbytes)

    def _usage(self, record: Record, tier: str) -> Usage:
        """What eviction weighs: a victim of `tier` would next be reloaded from the tier below (or nvme)."""
        below = [t for t in TIER_NAMES[TIER_NAMES.index(tier) + 1 :] if self.policy.tiers[t].admits(record.spec.nbytes)]
        source = below[0] if below else "nvme"
        return Usage(record.spec.nbytes, record.uses, self.reload_seconds(source, record.spec.nbytes))

    # ---- entries --------------------------------------------------------------------------------------------
    def put(self, spec: EntrySpec, data: Tensors, *, copy: bool, hints: PutHints | None = None) -> str:
        """Place a new entry (or a new version of a key); returns its tier. Raises CapacityError, changing
        nothing, when no tier can take it."""
        hints = hints or PutHints()
        unlisted = self._wait_listed(spec.nbytes)
        old = self._lookup(spec.key)
        plan = self.placement.place(spec.nbytes, self.free(), hints.deadline_ms)
        if not plan.attempts:
            raise CapacityError(self._no_tier_admits(spec))
        feasible = [
            a
            for a in plan.attempts
            if a.tier not in unlisted and self._can_make_room(a, spec.nbytes, old, hints.priority)
        ]
        if not feasible and unlisted:
            raise StorageError(self._unlisted(spec, plan.attempts, unlisted))
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
        data = {name: t.contiguous() for name, t in data.items()}  # a view's values, only once it is accepted
        record = Record(
            uid=next(self._uids),
            spec=spec,
            pins=old.pins if old else 0,
            priority=hints.priority,
            deadline_ms=hints.deadline_ms,
            last_used=self.clock(),
            written_ns=time.time_ns(),
        )
        if old is not None:  # served until the new version is stored (a write may run outside the cache's lock)
            self._unorder(old)  # but no victim meanwhile: it is about to go
        self.by_uid[record.uid] = record
        record.readers += 1  # not a victim of its own placement
        try:
            if through:  # the disk copy first: if it fails, the old version has lost nothing yet
                if self._first_fit([nvme_copy], spec.nbytes, record.priority, sacrifice=old) != "nvme":
                    raise CapacityError(self._no_write_through(spec))
                self._store(record, "nvme", data, copy=False, source="put", after=None)
                feasible = [a for a in feasible if a.tier != "nvme"] or [nvme_copy]
            tier = self._place(record, feasible, data, copy, old)
            if tier is None:  # _can_make_room said otherwise; refuse rather than keep half an entry
                raise CapacityError(self._tiers_full(spec, plan.attempts))
        except BaseException:
            for tier_name in list(record.tiers):
                self._drop(record, tier_name)
            del self.by_uid[record.uid]
            if old is not None:
                self._restore(old)
            raise
        finally:
            record.readers -= 1
        record.decision = Decision(
            tier,
            self._reason(tier, plan, hints.deadline_ms, record.refused, unlisted),
            hints.deadline_ms,
            hints.priority,
            through,
            plan.reload_ms,
        )
        current = self.records.get(spec.key)
        if current is not None and current is not old:  # another put of this key committed meanwhile: the last wins
            self._supersede(current, record.tiers)
        self.records[spec.key] = record
        if old is not None:
            self._supersede(old, record.tiers)
        return tier

    def _place(
        self, record: Record, attempts: list[Attempt], data: Tensors, copy: bool, old: Record | None
    ) -> str | None:
        """Store a new entry in the first attempt's tier that makes room; where the device then refuses the memory
        (DeviceMemoryError), demote that tier's victims and retry once, then go on to the next tier down."""
        while attempts:
            tier = self._first_fit(attempts, record.spec.nbytes, record.priority, sacrifice=old)
            if tier is None or tier in record.tiers:
                return tier
            try:
                self._store_retrying(record, tier, data, copy=copy, source="put", after=None)
                return tier
            except DeviceMemoryError:
                record.refused.append(tier)
                rank = TIER_NAMES.index(tier)
                attempts = [a for a in attempts if TIER_NAMES.index(a.tier) > rank]
        return None

    def _store_retrying(
        self, record: Record, tier_name: str, data: Tensors, *, copy: bool, source: str, after: Event | None
    ) -> None:
        """`_store`, and where the device refuses the memory, once more after demoting victims worth the entry."""
        try:
            self._store(record, tier_name, data, copy=copy, source=source, after=after)
        except DeviceMemoryError:
            tier = self.tiers[tier_name]
            self._make_room(tier_name, tier.free + record.spec.nbytes, True, record.priority)
            self._store(record, tier_name, data, copy=copy, source=source, after=after)

    def _restore(self, old: Record) -> None:
        """A failed put gives the version it replaced back whatever of it is left: re-indexed, live again in shared
        tiers."""
        for tier_name in [t for t in old.tiers if self.tiers[t].shared]:  # the new version's commit replaced it
            if not self.tiers[tier_name].revive(old.uid):
                self._drop(old, tier_name)
        if old.tiers and not old.deleted:
            self._reindex(old)
        else:
            self._unindex(old)
            if not old.readers:
                self.by_uid.pop(old.uid, None)

    def _reason(
        self,
        tier: str,
        plan: Plan,
        deadline_ms: float | None,
        refused: list[str] | None = None,
        unlisted: Mapping[str, StorageError] | None = None,
    ) -> str:
        """The plan's reason when its first choice was taken; otherwise where the entry went instead, and why."""
        first = plan.attempts[0].tier
        if tier == first:
            return plan.reason
        if unlisted and first in unlisted:
            why = f"{first}'s store could not be listed ({unlisted[first]})"
        elif refused:
            why = f"the device refused {', '.join(refused)} the memory (out of memory, after demoting to retry)"
        else:
            why = f"{first} could not make room (pinned, in-use or higher-priority entries)"
        reason = f"{tier}: {why}; "
        reason += f"the plan was {plan.reason}"
        if deadline_ms is not None and plan.reload_ms.get(tier, 0.0) > deadline_ms:
            reason += f"; {tier}'s predicted reload ({plan.reload_ms[tier]:.3g} ms) misses the deadline"
        return reason

    def begin_read(self, key: str) -> Read:
        """Count the hit and protect the entry from eviction and deletion until `end_read`."""
        record = self._lookup(key)
        if record is None:
            self.misses += 1
            raise EntryNotFoundError(self._miss_message(key))
        tier = record.tiers[0]
        self.hits[tier] += 1
        record.uses += 1
        record.last_used = self.clock()
        self.orders[tier].accessed(record.uid, self._usage(record, tier))
        record.readers += 1
        return Read(key, record.uid, record.spec, self.tiers[tier])

    def end_read(self, read: Read, promote: Landed | None = None) -> None:
        """The read is over; free a deleted entry, or move the entry up with `promote`: the tensors the read
        loaded to the compute device and their event (see placement.promote_on_hit)."""
        record = self.by_uid[read.entry]
        record.readers -= 1
        if record.deleted:
            if record.readers == 0:
                self._release(record)
        elif promote is not None and record.tiers and record.tiers[0] == read.tier.name:
            self._promote(record, read.tier.name, *promote)

    def delete(self, key: str) -> None:
        """Remove an entry. Its persistent copies go first, so that a disk refusing raises with the entry still
        listed, readable and counted (an entry being read is removed when its last read ends)."""
        record = self.record(key)
        if record.readers == 0:
            for tier_name in [t for t in record.tiers if self.tiers[t].persistent]:
                self._drop(record, tier_name, strict=True)
        self._remove(record)

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
        self._lookup(key)
        return self._record(key)

    def _record(self, key: str) -> Record:
        """The record of `key`, as last refreshed; a miss raises."""
        record = self.records.get(key)
        if record is None:
            raise EntryNotFoundError(self._miss_message(key))
        return record

    def refresh(self, *, whole: bool = True) -> None:
        """Take in what persistent and shared tiers report (entries found at open, or committed and removed by
        other caches since the last call: a microsecond check when nothing changed), then expire. `whole`: first
        wait for every shared tier's first listing (what counts entries or budgets needs all of them); a lookup of
        one key does not (see `_lookup`), nor does the open."""
        for name, tier in self.tiers.items():
            if whole:
                tier.wait_listed()
            self._take(name, tier, tier.refresh())
        self.expire()

    def _wait_listed(self, nbytes: int) -> dict[str, StorageError]:
        """Wait for the first listing of each shared tier that admits an entry of `nbytes` (its room counts every
        cache's entries); those whose listing failed, with its error: a put passes them by, so that a store that is
        away keeps no entry out of the tiers that can take it."""
        unlisted = {}
        for name, tier in self.tiers.items():
            if tier.shared and self.policy.tiers[name].admits(nbytes):
                try:
                    tier.wait_listed()
                except StorageError as exc:
                    unlisted[name] = exc
        return unlisted

    def _lookup(self, key: str) -> Record | None:
        """The record of `key` after a refresh and after asking every tier for it: a shared tier still listing its
        store looks the key up at once (a fresh process's first get of a handoff), and a newer version it finds
        there replaces one another tier holds (last write wins, as when the listing is taken in)."""
        self.refresh(whole=False)
        for name, tier in self.tiers.items():
            self._take(name, tier, tier.find(key))
        return self.records.get(key)

    def _take(self, name: str, tier: Tier, changes: Refresh) -> None:
        replaced: dict[str, Record] = {}  # keys whose last copy went: a newer version below may take their pins
        for uid in changes.gone:  # the tier has forgotten them already
            record = self.by_uid.get(uid)
            if record is None or name not in record.tiers:
                continue
            record.tiers.remove(name)
            self.orders[name].removed(uid)
            if not record.tiers or uid in changes.deleted:  # deleted elsewhere: no copy here serves it either
                self._remove(record)
                if uid not in changes.deleted:  # a delete takes its pins with it
                    replaced[record.spec.key] = record
        for found in changes.found:
            self._adopt(name, tier, found, replaced.get(found.spec.key))

    def _adopt(self, name: str, tier: Tier, found: Found, previous: Record | None = None) -> None:
        """Index an entry a tier found, unless this cache holds a newer version of its key (last write wins); it
        takes the pins and priority of the version it replaces here (`previous`: one already gone)."""
        current = self.records.get(found.spec.key)
        if current is not None:
            if current.written_ns >= found.written_ns:
                tier.ignore(found)
                return
            self._supersede(current, [name])
        record = Record(uid=next(self._uids), spec=found.spec, last_used=self.clock(), written_ns=found.written_ns)
        previous = current or previous
        if previous is not None:  # a newer version of a key this cache held: its pins carry over, as a put's do
            record.pins, record.priority = previous.pins, previous.priority
        tier.adopt(record.uid, found)
        record.tiers.append(name)
        self.orders[name].inserted(record.uid, self._usage(record, name))
        self.records[found.spec.key] = record
        self.by_uid[record.uid] = record

    def expire(self) -> None:
        """Remove entries unused for longer than eviction.ttl_s (never pinned or busy ones). Memory copies go by
        this cache's uses; a copy in a shared tier stays while another cache used it within the ttl, and always in
        a read-only cache, which cannot remove it."""
        ttl = self.policy.eviction.ttl_s
        if ttl <= 0:
            return
        now = self.clock()
        for record in [r for r in self.records.values() if r.last_used < now - ttl and not r.busy]:
            kept: dict[str, float] = {}  # shared copies that stay -> seconds since their last use anywhere
            for tier_name in record.tiers:
                tier = self.tiers[tier_name]
                ago = tier.used_elsewhere(record.uid) if tier.shared else None
                if ago is not None and ago < ttl:
                    kept[tier_name] = ago
                elif tier.shared and not tier.writable:
                    kept[tier_name] = 0.0  # looked at again a ttl from now, not at every call
            if not kept:
                self._remove(record)
                self.expired += 1
                continue
            for tier_name in [t for t in record.tiers if t not in kept]:
                self._drop(record, tier_name)
            record.last_used = now - min(kept.values())

    def flush(self, keys: list[str] | None = None, on_write: Callable[[int], None] | None = None) -> Moved:
        """Write every entry (or those of `keys`) not yet on a durable tier down to nvme, within its budget and
        without evicting anything there, the most recently used first; each memory copy stays. Returns what was
        written and, for the rest, why not. `on_write(nbytes)` is called after each entry written."""
        nvme = self.tiers["nvme"]
        budget = self.policy.tiers.nvme
        pending = sorted(self._memory_only(keys, durable=True), key=lambda r: r.last_used, reverse=True)
        kept: list[str] = []
        left: dict[str, str] = {}
        written = 0
        for record in pending:
            key, size = record.spec.key, record.spec.nbytes
            if not nvme.writable:
                left[key] = "this cache opened the root read-only"
            elif not budget.admits(size):
                left[key] = f"tiers.nvme admits no entry of {format_size(size)} (capacity or max_entry)"
            elif nvme.free < size:
                left[key] = (
                    f"the nvme budget has {format_size(max(nvme.free, 0))} free of {format_size(nvme.capacity)} "
                    f"and it needs {format_size(size)}; raise tiers.nvme.capacity to keep it"
                )
            else:
                record.readers += 1
                try:
                    self._copy(record, record.tiers[0], "nvme")
                except (CapacityError, StorageError) as exc:
                    left[key] = str(exc)
                    continue
                finally:
                    record.readers -= 1
                kept.append(key)
                written += size
                if on_write is not None:
                    on_write(size)
        return Moved(tuple(kept), left, written)

    def offload(self, keys: list[str], to: str) -> Moved:
        """Move the entries of `keys` down to tier `to` now (or further down where it cannot take one), evicting
        there by the policy's rules to make room; entries already at or below it stay. Pinned entries and entries
        being read are left, with the reason."""
        self.refresh()
        rank = TIER_NAMES.index(to)
        moved: list[str] = []
        left: dict[str, str] = {}
        nbytes = 0
        for key in keys:
            record = self._record(key)
            above = [t for t in record.tiers if TIER_NAMES.index(t) < rank]
            if not above:
                continue
            if record.busy:
                left[key] = "pinned" if record.pins else "being read"
                continue
            try:
                self._move_down(record, rank)
            except (CapacityError, StorageError) as exc:
                left[key] = str(exc)
                continue
            moved.append(key)
            nbytes += record.spec.nbytes
        return Moved(tuple(moved), left, nbytes, to)

    def _move_down(self, record: Record, rank: int) -> None:
        """Store the record in the first tier at or below `rank` that can make room (unless one already holds it),
        then drop every copy above that tier."""
        size = record.spec.nbytes
        if not any(TIER_NAMES.index(t) >= rank for t in record.tiers):
            attempts = [Attempt(t, evict=True) for t in TIER_NAMES[rank:] if self.policy.tiers[t].admits(size)]
            record.readers += 1  # never a victim of the room made for it
            try:
                target = self._first_fit(attempts, size, record.priority)
                if target is None:
                    raise CapacityError(
                        f"offload({record.spec.key!r}): no tier from {TIER_NAMES[rank]} down can make room for "
                        f"{format_size(size)} (pinned, in-use or higher-priority entries)"
                    )
                self._copy(record, record.tiers[0], target)
            finally:
                record.readers -= 1
        for tier_name in [t for t in record.tiers if TIER_NAMES.index(t) < rank]:
            self._drop(record, tier_name, evicted=True)

    def set_capacity(self, name: str, nbytes: int) -> None:
        """Change a tier's budget now. Shrinking demotes what no longer fits (whatever its priority; never pinned
        entries or entries being read): a CapacityError, changing nothing, when they alone exceed the new budget."""
        self.refresh()  # a shared tier's budget counts every cache's entries: all of them taken in first
        tier = self.tiers[name]
        stuck = sum(self.by_uid[u].spec.nbytes for u in tier if self.by_uid[u].busy)
        if tier.used > nbytes and stuck > nbytes:
            raise CapacityError(
                f"set_capacity({name!r}, {format_size(nbytes)}): {format_size(stuck)} of {name} is pinned or being "
                "read and cannot move; unpin those entries or wait for their reads"
            )
        tier.capacity = nbytes  # first: a tier that refuses it (one that is off) leaves the policy as it was
        budget = dataclasses.replace(self.policy.tiers[name], capacity=nbytes)
        tiers = dataclasses.replace(self.policy.tiers, **{name: budget})  # type: ignore[arg-type]
        self.policy = dataclasses.replace(self.policy, tiers=tiers)
        self.placement = make_placement_policy(self.policy.placement, self.policy.tiers, self.reload_seconds)
        if tier.free < 0:
            self._make_room(name, 0, True, ANY_PRIORITY)

    def flush_size(self, keys: list[str] | None = None) -> int:
        """Bytes a flush of `keys` (None: every entry) would write at most."""
        return sum(r.spec.nbytes for r in self._memory_only(keys, durable=True))

    def memory_only(self) -> list[str]:
        """Keys held by no persistent tier: what a close without flushing lets go of."""
        return [r.spec.key for r in self._memory_only(None)]

    def _memory_only(self, keys: list[str] | None, *, durable: bool = False) -> list[Record]:
        """The records of `keys` (None: every entry; a miss raises) that no persistent tier holds (`durable`: no
        durable tier, which is what a flush writes). This cache's own entries: no shared tier's listing is waited
        for (a close would otherwise wait for a whole bucket's)."""
        self.refresh(whole=False)
        records = list(self.records.values()) if keys is None else [self._record(k) for k in keys]
        kept = (lambda t: t.durable) if durable else (lambda t: t.persistent)
        return [r for r in records if not any(kept(self.tiers[t]) for t in r.tiers)]

    def free(self) -> dict[str, int]:
        return {name: tier.free for name, tier in self.tiers.items()}

    # ---- queries and close ------------------------------------------------------------------------------------
    def keys(self, prefix: str = "") -> list[str]:
        self.refresh()
        return [k for k in self.records if k.startswith(prefix)]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._lookup(key) is not None

    def __len__(self) -> int:
        self.refresh()
        return len(self.records)

    def usage(self) -> dict[str, TierUsage]:
        """Per tier: its budget, bytes and entries held, entries pinned or in use, and hits."""
        return {
            name: TierUsage(
                tier.capacity,
                tier.used,
                len(tier),
                sum(1 for uid in tier if self.by_uid[uid].pins),
                self.hits[name],
            )
            for name, tier in self.tiers.items()
        }

    def counters(self) -> Counters:
        return Counters(self.misses, self.evicted, self.expired)

    def close(self) -> None:
        """Forget every entry and close every tier (persistent tiers keep their files). Idempotent."""
        self.records.clear()
        self.by_uid.clear()
        errors = []
        for tier in self.tiers.values():  # every tier, even after one fails to close
            try:
                tier.close()
            except Exception as exc:  # noqa: BLE001 - raised below, once all are closed
                errors.append(exc)
        if errors:
            raise errors[0]

    # ---- placement, eviction, promotion ---------------------------------------------------------------------
    def _promote(self, record: Record, current: str, data: Tensors, ready: Event) -> None:
        if record.readers > 0:  # another read still copies from the current tier: a later read promotes
            return
        attempts = self.placement.promote(record.spec.nbytes, current, self.free())
        record.readers += 1  # making room below must not demote the entry being promoted
        try:
            target = self._first_fit(attempts, record.spec.nbytes, record.priority)
            if target is not None:
                # The tensors are on the compute device (the read landed them there), handed over without a copy.
                try:
                    self._store_retrying(record, target, data, copy=False, source="hbm", after=ready)
                except DeviceMemoryError:
                    return  # the device has no room after all: the entry stays where it is
                if not self.tiers[current].persistent:  # memory tiers are exclusive; a persistent copy stays
                    self._drop(record, current)
        finally:
            record.readers -= 1

    def _can_make_room(self, attempt: Attempt, nbytes: int, replacing: Record | None, priority: int) -> bool:
        """Whether `_make_room` would succeed, computed without moving anything."""
        tier = self.tiers[attempt.tier]
        if not tier.writable or not tier.listed():  # a shared tier's room: once all its entries are in
            return False
        free = tier.free
        if (
            replacing is not None
            and not tier.shared  # a shared tier frees the old version only when the new one commits
            and attempt.tier in replacing.tiers
            and replacing.readers == 0
        ):
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
        if not tier.writable or not tier.listed():  # a shared tier's room: once all its entries are in
            return False
        if tier.free >= nbytes:
            return True
        if sacrifice is not None and not tier.shared and tier_name in sacrifice.tiers and sacrifice.readers == 0:
            self._drop(sacrifice, tier_name)
            if not sacrifice.tiers and self.records.get(sacrifice.spec.key) is sacrifice:
                del self.records[sacrifice.spec.key]  # its room went to the new version: nothing left to serve
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
                if tier.shared and self._used_elsewhere(victim, tier_name):
                    continue
                self._demote(victim, tier_name)
                if tier.free >= nbytes:
                    return True
        return False

    def _used_elsewhere(self, record: Record, tier_name: str) -> bool:
        """Whether another cache used the entry in the shared tier since this one did: counted as a use here (its
        eviction order moves it), so victims are chosen by every member's uses, not this cache's alone."""
        ago = self.tiers[tier_name].used_elsewhere(record.uid)
        if ago is None or self.clock() - ago <= record.last_used:
            return False
        record.last_used = self.clock() - ago
        self.orders[tier_name].accessed(record.uid, self._usage(record, tier_name))
        return True

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
                    self._copy(record, from_tier, target)
            self._drop(record, from_tier, evicted=True)
        finally:
            record.readers -= 1
        if not record.tiers:  # nothing below took it: it has left the cache
            self.evicted += 1
            if self.records.get(record.spec.key) is record:
                del self.records[record.spec.key]
            self.by_uid.pop(record.uid, None)

    def _store(
        self, record: Record, tier_name: str, data: Tensors, *, copy: bool, source: str, after: Event | None
    ) -> None:
        """Put the record's data in a tier and account it; `source` names where the data comes from."""
        self.tiers[tier_name].put(
            record.uid, record.spec, data, source=source, copy=copy, after=after, written_ns=record.written_ns
        )
        record.tiers.append(tier_name)
        record.tiers.sort(key=TIER_NAMES.index)
        self.orders[tier_name].inserted(record.uid, self._usage(record, tier_name))

    def _copy(self, record: Record, source: str, target: str) -> None:
        """Store the record's data, as tier `source` holds it, in tier `target` as well (a demotion or a flush)."""
        data, ready = self.tiers[source].load(record.uid, None).result()
        self._store(record, target, data, copy=False, source=source, after=ready)

    def _drop(self, record: Record, tier_name: str, *, evicted: bool = False, strict: bool = False) -> None:
        """Take a copy out of a tier for good: `release` (never raises for a disk fault), or with `strict`,
        `delete` (a refusal raises, the copy still there); `supersede` where a newer version is in the same store."""
        tier = self.tiers[tier_name]
        if tier_name in record.superseded:
            tier.supersede(record.uid)
        else:
            (tier.delete if strict else tier.release)(record.uid)
        record.tiers.remove(tier_name)
        self.orders[tier_name].removed(record.uid, evicted=evicted)

    def _supersede(self, record: Record, newer: list[str]) -> None:
        """Take out an entry that a newer version of its key, stored in tiers `newer`, replaces: in a shared tier
        that holds both, the old version stays in the store for readers elsewhere until the store's sweep."""
        record.superseded = frozenset(t for t in record.tiers if t in newer and self.tiers[t].shared)
        self._remove(record)

    def _remove(self, record: Record) -> None:
        """Take an entry out of the cache; its storage goes now, or when its last reader is done."""
        self._unindex(record)
        self._retire(record)

    def _unindex(self, record: Record) -> None:
        """Hide an entry from lookups and from eviction; its storage and accounting stay."""
        if self.records.get(record.spec.key) is record:
            del self.records[record.spec.key]
        self._unorder(record)

    def _unorder(self, record: Record) -> None:
        """Take an entry out of every eviction order (removing one that is not there is a no-op)."""
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
        why = next((w for t in self.tiers.values() if t.persistent and (w := t.why_missing(key)) is not None), None)
        return messages.miss(key, len(self.records), why)

    def _no_tier_admits(self, spec: EntrySpec) -> str:
        return messages.no_tier_admits(spec, self.policy)

    def _tiers_full(self, spec: EntrySpec, attempts: list[Attempt]) -> str:
        return messages.tiers_full(spec, self._states(attempts), self.policy.source)

    def _states(self, attempts: list[Attempt]) -> list[tuple[str, int, int, int]]:
        """(tier, free, capacity, entries pinned or in use) of each attempt's tier, for a refusal's message."""
        return [
            (t, self.tiers[t].free, self.tiers[t].capacity, sum(1 for u in self.tiers[t] if self.by_uid[u].busy))
            for t in dict.fromkeys(a.tier for a in attempts)
        ]

    def _unlisted(self, spec: EntrySpec, attempts: list[Attempt], unlisted: Mapping[str, StorageError]) -> str:
        others = [a for a in attempts if a.tier not in unlisted]
        return messages.unlisted(spec, unlisted, self._states(others), self.policy.source)

    def _no_write_through(self, spec: EntrySpec) -> str:
        nvme = self.tiers["nvme"]
        return messages.no_write_through(spec, nvme.free, nvme.capacity, self.policy.source)
