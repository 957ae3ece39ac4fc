"""Entries outlive close(): with a root the user gave, close() writes what is only in memory down to nvme within its
budget (placement.flush_on_close), flush() does it on demand, and a later miss on an entry that could not be kept
says why. Temporary roots are unchanged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from faults import CreationLog
from helpers import KiB, MiB, assert_same, kv, policy

import tiercache
from tiercache import EntryNotFoundError


def test_the_readme_example_reopened_finds_what_was_in_memory(tmp_path: Path) -> None:
    root = tmp_path / "tc"
    with tiercache.TierCache(root=root, policy=policy()) as cache:
        assert cache.put("in-hbm", kv(1)) == "hbm"
        cache.put("in-host", kv(2, 1536 * KiB))  # too big for hbm (1 MiB): host
        assert cache.tier_of("in-host") == "host"
    with tiercache.TierCache(root=root, policy=policy()) as cache:
        assert sorted(cache) == ["in-hbm", "in-host"]
        assert cache.tier_of("in-hbm") == "nvme"
        assert_same(cache["in-hbm"], kv(1))
        assert_same(cache["in-host"], kv(2, 1536 * KiB))


def test_flush_writes_the_keys_given_and_keeps_the_memory_copies(make_cache: Any) -> None:
    cache = make_cache(policy())
    cache.put("a", kv(1))
    cache.put("b", kv(2))
    flushed = cache.flush("a")
    assert flushed.moved == ("a",) and flushed.left == {} and flushed.nbytes == 64 * KiB
    assert cache.info("a").tiers == ("hbm", "nvme") and cache.info("b").tiers == ("hbm",)
    assert cache.flush().moved == ("b",)  # everything not yet on nvme: only b is left
    assert cache.flush().moved == ()
    with pytest.raises(EntryNotFoundError):
        cache.flush(["missing"])


def test_what_the_nvme_budget_cannot_keep_is_named_at_close_and_at_the_next_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "tc"
    small = policy(tiers={"nvme": {"capacity": 100 * KiB}})
    with caplog.at_level(logging.WARNING), tiercache.TierCache(root=root, policy=small) as cache:
        cache.put("old", kv(1))
        cache.put("new", kv(2))  # used last: kept first
    assert "1 entries (64 KiB) written to nvme; 1 not kept: 'old'" in caplog.text
    with tiercache.TierCache(root=root, policy=small) as cache:
        assert list(cache) == ["new"]
        with pytest.raises(EntryNotFoundError, match=r"'old' is not in the cache: process \d+ held it in memory only"):
            cache["old"]
        with pytest.raises(KeyError, match="raise tiers.nvme.capacity"):
            cache["old"]
        assert cache.get("old") is None
        cache.put("old", kv(3), write_through=True)  # put again: the note goes
    with tiercache.TierCache(root=root, policy=policy()) as cache:
        cache.delete("old")
        with pytest.raises(EntryNotFoundError, match="never put, deleted"):
            cache["old"]


def test_with_flush_on_close_off_the_miss_says_so(tmp_path: Path) -> None:
    root = tmp_path / "tc"
    off = policy(placement={"flush_on_close": False})
    with tiercache.TierCache(root=root, policy=off) as cache:
        cache.put("a", kv(1))
    with tiercache.TierCache(root=root, policy=policy()) as cache:
        assert len(cache) == 0
        with pytest.raises(EntryNotFoundError, match="flush_on_close is false"):
            cache["a"]


def test_a_temporary_root_is_neither_flushed_nor_kept() -> None:
    with tiercache.TierCache(policy=policy()) as cache:
        cache.put("a", kv(1))
        root = cache.root
    assert not root.exists()


def test_a_read_only_cache_writes_nothing_at_close(tmp_path: Path) -> None:
    root = tmp_path / "tc"
    with tiercache.TierCache(root=root, policy=policy()):
        pass
    with tiercache.TierCache(root=root, policy=policy(), read_only=True) as consumer:
        consumer.put("mine", kv(1))  # memory only: nvme is not writable for it
        assert consumer.flush().left == {"mine": "this cache opened the root read-only"}
    assert not [p for p in (root / "entries").iterdir() if p.is_dir()]


def test_a_read_only_cache_creates_no_file_to_probe_the_disk(tmp_path: Path) -> None:
    root = tmp_path / "tc"
    with tiercache.TierCache(root=root, policy=policy()) as writer:
        writer.put("a", kv(1))
        mode = writer.stats().nvme_io
    files = CreationLog()
    with tiercache.TierCache(root=root, policy=policy(), read_only=True, files=files) as reader:
        assert_same(reader.get("a"), kv(1))
        assert reader.stats().nvme_io == mode  # the probe read the index instead, and found the same
    assert not [p for p in files.created if ".direct-probe-" in p]


def test_a_long_flush_reports_progress(make_cache: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    class Bar:
        def __init__(self, size: int, description: str) -> None:
            seen.append(size)

        def relative_update(self, inc: int = 1) -> None:
            seen.append(inc)

        def close(self) -> None:
            seen.append(-1)

    monkeypatch.setattr(tiercache.cache, "FLUSH_BAR_FROM", 1 * MiB)
    monkeypatch.setattr(tiercache.cache, "progress_callback", Bar)
    cache = make_cache(policy())
    cache.put("a", kv(1, 1536 * KiB))
    cache.put("b", kv(2, 64 * KiB))
    cache.flush()
    assert seen == [1600 * KiB, 64 * KiB, 1536 * KiB, -1]  # total, then each entry written, most recent first


def test_a_policy_without_nvme_closes_without_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing can be kept where the policy gives nvme no room: close says so at info level, not as a warning."""
    memory_only = policy(tiers={"nvme": {"capacity": 0}})
    with caplog.at_level(logging.INFO), tiercache.TierCache(root=tmp_path / "root", policy=memory_only) as cache:
        cache.put("a", kv(1))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "1 not kept: 'a'" in caplog.text
