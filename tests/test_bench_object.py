"""bench/object.py at a tiny size: every case runs against the server it starts, and each row has its baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bench.object
from bench.object import bench_object


def test_every_case_runs_and_each_row_has_its_baseline(
    tmp_path: Path, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.object, "CROWD", 20)
    rows = bench_object([1 << 20], tmp_path, 1, lambda step: None)
    assert [r.baseline for r in rows] == [
        "raw obstore puts, one object per tensor",
        "raw obstore gets in a fresh process",
        "a raw loopback TCP stream, fresh process",
        "raw obstore gets in a fresh process",
    ]
    assert all(r.suite == "object" and r.seconds > 0 and r.baseline_seconds for r in rows)
    assert [r.target for r in rows] == [0.9, 0.9, None, 0.9]
    assert rows[-1].detail == "handoff from a bucket of 20 other entries"
