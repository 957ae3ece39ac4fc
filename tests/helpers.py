"""Test helpers: small policies, entries and a bit-exact comparison."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.entry import as_bytes
from tiercache.policy.schema import TIER_NAMES
from tiercache.tiers.nvme.format import key_hash
from tiercache.transfer import Transfers

KiB = 1 << 10
MiB = 1 << 20


# every local tier off, for a test of a shared tier alone (hbm, host and nvme hold nothing)
ONLY = {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 0}}


def policy(**sections: Any) -> tiercache.Policy:
    """A small policy (hbm 1 MiB, host 2 MiB, nvme 16 MiB) with sections merged over it. Removed entries go at
    once (no grace period for zarr readers): out of the index and entries/ when the call returns, their files out of
    trash/ on the layout's remover thread (close waits for it)."""
    base: dict[str, Any] = {
        "name": "test",
        "tiers": {
            "hbm": {"capacity": 1 * MiB},
            "host": {"capacity": 2 * MiB},
            "nvme": {"capacity": 16 * MiB, "task_size": "64KiB", "removal_grace_s": 0},
        },
    }
    for name, section in sections.items():
        if name == "tiers":
            for tier, values in section.items():
                base["tiers"].setdefault(tier, {}).update(values)
        else:
            base[name] = dict(section) if isinstance(section, Mapping) else section
    return tiercache.Policy.from_dict(base)


# [tiers.object] / [tiers.remote] keys of the test servers, while a test parametrised over every tier runs its
# "object" or "remote" case (the `tier_name` fixture sets them): only_tier("object") needs a bucket to point at.
SHARED_SETTINGS: dict[str, dict[str, Any]] = {}


def only_tier(tier: str, capacity: int = 8 * MiB) -> tiercache.Policy:
    """A policy in which every entry lands in `tier`: the faster tiers have no capacity."""
    tiers: dict[str, dict[str, Any]] = {t: {"capacity": 0} for t in TIER_NAMES[: TIER_NAMES.index(tier)]}
    tiers[tier] = {"capacity": capacity, **SHARED_SETTINGS.get(tier, {})}
    return policy(tiers=tiers)


def assert_same(got: Mapping[str, torch.Tensor], want: Mapping[str, Any]) -> None:
    """Bit-exact equality of two entries: names in order, dtypes, shapes and bytes."""
    assert list(got) == list(want)
    for name, expected in want.items():
        expected = torch.from_numpy(expected) if not isinstance(expected, torch.Tensor) else expected
        actual = got[name]
        assert actual.dtype == expected.dtype, name
        assert actual.shape == expected.shape, name
        assert torch.equal(as_bytes(actual.cpu().contiguous()), as_bytes(expected.cpu().contiguous())), name


def kv(seed: int, nbytes: int = 64 * KiB, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """An entry of two tensors ("k", "v") of about `nbytes` in total."""
    gen = torch.Generator().manual_seed(seed)
    n = max(1, nbytes // 2 // dtype.itemsize)
    return {name: torch.randn(n, generator=gen).to(dtype) for name in ("k", "v")}


def disk_bytes(root: Path) -> int:
    """Payload bytes of every chunk file under root/entries/ (published or withdrawn): what the nvme budget counts."""
    chunks = [p for p in (root / "entries").glob("*/t*/c*") if p.is_file()]
    chunks += [p for p in (root / "entries").glob("*/t*/c/**/*") if p.is_file()]
    return sum(p.stat().st_size - 4 for p in chunks)


def transfers(cache: tiercache.TierCache) -> Transfers:
    """The cache's copy streams, as its tiers share them (DataPath.transfers): where tests delay or fail copies."""
    shared = cache.tiers["host"].path.transfers
    assert shared is not None
    return shared


class CountingCache(tiercache.TierCache):
    """A TierCache that records the keys it is asked to put: what an integration copied into it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.puts: list[str] = []

    def put(self, key: str, *args: Any, **kwargs: Any) -> str:
        self.puts.append(key)
        return super().put(key, *args, **kwargs)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until `condition()` holds; fail the test after `timeout` seconds (for what another cache or a
    background thread does in its own time: a listing, a sweep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class ManifestGate:
    """Holds every manifest read of a shared store (`store_type`, patched for the test) whose key is not one of
    `keys` (with `these`: whose key is one of them) until `release()` (or 10 s), counting those that completed: a
    lookup that waited for every other entry's manifest shows up as a count above 0. `holding` is set once a read
    is held."""

    def __init__(self, monkeypatch: Any, store_type: type, keys: Iterable[str], *, these: bool = False) -> None:
        self.open = threading.Event()
        self.holding = threading.Event()
        self.completed = 0
        named = {key_hash(k) for k in keys}
        read = store_type.get

        def get(store: Any, path: str) -> Any:
            parts = path.split("/")
            if len(parts) == 3 and parts[2] == "zarr.json" and (parts[1].split("-")[0] in named) == these:
                self.holding.set()
                self.open.wait(10.0)
                self.completed += 1
            return read(store, path)

        monkeypatch.setattr(store_type, "get", get)

    def release(self) -> None:
        self.open.set()


def check_a_fresh_cache_looks_up_one_key(
    make_cache: Callable[..., tiercache.TierCache],
    pol: tiercache.Policy,
    store_type: type,
    tier: str,
    tmp_path: Path,
    monkeypatch: Any,
) -> None:
    """A shared tier's contract for a store of more entries than one round of reads: a fresh cache's open, gets,
    `in` and close read no manifest but those of the keys asked for; keys(), len() and stats() wait for the rest."""
    writer = make_cache(pol, root=tmp_path / "a")
    for i in range(12):
        writer.put(f"k{i}", kv(i, 4 * KiB))
    gate = ManifestGate(monkeypatch, store_type, keys=["k3", "k5"])
    reader = make_cache(pol, root=tmp_path / "b", read_only=True)
    assert_same(reader["k3"], kv(3, 4 * KiB))
    assert "k5" in reader and "k99" not in reader
    assert gate.completed == 0  # the open and the lookups read no other entry's manifest
    gate.release()
    assert sorted(reader.keys()) == sorted(f"k{i}" for i in range(12))  # keys() waits for the whole listing
    assert len(reader) == 12 and reader.stats().tiers[tier].used == 12 * writer.info("k0").nbytes
    gated = ManifestGate(monkeypatch, store_type, keys=["k3"])
    worker = make_cache(pol, root=tmp_path / "c")  # writable: its close flushes what it holds in memory only
    assert_same(worker["k3"], kv(3, 4 * KiB))
    worker.close()
    assert gated.completed == 0  # the close waited for no listing either
    gated.release()


def check_a_lookup_the_store_holds_up_holds_up_no_other(
    make_cache: Callable[..., tiercache.TierCache], pol: tiercache.Policy, store_type: type, tmp_path: Path,
    monkeypatch: Any,
) -> None:  # fmt: skip
    """A shared tier's contract: while a fresh cache's lookup of one key and its whole first listing wait on the
    store (one manifest's read held), the cache's other lookups go on; the held calls then complete."""
    writer = make_cache(pol, root=tmp_path / "a")
    for i in range(12):
        writer.put(f"k{i}", kv(i, 4 * KiB))
    gate = ManifestGate(monkeypatch, store_type, keys=["k7"], these=True)
    reader = make_cache(pol, root=tmp_path / "b", read_only=True)
    got: dict[str, Any] = {}
    held = [
        threading.Thread(target=lambda: got.update(k7=reader.get("k7"))),
        threading.Thread(target=lambda: got.update(keys=reader.keys())),  # waits for the whole listing
    ]
    for thread in held:
        thread.start()
    assert gate.holding.wait(10.0)
    assert_same(reader["k3"], kv(3, 4 * KiB))
    assert "k99" not in reader and "k5" in reader
    assert all(t.is_alive() for t in held) and not gate.open.is_set()  # all of it ran while the two were held
    gate.release()
    for thread in held:
        thread.join(10.0)
    assert_same(got["k7"], kv(7, 4 * KiB))
    assert sorted(got["keys"]) == sorted(f"k{i}" for i in range(12))


def manifests(cache: tiercache.TierCache, tier: str) -> set[str]:
    """The entry names whose manifest is in a shared tier's store now."""
    store = cache.tiers[tier].bucket  # type: ignore[attr-defined]
    paths = [o.path for o in store.objects("entries/")]
    return {p.split("/")[1] for p in paths if p.count("/") == 2 and p.endswith("/zarr.json")}


def check_a_listing_begun_before_a_replacement_counts_only_the_newer_version(
    make_cache: Callable[..., tiercache.TierCache],
    pol: Callable[..., tiercache.Policy],
    store_type: type,
    tier: str,
    tmp_path: Path,
    monkeypatch: Any,
) -> None:
    """A shared tier's contract for its quota: a listing that began before this cache replaced one key and
    deleted another counts neither the replaced version nor the deleted entry once taken in (only the versions
    this cache serves and what others added)."""
    writer = make_cache(pol(list_every_s=60.0), root=tmp_path / "w")  # lists at its open only, when empty
    writer.put("k", kv(1, 8 * KiB))
    writer.put("d", kv(2, 8 * KiB))
    cache = make_cache(pol(list_every_s=0.0), root=tmp_path / "c")  # listings back to back
    assert_same(cache["k"], kv(1, 8 * KiB))
    held = ManifestGate(monkeypatch, store_type, keys=["other"], these=True)
    writer.put("other", kv(3, 8 * KiB))
    assert held.holding.wait(10.0), (
        "no listing read the manifest of 'other'"
    )  # a listing of this cache's that names "other" (and "k", "d") waits here
    cache.put("k", kv(4, 8 * KiB))
    del cache["d"]
    nbytes = sum(t.nbytes for t in kv(0, 8 * KiB).values())
    later = ManifestGate(monkeypatch, store_type, keys=["k"], these=True)  # the next listing, which finds the new "k"
    held.release()
    try:
        wait_for(lambda: "other" in cache)  # the held listing, taken in
        used = cache.stats().tiers[tier].used
        assert used == 2 * nbytes, f"{used} bytes counted, not {2 * nbytes} (the new 'k' and 'other')"
    finally:
        later.release()
    assert_same(cache["k"], kv(4, 8 * KiB))


def check_replaced_versions_stay_for_readers(
    make_cache: Callable[..., tiercache.TierCache], pol: Callable[..., tiercache.Policy], tier: str, tmp_path: Path
) -> None:
    """A shared tier's contract for versions of one key: a version a newer one replaced stays in the store for
    readers elsewhere, whichever cache replaced it (its writer, or one that found both at once), until the sweep
    finds the newer one keep_replaced_s old; a delete of the key removes every version (one still being read here
    too), so none comes back."""
    slow = pol(keep_replaced_s=60.0, list_every_s=60.0)  # no listing, no sweep within the test
    a = make_cache(slow, root=tmp_path / "a")
    b = make_cache(slow, root=tmp_path / "b")  # opened before a's put, never lists: it does not know v1
    a.put("x", kv(1, 4 * KiB))
    (v1,) = manifests(a, tier)
    b.put("x", kv(2, 4 * KiB))
    assert len(manifests(a, tier)) == 2
    fresh = make_cache(slow, root=tmp_path / "c")  # finds both versions at once
    assert_same(fresh["x"], kv(2, 4 * KiB))
    fresh.close()
    assert v1 in manifests(a, tier)  # left for a, which may be reading it
    a.put("x", kv(3, 4 * KiB))  # its writer replaces v1 (b's v2, which it never saw, stays too)
    assert v1 in manifests(a, tier) and len(manifests(a, tier)) == 3
    d = make_cache(slow, root=tmp_path / "d")
    assert_same(d["x"], kv(3, 4 * KiB))
    del d["x"]  # every version goes, or an older one would be found again
    assert manifests(a, tier) == set()
    assert "x" not in make_cache(slow, root=tmp_path / "e")
    h = make_cache(slow, root=tmp_path / "h")
    h.put("z", kv(6, 4 * KiB))
    reading = h.stream("z")
    next(reading)  # a read of v1 in flight: it is let go of only when the read ends
    h.put("z", kv(7, 4 * KiB))
    del h["z"]
    reading.close()
    assert "z" not in make_cache(slow, root=tmp_path / "i") and manifests(h, tier) == set()
    sweeping = make_cache(pol(keep_replaced_s=0.3, list_every_s=0.1), root=tmp_path / "f")
    sweeping.put("y", kv(4, 4 * KiB))
    sweeping.put("y", kv(5, 4 * KiB))
    assert len(manifests(sweeping, tier)) == 2
    wait_for(lambda: len(manifests(sweeping, tier)) == 1)  # the sweep, once the newer one is keep_replaced_s old
    assert_same(make_cache(slow, root=tmp_path / "g")["y"], kv(5, 4 * KiB))
