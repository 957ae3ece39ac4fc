"""Latency-against-size charts (matplotlib, an optional dependency: `pip install 'tiercache-gpu[plot]'`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..units import format_size

# Series are told apart by colour and by marker, so that they stay apart in greyscale and for colour-blind readers.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C564B", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")
# Modelled lines: grey, each with its own pattern of long dashes (dots are kept for the measured raw limits).
MODEL_DASHES: tuple[tuple[float, ...], ...] = ((7, 3), (9, 2.5, 2, 2.5), (14, 3, 2, 3, 2, 3), (3, 6))


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; ImportError if matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_style(index: int) -> dict[str, Any]:
    """Colour and marker of the index-th series of a panel: both differ from every other series'."""
    return {"color": COLOURS[index % len(COLOURS)], "marker": MARKERS[index % len(MARKERS)]}


def model_style(index: int) -> dict[str, Any]:
    return {"color": "0.45", "dashes": MODEL_DASHES[index % len(MODEL_DASHES)], "linewidth": 1.3}


def format_seconds(seconds: float) -> str:
    """'250 µs', '1.5 ms', '12 ms', '2 s': three significant digits at most, in the unit that fits."""
    if seconds <= 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
            return f"{text} {unit}"
    raise AssertionError("unreachable")


def seconds_axis(axis: Any, *, log: bool) -> None:
    """Tick labels in s / ms / µs on one axis (ax.yaxis or ax.xaxis); on a log axis 1-2-5 ticks where the data
    span few decades, decades only where they span many."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _pos: format_seconds(value)))
    if log:
        low, high = sorted(axis.get_view_interval())
        decades = math.log10(high / low) if low > 0 and high > 0 else 0.0
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3.5 else (1.0,)))
        axis.set_minor_formatter(NullFormatter())


def size_axis(ax: Any, sizes: Sequence[int]) -> None:
    """A log x axis of entry sizes with a tick, in binary units, at each size measured."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = sorted(set(sizes))
    ax.set_xscale("log")
    if ticks:
        ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([format_size(s) for s in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("entry size")


def widen_to_a_decade(ax: Any) -> None:
    """A log y axis spanning at least one decade, so that it has labelled ticks to read values against."""
    low, high = ax.get_ylim()
    if low > 0 and high / low < 10:
        middle = math.sqrt(low * high)
        ax.set_ylim(middle / math.sqrt(10), middle * math.sqrt(10))


def legend_outside(ax: Any, handles: Sequence[Any] | None = None, **kwargs: Any) -> Any:
    """The legend to the right of the axes, outside the data, top-aligned with it."""
    options = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0, "fontsize": 8}
    options.update(kwargs)
    return ax.legend(handles=handles, **options) if handles is not None else ax.legend(**options)


def save(fig: Any, out: Path, *, dpi: int = 120) -> None:
    """Write the PNG, grown to hold whatever sits outside the axes (legends, notes), and close the figure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight", pad_inches=0.2)
    pyplot().close(fig)


def save_loglog(fig: Any, ax: Any, out: Path, *, ylabel: str, title: str) -> None:
    """Log-log axes over entry size in GB, a grid and a legend; writes the PNG and closes the figure."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entry size (GB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    fig.clf()
    pyplot().close(fig)
