"""The trace simulator: replay puts and gets through the real engine (placement, eviction, promotion) with tiers
that hold sizes only, and compare each policy with the offline optimum.

A trace is JSON Lines, one request a line, in time order:

    {"t": 0.0, "op": "put", "key": "flux/p0/text-kv", "size": 359000000}
    {"t": 0.24, "op": "get", "key": "flux/p0/text-kv", "size": 359000000}
    {"t": 9.0, "op": "delete", "key": "flux/p0/text-kv"}

optional on a put: "deadline_ms", "priority". A get that misses re-puts the entry when the line gives its size
(the application recomputes it and stores it again), as a real pipeline would.

The bound is Belady's MIN (evict what is needed again farthest in the future, or do not cache it at all) run
on one cache of the capacity of the fastest tier, of the two fastest, and of all three, allowed to (re)fetch
any live entry whenever it is requested: the entries in the k fastest tiers of any policy form such a cache
with fewer options, so for entries of one size MIN's hits bound each policy's hits in those tiers. For
entries of mixed sizes MIN is the classic reference, not a proven bound, and the report says so.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..engine import Engine
from ..entry import EntrySpec, TensorSpec
from ..errors import CapacityError, EntryNotFoundError, PolicyError, TierCacheError
from ..pathway import Pathway
from ..policy import load_policy
from ..policy.costmodel import Profile
from ..policy.schema import TIER_NAMES, Policy
from ..records import PutHints
from ..tiers import TIER_TYPES, DataPath, Tier
from ..tiers.sizes import size_only_tier
from ..units import format_size

SIMULATED_DEVICE = torch.device("meta")  # the simulated compute device: tensors of sizes, no data


class TraceError(TierCacheError, ValueError):
    """A trace line that cannot be replayed."""


@dataclass(frozen=True)
class Request:
    t: float
    op: str  # "put", "get" or "delete"
    key: str
    size: int | None = None
    deadline_ms: float | None = None
    priority: int = 0


def load_trace(path: Path) -> list[Request]:
    return parse_trace(path.read_text().splitlines(), str(path))


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> list[Request]:
    requests: list[Request] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            raw = json.loads(line)
            request = Request(
                t=float(raw["t"]),
                op=raw["op"],
                key=raw["key"],
                size=raw.get("size"),
                deadline_ms=raw.get("deadline_ms"),
                priority=raw.get("priority", 0),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise TraceError(f'{where}: not a request ({exc}); expected {{"t", "op", "key", "size"}}') from None
        if request.op not in ("put", "get", "delete") or not isinstance(request.key, str):
            raise TraceError(f"{where}: op must be put, get or delete, and key a string")
        size_ok = isinstance(request.size, int) and not isinstance(request.size, bool) and request.size >= 0
        if not size_ok and (request.op == "put" or request.size is not None):
            raise TraceError(f"{where}: size must be a number of bytes (an integer >= 0); a put needs one")
        deadline = request.deadline_ms
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline < 0
        ):
            raise TraceError(f"{where}: deadline_ms must be a number >= 0")
        if isinstance(request.priority, bool) or not isinstance(request.priority, int):
            raise TraceError(f"{where}: priority must be an integer")
        if requests and request.t < requests[-1].t:
            raise TraceError(f"{where}: time {request.t} goes backwards (previous {requests[-1].t})")
        requests.append(request)
    return requests


@dataclass
class Outcome:
    """What one policy did with a trace."""

    label: str
    gets: int = 0
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIER_NAMES, 0))
    misses: int = 0
    refused: int = 0  # puts no tier could take
    evicted: int = 0
    moved_bytes: dict[str, int] = field(default_factory=dict)
    moved_seconds: dict[str, float] = field(default_factory=dict)

    def hits_within(self, levels: int) -> int:
        """Hits served by the `levels` fastest tiers."""
        return sum(self.hits[t] for t in TIER_NAMES[:levels])

    @property
    def transfer_seconds(self) -> float:
        return sum(self.moved_seconds.values())


def replay(
    trace: Sequence[Request],
    policy: Policy,
    profile: Profile | None = None,
    label: str | None = None,
    after_each: Callable[[Engine], None] | None = None,
) -> Outcome:
    """Run a trace through the engine with size-only tiers; transfer times are the cost model's predictions.
    `after_each(engine)` runs after every request (tests check invariants with it)."""
    profile = profile or load_policy(policy)[1]
    outcome = Outcome(label or f"{policy.name} / {policy.eviction.rule}")
    now = [0.0]

    def moved(pathway: Pathway, nbytes: int, _measured: float) -> None:
        if profile.covers(pathway):  # a put into hbm moves nothing the cost model charges
            name = str(pathway.costed())
            outcome.moved_bytes[name] = outcome.moved_bytes.get(name, 0) + nbytes
            outcome.moved_seconds[name] = outcome.moved_seconds.get(name, 0.0) + profile.seconds(pathway, nbytes)

    path = DataPath(SIMULATED_DEVICE, on_transfer=moved)
    tiers: dict[str, Tier] = {t: size_only_tier(TIER_TYPES[t], t, policy.tiers[t].capacity, path) for t in TIER_NAMES}
    engine = Engine(policy, tiers, profile, clock=lambda: now[0])

    def put(request: Request) -> None:
        spec = EntrySpec(request.key, (TensorSpec("data", "uint8", (request.size or 0,)),))
        try:
            engine.put(spec, {}, copy=False, hints=PutHints(request.deadline_ms, request.priority))
        except CapacityError:
            outcome.refused += 1

    def get(request: Request) -> None:
        outcome.gets += 1
        try:
            read = engine.begin_read(request.key)
        except EntryNotFoundError:
            outcome.misses += 1
            if request.size is not None:
                put(request)
            return
        engine.end_read(read, read.tier.load(read.entry, SIMULATED_DEVICE).result())

    for request in trace:
        now[0] = request.t
        if request.op == "put":
            put(request)
        elif request.op == "get":
            get(request)
        elif request.key in engine:
            engine.delete(request.key)
        if after_each is not None:
            after_each(engine)
    outcome.hits = {name: usage.hits for name, usage in engine.usage().items()}
    outcome.evicted = engine.counters().evicted
    return outcome


def belady_hits(trace: Sequence[Request], capacity: int) -> int:
    """Hits of Belady's MIN on one cache of `capacity` bytes: on every request of a live entry (its put, and any
    get that misses: a policy may refetch it from a lower tier, or the application re-put it) it keeps what is
    requested again soonest, evicting, or not caching, what is needed farthest in the future."""
    next_use = _next_uses(trace)
    live: dict[str, int] = {}  # key -> size of its current version
    cached: dict[str, tuple[int, float]] = {}  # key -> (size, next use)
    heap: list[tuple[float, str]] = []  # (-next use, key); stale items skipped
    used = 0
    hits = 0
    for index, request in enumerate(trace):
        key = request.key
        if request.op == "get" and key in cached:
            hits += 1
            cached[key] = (cached[key][0], next_use[index])
            heapq.heappush(heap, (-next_use[index], key))
            continue
        if key in cached:  # a new version or a delete: the old copy goes
            used -= cached.pop(key)[0]
        if request.op == "delete":
            live.pop(key, None)
            continue
        if request.size is not None:
            live[key] = request.size
        size = live.get(key)
        if size is None or size > capacity or math.isinf(next_use[index]):
            continue  # nothing to keep, or nothing worth keeping
        cached[key] = (size, next_use[index])
        used += size
        heapq.heappush(heap, (-next_use[index], key))
        while used > capacity:
            negative, victim = heapq.heappop(heap)
            if victim in cached and cached[victim][1] == -negative:
                used -= cached.pop(victim)[0]
    return hits


def _next_uses(trace: Sequence[Request]) -> list[float]:
    """For each request, the index of the next get of its key, or inf if a put or delete comes first."""
    result = [math.inf] * len(trace)
    upcoming: dict[str, float] = {}
    for index in range(len(trace) - 1, -1, -1):
        request = trace[index]
        result[index] = upcoming.get(request.key, math.inf)
        upcoming[request.key] = index if request.op == "get" else math.inf
    return result


def simulate_report(
    trace: Sequence[Request], policies: Sequence[str | Policy], rules: Sequence[str] | None = None
) -> str:
    """A Markdown report: every policy (and eviction rule) side by side, each level against Belady's MIN."""
    lines: list[str] = []
    for given in policies:
        base, profile = load_policy(given)
        outcomes = []
        for rule in rules or [base.eviction.rule]:
            try:
                policy = replace(base, eviction=replace(base.eviction, rule=rule))  # type: ignore[arg-type]
            except PolicyError as exc:
                raise PolicyError(f"--rules: {exc}") from None
            outcomes.append(replay(trace, policy, profile, label=rule))
        levels = (1, 2, len(TIER_NAMES))  # hbm, hbm+host, anywhere
        capacities = [sum(base.tiers[t].capacity for t in TIER_NAMES[:k]) for k in levels]
        bounds = [belady_hits(trace, c) for c in capacities]
        gets = outcomes[0].gets
        lines += [
            f"## {base.name}: hbm {format_size(capacities[0])}, host {format_size(base.tiers.host.capacity)}, "
            f"nvme {format_size(base.tiers.nvme.capacity)}; {len(trace)} requests, {gets} gets",
            f"cost model: {profile.describe()}",
            "",
            "| eviction | hits in hbm | hits in hbm+host | hits anywhere | misses | refused puts | moved | "
            "predicted transfer time | of MIN (hbm / hbm+host / anywhere) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for o in outcomes:
            ratio = " / ".join(_fraction(o.hits_within(k), bound) for k, bound in zip(levels, bounds, strict=True))
            lines.append(
                f"| {o.label} | {o.hits_within(1)} | {o.hits_within(2)} | {o.hits_within(levels[2])} | {o.misses} | "
                f"{o.refused} | {sum(o.moved_bytes.values()) / 1e9:.1f} GB | {o.transfer_seconds:.2f} s | {ratio} |"
            )
        one_size = len({r.size for r in trace if r.size is not None}) <= 1
        label = "Belady MIN (bound)" if one_size else "Belady MIN (reference: mixed sizes, not a proven bound)"
        lines.append(f"| {label} | {bounds[0]} | {bounds[1]} | {bounds[2]} | {gets - bounds[2]} | | | | |")
        pathways = sorted({p for o in outcomes for p in o.moved_bytes})
        if pathways:
            lines += ["", "Bytes moved and predicted time, by pathway:", ""]
            lines += ["| eviction | " + " | ".join(pathways) + " |", "| --- |" + " ---: |" * len(pathways)]
            for o in outcomes:
                cells = [
                    f"{o.moved_bytes.get(p, 0) / 1e9:.1f} GB, {o.moved_seconds.get(p, 0.0):.2f} s" for p in pathways
                ]
                lines.append(f"| {o.label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fraction(hits: int, bound: int) -> str:
    return f"{hits / bound:.0%}" if bound else "-"
