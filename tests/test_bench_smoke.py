"""A tiny run of every benchmark, so `make bench` cannot quietly break."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.run
import tiercache
from bench.measure import row
from bench.overlap import MAX_GPU_QUERY_TOKENS, overlap_cases, scaled_query_tokens
from bench.run import main
from bench.seed import seed_table
from tiercache.pathway import Pathway


def tiny_bench(monkeypatch: pytest.MonkeyPatch, out: Path, *, sizes: str, gpu_sizes: str = "", repeat: int = 2) -> None:
    """make bench's settings for a run of seconds: tiny entries, layers and workloads, few repetitions."""
    settings = {
        "BENCH_SIZES": sizes,
        "BENCH_GPU_SIZES": gpu_sizes,  # "": none, on a GPU host too
        "BENCH_REPEAT": str(repeat),
        "BENCH_OVERLAP_LAYER": "256KiB",
        "BENCH_WORKLOAD_CAP": "512KiB",
        "BENCH_DEMOTION": "4MiB",
        "BENCH_DIFFUSERS_SIZE": "1x128",
        "BENCH_HANDOFF_SIZES": "",  # a subprocess per read: tests/test_bench_handoff.py runs its reads in-process
        "BENCH_OBJECT_SIZES": "",  # its own S3 server: tests/test_bench_object.py
        "BENCH_REMOTE_SIZES": "",  # its own Mooncake Store: tests/test_bench_remote.py
        "BENCH_OUT": str(out),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


@pytest.mark.direct_io  # its rows and report name the O_DIRECT reads it expects
def test_bench_runs_end_to_end_at_tiny_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_bench(monkeypatch, tmp_path / "out", sizes="64KiB,1MiB")  # GPU rows: test_gpu_rows_run_end_to_end
    assert main() == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    tiers = {(r["size"], r["pathway"], r["checksums"]) for r in report["rows"] if r["suite"] == "tiers"}
    host = "host(pageable)"  # device="cpu": the host pool is never pinned
    for size in (64 << 10, 1 << 20):
        for pathway in ("put->hbm", None, f"put->{host}", f"{host}->hbm", "put->nvme(o_direct)"):  # None: hbm's hit
            assert (size, pathway, None) in tiers
        assert {(size, "nvme(o_direct)->hbm", True), (size, "nvme(o_direct)->hbm", False)} <= tiers
    for r in report["rows"]:  # the one spelling, read back; and the title starts with it
        assert r["pathway"] is None or str(Pathway.parse(r["pathway"])) == r["pathway"]
        assert r["pathway"] is None or r["case"].startswith(r["pathway"])
    for peer in ("torch.save", "torch.load", "safetensors save_file", "load_file", "numpy .npy", "zarr-python"):
        assert any(peer in r["case"] for r in report["rows"]), peer
    assert all(r["seconds"] > 0 for r in report["rows"])
    workload_rows = [r["case"] for r in report["rows"] if r["suite"] == "workloads"]
    assert len(workload_rows) == 8 and any("flux-1024-img-kv: 57 x (" in c for c in workload_rows)
    assert all("scale of" in c or "full size" in c for c in workload_rows)
    assert report["environment"]["o_direct"] == "yes"
    assert report["environment"]["cpu_stolen_during_run_s"] >= 0  # /proc/stat has a steal column on Linux
    printed = capsys.readouterr().out
    assert "| size | pathway |" in printed and "O_DIRECT preadv" in printed
    assert (tmp_path / "out" / "report.md").read_text() in printed
    assert "| host(pinned)->hbm (PCIe Gen5 pinned DMA) | 126.98 ms |" in printed and "| 571.43 ms |" in printed
    assert (tmp_path / "out" / "latency_chart.png").read_bytes()[:4] == b"\x89PNG"
    assert "latency_chart.png: panels memory, nvme, workloads; no GPU rows in this run" in printed
    expected = [list(case) for case in overlap_cases(tiercache.default_device())]  # without a GPU: a core left, all
    assert [[o["source"], o["compute_threads"]] for o in report["overlap"]] == expected
    assert "## Overlap" in printed and "attention threads" in printed
    assert all(o["compute_s"] > 0 and o["serial_s"] > 0 and o["overlapped_s"] > 0 for o in report["overlap"])
    assert not (tmp_path / "out" / "root").exists()  # the data it wrote is cleaned up
    assert not (tmp_path / "out" / "report.partial.md").exists()  # the whole report replaced it


@pytest.mark.direct_io
def test_a_run_cut_short_leaves_what_it_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU session's command has a time limit: the rows measured before it struck are kept."""
    tiny_bench(monkeypatch, tmp_path / "out", sizes="64KiB", repeat=1)

    def cut(*args: object) -> None:
        raise KeyboardInterrupt  # ended part-way (a timeout's SIGTERM kills it outright: the file is written by then)

    monkeypatch.setattr(bench.run, "bench_peers", cut)
    with pytest.raises(KeyboardInterrupt):
        main()
    partial = (tmp_path / "out" / "report.partial.md").read_text()
    assert "| 64 KiB | nvme(o_direct)->hbm (crc32c checked) |" in partial and "O_DIRECT preadv" in partial
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
    gpu = {Pathway.parse(r["pathway"]) for r in report["rows"] if r["suite"] == "gpu"}
    assert {(p.source, p.dest) for p in gpu} >= {("host", "hbm"), ("put", "host")}  # reload and offload
    assert {p.mode for p in gpu if p.dest == "hbm" and p.source == "host"} <= {"pinned", "pageable"}
    assert all(r["seconds"] > 0 for r in report["rows"])
    assert [o["source"] for o in report["overlap"]] == ["host", "nvme"]
    assert all(o["compute_threads"] is None and o["query_tokens"] >= 16384 for o in report["overlap"])


def test_the_seed_table_picks_its_rows_by_pathway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU the host-memory rows (pinned and pageable are one memcpy row; nvme reads checked); with one the
    GPU rows, by their pathway's cost-model grain."""
    big = 80 * 10**6  # 8 GB is 100 times this
    rows = [
        row(big, Pathway("host", "hbm", "pageable"), [0.01], "memcpy (clone)", [0.01]),
        row(big, Pathway("nvme", "hbm", "o_direct"), [0.1], "preadv", [0.1], detail="not checked", checksums=False),
        row(big, Pathway("nvme", "hbm", "o_direct"), [0.05], "preadv", [0.1], detail="checked", checksums=True),
        row(big, Pathway("nvme", "hbm", "o_direct"), [0.02], "torch.load", [0.1], detail="vs", suite="peers"),
        row(big, Pathway("host", "hbm", "pinned"), [0.002], "cudaMemcpyAsync", [0.002], detail="GPU", suite="gpu"),
        row(big, Pathway("nvme", "hbm", "gds"), [0.008], "kvikio", [0.008], detail="GPU", suite="gpu", checksums=True),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = seed_table(rows)
    assert "| host(pinned)->hbm (PCIe Gen5 pinned DMA) | 126.98 ms | 1000 ms | host(pageable)->hbm |" in cpu
    assert "| host(pageable)->hbm (pageable RAM offload) | 253.97 ms | 1000 ms | host(pageable)->hbm |" in cpu
    assert "| nvme->hbm (NVMe direct) | 571.43 ms | 5000 ms | nvme(o_direct)->hbm (checked) |" in cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = seed_table(rows)
    assert "| host(pinned)->hbm (PCIe Gen5 pinned DMA) | 126.98 ms | 200 ms | host(pinned)->hbm (GPU) |" in gpu
    assert "| host(pageable)->hbm (pageable RAM offload) | 253.97 ms | not measured | - |" in gpu
    assert "| nvme->hbm (NVMe direct) | 571.43 ms | 800 ms | nvme(gds)->hbm (GPU) |" in gpu
