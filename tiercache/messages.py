"""The words of the engine's refusals: what was asked, what stood in the way, and what to do."""

from __future__ import annotations

from collections.abc import Mapping

from .entry import EntrySpec
from .policy.costmodel import Profile
from .policy.schema import SHARED_TIERS, TIER_NAMES, Policy
from .records import EntryInfo
from .units import format_size


def miss(key: str, cached: int, why: str | None = None) -> str:
    if why is not None:
        return f"{key!r} is not in the cache: {why}. {cached} entries are cached. put() it again."
    return (
        f"{key!r} is not in the cache (never put, deleted, expired, or evicted from the last tier); "
        f"{cached} entries are cached. put() it again."
    )


def no_tier_admits(spec: EntrySpec, policy: Policy) -> str:
    limits = "; ".join(
        f"{t}: capacity {format_size(b.capacity)}"
        + (f", max_entry {format_size(b.max_entry)}" if b.max_entry is not None else "")
        for t in TIER_NAMES
        for b in [policy.tiers[t]]
        if t not in SHARED_TIERS or b.capacity  # those are off unless given a capacity
    )
    return (
        f"put({spec.key!r}): the entry is {format_size(spec.nbytes)} ({spec.nbytes} bytes) and no tier admits "
        f"it ({limits}). Raise tiers.nvme.capacity (or another tier's) in {policy.source}, or split the "
        "entry. Nothing stored was changed."
    )


def tiers_full(spec: EntrySpec, states: list[tuple[str, int, int, int]], source: str) -> str:
    """`states`: (tier, free bytes, capacity, entries pinned or in use) of each tier that admits the entry."""
    return (
        f"put({spec.key!r}): the entry is {format_size(spec.nbytes)} ({spec.nbytes} bytes) and the tiers that "
        f"admit it cannot make room ({_rooms(states)}; entries of higher priority are not demoted for it). Unpin or "
        f"delete entries, or raise capacities in {source}. Nothing stored was changed."
    )


def unlisted(
    spec: EntrySpec, errors: Mapping[str, Exception], states: list[tuple[str, int, int, int]], source: str
) -> str:
    """A put no tier took: the shared tiers that admit it could not be listed (their room counts every cache's
    entries), and the others that admit it (`states`, as for tiers_full) cannot make room."""
    named = "; ".join(str(exc) for exc in errors.values())  # each names its tier
    others = f" The other tiers that admit it cannot make room ({_rooms(states)})." if states else ""
    return (
        f"put({spec.key!r}): the entry is {format_size(spec.nbytes)} ({spec.nbytes} bytes) and the shared tiers that "
        f"admit it could not be listed ({named}).{others} Put it again once the store answers, or give another tier "
        f"room for it in {source}. Nothing stored was changed."
    )


def _rooms(states: list[tuple[str, int, int, int]]) -> str:
    return "; ".join(
        f"{t}: {format_size(free)} free of {format_size(capacity)}, {busy} pinned or in use"
        for t, free, capacity, busy in states
    )


def no_write_through(spec: EntrySpec, free: int, capacity: int, source: str) -> str:
    return (
        f"put({spec.key!r}): write-through needs {format_size(spec.nbytes)} in nvme, which has "
        f"{format_size(free)} free of {format_size(capacity)} and cannot make room. Raise "
        f"tiers.nvme.capacity in {source} or put without write-through. Nothing stored was changed."
    )


def explain(key: str, info: EntryInfo, profile: Profile, chosen: str = "") -> str:
    """Why an entry is where it is: the placement decision, its reason, the predicted reloads."""
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
    lines.append(f"cost model: {profile.describe()}")
    if chosen:
        lines.append(f"policy {chosen}")
    return "\n".join(lines)
