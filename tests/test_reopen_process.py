"""Entries that reached nvme are found by a new process, including after the writer died without closing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import assert_same, kv

import tiercache

POLICY = """
name = "reopen"
[tiers.hbm]
capacity = "100KiB"
[tiers.host]
capacity = "100KiB"
[tiers.nvme]
capacity = "16MiB"
"""

WRITER = """
import json, os, sys
sys.path.insert(0, {tests!r})
import tiercache
from helpers import kv
cache = tiercache.TierCache(root={root!r}, policy={policy!r})
for i in range(6):
    cache.put(f"e{{i}}", kv(i))
print(json.dumps({{k: cache.info(k).tiers for k in cache.keys()}}))
sys.stdout.flush()
{ending}
"""


def run_writer(tmp_path: Path, ending: str) -> dict[str, list[str]]:
    policy_file = tmp_path / "reopen.toml"
    policy_file.write_text(POLICY)
    code = WRITER.format(
        tests=str(Path(__file__).parent), root=str(tmp_path / "root"), policy=str(policy_file), ending=ending
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_process_finds_every_entry_after_a_close(tmp_path: Path) -> None:
    where = run_writer(tmp_path, ending="cache.close()")
    on_disk = sorted(k for k, tiers in where.items() if "nvme" in tiers)
    assert on_disk == ["e0", "e1", "e2", "e3"]  # 64 KiB each: hbm and host hold one each, the rest went to nvme
    with tiercache.TierCache(root=tmp_path / "root", policy=tmp_path / "reopen.toml") as cache:
        assert sorted(cache.keys()) == sorted(where)  # and close() wrote the two in memory down
        for key in where:
            assert cache.tier_of(key) == "nvme"
            assert_same(cache.get(key), kv(int(key[1:])))


def test_a_process_that_dies_leaves_only_what_reached_nvme(tmp_path: Path) -> None:
    where = run_writer(tmp_path, ending="os._exit(0)")  # no close(): nothing in memory is written down
    on_disk = sorted(k for k, tiers in where.items() if "nvme" in tiers)
    with tiercache.TierCache(root=tmp_path / "root", policy=tmp_path / "reopen.toml") as cache:
        assert sorted(cache.keys()) == on_disk
        for key in on_disk:
            assert cache.tier_of(key) == "nvme"
            assert_same(cache.get(key), kv(int(key[1:])))


def test_a_writer_that_dies_without_closing_leaves_a_consistent_root(tmp_path: Path) -> None:
    where = run_writer(tmp_path, ending="os._exit(0)")  # no close(): the lock dies with the process
    on_disk = sorted(k for k, tiers in where.items() if "nvme" in tiers)
    with tiercache.TierCache(root=tmp_path / "root", policy=tmp_path / "reopen.toml") as cache:
        assert sorted(cache.keys()) == on_disk
        for key in on_disk:
            assert_same(cache.get(key), kv(int(key[1:])))
