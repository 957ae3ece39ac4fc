"""The nvme tier's on-disk format: one zarr v3 group per entry, written atomically, checksummed, re-indexed on open.

    ROOT/index.sqlite3               the index every cache open on ROOT shares (index.py)
    ROOT/members/<token>.lock        one per open cache, held with a POSIX record lock (lock.py)
    ROOT/entries/zarr.json           a zarr group whose members are the entries
    ROOT/entries/<H>-<U>/zarr.json   an entry: a zarr group; attributes["tiercache"] is its sealed manifest
    ROOT/entries/<H>-<U>/t<i>/...    tensor i: a zarr array, one chunk, codecs bytes(little) + crc32c
    ROOT/tmp/, ROOT/trash/           entries being written / being removed

H hashes the key (keys are attributes, never file names, so no key can reach outside ROOT); U is unique per write,
so a new version of a key never collides with an old one still being read. A chunk file holds the tensor's raw
little-endian bytes followed by their CRC32C, exactly what zarr's crc32c codec writes and checks, so zarr-python
reads every entry back by itself. bfloat16 and float8 are stored as same-width unsigned integers with the real
dtype in the attributes. Every chunk is written, even when it equals the fill value. The manifest carries the
SHA-256 of its own canonical encoding (its seal), so a damaged or edited manifest is never read as another entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ...entry import EntrySpec, TensorSpec
from ...io.files import FileOps

FORMAT = "tiercache-entry"
FORMAT_VERSION = 2
SEAL = "manifest_sha256"  # the manifest field that holds its own checksum
ENTRY_NAME = re.compile(r"[0-9a-f]{32}-[0-9a-f]{16}")  # <H>-<U>
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
    manifest: dict[str, Any] = {
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
    manifest[SEAL] = seal(manifest)
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


def seal(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical encoding (every field but the seal: keys sorted, no spaces, ASCII)."""
    fields = {k: v for k, v in manifest.items() if k != SEAL}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class DamagedEntry(ValueError):
    """An entry directory whose group metadata does not verify: never served, never the reason another is removed."""


def parse_group(path: Path, files: FileOps) -> StoredEntry:
    """The entry in directory `path`, once its manifest verifies: its seal, every field's type, the directory name
    against the key, and each chunk file's size (a missing or resized chunk is damage, found here rather than at
    the first read). Raises DamagedEntry (or OSError) otherwise."""
    stored = parse_manifest(files.read_bytes(path / "zarr.json"), path)
    for index, tspec in enumerate(stored.spec.tensors):
        if tspec.nbytes:
            size = files.stat(stored.chunk_files[index]).st_size
            if size != tspec.nbytes + CHECKSUM_BYTES:
                raise DamagedEntry(
                    f"chunk {stored.chunk_files[index]} holds {size} bytes, the manifest says "
                    f"{tspec.nbytes + CHECKSUM_BYTES}"
                )
    return stored


def parse_manifest(data: bytes, path: Path) -> StoredEntry:
    """The entry whose group metadata (zarr.json) is `data`, in directory or prefix `path`, once its seal, every
    field's type and the name of `path` against the key verify; DamagedEntry otherwise."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedEntry(f"zarr.json is not JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise DamagedEntry("zarr.json is not a zarr v3 group")
    manifest = meta.get("attributes", {}).get("tiercache") if isinstance(meta.get("attributes"), dict) else None
    if not isinstance(manifest, dict):
        raise DamagedEntry("the group has no tiercache manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DamagedEntry(
            f"not a {FORMAT} v{FORMAT_VERSION} manifest (format {manifest.get('format')!r}, version "
            f"{manifest.get('version')!r}): written by another version of tiercache, or damaged"
        )
    try:
        expected = seal(manifest)
    except (TypeError, ValueError) as exc:
        raise DamagedEntry(f"the manifest cannot be encoded: {exc}") from None
    if manifest.get(SEAL) != expected:
        raise DamagedEntry(f"the manifest's {SEAL} does not match its contents (edited or damaged)")
    stored = _entry(path, manifest)
    name = path.name
    if not (ENTRY_NAME.fullmatch(name) and name.startswith(key_hash(stored.spec.key) + "-")):
        raise DamagedEntry(f"the directory name {name!r} does not belong to key {stored.spec.key!r}")
    return stored


def _entry(path: Path, manifest: dict[str, Any]) -> StoredEntry:
    """The StoredEntry a sealed manifest describes, each field checked for its type and consistency."""
    key, tensors_meta, written_ns = manifest.get("key"), manifest.get("tensors"), manifest.get("written_ns")
    if not isinstance(key, str) or not key or not isinstance(tensors_meta, list) or not _is_int(written_ns):
        raise DamagedEntry("the manifest's key, tensors or written_ns has the wrong type")
    tensors: list[TensorSpec] = []
    checksums: list[int | None] = []
    for index, t in enumerate(tensors_meta):
        if not isinstance(t, dict):
            raise DamagedEntry(f"tensor {index} of the manifest is not an object")
        name, dtype, shape, checksum = t.get("name"), t.get("dtype"), t.get("shape"), t.get("crc32c")
        if not (
            isinstance(name, str)
            and isinstance(dtype, str)
            and dtype in ZARR_TYPES
            and isinstance(shape, list)
            and t.get("array") == f"t{index}"
        ):
            raise DamagedEntry(f"tensor {index} of the manifest has a bad name, dtype, shape or array")
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise DamagedEntry(f"tensor {name!r} has shape {shape!r}")
        spec = TensorSpec(name, dtype, tuple(shape))
        if t.get("nbytes") != spec.nbytes:
            raise DamagedEntry(f"tensor {name!r}: nbytes {t.get('nbytes')!r}, its shape and dtype make {spec.nbytes}")
        if not (checksum is None if spec.nbytes == 0 else _is_int(checksum) and 0 <= checksum < 2**32):
            raise DamagedEntry(f"tensor {name!r} has checksum {checksum!r}")
        tensors.append(spec)
        checksums.append(checksum)
    if len({t.name for t in tensors}) != len(tensors):
        raise DamagedEntry("two tensors of the manifest share a name")
    entry = EntrySpec(key=key, tensors=tuple(tensors))
    if manifest.get("nbytes") != entry.nbytes:
        raise DamagedEntry(f"manifest nbytes {manifest.get('nbytes')!r} != sum of its tensors {entry.nbytes}")
    return StoredEntry(spec=entry, path=path, checksums=tuple(checksums), written_ns=written_ns)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parents_between(path: Path, top: Path) -> list[Path]:
    """Directories from `top`'s child down to `path`'s parent (the ones a mkdir(parents=True) may have created)."""
    chain: list[Path] = []
    parent = path.parent
    while parent != top:
        chain.append(parent)
        parent = parent.parent
    return chain


def json_text(data: dict[str, Any]) -> str:
    """A metadata file's text, as every writer of the format spells it: compact, which CPython's C encoder writes
    (an indented one is encoded in Python: ~0.15 ms a file, all of it holding the GIL)."""
    return json.dumps(data, separators=(",", ":"))


def write_json(path: Path, data: dict[str, Any], files: FileOps, sync: bool = True) -> None:
    files.write_bytes(path, json_text(data).encode(), sync=sync)
