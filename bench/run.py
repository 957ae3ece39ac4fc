"""Round trips of every tier, each beside the raw limit of the same machine, measured in the same run.

These rows run with `device="cpu"` (hbm stands for CPU memory in them) on every machine, so that on a GPU machine
too they measure the host-memory pathways (nvme -> host through the POSIX backend) against host-memory limits.

For each entry size: put and get through hbm, host and nvme (a policy forces the tier and turns promotion off,
so every get takes the same pathway), interleaved repetition by repetition with the raw operation each pathway
is bounded by: a memcpy into a fresh tensor (clone; for a put, made while the previous copy is still held, as
the cache keeps the old version of a key until the new one is stored) for the memory tiers, a single-threaded O_DIRECT
pwritev / preadv of the same bytes into fresh page-aligned buffers for nvme. The page cache is dropped for the
files read before every nvme read, tiercache's and the raw one alike.

On a CUDA machine the GPU pathways follow (bench/cuda.py): pinned and pageable host <-> hbm, nvme <-> hbm through
kvikio, each beside cudaMemcpyAsync / .to() / raw kvikio, for BENCH_GPU_SIZES.

Settings (environment): BENCH_SIZES="16MiB,64MiB,256MiB,1GiB"  BENCH_GPU_SIZES="64MiB,256MiB,1GiB,4GiB,16GiB"
BENCH_REPEAT=5  BENCH_OUT=bench/out  BENCH_ROOT=<out>/root
BENCH_OVERLAP_LAYER=16MiB (K/V bytes per layer of the overlap loop)  BENCH_WORKLOAD_CAP=64MiB (the
workloads of bench/workloads.py are scaled down in tokens to at most this many bytes)
BENCH_DIFFUSERS_SIZE=12x768 (blocks x width of bench/diffusers.py's Wan transformer; 0: skipped)
BENCH_HANDOFF_SIZES="16MiB,64MiB,256MiB,1GiB" (bench/handoff.py's fresh-process first gets; "": skipped)
BENCH_REMOTE_SIZES="16MiB,64MiB" (bench/remote.py: the remote tier on a Mooncake Store it starts; "": skipped)
BENCH_OBJECT_SIZES="16MiB,64MiB" (bench/object.py: the object tier on a SeaweedFS server it starts; "": skipped)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.io import aligned_empty, buffer_of, round_up
from tiercache.io.posix import O_DIRECT
from tiercache.pathway import Pathway
from tiercache.tools.progress import Callback, progress_callback

from .chart import latency_chart
from .cuda import bench_cuda
from .diffusers import DEFAULT_SIZE as DEFAULT_DIFFUSERS_SIZE
from .diffusers import bench_diffusers, diffusers_steps
from .environment import describe, stolen_cpu_seconds
from .handoff import bench_handoff
from .latency import bench_latency
from .measure import (
    LAYERS,
    Row,
    chunk_files,
    drop_page_caches,
    forcing_policy,
    host_mode,
    make_entry,
    raw_direct_read,
    row,
    side_by_side,
)
from .object import bench_object
from .overlap import bench_overlap, overlap_cases, overlap_table
from .peers import bench_peers
from .remote import bench_remote
from .seed import seed_table
from .workloads import WORKLOADS, bench_workloads

DEFAULT_SIZES = "16MiB,64MiB,256MiB,1GiB"
LARGE, LARGE_REPEAT = 1 << 30, 3  # entries this large get fewer repetitions: the default run stays under 10 minutes
SMALL = 64 << 20  # entries up to this size get twice the repetitions: a VM's hiccup is a large share of a small read
DEFAULT_GPU_SIZES = "64MiB,256MiB,1GiB,4GiB,16GiB"
PEER_NAMES = ("torch", "safetensors", "numpy", "zarr")
OVERLAP_LAYERS, OVERLAP_LOOKAHEAD = 8, 2


def clone_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in tensors.items()}


class HeldClone:
    """The limit of a put that replaces an entry: copy into new memory while the previous copy is still held
    (the cache keeps the old version until the new one is stored), then let the previous copy go."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.held = clone_all(tensors)

    def __call__(self) -> None:
        self.held = clone_all(self.tensors)


def raw_direct_write(directory: Path, sources: list[torch.Tensor]) -> None:
    """The limit: one thread, one O_DIRECT pwritev per file from page-aligned buffers, then fsync."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for i, source in enumerate(sources):
        fd = os.open(directory / f"f{i}", os.O_CREAT | os.O_WRONLY | O_DIRECT, 0o644)
        try:
            view = buffer_of(source)
            done = 0
            while done < len(view):
                done += os.pwritev(fd, [view[done:]], done)
            os.fsync(fd)
        finally:
            os.close(fd)


def bench_size(size: int, root: Path, repeat: int, progress: Callable[[str], None]) -> list[Row]:
    entry = make_entry(size)
    nbytes = sum(t.numel() * t.element_size() for t in entry.values())
    rows: list[Row] = []

    for tier in ("hbm", "host"):
        progress(f"{tier} put/get {tiercache.format_size(nbytes)}")
        with tiercache.TierCache(root=root, policy=forcing_policy(tier, nbytes), device="cpu") as cache:
            mode = host_mode(cache) if tier == "host" else None
            ours, raw = side_by_side(lambda: cache.put("e", entry), HeldClone(entry), repeat)
            rows.append(row(nbytes, Pathway("put", tier, mode), ours, "memcpy (clone, previous held)", raw))
            get_ours, get_raw = side_by_side(lambda: cache.get("e"), lambda: clone_all(entry), repeat)
            if tier == "hbm":  # a hit hands back the cached tensors: no data moves, there is no copy to compare with
                rows.append(row(nbytes, None, get_ours, "-", [], detail="hbm hit (no copy)"))
            else:
                target = 0.80 if nbytes >= 64 << 20 else None
                rows.append(row(nbytes, Pathway(tier, "hbm", mode), get_ours, "memcpy (clone)", get_raw, target))

    progress(f"nvme put {tiercache.format_size(nbytes)}")
    aligned_sources = []
    for t in entry.values():
        raw_bytes = t.reshape(-1).view(torch.uint8)
        buf = aligned_empty(raw_bytes.numel())
        buf[raw_bytes.numel() :].zero_()
        buf[: raw_bytes.numel()].copy_(raw_bytes)
        aligned_sources.append(buf[: round_up(raw_bytes.numel())])
    scratch = root.parent / "raw-write"
    with tiercache.TierCache(root=root, policy=forcing_policy("nvme", nbytes), device="cpu") as cache:
        io_mode = cache.stats().nvme_io
        ours, raw = side_by_side(
            lambda: cache.put("e", entry), lambda: raw_direct_write(scratch, aligned_sources), repeat
        )
        rows.append(row(nbytes, Pathway("put", "nvme", io_mode), ours, "O_DIRECT pwritev, 1 thread", raw))
    shutil.rmtree(scratch, ignore_errors=True)

    for verify in (True, False):
        progress(f"nvme get (checksums {'on' if verify else 'off'}) {tiercache.format_size(nbytes)}")
        with tiercache.TierCache(
            root=root, policy=forcing_policy("nvme", nbytes, verify=verify), device="cpu"
        ) as cache:
            files = chunk_files(root)
            drop = functools.partial(drop_page_caches, [path for path, _ in files])
            ours, raw = side_by_side(lambda: cache.get("e"), functools.partial(raw_direct_read, files), repeat, drop)
            rows.append(
                row(
                    nbytes,
                    Pathway("nvme", "hbm", cache.stats().nvme_io),
                    ours,
                    "O_DIRECT preadv, 1 thread",
                    raw,
                    0.90,
                    detail=f"crc32c {'checked' if verify else 'not checked'}",
                    checksums=verify,
                )
            )
    shutil.rmtree(root, ignore_errors=True)
    return rows


def markdown(rows: list[Row], env: dict[str, Any]) -> str:
    lines = [
        "# tiercache bench: round trips of every tier beside the raw limit",
        "",
        "Environment: " + "; ".join(f"{k} {v}" for k, v in env.items()),
        "",
        f"Entries are {LAYERS} layers x (K, V) bf16 tensors. Medians of the repetitions; ratio = tiercache's "
        "throughput / the baseline's, both measured in this run, interleaved. Times are of this machine only.",
        "",
        "| size | pathway | median ms | min-max ms | GB/s | baseline | baseline ms | ratio | target |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        target = f">= {r.target:.2f}x {r.verdict}" if r.target is not None else ""
        base_ms = f"{r.baseline_seconds * 1e3:.1f}" if r.baseline_seconds is not None else "-"
        lines.append(
            f"| {tiercache.format_size(r.size)} | {r.case} | {r.seconds * 1e3:.1f} | "
            f"{r.spread[0] * 1e3:.1f}-{r.spread[1] * 1e3:.1f} | {r.gbps:.2f} | "
            f"{r.baseline} | {base_ms} | {ratio} | {target} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    # Shown on stderr whether or not it is a terminal, as before: a cut-short run's log says where it stopped.
    with progress_callback(description="tiercache bench", enabled=True) as bar:
        return run(bar)


def run(bar: Callback) -> int:
    sizes = [tiercache.parse_size(s) for s in os.environ.get("BENCH_SIZES", DEFAULT_SIZES).split(",") if s.strip()]
    gpu_sizes = [
        tiercache.parse_size(s)
        for s in os.environ.get("BENCH_GPU_SIZES", DEFAULT_GPU_SIZES).split(",")
        if s.strip() and torch.cuda.is_available()
    ]
    repeat = int(os.environ.get("BENCH_REPEAT", "5"))
    out = Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parent / "out"))
    root = Path(os.environ.get("BENCH_ROOT", out / "root"))
    out.mkdir(parents=True, exist_ok=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    env = describe(root.parent)
    stolen_at_start = stolen_cpu_seconds()
    overlap_steps = len(overlap_cases(tiercache.default_device()))
    diffusers_size = os.environ.get("BENCH_DIFFUSERS_SIZE", DEFAULT_DIFFUSERS_SIZE)
    handoff_sizes = [
        tiercache.parse_size(s) for s in os.environ.get("BENCH_HANDOFF_SIZES", DEFAULT_SIZES).split(",") if s.strip()
    ]
    remote_sizes = [
        tiercache.parse_size(s) for s in os.environ.get("BENCH_REMOTE_SIZES", "16MiB,64MiB").split(",") if s.strip()
    ]
    object_sizes = [
        tiercache.parse_size(s) for s in os.environ.get("BENCH_OBJECT_SIZES", "16MiB,64MiB").split(",") if s.strip()
    ]
    bar.set_size(
        len(sizes) * (5 + len(PEER_NAMES))
        + 3 * len(gpu_sizes)
        + len(WORKLOADS)
        + overlap_steps
        + 1
        + diffusers_steps(diffusers_size)
        + len(handoff_sizes)
        + (1 + 2 * len(remote_sizes) if remote_sizes else 0)
        + (1 + 2 * len(object_sizes) if object_sizes else 0)
    )

    def progress(step: str) -> None:  # a step starts: the bar counts it and names it
        bar.set_description(step)
        bar.relative_update()

    shutil.rmtree(root, ignore_errors=True)

    def reps(size: int) -> int:
        return 2 * repeat if size <= SMALL else repeat if size < LARGE else min(repeat, LARGE_REPEAT)

    def peer_reps(size: int) -> int:  # a peer's save is slow: at most 3 repetitions above SMALL
        return reps(size) if size <= SMALL else min(reps(size), 3)

    rows: list[Row] = []
    partial = out / "report.partial.md"  # what was measured so far, should the run be cut short
    for earlier in ("report.md", "report.json"):  # an earlier run's, which a partial one must not sit beside
        (out / earlier).unlink(missing_ok=True)

    def measured(new: list[Row]) -> None:
        rows.extend(new)
        (out / "report.partial.md.tmp").write_text(markdown(rows, env))
        os.replace(out / "report.partial.md.tmp", partial)  # a run killed mid-write leaves the previous one whole

    for size in sizes:
        measured(bench_size(size, root, reps(size), progress))
    for size in gpu_sizes:
        measured(bench_cuda(size, root, reps(size), progress))
    for size in sizes:
        measured(bench_peers(size, root, peer_reps(size), progress))
    workload_cap = tiercache.parse_size(os.environ.get("BENCH_WORKLOAD_CAP", "64MiB"))
    measured(bench_workloads(workload_cap, root, min(repeat, 3), progress))
    measured(bench_latency(tiercache.parse_size(os.environ.get("BENCH_DEMOTION", "1GiB")), root, progress))
    measured(bench_diffusers(diffusers_size, root, min(repeat, 3), progress))
    measured(bench_handoff(handoff_sizes, root, min(repeat, 3), progress))
    measured(bench_remote(remote_sizes, root / "remote", min(repeat, 3), progress))
    measured(bench_object(object_sizes, root / "object", min(repeat, 3), progress))
    layer = tiercache.parse_size(os.environ.get("BENCH_OVERLAP_LAYER", "16MiB"))
    overlap = bench_overlap(layer, OVERLAP_LAYERS, root, min(repeat, 3), OVERLAP_LOOKAHEAD, progress)
    chart = latency_chart(rows, out / "latency_chart.png")
    stolen_at_end = stolen_cpu_seconds()
    if stolen_at_start is not None and stolen_at_end is not None:
        env["cpu_stolen_during_run_s"] = round(stolen_at_end - stolen_at_start, 1)  # > 0: a VM whose host was busy
    report = markdown(rows, env) + "\n" + seed_table(rows) + "\n" + overlap_table(overlap, OVERLAP_LOOKAHEAD)
    said = ([f"latency_chart.png: panels {', '.join(chart.panels)}"] if chart.path is not None else []) + chart.notes
    report += "\n" + "; ".join(said) + "\n" if said else ""
    (out / "report.md").write_text(report)
    partial.unlink(missing_ok=True)
    (out / "report.json").write_text(
        json.dumps(
            {
                "environment": env,
                "repeat": repeat,
                "rows": [r.as_json() for r in rows],
                "overlap": [
                    asdict(o)
                    | {
                        "ratio": o.ratio,
                        "sum_ratio": o.sum_ratio,
                        "streamed_ratio": o.streamed_ratio,
                        "efficiency": o.efficiency,
                    }
                    for o in overlap
                ],
            },
            indent=1,
        )
    )
    bar.close()  # its last line ends before the report is printed (closing again on the way out does nothing)
    print(report)
    written = ", ".join(str(out / f) for f in ("report.md", "report.json", "latency_chart.png") if (out / f).exists())
    print(f"written: {written}", file=sys.stderr)
    return 0
