"""The contracts every eviction rule and every placement rule keep, parametrised over their registries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiercache.config import TIER_NAMES, NvmeBudget, PlacementSettings, TierBudget, Tiers
from tiercache.eviction import EVICTION_RULES, LruPolicy, make_eviction_policy
from tiercache.placement import PLACEMENT_RULES, make_placement_policy


@pytest.fixture(params=sorted(EVICTION_RULES))
def rule(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_victims_are_exactly_the_tracked_entries(rule: str) -> None:
    p = make_eviction_policy(rule)
    for e in range(5):
        p.inserted(e, 10 * (e + 1))
    p.accessed(3)
    p.removed(1)
    assert sorted(p.victims()) == [0, 2, 3, 4] and len(p) == 4
    assert 1 not in p and 3 in p


def test_victims_iterate_over_a_snapshot(rule: str) -> None:
    p = make_eviction_policy(rule)
    for e in range(4):
        p.inserted(e, 1)
    seen = []
    for e in p.victims():
        p.removed(e)
        seen.append(e)
    assert sorted(seen) == [0, 1, 2, 3] and len(p) == 0


def test_forgetting_unknown_entries_is_harmless(rule: str) -> None:
    p = make_eviction_policy(rule)
    p.removed("nope")
    p.accessed("nope")
    assert list(p.victims()) == []


def test_lru_evicts_the_least_recently_used_first() -> None:
    p = LruPolicy()
    for e in "abcd":
        p.inserted(e, 1)
    p.accessed("a")
    p.accessed("c")
    assert list(p.victims()) == ["b", "d", "a", "c"]


BUDGETS = Tiers(
    hbm=TierBudget(capacity=100, max_entry=40), host=TierBudget(capacity=400), nvme=NvmeBudget(capacity=1000)
)


@pytest.fixture(
    scope="module",
    params=[(r, f) for r in sorted(PLACEMENT_RULES) for f in ("demote", "next_tier")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def placement(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    rule, on_full = request.param
    return make_placement_policy(PlacementSettings(rule=rule, on_full=on_full), BUDGETS)


FREE = st.fixed_dictionaries({t: st.integers(0, 1000) for t in TIER_NAMES})


@given(nbytes=st.integers(0, 1200), free=FREE)
def test_placement_only_proposes_tiers_that_admit_the_size(placement, nbytes: int, free: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    attempts = placement.place(nbytes, free)
    assert all(BUDGETS[a.tier].admits(nbytes) for a in attempts)
    admitting = [t for t in TIER_NAMES if BUDGETS[t].admits(nbytes)]
    assert {a.tier for a in attempts} == set(admitting)  # every admitting tier is tried, none left out
    assert all(a.evict or free[a.tier] >= nbytes for a in attempts)  # a no-evict attempt needs free space


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
    assert placement.place(30, free)[0].tier == "hbm"
    assert placement.place(50, free)[0].tier == "host"  # above hbm's max_entry
    assert placement.place(500, free)[0].tier == "nvme"  # above host's capacity: straight to nvme
    assert placement.place(5000, free) == []  # no tier admits it
    assert placement.demote(50, "hbm", free)[0].tier == "host"
    assert placement.demote(500, "hbm", free)[0].tier == "nvme"
    assert placement.demote(10, "nvme", free) == []


def test_next_tier_prefers_free_space_over_demotion() -> None:
    p = make_placement_policy(PlacementSettings(on_full="next_tier"), BUDGETS)
    attempts = p.place(30, {"hbm": 0, "host": 100, "nvme": 1000})
    assert (attempts[0].tier, attempts[0].evict) == ("host", False)


def test_promotion_can_be_switched_off() -> None:
    p = make_placement_policy(PlacementSettings(promote_on_hit=False), BUDGETS)
    assert p.promote(10, "nvme", dict.fromkeys(TIER_NAMES, 1000)) == []
