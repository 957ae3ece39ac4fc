"""The object tier against a real S3 server (SeaweedFS, started by the suite): the tier contract, then what only a
bucket shared by several caches brings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CacheFactory
from helpers import (
    ONLY,
    KiB,
    MiB,
    assert_same,
    check_a_fresh_cache_looks_up_one_key,
    check_a_listing_begun_before_a_replacement_counts_only_the_newer_version,
    check_a_lookup_the_store_holds_up_holds_up_no_other,
    check_replaced_versions_stay_for_readers,
    kv,
    manifests,
    policy,
    wait_for,
)

import tiercache
from tiercache.entry import TensorSpec
from tiercache.policy.schema import ObjectBudget, TierBudget
from tiercache.testing.servers import S3Server, StallingProxy
from tiercache.testing.tiers import TierContract
from tiercache.tiers.object import ObjectTier
from tiercache.tiers.object.s3 import Bucket
from tiercache.tiers.object.store import Exists
from tiercache.tiers.object.tier import check_batches
from tiercache.tools import cli


class TestObjectTierContract(TierContract):
    tier_type = ObjectTier
    name = "object"

    @pytest.fixture(autouse=True)
    def _settings(self, object_tier_settings: dict[str, Any]) -> None:
        self.settings = object_tier_settings

    def budget(self, capacity: int) -> TierBudget:
        return ObjectBudget(capacity=capacity, **self.settings)


# ---- in a cache: demotion below nvme, handoff between processes, faults ----------------------------------------
def object_policy(settings: dict[str, Any], capacity: int = 8 * MiB, **tiers: dict[str, Any]) -> tiercache.Policy:
    return policy(tiers={"object": {"capacity": capacity, **settings}, **tiers})


def test_nvme_victims_go_down_to_the_bucket_and_come_back_bit_exact(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any]
) -> None:
    small = {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 300 * KiB}}
    cache = make_cache(object_policy(object_tier_settings, **small))
    data = {f"k{i}": kv(i, 128 * KiB) for i in range(4)}
    for key, tensors in data.items():
        cache.put(key, tensors)
    assert "object" in cache.info("k0").tiers and cache.stats().tiers["object"].entries >= 2
    for key, tensors in data.items():
        assert_same(cache[key], tensors)


def test_an_entry_offloaded_to_the_bucket_is_read_by_another_process(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    pol = object_policy(object_tier_settings)
    writer = f"""
import sys, torch, tiercache
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import kv, policy
pol = policy(tiers={{"object": {{"capacity": {8 * MiB}, **{object_tier_settings!r}}}}})
with tiercache.TierCache(root={str(tmp_path / "a")!r}, policy=pol, device="cpu") as cache:
    cache.put("handoff", kv(7, 256 * 1024))
    moved = cache.offload("handoff", to="object")
    assert moved.moved == ("handoff",), moved
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    reader = make_cache(pol, root=tmp_path / "b")  # another root: only the bucket is shared
    assert reader.tier_of("handoff") == "object"
    assert_same(reader["handoff"], kv(7, 256 * KiB))


def test_a_fresh_cache_gets_a_key_without_waiting_for_every_other_manifest(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = object_policy({**object_tier_settings, "list_every_s": 60.0}, **ONLY)
    check_a_fresh_cache_looks_up_one_key(make_cache, pol, Bucket, "object", tmp_path, monkeypatch)


def test_a_lookup_the_server_holds_up_holds_up_no_other_lookup(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = object_policy({**object_tier_settings, "list_every_s": 60.0}, **ONLY)
    check_a_lookup_the_store_holds_up_holds_up_no_other(make_cache, pol, Bucket, tmp_path, monkeypatch)


def test_a_listing_begun_before_a_replacement_counts_only_the_newer_version(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    def pol(**more: Any) -> tiercache.Policy:
        return object_policy({**object_tier_settings, **more}, **ONLY)

    check_a_listing_begun_before_a_replacement_counts_only_the_newer_version(
        make_cache, pol, Bucket, "object", tmp_path, monkeypatch
    )


def test_a_replaced_version_stays_for_its_readers_until_swept_and_a_delete_takes_every_version(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path
) -> None:

    def pol(**more: Any) -> tiercache.Policy:
        return object_policy({**object_tier_settings, **more}, **ONLY)

    check_replaced_versions_stay_for_readers(make_cache, pol, "object", tmp_path)


def test_a_removal_that_fails_leaves_no_older_version_to_come_back(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = object_policy({**object_tier_settings, "list_every_s": 0.1, "keep_replaced_s": 60.0}, **ONLY)
    cache = make_cache(pol, root=tmp_path / "a")
    cache.put("x", kv(1, 4 * KiB))
    cache.put("x", kv(2, 4 * KiB))  # v1 stays for readers
    remove, refused = Bucket.delete, []

    def refuse_once(bucket: Bucket, paths: Any) -> None:  # the first removal of a manifest
        if not refused and any(p.endswith("/zarr.json") for p in paths):
            refused.append(paths)
            raise tiercache.StorageError("object tier: removing was refused")
        remove(bucket, paths)

    monkeypatch.setattr(Bucket, "delete", refuse_once)
    cache.set_capacity("object", 0)  # evicts x; its removal fails once, and the lister retries it
    assert refused
    wait_for(lambda: not manifests(cache, "object"))
    assert "x" not in make_cache(object_policy(object_tier_settings, **ONLY), root=tmp_path / "b")


def test_a_newer_version_in_the_bucket_wins_over_an_older_one_on_the_root_before_the_listing(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    memory = {"hbm": {"capacity": 0}, "host": {"capacity": 0}}
    pol = object_policy({**object_tier_settings, "list_every_s": 60.0}, **memory)
    older = make_cache(pol, root=tmp_path / "shared")
    older.put("k", kv(1))
    assert older.info("k").tiers == ("nvme",)
    older.close()
    newer = make_cache(object_policy(object_tier_settings, nvme={"capacity": 0}, **memory), root=tmp_path / "b")
    newer.put("k", kv(2))
    for i in range(10):  # more entries than one round of reads: the fresh cache's open lists names only
        newer.put(f"other{i}", kv(i, 4 * KiB))
    assert newer.info("k").tiers == ("object",)
    fresh = make_cache(pol, root=tmp_path / "shared")
    assert_same(fresh["k"], kv(2))


def test_a_first_listing_that_fails_fails_what_needs_every_entry_and_puts_pass_the_tier_by(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**object_tier_settings, "list_every_s": 0.2}
    make_cache(object_policy(settings, **ONLY), root=tmp_path / "a").put("k0", kv(0))
    read = Bucket.get

    def refuse_manifests(bucket: Bucket, path: str) -> Any:
        if path.count("/") == 2:
            raise tiercache.StorageError(f"object tier: reading {path} was refused")
        return read(bucket, path)

    monkeypatch.setattr(Bucket, "get", refuse_manifests)
    host = {**ONLY, "host": {"capacity": 100 * KiB}}
    cache = make_cache(object_policy(settings, **host), root=tmp_path / "b")  # the open lists names only
    cache.put("k1", kv(1))  # the bucket's room is unknown, but the host tier has room of its own
    assert cache.info("k1").tiers == ("host",)
    with pytest.raises(tiercache.StorageError, match=r"'k2'.* could not be listed.*first listing .*refused.*"
                       r"list_every_s.*Nothing stored was changed"):  # fmt: skip
        cache.put("k2", kv(2, 256 * KiB))  # only the bucket admits it, and its quota needs every entry
    cache.pin("k1")
    with pytest.raises(tiercache.StorageError, match=r"could not be listed.*other tiers that admit it cannot make "
                       r"room \(host: .* 1 pinned"):  # fmt: skip
        cache.put("k3", kv(3))  # the host tier admits it too, but its one entry is pinned
    cache.unpin("k1")
    with pytest.raises(tiercache.StorageError, match=r"first listing .* failed .*refused"):
        cache.keys()
    assert "k2" not in cache and "k1" in cache
    monkeypatch.setattr(Bucket, "get", read)

    def listed() -> bool:  # once a later listing succeeds
        try:
            return sorted(cache.keys()) == ["k0", "k1"]
        except tiercache.StorageError:
            return False

    wait_for(listed)
    cache.put("k2", kv(2, 256 * KiB))
    assert cache.info("k2").tiers == ("object",)
    assert_same(cache["k0"], kv(0))


def test_a_delete_in_one_cache_is_a_miss_in_another_after_its_next_listing(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    settings = {**object_tier_settings, "list_every_s": 0.1}
    pol = object_policy(settings, hbm={"capacity": 0}, host={"capacity": 0}, nvme={"capacity": 0})
    a, b = make_cache(pol, root=tmp_path / "a"), make_cache(pol, root=tmp_path / "b")
    a.put("x", kv(1))
    wait_for(lambda: "x" in b)
    assert_same(b["x"], kv(1))
    a.put("x", kv(2))  # a new version replaces it for everyone (b's get of the old one is a miss meanwhile)
    wait_for(lambda: (got := b.get("x")) is not None and torch.equal(got["k"], kv(2)["k"]))
    del a["x"]
    wait_for(lambda: "x" not in b)
    assert b.get("x") is None


def test_the_quota_counts_every_cache_and_a_full_bucket_evicts_by_the_rules(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    pol = object_policy({**object_tier_settings, "list_every_s": 0.1}, capacity=600 * KiB, **ONLY)
    a, b = make_cache(pol, root=tmp_path / "a"), make_cache(pol, root=tmp_path / "b")
    a.put("a1", kv(1, 256 * KiB))
    a.put("a2", kv(2, 256 * KiB))
    wait_for(lambda: b.stats().tiers["object"].used >= 512 * KiB)
    b.put("b1", kv(3, 256 * KiB))  # the bucket is full: the least recently used goes
    assert "b1" in b and len(b) == 2 and b.stats().tiers["object"].used <= 600 * KiB
    with pytest.raises(tiercache.CapacityError, match="object"):
        b.put("huge", kv(4, 700 * KiB))


def test_wrong_credentials_are_refused_at_open_naming_the_variables(
    object_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(tiercache.StorageError, match=r"refused the credentials.*AWS_ACCESS_KEY_ID"):
        tiercache.TierCache(root=tmp_path / "r", policy=object_policy(object_tier_settings), device="cpu")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(tiercache.StorageError, match="no AWS_SECRET_ACCESS_KEY"):
        tiercache.TierCache(root=tmp_path / "r", policy=object_policy(object_tier_settings), device="cpu")


def test_a_server_that_stops_answering_is_a_storage_error_within_the_timeout(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], s3_server: Any
) -> None:
    proxy = StallingProxy(("127.0.0.1", s3_server.ports[6]))
    try:
        settings = {**object_tier_settings, "endpoint": proxy.endpoint, "timeout_s": 1.0, "retries": 0}
        cache = make_cache(object_policy(settings, **ONLY))
        cache.put("kept", kv(1))
        proxy.stalled.set()
        start = time.monotonic()
        with pytest.raises(tiercache.StorageError, match=r"put\('new'\).*did not commit.*timeout_s"):
            cache.put("new", kv(2))
        with pytest.raises(tiercache.StorageError, match="reading"):
            cache["kept"]
        assert time.monotonic() - start < 15
        proxy.stalled.clear()
        assert_same(cache["kept"], kv(1))  # nothing stored was lost; the cache works again
        assert "new" not in cache
    finally:
        proxy.close()


def test_an_upload_the_server_holds_up_holds_up_no_other_get_or_put(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], s3_server: Any
) -> None:
    """A put's upload runs outside the cache's lock: while the server holds one up, entries in memory are still
    served and put, and the upload commits once the server answers again."""
    proxy = StallingProxy(("127.0.0.1", s3_server.ports[6]))
    try:
        settings = {**object_tier_settings, "endpoint": proxy.endpoint, "timeout_s": 20.0, "retries": 0}
        small = {"hbm": {"capacity": 0}, "host": {"capacity": 1 * MiB, "max_entry": 256 * KiB}, "nvme": {"capacity": 0}}
        cache = make_cache(object_policy(settings, **small))
        cache.put("local", kv(1))
        assert cache.tier_of("local") == "host"
        proxy.stalled.set()
        failed: list[BaseException] = []

        def upload() -> None:
            try:
                cache.put("big", kv(2, 1 * MiB))  # too large for host: the bucket's
            except BaseException as exc:  # noqa: BLE001 - the test's thread: handed to the assert below
                failed.append(exc)

        writer = threading.Thread(target=upload)
        writer.start()
        assert proxy.holding.wait(10), "the upload never reached the server"
        assert_same(cache["local"], kv(1))
        cache.put("local2", kv(3))
        assert "local2" in cache and cache.stats() is not None
        assert writer.is_alive(), "the upload ended before the other calls ran: nothing was tested"
        proxy.stalled.clear()
        writer.join()
        assert not failed, failed
        assert cache.tier_of("big") == "object"
        assert_same(cache["big"], kv(2, 1 * MiB))
    finally:
        proxy.close()


def test_the_server_killed_mid_put_and_restarted_loses_nothing_committed(tmp_path: Path, s3_server: Any) -> None:
    server = S3Server(tmp_path / "own-server")  # one of its own: this test kills it
    server.start()
    try:
        settings = {"url": "s3://tiercache/kill", "endpoint": server.endpoint, "timeout_s": 2.0, "retries": 0}
        pol = object_policy(settings, capacity=64 * MiB, **ONLY)
        with tiercache.TierCache(root=tmp_path / "r", policy=pol, device="cpu") as cache:
            cache.put("kept", kv(1, 1 * MiB))
            killer = threading.Timer(0.05, server.stop, args=(signal.SIGKILL,))
            killer.start()
            with pytest.raises(tiercache.StorageError):
                for i in range(200):  # one of these is in flight when the server dies
                    cache.put(f"new{i}", kv(i, 4 * MiB))
            killer.join()
            with pytest.raises(tiercache.StorageError):
                cache["kept"]  # mid-get: the server is gone
            server.start()
            assert_same(cache["kept"], kv(1, 1 * MiB))
        with tiercache.TierCache(root=tmp_path / "r2", policy=pol, device="cpu") as again:
            assert_same(again["kept"], kv(1, 1 * MiB))
            for key in again.keys("new"):  # every entry listed is whole
                assert_same(again[key], kv(int(key[3:]), 4 * MiB))
    finally:
        server.stop()


def test_a_damaged_manifest_or_chunk_is_never_served(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    pol = object_policy(object_tier_settings, **ONLY)
    cache = make_cache(pol, root=tmp_path / "a")
    cache.put("x", kv(1))
    tier = cache.tiers["object"]
    bucket = tier.bucket  # type: ignore[attr-defined]
    chunk = next(o.path for o in bucket.objects("entries/") if "/c/" in o.path)
    raw = bytearray(bucket.get(chunk))
    raw[10] ^= 0xFF
    bucket.put(chunk, bytes(raw))
    with pytest.raises(tiercache.CorruptEntryError, match="CRC32C"):
        cache["x"]
    manifest = next(
        o.path for o in bucket.objects("entries/") if o.path.count("/") == 2 and o.path != "entries/zarr.json"
    )
    bucket.put(manifest, bytes(bucket.get(manifest)).replace(b'"nbytes"', b'"nbytes" ', 1).replace(b"65536", b"65537"))
    other = make_cache(pol, root=tmp_path / "b")
    assert "x" not in other


def test_objects_left_by_a_writer_that_died_are_swept_once_old(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any]
) -> None:
    settings = {**object_tier_settings, "orphan_age_s": 0.0, "list_every_s": 0.1}
    cache = make_cache(object_policy(settings))
    bucket = cache.tiers["object"].bucket  # type: ignore[attr-defined]
    bucket.put("entries/" + "0" * 32 + "-" + "1" * 16 + "/t0/c/0", b"half an entry")
    wait_for(lambda: not [o for o in bucket.objects("entries/") if "/t0/" in o.path])


@pytest.mark.parametrize("trailer_split", [0, 2], ids=["trailer-in-last-part", "trailer-across-parts"])
def test_a_chunk_larger_than_a_part_goes_up_in_parts_and_comes_back_in_ranges(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], trailer_split: int
) -> None:
    part = 5 * MiB
    nbytes = 2 * part - trailer_split  # with 2: the 4-byte checksum's first 2 bytes end one part, 2 start the next
    cache = make_cache(object_policy({**object_tier_settings, "part_size": part}, capacity=32 * MiB, **ONLY))
    data = {"big": torch.randint(0, 255, (nbytes,), dtype=torch.uint8), "small": torch.arange(10.0)}
    cache.put("x", data)
    assert_same(cache["x"], data)


def test_the_ops_commands_list_measure_verify_and_sweep_a_bucket(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    cache = make_cache(object_policy(object_tier_settings, **ONLY))
    cache.put("stage1/latents", kv(1))
    cache.put("stage1/prompt", kv(2, 16 * KiB))
    bucket = cache.tiers["object"].bucket  # type: ignore[attr-defined]
    bucket.put("entries/" + "0" * 32 + "-" + "1" * 16 + "/t0/c/0", b"left by a writer that died")
    url, where = object_tier_settings["url"], ["--endpoint", object_tier_settings["endpoint"]]
    capsys.readouterr()
    assert cli.main(["ls", url, *where, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in listed] == ["stage1/latents", "stage1/prompt"] and listed[0]["nbytes"] == 64 * KiB
    assert cli.main(["du", url, *where, "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)
    assert usage["entries"] == 2 and usage["payload"] == 80 * KiB and usage["stored"] > usage["payload"]
    assert cli.main(["verify", url, *where]) == 0
    assert "2 good" in capsys.readouterr().out
    assert cli.main(["gc", url, *where, "--grace", "0", "--dry-run"]) == 0
    assert "would remove 1 objects" in capsys.readouterr().out
    assert cli.main(["gc", url, *where, "--grace", "0"]) == 0
    assert "removed 1 objects" in capsys.readouterr().out
    assert not [o for o in bucket.objects("entries/") if "/t0/c/0" in o.path and o.path.startswith("entries/000")]
    chunk = next(o.path for o in bucket.objects("entries/") if "/c/" in o.path)
    raw = bytearray(bucket.get(chunk))
    raw[0] ^= 1
    bucket.put(chunk, bytes(raw))
    assert cli.main(["verify", url, *where]) == 1
    assert "does not verify" in capsys.readouterr().out
    assert cli.main(["info", url, *where, "stage1/prompt"]) == 2
    assert "for a shared store: tiercache ls" in capsys.readouterr().err


def test_check_batches_cut_an_entry_into_runs_no_larger_than_the_bound() -> None:
    specs = [TensorSpec(f"t{i}", "uint8", (n,)) for i, n in enumerate([3, 3, 3, 10, 1, 0, 4])]
    assert check_batches(specs, 6) == [[0, 1], [2], [3], [4, 5, 6]]  # the 10-byte tensor alone
    assert check_batches(specs, 100) == [list(range(7))]
    assert check_batches([], 6) == []


def test_verify_reads_a_large_entry_a_batch_at_a_time_and_finds_damage_in_the_last_batch(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(object_policy(object_tier_settings, **ONLY))
    data = {f"layer{i}": torch.full((64 * KiB,), i, dtype=torch.uint8) for i in range(6)}
    cache.put("weights", data)
    tier = cache.tiers["object"]
    bucket = tier.bucket  # type: ignore[attr-defined]
    (stored,) = tier.stored()  # type: ignore[attr-defined]
    read = bucket.read_chunks
    held: list[int] = []

    def counted(chunks: Any) -> Any:
        held.append(sum(out.numel() for _, out in chunks))
        return read(chunks)

    monkeypatch.setattr(bucket, "read_chunks", counted)
    assert tier.check(stored, batch_bytes=128 * KiB) is None  # type: ignore[attr-defined]
    assert held == [128 * KiB] * 3
    last = stored.chunk_files[5]
    raw = bytearray(bucket.get(last))
    raw[0] ^= 1
    bucket.put(last, bytes(raw))
    why = tier.check(stored, batch_bytes=128 * KiB)  # type: ignore[attr-defined]
    assert why is not None and "layer5" in why and "weights" in why


def test_a_commit_whose_reply_was_lost_leaves_no_entry_without_chunks(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pol = object_policy(object_tier_settings, **ONLY)
    cache = make_cache(pol, root=tmp_path / "a")
    bucket = cache.tiers["object"].bucket  # type: ignore[attr-defined]
    real_put = bucket.put

    def commit_then(error: BaseException) -> Callable[..., None]:
        def put(path: str, data: Any, *, create: bool = False) -> None:
            real_put(path, data, create=create)
            if create and path.count("/") == 2:  # the manifest landed; the reply did not
                raise error

        return put

    monkeypatch.setattr(bucket, "put", commit_then(tiercache.StorageError("reply lost")))
    with pytest.raises(tiercache.StorageError, match="did not commit"):
        cache.put("lost", kv(1))
    monkeypatch.setattr(bucket, "put", commit_then(Exists("retried after it landed")))
    cache.put("retried", kv(2))  # the retry found its own commit: committed
    monkeypatch.setattr(bucket, "put", real_put)
    other = make_cache(pol, root=tmp_path / "b")
    assert "lost" not in other and "lost" not in cache
    assert_same(other["retried"], kv(2))


def test_an_entry_this_cache_removed_never_comes_back_from_a_listing(
    make_cache: CacheFactory, object_tier_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**object_tier_settings, "list_every_s": 0.0}  # listings back to back: one is always under way
    cache = make_cache(object_policy(settings, capacity=150 * KiB, **ONLY))
    for i in range(10):
        cache.put(f"k{i}", kv(i))
        del cache[f"k{i}"]
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            assert f"k{i}" not in cache
    # an eviction whose removal the server refuses: gone from this cache at once, its bytes counted until the
    # lister's retry removes it from the bucket
    bucket = cache.tiers["object"].bucket  # type: ignore[attr-defined]
    real_delete = bucket.delete
    monkeypatch.setattr(bucket, "delete", lambda paths: (_ for _ in ()).throw(tiercache.StorageError("refused")))
    cache.put("a", kv(1))
    cache.put("b", kv(2))
    with pytest.raises(tiercache.CapacityError):
        cache.put("c", kv(3))  # the quota holds two: the victims' removals are refused, their room still taken
    assert "a" not in cache and "c" not in cache  # (the engine went on to evict "b" as well: both are doomed)
    monkeypatch.setattr(bucket, "delete", real_delete)
    manifests = lambda: [o.path for o in bucket.objects("entries/") if o.path.count("/") == 2]  # noqa: E731
    wait_for(lambda: not manifests())  # the lister's retries removed them from the bucket
    wait_for(lambda: cache.stats().tiers["object"].used == 0)
    cache.put("c", kv(3))
    assert "a" not in cache and cache.keys() == ["c"]
