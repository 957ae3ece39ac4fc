"""The seed report's table: three pathways for an 8 GB cache on an RTX PRO 6000 Blackwell (modelled from its
figures) beside the same pathways measured here, scaled to 8 GB from the largest size measured."""

from __future__ import annotations

import torch

from tiercache.policy.costmodel import Profile

from .measure import Row

SEED_BYTES = 8 * 10**9
# (seed pathway, the row of this run that measures it without a GPU, and with one)
SEED_PATHWAYS = [
    ("host(pinned)->hbm", "PCIe Gen5 pinned DMA", "get <- host", "reload host(pinned) -> hbm"),
    ("host(pageable)->hbm", "pageable RAM offload", "get <- host", "reload host(pageable) -> hbm"),
    ("nvme->hbm", "NVMe direct", "get <- nvme (o_direct, crc32c checked)", "reload nvme -> hbm"),
]


def seed_table(rows: list[Row]) -> str:
    seed = Profile.load("rtx-pro-6000-blackwell")
    cuda = torch.cuda.is_available()
    measured_rows = [r for r in rows if any(r.case.startswith(p[3 if cuda else 2]) for p in SEED_PATHWAYS)]
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
    for pathway, label, cpu_case, gpu_case in SEED_PATHWAYS:
        case = gpu_case if cuda else cpu_case
        modelled = seed.seconds(pathway, SEED_BYTES) * 1e3
        match = [r for r in rows if r.size == largest and r.case.startswith(case)]
        measured = f"{SEED_BYTES / (match[0].gbps * 1e9) * 1e3:.0f} ms" if match else "not measured"
        lines.append(f"| {pathway} ({label}) | {modelled:.2f} ms | {measured} | {match[0].case if match else '-'} |")
    return "\n".join(lines) + "\n"
