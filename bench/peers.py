"""What users do today, side by side with tiercache's nvme tier on the same tensors: torch.save / torch.load,
safetensors save_file / load_file (diffusers' disk offload), numpy .npy per tensor, and zarr-python's own
write / read with its defaults. Every save is followed by an fsync of what it wrote (tiercache's puts are
durable), the page cache of every file read is dropped before each load, tiercache's included, and every load
is timed until one byte of each page has been read (a memory-mapped load reads nothing until touched).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import zarr

import tiercache
from tiercache.pathway import Pathway

from .measure import Row, chunk_files, drop_page_caches, forcing_policy, make_entry, row, side_by_side

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Peer:
    name: str
    save: Callable[[Tensors, Path], None]  # writes under the given directory, durably
    load: Callable[[Path], Tensors]


def touch(tensors: Tensors) -> Tensors:
    """Read one byte of every page: a load that maps its file (safetensors) reads nothing until touched, so
    every load is timed until its data is in memory. tiercache's tensors are touched the same way."""
    for t in tensors.values():
        t.reshape(-1).view(torch.uint8)[::4096].sum()
    return tensors


def _fsync_tree(directory: Path) -> None:
    for path in [directory, *directory.rglob("*")]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy and zarr have no bfloat16: store its bits as uint16, as tiercache does."""
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _torch_save(entry: Tensors, d: Path) -> None:
    torch.save(entry, d / "entry.pt")
    _fsync_tree(d)


def _safetensors_save(entry: Tensors, d: Path) -> None:
    safetensors.torch.save_file(entry, str(d / "entry.safetensors"))
    _fsync_tree(d)


def _npy_save(entry: Tensors, d: Path) -> None:
    for i, t in enumerate(entry.values()):
        np.save(d / f"t{i}.npy", _as_numpy(t))
    _fsync_tree(d)


def _npy_load(d: Path, names: list[str]) -> Tensors:
    return {n: torch.from_numpy(np.load(d / f"t{i}.npy")).view(torch.bfloat16) for i, n in enumerate(names)}


def _zarr_save(entry: Tensors, d: Path) -> None:
    group = zarr.open_group(d / "entry.zarr", mode="w")
    for i, t in enumerate(entry.values()):
        group.create_array(f"t{i}", data=_as_numpy(t))  # zarr's defaults: one chunking and compressor choice
    _fsync_tree(d)


def _zarr_load(d: Path, names: list[str]) -> Tensors:
    group = zarr.open_group(d / "entry.zarr", mode="r")
    return {n: torch.from_numpy(np.asarray(group[f"t{i}"][...])).view(torch.bfloat16) for i, n in enumerate(names)}


def peers(names: list[str]) -> list[Peer]:
    return [
        Peer("torch.save / torch.load", _torch_save, lambda d: torch.load(d / "entry.pt")),
        Peer(
            "safetensors save_file / load_file",
            _safetensors_save,
            lambda d: safetensors.torch.load_file(str(d / "entry.safetensors")),
        ),
        Peer("numpy .npy per tensor", _npy_save, lambda d: _npy_load(d, names)),
        Peer("zarr-python defaults", _zarr_save, lambda d: _zarr_load(d, names)),
    ]


def bench_peers(size: int, root: Path, repeat: int, progress: Callable[[str], None]) -> list[Row]:
    """tiercache nvme put and cold get against each peer's save and cold load of the same entry."""
    entry = make_entry(size)
    nbytes = sum(t.numel() * t.element_size() for t in entry.values())
    scratch = root.parent / "peers"
    rows: list[Row] = []
    with tiercache.TierCache(root=root, policy=forcing_policy("nvme", nbytes), device="cpu") as cache:
        io_mode = cache.stats().nvme_io
        cache.put("e", entry)
        for peer in peers(list(entry)):
            progress(f"peer {peer.name} {tiercache.format_size(nbytes)}")
            target = scratch / peer.name.split()[0]

            def save(peer: Peer = peer, target: Path = target) -> None:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                peer.save(entry, target)

            ours, theirs = side_by_side(lambda: cache.put("e", entry), save, repeat)
            rows.append(
                row(
                    nbytes,
                    Pathway("put", "nvme", io_mode),
                    ours,
                    f"{peer.name} (+fsync)",
                    theirs,
                    detail=f"vs {peer.name.split(' / ')[0]}",
                    suite="peers",
                )
            )
            files = [p for p, _ in chunk_files(root)] + [p for p in target.rglob("*") if p.is_file()]
            loaded = peer.load(target)
            assert all(torch.equal(loaded[n].view(torch.uint16), t.view(torch.uint16)) for n, t in entry.items())
            del loaded  # a mapped file's pages stay cached while any of its tensors lives
            ours, theirs = side_by_side(
                lambda: touch(cache.get("e")),
                lambda peer=peer, target=target: touch(peer.load(target)),
                repeat,
                lambda files=files: drop_page_caches(files),
            )
            faster_than = 1.0 if peer.name.startswith(("torch", "safetensors")) else None
            rows.append(
                row(
                    nbytes,
                    Pathway("nvme", "hbm", io_mode),
                    ours,
                    f"{peer.name} (+touch)",
                    theirs,
                    faster_than,
                    detail=f"vs {peer.name.split(' / ')[-1]}, cold",
                    suite="peers",
                    checksums=True,
                )
            )
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return rows
