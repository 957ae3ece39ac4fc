"""latency_chart.png: measured latency against size, one line per pathway, with the seed's modelled lines."""

from __future__ import annotations

from pathlib import Path

from tiercache.policy.costmodel import Profile
from tiercache.tools.plotting import pyplot, save_loglog

from .measure import Row
from .seed import SEED_PATHWAYS


def latency_chart(rows: list[Row], out: Path) -> str:
    """Write the chart; returns a note for the report (why it is missing, if it is)."""
    try:
        plt = pyplot()
    except ImportError:
        return "latency_chart.png not written: matplotlib is not installed (pip install 'tiercache[plot]')"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cases = sorted({r.case for r in rows if r.suite in ("tiers", "gpu", "workloads") and r.pathway is not None})
    for index, case in enumerate(cases):
        points = sorted((r.size, r.seconds) for r in rows if r.case == case)
        ax.plot([s / 1e9 for s, _ in points], [t * 1e3 for _, t in points], "o-", color=f"C{index % 10}", label=case)
    sizes = sorted({r.size for r in rows})
    if sizes:
        seed = Profile.load("rtx-pro-6000-blackwell")
        span = [sizes[0], max(sizes[-1], 8 * 10**9)]
        for style, (pathway, label) in zip(("--", "-.", ":"), SEED_PATHWAYS, strict=True):
            ax.plot(
                [s / 1e9 for s in span],
                [seed.seconds(pathway, s) * 1e3 for s in span],
                style,
                color="gray",
                label=f"seed model: {label} ({pathway})",
            )
    save_loglog(
        fig,
        ax,
        out,
        ylabel="latency (ms)",
        title="tiercache pathways measured here, and the seed report's modelled RTX PRO 6000 lines",
    )
    return ""
