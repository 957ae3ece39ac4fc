"""nvme I/O backends. `posix` runs everywhere; a kvikio backend joins it on CUDA machines."""

from __future__ import annotations

from .aligned import ALIGN, aligned_empty, buffer_of, round_up
from .files import FileOps
from .posix import FileRead, PendingRead, PosixIO, drop_page_cache

__all__ = [
    "ALIGN",
    "FileOps",
    "FileRead",
    "PendingRead",
    "PosixIO",
    "aligned_empty",
    "buffer_of",
    "drop_page_cache",
    "round_up",
]
