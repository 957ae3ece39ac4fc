"""Page-aligned host buffers and zero-copy buffer views of tensors, for O_DIRECT I/O."""

from __future__ import annotations

import ctypes
import sys

import torch

ALIGN = 4096  # O_DIRECT and GDS want offsets, lengths and addresses aligned to the device block; 4 KiB covers all
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    if _libc is not None:
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
    _libc = None


def round_up(nbytes: int, align: int = ALIGN) -> int:
    return -(-nbytes // align) * align


def aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `round_up(nbytes)` bytes whose first byte is ALIGN-aligned.

    Buffers of 2 MiB and more start on a 2 MiB boundary and ask for transparent huge pages: the first touch
    of fresh memory (a page fault per 4 KiB page otherwise) costs as much as the NVMe read itself on some VMs.
    """
    padded = round_up(nbytes)
    align = HUGE_PAGE if padded >= HUGE_PAGE and _libc is not None else ALIGN
    buffer = aligned_view(torch.empty(padded + align, dtype=torch.uint8), padded, align)
    if align == HUGE_PAGE and _libc is not None:
        _libc.madvise(buffer.data_ptr(), padded, _MADV_HUGEPAGE)  # advisory: a refusal changes nothing
    return buffer


def aligned_view(raw: torch.Tensor, nbytes: int, align: int = ALIGN) -> torch.Tensor:
    """The `nbytes` of `raw` (a uint8 tensor on any device, allocated `align` bytes longer) that start on an
    `align` boundary."""
    skip = (-raw.data_ptr()) % align
    return raw[skip : skip + nbytes]


def buffer_of(tensor: torch.Tensor) -> memoryview:
    """A writable, zero-copy memoryview of a contiguous uint8 CPU tensor (keeps the tensor alive)."""
    if tensor.dtype != torch.uint8 or not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("buffer_of() takes a contiguous uint8 CPU tensor")
    return memoryview(tensor.numpy())  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
