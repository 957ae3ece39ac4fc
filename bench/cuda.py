"""The GPU pathways (run only where CUDA works), each beside its raw limit measured in the same run.

- host(pinned) <-> hbm: tiercache's reload and offload through the pinned pool vs a raw `copy_(non_blocking=True)`
  (cudaMemcpyAsync) between pinned host memory and fresh device memory, synchronized;
- host(pageable) <-> hbm: the same with `tiers.host.pinned = false` vs `Tensor.to(device)` / `.cpu()` of pageable
  tensors (also what users do today without a cache);
- nvme <-> hbm through kvikio vs raw `kvikio.CuFile.pread` / `pwrite` of the same files into device memory, at the
  best thread count and task size found for the raw reads (the cache is given the same settings);
- the page cache is dropped for the files read before every cold read.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.io import ALIGN
from tiercache.io.aligned import aligned_view
from tiercache.pathway import Pathway

from .measure import Row, chunk_files, drop_page_caches, host_mode, make_entry, row, side_by_side, timed

THREADS, TASK_SIZES = (8, 16, 32), (4 << 20, 16 << 20)
SWEEP_UP_TO = 1 << 30  # larger entries reuse the best settings found at the largest size swept (time, disk)
_best: list[tuple[int, int]] = []


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` then a device synchronize: tiercache's copies are asynchronous, as the raw ones are."""

    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def gpu_policy(tier: str, nbytes: int, *, pinned: bool = True, **nvme: Any) -> tiercache.Policy:
    tiers: dict[str, Any] = {t: {"capacity": 0} for t in tiercache.TIER_NAMES}
    tiers[tier] = {"capacity": 2 * nbytes + (1 << 20)}
    tiers["nvme"].update(nvme)
    if not pinned:
        tiers["host"]["pinned"] = False
    return tiercache.Policy.from_dict(
        {"name": f"bench-{tier}", "tiers": tiers, "placement": {"promote_on_hit": False}}, source="bench"
    )


def nvme_mode(cache: tiercache.TierCache) -> str:
    """How the nvme tier moves bytes to and from the GPU: kvikio's mode, or POSIX's where kvikio is not used."""
    stats = cache.stats()
    return stats.nvme_device_io if stats.nvme_device_io != "none" else stats.nvme_io


def bench_cuda(size: int, root: Path, repeat: int, progress: Callable[[str], None]) -> list[Row]:
    host_entry = make_entry(size)
    device_entry = {n: t.cuda() for n, t in host_entry.items()}
    nbytes = sum(t.nbytes for t in host_entry.values())
    rows: list[Row] = []
    pinned = {n: t.pin_memory() for n, t in host_entry.items()}

    def raw_h2d() -> object:
        return {n: torch.empty_like(t, device="cuda").copy_(t, non_blocking=True) for n, t in pinned.items()}

    def raw_d2h() -> object:
        for n, t in device_entry.items():
            pinned[n].copy_(t, non_blocking=True)
        return pinned

    for pin in (True, False):
        asked = Pathway("host", "hbm", "pinned" if pin else "pageable")
        progress(f"{asked} and back {tiercache.format_size(nbytes)}")
        with tiercache.TierCache(root=root, policy=gpu_policy("host", nbytes, pinned=pin), device="cuda") as cache:
            # What the pool really is: a pool that could not be pinned is pageable, and not held to pinned targets.
            mode = host_mode(cache)
            detail = "GPU" if mode == asked.mode else "GPU, pinning refused"
            put_raw = synced(raw_d2h) if pin else synced(lambda: {n: t.cpu() for n, t in device_entry.items()})
            get_raw = synced(raw_h2d) if pin else synced(lambda: {n: t.cuda() for n, t in host_entry.items()})
            base = "pinned cudaMemcpyAsync" if pin else "pageable .cpu() / .to(cuda)"
            pinned_pool = mode == "pinned"
            ours, raw = side_by_side(synced(lambda: cache.put("e", device_entry)), put_raw, repeat)
            offload = Pathway("put", "host", mode)
            target = 0.95 if pinned_pool else None
            rows.append(row(nbytes, offload, ours, base, raw, target, detail=detail, suite="gpu"))
            ours, raw = side_by_side(synced(lambda: cache.get("e")), get_raw, repeat)
            target = 0.95 if pinned_pool and nbytes >= 64 << 20 else None
            rows.append(row(nbytes, Pathway("host", "hbm", mode), ours, base, raw, target, detail=detail, suite="gpu"))
    rows += bench_kvikio(nbytes, device_entry, root, repeat, progress)
    shutil.rmtree(root, ignore_errors=True)
    return rows


def bench_kvikio(
    nbytes: int, entry: dict[str, torch.Tensor], root: Path, repeat: int, progress: Callable[[str], None]
) -> list[Row]:
    try:
        import kvikio  # noqa: PLC0415 - the cuda extra
    except Exception as exc:  # noqa: BLE001 - not installed (ImportError), or no libcufile (RuntimeError)
        progress(f"kvikio rows skipped: {type(exc).__name__}: {exc}")
        return []
    progress(f"nvme <-> hbm through kvikio {tiercache.format_size(nbytes)}")
    with tiercache.TierCache(root=root, policy=gpu_policy("nvme", nbytes, backend="kvikio"), device="cuda") as cache:
        cache.put("e", entry)
        files = chunk_files(root)
    drop = functools.partial(drop_page_caches, [path for path, _ in files])
    if nbytes <= SWEEP_UP_TO or not _best:
        best, best_s = (THREADS[0], TASK_SIZES[0]), float("inf")
        for threads in THREADS:  # the raw read's best settings, which the cache then gets too
            for task in TASK_SIZES:
                with kvikio.defaults.set({"num_threads": threads, "task_size": task}):  # restored after
                    drop()
                    seconds = timed(functools.partial(raw_kvikio_read, kvikio, files))
                if seconds < best_s:
                    best, best_s = (threads, task), seconds
        _best.append(best)
    threads, task = _best[-1]
    with kvikio.defaults.set({"num_threads": threads, "task_size": task}):  # for the raw rows; restored after
        return _kvikio_rows(kvikio, nbytes, entry, root, repeat, threads, task)


def _kvikio_rows(
    kvikio: Any, nbytes: int, entry: dict[str, torch.Tensor], root: Path, repeat: int, threads: int, task: int
) -> list[Row]:
    """The kvikio rows at the raw read's best settings, which the cache gets too."""
    rows = []
    settings: dict[str, Any] = {"backend": "kvikio", "threads": threads, "task_size": task}
    scratch = root.parent / "raw-kvikio-write"
    scratch.mkdir(parents=True, exist_ok=True)
    with tiercache.TierCache(root=root, policy=gpu_policy("nvme", nbytes, **settings), device="cuda") as cache:
        mode = nvme_mode(cache)
        tag = f"GPU, kvikio, {threads} threads, {tiercache.format_size(task)} tasks"
        ours, raw = side_by_side(
            synced(lambda: cache.put("e", entry)),
            functools.partial(raw_kvikio_write, kvikio, scratch, list(entry.values())),
            repeat,
        )
        offload = Pathway("put", "nvme", mode)
        rows.append(row(nbytes, offload, ours, "raw kvikio CuFile.pwrite", raw, detail=tag, suite="gpu"))
    shutil.rmtree(scratch, ignore_errors=True)
    files = chunk_files(root)  # the last put's files: the reads below get them, raw and through the cache
    drop = functools.partial(drop_page_caches, [path for path, _ in files])
    for verify in (True, False):  # one cache at a time holds the root
        policy = gpu_policy("nvme", nbytes, verify_checksums=verify, **settings)
        with tiercache.TierCache(root=root, policy=policy, device="cuda") as reader:
            reload = Pathway("nvme", "hbm", nvme_mode(reader))
            ours, raw = side_by_side(
                synced(lambda: reader.get("e")), functools.partial(raw_kvikio_read, kvikio, files), repeat, drop
            )
        crc = "crc32c checked on the GPU" if verify else "crc32c not checked"
        rows.append(
            row(
                nbytes,
                reload,
                ours,
                "raw kvikio CuFile.pread",
                raw,
                0.90,
                detail=f"{tag}, {crc}",
                suite="gpu",
                checksums=verify,
            )
        )
    return rows


def raw_kvikio_read(kvikio: Any, files: list[tuple[Path, int]]) -> list[torch.Tensor]:
    """The limit: every file read at once by kvikio into its own fresh device buffer, page-aligned as the cache's
    are (GDS bounces reads into unaligned memory), then waited for."""
    buffers = [aligned_view(torch.empty(size + ALIGN, dtype=torch.uint8, device="cuda"), size) for _, size in files]
    handles = [kvikio.CuFile(str(path), "r") for path, _ in files]
    try:
        futures = [h.pread(b, b.numel(), 0) for h, b in zip(handles, buffers, strict=True)]
        for future in futures:
            future.get()
    finally:
        for h in handles:
            h.close()
    return buffers


def raw_kvikio_write(kvikio: Any, directory: Path, tensors: list[torch.Tensor]) -> None:
    """The limit: each tensor written by kvikio from device memory to a file of its own, then fsynced."""
    import os  # noqa: PLC0415

    for i, tensor in enumerate(tensors):
        path = directory / f"f{i}"
        with kvikio.CuFile(str(path), "w") as f:
            f.pwrite(tensor.reshape(-1).view(torch.uint8), tensor.nbytes, 0).get()
        fd = os.open(path, os.O_WRONLY)
        os.fsync(fd)
        os.close(fd)
