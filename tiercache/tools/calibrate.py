"""`tiercache calibrate`: measure this machine's pathways and fit latency + bytes / bandwidth for each.

Memory pathways are raw copies into buffers allocated (and touched) beforehand: pinned and pageable
cudaMemcpy where CUDA works, memcpy where it does not (then "pinned" and "pageable" are the same memcpy).
nvme pathways go through the active POSIX backend (O_DIRECT where the filesystem allows it) with the page
cache dropped before every read; on a CUDA machine nvme->hbm adds the host-to-device copy.
"""

from __future__ import annotations

import datetime
import platform
import shutil
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..io import PosixIO, aligned_empty, drop_page_cache
from ..policy.costmodel import PATHWAYS, PathwayCost, Profile, fit_line
from ..units import format_size

Progress = Callable[[str], None]


def calibrate(
    root: Path,
    *,
    sizes: Sequence[int] = (1 << 20, 16 << 20, 64 << 20, 256 << 20),
    repeat: int = 3,
    name: str = "calibrated",
    threads: int = 4,
    task_size: int = 8 << 20,
    io: str = "auto",
    progress: Progress = lambda line: None,
) -> Profile:
    """Measure every pathway at every size (median of `repeat`), fit each, and return a measured profile."""
    cuda = torch.cuda.is_available()
    workdir = root / f"calibrate-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    backend = PosixIO(workdir, threads=threads, task_size=task_size, io=io)
    points: dict[str, list[tuple[int, float]]] = {p: [] for p in PATHWAYS}
    steps = len(sizes) * len(PATHWAYS)
    try:
        for size in sizes:
            for pathway, seconds in _measure_size(size, repeat, backend, workdir, cuda):
                points[pathway].append((size, seconds))
                step = sum(len(v) for v in points.values())
                progress(
                    f"[{step:>2}/{steps}] {pathway:<20} {format_size(size):>9}: {seconds * 1e3:9.2f} ms "
                    f"({size / seconds / 1e9:6.2f} GB/s)"
                )
    finally:
        backend.close()
        shutil.rmtree(workdir, ignore_errors=True)
    fitted: dict[str, PathwayCost] = {p: fit_line(points[p]) for p in PATHWAYS}
    device = torch.cuda.get_device_name() if cuda else "no GPU (memory pathways are memcpy)"
    source = (
        f"measured by tiercache calibrate on {socket.gethostname()} ({platform.machine()}, {device}), "
        f"{datetime.date.today().isoformat()}, sizes {', '.join(format_size(s) for s in sizes)}, "
        f"median of {repeat}; nvme through {backend.mode} I/O ({threads} threads, "
        f"{format_size(task_size)} tasks) in {root}"
    )
    return Profile(name=name, source=source, measured=True, pathways=fitted, description=f"this machine: {device}")


def _measure_size(size: int, repeat: int, io: PosixIO, workdir: Path, cuda: bool) -> list[tuple[str, float]]:
    host = aligned_empty(size)[:size]
    host.fill_(1)
    other = torch.empty(size, dtype=torch.uint8)
    other.fill_(2)
    results: dict[str, float] = {}
    if cuda:
        device = torch.empty(size, dtype=torch.uint8, device="cuda")
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pinned.fill_(3)
        results["host(pinned)->hbm"] = _median(repeat, lambda: device.copy_(pinned, non_blocking=True), sync=True)
        results["hbm->host(pinned)"] = _median(repeat, lambda: pinned.copy_(device, non_blocking=True), sync=True)
        results["host(pageable)->hbm"] = _median(repeat, lambda: device.copy_(other), sync=True)
        results["hbm->host(pageable)"] = _median(repeat, lambda: other.copy_(device), sync=True)
    else:
        copy = _median(repeat, lambda: other.copy_(host))
        back = _median(repeat, lambda: host.copy_(other))
        results["host(pinned)->hbm"] = results["host(pageable)->hbm"] = copy
        results["hbm->host(pinned)"] = results["hbm->host(pageable)"] = back

    files: list[Path] = []

    def write(source: torch.Tensor) -> None:
        path = workdir / f"w{len(files)}"
        files.append(path)
        io.write_file(path, source.cpu() if source.is_cuda else source)

    results["host->nvme"] = _median(repeat, lambda: write(host))
    results["hbm->nvme"] = _median(repeat, lambda: write(device)) if cuda else results["host->nvme"]

    def read(to_device: bool) -> float:
        drop_page_cache(files[0])
        dest = aligned_empty(size)
        start = time.perf_counter()
        io.read_file(files[0], dest, size).finish()
        if to_device:
            device.copy_(dest[:size])
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results["nvme->host"] = statistics.median(read(False) for _ in range(repeat))
    results["nvme->hbm"] = statistics.median(read(True) for _ in range(repeat)) if cuda else results["nvme->host"]
    for path in files:
        path.unlink(missing_ok=True)
    return [(p, results[p]) for p in PATHWAYS]


def _median(repeat: int, op: Callable[[], object], sync: bool = False) -> float:
    op()  # warm-up
    if sync:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        op()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
