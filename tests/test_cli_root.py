"""`tiercache ls / info / verify / gc / du / stats` on a root (docs/cli.md): built with the public API, read while
caches in this process and others use it, tidied by gc without disturbing them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import KiB, MiB, assert_same, kv, only_tier

import tiercache
from tiercache.tools.cli import main

WORKER = Path(__file__).resolve().parent / "shared_worker.py"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
READ_ONLY = (["ls"], ["ls", "--json"], ["info", "a"], ["verify"], ["du"], ["du", "--json"], ["stats"])


def build(root: Path, **entries: int) -> dict[str, dict[str, Any]]:
    """A root holding entries of these keys and sizes, written through the public API (the cache closed)."""
    tensors = {key: kv(seed, nbytes) for seed, (key, nbytes) in enumerate(entries.items())}
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
        for key, value in tensors.items():
            cache.put(key, value)
    return tensors


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def entry_dir(root: Path, key: str) -> Path:
    db = sqlite3.connect(f"file:{root / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        (name,) = db.execute("SELECT name FROM entries WHERE key = ? AND doomed_ns IS NULL", (key,)).fetchone()
    finally:
        db.close()
    return root / "entries" / name


def flip_a_chunk_byte(root: Path, key: str) -> Path:
    chunk = entry_dir(root, key) / "t0" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x01
    chunk.write_bytes(bytes(data))
    return chunk


def fingerprint(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every file's size, mtime and contents and every directory's mtime (a file made and removed moves it), but
    SQLite's -shm (shared memory readers mark their snapshots in)."""
    found: dict[str, tuple[Any, ...]] = {}
    for path in [root, *root.rglob("*")]:
        if path.name.endswith("-shm"):
            continue
        st = path.stat()
        if path.is_dir():
            found[str(path)] = ("dir", st.st_mtime_ns)
        else:
            found[str(path)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def member_holding(root: Path, key: str, staging: str = "x-staging") -> tuple[subprocess.Popen[str], str]:
    """A process joins the root by hand (lock file, member row), leases `key` and reserves room for a write with a
    staging directory (tmp/`staging`); it stays until killed. Returns it and its token."""
    script = (
        "import sqlite3, time, os, fcntl\n"
        f"root = {str(root)!r}\n"
        "token = f'{os.getpid()}-held'\n"
        "fd = os.open(f'{root}/members/{token}.lock', os.O_CREAT | os.O_RDWR)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "db = sqlite3.connect(f'{root}/index.sqlite3', isolation_level=None)\n"
        f"name = db.execute('SELECT name FROM entries WHERE key = ? AND doomed_ns IS NULL', ({key!r},)).fetchone()[0]\n"
        "db.execute('INSERT INTO members VALUES (?, ?, ?, 0, 0, ?)', (token, os.getpid(), 'here', 1 << 40))\n"
        "db.execute('INSERT INTO leases VALUES (?, ?, 1)', (name, token))\n"
        f"staging = {staging!r}\n"
        "db.execute('INSERT INTO reservations VALUES (?, ?, ?, ?)', (staging, token, 'w', 1 << 20))\n"
        "os.makedirs(f'{root}/tmp/{staging}/t0')\n"
        "open(f'{root}/tmp/{staging}/t0/zarr.json', 'w').write('{}')\n"
        "print(token, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    token = proc.stdout.readline().strip()
    assert token.endswith("-held")
    return proc, token


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def index_count(root: Path, table: str) -> int:
    db = sqlite3.connect(f"file:{root / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


# ---- ls, info -------------------------------------------------------------------------------------------------
def test_ls_lists_every_live_entry_by_key_with_size_tensors_age_uses_and_leases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    build(root, b=128 * KiB, a=64 * KiB, c=32 * KiB)
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
        cache.get("a")
        cache.get("a")
        cache.delete("c")  # removed: not listed
    code, out, _ = run(capsys, "ls", "--json", root)
    assert code == 0
    entries = json.loads(out)
    assert [e["key"] for e in entries] == ["a", "b"]
    a, b = entries
    assert (a["nbytes"], a["tensors"], a["uses"], a["leased"], a["leases"]) == (64 * KiB, 2, 2, False, 0)
    assert (b["nbytes"], b["tensors"], b["uses"]) == (128 * KiB, 2, 0)
    assert 0 <= a["age_s"] < 60 and a["written_ns"] <= time.time_ns() and a["name"] == entry_dir(root, "a").name
    code, out, _ = run(capsys, "ls", root)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["SIZE", "TENSORS", "AGE", "USES", "LEASED", "KEY"]
    assert lines[1].split()[:2] == ["64", "KiB"] and lines[1].split()[-3:] == ["2", "no", "a"]
    assert lines[2].endswith(" b") and len(lines) == 3


def test_ls_prefix_lists_one_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
        for key in ("tenant7/req1", "tenant7/req2", "tenant8/req1"):
            cache.put(key, kv(1))
    code, out, _ = run(capsys, "ls", "--json", "--prefix", "tenant7/", root)
    assert code == 0 and [e["key"] for e in json.loads(out)] == ["tenant7/req1", "tenant7/req2"]


def test_ls_shows_a_lease_only_while_its_member_lives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    build(root, a=64 * KiB, b=64 * KiB)
    proc, _ = member_holding(root, "a")
    try:
        code, out, _ = run(capsys, "ls", "--json", root)
        assert code == 0
        assert [(e["key"], e["leased"], e["leases"]) for e in json.loads(out)] == [("a", True, 1), ("b", False, 0)]
        code, out, _ = run(capsys, "ls", root)
        assert out.splitlines()[1].split()[-2:] == ["yes", "a"]
    finally:
        kill(proc)
    code, out, _ = run(capsys, "ls", "--json", root)  # its lease row stays until recovered: it no longer counts
    assert [e["leased"] for e in json.loads(out)] == [False, False]


def test_ls_on_a_root_without_its_index_lists_the_manifests_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    build(root, a=64 * KiB, b=64 * KiB)
    (root / "index.sqlite3").unlink()
    code, out, err = run(capsys, "ls", "--json", root)
    assert code == 0 and "no index" in err
    assert [(e["key"], e["tensors"], e["uses"], e["leased"]) for e in json.loads(out)] == [
        ("a", 2, None, None),
        ("b", 2, None, None),
    ]
    code, _, err = run(capsys, "stats", root)
    assert code == 2 and str(root / "index.sqlite3") in err and "no index" in err


def test_a_missing_root_or_one_that_is_not_a_root_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["ls"], ["info", "k"], ["verify"], ["gc"], ["gc", "--dry-run"], ["du"], ["stats"]):
        code, out, err = run(capsys, *_argv(argv, tmp_path / "nowhere"))
        assert code == 2 and out == "" and f"{tmp_path / 'nowhere'}: no such directory" in err, argv
    (tmp_path / "plain").mkdir()
    code, _, err = run(capsys, "verify", tmp_path / "plain")
    assert code == 2 and "has no index" in err and str(tmp_path / "plain") in err
    (tmp_path / "plain" / "index.sqlite3").write_bytes(b"not a database" * 100)
    code, _, err = run(capsys, "ls", tmp_path / "plain")
    assert code == 2 and "cannot be read as a tiercache index" in err


def test_info_describes_one_entry_and_a_miss_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    tensors = build(root, a=64 * KiB, b=32 * KiB)
    code, out, _ = run(capsys, "info", "--json", root, "a")
    assert code == 0
    info = json.loads(out)
    assert info["directory"] == str(entry_dir(root, "a")) and info["nbytes"] == 64 * KiB and info["uses"] == 0
    assert info["leases"] == [] and info["problem"] is None
    manifest = json.loads((entry_dir(root, "a") / "zarr.json").read_text())["attributes"]["tiercache"]
    assert [(t["name"], t["dtype"], t["shape"], t["nbytes"], t["crc32c"]) for t in info["tensors"]] == [
        (t["name"], t["dtype"], t["shape"], t["nbytes"], t["crc32c"]) for t in manifest["tensors"]
    ]
    assert [t["name"] for t in info["tensors"]] == list(tensors["a"])
    code, out, _ = run(capsys, "info", root, "a")
    assert code == 0 and "directory  " + str(entry_dir(root, "a")) in out
    assert f"{manifest['tensors'][0]['crc32c']:#010x}" in out and "float32" in out and "leases     none" in out
    code, out, err = run(capsys, "info", root, "missing")
    assert code == 1 and out == "" and f"key 'missing' is not in {root} (2 entries" in err


# ---- verify ---------------------------------------------------------------------------------------------------
def test_verify_passes_a_sound_root_and_names_an_entry_with_a_flipped_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    build(root, a=64 * KiB, b=64 * KiB, c=0 + 4 * KiB)
    code, out, _ = run(capsys, "verify", root)
    assert code == 0 and "verified 3 entries" in out and "3 good" in out
    chunk = flip_a_chunk_byte(root, "b")
    code, out, _ = run(capsys, "verify", root)
    assert code != 0 and "2 good" in out
    (line,) = [line for line in out.splitlines() if line.startswith("damaged:")]
    assert line.startswith(f"damaged: b ({chunk.parents[2]})") and "fails its checksum" in line and str(chunk) in line
    # a manifest edited by hand fails its seal
    meta = entry_dir(root, "a") / "zarr.json"
    meta.write_text(meta.read_text().replace('"float32"', '"float16"'))
    code, out, _ = run(capsys, "verify", root)
    assert code != 0 and "damaged: a (" in out and "manifest_sha256" in out


def test_verify_finds_a_truncated_chunk_and_a_missing_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    build(root, a=64 * KiB, b=64 * KiB)
    (entry_dir(root, "a") / "t1" / "c" / "0").unlink()
    with open(entry_dir(root, "b") / "t0" / "c" / "0", "r+b") as f:
        f.truncate(100)
    code, out, _ = run(capsys, "verify", root)
    assert code == 1 and "damaged: a (" in out and "damaged: b (" in out and "0 good" in out


# ---- gc -------------------------------------------------------------------------------------------------------
def test_gc_dry_run_lists_everything_it_would_remove_and_gc_removes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    tensors = build(root, a=64 * KiB, b=64 * KiB, c=64 * KiB, d=32 * KiB)
    proc, token = member_holding(root, "a")
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
        cache.delete("a")  # leased by the other member: its files stay
    kill(proc)  # dead now, and no cache has swept since
    dead_staging = root / "tmp" / "x-staging"
    assert (root / "members" / f"{token}.lock").exists() and dead_staging.exists()
    damaged = flip_a_chunk_byte(root, "b").parents[2]
    c_dir = entry_dir(root, "c")
    older = root / "entries" / f"{c_dir.name[:32]}-{'0' * 16}"  # c's manifest under another name: not indexed
    shutil.copytree(c_dir, older)
    bare = root / "entries" / f"{'e' * 32}-{'1' * 16}"  # an entry directory without its manifest
    (bare / "t0" / "c").mkdir(parents=True)
    (bare / "t0" / "c" / "0").write_bytes(b"x" * 1000)
    stale = root / "tmp" / f"{'f' * 32}-{'2' * 16}"  # staging no reservation names
    (stale / "t0").mkdir(parents=True)
    (stale / "t0" / "zarr.json").write_text("{}")
    (root / "trash" / "left").mkdir()
    (root / "trash" / "left" / "f").write_bytes(b"y" * 10)

    before = fingerprint(root)
    code, out, _ = run(capsys, "gc", "--dry-run", "--json", "--grace", "0", root)
    assert code == 0 and fingerprint(root) == before  # nothing changed
    plan = json.loads(out)
    assert plan["dry_run"] is True
    kinds = {(a["kind"], a["path"]) for a in plan["actions"]}
    assert kinds == {
        ("member", str(root / "members" / f"{token}.lock")),
        ("removed", str(root / "entries" / [a for a in plan["actions"] if a["kind"] == "removed"][0]["name"])),
        ("damaged", str(damaged)),
        ("older", str(older)),
        ("withdrawn", str(bare)),
        ("tmp", str(dead_staging)),
        ("tmp", str(stale)),
        ("trash", str(root / "trash" / "left")),
    }
    by_kind = {a["kind"]: a for a in plan["actions"]}
    assert by_kind["removed"]["key"] == "a" and by_kind["damaged"]["key"] == "b"
    assert "fails its checksum" in by_kind["damaged"]["why"] and "dead member" in by_kind["member"]["why"]
    assert by_kind["withdrawn"]["nbytes"] == 1000 and by_kind["trash"]["nbytes"] == 10
    assert plan["freed"] == sum(a["nbytes"] for a in plan["actions"]) > 64 * KiB * 3
    code, out, _ = run(capsys, "gc", "--dry-run", "--grace", "0", root)
    assert code == 0 and "would remove [damaged]" in out and str(damaged) in out and "dry run: would free" in out
    assert fingerprint(root) == before

    code, out, _ = run(capsys, "gc", "--dry-run", "--grace", "3600", root)
    assert code == 0 and "would remove [removed]" not in out and "key 'a': removed, inside its grace period" in out
    code, out, _ = run(capsys, "gc", "--grace", "0", root)
    assert code == 0, out
    assert "removed [damaged]" in out and "key 'b'" in out and str(damaged) in out and "freed 8 item(s)" in out
    for path in (
        damaged,
        older,
        bare,
        stale,
        dead_staging,
        root / "trash" / "left",
        root / "members" / f"{token}.lock",
    ):
        assert not path.exists(), path
    assert list((root / "tmp").iterdir()) == [] and list((root / "trash").iterdir()) == []
    assert list((root / "members").iterdir()) == []  # gc left too
    for table, count in (("members", 0), ("leases", 0), ("reservations", 0), ("entries", 2)):
        assert index_count(root, table) == count, table
    assert sorted(p.name for p in (root / "entries").iterdir() if p.is_dir()) == sorted(
        [c_dir.name, entry_dir(root, "d").name]
    )
    code, out, _ = run(capsys, "gc", root)
    assert code == 0 and out.strip() == "nothing to remove"
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
        assert sorted(cache.keys()) == ["c", "d"]
        assert_same(cache["c"], tensors["c"])
        assert_same(cache["d"], tensors["d"])
    assert run(capsys, "verify", root)[0] == 0


def test_gc_keeps_an_entry_of_another_format_version_and_one_not_yet_indexed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    build(root, a=64 * KiB)
    a_dir = entry_dir(root, "a")
    other = root / "entries" / f"{'a' * 32}-{'3' * 16}"
    shutil.copytree(a_dir, other)
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["tiercache"]["version"] = 3
    (other / "zarr.json").write_text(json.dumps(meta))
    # "z" written by a cache whose commit never happened: whole on disk, not in the index
    build(tmp_path / "elsewhere", z=16 * KiB)
    unlisted = entry_dir(tmp_path / "elsewhere", "z")
    shutil.copytree(unlisted, root / "entries" / unlisted.name)
    # a write whose commit failed, in entries/ while its writer (alive) takes it back: its reservation names it
    build(tmp_path / "third", w=16 * KiB)
    failed = entry_dir(tmp_path / "third", "w")
    shutil.copytree(failed, root / "entries" / failed.name)
    proc, _ = member_holding(root, "a", staging=failed.name)
    try:
        code, out, _ = run(capsys, "gc", root)
    finally:
        kill(proc)
    assert code == 0
    assert f"kept {other}" in out and "version" in out and f"kept {root / 'entries' / unlisted.name}" in out
    assert f"kept {root / 'entries' / failed.name}: a write whose commit failed" in out
    assert other.exists() and (root / "entries" / unlisted.name).exists() and a_dir.exists()
    assert (root / "entries" / failed.name).exists()


def test_gc_takes_a_damaged_entry_out_of_a_cache_that_serves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    tensors = build(root, a=64 * KiB, b=64 * KiB)
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
        flip_a_chunk_byte(root, "a")
        code, out, _ = run(capsys, "gc", root)
        assert code == 0 and "removed [damaged]" in out and "key 'a'" in out
        assert cache.get("a") is None  # the cache learnt of the removal from the index
        assert_same(cache["b"], tensors["b"])


def test_gc_runs_safely_while_other_processes_put_get_and_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    build(root, seed=4 * KiB)
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "chaos", str(root), str(seed), "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for seed in (1, 2)
    ]
    for proc in workers:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    runs = 0
    while any(proc.poll() is None for proc in workers):
        code, out, err = run(capsys, "gc", "--grace", "0", "--lock-timeout", "60", root)
        assert code == 0, out + err
        assert "damaged" not in out, out  # every entry the workers write verifies
        runs += 1
    for proc in workers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.strip().startswith("ok"), err
    assert runs >= 2
    code, out, _ = run(capsys, "verify", root)
    assert code == 0, out


# ---- du, stats ------------------------------------------------------------------------------------------------
def test_du_parts_add_up_to_every_byte_under_the_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    build(root, a=64 * KiB, b=128 * KiB, c=16 * KiB)
    proc, _ = member_holding(root, "a")  # alive: its lease and reservation count
    try:
        with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
            cache.delete("a")  # leased by the other member: removed, not yet swept
        (root / "tmp" / "stray").mkdir()
        (root / "tmp" / "stray" / "f").write_bytes(b"z" * 300)
        (root / "trash" / "t").write_bytes(b"t" * 7)
        code, out, _ = run(capsys, "du", "--json", root)
        assert code == 0
        usage = json.loads(out)
        on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        parts = ("live", "removed", "unindexed", "tmp", "trash", "index", "members", "other")
        assert sum(usage[p]["files"] for p in parts) == usage["total"]["files"] == on_disk
        assert (usage["live"]["count"], usage["live"]["payload"]) == (2, 144 * KiB)
        assert usage["live"]["payload"] < usage["live"]["files"] < usage["live"]["payload"] + 16 * KiB
        assert (usage["removed"]["count"], usage["removed"]["payload"]) == (1, 64 * KiB)
        assert usage["reservations"] == {"count": 1, "payload": 1 << 20}
        assert usage["tmp"]["count"] == 2 and usage["trash"]["files"] == 7 and usage["members"]["count"] == 1
        assert usage["counted"] == 144 * KiB + 64 * KiB + (1 << 20)  # the removed entry is still read
        assert usage["budget"] == 1 << 40  # the one open member's capacity
        code, out, _ = run(capsys, "du", root)
        assert code == 0 and "live entries" in out and "144 KiB" in out and f"({on_disk} bytes;" in out
    finally:
        kill(proc)


def test_stats_lists_the_members_alive_in_this_process_and_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    build(root, a=64 * KiB, b=32 * KiB)
    script = (
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from helpers import only_tier\n"
        "import tiercache\n"
        "with tiercache.TierCache(root=sys.argv[1], policy=only_tier('nvme'), read_only=True) as cache:\n"
        "    cache.get('a')\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script, str(root), str(WORKER.parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
            cache.get("b")
            code, out, _ = run(capsys, "stats", "--json", root)
            assert code == 0
            stats = json.loads(out)
            members = {m["pid"]: m for m in stats["members"]}
            assert set(members) == {os.getpid(), other.pid}
            assert all(m["alive"] for m in members.values())
            assert members[other.pid]["read_only"] and not members[os.getpid()]["read_only"]
            assert stats["entries"] == {"count": 2, "nbytes": 96 * KiB} and stats["uses"] == 2
            assert stats["leases"] == [] and stats["reservations"] == []
            assert stats["budget"] == 8 * MiB and {m["capacity"] for m in stats["members"]} == {8 * MiB}
            assert stats["counted"] == 96 * KiB
            code, out, _ = run(capsys, "stats", root)
            assert code == 0 and f"process {other.pid} on" in out and "read-only" in out and "2 alive" in out
    finally:
        assert other.stdin is not None
        other.stdin.write("\n")
        other.stdin.close()
        other.wait(timeout=60)
    assert other.returncode == 0
    code, out, _ = run(capsys, "stats", "--json", root)
    assert json.loads(out)["members"] == []


# ---- read-only commands change nothing ------------------------------------------------------------------------
def test_read_only_commands_leave_the_root_as_it_was_while_a_cache_uses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    tensors = build(root, a=64 * KiB, b=32 * KiB)
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
        cache.get("a")
        assert (root / "index.sqlite3-wal").exists()  # the cache holds the index open
        before = fingerprint(root)
        for argv in (*READ_ONLY, ["gc", "--dry-run"]):
            code, _, err = run(capsys, *_argv(argv, root))
            assert code == 0, (argv, err)
        assert fingerprint(root) == before
        assert_same(cache["b"], tensors["b"])  # and the cache goes on as before


def test_read_only_commands_on_a_root_nobody_has_open_create_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    build(root, a=64 * KiB)
    assert not (root / "index.sqlite3-wal").exists()
    before = fingerprint(root)
    for argv in (*READ_ONLY, ["gc", "--dry-run"]):
        code, _, err = run(capsys, *_argv(argv, root))
        assert code == 0, (argv, err)
    assert fingerprint(root) == before and not (root / "index.sqlite3-shm").exists()


def _argv(argv: list[str] | tuple[str, ...], root: Path) -> list[str]:
    """The command with ROOT in its place: after the options, before info's KEY."""
    command, *rest = argv
    if command == "info":
        return [command, str(root), *rest]
    return [command, *rest, str(root)]


def test_python_m_tiercache_ls_in_a_subprocess(tmp_path: Path) -> None:
    root = tmp_path / "root"
    build(root, b=32 * KiB, a=16 * KiB)
    done = subprocess.run(
        [sys.executable, "-m", "tiercache", "ls", str(root)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 0, done.stderr
    keys = [line.split()[-1] for line in done.stdout.splitlines()[1:]]
    assert keys == ["a", "b"]
    missing = subprocess.run(
        [sys.executable, "-m", "tiercache", "ls", str(tmp_path / "none")], capture_output=True, text=True, env=ENV
    )
    assert missing.returncode == 2 and "no such directory" in missing.stderr


def test_gc_removes_a_lock_file_no_member_names_only_once_it_is_old(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    build(root, a=16 * KiB)
    old, fresh = root / "members" / "1-old.lock", root / "members" / "2-fresh.lock"
    old.write_text("1 here\n")
    fresh.write_text("2 here\n")  # a joiner may have just made it, and not locked it yet
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    code, out, _ = run(capsys, "gc", root)
    assert code == 0 and "removed [lock]" in out and str(old) in out and str(fresh) not in out
    assert not old.exists() and fresh.exists()


def test_gc_no_verify_finds_damage_in_the_manifests_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    build(root, a=16 * KiB, b=16 * KiB)
    flip_a_chunk_byte(root, "a")  # found only by reading the chunk
    with open(entry_dir(root, "b") / "t0" / "c" / "0", "r+b") as f:
        f.truncate(100)  # found from the manifest's sizes
    code, out, _ = run(capsys, "gc", "--dry-run", "--no-verify", "--json", root)
    assert code == 0
    assert [(a["kind"], a["key"]) for a in json.loads(out)["actions"]] == [("damaged", "b")]
    code, out, _ = run(capsys, "gc", "--dry-run", "--json", root)
    assert sorted((a["kind"], a["key"]) for a in json.loads(out)["actions"]) == [("damaged", "a"), ("damaged", "b")]
