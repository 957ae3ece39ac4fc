"""The remote tier against a real Mooncake Store (a mooncake_master and mooncake_client holders, started by the
suite): the tier contract, then what only a store shared by several caches brings, and its faults: a holder or the
master killed, a master restart, a full store, a master that stops answering."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers
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
    policy,
)

import tiercache
from tiercache.policy.schema import RemoteBudget, TierBudget
from tiercache.testing.servers import MooncakeServer
from tiercache.testing.tiers import TierContract
from tiercache.tiers.remote import RemoteTier
from tiercache.tiers.remote.store import MooncakeStore
from tiercache.tools import cli


class TestRemoteTierContract(TierContract):
    tier_type = RemoteTier
    name = "remote"

    @pytest.fixture(autouse=True)
    def _settings(self, remote_tier_settings: dict[str, Any]) -> None:
        self.settings = remote_tier_settings

    def budget(self, capacity: int) -> TierBudget:
        return RemoteBudget(capacity=capacity, **self.settings)


def remote_policy(settings: dict[str, Any], capacity: int = 8 * MiB, **tiers: dict[str, Any]) -> tiercache.Policy:
    return policy(tiers={"remote": {"capacity": capacity, **settings}, **tiers})


def settings_of(server: MooncakeServer, prefix: str = "t", **more: Any) -> dict[str, Any]:
    return {"master": server.address, "metadata_server": server.metadata, "admin": server.admin, "prefix": prefix,
            "timeout_s": 5.0, **more}  # fmt: skip


@pytest.fixture
def own_server(tmp_path: Path, mooncake_server: MooncakeServer) -> Iterator[MooncakeServer]:
    """A store of its own (a 32 MiB holder; a dead one forgotten within 2 s) for a test that kills, fills or
    restarts it."""
    server = MooncakeServer(tmp_path / "own-store", segment=32 << 20, client_ttl_s=2)
    server.start()
    yield server
    server.stop(signal.SIGKILL)


# a listing, a holder's expiry and a master's restart take their time: 20 s unless a test says more
wait_for = functools.partial(helpers.wait_for, timeout=20.0)


# ---- in a cache: between host and nvme, handoff between processes --------------------------------------------
def test_host_victims_go_down_to_the_store_before_nvme_and_come_back_bit_exact(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any]
) -> None:
    tiers = {"hbm": {"capacity": 0}, "host": {"capacity": 300 * KiB}}
    cache = make_cache(remote_policy(remote_tier_settings, **tiers))
    data = {f"k{i}": kv(i, 128 * KiB) for i in range(4)}
    for key, tensors in data.items():
        cache.put(key, tensors)
    assert cache.info("k0").tiers == ("remote",) and cache.stats().tiers["remote"].entries == 2
    assert cache.stats().tiers["nvme"].entries == 0
    for key, tensors in data.items():
        assert_same(cache[key], tensors)


def test_an_entry_offloaded_to_the_store_is_read_by_another_process(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    writer = f"""
import sys, torch, tiercache
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import kv, policy
pol = policy(tiers={{"remote": {{"capacity": {8 * MiB}, **{remote_tier_settings!r}}}}})
with tiercache.TierCache(root={str(tmp_path / "a")!r}, policy=pol, device="cpu") as cache:
    cache.put("handoff", kv(7, 256 * 1024))
    moved = cache.offload("handoff", to="remote")
    assert moved.moved == ("handoff",), moved
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    reader = make_cache(remote_policy(remote_tier_settings), root=tmp_path / "b")  # only the store is shared
    assert reader.tier_of("handoff") == "remote"
    assert_same(reader["handoff"], kv(7, 256 * KiB))


def test_a_fresh_cache_gets_a_key_without_waiting_for_every_other_manifest(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = remote_policy({**remote_tier_settings, "list_every_s": 60.0}, **ONLY)
    check_a_fresh_cache_looks_up_one_key(make_cache, pol, MooncakeStore, "remote", tmp_path, monkeypatch)


def test_a_lookup_the_server_holds_up_holds_up_no_other_lookup(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = remote_policy({**remote_tier_settings, "list_every_s": 60.0}, **ONLY)
    check_a_lookup_the_store_holds_up_holds_up_no_other(make_cache, pol, MooncakeStore, tmp_path, monkeypatch)


def test_a_listing_begun_before_a_replacement_counts_only_the_newer_version(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    def pol(**more: Any) -> tiercache.Policy:
        return remote_policy({**remote_tier_settings, **more}, **ONLY)

    check_a_listing_begun_before_a_replacement_counts_only_the_newer_version(
        make_cache, pol, MooncakeStore, "remote", tmp_path, monkeypatch
    )


def test_a_replaced_version_stays_for_its_readers_until_swept_and_a_delete_takes_every_version(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], tmp_path: Path
) -> None:

    def pol(**more: Any) -> tiercache.Policy:
        return remote_policy({**remote_tier_settings, **more}, **ONLY)

    check_replaced_versions_stay_for_readers(make_cache, pol, "remote", tmp_path)


def test_a_delete_of_a_key_another_cache_holds_in_memory_too_is_a_miss_there_for_every_version(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    # In a volatile store a version that vanishes without a tombstone was lost, not deleted, and other caches keep
    # their memory copies of it: every version a delete removes needs one.
    holder = make_cache(remote_policy({**remote_tier_settings, "list_every_s": 0.1}, hbm={"capacity": 0},
                                      nvme={"capacity": 0}), root=tmp_path / "e")  # fmt: skip
    holder.put("x", kv(1, 4 * KiB))
    holder.offload("x", to="remote")
    assert_same(holder["x"], kv(1, 4 * KiB))  # promoted to host; the remote copy stays
    other = make_cache(remote_policy({**remote_tier_settings, "list_every_s": 60.0}, **ONLY), root=tmp_path / "a")
    assert_same(other["x"], kv(1, 4 * KiB))
    other.put("x", kv(2, 4 * KiB))  # v1 stays in the store for readers
    del other["x"]  # both versions go, each with its tombstone
    helpers.wait_for(lambda: "x" not in holder)


def test_a_replace_or_delete_in_one_cache_is_seen_by_another_after_its_next_listing(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    pol = remote_policy({**remote_tier_settings, "list_every_s": 0.1}, **ONLY)
    a, b = make_cache(pol, root=tmp_path / "a"), make_cache(pol, root=tmp_path / "b")
    a.put("x", kv(1))
    wait_for(lambda: "x" in b)
    assert_same(b["x"], kv(1))
    a.put("x", kv(2))
    wait_for(lambda: (got := b.get("x")) is not None and torch.equal(got["k"], kv(2)["k"]))
    del a["x"]
    wait_for(lambda: "x" not in b)
    assert b.get("x") is None


def test_the_quota_counts_every_cache_and_a_full_quota_evicts_by_the_rules(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], tmp_path: Path
) -> None:
    pol = remote_policy({**remote_tier_settings, "list_every_s": 0.1}, capacity=600 * KiB, **ONLY)
    a, b = make_cache(pol, root=tmp_path / "a"), make_cache(pol, root=tmp_path / "b")
    a.put("a1", kv(1, 256 * KiB))
    a.put("a2", kv(2, 256 * KiB))
    wait_for(lambda: b.stats().tiers["remote"].used >= 512 * KiB)
    b.put("b1", kv(3, 256 * KiB))  # the quota is full: the least recently used goes
    assert "b1" in b and len(b) == 2 and b.stats().tiers["remote"].used <= 600 * KiB


def test_a_tensor_larger_than_a_part_is_stored_as_parts_and_read_back_whole(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any]
) -> None:
    cache = make_cache(remote_policy({**remote_tier_settings, "part_size": MiB}, capacity=32 * MiB, **ONLY))
    data = {"big": torch.randint(0, 255, (5 * MiB + 3,), dtype=torch.uint8), "small": torch.arange(10.0)}
    cache.put("x", data)
    store = cache.tiers["remote"].bucket  # type: ignore[attr-defined]
    assert len([o for o in store.objects("entries/") if "@" in o.path]) == 6 + 1  # 6 parts and 1
    assert_same(cache["x"], data)


def test_a_damaged_part_is_never_served(make_cache: CacheFactory, remote_tier_settings: dict[str, Any]) -> None:
    cache = make_cache(remote_policy(remote_tier_settings, **ONLY))
    cache.put("x", kv(1))
    store = cache.tiers["remote"].bucket  # type: ignore[attr-defined]
    part = next(o.path for o in store.objects("entries/") if "@" in o.path)
    store.delete([part])
    store.put(part, b"\0" * (32 * KiB))  # same size, other bytes
    with pytest.raises(tiercache.CorruptEntryError, match="CRC32C"):
        cache["x"]


def test_objects_left_by_a_writer_that_died_are_swept_once_listed_long_enough(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any]
) -> None:
    cache = make_cache(remote_policy({**remote_tier_settings, "orphan_age_s": 0.5, "list_every_s": 0.1}))
    store = cache.tiers["remote"].bucket  # type: ignore[attr-defined]
    store.put("entries/" + "0" * 32 + "-" + "1" * 16 + "/t0/c/0@0", b"half an entry")
    wait_for(lambda: not [o for o in store.objects("entries/") if "/t0/" in o.path])


def test_puts_go_to_the_preferred_holder(tmp_path: Path, mooncake_server: MooncakeServer) -> None:
    server = MooncakeServer(tmp_path / "two", holders=2, segment=32 << 20)
    server.start()
    try:
        for target in server.segments:
            pol = remote_policy(settings_of(server, prefix=f"p{target[-5:]}", preferred_segment=target), **ONLY)
            with tiercache.TierCache(root=tmp_path / target, policy=pol, device="cpu") as cache:
                cache.put("x", kv(1, 256 * KiB))
                store = cache.tiers["remote"].bucket  # type: ignore[attr-defined]
                for o in store.objects("entries/"):
                    url = f"{server.admin}/query_key?key={urllib.parse.quote(store._key(o.path), safe='/@')}"
                    with urllib.request.urlopen(url, timeout=5) as reply:
                        where = {r["transport_endpoint_"] for r in json.loads(reply.read())["data"]}
                    assert where == {target}, (o.path, where)
    finally:
        server.stop()


# ---- faults ------------------------------------------------------------------------------------------------------
def test_a_holder_killed_is_a_miss_never_wrong_data_and_the_cache_goes_on(
    tmp_path: Path, own_server: MooncakeServer
) -> None:
    pol = remote_policy(settings_of(own_server, list_every_s=0.1), **ONLY)
    with tiercache.TierCache(root=tmp_path / "r", policy=pol, device="cpu") as cache:
        cache.put("x", kv(1, 1 * MiB))
        own_server.stop_holder(0, signal.SIGKILL)  # its memory, and every entry in it, is gone
        start = time.monotonic()
        with pytest.raises(tiercache.EntryNotFoundError, match="lost"):
            cache["x"]
        assert time.monotonic() - start < 5
        wait_for(lambda: "x" not in cache)  # dropped with the listing the miss asked for
        own_server.add_holder()  # puts work again once the master has dropped the dead holder (its -client_ttl)
        wait_for(lambda: _put_works(cache, "y", kv(2, 1 * MiB)))
        assert_same(cache["y"], kv(2, 1 * MiB))


def test_an_entry_lost_with_its_holder_stays_where_this_cache_has_a_copy(
    tmp_path: Path, own_server: MooncakeServer
) -> None:
    tiers = {"hbm": {"capacity": 0}, "host": {"capacity": 4 * MiB}, "nvme": {"capacity": 0}}
    pol = remote_policy(settings_of(own_server, list_every_s=0.1), **tiers)
    with tiercache.TierCache(root=tmp_path / "r", policy=pol, device="cpu") as cache:
        cache.put("x", kv(1))
        assert cache.offload("x", to="remote").moved == ("x",)
        assert_same(cache["x"], kv(1))  # promoted into host; the store keeps its copy
        assert cache.info("x").tiers == ("host", "remote")
        own_server.stop_holder(0, signal.SIGKILL)
        wait_for(lambda: cache.info("x").tiers == ("host",))  # lost from the store: not a delete
        assert_same(cache["x"], kv(1))


def test_a_delete_in_one_cache_removes_the_copy_another_promoted(
    remote_tier_settings: dict[str, Any], make_cache: CacheFactory, tmp_path: Path
) -> None:
    tiers = {"hbm": {"capacity": 0}, "host": {"capacity": 4 * MiB}, "nvme": {"capacity": 0}}
    pol = remote_policy({**remote_tier_settings, "list_every_s": 0.1}, **tiers)
    a, b = make_cache(pol, root=tmp_path / "a"), make_cache(pol, root=tmp_path / "b")
    a.put("x", kv(1))
    a.offload("x", to="remote")
    wait_for(lambda: "x" in b)
    assert_same(b["x"], kv(1))
    assert b.info("x").tiers == ("host", "remote")
    del a["x"]  # a tombstone says it was removed, not lost
    wait_for(lambda: "x" not in b)


def test_a_holder_killed_mid_get_fails_the_get_cleanly(tmp_path: Path, own_server: MooncakeServer) -> None:
    pol = remote_policy(settings_of(own_server, part_size=MiB), capacity=24 * MiB, **ONLY)
    with tiercache.TierCache(root=tmp_path / "r", policy=pol, device="cpu") as cache:
        data = {"big": torch.randint(0, 255, (20 * MiB,), dtype=torch.uint8)}
        cache.put("x", data)
        served: list[Any] = []

        def reads() -> None:
            while True:
                try:
                    got = cache["x"]
                except (tiercache.EntryNotFoundError, tiercache.StorageError) as exc:
                    served.append(exc)
                    return
                served.append(torch.equal(got["big"], data["big"]))

        reader = threading.Thread(target=reads)
        reader.start()
        time.sleep(0.3)
        own_server.stop_holder(0, signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive(), "a get hung after its holder died"
        assert all(s is True for s in served[:-1]) and isinstance(served[-1], Exception), served


def test_the_master_killed_mid_put_and_restarted_is_a_miss_never_a_hang(
    tmp_path: Path, own_server: MooncakeServer
) -> None:
    pol = remote_policy(settings_of(own_server, timeout_s=3.0, list_every_s=0.2), capacity=30 * MiB, **ONLY)
    with tiercache.TierCache(root=tmp_path / "r", policy=pol, device="cpu") as cache:
        cache.put("kept", kv(1, 1 * MiB))
        killer = threading.Timer(0.05, own_server.stop_master, args=(signal.SIGKILL,))
        killer.start()
        with pytest.raises(tiercache.StorageError, match="remote tier"):
            for i in range(100):  # one of these is in flight when the master dies
                cache.put(f"new{i}", kv(i, 1 * MiB))
                cache.delete(f"new{i}")
        killer.join()
        start = time.monotonic()
        with pytest.raises(tiercache.StorageError, match="master"):
            cache["kept"]  # the master is away: an error within the timeout, not a hang
        assert time.monotonic() - start < 10
        own_server.start_master()  # a fresh master: it knows no keys, and the holders mount again
        wait_for(lambda: "kept" not in cache, timeout=30)  # forgotten: a miss, never wrong data
        assert cache.get("kept") is None
        wait_for(lambda: bool(own_server._segments()), timeout=30)
        wait_for(lambda: _put_works(cache, "again", kv(3, 1 * MiB)), timeout=30)
        assert_same(cache["again"], kv(3, 1 * MiB))


def _put_works(cache: tiercache.TierCache, key: str, data: dict[str, torch.Tensor]) -> bool:
    try:
        cache.put(key, data)
    except tiercache.StorageError:
        return False
    return True


def test_a_full_store_is_a_storage_error_naming_the_fix_and_loses_nothing(
    tmp_path: Path, own_server: MooncakeServer
) -> None:
    pol = remote_policy(settings_of(own_server), capacity=256 * MiB, **ONLY)  # more than the 32 MiB holder lends
    with tiercache.TierCache(root=tmp_path / "r", policy=pol, device="cpu") as cache:
        cache.put("kept", kv(1, 8 * MiB))
        with pytest.raises(tiercache.StorageError, match=r"NO_AVAILABLE_HANDLE.*lower tiers.remote.capacity"):
            for i in range(8):
                cache.put(f"more{i}", kv(i, 8 * MiB))
        assert_same(cache["kept"], kv(1, 8 * MiB))
        keys = list(cache.keys())
        for key in keys:
            assert key == "kept" or cache[key] is not None


def test_a_master_that_stops_answering_is_a_storage_error_within_the_timeout(
    tmp_path: Path, own_server: MooncakeServer
) -> None:
    pol = remote_policy(settings_of(own_server, timeout_s=1.0), **ONLY)
    with tiercache.TierCache(root=tmp_path / "r", policy=pol, device="cpu") as cache:
        cache.put("kept", kv(1))
        assert own_server.master is not None
        os.kill(own_server.master.pid, signal.SIGSTOP)  # frozen: connections open, nothing answered
        try:
            start = time.monotonic()
            with pytest.raises(tiercache.StorageError, match=r"put\('new'\).*did not commit.*timeout_s"):
                cache.put("new", kv(2))
            with pytest.raises(tiercache.StorageError, match="timeout_s"):
                cache["kept"]
            assert time.monotonic() - start < 15
        finally:
            os.kill(own_server.master.pid, signal.SIGCONT)
        assert_same(cache["kept"], kv(1))  # nothing stored was lost; the cache works again
        assert "new" not in cache


def test_no_master_at_the_address_is_refused_at_open_naming_it(tmp_path: Path, own_server: MooncakeServer) -> None:
    settings = settings_of(own_server, timeout_s=3.0)
    settings["master"] = "127.0.0.1:1"
    with pytest.raises(tiercache.StorageError, match=r"127\.0\.0\.1:1.*tiers\.remote\.master"):
        tiercache.TierCache(root=tmp_path / "r", policy=remote_policy(settings), device="cpu")


def test_a_master_address_that_is_not_a_master_is_refused_at_open_not_a_hang(
    tmp_path: Path, mooncake_server: MooncakeServer
) -> None:
    """Mooncake's setup holds the GIL and waits without end on an address that accepts connections but is not a
    master's RPC port, so each open runs in a child process: a hang fails the test instead of stopping the suite."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never answers
    wrong = {
        "the metadata server's port": f"127.0.0.1:{mooncake_server.ports[1]}",
        "a listener that never answers": f"127.0.0.1:{silent.getsockname()[1]}",
    }
    try:
        for what, master in wrong.items():
            settings = {**settings_of(mooncake_server, timeout_s=2.0), "master": master}
            child = f"""
import sys, tiercache
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import policy
pol = policy(tiers={{"remote": {{"capacity": 1 << 20, **{settings!r}}}}})
try:
    tiercache.TierCache(root={str(tmp_path / "r")!r}, policy=pol, device="cpu")
except tiercache.StorageError as exc:
    print("refused:", exc)
"""
            out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
            assert "refused:" in out.stdout, (what, out.stdout, out.stderr[-2000:])
            assert master in out.stdout and "not answer as a mooncake_master" in out.stdout, what
            assert "tiers.remote.master" in out.stdout and "-rpc_port" in out.stdout, what
    finally:
        silent.close()


def test_policy_keys_are_validated() -> None:
    with pytest.raises(tiercache.PolicyError, match="master"):
        RemoteBudget(capacity=1, master="nowhere")
    with pytest.raises(tiercache.PolicyError, match="always verifies"):
        RemoteBudget(verify_checksums=False)
    with pytest.raises(tiercache.PolicyError, match="protocol"):
        RemoteBudget(protocol="udp")


def test_the_ops_commands_list_measure_verify_and_sweep_a_store(
    make_cache: CacheFactory, remote_tier_settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    cache = make_cache(remote_policy(remote_tier_settings, **ONLY))
    cache.put("a", kv(1))
    cache.put("b", kv(2))
    s = remote_tier_settings
    url = f"mooncake://{s['master']}/{s['prefix']}"
    where = ["--admin", s["admin"], "--metadata", s["metadata_server"]]
    assert cli.main(["ls", url, "--json", *where]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["key"] for r in listed) == ["a", "b"]
    assert cli.main(["du", url, *where]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert cli.main(["verify", url, *where, "--local-hostname", "127.0.0.1"]) == 0
    assert cli.main(["gc", url, "--dry-run", *where]) == 0
