"""Several caches, in this process and in others, on one root at once (docs/format.md, "Sharing a root").

Real processes (tests/shared_worker.py) write while others read, and four of them put, get and delete at random
while some are SIGKILLed: every read is one whole version of its key, the shared budget is never exceeded (a
monitor samples the index throughout), and a killed process's leases and reservations are recovered.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from faults import HeldRemoval, os_error
from helpers import KiB, assert_same, kv, only_tier, policy, wait_for
from shared_worker import NVME_CAPACITY, chaos_policy, check, stamp

import tiercache
from tiercache.io import FileOps
from tiercache.io.files import StrPath

WORKER = Path(__file__).resolve().parent / "shared_worker.py"
SLOW = os.environ.get("TIERCACHE_SLOW") == "1"

# The budget as docs/format.md defines it, read by an outside connection: live entries, removed ones still read
# (leased) or refused by the disk (stuck), and writes in progress.
BUDGET_SQL = """
SELECT (SELECT COALESCE(SUM(nbytes), 0) FROM entries e WHERE doomed_ns IS NULL OR stuck
            OR EXISTS (SELECT 1 FROM leases l WHERE l.name = e.name))
     + (SELECT COALESCE(SUM(nbytes), 0) FROM reservations)
"""


def spawn(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"worker said {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{out}\n{err}"
    return out


def test_two_caches_on_one_root_see_each_others_entries_without_reopening(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = make_cache(only_tier("nvme"), root=root)
    second = make_cache(only_tier("nvme"), root=root)
    first.put("a", kv(1))
    assert "a" in second and second.tier_of("a") == "nvme"
    assert_same(second["a"], kv(1))
    second.put("a", kv(2))  # a new version, committed by the other
    assert_same(first["a"], kv(2))
    first.delete("a")
    assert "a" not in second and second.get("a") is None
    assert "shared by 2 open cache(s)" in "\n".join(first.stats().notes)


def test_memory_tiers_stay_per_cache(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = make_cache(policy(), root=root)
    second = make_cache(policy(), root=root)
    first.put("in-memory", kv(1))
    assert first.tier_of("in-memory") == "hbm" and "in-memory" not in second


def test_the_nvme_budget_is_shared_and_eviction_sees_every_member(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = make_cache(only_tier("nvme", capacity=200 * KiB), root=root)
    second = make_cache(only_tier("nvme", capacity=200 * KiB), root=root)
    for i in range(3):
        first.put(f"a{i}", kv(i))  # 3 x 64 KiB: the budget is nearly full
    second.put("b", kv(9))  # needs room: evicts the least recently used, another cache's entry
    assert first.stats().tiers["nvme"].used == second.stats().tiers["nvme"].used <= 200 * KiB
    assert sorted(second.keys()) == sorted(first.keys()) and len(first) == 3 and "b" in first


def test_a_read_in_progress_keeps_its_files_while_another_cache_deletes_them(tmp_path: Path) -> None:
    root = tmp_path / "root"
    armed, started, release = threading.Event(), threading.Event(), threading.Event()

    class SlowReads(FileOps):
        def preadv(self, fd: int, buffers: Any, offset: int) -> int:
            if armed.is_set() and "/c/" in os.readlink(f"/proc/self/fd/{fd}"):  # a chunk: the get's reads
                started.set()
                release.wait(10)
            return super().preadv(fd, buffers, offset)

    pol = only_tier("nvme", capacity=8 * 1024 * KiB)
    with (
        tiercache.TierCache(root=root, policy=pol, files=SlowReads()) as reader,
        tiercache.TierCache(root=root, policy=pol) as other,
    ):
        other.put("big", kv(3, 1024 * KiB))
        armed.set()
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.setdefault("got", reader["big"]))
        thread.start()
        assert started.wait(10)
        other.delete("big")  # committed at once: nobody else sees it
        assert "big" not in other and "big" not in reader
        release.set()
        thread.join(10)
        assert_same(result["got"], kv(3, 1024 * KiB))  # the lease kept every chunk in place


def test_a_read_only_cache_reads_and_never_writes_or_removes(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    writer = make_cache(only_tier("nvme"), root=root)
    writer.put("a", kv(1))
    consumer = make_cache(only_tier("nvme"), root=root, read_only=True)
    assert_same(consumer["a"], kv(1))
    with pytest.raises(tiercache.CapacityError):
        consumer.put("b", kv(2))  # nvme is the only tier: a read-only cache cannot take it
    with pytest.raises(tiercache.StorageError, match="read-only"):
        consumer.delete("a")
    assert "a" in writer and "a" in consumer
    with pytest.raises(tiercache.EntryValueError, match="read_only"):
        tiercache.TierCache(root=None, read_only=True)


def test_a_killed_members_leases_and_reservations_are_recovered(tmp_path: Path) -> None:
    root = tmp_path / "root"
    pol = only_tier("nvme", capacity=4 * 1024 * KiB)
    with tiercache.TierCache(root=root, policy=pol) as cache:
        cache.put("a", kv(1, 512 * KiB))
        index = sqlite3.connect(root / "index.sqlite3")
        # A process that holds a lease on "a" and a reservation of 3 MiB, then dies without a word.
        script = (
            "import sqlite3, sys, time, os, fcntl\n"
            f"root = {str(root)!r}\n"
            "token = f'{os.getpid()}-dead'\n"
            "fd = os.open(f'{root}/members/{token}.lock', os.O_CREAT | os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "db = sqlite3.connect(f'{root}/index.sqlite3', isolation_level=None)\n"
            "name = db.execute(\"SELECT name FROM entries WHERE key = 'a'\").fetchone()[0]\n"
            "db.execute('INSERT INTO members VALUES (?, ?, ?, 0, 0, ?)', (token, os.getpid(), 'here', 1 << 40))\n"
            "db.execute('INSERT INTO leases VALUES (?, ?, 1)', (name, token))\n"
            "db.execute('INSERT INTO reservations VALUES (?, ?, ?, ?)', ('x-staging', token, 'b', 3 << 20))\n"
            "os.mkdir(f'{root}/tmp/x-staging')\n"
            "open(f'{root}/index.sqlite3-signal', 'r+b').write(os.urandom(8))\n"  # as a member does after a commit
            "print('held', flush=True); time.sleep(60)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        time.sleep(1.1)  # past the sweep interval: the next call looks at the members
        assert cache.stats().tiers["nvme"].used >= 3 * 1024 * KiB  # alive: its reservation counts
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cache.delete("a")  # leased by the dead process: its files would stay while the lease lived
        time.sleep(1.1)  # past the sweep interval again
        cache.put("c", kv(2, 64 * KiB))  # starts a sweep (on the layout's remover thread): the dead member goes
        deadline = time.monotonic() + 10
        while index.execute("SELECT COUNT(*) FROM leases").fetchone()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        cache.keys()  # takes in what the sweep committed
        assert index.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
        assert index.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
        assert not (root / "tmp" / "x-staging").exists()
        assert cache.stats().tiers["nvme"].used == 64 * KiB
        names = [p.name for p in (root / "entries").iterdir() if p.is_dir()]
        assert len(names) == 1, names  # "a" is gone from disk too
        index.close()


def test_stage_two_reads_what_stage_one_commits_while_it_writes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with tiercache.TierCache(root=root, policy=only_tier("nvme")):
        pass  # the root exists before the reader joins
    count = 20
    reader = spawn("reader", root, count, 60)
    wait_ready(reader)
    writer = spawn("writer", root, count)
    finish(writer)
    assert finish(reader).strip().endswith(f"ok {count}")


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized")  # zarr, listing an entry as it leaves
def test_zarr_readers_never_see_a_removed_entry_as_zeros(tmp_path: Path) -> None:
    """A cache replaces and deletes entries as fast as it can while zarr-python reads them: a read may fail
    (the entry left), but every array that reads returns its real values."""
    root = tmp_path / "root"
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            graced = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"removal_grace_s": 1}})
            with tiercache.TierCache(root=root, policy=graced) as cache:
                version = 0
                while not stop.is_set():
                    version += 1
                    key = f"z{version % 4}"
                    cache.put(key, stamp(key, version, 4 * KiB))
                    if version % 3 == 0:
                        cache.delete(key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=churn)
    thread.start()
    good = failed = 0
    deadline = time.monotonic() + 4
    try:
        while time.monotonic() < deadline:
            try:
                group = zarr.open_group(root / "entries", mode="r")
                for name in list(group.group_keys()):
                    entry = group[name]
                    manifest = entry.attrs["tiercache"]
                    arrays = {t["name"]: np.asarray(entry[t["array"]][...]) for t in manifest["tensors"]}
                    check(manifest["key"], {n: torch.from_numpy(a) for n, a in arrays.items()})
                    good += 1
            except (KeyError, FileNotFoundError, OSError, ValueError) as exc:
                if isinstance(exc, AssertionError):
                    raise
                failed += 1
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert good > 20, f"only {good} entries read ({failed} reads failed as the entry left)"


def test_four_processes_at_random_with_kills_tear_nothing_and_hold_the_budget(tmp_path: Path) -> None:
    root = tmp_path / "root"
    seconds = 60.0 if SLOW else 8.0
    with tiercache.TierCache(root=root, policy=chaos_policy(), device="cpu"):
        pass
    rng = random.Random(7)
    workers = {i: spawn("chaos", root, i, seconds) for i in range(4)}
    for proc in workers.values():
        wait_ready(proc)
    index = sqlite3.connect(f"file:{root / 'index.sqlite3'}?mode=ro", uri=True)
    peak, kills, seed = 0, 0, 100
    deadline = time.monotonic() + seconds
    next_kill = time.monotonic() + rng.uniform(0.5, 1.5)
    while time.monotonic() < deadline:
        peak = max(peak, index.execute(BUDGET_SQL).fetchone()[0])
        if time.monotonic() >= next_kill:  # kills land anywhere: in a put, a read, a sweep, or while opening
            victim = rng.randrange(4)
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].communicate()
            kills += 1
            seed += 1
            workers[victim] = spawn("chaos", root, seed, max(1.0, deadline - time.monotonic()))
            next_kill = time.monotonic() + rng.uniform(0.3, 1.2)
        time.sleep(0.01)
    outputs = [finish(proc) for proc in workers.values()]
    index.close()
    assert kills >= 3 and peak <= NVME_CAPACITY, (kills, peak)
    assert all("ok put=" in out for out in outputs), outputs
    with tiercache.TierCache(root=root, policy=chaos_policy(), device="cpu") as cache:
        for key in cache.keys():
            check(key, cache[key])  # every entry left is one whole version of its key
        assert cache.stats().tiers["nvme"].used <= NVME_CAPACITY
    db = sqlite3.connect(root / "index.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0  # the dead members' leases recovered
    assert db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM members").fetchone()[0] == 0
    db.close()


def test_a_root_spelled_two_ways_in_one_process_keeps_both_members_alive(tmp_path: Path) -> None:
    """Caches of one process on one root through a symlink: probing (stats, sweeps) never opens a lock file this
    process holds, which would drop that member's lock and let others recover it as dead."""
    real = tmp_path / "root"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    with (
        tiercache.TierCache(root=alias, policy=only_tier("nvme")) as first,
        tiercache.TierCache(root=real, policy=only_tier("nvme")) as second,
    ):
        second.put("a", kv(1))
        first.stats()
        time.sleep(1.1)  # past the sweep interval
        assert "a" in first
        probe = (
            "import fcntl, os, sys\n"
            "for name in os.listdir(sys.argv[1]):\n"
            "    fd = os.open(os.path.join(sys.argv[1], name), os.O_RDONLY)\n"
            "    try:\n"
            "        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)\n"
            "        print('free', name)\n"
            "    except OSError:\n"
            "        print('held', name)\n"
        )
        out = subprocess.run([sys.executable, "-c", probe, str(real / "members")], capture_output=True, text=True)
        assert out.stdout.split().count("held") == 2, out.stdout


def test_a_full_shared_tier_evicts_without_waiting_for_the_grace_period(tmp_path: Path) -> None:
    graced = policy(
        tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 200 * KiB, "removal_grace_s": 5}}
    )
    with tiercache.TierCache(root=tmp_path / "root", policy=graced) as cache:
        start = time.monotonic()
        for i in range(8):
            cache.put(f"e{i}", kv(i))  # from the fourth on, each evicts the oldest
        assert time.monotonic() - start < 3
        assert cache.stats().tiers["nvme"].used <= 200 * KiB and len(cache) == 3


def test_a_delete_by_another_cache_removes_this_caches_memory_copy_too(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = make_cache(policy(), root=root)
    second = make_cache(policy(), root=root)
    first.put("k", kv(1), write_through=True)  # in hbm and nvme
    second.delete("k")
    assert "k" not in first and first.get("k") is None
    first.close()  # its flush must not bring the key back
    assert "k" not in second


def test_a_late_demotion_of_an_older_version_never_replaces_a_newer_one(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = make_cache(policy(), root=root)
    second = make_cache(policy(), root=root)
    first.put("k", kv(1))  # version 1, in first's memory only
    second.put("k", kv(2), write_through=True)  # version 2, committed later, on nvme
    first.flush("k")  # version 1 reaches nvme after version 2: superseded, never served
    third = make_cache(only_tier("nvme"), root=root)
    assert_same(third["k"], kv(2))
    assert_same(first["k"], kv(2))  # first took in the newer version as well


def test_the_budget_of_a_shared_root_is_the_smallest_members(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    small = make_cache(only_tier("nvme", capacity=256 * KiB), root=root)
    large = make_cache(only_tier("nvme", capacity=1024 * KiB), root=root)
    for i in range(8):
        large.put(f"e{i}", kv(i))
    assert large.stats().tiers["nvme"].capacity == 256 * KiB
    assert large.stats().tiers["nvme"].used <= 256 * KiB and small.stats().tiers["nvme"].used <= 256 * KiB
    small.close()
    large.put("more", kv(9))
    assert large.stats().tiers["nvme"].capacity == 1024 * KiB  # the smaller member left


def test_a_cache_with_its_nvme_tier_off_is_no_member_of_the_root(make_cache: Any, tmp_path: Path) -> None:
    """Capacity 0 is off: such a cache neither joins the root's index (which would take the root's budget, the
    smallest member's, to 0 for every other cache) nor creates the root; and it cannot be given a budget later."""
    root = tmp_path / "root"
    host_only = make_cache(policy(tiers={"nvme": {"capacity": 0}}), root=root)
    host_only.put("in-memory", kv(0))
    assert not root.exists()
    disk = make_cache(only_tier("nvme", capacity=1024 * KiB), root=root)
    disk.put("on-disk", kv(1))
    assert disk.stats().tiers["nvme"].capacity == 1024 * KiB
    assert "on-disk" not in host_only  # it does not read the root either
    with pytest.raises(tiercache.EntryValueError, match=r"nvme tier is off in this cache.*tiers\.nvme"):
        host_only.set_capacity("nvme", 1024 * KiB)
    assert host_only.stats().tiers["nvme"].capacity == 0
    assert_same(host_only["in-memory"], kv(0))


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_that_exits_leaves_its_parents_temporary_root(tmp_path: Path) -> None:
    cache = tiercache.TierCache(policy=policy())
    try:
        pid = os.fork()
        if pid == 0:  # the child lets go of its copy of the cache, as its exit would: the finalizer runs here
            del cache
            gc.collect()
            os._exit(0)
        os.waitpid(pid, 0)
        assert cache.root.exists()
        cache.put("a", kv(1), write_through=True)
    finally:
        cache.close()


def test_a_newer_version_from_another_cache_keeps_this_caches_pins(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = make_cache(only_tier("nvme"), root=root)
    second = make_cache(only_tier("nvme"), root=root)
    first.put("k", kv(1))
    first.pin("k")
    second.put("k", kv(2))
    assert_same(first["k"], kv(2))
    assert first.info("k").pins == 1  # as a put of a new version would, the pin carried over
    first.unpin("k")


def test_a_write_through_replacement_that_fails_keeps_the_old_version_for_every_cache(
    make_cache: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new version's nvme copy commits first (marking the old one replaced for every cache); when its memory
    copy then fails, the old version is made live again, here, in the other cache and after a reopen."""
    from tiercache.tiers.hbm import HbmTier

    root = tmp_path / "root"
    graced = policy(tiers={"host": {"capacity": 0}, "nvme": {"removal_grace_s": 5}})
    first = make_cache(graced, root=root)
    second = make_cache(only_tier("nvme"), root=root)
    first.put("k", kv(1), write_through=True)

    def refuse(tier: HbmTier, tensors: Any, device: Any, copy: bool) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(HbmTier, "_copy_in", refuse)
    with pytest.raises(tiercache.CapacityError):
        first.put("k", kv(2), write_through=True)
    monkeypatch.undo()
    assert_same(first.get("k", device="cpu"), kv(1))
    assert_same(second["k"], kv(1))
    first.close()
    second.close()
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as reopened:
        assert_same(reopened["k"], kv(1))


def test_a_stream_keeps_its_entry_when_another_cache_deletes_it_half_way(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    reader = make_cache(only_tier("nvme"), root=root)
    other = make_cache(only_tier("nvme"), root=root)
    entry = {f"layer{i}": torch.full((4096,), float(i)) for i in range(6)}
    reader.put("kv", entry)
    got = {}
    for index, (name, tensor) in enumerate(reader.stream("kv", lookahead=1)):
        got[name] = tensor.clone()
        if index == 1:
            other.delete("kv")  # the stream's lease keeps every chunk until it ends
            assert "kv" not in reader
    assert_same(got, entry)
    assert other.stats().tiers["nvme"].used == 0  # and once it ended, its bytes left the budget


def test_removed_files_go_on_a_thread_of_their_own_and_close_waits_for_them(tmp_path: Path) -> None:
    """Unlinking a removed entry's files (about 0.2 s for 1 GiB here) is out of the way of every call: a delete and
    the sweep a later get runs return while the removal is held; close() finishes it."""
    disk = HeldRemoval()
    root = tmp_path / "root"
    with tiercache.TierCache(root=root, policy=only_tier("nvme", 1 << 20), files=disk) as cache:
        cache.put("gone", kv(1))
        cache.put("kept", kv(2))
        start = time.monotonic()
        cache.delete("gone")
        assert_same(cache.get("kept"), kv(2))
        cache.put("new", kv(3))
        assert time.monotonic() - start < 5, "a call waited for the held removal"
        assert disk.held and "gone" not in cache
        assert list((root / "trash").iterdir()), "the removal was not held: the test shows nothing"
        disk.release()
    assert list((root / "trash").iterdir()) == []
    with tiercache.TierCache(root=root, policy=only_tier("nvme", 1 << 20)) as reopened:
        assert sorted(reopened.keys()) == ["kept", "new"]


def test_a_commit_that_never_signalled_is_seen_within_the_fallback(
    make_cache: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member killed between its commit and its change signal: the others still see the commit, from SQLite, once
    the fallback interval has passed; a commit that did signal is seen at once."""
    from tiercache.tiers.nvme import index  # noqa: PLC0415 - the seam under test

    root = tmp_path / "root"
    first = make_cache(only_tier("nvme"), root=root)
    second = make_cache(only_tier("nvme"), root=root)
    first.put("signalled", kv(1))
    assert "signalled" in second  # seen at once
    monkeypatch.setattr(index.ChangeSignal, "signal", lambda self: None)  # commits from now on leave no signal
    first.put("silent", kv(2))
    monkeypatch.setattr(index, "FALLBACK_S", 1e9)
    assert "silent" not in second  # nothing moved: SQLite is not asked
    monkeypatch.setattr(index, "FALLBACK_S", 0.0)
    assert_same(second["silent"], kv(2))


def test_a_read_only_member_without_the_signal_file_still_sees_changes(make_cache: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    writer = make_cache(only_tier("nvme"), root=root)
    writer.put("a", kv(1))
    (root / "index.sqlite3-signal").unlink()  # a root written by a tiercache without it
    consumer = make_cache(only_tier("nvme"), root=root, read_only=True)
    assert_same(consumer["a"], kv(1))
    writer.put("b", kv(2))  # recreates nothing in the consumer's view: it asks SQLite at every get
    assert_same(consumer["b"], kv(2))


def test_an_entry_another_cache_uses_on_nvme_outlives_this_caches_ttl(tmp_path: Path) -> None:
    """ttl_s counts every member's uses of a shared copy: one cache's expiry never removes what another reads."""
    root, ttl = tmp_path / "root", 2.0
    nvme = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}}, eviction={"ttl_s": ttl})
    with (
        tiercache.TierCache(root=root, policy=nvme) as first,
        tiercache.TierCache(root=root, policy=only_tier("nvme")) as other,
    ):
        start = time.monotonic()
        first.put("k", kv(1))
        time.sleep(max(0.0, start + 1.0 - time.monotonic()))
        assert_same(other.get("k"), kv(1))  # read from nvme: its row records this use
        time.sleep(max(0.0, start + ttl + 0.5 - time.monotonic()))
        assert "k" in first and first.stats().expired == 0  # unused here past the ttl, used by the other within it
        time.sleep(max(0.0, start + 1.0 + ttl + 0.5 - time.monotonic()))
        assert "k" not in first and first.stats().expired == 1  # nobody used it within the ttl
        assert "k" not in other  # removed for every member


def test_a_read_only_cache_past_its_ttl_lets_go_of_its_memory_copy_and_still_serves_the_entry(tmp_path: Path) -> None:
    clock = FakeClock()
    root = tmp_path / "root"
    reader_policy = policy(tiers={"hbm": {"capacity": 0}}, eviction={"ttl_s": 60})
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as writer:
        writer.put("k", kv(1))
        with tiercache.TierCache(root=root, policy=reader_policy, read_only=True, clock=clock) as reader:
            assert_same(reader.get("k"), kv(1))
            assert reader.info("k").tiers == ("host", "nvme")  # promoted into its own memory
            clock.now += 61
            assert "k" in reader and reader.info("k").tiers == ("nvme",)
            assert_same(reader.get("k"), kv(1))
            assert reader.stats().expired == 0
        assert "k" in writer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyManifests(FileOps):
    """Reads of entries' manifests fail with EIO while `failing` is set."""

    def __init__(self) -> None:
        self.failing = threading.Event()

    def read_bytes(self, path: StrPath) -> bytes:
        target = Path(path)
        if self.failing.is_set() and target.name == "zarr.json" and target.parent.parent.name == "entries":
            raise os_error(errno.EIO, "a manifest's read")
        return super().read_bytes(path)


def test_an_entry_whose_manifest_could_not_be_read_is_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, files = tmp_path / "root", FlakyManifests()
    with (
        tiercache.TierCache(root=root, policy=only_tier("nvme"), files=files) as reader,
        tiercache.TierCache(root=root, policy=only_tier("nvme")) as writer,
    ):
        files.failing.set()
        writer.put("k", kv(1))
        assert "k" not in reader and "skipping entry" in caplog.text
        files.failing.clear()
        wait_for(lambda: "k" in reader)  # without a reopen, and with nothing else committed meanwhile
        assert_same(reader.get("k"), kv(1))


def test_a_full_shared_nvme_evicts_by_every_members_uses(tmp_path: Path) -> None:
    root, size = tmp_path / "root", 64 * KiB
    nvme = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 2 * size}})
    with tiercache.TierCache(root=root, policy=nvme) as writer, tiercache.TierCache(root=root, policy=nvme) as other:
        writer.put("first", kv(1, size))
        writer.put("second", kv(2, size))
        assert_same(other.get("first"), kv(1, size))  # the oldest here, but just used by the other member
        writer.put("third", kv(3, size))
        assert sorted(writer.keys()) == ["first", "third"]
        assert sorted(other.keys()) == ["first", "third"]
