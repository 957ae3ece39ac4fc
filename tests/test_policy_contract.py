"""Every registered eviction and placement rule passes the contracts of tiercache.testing; each registry matches
the Literal type the policy schema checks its setting against; and what each rule does of its own."""

from __future__ import annotations

import typing

import pytest

from tiercache.policy import schema
from tiercache.policy.eviction import EVICTION_RULES, FifoPolicy, GdsfPolicy, LfuPolicy, LruPolicy
from tiercache.policy.placement import PLACEMENT_RULES, make_placement_policy
from tiercache.policy.schema import TIER_NAMES, PlacementSettings
from tiercache.testing import EvictionContract, PlacementContract
from tiercache.testing.policies import BUDGETS, reload_seconds, use

for _rule in EVICTION_RULES:
    globals()[f"TestEviction_{_rule}"] = type(f"TestEviction_{_rule}", (EvictionContract,), {"rule": _rule})
for _rule in PLACEMENT_RULES:
    for _on_full in typing.get_args(schema.OnFull):
        _name = f"TestPlacement_{_rule}_{_on_full}"
        globals()[_name] = type(_name, (PlacementContract,), {"rule": _rule, "on_full": _on_full})


def test_each_registry_is_exactly_its_settings_choices() -> None:
    assert set(EVICTION_RULES) == set(typing.get_args(schema.EvictionRule))
    assert set(PLACEMENT_RULES) == set(typing.get_args(schema.PlacementRule))
    assert schema.choices(schema.EvictionSettings, "rule") == typing.get_args(schema.EvictionRule)


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


def test_next_tier_prefers_free_space_over_demotion() -> None:
    p = make_placement_policy(PlacementSettings(on_full="next_tier"), BUDGETS, reload_seconds)
    attempts = p.place(30, {"hbm": 0, "host": 100, "nvme": 1000}).attempts
    assert (attempts[0].tier, attempts[0].evict) == ("host", False)


def test_promotion_can_be_switched_off() -> None:
    p = make_placement_policy(PlacementSettings(promote_on_hit=False), BUDGETS, reload_seconds)
    assert p.promote(10, "nvme", dict.fromkeys(TIER_NAMES, 1000)) == []
