"""The seed report's table: three pathways for an 8 GB cache on an RTX PRO 6000 Blackwell (modelled from its
figures) beside the same pathways measured here, scaled to 8 GB from the largest size measured."""

from __future__ import annotations

import torch

from tiercache.pathway import Pathway
from tiercache.policy.costmodel import Profile

from .measure import Row

SEED_BYTES = 8 * 10**9
SEED_PROFILE = "rtx-pro-6000-blackwell"
# The seed's pathways (at the cost model's grain) and what the seed report calls them.
SEED_PATHWAYS: list[tuple[Pathway, str]] = [
    (Pathway("host", "hbm", "pinned"), "PCIe Gen5 pinned DMA"),
    (Pathway("host", "hbm", "pageable"), "pageable RAM offload"),
    (Pathway("nvme", "hbm"), "NVMe direct"),
]


def measures(r: Row, seed: Pathway, cuda: bool) -> bool:
    """Whether `r` measures the seed's pathway: on a GPU the rows of bench/cuda.py, else the host-memory rows (where
    host->hbm is a memcpy whatever the pool, so pinned and pageable are one row); nvme reads with checksums on."""
    if r.pathway is None or r.suite != ("gpu" if cuda else "tiers") or r.checksums is False:
        return False
    got = r.pathway.costed()
    return got == seed if cuda else (got.source, got.dest) == (seed.source, seed.dest)


def seed_table(rows: list[Row]) -> str:
    seed = Profile.load(SEED_PROFILE)
    cuda = torch.cuda.is_available()
    measured_rows = [r for r in rows if any(measures(r, p, cuda) for p, _ in SEED_PATHWAYS)]
    largest = max((r.size for r in measured_rows), default=0)
    lines = [
        "## The seed report's pathways for an 8 GB cache",
        "",
        f"Modelled: profile {seed.name!r} ({seed.source}). Measured: this run's tiercache rows at the largest size "
        f"({largest / 2**20:.0f} MiB), scaled to 8 GB by their throughput"
        + ("" if cuda else "; no GPU here, so host->hbm is a memcpy and pinned and pageable are the same row")
        + ".",
        "",
        "| pathway | seed (modelled) | measured here (scaled) | measured row |",
        "| --- | ---: | ---: | --- |",
    ]
    for pathway, label in SEED_PATHWAYS:
        modelled = seed.seconds(pathway, SEED_BYTES) * 1e3
        match = [r for r in measured_rows if r.size == largest and measures(r, pathway, cuda)]
        measured = f"{SEED_BYTES / (match[0].gbps * 1e9) * 1e3:.0f} ms" if match else "not measured"
        lines.append(f"| {pathway} ({label}) | {modelled:.2f} ms | {measured} | {match[0].case if match else '-'} |")
    return "\n".join(lines) + "\n"
