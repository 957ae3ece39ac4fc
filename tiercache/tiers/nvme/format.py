"""The nvme tier's on-disk format: one zarr v3 group per entry, written atomically, checksummed, re-indexed on open.

    ROOT/.lock                       held (flock) by the one cache that has ROOT open
    ROOT/entries/zarr.json           a zarr group whose members are the entries
    ROOT/entries/<H>-<U>/zarr.json   an entry: a zarr group; attributes["tiercache"] is its manifest
    ROOT/entries/<H>-<U>/t<i>/...    tensor i: a zarr array, one chunk, codecs bytes(little) + crc32c
    ROOT/tmp/, ROOT/trash/           entries being written / being removed; emptied on open

H hashes the key (keys are attributes, never file names, so no key can reach outside ROOT); U is unique per write,
so a new version of a key never collides with an old one still being read. A chunk file holds the tensor's raw
little-endian bytes followed by their CRC32C, exactly what zarr's crc32c codec writes and checks, so zarr-python
reads every entry back by itself. bfloat16 and float8 are stored as same-width unsigned integers with the real
dtype in the attributes. Every chunk is written, even when it equals the fill value.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...entry import EntrySpec, TensorSpec
from ...errors import RootInUseError
from ...io.files import FileOps

FORMAT = "tiercache-entry"
FORMAT_VERSION = 1
CHECKSUM_BYTES = 4

# tiercache dtype -> (zarr v3 data_type, fill_value). Types zarr lacks are stored as same-width unsigned views.
ZARR_TYPES: dict[str, tuple[str, Any]] = {
    "bool": ("bool", False),
    **{t: (t, 0) for t in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")},
    **{t: (t, 0.0) for t in ("float16", "float32", "float64")},
    "bfloat16": ("uint16", 0),
    "float8_e4m3fn": ("uint8", 0),
    "float8_e5m2": ("uint8", 0),
    "complex64": ("complex64", [0.0, 0.0]),
    "complex128": ("complex128", [0.0, 0.0]),
}


@dataclass(frozen=True)
class StoredEntry:
    """An entry as it lies on disk."""

    spec: EntrySpec
    path: Path
    checksums: tuple[int | None, ...]  # per tensor; None for an empty tensor (no chunk file)
    written_ns: int

    def chunk_path(self, index: int) -> Path:
        return Path(self.chunk_files[index])

    @functools.cached_property
    def chunk_files(self) -> tuple[str, ...]:
        """Every tensor's chunk file, as the strings os.open takes (built once: pathlib is slow on a hot path)."""
        return tuple(str(chunk_path(self.path / f"t{i}", len(t.shape))) for i, t in enumerate(self.spec.tensors))


def chunk_path(array_dir: Path, ndim: int) -> Path:
    """zarr v3 default chunk key encoding ("/"): "c" for 0-d, "c/0/0/..." for the single chunk of an n-d array."""
    return array_dir.joinpath("c", *(["0"] * ndim))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def group_metadata(spec: EntrySpec, checksums: list[int | None], written_ns: int) -> dict[str, Any]:
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": spec.key,
        "nbytes": spec.nbytes,
        "written_ns": written_ns,
        "tensors": [
            {
                "name": t.name,
                "array": f"t{i}",
                "dtype": t.dtype,
                "shape": list(t.shape),
                "nbytes": t.nbytes,
                "crc32c": c,
            }
            for i, (t, c) in enumerate(zip(spec.tensors, checksums, strict=True))
        ],
    }
    return {"zarr_format": 3, "node_type": "group", "attributes": {"tiercache": manifest}}


def array_metadata(spec: TensorSpec, index: int) -> dict[str, Any]:
    data_type, fill_value = ZARR_TYPES[spec.dtype]
    bytes_codec: dict[str, Any] = {"name": "bytes"}
    if spec.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(spec.shape),
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(d, 1) for d in spec.shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill_value,
        "codecs": [bytes_codec, {"name": "crc32c"}],
        "attributes": {"tiercache": {"name": spec.name, "dtype": spec.dtype, "index": index}},
        "storage_transformers": [],
    }


def parse_group(path: Path, files: FileOps) -> StoredEntry:
    meta = json.loads(files.read_bytes(path / "zarr.json"))
    manifest = meta["attributes"]["tiercache"]
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} manifest")
    tensors = tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in manifest["tensors"])
    for t in tensors:
        if t.dtype not in ZARR_TYPES or any(not isinstance(d, int) or d < 0 for d in t.shape):
            raise ValueError(f"bad tensor spec {t}")
    spec = EntrySpec(key=manifest["key"], tensors=tensors)
    if spec.nbytes != manifest["nbytes"]:
        raise ValueError(f"manifest nbytes {manifest['nbytes']} != sum of its tensors {spec.nbytes}")
    checksums = tuple(t["crc32c"] for t in manifest["tensors"])
    for t, checksum in zip(tensors, checksums, strict=True):
        if not (checksum is None if t.nbytes == 0 else isinstance(checksum, int) and 0 <= checksum < 2**32):
            raise ValueError(f"tensor {t.name!r} has checksum {checksum!r}")
    return StoredEntry(spec=spec, path=path, checksums=checksums, written_ns=int(manifest["written_ns"]))


def parents_between(path: Path, top: Path) -> list[Path]:
    """Directories from `top`'s child down to `path`'s parent (the ones a mkdir(parents=True) may have created)."""
    chain: list[Path] = []
    parent = path.parent
    while parent != top:
        chain.append(parent)
        parent = parent.parent
    return chain


def write_json(path: Path, data: dict[str, Any], files: FileOps, sync: bool = True) -> None:
    files.write_bytes(path, json.dumps(data, indent=1).encode(), sync=sync)


def lock_root(root: Path, files: FileOps) -> int:
    fd = files.open(root / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        files.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as exc:
        files.close(fd)  # whatever stopped the lock, the descriptor does not outlive it
        if isinstance(exc, BlockingIOError):
            raise RootInUseError(
                f"{root} is already open by another TierCache (this process or another); "
                "close that cache first, or give this one a different root="
            ) from None
        raise
    return fd
