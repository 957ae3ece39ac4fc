"""TierCache behaviour: placement by size, demotion, pins, promotion, refusals that lose nothing, stats."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import CacheFactory
from helpers import KiB, MiB, assert_same, kv, only_tier, policy

import tiercache
from tiercache import CacheClosedError, CapacityError, EntryNotFoundError, EntryValueError
from tiercache.policy.schema import SHARED_TIERS


def budgets_hold(cache: tiercache.TierCache) -> None:
    for t in cache.stats().tiers.values():
        assert 0 <= t.used <= t.capacity, t


def test_the_issue_example(make_cache: CacheFactory) -> None:
    cache = make_cache(policy())
    kv0 = {"block0.k": torch.randn(64, 8), "block0.v": torch.randn(64, 8)}
    cache.put("flux/seed42/kv", kv0)
    assert cache.tier_of("flux/seed42/kv") == "hbm"
    assert_same(cache.get("flux/seed42/kv"), kv0)
    assert_same(cache.prefetch("flux/seed42/kv").wait(), kv0)
    assert "flux/seed42/kv" in cache and "other" not in cache and 3 not in cache
    cache.pin("flux/seed42/kv")
    cache.unpin("flux/seed42/kv")
    stats = cache.stats()
    assert stats.tiers["hbm"].entries == 1 and stats.tiers["hbm"].hits == 2
    cache.delete("flux/seed42/kv")
    assert "flux/seed42/kv" not in cache and len(cache) == 0


def test_placement_follows_size_thresholds(make_cache: CacheFactory, nvme_mode: str) -> None:
    cache = make_cache(
        policy(tiers={"hbm": {"capacity": 1 * MiB, "max_entry": 64 * KiB}, "host": {"capacity": 2 * MiB}})
    )
    assert cache.put("small", kv(1, 32 * KiB)) == "hbm"
    assert cache.put("medium", kv(2, 256 * KiB)) == "host"  # above hbm's max_entry
    assert cache.put("large", kv(3, 3 * MiB)) == "nvme"  # above host's capacity: straight to nvme
    assert cache.stats().pathways[f"put->nvme({nvme_mode})"].transfers == 1
    assert f"host->nvme({nvme_mode})" not in cache.stats().pathways  # never passed through host memory


def test_full_tiers_demote_lru_victims_one_tier_down(make_cache: CacheFactory, nvme_mode: str) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 200 * KiB}, "host": {"capacity": 200 * KiB}}))
    entries = {f"e{i}": kv(i, 64 * KiB) for i in range(8)}
    for key, entry in entries.items():
        cache.put(key, entry)
        budgets_hold(cache)
    assert [cache.tier_of(f"e{i}") for i in range(8)] == ["nvme"] * 2 + ["host"] * 3 + ["hbm"] * 3
    for key, entry in entries.items():
        assert_same(cache.get(key), entry)
        budgets_hold(cache)
    paths = cache.stats().pathways
    assert paths["hbm->host(pageable)"].transfers >= 5 and paths[f"host->nvme({nvme_mode})"].transfers >= 2


def test_recently_used_entries_stay_up(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 150 * KiB}}))
    cache.put("a", kv(1))
    cache.put("b", kv(2))
    cache.get("a")  # b is now the least recently used
    cache.put("c", kv(3))
    assert (cache.tier_of("a"), cache.tier_of("b"), cache.tier_of("c")) == ("hbm", "host", "hbm")


def test_evicting_from_nvme_deletes(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 200 * KiB}}))
    for i in range(4):
        cache.put(f"e{i}", kv(i, 64 * KiB))
    assert "e0" not in cache and all(f"e{i}" in cache for i in (1, 2, 3))
    assert cache.stats().evicted == 1
    assert len(list((cache.root / "entries").glob("*/zarr.json"))) == 3
    with pytest.raises(EntryNotFoundError, match="'e0' is not in the cache"):
        cache["e0"]
    assert cache.stats().misses == 1


def test_pinned_entries_are_never_evicted(make_cache: CacheFactory) -> None:
    cache = make_cache(
        policy(tiers={"hbm": {"capacity": 150 * KiB}, "host": {"capacity": 0}, "nvme": {"capacity": 150 * KiB}})
    )
    cache.put("pinned", kv(1))
    cache.pin("pinned")
    for i in range(6):
        cache.put(f"e{i}", kv(10 + i))
        assert cache.tier_of("pinned") == "hbm"
    assert cache.stats().tiers["hbm"].pinned == 1
    cache.unpin("pinned")
    with pytest.raises(EntryValueError, match="not pinned"):
        cache.unpin("pinned")
    cache.put("next", kv(99))
    cache.put("next2", kv(98))
    assert cache.tier_of("pinned") != "hbm"


def test_pins_nest_and_survive_replacement(make_cache: CacheFactory) -> None:
    cache = make_cache(policy())
    cache.put("k", kv(1))
    cache.pin("k")
    cache.pin("k")
    cache.put("k", kv(2))
    assert cache.info("k").pins == 2


def test_an_entry_larger_than_every_tier_is_refused_and_nothing_is_lost(make_cache: CacheFactory) -> None:
    cache = make_cache(policy())
    stored = {f"e{i}": kv(i) for i in range(5)}
    for key, entry in stored.items():
        cache.put(key, entry)
    before = {k: cache.info(k).tiers for k in stored}
    cache.put("huge", kv(0, 4 * KiB))
    with pytest.raises(CapacityError) as err:
        cache.put("huge", kv(5, 17 * MiB))
    message = str(err.value)
    assert (
        "'huge'" in message
        and "17 MiB (17825792 bytes)" in message
        and "nvme: capacity 16 MiB" in message
        and "Raise" in message
    )
    assert isinstance(err.value, MemoryError)
    assert {k: cache.info(k).tiers for k in stored} == before
    for key, entry in stored.items():
        assert_same(cache.get(key), entry)
    assert_same(cache.get("huge"), kv(0, 4 * KiB))  # the old version of the refused key is kept too


def test_tiers_full_of_pinned_entries_refuse_without_moving_anything(make_cache: CacheFactory) -> None:
    cache = make_cache(
        policy(tiers={"hbm": {"capacity": 150 * KiB}, "host": {"capacity": 70 * KiB}, "nvme": {"capacity": 70 * KiB}})
    )
    for key in ("a", "b", "c", "d"):
        cache.put(key, kv(ord(key)))
        cache.pin(key)
    where = {k: cache.tier_of(k) for k in "abcd"}
    with pytest.raises(CapacityError, match="pinned or in use"):
        cache.put("e", kv(5))
    assert {k: cache.tier_of(k) for k in "abcd"} == where


def test_replacing_a_key_frees_its_old_bytes(make_cache: CacheFactory, tier_name: str) -> None:
    # A memory tier reuses the old version's room; nvme's and the shared tiers' budgets are shared with other
    # processes, which may be reading the old version, so there the new one needs room beside it until it commits.
    cache = make_cache(only_tier(tier_name, capacity=(130 if tier_name in ("nvme", *SHARED_TIERS) else 100) * KiB))
    for i in range(5):
        cache.put("k", kv(i))
        assert cache.stats().tiers[tier_name].used == 64 * KiB
    assert_same(cache.get("k"), kv(4))


@pytest.mark.parametrize("promote", [True, False])
def test_promotion_on_hit_is_a_policy_setting(make_cache: CacheFactory, promote: bool) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 100 * KiB}}, placement={"promote_on_hit": promote}))
    cache.put("old", kv(1))
    cache.put("new", kv(2))
    assert cache.tier_of("old") == "host"
    assert_same(cache.get("old"), kv(1))
    assert cache.tier_of("old") == ("hbm" if promote else "host")
    budgets_hold(cache)


def test_promotion_from_nvme_keeps_the_disk_copy(make_cache: CacheFactory, tmp_path: Path, nvme_mode: str) -> None:
    pol = policy(tiers={"hbm": {"capacity": 100 * KiB}, "host": {"capacity": 0}})
    cache = make_cache(pol)
    cache.put("a", kv(1))
    cache.put("b", kv(2))  # a -> nvme
    assert cache.info("a").tiers == ("nvme",)
    cache.get("a")  # promoted to hbm, b demoted to nvme
    assert cache.info("a").tiers == ("hbm", "nvme") and cache.info("b").tiers == ("nvme",)
    cache.put("c", kv(3))  # a leaves hbm: its disk copy is already there, so nothing is written
    writes = cache.stats().pathways[f"hbm->nvme({nvme_mode})"].transfers
    assert cache.info("a").tiers == ("nvme",) and writes == 2  # a once, b once
    cache.close()
    with tiercache.TierCache(root=cache.root, policy=pol) as reopened:
        assert sorted(reopened.keys()) == ["a", "b", "c"]  # c, only in hbm, was written down at close


def test_next_tier_mode_fills_free_space_before_demoting(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 100 * KiB}}, placement={"on_full": "next_tier"}))
    cache.put("a", kv(1))
    cache.put("b", kv(2))
    assert (cache.tier_of("a"), cache.tier_of("b")) == ("hbm", "host")


def test_entries_being_read_are_not_evicted_and_deletes_wait_for_readers(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 100 * KiB}}))
    cache.put("a", kv(1))
    reading = cache.stream("a", lookahead=0)
    first = dict([next(reading)])  # a read in progress until the stream ends
    cache.put("b", kv(2))  # hbm is full, but a is being read: b goes to host
    assert cache.tier_of("a") == "hbm" and cache.tier_of("b") == "host"
    cache.delete("a")
    assert "a" not in cache and cache.stats().tiers["hbm"].used == 64 * KiB  # bytes held until the reader is done
    assert_same({**first, **dict(reading)}, kv(1))
    assert cache.stats().tiers["hbm"].used == 0


def test_prefetch_returns_at_once_and_a_miss_raises_immediately(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}}))
    entries = {f"e{i}": kv(i, 256 * KiB) for i in range(4)}
    for key, entry in entries.items():
        cache.put(key, entry)
    handles = [cache.prefetch(key) for key in entries]
    for handle, (key, entry) in zip(handles, entries.items(), strict=True):
        assert handle.key == key
        assert_same(handle.wait(timeout=30), entry)
        assert handle.done()
    with pytest.raises(KeyError):
        cache.prefetch("absent")


def test_concurrent_gets_and_puts_keep_values_and_budgets(make_cache: CacheFactory) -> None:
    cache = make_cache(
        policy(tiers={"hbm": {"capacity": 200 * KiB}, "host": {"capacity": 200 * KiB}, "nvme": {"capacity": 4 * MiB}})
    )
    for i in range(12):
        cache.put(f"e{i}", kv(i))
    errors: list[BaseException] = []

    def reader(offset: int) -> None:
        try:
            for n in range(30):
                i = (n + offset) % 12
                assert_same(cache.get(f"e{i}"), kv(i))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for i in range(12):
        cache.put(f"e{i}", kv(i))
    for t in threads:
        t.join()
    assert errors == []
    budgets_hold(cache)


def test_stats_show_tiers_pathways_and_io_mode(make_cache: CacheFactory, nvme_mode: str) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}}))
    cache.put("a", kv(1, 1 * MiB))
    cache.get("a")
    stats = cache.stats()
    assert stats.nvme_io == nvme_mode and stats.device == "cpu" and "test" in stats.policy  # O_DIRECT where it works
    read = stats.pathways[f"nvme({nvme_mode})->hbm"]
    assert read.transfers == 1 and read.bytes == 1 * MiB and read.seconds > 0 and read.gbps > 0
    assert stats.tiers["nvme"].used == 1 * MiB and stats.tiers["nvme"].hits == 1
    as_dict = stats.as_dict()
    assert as_dict["pathways"][f"nvme({nvme_mode})->hbm"]["gbps"] == read.gbps


def test_buffered_io_is_chosen_on_request_and_reported(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"io": "buffered"}}))
    cache.put("a", kv(1))
    assert_same(cache.get("a"), kv(1))
    stats = cache.stats()
    assert stats.nvme_io == "buffered" and "nvme(buffered)->hbm" in stats.pathways and stats.notes


def test_get_to_another_device_does_not_promote(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 1 * MiB}}))
    cache.put("a", kv(1))
    assert_same(cache.get("a", device="cpu"), kv(1))


def test_a_closed_cache_refuses_work(make_cache: CacheFactory) -> None:
    cache = make_cache(policy())
    cache.put("a", kv(1))
    cache.close()
    cache.close()  # idempotent
    for call in (
        lambda: cache.get("a"),
        lambda: cache.put("b", kv(2)),
        lambda: cache.prefetch("a"),
        lambda: cache.delete("a"),
    ):
        with pytest.raises(CacheClosedError):
            call()


def test_without_a_root_a_temporary_directory_is_used_and_removed() -> None:
    with tiercache.TierCache(policy=policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}})) as cache:
        cache.put("a", kv(1))
        root = cache.root
        assert root.exists()
    assert not root.exists()


def test_policy_by_preset_name_and_default(tmp_path: Path) -> None:
    with tiercache.TierCache(root=tmp_path / "a", policy="cpu") as cache:
        assert cache.policy.name == "cpu"
    with tiercache.TierCache(root=tmp_path / "b") as cache:
        assert cache.policy.name == "cpu"


def test_the_cache_is_a_mapping_where_it_is_one(make_cache: CacheFactory) -> None:
    cache = make_cache()
    cache.put("a", kv(1))
    cache.put("b", kv(2))
    assert_same(cache["a"], kv(1))
    assert sorted(cache) == ["a", "b"] and len(cache) == 2 and "a" in cache
    del cache["a"]
    assert "a" not in cache
    with pytest.raises(KeyError, match="'a' is not in the cache"):
        cache["a"]
    with pytest.raises(KeyError):
        del cache["a"]
    # get is dict.get: a miss gives the default, and the device is keyword-only (get(key, "cpu") is a default)
    assert cache.get("a") is None
    assert cache.get("a", "cpu") == "cpu"
    marker = object()
    assert cache.get("a", marker) is marker
    assert_same(cache.get("b", device="cpu"), kv(2))
    assert cache.stats().misses == 4  # every read that missed: cache["a"] and the three gets


@pytest.mark.parametrize("tier", ["hbm", "host", "nvme"])
def test_stream_groups_yields_each_layers_tensors_together_in_stored_order(make_cache: CacheFactory, tier: str) -> None:
    """A group is one step (a layer's K and V): by a function of the name, or by a count of consecutive tensors."""
    cache = make_cache(only_tier(tier))
    entry = {f"{i}.{n}": torch.full((1000,), 2 * i + (n == "v"), dtype=torch.float32) for i in range(4) for n in "kv"}
    cache.put("m", entry)
    layers = list(cache.stream_groups("m", lambda name: name.split(".")[0], lookahead=1))
    assert [label for label, _ in layers] == ["0", "1", "2", "3"]
    for label, tensors in layers:
        assert list(tensors) == [f"{label}.k", f"{label}.v"]
        assert_same(tensors, {name: entry[name] for name in tensors})
    counted = list(cache.stream_groups("m", 3, lookahead=0))
    assert [(label, list(tensors)) for label, tensors in counted] == [
        ("0", ["0.k", "0.v", "1.k"]),
        ("1", ["1.v", "2.k", "2.v"]),
        ("2", ["3.k", "3.v"]),
    ]
    assert [name for name, _ in cache.stream("m")] == list(entry)  # one tensor a step, as before
    with pytest.raises(EntryValueError, match="group must be"):
        cache.stream_groups("m", 0)
    with pytest.raises(EntryNotFoundError):
        cache.stream_groups("missing", 2)
