"""A tiny run of every benchmark, so `make bench` cannot quietly break."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.run
import tiercache
from bench.overlap import MAX_GPU_QUERY_TOKENS, overlap_cases, scaled_query_tokens
from bench.run import main


def tiny_bench(monkeypatch: pytest.MonkeyPatch, out: Path, *, sizes: str, gpu_sizes: str = "", repeat: int = 2) -> None:
    """make bench's settings for a run of seconds: tiny entries, layers and workloads, few repetitions."""
    settings = {
        "BENCH_SIZES": sizes,
        "BENCH_GPU_SIZES": gpu_sizes,  # "": none, on a GPU host too
        "BENCH_REPEAT": str(repeat),
        "BENCH_OVERLAP_LAYER": "256KiB",
        "BENCH_WORKLOAD_CAP": "512KiB",
        "BENCH_OUT": str(out),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


def test_bench_runs_end_to_end_at_tiny_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_bench(monkeypatch, tmp_path / "out", sizes="64KiB,1MiB")  # GPU rows: test_gpu_rows_run_end_to_end
    assert main() == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cases = {(r["size"], r["case"].split(" (")[0]) for r in report["rows"]}
    for size in (64 << 10, 1 << 20):
        for case in ("put -> hbm", "get <- hbm", "put -> host", "get <- host", "put -> nvme", "get <- nvme"):
            assert (size, case) in cases
    for peer in ("torch.save", "torch.load", "safetensors save_file", "load_file", "numpy .npy", "zarr-python"):
        assert any(peer in r["case"] for r in report["rows"]), peer
    assert all(r["seconds"] > 0 for r in report["rows"])
    workload_rows = [r["case"] for r in report["rows"] if "scale of" in r["case"] or "full size" in r["case"]]
    assert len(workload_rows) == 8 and any("flux-1024-img-kv: 57 x (" in c for c in workload_rows)
    assert report["environment"]["o_direct"] == "yes"
    assert report["environment"]["cpu_stolen_during_run_s"] >= 0  # /proc/stat has a steal column on Linux
    printed = capsys.readouterr().out
    assert "| size | pathway |" in printed and "O_DIRECT preadv" in printed
    assert (tmp_path / "out" / "report.md").read_text() in printed
    assert "| host(pinned)->hbm (PCIe Gen5 pinned DMA) | 126.98 ms |" in printed and "| 571.43 ms |" in printed
    assert (tmp_path / "out" / "latency_chart.png").read_bytes()[:4] == b"\x89PNG"
    expected = [list(case) for case in overlap_cases(tiercache.default_device())]  # without a GPU: a core left, all
    assert [[o["source"], o["compute_threads"]] for o in report["overlap"]] == expected
    assert "## Overlap" in printed and "attention threads" in printed
    assert all(o["compute_s"] > 0 and o["serial_s"] > 0 and o["overlapped_s"] > 0 for o in report["overlap"])
    assert not (tmp_path / "out" / "root").exists()  # the data it wrote is cleaned up
    assert not (tmp_path / "out" / "report.partial.md").exists()  # the whole report replaced it


def test_a_run_cut_short_leaves_what_it_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU session's command has a time limit: the rows measured before it struck are kept."""
    tiny_bench(monkeypatch, tmp_path / "out", sizes="64KiB", repeat=1)

    def cut(*args: object) -> None:
        raise KeyboardInterrupt  # ended part-way (a timeout's SIGTERM kills it outright: the file is written by then)

    monkeypatch.setattr(bench.run, "bench_peers", cut)
    with pytest.raises(KeyboardInterrupt):
        main()
    partial = (tmp_path / "out" / "report.partial.md").read_text()
    assert "| 64 KiB | get <- nvme" in partial and "O_DIRECT preadv" in partial
    assert not (tmp_path / "out" / "report.md").exists() and not (tmp_path / "out" / "report.json").exists()


def test_a_gpu_layer_is_sized_to_outlast_its_reload() -> None:
    """The GPU overlap target compares with compute alone, which needs each layer's compute to outlast its reload."""
    assert scaled_query_tokens(16384, compute_s=1e-3, reload_s=4e-3) == 16384 * 16  # 4x of the reload
    assert scaled_query_tokens(16384, compute_s=1e-2, reload_s=1e-3) == 16384  # never shrinks
    assert scaled_query_tokens(16384, compute_s=1e-6, reload_s=1.0) == MAX_GPU_QUERY_TOKENS


@pytest.mark.gpu
def test_gpu_rows_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU rows at a tiny size, so that `make test-gpu` finds a broken bench/cuda.py before `make bench` does."""
    tiny_bench(monkeypatch, tmp_path / "out", sizes="", gpu_sizes="1MiB", repeat=1)
    assert main() == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cases = [r["case"] for r in report["rows"]]
    assert any(c.startswith("reload host(") for c in cases) and any(c.startswith("offload hbm -> host(") for c in cases)
    assert all(r["seconds"] > 0 for r in report["rows"])
    assert [o["source"] for o in report["overlap"]] == ["host", "nvme"]
    assert all(o["compute_threads"] is None and o["query_tokens"] >= 16384 for o in report["overlap"])
