"""The eviction and placement contracts: what every rule keeps, whatever its order or its choices."""

from __future__ import annotations

import functools
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..policy.eviction import EvictionPolicy, Usage, make_eviction_policy
from ..policy.placement import PlacementPolicy, make_placement_policy
from ..policy.schema import TIER_NAMES, HostBudget, NvmeBudget, PlacementSettings, TierBudget, Tiers

OPS = ["insert", "access", "remove", "evict"]
# Each subclass runs the same test method on its own rule: that is the point of a contract, not a flaky executor.
CONTRACT_SETTINGS = settings(suppress_health_check=[HealthCheck.differing_executors])


def use(nbytes: int = 100, uses: int = 1, reload_s: float = 1.0) -> Usage:
    return Usage(nbytes, uses, reload_s)


class EvictionContract:
    """Set `rule` to a registered eviction rule's name, or override `make()` to build a rule of your own."""

    rule: str = ""

    def make(self) -> EvictionPolicy:
        return make_eviction_policy(self.rule)  # type: ignore[arg-type]

    def test_victims_are_exactly_the_tracked_entries(self) -> None:
        p = self.make()
        for e in range(5):
            p.inserted(e, use(10 * (e + 1)))
        p.accessed(3, use(40, uses=2))
        p.removed(1)
        assert sorted(cast(list[int], list(p.victims()))) == [0, 2, 3, 4] and len(p) == 4
        assert 1 not in p and 3 in p

    def test_victims_iterate_over_a_snapshot(self) -> None:
        p = self.make()
        for e in range(4):
            p.inserted(e, use())
        seen = []
        for victim in p.victims():
            p.removed(victim, evicted=True)
            seen.append(victim)
        assert sorted(cast(list[int], seen)) == [0, 1, 2, 3] and len(p) == 0

    def test_forgetting_unknown_entries_is_harmless(self) -> None:
        p = self.make()
        p.removed("nope")
        p.accessed("nope", use())
        assert list(p.victims()) == []

    @CONTRACT_SETTINGS
    @given(
        ops=st.lists(
            st.tuples(st.sampled_from(["insert", "access", "remove", "evict"]), st.integers(0, 6)), max_size=60
        )
    )
    def test_any_sequence_keeps_victims_equal_to_the_tracked_set(self, ops: list[tuple[str, int]]) -> None:
        p = self.make()
        tracked: set[int] = set()
        for op, e in ops:
            if op == "insert":
                p.inserted(e, use(e + 1, uses=e % 3 + 1))
                tracked.add(e)
            elif op == "access":
                p.accessed(e, use(e + 1, uses=e % 3 + 2))
            else:
                p.removed(e, evicted=op == "evict")
                tracked.discard(e)
        victims = cast(list[int], list(p.victims()))
        assert sorted(victims) == sorted(tracked) and len(victims) == len(set(victims)) == len(p)


BUDGETS = Tiers(
    hbm=TierBudget(capacity=100, max_entry=40), host=HostBudget(capacity=400), nvme=NvmeBudget(capacity=1000)
)
RELOAD_S = {"hbm": 0.0, "host": 1e-3, "nvme": 1e-2}  # per byte, so that reload time grows with size
FREE = st.fixed_dictionaries({t: st.integers(0, 1000) for t in TIER_NAMES})
DEADLINES = st.one_of(st.none(), st.floats(0, 20_000))


def reload_seconds(tier: str, nbytes: int) -> float:
    return RELOAD_S[tier] * nbytes


class PlacementContract:
    """Set `rule` (a registered placement rule) and `on_full`, or override `make()`. Budgets: hbm 100 bytes with
    max_entry 40, host 400, nvme 1000; reloads cost 0, 1 and 10 ms per byte from hbm, host and nvme."""

    rule: str = "size"
    on_full: str = "demote"

    def make(self) -> PlacementPolicy:
        settings = PlacementSettings(rule=self.rule, on_full=self.on_full)  # type: ignore[arg-type]
        return make_placement_policy(settings, BUDGETS, reload_seconds)

    @functools.cached_property
    def placement(self) -> PlacementPolicy:
        return self.make()

    @CONTRACT_SETTINGS
    @given(nbytes=st.integers(0, 1200), free=FREE, deadline=DEADLINES)
    def test_placement_only_proposes_tiers_that_admit_the_size(
        self, nbytes: int, free: dict[str, int], deadline: float | None
    ) -> None:
        plan = self.placement.place(nbytes, free, deadline)
        assert all(BUDGETS[a.tier].admits(nbytes) for a in plan.attempts) and plan.reason
        admitting = [t for t in TIER_NAMES if BUDGETS[t].admits(nbytes)]
        if deadline is None:
            assert {a.tier for a in plan.attempts} == set(admitting)  # every admitting tier is tried
            assert all(a.evict or free[a.tier] >= nbytes for a in plan.attempts)  # a no-evict attempt needs free space
        elif plan.attempts:
            meets = [t for t in admitting if plan.reload_ms[t] <= deadline]
            if meets:  # the fastest that meets it and has room; where none has room, the cheapest that meets it
                roomy = [t for t in meets if free[t] >= nbytes]
                assert plan.attempts[0].tier == (roomy[0] if roomy else meets[-1])
            else:  # none meets it: as without a deadline
                assert plan.attempts == self.placement.place(nbytes, free).attempts

    @CONTRACT_SETTINGS
    @given(nbytes=st.integers(0, 1200), free=FREE, source=st.sampled_from(TIER_NAMES))
    def test_demotion_goes_down_and_promotion_goes_up(self, nbytes: int, free: dict[str, int], source: str) -> None:
        rank = TIER_NAMES.index
        assert all(
            rank(a.tier) > rank(source) and BUDGETS[a.tier].admits(nbytes)
            for a in self.placement.demote(nbytes, source, free)
        )
        assert all(
            rank(a.tier) < rank(source) and BUDGETS[a.tier].admits(nbytes)
            for a in self.placement.promote(nbytes, source, free)
        )

    def test_size_thresholds_route_entries(self) -> None:
        free = dict.fromkeys(TIER_NAMES, 1000)
        assert self.placement.place(30, free).attempts[0].tier == "hbm"
        assert self.placement.place(50, free).attempts[0].tier == "host"  # above hbm's max_entry
        assert self.placement.place(500, free).attempts[0].tier == "nvme"  # above host's capacity: straight to nvme
        assert self.placement.place(5000, free).attempts == []  # no tier admits it
        assert self.placement.demote(50, "hbm", free)[0].tier == "host"
        assert self.placement.demote(500, "hbm", free)[0].tier == "nvme"
        assert self.placement.demote(10, "nvme", free) == []

    def test_a_deadline_picks_the_cheapest_tier_that_meets_it(self) -> None:
        free = {"hbm": 0, "host": 0, "nvme": 1000}  # no faster tier has room: the deadline alone decides
        plan = self.placement.place(20, free, deadline_ms=1000)  # nvme reload 200 ms, host 20 ms
        assert [a.tier for a in plan.attempts] == [
            "nvme",
            "host",
            "hbm",
        ] and "meets the 1000 ms deadline" in plan.reason
        plan = self.placement.place(20, free, deadline_ms=50)  # nvme misses it: only a last resort
        assert [a.tier for a in plan.attempts] == ["host", "hbm", "nvme"]
        plan = self.placement.place(20, free, deadline_ms=0)
        assert [a.tier for a in plan.attempts] == ["hbm", "host", "nvme"]
        free = dict.fromkeys(TIER_NAMES, 1000)
        plan = self.placement.place(50, free, deadline_ms=0)  # hbm does not admit 50 bytes: nothing meets 0 ms
        assert plan.attempts[0].tier == "host" and "no tier meets" in plan.reason
        assert plan.reload_ms == {"host": pytest.approx(50.0), "nvme": pytest.approx(500.0)}

    def test_a_deadline_never_sends_an_entry_below_a_faster_tier_with_room(self) -> None:
        plan = self.placement.place(20, dict.fromkeys(TIER_NAMES, 1000), deadline_ms=1000)  # nvme would meet it
        assert [a.tier for a in plan.attempts] == ["hbm", "nvme", "host"]
        assert plan.reason.startswith("hbm: a faster tier with room") and "nvme is the cheapest" in plan.reason
        plan = self.placement.place(20, {"hbm": 10, "host": 1000, "nvme": 1000}, deadline_ms=1000)
        assert [a.tier for a in plan.attempts] == ["host", "nvme", "hbm"]  # hbm lacks room for 20 bytes
        plan = self.placement.place(20, {"hbm": 1000, "host": 1000, "nvme": 1000}, deadline_ms=50)
        assert plan.attempts[0].tier == "hbm"  # room, and nvme (200 ms) misses it anyway
        plan = self.placement.place(20, {"hbm": 0, "host": 1000, "nvme": 1000}, deadline_ms=0)
        assert plan.attempts[0].tier == "hbm"  # host has room but misses the deadline: hbm makes room
