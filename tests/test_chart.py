"""bench/chart.py: latency_chart.png from a few synthetic rows of every family, and the panels it says it drew."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bench.chart
from bench.chart import latency_chart, panel_rows, seed_lines
from bench.measure import Row, row
from tiercache.pathway import Pathway
from tiercache.tools.plotting import format_seconds

MiB = 1 << 20
SIZES = (16 * MiB, 64 * MiB, 256 * MiB)


def series(pathway: Pathway, baseline: str, gbps: float, raw_gbps: float, **fields: Any) -> list[Row]:
    """One row a size, timed at `gbps` beside a raw limit at `raw_gbps`."""
    return [
        row(size, pathway, [size / gbps / 1e9] * 3, baseline, [size / raw_gbps / 1e9] * 3, **fields) for size in SIZES
    ]


def cpu_rows() -> list[Row]:
    rows = series(Pathway("put", "hbm"), "memcpy (clone, previous held)", 5.0, 7.0)
    rows += [row(s, None, [1e-4], "-", [], detail="hbm hit (no copy)") for s in SIZES]  # no pathway: not drawn
    rows += series(Pathway("host", "hbm", "pageable"), "memcpy (clone)", 8.0, 8.5, target=0.8)
    rows += series(Pathway("put", "nvme", "o_direct"), "O_DIRECT pwritev, 1 thread", 0.3, 0.35)
    for verify in (True, False):
        crc = f"crc32c {'checked' if verify else 'not checked'}"
        rows += series(
            Pathway("nvme", "hbm", "o_direct"), "O_DIRECT preadv, 1 thread", 1.6, 1.7, detail=crc, checksums=verify
        )
    rows += series(
        Pathway("nvme", "hbm", "o_direct"),
        "torch.save / torch.load (+touch)",
        1.6,
        1.2,
        detail="vs torch.load, cold",
        suite="peers",
    )
    for name in ("flux-text-kv", "wan14b-480-selfattn-kv"):
        rows.append(
            row(
                64 * MiB,
                Pathway("nvme", "hbm", "o_direct"),
                [0.03],
                "O_DIRECT preadv, 1 thread",
                [0.028],
                0.9,
                detail=f"{name}: 57 x (100, 24, 128), 1/5.12 scale of 0.36 GB",
                suite="workloads",
                checksums=True,
            )
        )
    return rows


def gpu_rows() -> list[Row]:
    rows = series(Pathway("put", "host", "pinned"), "pinned cudaMemcpyAsync", 50.0, 52.0, detail="GPU", suite="gpu")
    rows += series(Pathway("host", "hbm", "pinned"), "pinned cudaMemcpyAsync", 53.0, 54.0, detail="GPU", suite="gpu")
    rows += series(
        Pathway("nvme", "hbm", "gds"),
        "raw kvikio CuFile.pread",
        12.0,
        13.0,
        detail="GPU, kvikio",
        suite="gpu",
        checksums=True,
    )
    return rows


@pytest.fixture(autouse=True)
def _matplotlib() -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'tiercache-gpu[plot]')")


def test_every_family_gets_its_panel(tmp_path: Path) -> None:
    out = tmp_path / "latency_chart.png"
    chart = latency_chart(cpu_rows() + gpu_rows(), out)
    assert chart.path == out and out.read_bytes()[:4] == b"\x89PNG"
    assert chart.panels == ["memory", "nvme", "gpu", "workloads"]
    assert chart.notes == []


def test_a_run_without_gpu_rows_says_so(tmp_path: Path) -> None:
    out = tmp_path / "latency_chart.png"
    chart = latency_chart(cpu_rows(), out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert chart.panels == ["memory", "nvme", "workloads"]
    assert len(chart.notes) == 1 and chart.notes[0].startswith("no GPU rows in this run")


def test_rows_are_placed_by_suite_and_pathway_family() -> None:
    panels = panel_rows(cpu_rows() + gpu_rows())
    assert {str(r.pathway) for r in panels["memory"]} == {"put->hbm", "host(pageable)->hbm"}
    assert {str(r.pathway) for r in panels["nvme"]} == {"put->nvme(o_direct)", "nvme(o_direct)->hbm"}
    assert all(r.suite == "tiers" for r in panels["memory"] + panels["nvme"])  # peers and the hit are left out
    assert {r.suite for r in panels["gpu"]} == {"gpu"} and len(panels["workloads"]) == 2
    # The seed's host lines go beside the GPU rows where there are any, else beside the host-memory rows.
    with_gpu, without = seed_lines(panels), seed_lines(panel_rows(cpu_rows()))
    assert [str(p) for p, _ in with_gpu["gpu"]] == ["host(pinned)->hbm", "host(pageable)->hbm", "nvme->hbm"]
    assert with_gpu["memory"] == [] and len(without["memory"]) == 2 and len(without["nvme"]) == 1


def test_no_rows_no_file(tmp_path: Path) -> None:
    chart = latency_chart([], tmp_path / "latency_chart.png")
    assert chart.path is None and chart.panels == [] and not (tmp_path / "latency_chart.png").exists()


def test_without_matplotlib_the_note_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(bench.chart, "pyplot", missing)
    chart = latency_chart(cpu_rows(), tmp_path / "latency_chart.png")
    assert chart.path is None and "matplotlib is not installed" in chart.notes[0]


def test_seconds_read_in_the_unit_that_fits() -> None:
    assert [format_seconds(s) for s in (2.0, 0.0125, 2.5e-4, 1e-3, 3e-9)] == [
        "2 s",
        "12.5 ms",
        "250 µs",
        "1 ms",
        "3 ns",
    ]
