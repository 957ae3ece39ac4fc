"""Shared measuring tools of the benchmarks: entries, policies that force a tier, side-by-side timing, rows."""

from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.io import aligned_empty, buffer_of, drop_page_cache, round_up
from tiercache.io.posix import O_DIRECT
from tiercache.pathway import Pathway

LAYERS = 8  # an entry is LAYERS x (K, V) bf16 tensors, like one block range of a Flux K/V cache


SUITES = ("tiers", "gpu", "peers", "workloads", "latency", "diffusers", "handoff", "remote", "object")


@dataclass
class Row:
    size: int
    case: str  # the title in the report: the pathway's one spelling, then what tells the row apart (title())
    seconds: float  # median
    spread: tuple[float, float]  # min, max
    baseline: str
    baseline_seconds: float | None
    target: float | None = None  # the least acceptable ratio, where the project states one
    pathway: Pathway | None = None  # the tiercache pathway timed; None where no data moves (a hit in hbm)
    # Which benchmark made it: "tiers" (hbm is host memory), "gpu" (bench/cuda.py, hbm is a CUDA device),
    # "peers" (tiercache beside other libraries), "workloads" (bench/workloads.py's entries), "latency" (a hot get
    # while a demotion writes, bench/latency.py; ratio = idle over busy: >= 0.5 is "p99 at most 2x idle"),
    # "diffusers" (tiercache.integrations.diffusers beside diffusers' own offloading, bench/diffusers.py),
    # "handoff" (a fresh process's open + first get beside torch.load, safetensors and raw reads, bench/handoff.py).
    # Charts and the seed table pick rows by suite and pathway.
    suite: str = "tiers"
    checksums: bool | None = None  # an nvme read: whether crc32c was checked; None where that does not apply
    detail: str = ""  # what the title says beside the pathway (the peer, the workload, kvikio's settings)

    def as_json(self) -> dict[str, Any]:
        """The row as report.json records it: the pathway as its one spelling, and the derived figures."""
        return asdict(self) | {
            "pathway": None if self.pathway is None else str(self.pathway),
            "gbps": self.gbps,
            "ratio": self.ratio,
            "verdict": self.verdict,
        }

    @property
    def gbps(self) -> float:
        return self.size / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    @property
    def ratio(self) -> float | None:
        """tiercache's throughput over the baseline's (>= 1: tiercache is at least as fast)."""
        return self.baseline_seconds / self.seconds if self.baseline_seconds and self.seconds > 0 else None

    @property
    def verdict(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        return "met" if self.ratio >= self.target else "BELOW"


def make_entry(size: int) -> dict[str, torch.Tensor]:
    per_tensor = max(1, size // (2 * LAYERS) // 2)
    gen = torch.Generator().manual_seed(size)
    return {
        f"block{i}.{kv}": torch.randn(per_tensor, generator=gen).to(torch.bfloat16)
        for i in range(LAYERS)
        for kv in ("k", "v")
    }


def forcing_policy(tier: str, size: int, *, verify: bool = True) -> tiercache.Policy:
    tiers: dict[str, Any] = {t: {"capacity": 0} for t in tiercache.TIER_NAMES}
    tiers[tier] = {"capacity": 2 * size + (1 << 20)}
    tiers["nvme"].update({"verify_checksums": verify})
    return tiercache.Policy.from_dict(
        {"name": f"bench-{tier}", "tiers": tiers, "placement": {"promote_on_hit": False}}, source="bench"
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def side_by_side(
    ours: Callable[[], object],
    raw: Callable[[], object] | None,
    repeat: int,
    before: Callable[[], None] = lambda: None,
) -> tuple[list[float], list[float]]:
    """Warm up once, then alternate ours / raw `repeat` times so drift hits both alike. `before` runs untimed
    ahead of every call (dropping the page cache, for instance)."""
    a: list[float] = []
    b: list[float] = []
    for rep in range(repeat + 1):
        before()
        ours_s = timed(ours)
        raw_s = None
        if raw is not None:
            before()
            raw_s = timed(raw)
        if rep:  # the first round is the warm-up
            a.append(ours_s)
            if raw_s is not None:
                b.append(raw_s)
    return a, b


def title(pathway: Pathway | None, detail: str = "") -> str:
    """A row's title: `str(pathway)` (the one spelling), then the detail in brackets; the detail alone without one."""
    if pathway is None:
        return detail
    return f"{pathway} ({detail})" if detail else str(pathway)


def row(
    size: int,
    pathway: Pathway | None,
    ours: list[float],
    baseline: str,
    raw: list[float],
    target: float | None = None,
    *,
    detail: str = "",
    suite: str = "tiers",
    checksums: bool | None = None,
) -> Row:
    assert suite in SUITES, suite
    return Row(
        size,
        title(pathway, detail),
        statistics.median(ours),
        (min(ours), max(ours)),
        baseline,
        statistics.median(raw) if raw else None,
        target,
        pathway,
        suite,
        checksums,
        detail,
    )


def host_mode(cache: tiercache.TierCache) -> str:
    """How the host tier's pool really is, "pinned" or "pageable" (a pool that could not be pinned is pageable)."""
    mode = cache.stats().tiers["host"].mode
    assert mode is not None, "the host tier names its mode"
    return mode


def chunk_files(root: Path) -> list[tuple[Path, int]]:
    """The chunk files of the entries published under root (with a manifest: not versions on their way out)."""
    if not (root / "entries").is_dir():  # a cache with no nvme tier writes nothing there
        return []
    published = [d for d in (root / "entries").iterdir() if (d / "zarr.json").is_file() and d.is_dir()]
    files = [p for d in published for p in d.glob("t*/c/**/*") if p.is_file()]
    return [(p, p.stat().st_size) for p in sorted(files)]


def drop_page_caches(paths: list[Path]) -> None:
    for path in paths:
        drop_page_cache(path)


def raw_direct_read(files: list[tuple[Path, int]]) -> list[torch.Tensor]:
    """The limit: one thread, one O_DIRECT preadv per file, into one fresh page-aligned region allocated as
    tiercache allocates it (every file at a 4 KiB boundary), kept whole, as a get keeps every tensor it returns."""
    spans = [round_up(size) for _, size in files]
    region = aligned_empty(sum(spans))
    buffers = []
    offset = 0
    for (path, size), span in zip(files, spans, strict=True):
        buffer = region[offset : offset + span]
        offset += span
        buffers.append(buffer)
        direct_read(path, size, buffer_of(buffer))
    return buffers


def direct_read(path: str | Path, size: int, view: memoryview) -> None:
    """One thread's O_DIRECT preadv of a file's `size` bytes into `view` (page-aligned)."""
    fd = os.open(path, os.O_RDONLY | O_DIRECT)
    try:
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done:]], done)
            if n == 0:
                break
            done += n
    finally:
        os.close(fd)


def child_seconds(module: str, *args: str) -> float:
    """Run `python -m MODULE child ARGS...` in a fresh process from the checkout; the seconds it printed last."""
    done = subprocess.run(
        [sys.executable, "-m", module, "child", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} child {' '.join(args[:1])} failed:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


Suite = Callable[[list[int], Path, int, Callable[[str], None]], list[Row]]


def settle() -> None:
    """What a fresh child does before its clock starts: collect what its imports left. A process that has imported
    torch owes a full collection of every object it holds (about a hundred ms on a small VM) once enough objects
    have survived since the last; without this, it lands in whichever timed call allocates first past that point,
    so one side of a comparison pays it and the other does not, by allocation count, not by the code measured."""
    gc.collect()


def run_alone(suite: Suite, child: Callable[[str, list[str]], float]) -> None:
    """`python -m bench.X [SIZE...]` for a suite with fresh-process children: `child MODE ARGS` runs one timed
    child (printing its seconds); otherwise the suite runs at the sizes given (16MiB, 64MiB) and prints its rows."""
    if len(sys.argv) >= 3 and sys.argv[1] == "child":
        settle()
        print(child(sys.argv[2], sys.argv[3:]))
        return
    sizes = [tiercache.parse_size(s) for s in (sys.argv[1:] or ["16MiB", "64MiB"])]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_ROOT")) as scratch:
        for r in suite(sizes, Path(scratch), 3, lambda s: print(s, file=sys.stderr)):
            print(
                f"{tiercache.format_size(r.size)} {r.detail}: tiercache {r.seconds * 1e3:.0f} ms vs {r.baseline} "
                f"{(r.baseline_seconds or 0) * 1e3:.0f} ms: {r.ratio:.2f}x"
                + (f" (target {r.target:.2f}x {r.verdict})" if r.target else "")
            )
