"""bench/remote.py at a tiny size: every case runs against the store it starts, and each row has its baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bench.remote
from bench.remote import bench_remote


def test_every_case_runs_and_each_row_has_its_baseline(
    tmp_path: Path, mooncake_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.remote, "CROWD", 20)
    rows = bench_remote([1 << 20], tmp_path, 1, lambda step: None)
    assert [r.baseline for r in rows] == [
        "raw Mooncake batch_put_from, one object per tensor",
        "raw Mooncake batch_get_into in a fresh process",
        "a raw loopback TCP stream, fresh process",
        "raw Mooncake batch_get_into in a fresh process",
    ]
    assert all(r.suite == "remote" and r.seconds > 0 and r.baseline_seconds for r in rows)
    assert [r.target for r in rows] == [None, 0.8, None, 0.8]
    assert rows[-1].detail == "handoff from a store of 20 other entries"
