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
from ..pathway import Pathway
from ..policy.costmodel import PATHWAYS, PathwayCost, Profile, fit_line
from ..units import format_size
from .progress import Callback

Log = Callable[[str], None]
Result = Callable[[Pathway, float], None]

# The routes measured; together they are the cost model's PATHWAYS (a profile must give every one).
H2D_PINNED, D2H_PINNED = Pathway("host", "hbm", "pinned"), Pathway("hbm", "host", "pinned")
H2D_PAGEABLE, D2H_PAGEABLE = Pathway("host", "hbm", "pageable"), Pathway("hbm", "host", "pageable")
HOST_TO_NVME, DEVICE_TO_NVME = Pathway("host", "nvme"), Pathway("hbm", "nvme")
NVME_TO_HOST, NVME_TO_DEVICE = Pathway("nvme", "host"), Pathway("nvme", "hbm")


def calibrate(
    root: Path,
    *,
    sizes: Sequence[int] = (1 << 20, 16 << 20, 64 << 20, 256 << 20),
    repeat: int = 3,
    name: str = "calibrated",
    threads: int = 4,
    task_size: int = 8 << 20,
    io: str = "auto",
    progress: Callback | None = None,
    log: Log = lambda line: None,
) -> Profile:
    """Measure every pathway at every size (median of `repeat`), fit each, and return a measured profile.

    `progress` is told the number of measurements, then advanced by one as each is made (its description says
    the last one); `log` gets a line per measurement. Neither is closed here."""
    progress = progress or Callback()
    cuda = torch.cuda.is_available()
    workdir = root / f"calibrate-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    backend = PosixIO(workdir, threads=threads, task_size=task_size, io=io)
    points: dict[Pathway, list[tuple[int, float]]] = {p: [] for p in PATHWAYS}
    steps = len(sizes) * len(PATHWAYS)
    progress.set_size(steps)
    try:
        for size in sizes:

            def measured(pathway: Pathway, seconds: float, size: int = size) -> None:
                points[pathway].append((size, seconds))
                step = sum(len(v) for v in points.values())
                rate = f"{seconds * 1e3:9.2f} ms ({size / seconds / 1e9:6.2f} GB/s)"
                log(f"[{step:>2}/{steps}] {str(pathway):<20} {format_size(size):>9}: {rate}")
                progress.set_description(f"{pathway} {format_size(size)}: {size / seconds / 1e9:.2f} GB/s")
                progress.relative_update()

            _measure_size(size, repeat, backend, workdir, cuda, measured)
    finally:
        backend.close()
        shutil.rmtree(workdir, ignore_errors=True)
    fitted: dict[Pathway, PathwayCost] = {p: fit_line(points[p]) for p in PATHWAYS}
    device = torch.cuda.get_device_name() if cuda else "no GPU (memory pathways are memcpy)"
    source = (
        f"measured by tiercache calibrate on {socket.gethostname()} ({platform.machine()}, {device}), "
        f"{datetime.date.today().isoformat()}, sizes {', '.join(format_size(s) for s in sizes)}, "
        f"median of {repeat}; nvme through {backend.mode} I/O ({threads} threads, "
        f"{format_size(task_size)} tasks) in {root}"
    )
    return Profile(name=name, source=source, measured=True, pathways=fitted, description=f"this machine: {device}")


def _measure_size(size: int, repeat: int, io: PosixIO, workdir: Path, cuda: bool, measured: Result) -> None:
    """Measure every pathway at one size, telling `measured` each result as it comes."""
    host = aligned_empty(size)[:size]
    host.fill_(1)
    other = torch.empty(size, dtype=torch.uint8)
    other.fill_(2)

    def got(seconds: float, *pathways: Pathway) -> None:
        for pathway in pathways:
            measured(pathway, seconds)

    if cuda:
        device = torch.empty(size, dtype=torch.uint8, device="cuda")
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pinned.fill_(3)
        got(_median(repeat, lambda: device.copy_(pinned, non_blocking=True), sync=True), H2D_PINNED)
        got(_median(repeat, lambda: pinned.copy_(device, non_blocking=True), sync=True), D2H_PINNED)
        got(_median(repeat, lambda: device.copy_(other), sync=True), H2D_PAGEABLE)
        got(_median(repeat, lambda: other.copy_(device), sync=True), D2H_PAGEABLE)
    else:  # no device: both host kinds are the same memcpy
        got(_median(repeat, lambda: other.copy_(host)), H2D_PINNED, H2D_PAGEABLE)
        got(_median(repeat, lambda: host.copy_(other)), D2H_PINNED, D2H_PAGEABLE)

    files: list[Path] = []

    def write(source: torch.Tensor) -> None:
        path = workdir / f"w{len(files)}"
        files.append(path)
        io.write_file(path, source.cpu() if source.is_cuda else source)

    if cuda:
        got(_median(repeat, lambda: write(host)), HOST_TO_NVME)
        got(_median(repeat, lambda: write(device)), DEVICE_TO_NVME)
    else:
        got(_median(repeat, lambda: write(host)), HOST_TO_NVME, DEVICE_TO_NVME)

    def read(to_device: bool) -> float:
        drop_page_cache(files[0])
        dest = aligned_empty(size)
        start = time.perf_counter()
        io.read_file(files[0], dest, size).finish()
        if to_device:
            device.copy_(dest[:size])
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if cuda:
        got(statistics.median(read(False) for _ in range(repeat)), NVME_TO_HOST)
        got(statistics.median(read(True) for _ in range(repeat)), NVME_TO_DEVICE)
    else:
        got(statistics.median(read(False) for _ in range(repeat)), NVME_TO_HOST, NVME_TO_DEVICE)
    for path in files:
        path.unlink(missing_ok=True)


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
