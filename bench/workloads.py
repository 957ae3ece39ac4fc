"""The K/V entries of the diffusion models this cache serves (bf16 K and V per layer, listed below), scaled in
tokens to fit this machine and labelled with the scale: put to nvme and read back cold, beside a raw O_DIRECT read."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

import tiercache
from tiercache.pathway import Pathway

from .measure import Row, chunk_files, drop_page_caches, forcing_policy, raw_direct_read, row, side_by_side

HEAD_DIM = 128
# name: (layers, tokens, heads) of each model's attention at its usual resolution and prompt length
WORKLOADS: dict[str, tuple[int, int, int]] = {
    "wan13b-text-kv": (30, 512, 12),
    "wan14b-clip-kv": (40, 257, 40),
    "flux-text-kv": (57, 512, 24),
    "wan14b-480-frame0-kv": (40, 1560, 40),
    "flux-1024-img-kv": (57, 4096, 24),
    "flux-1024-full-kv": (57, 4608, 24),
    "wan13b-480-selfattn-kv": (30, 32760, 12),
    "wan14b-480-selfattn-kv": (40, 32760, 40),
}


def workload_bytes(layers: int, tokens: int, heads: int) -> int:
    return layers * 2 * tokens * heads * HEAD_DIM * 2


def scaled(name: str, cap: int) -> tuple[dict[str, torch.Tensor], str]:
    """The workload's entry with its token count scaled down to fit `cap` bytes, and a label saying how."""
    layers, tokens, heads = WORKLOADS[name]
    full = workload_bytes(layers, tokens, heads)
    fitted = max(1, min(tokens, tokens * cap // full))
    gen = torch.Generator().manual_seed(len(name))
    entry = {
        f"block{i}.{kv}": torch.randn(fitted, heads, HEAD_DIM, generator=gen).to(torch.bfloat16)
        for i in range(layers)
        for kv in ("k", "v")
    }
    scale = "full size" if fitted == tokens else f"1/{tokens / fitted:.3g} scale of {full / 1e9:.2f} GB"
    return entry, f"{name}: {layers} x ({fitted}, {heads}, {HEAD_DIM}), {scale}"


def bench_workloads(cap: int, root: Path, repeat: int, progress: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    for name in WORKLOADS:
        entry, label = scaled(name, cap)
        nbytes = sum(t.numel() * t.element_size() for t in entry.values())
        progress(f"workload {label}")
        with tiercache.TierCache(root=root, policy=forcing_policy("nvme", nbytes), device="cpu") as cache:
            cache.put("e", entry)
            files = chunk_files(root)
            drop = functools.partial(drop_page_caches, [p for p, _ in files])
            ours, raw = side_by_side(lambda: cache.get("e"), functools.partial(raw_direct_read, files), repeat, drop)
            pathway = Pathway("nvme", "hbm", cache.stats().nvme_io)
            baseline = "O_DIRECT preadv, 1 thread"
            rows.append(
                row(nbytes, pathway, ours, baseline, raw, 0.90, detail=label, suite="workloads", checksums=True)
            )
        shutil.rmtree(root, ignore_errors=True)
    return rows
