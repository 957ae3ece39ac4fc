"""What a shared tier stores its entries in: named objects, each written whole, listed by prefix. The object tier's
S3 bucket (s3.py) and the remote tier's Mooncake Store (tiers/remote/store.py) are the two implementations; the
entry format, the commit, the listing and the sweep above them are one (tiers/object/tier.py).

A tensor's bytes are one "chunk" with its CRC32C after them; how a chunk is laid out in objects (one object read in
ranges, or one object per part) is the store's, so `put_chunks`, `read_chunks` and `chunk_objects` belong here:
all of an entry's chunks in one call, which a store with batch calls (Mooncake) makes one request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import torch

from ...errors import StorageError


class Missing(LookupError):
    """The object is not there (never written, removed by another cache, or lost with the server that held it)."""


class Damaged(ValueError):
    """An object is there but not what its entry's manifest says (its size): the entry is not served."""


class Exists(Exception):
    """A create-if-absent put found the object already there."""


@dataclass(frozen=True)
class Listed:
    path: str  # relative to the tier's prefix
    size: int
    modified: datetime  # when it was written (a store that does not say: when this cache first listed it)


class Store(ABC):
    """The objects under one prefix: paths given and returned are relative to it."""

    where: str  # the store as messages name it (an s3:// url and its server, a Mooncake master)
    # Whether an entry's tensors also get zarr array metadata objects, so zarr-python reads the store (a bucket);
    # the manifest alone is what the tier reads.
    zarr_arrays: bool = True
    # Whether entries may vanish without any cache removing them (memory lost with its holder, a restart): then a
    # removal leaves a tombstone, and an entry gone without one is lost, not deleted (other caches keep their copies).
    volatile: bool = False

    @abstractmethod
    def put(self, path: str, data: bytes, *, create: bool = False) -> None:
        """Write one small object whole (readers see all of it or nothing); `create`: only if it is absent (the
        commit point of an entry), else Exists where the store can tell."""

    @abstractmethod
    def get(self, path: str) -> bytes | memoryview:
        """One small object whole; Missing if it is not there."""

    @abstractmethod
    def put_chunks(self, chunks: Sequence[tuple[str, torch.Tensor, bytes]], written: list[str]) -> None:
        """Write each tensor's bytes (`data`: uint8, contiguous, on the CPU) followed by its `trailer` (its CRC32C) as
        the chunk at `path`, as many at once as the store does well; every object written, or perhaps written, is
        added to `written` (a put that fails halfway is cleaned up from it)."""

    @abstractmethod
    def read_chunks(self, chunks: Sequence[tuple[str, torch.Tensor]]) -> list[bytes | None]:
        """Fill each `out` (uint8, on the CPU) with the chunk at `path`'s data, as many at once as the store does
        well; each stored trailer, or None where the store keeps none. Missing if any of it is gone, Damaged if a
        chunk is not the size its entry says."""

    @abstractmethod
    def chunk_objects(self, path: str, nbytes: int) -> list[str]:
        """The objects the chunk of an `nbytes` tensor at `path` is stored as."""

    @abstractmethod
    def delete(self, paths: Sequence[str]) -> None:
        """Remove objects (one missing already is no error)."""

    @abstractmethod
    def objects(self, prefix: str) -> Iterator[Listed]:
        """Every object whose path starts with `prefix`."""

    @abstractmethod
    def folders(self, prefix: str) -> list[str]:
        """The "directories" one level below `prefix`."""

    def close(self) -> None:  # noqa: B027 - stores with connections or threads override it
        """Let go of connections and threads. Idempotent."""

    def error(self, doing: str, exc: BaseException) -> StorageError:
        """The StorageError for a failed request, with what to do about it."""
        return StorageError(f"{self.where}: {doing} failed: {exc}")
