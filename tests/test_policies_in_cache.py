"""The richer policies through the real cache: deadlines and explain, priorities, write-through, TTL expiry,
nvme admission, every eviction rule. The clock is injected: no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CacheFactory
from faults import FillingDisk
from helpers import KiB, assert_same, kv, policy

import tiercache
from tiercache import CapacityError, EntryValueError
from tiercache.policy.eviction import EVICTION_RULES


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_deadline_places_the_entry_in_the_cheapest_tier_that_meets_it(make_cache: CacheFactory) -> None:
    seed = "rtx-pro-6000-blackwell"  # fixed figures: pageable 31.5 GB/s, nvme 14 GB/s, no latency
    cache = make_cache(policy(profile=seed, tiers={"hbm": {"capacity": 64 * KiB}, "host": {"capacity": 64 * KiB}}))
    # a 64 KiB entry reloads from host in 0.0021 ms and from nvme in 0.0047 ms; hbm and host hold one each
    assert cache.put("no-hint", kv(4)) == "hbm"
    assert cache.put("tight", kv(2), deadline_ms=0.003) == "host"  # nvme would miss it; host has room
    assert cache.put("relaxed", kv(1), deadline_ms=50) == "nvme"  # hbm and host full: no demotion for a deadline
    assert cache.tier_of("no-hint") == "hbm" and cache.tier_of("tight") == "host"
    text = cache.explain("relaxed")
    assert "cheapest tier whose predicted reload" in text and "50 ms deadline" in text and "nvme" in text
    assert "predicted reload: hbm 0 ms, host 0.00208 ms, nvme 0.00468 ms" in text and f"profile '{seed}'" in text
    assert cache.info("relaxed").decision.tier == "nvme"  # type: ignore[union-attr]
    assert_same(cache.get("relaxed"), kv(1))
    assert "since moved to hbm" in cache.explain("relaxed")
    assert cache.put("now", kv(3), deadline_ms=0) == "hbm"


def test_a_deadline_never_sends_an_entry_below_a_faster_tier_with_room(make_cache: CacheFactory) -> None:
    seed = "rtx-pro-6000-blackwell"
    cache = make_cache(policy(profile=seed, tiers={"hbm": {"capacity": 64 * KiB}, "host": {"capacity": 1 << 20}}))
    assert cache.put("relaxed", kv(1), deadline_ms=50) == "hbm"  # nvme would meet 50 ms, but hbm has room
    text = cache.explain("relaxed")
    assert "hbm: a faster tier with room for it" in text and "nvme is the cheapest that meets it" in text
    assert cache.put("second", kv(2), deadline_ms=50) == "host"  # hbm is full now: the next faster one with room
    assert cache.tier_of("relaxed") == "hbm"  # and nothing was demoted to make that room


@pytest.mark.parametrize("bad", [-1, float("nan"), True])
def test_bad_hints_are_refused(make_cache: CacheFactory, bad: object) -> None:
    cache = make_cache()
    with pytest.raises(EntryValueError, match="deadline_ms"):
        cache.put("k", kv(1), deadline_ms=bad)  # type: ignore[arg-type]
    with pytest.raises(EntryValueError, match="priority"):
        cache.put("k", kv(1), priority=1.5)  # type: ignore[arg-type]
    assert "k" not in cache


def test_lower_priority_puts_cannot_demote_higher_priority_entries(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 100 * KiB}}))
    cache.put("vip", kv(1), priority=5)
    assert cache.put("normal", kv(2)) == "host"  # hbm is full of a priority-5 entry
    assert cache.tier_of("vip") == "hbm"
    assert cache.put("urgent", kv(3), priority=9) == "hbm"  # may demote priority 5
    assert cache.tier_of("vip") == "host"


def test_write_through_puts_a_copy_on_nvme_at_once(make_cache: CacheFactory, tmp_path: Path) -> None:
    pol = policy(placement={"write": "through", "flush_on_close": False})
    cache = make_cache(pol)
    cache.put("durable", kv(1))
    cache.put("not", kv(2), write_through=False)
    assert cache.info("durable").tiers == ("hbm", "nvme") and cache.info("not").tiers == ("hbm",)
    assert "written through to nvme" in cache.explain("durable")
    cache.close()
    with tiercache.TierCache(root=cache.root, policy=pol) as reopened:
        assert reopened.keys() == ["durable"]
        assert_same(reopened.get("durable"), kv(1))


def test_write_through_per_put_and_refused_when_nvme_cannot_hold_it(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"nvme": {"capacity": 32 * KiB}}))
    cache.put("small", kv(1, 16 * KiB), write_through=True)
    assert cache.info("small").tiers == ("hbm", "nvme")
    with pytest.raises(CapacityError, match="write-through"):
        cache.put("big", kv(2), write_through=True)
    assert "big" not in cache and cache.info("small").tiers == ("hbm", "nvme")


def test_entries_unused_for_the_ttl_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    with tiercache.TierCache(root=tmp_path / "r", policy=policy(eviction={"ttl_s": 60}), clock=clock) as cache:
        cache.put("old", kv(1))
        cache.put("pinned", kv(2))
        cache.pin("pinned")
        clock.now += 50
        cache.put("young", kv(3))
        cache.get("old")  # a use renews it
        clock.now += 50
        assert sorted(cache.keys()) == ["old", "pinned", "young"]  # nothing swept yet: sweeps run on put/get
        cache.get("young")
        assert sorted(cache.keys()) == ["old", "pinned", "young"]
        clock.now += 61
        with pytest.raises(KeyError):
            cache["old"]
        assert cache.keys() == ["pinned"] and cache.stats().expired == 2


def test_nvme_admits_only_entries_used_often_enough(make_cache: CacheFactory) -> None:
    cache = make_cache(
        policy(tiers={"hbm": {"capacity": 100 * KiB}, "host": {"capacity": 0}}, eviction={"nvme_admit_after": 2})
    )
    cache.put("once", kv(1))
    cache.put("twice", kv(2))  # "once" is demoted: used once, so dropped instead of written back
    assert "once" not in cache and cache.stats().evicted == 1
    cache.get("twice")
    cache.put("third", kv(3))  # "twice" was used twice: written back to nvme
    assert cache.tier_of("twice") == "nvme"


@pytest.mark.parametrize("rule", sorted(EVICTION_RULES))
def test_every_eviction_rule_keeps_values_and_budgets(make_cache: CacheFactory, rule: str) -> None:
    cache = make_cache(
        policy(tiers={"hbm": {"capacity": 150 * KiB}, "host": {"capacity": 150 * KiB}}, eviction={"rule": rule})
    )
    for i in range(10):
        cache.put(f"e{i}", kv(i))
        cache.get(f"e{i // 2}")
    for i in range(10):
        assert_same(cache.get(f"e{i}"), kv(i))
    for t in cache.stats().tiers.values():
        assert t.used <= t.capacity


def test_lfu_keeps_the_most_used_entry_up(make_cache: CacheFactory) -> None:
    cache = make_cache(
        policy(tiers={"hbm": {"capacity": 150 * KiB}}, eviction={"rule": "lfu"}, placement={"promote_on_hit": False})
    )
    cache.put("hot", kv(1))
    for _ in range(3):
        cache.get("hot")
    cache.put("b", kv(2))
    cache.put("c", kv(3))  # LRU would demote "hot" (used before b); LFU demotes b
    assert cache.tier_of("hot") == "hbm" and cache.tier_of("b") == "host"


def test_stats_say_whether_the_cost_model_was_measured(make_cache: CacheFactory) -> None:
    stats = make_cache().stats()
    assert stats.profile == "cpu" and stats.profile_measured is False
    assert any("preset figures, not measured on this machine" in note for note in stats.notes)


def test_a_failed_write_through_keeps_the_old_version(make_cache: CacheFactory) -> None:
    from tiercache import StorageError

    disk = FillingDisk()
    cache = make_cache(policy(tiers={"hbm": {"capacity": 64 * KiB}, "host": {"capacity": 0}}), files=disk)
    cache.put("k", kv(1))
    disk.fill()
    with pytest.raises(StorageError, match="No space left on device"):
        cache.put("k", kv(2), write_through=True)
    assert disk.refused >= 1
    assert_same(cache.get("k"), kv(1))


def test_write_through_respects_nvme_max_entry(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"nvme": {"max_entry": 16 * KiB}}))
    with pytest.raises(CapacityError, match="write-through"):
        cache.put("k", kv(1), write_through=True)
    assert "k" not in cache
    with pytest.raises(EntryValueError, match="write_through"):
        cache.put("k", kv(1), write_through="no")  # type: ignore[arg-type]


def test_reopening_with_a_wall_clock_and_a_ttl_keeps_fresh_entries(tmp_path: Path) -> None:
    import time

    pol = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}}, eviction={"ttl_s": 3600})
    with tiercache.TierCache(root=tmp_path / "r", policy=pol, clock=time.time) as cache:
        cache.put("k", kv(1))
    with tiercache.TierCache(root=tmp_path / "r", policy=pol, clock=time.time) as cache:
        assert_same(cache.get("k"), kv(1))
        assert cache.stats().expired == 0


def test_explain_says_where_an_entry_went_when_the_first_choice_was_full(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 100 * KiB}}))
    cache.put("vip", kv(1), priority=5)
    cache.put("normal", kv(2))
    text = cache.explain("normal")
    assert "placed in host: hbm could not make room" in text and "since moved" not in text


def test_a_deadline_that_no_tier_with_room_meets_is_best_effort_and_says_so(make_cache: CacheFactory) -> None:
    seed = "rtx-pro-6000-blackwell"
    cache = make_cache(policy(profile=seed, tiers={"hbm": {"capacity": 100 * KiB}, "host": {"capacity": 0}}))
    cache.put("vip", kv(1), priority=5)
    assert cache.put("urgent", kv(2), deadline_ms=0) == "nvme"  # hbm is held by a higher priority entry
    assert "misses the deadline" in cache.explain("urgent")


def test_entries_are_demoted_past_their_deadline_only_as_a_last_resort(make_cache: CacheFactory) -> None:
    seed = "rtx-pro-6000-blackwell"  # host reload of 64 KiB: 0.0021 ms; nvme: 0.0047 ms
    cache = make_cache(policy(profile=seed, tiers={"hbm": {"capacity": 0}, "host": {"capacity": 150 * KiB}}))
    cache.put("tight", kv(1), deadline_ms=0.003)  # must stay in host to meet it
    cache.put("loose", kv(2))
    assert cache.tier_of("tight") == "host"
    cache.put("third", kv(3))  # host is full: LRU would demote "tight"; its deadline keeps it, "loose" goes
    assert cache.tier_of("tight") == "host" and cache.tier_of("loose") == "nvme"
    cache.pin("third")
    cache.put("fourth", kv(4))  # the only other candidate is pinned: as a last resort "tight" goes
    assert cache.tier_of("fourth") == "host" and cache.tier_of("tight") == "nvme"
