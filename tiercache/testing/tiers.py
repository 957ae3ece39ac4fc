"""The tier contract: store, load whole and in parts, delete, budgets, errors, concurrent loads, close, and the
pathways a tier logs. Subclass it with `tier_type` (and `budget()` where the tier reads more of its policy section);
set `holds_data = False` for a tier that only accounts sizes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ..entry import EntrySpec, Tensors, as_bytes
from ..errors import CapacityError
from ..io.buffers import HostBuffers
from ..pathway import Pathway
from ..policy.schema import TierBudget
from ..tiers.base import DataPath, Load, Tier
from ..transfer import Transfers

KiB = 1 << 10


def entry(seed: int, nbytes: int, names: tuple[str, ...] = ("k", "v")) -> Tensors:
    """An entry of float32 tensors of about `nbytes` in total, one of them 2-d."""
    gen = torch.Generator().manual_seed(seed)
    n = max(1, nbytes // len(names) // 4)
    out = {name: torch.randn(n, generator=gen) for name in names}
    out[names[0]] = out[names[0]][: n - n % 2].reshape(2, -1)
    return out


def same(got: Tensors, want: Tensors) -> bool:
    return list(got) == list(want) and all(
        got[n].dtype == t.dtype
        and got[n].shape == t.shape
        and torch.equal(as_bytes(got[n].cpu().contiguous()), as_bytes(t.contiguous()))
        for n, t in want.items()
    )


class TierContract:
    """What every tier keeps. The tier is opened on the CPU, with a root under pytest's tmp_path."""

    tier_type: type[Tier]
    name: str  # the tier's name in the cache: pathways and messages use it
    capacity = 256 * KiB
    holds_data = True  # False: the tier accounts sizes only and loads return no tensors

    def budget(self, capacity: int) -> TierBudget:
        return TierBudget(capacity=capacity)

    @pytest.fixture
    def transfers(self) -> list[Pathway]:
        return []

    @pytest.fixture
    def tier(self, tmp_path: Path, transfers: list[Pathway]) -> Iterator[Tier]:
        streams = Transfers(torch.device("cpu"), 64 * KiB)
        path = DataPath(
            torch.device("cpu"),
            streams,
            HostBuffers(),
            tmp_path / "root",
            lambda pathway, nbytes, seconds: transfers.append(pathway),
        )
        tier = self.tier_type.open(self.name, self.budget(self.capacity), path)
        yield tier
        tier.close()
        streams.close()

    def put(self, tier: Tier, uid: int, key: str, data: Tensors) -> EntrySpec:
        spec = EntrySpec.of(key, data)
        tier.put(uid, spec, data, source="put", copy=True, after=None)
        return spec

    def check(self, load: Load, want: Tensors) -> None:
        got = load.wait()
        assert load.done() and load.landed()
        if self.holds_data:
            assert same(got, want)

    # ---- store and load ---------------------------------------------------------------------------------------
    def test_put_load_round_trips_and_accounts_exactly(self, tier: Tier) -> None:
        data = entry(1, 100 * KiB)
        spec = self.put(tier, 1, "a", data)
        assert 1 in tier and len(tier) == 1 and list(tier) == [1] and tier.spec(1) == spec
        assert tier.used == spec.nbytes and tier.free == self.capacity - spec.nbytes
        self.check(tier.load(1, torch.device("cpu")), data)
        self.check(tier.load(1, None), data)  # as the tier holds them, for moving to another tier

    def test_a_load_of_some_tensors_gives_those_in_the_order_asked(self, tier: Tier) -> None:
        data = entry(2, 64 * KiB, names=("a", "b", "c"))
        self.put(tier, 1, "x", data)
        self.check(tier.load(1, torch.device("cpu"), ["c", "a"]), {"c": data["c"], "a": data["a"]})
        self.check(tier.load(1, torch.device("cpu"), ["b"]), {"b": data["b"]})
        with pytest.raises(KeyError, match="no tensor named 'nope'"):
            tier.load(1, torch.device("cpu"), ["nope"])

    def test_a_load_is_one_pending_value(self, tier: Tier) -> None:
        data = entry(3, 32 * KiB)
        self.put(tier, 1, "a", data)
        load = tier.load(1, torch.device("cpu"))
        tensors, event = load.result()
        event.synchronize()
        assert load.event is event and load.done() and load.wait() is tensors

    def test_an_entry_it_does_not_hold_is_a_key_error(self, tier: Tier) -> None:
        with pytest.raises(KeyError):
            tier.load(7, torch.device("cpu"))
        with pytest.raises(KeyError):
            tier.delete(7)

    # ---- budgets and errors -----------------------------------------------------------------------------------
    def test_a_put_beyond_the_budget_is_refused_and_stores_nothing(self, tier: Tier) -> None:
        first = entry(1, 200 * KiB)
        self.put(tier, 1, "a", first)
        used = tier.used
        with pytest.raises(CapacityError, match=self.name):
            self.put(tier, 2, "b", entry(2, 100 * KiB))
        assert tier.used == used and 2 not in tier
        self.check(tier.load(1, torch.device("cpu")), first)

    def test_an_entry_id_is_stored_once(self, tier: Tier) -> None:
        data = entry(1, 4 * KiB)
        self.put(tier, 1, "a", data)
        with pytest.raises(ValueError, match="already holds"):
            self.put(tier, 1, "a", data)
        assert len(tier) == 1

    def test_two_versions_of_one_key_live_side_by_side(self, tier: Tier) -> None:
        old, new = entry(1, 8 * KiB), entry(2, 8 * KiB)
        self.put(tier, 1, "same", old)
        self.put(tier, 2, "same", new)
        tier.delete(1)
        self.check(tier.load(2, torch.device("cpu")), new)

    def test_delete_releases_the_bytes(self, tier: Tier) -> None:
        for uid in range(3):
            self.put(tier, uid, f"k{uid}", entry(uid, 80 * KiB))
        for uid in range(3):
            tier.delete(uid)
        assert tier.used == 0 and len(tier) == 0
        self.put(tier, 9, "again", entry(9, 200 * KiB))  # the room is really free again

    # ---- concurrency, close, pathways -------------------------------------------------------------------------
    def test_concurrent_loads_each_get_their_own_entry(self, tier: Tier) -> None:
        datas = {uid: entry(uid, 16 * KiB) for uid in range(6)}
        for uid, data in datas.items():
            self.put(tier, uid, f"k{uid}", data)
        errors: list[BaseException] = []

        def reader(uid: int) -> None:
            try:
                for _ in range(5):
                    self.check(tier.load(uid, torch.device("cpu")), datas[uid])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(uid,)) for uid in datas for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors

    def test_close_forgets_what_it_held_in_memory_and_can_be_repeated(self, tier: Tier) -> None:
        self.put(tier, 1, "a", entry(1, 8 * KiB))
        tier.close()
        tier.close()
        if not tier.persistent:
            assert tier.used == 0 and len(tier) == 0

    def test_every_transfer_is_logged_as_a_pathway(self, tier: Tier, transfers: list[Pathway]) -> None:
        self.put(tier, 1, "a", entry(1, 8 * KiB))
        tier.load(1, torch.device("cpu")).wait()
        for pathway in transfers:
            assert Pathway.parse(str(pathway)) == pathway and tier.name in (pathway.source, pathway.dest)
