"""The contracts every eviction rule and every placement rule keep, parametrised over their registries, and
what each rule does of its own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiercache.policy.eviction import (
    EVICTION_RULES,
    FifoPolicy,
    GdsfPolicy,
    LfuPolicy,
    LruPolicy,
    Usage,
    make_eviction_policy,
)
from tiercache.policy.placement import PLACEMENT_RULES, make_placement_policy
from tiercache.policy.schema import TIER_NAMES, HostBudget, NvmeBudget, PlacementSettings, TierBudget, Tiers


def use(nbytes: int = 100, uses: int = 1, reload_s: float = 1.0) -> Usage:
    return Usage(nbytes, uses, reload_s)


@pytest.fixture(params=sorted(EVICTION_RULES))
def rule(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_victims_are_exactly_the_tracked_entries(rule: str) -> None:
    p = make_eviction_policy(rule)
    for e in range(5):
        p.inserted(e, use(10 * (e + 1)))
    p.accessed(3, use(40, uses=2))
    p.removed(1)
    assert sorted(p.victims()) == [0, 2, 3, 4] and len(p) == 4
    assert 1 not in p and 3 in p


def test_victims_iterate_over_a_snapshot(rule: str) -> None:
    p = make_eviction_policy(rule)
    for e in range(4):
        p.inserted(e, use())
    seen = []
    for e in p.victims():
        p.removed(e, evicted=True)
        seen.append(e)
    assert sorted(seen) == [0, 1, 2, 3] and len(p) == 0


def test_forgetting_unknown_entries_is_harmless(rule: str) -> None:
    p = make_eviction_policy(rule)
    p.removed("nope")
    p.accessed("nope", use())
    assert list(p.victims()) == []


@given(
    ops=st.lists(st.tuples(st.sampled_from(["insert", "access", "remove", "evict"]), st.integers(0, 6)), max_size=60)
)
def test_any_sequence_keeps_victims_equal_to_the_tracked_set(ops: list[tuple[str, int]]) -> None:
    for rule in EVICTION_RULES:
        p = make_eviction_policy(rule)
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
        victims = list(p.victims())
        assert sorted(victims) == sorted(tracked) and len(victims) == len(set(victims)) == len(p), rule


def test_lru_evicts_the_least_recently_used_first() -> None:
    p = LruPolicy()
    for e in "abcd":
        p.inserted(e, use())
    p.accessed("a", use())
    p.accessed("c", use())
    assert list(p.victims()) == ["b", "d", "a", "c"]


def test_fifo_ignores_uses() -> None:
    p = FifoPolicy()
    for e in "abc":
        p.inserted(e, use())
    p.accessed("a", use(uses=9))
    assert list(p.victims()) == ["a", "b", "c"]


def test_lfu_evicts_the_least_used_first_and_breaks_ties_by_recency() -> None:
    p = LfuPolicy()
    p.inserted("hot", use(uses=5))
    p.inserted("cold", use(uses=1))
    p.inserted("warm", use(uses=2))
    p.inserted("cold2", use(uses=1))
    assert list(p.victims()) == ["cold", "cold2", "warm", "hot"]


def test_gdsf_weighs_reload_cost_uses_and_size_and_ages() -> None:
    p = GdsfPolicy()
    p.inserted("big-cheap", use(nbytes=1000, uses=1, reload_s=1.0))  # 0.001
    p.inserted("small-costly", use(nbytes=10, uses=1, reload_s=1.0))  # 0.1
    p.inserted("big-hot", use(nbytes=1000, uses=50, reload_s=1.0))  # 0.05
    assert list(p.victims()) == ["big-cheap", "big-hot", "small-costly"]
    p.removed("small-costly", evicted=True)  # inflation rises to 0.1
    assert p.inflation == pytest.approx(0.1)
    p.inserted("new", use(nbytes=1000, uses=1, reload_s=1.0))  # 0.1 + 0.001: newer entries outrank old counts
    assert list(p.victims()) == ["big-cheap", "big-hot", "new"]
    p.removed("big-hot")  # a deletion is not an eviction: no aging
    assert p.inflation == pytest.approx(0.1)


BUDGETS = Tiers(
    hbm=TierBudget(capacity=100, max_entry=40), host=HostBudget(capacity=400), nvme=NvmeBudget(capacity=1000)
)
RELOAD_S = {"hbm": 0.0, "host": 1e-3, "nvme": 1e-2}  # per byte, so that reload time grows with size


def reload_seconds(tier: str, nbytes: int) -> float:
    return RELOAD_S[tier] * nbytes


@pytest.fixture(
    scope="module",
    params=[(r, f) for r in sorted(PLACEMENT_RULES) for f in ("demote", "next_tier")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def placement(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    rule, on_full = request.param
    return make_placement_policy(PlacementSettings(rule=rule, on_full=on_full), BUDGETS, reload_seconds)


FREE = st.fixed_dictionaries({t: st.integers(0, 1000) for t in TIER_NAMES})
DEADLINES = st.one_of(st.none(), st.floats(0, 20_000))


@given(nbytes=st.integers(0, 1200), free=FREE, deadline=DEADLINES)
def test_placement_only_proposes_tiers_that_admit_the_size(
    placement, nbytes: int, free: dict[str, int], deadline: float | None
) -> None:  # type: ignore[no-untyped-def]
    plan = placement.place(nbytes, free, deadline)
    assert all(BUDGETS[a.tier].admits(nbytes) for a in plan.attempts) and plan.reason
    admitting = [t for t in TIER_NAMES if BUDGETS[t].admits(nbytes)]
    if deadline is None:
        assert {a.tier for a in plan.attempts} == set(admitting)  # every admitting tier is tried
        assert all(a.evict or free[a.tier] >= nbytes for a in plan.attempts)  # a no-evict attempt needs free space
    elif plan.attempts:
        meets = [t for t in admitting if plan.reload_ms[t] <= deadline]
        if meets:
            assert plan.attempts[0].tier == meets[-1]  # the cheapest tier that meets it
        else:  # none meets it: as without a deadline
            assert plan.attempts == placement.place(nbytes, free).attempts


@given(nbytes=st.integers(0, 1200), free=FREE, source=st.sampled_from(TIER_NAMES))
def test_demotion_goes_down_and_promotion_goes_up(placement, nbytes: int, free: dict[str, int], source: str) -> None:  # type: ignore[no-untyped-def]
    rank = TIER_NAMES.index
    assert all(
        rank(a.tier) > rank(source) and BUDGETS[a.tier].admits(nbytes) for a in placement.demote(nbytes, source, free)
    )
    assert all(
        rank(a.tier) < rank(source) and BUDGETS[a.tier].admits(nbytes) for a in placement.promote(nbytes, source, free)
    )


def test_size_thresholds_route_entries(placement) -> None:  # type: ignore[no-untyped-def]
    free = dict.fromkeys(TIER_NAMES, 1000)
    assert placement.place(30, free).attempts[0].tier == "hbm"
    assert placement.place(50, free).attempts[0].tier == "host"  # above hbm's max_entry
    assert placement.place(500, free).attempts[0].tier == "nvme"  # above host's capacity: straight to nvme
    assert placement.place(5000, free).attempts == []  # no tier admits it
    assert placement.demote(50, "hbm", free)[0].tier == "host"
    assert placement.demote(500, "hbm", free)[0].tier == "nvme"
    assert placement.demote(10, "nvme", free) == []


def test_a_deadline_picks_the_cheapest_tier_that_meets_it(placement) -> None:  # type: ignore[no-untyped-def]
    free = dict.fromkeys(TIER_NAMES, 1000)
    plan = placement.place(20, free, deadline_ms=1000)  # nvme reload 200 ms, host 20 ms
    assert [a.tier for a in plan.attempts] == ["nvme", "host", "hbm"] and "meets the 1000 ms deadline" in plan.reason
    plan = placement.place(20, free, deadline_ms=50)  # nvme misses it: only a last resort
    assert [a.tier for a in plan.attempts] == ["host", "hbm", "nvme"]
    plan = placement.place(20, free, deadline_ms=0)
    assert [a.tier for a in plan.attempts] == ["hbm", "host", "nvme"]
    plan = placement.place(50, free, deadline_ms=0)  # hbm does not admit 50 bytes: nothing meets 0 ms
    assert plan.attempts[0].tier == "host" and "no tier meets" in plan.reason
    assert plan.reload_ms == {"host": pytest.approx(50.0), "nvme": pytest.approx(500.0)}


def test_next_tier_prefers_free_space_over_demotion() -> None:
    p = make_placement_policy(PlacementSettings(on_full="next_tier"), BUDGETS, reload_seconds)
    attempts = p.place(30, {"hbm": 0, "host": 100, "nvme": 1000}).attempts
    assert (attempts[0].tier, attempts[0].evict) == ("host", False)


def test_promotion_can_be_switched_off() -> None:
    p = make_placement_policy(PlacementSettings(promote_on_hit=False), BUDGETS, reload_seconds)
    assert p.promote(10, "nvme", dict.fromkeys(TIER_NAMES, 1000)) == []
