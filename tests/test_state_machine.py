"""A hypothesis state machine drives the cache against a plain dict: puts, gets, prefetches, deletes, pins and
reopens, checking values, budgets and pins after every step."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import KiB, assert_same, policy
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import tiercache
from tiercache import CapacityError, EntryNotFoundError
from tiercache.policy.schema import TIER_NAMES

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.bool, torch.float8_e4m3fn])


def make_entry(seed: int, kib: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = kib * KiB // dtype.itemsize
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    first = raw.view(dtype) if dtype != torch.bool else raw.bool()
    return {"x": first[: n // 2], "y": first[n // 2 :].reshape(1, -1), "s": torch.tensor(seed)}


class CacheAgainstDict(RuleBasedStateMachine):
    # "roomy": nvme holds everything, so the cache must hold exactly what the model holds.
    # "tight": eviction out of the cache happens; only unpinned entries may vanish.
    nvme_capacity = 1024 * KiB
    eviction_rule = "lru"
    write = "back"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tc-sm-"))
        self.policy = policy(
            tiers={
                "hbm": {"capacity": 64 * KiB},
                "host": {"capacity": 96 * KiB},
                "nvme": {"capacity": self.nvme_capacity, "task_size": "16KiB"},
            },
            eviction={"rule": self.eviction_rule},
            placement={"write": self.write},
        )
        self.cache = tiercache.TierCache(root=self.dir, policy=self.policy)
        self.model: dict[str, dict[str, torch.Tensor]] = {}
        self.pins: dict[str, int] = {}
        self.pinned_rank: dict[str, int] = {}  # a pinned entry may move up (promotion), never down

    def teardown(self) -> None:
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def roomy(self) -> bool:
        return self.nvme_capacity >= 5 * 48 * KiB

    def sync_evictions(self) -> None:
        """Drop from the model what the cache evicted out of its last tier; only allowed where nvme is tight."""
        for key in list(self.model):
            if key not in self.cache:
                assert not self.roomy, f"{key} vanished though nvme had room"
                assert self.pins.get(key, 0) == 0, f"pinned {key} was evicted"
                del self.model[key]

    @rule(key=KEYS, seed=st.integers(0, 10_000), kib=st.integers(1, 48), dtype=DTYPES)
    def put(self, key: str, seed: int, kib: int, dtype: torch.dtype) -> None:
        entry = make_entry(seed, kib, dtype)
        try:
            self.cache.put(key, entry)
        except CapacityError:
            assert not self.roomy
            self.sync_evictions()
            if key in self.model:
                assert_same(self.cache.get(key), self.model[key])  # the refused put lost nothing
                self.sync_evictions()  # that get may promote the entry, evicting another out of a tight cache
            return
        self.model[key] = entry
        self.pinned_rank.pop(key, None)  # a new version is placed afresh
        self.sync_evictions()

    @rule(key=KEYS, prefetch=st.booleans())
    def get(self, key: str, prefetch: bool) -> None:
        if key in self.model:
            got = self.cache.prefetch(key).wait() if prefetch else self.cache.get(key)
            assert_same(got, self.model[key])
        else:
            with pytest.raises(EntryNotFoundError):
                self.cache[key]
        self.sync_evictions()

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        if key in self.model:
            self.cache.delete(key)
            del self.model[key]
            self.pins.pop(key, None)
        else:
            with pytest.raises(KeyError):
                self.cache.delete(key)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        if sum(1 for k, n in self.pins.items() if n and k in self.model) < 3:  # leave room to move
            self.cache.pin(key)
            self.pins[key] = self.pins.get(key, 0) + 1

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, n in self.pins.items() if n)))
        self.cache.unpin(key)
        self.pins[key] -= 1

    @rule()
    def reopen(self) -> None:
        durable = {k for k in self.model if "nvme" in self.cache.info(k).tiers}
        self.cache.close()  # writes what is in memory down, as far as the nvme budget allows
        self.cache = tiercache.TierCache(root=self.dir, policy=self.policy)
        found = set(self.cache.keys())
        assert durable <= found <= set(self.model), (durable, found)
        self.model = {k: v for k, v in self.model.items() if k in found}
        self.pins = {}
        self.pinned_rank = {}

    @invariant()
    def budgets_and_contents_agree(self) -> None:
        stats = self.cache.stats()
        in_tier = dict.fromkeys(TIER_NAMES, 0)
        for key in self.cache.keys():
            info = self.cache.info(key)
            for tier in info.tiers:
                in_tier[tier] += info.nbytes
            assert info.pins == self.pins.get(key, 0)
            assert len([t for t in info.tiers if t != "nvme"]) <= 1  # one memory tier at most
            if info.pins:
                rank = TIER_NAMES.index(info.tiers[0])
                assert rank <= self.pinned_rank.get(key, rank), f"pinned {key} was demoted to {info.tiers[0]}"
                self.pinned_rank[key] = rank
            else:
                self.pinned_rank.pop(key, None)
        for name, tier in stats.tiers.items():
            assert tier.used == in_tier[name] <= tier.capacity, name
        assert set(self.cache.keys()) == set(self.model)


class TightCacheAgainstDict(CacheAgainstDict):
    nvme_capacity = 100 * KiB


class LfuTightCache(TightCacheAgainstDict):
    eviction_rule = "lfu"


class FifoRoomyCache(CacheAgainstDict):
    eviction_rule = "fifo"


class GdsfWriteThroughTightCache(TightCacheAgainstDict):
    eviction_rule = "gdsf"
    write = "through"


SETTINGS = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FEWER = settings(SETTINGS, max_examples=25)
TestRoomyCache = CacheAgainstDict.TestCase
TestRoomyCache.settings = SETTINGS
TestTightCache = TightCacheAgainstDict.TestCase
TestTightCache.settings = SETTINGS
TestLfuTightCache = LfuTightCache.TestCase
TestLfuTightCache.settings = FEWER
TestFifoRoomyCache = FifoRoomyCache.TestCase
TestFifoRoomyCache.settings = FEWER
TestGdsfWriteThroughTightCache = GdsfWriteThroughTightCache.TestCase
TestGdsfWriteThroughTightCache.settings = FEWER
