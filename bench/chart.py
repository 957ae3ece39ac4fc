"""latency_chart.png: measured latency against entry size, one panel per pathway family (memory tiers, nvme, the
GPU rows), each series beside its raw limit (dotted) and, where the seed table compares with them, the seed
report's modelled lines (dashed grey); the workloads as bars beside their raw limit in a last panel."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.pathway import Pathway
from tiercache.policy.costmodel import Profile
from tiercache.tools.plotting import (
    model_style,
    pyplot,
    save,
    seconds_axis,
    series_style,
    size_axis,
    widen_to_a_decade,
)

from .measure import Row
from .seed import SEED_PATHWAYS, SEED_PROFILE

PANEL_TITLES = {
    "memory": "memory tiers: put and get through hbm and the host pool (hbm is host memory in these rows)",
    "nvme": "nvme tier: put, and get read cold (page cache dropped) into host memory",
    "gpu": "GPU (bench/cuda.py): host pool <-> CUDA device, and nvme <-> device through kvikio",
    "workloads": "the diffusion K/V workloads read cold from nvme (scaled to the run's cap)",
}
SeriesKey = tuple[Pathway, bool | None, str]  # (pathway, crc32c checked, baseline)


@dataclass
class Chart:
    """What latency_chart wrote: the PNG (None: not written), the panels drawn in order, notes for the report."""

    path: Path | None
    panels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def panel_rows(rows: list[Row]) -> dict[str, list[Row]]:
    """The rows of each panel: the tiers suite split by pathway family, the GPU rows, the workloads. The peers
    time the same pathways as the nvme rows beside other libraries; they are in the report's table only."""
    tiers = [r for r in rows if r.suite == "tiers" and r.pathway is not None]
    return {
        "memory": [r for r in tiers if r.pathway is not None and r.pathway.family == "memory"],
        "nvme": [r for r in tiers if r.pathway is not None and r.pathway.family == "nvme"],
        "gpu": [r for r in rows if r.suite == "gpu" and r.pathway is not None],
        "workloads": [r for r in rows if r.suite == "workloads"],
    }


def seed_lines(panels: dict[str, list[Row]]) -> dict[str, list[tuple[Pathway, str]]]:
    """Which panel shows which of the seed's modelled pathways: the host ones beside the GPU rows where there are
    any, else beside the host-memory rows (as the seed table compares them); nvme beside every nvme read."""
    host = [(p, label) for p, label in SEED_PATHWAYS if p.family == "memory"]
    nvme = [(p, label) for p, label in SEED_PATHWAYS if p.family == "nvme"]
    gpu_reads_nvme = any(r.pathway is not None and r.pathway.family == "nvme" for r in panels["gpu"])
    return {
        "memory": [] if panels["gpu"] else host,
        "nvme": nvme,
        "gpu": host + (nvme if gpu_reads_nvme else []),
    }


def latency_chart(rows: list[Row], out: Path) -> Chart:
    """Write the chart; says which panels it drew, and why one is missing or the file is."""
    try:
        plt = pyplot()
    except ImportError:
        why = "latency_chart.png not written: matplotlib is not installed (pip install 'tiercache-gpu[plot]')"
        return Chart(None, notes=[why])
    panels = panel_rows(rows)
    chart = Chart(out)
    if not panels["gpu"]:
        why = "no CUDA device" if not torch.cuda.is_available() else "BENCH_GPU_SIZES measured none"
        chart.notes.append(f"no GPU rows in this run ({why}): the GPU panel is left out")
    drawn = [name for name, picked in panels.items() if picked]
    if not drawn:
        chart.notes.append("latency_chart.png not written: no rows to draw")
        chart.path = None
        return chart
    heights = [len(panels[n]) * 0.6 + 1.0 if n == "workloads" else 4.4 for n in drawn]
    fig = plt.figure(figsize=(14, sum(heights) + 1.0))
    # Each panel's legend has a column of its own beside it: outside the data, and never squeezing the axes.
    grid = fig.add_gridspec(len(drawn), 2, width_ratios=(3.3, 1.7), height_ratios=heights)
    seed = Profile.load(SEED_PROFILE)
    lines = seed_lines(panels)
    for index, name in enumerate(drawn):
        ax = fig.add_subplot(grid[index, 0])
        if name == "workloads":
            handles = _workload_panel(ax, panels[name])
        else:
            handles = _latency_panel(ax, panels[name], seed, lines[name])
        ax.set_title(PANEL_TITLES[name], loc="left", fontsize=11, fontweight="bold")
        key = fig.add_subplot(grid[index, 1])
        key.axis("off")
        legend(key, handles)
    chart.panels = drawn
    heading = (
        "tiercache bench: medians of this run's repetitions. Solid: tiercache; dotted, hollow markers: "
        "the raw limit measured beside it; dashed grey: the seed report's modelled lines."
    )
    fig.suptitle("\n".join([heading, *chart.notes]), x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / (sum(heights) + 1.0)), h_pad=2.5)
    save(fig, out)
    return chart


Handles = list[tuple[Any, str]]


def _series(rows: list[Row]) -> dict[SeriesKey, list[Row]]:
    """Rows of one pathway against one limit, in the bench's order: a line across the sizes measured."""
    series: dict[SeriesKey, list[Row]] = {}
    for r in rows:
        assert r.pathway is not None
        series.setdefault((r.pathway, r.checksums, r.baseline), []).append(r)
    return series


def _label(key: SeriesKey) -> str:
    pathway, checksums, baseline = key
    crc = {True: ", crc32c checked", False: ", crc32c not checked", None: ""}[checksums]
    return f"{pathway}{crc}\nraw limit: {baseline}"


def _latency_panel(ax: Any, rows: list[Row], seed: Profile, modelled: list[tuple[Pathway, str]]) -> Handles:
    sizes = sorted({r.size for r in rows})
    handles: Handles = []
    for index, (key, picked) in enumerate(_series(rows).items()):
        picked = sorted(picked, key=lambda r: r.size)
        style = series_style(index)
        (ours,) = ax.plot([r.size for r in picked], [r.seconds for r in picked], "-", markersize=7, lw=2, **style)
        limits = [(r.size, r.baseline_seconds) for r in picked if r.baseline_seconds is not None]
        if limits:
            (raw,) = ax.plot(
                [s for s, _ in limits],
                [t for _, t in limits],
                ":",
                lw=1.6,
                markersize=6,
                markerfacecolor="white",
                **style,
            )
            handles.append(((ours, raw), _label(key)))
        else:
            handles.append((ours, _label(key).split("\n")[0]))
    for index, (pathway, label) in enumerate(modelled):
        (line,) = ax.plot(sizes, [seed.seconds(pathway, s) for s in sizes], **model_style(index))
        handles.append((line, f"seed model: {pathway}\n{label} ({SEED_PROFILE})"))
    ax.set_yscale("log")
    ax.margins(y=0.1)  # no marker against the frame
    size_axis(ax, sizes)
    widen_to_a_decade(ax)
    seconds_axis(ax.yaxis, log=True)
    ax.set_ylabel("latency (median)")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)
    return handles


def _workload_panel(ax: Any, rows: list[Row]) -> Handles:
    """One pair of bars a workload: tiercache's cold get and the raw read beside it, with the ratio and target."""
    height = 0.4
    positions = list(range(len(rows)))
    colour = series_style(0)["color"]
    raw = [r.baseline_seconds or 0.0 for r in rows]
    ours = ax.barh([p - height / 2 for p in positions], [r.seconds for r in rows], height, color=colour)
    limit = ax.barh([p + height / 2 for p in positions], raw, height, color="0.75", hatch="//", edgecolor="0.4")
    longest = max([r.seconds for r in rows] + raw)
    for p, r in zip(positions, rows, strict=True):
        text = f"{r.ratio:.2f}x of raw" if r.ratio is not None else "no raw limit"
        if r.target is not None and r.ratio is not None:
            text += f", target {r.target:.2f}x: {r.verdict}"
        colour_of_text = "#B00020" if r.verdict == "BELOW" else "black"
        x = max(r.seconds, r.baseline_seconds or 0.0) + longest * 0.015
        ax.text(x, p, text, va="center", fontsize=9, color=colour_of_text)
    labels = [textwrap.fill(f"{r.detail} ({tiercache.format_size(r.size)})", 44) for r in rows]
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()  # the bench's order, top down
    ax.set_xlim(0, longest * 1.5)  # room for the ratio beside the longest bar
    seconds_axis(ax.xaxis, log=False)
    ax.set_xlabel("latency (median)")
    ax.grid(True, axis="x", alpha=0.35)
    pathways = ", ".join(sorted({str(r.pathway) for r in rows}))
    baselines = ", ".join(sorted({r.baseline for r in rows}))
    return [(ours, f"tiercache get, {pathways}"), (limit, f"raw limit: {baselines}")]


def legend(key: Any, handles: Handles) -> None:
    """A panel's legend in the blank axes beside it; a (tiercache, raw limit) pair shows both lines."""
    from matplotlib.legend_handler import HandlerTuple

    key.legend(
        [h for h, _ in handles],
        [label for _, label in handles],
        loc="upper left",
        fontsize=9,
        labelspacing=0.9,
        handlelength=4.0,
        frameon=False,
        handler_map={tuple: HandlerTuple(ndivide=None, pad=0.6)},
    )
