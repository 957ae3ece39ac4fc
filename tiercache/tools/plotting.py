"""Latency-against-size charts (matplotlib, an optional dependency: `pip install 'tiercache[plot]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; ImportError if matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
