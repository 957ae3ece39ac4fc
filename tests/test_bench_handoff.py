"""bench/handoff.py's reads, run in this process on a small entry (make bench runs each in a fresh process): every
case reads the whole entry back, and the rows pair tiercache with each baseline, targets where the issue set them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import handoff


def test_every_case_reads_and_each_row_has_its_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def in_process(mode: str, arg: str, drop: list[Path]) -> float:
        seen.append(mode)
        return handoff._child(mode, [arg])

    monkeypatch.setattr(handoff, "_timed", in_process)
    rows = handoff.bench_handoff([1 << 20], tmp_path, 1, lambda step: None)
    assert sorted(set(seen)) == sorted(
        ["tiercache", "torch.load", "safetensors", "numpy", "raw", "raw-threads", "floor"]
    )
    assert len(rows) == 6, rows
    for r in rows:
        assert r.suite == "handoff" and r.seconds > 0 and r.baseline_seconds, r
    targets = {r.baseline.split(" ")[0]: r.target for r in rows}
    assert targets["torch.load"] == 1.0 and targets["safetensors"] == 1.0  # below 64 MiB: at least as fast
    assert json.loads(json.dumps([r.as_json() for r in rows]))  # the report can record them
