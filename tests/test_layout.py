"""The nvme tier's format: zarr v3 groups that zarr-python reads by itself, atomic, checksummed, re-indexed."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import CacheFactory
from helpers import assert_same, kv, only_tier, policy
from test_entries import DTYPES, sample

import tiercache
from tiercache import CorruptEntryError
from tiercache.entry import as_bytes

NVME = only_tier("nvme")


def entry_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "entries").iterdir() if p.is_dir())


def test_zarr_python_reads_every_entry_back_to_the_same_values(make_cache: CacheFactory) -> None:
    cache = make_cache(NVME)
    entry = {f"t.{str(d).removeprefix('torch.')}": sample(d, (4, 6), seed=i) for i, d in enumerate(DTYPES)}
    entry["zeros"] = torch.zeros(64, 64)  # equal to the fill value: must still be written
    entry["scalar"] = torch.tensor(2.5)
    entry["empty"] = torch.empty(0, 8, dtype=torch.bfloat16)
    cache.put("flux/seed42/kv", entry)
    cache.close()

    root = zarr.open_group(cache.root / "entries", mode="r")
    ((name, group),) = list(root.groups())
    manifest = group.attrs["tiercache"]
    assert manifest["key"] == "flux/seed42/kv" and name != "flux/seed42/kv"
    for spec in manifest["tensors"]:
        array = group[spec["array"]]
        assert array.attrs["tiercache"]["name"] == spec["name"] and array.attrs["tiercache"]["dtype"] == spec["dtype"]
        want = entry[spec["name"]]
        got = np.asarray(array[...])
        assert got.shape == tuple(want.shape)
        assert got.tobytes() == as_bytes(want).numpy().tobytes(), spec["name"]
    assert group["t0"].metadata.codecs[-1].to_dict()["name"] == "crc32c"  # zarr verifies our checksums too
    chunk = cache.root / "entries" / name / manifest["tensors"][-3]["array"] / "c" / "0" / "0"
    assert chunk.stat().st_size == 64 * 64 * 4 + 4  # the all-zero tensor's chunk is on disk


def test_bfloat16_and_float8_are_unsigned_views_with_the_real_dtype_recorded(make_cache: CacheFactory) -> None:
    cache = make_cache(NVME)
    cache.put("k", {"bf": torch.ones(3, dtype=torch.bfloat16), "f8": torch.ones(3).to(torch.float8_e5m2)})
    cache.close()
    group = zarr.open_group(entry_dirs(cache.root)[0], mode="r")
    assert str(group["t0"].dtype) == "uint16" and group["t0"].attrs["tiercache"]["dtype"] == "bfloat16"
    assert str(group["t1"].dtype) == "uint8" and group["t1"].attrs["tiercache"]["dtype"] == "float8_e5m2"
    np.testing.assert_array_equal(group["t0"][...], torch.ones(3, dtype=torch.bfloat16).view(torch.uint16).numpy())


def test_keys_never_become_file_names(make_cache: CacheFactory) -> None:
    cache = make_cache(NVME)
    cache.put("../../escape", kv(1))
    cache.put("/etc/passwd", kv(2))
    names = [p.name for p in entry_dirs(cache.root)]
    assert all(len(n) == 49 and all(c in "0123456789abcdef-" for c in n) for n in names)
    assert not (cache.root.parent / "escape").exists()


def flip_a_byte(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_flipped_bit_raises_naming_key_and_file_and_returns_no_data(make_cache: CacheFactory, tmp_path: Path) -> None:
    cache = make_cache(NVME)
    cache.put("victim", {"a": torch.arange(1000.0), "b": torch.arange(10.0)})
    chunk = entry_dirs(cache.root)[0] / "t0" / "c" / "0"
    flip_a_byte(chunk)
    with pytest.raises(CorruptEntryError) as err:
        cache.get("victim")
    assert "'victim'" in str(err.value) and str(chunk) in str(err.value) and "'a'" in str(err.value)
    assert isinstance(err.value, OSError)
    assert cache.tier_of("victim") == "nvme"  # nothing half-promoted
    with pytest.raises(ValueError, match="checksum"):  # zarr-python refuses it too
        zarr.open_group(chunk.parent.parent.parent, mode="r")["t0"][...]


@pytest.mark.parametrize("elements", [1000, 100_000])  # a tensor copied out of its buffer, and one kept as a view
def test_a_damaged_stored_checksum_alone_is_caught(make_cache: CacheFactory, elements: int) -> None:
    """Data and manifest intact, only the CRC the chunk file stores after the data flipped: the file is damaged."""
    cache = make_cache(NVME)
    cache.put("k", {"empty": torch.zeros(0), "a": torch.arange(float(elements))})
    chunk = entry_dirs(cache.root)[0] / "t1" / "c" / "0"
    flip_a_byte(chunk, offset=elements * 4 + 3)  # the last byte of the stored CRC32C
    with pytest.raises(CorruptEntryError, match="file says"):
        cache.get("k")


@pytest.mark.parametrize("damage", ["truncated", "extended", "missing"])
def test_a_resized_or_missing_chunk_is_a_corrupt_entry_named_by_its_key(
    make_cache: CacheFactory, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """While the cache is open, a read refuses it (CorruptEntryError naming the key); at the next open the entry is
    skipped with a warning and left on disk."""
    cache = make_cache(NVME)
    cache.put("k", {"a": torch.arange(5000.0)})
    chunk = entry_dirs(cache.root)[0] / "t0" / "c" / "0"
    if damage == "missing":
        chunk.unlink()
    else:
        os.truncate(chunk, 4096 if damage == "truncated" else 5000 * 4 + 4 + 1)
    with pytest.raises(CorruptEntryError, match="'k'") as raised:
        cache.get("k")
    assert "damaged" in str(raised.value) and "Delete the entry" in str(raised.value)
    cache.close()
    with caplog.at_level(logging.WARNING), tiercache.TierCache(root=cache.root, policy=NVME) as reopened:
        assert "k" not in reopened
    assert "skipping entry" in caplog.text and entry_dirs(cache.root)


def test_a_chunk_swapped_for_another_valid_chunk_is_caught_by_the_manifest(make_cache: CacheFactory) -> None:
    cache = make_cache(NVME)
    cache.put("k", {"a": torch.zeros(256), "b": torch.ones(256)})
    d = entry_dirs(cache.root)[0]
    shutil.copyfile(d / "t1" / "c" / "0", d / "t0" / "c" / "0")  # a self-consistent chunk of the wrong tensor
    with pytest.raises(CorruptEntryError, match="manifest"):
        cache.get("k")


def test_verification_can_be_switched_off(make_cache: CacheFactory) -> None:
    cache = make_cache(
        policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"verify_checksums": False}})
    )
    cache.put("k", {"a": torch.zeros(1000)})
    flip_a_byte(entry_dirs(cache.root)[0] / "t0" / "c" / "0")
    assert cache.get("k")["a"].count_nonzero() == 1  # the policy chose speed over the check


def test_interrupted_writes_and_removals_leave_nothing_behind(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        cache.put("kept", kv(1))
    (root / "tmp" / "half-written-entry").mkdir(parents=True)
    (root / "tmp" / "half-written-entry" / "zarr.json").write_text("{")
    (root / "trash" / "half-removed").mkdir(parents=True)
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        assert cache.keys() == ["kept"]
        assert_same(cache.get("kept"), kv(1))
    assert list((root / "tmp").iterdir()) == [] and list((root / "trash").iterdir()) == []


def test_of_two_versions_on_disk_the_newer_wins(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        cache.put("k", kv(1))
    old_dir = entry_dirs(root)[0]
    saved = tmp_path / "saved"
    os.rename(old_dir, saved)
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        cache.put("k", kv(2))
    os.rename(saved, old_dir)  # as if a crash had stopped the removal of the old version
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        assert_same(cache.get("k"), kv(2))
    assert len(entry_dirs(root)) == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: "not json",
        lambda meta: json.dumps(meta | {"attributes": {"tiercache": meta["attributes"]["tiercache"] | {"version": 3}}}),
        lambda meta: json.dumps(
            meta
            | {
                "attributes": {
                    "tiercache": meta["attributes"]["tiercache"]
                    | {"tensors": [t | {"crc32c": None} for t in meta["attributes"]["tiercache"]["tensors"]]}
                }
            }
        ),
    ],
    ids=["not-json", "newer-format", "null-checksum"],
)
def test_an_unreadable_entry_is_skipped_with_a_warning_and_left_on_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        cache.put("good", kv(1))
        cache.put("bad", kv(2))
    bad = next(
        d
        for d in entry_dirs(root)
        if json.loads((d / "zarr.json").read_text())["attributes"]["tiercache"]["key"] == "bad"
    )
    (bad / "zarr.json").write_text(damage(json.loads((bad / "zarr.json").read_text())))
    with caplog.at_level(logging.WARNING), tiercache.TierCache(root=root, policy=NVME) as cache:
        assert cache.keys() == ["good"]
        assert_same(cache.get("good"), kv(1))
    assert "skipping entry" in caplog.text and str(bad) in caplog.text
    assert bad.exists()  # never delete what we cannot read


def test_a_smaller_budget_sees_every_entry_and_its_next_put_evicts_the_oldest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The root's entries belong to every cache on it: a cache with a smaller budget lists them all, says they
    exceed its budget, and makes room by its eviction rule when it puts (the least recently used go first)."""
    root = tmp_path / "root"
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        for i in range(4):
            cache.put(f"e{i}", kv(i))
    with (
        caplog.at_level(logging.WARNING),
        tiercache.TierCache(root=root, policy=only_tier("nvme", capacity=200 * 1024)) as cache,
    ):
        assert sorted(cache.keys()) == ["e0", "e1", "e2", "e3"]
        assert "exceed this policy's nvme budget" in caplog.text
        cache.put("new", kv(9))
        assert sorted(cache.keys()) == ["e2", "e3", "new"]
        assert cache.stats().tiers["nvme"].used == 192 * 1024


def test_small_tensors_read_back_do_not_keep_their_padded_io_buffers(make_cache: CacheFactory) -> None:
    cache = make_cache(NVME)
    entry = {f"s{i}": torch.tensor(float(i)) for i in range(50)} | {
        "big": torch.zeros(2 * 1024 * 1024, dtype=torch.uint8)
    }
    cache.put("k", entry)
    got = cache.get("k")
    assert_same(got, entry)
    assert all(got[f"s{i}"].untyped_storage().nbytes() == 4 for i in range(50))
    assert (
        got["big"].untyped_storage().nbytes() < 2 * 1024 * 1024 + 2 * 4096 + 2 * 1024 * 1024
    )  # + alignment, virtual only
