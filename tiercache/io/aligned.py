"""Page-aligned host buffers and zero-copy buffer views of tensors, for O_DIRECT I/O."""

from __future__ import annotations

import torch

ALIGN = 4096  # O_DIRECT and GDS want offsets, lengths and addresses aligned to the device block; 4 KiB covers all


def round_up(nbytes: int, align: int = ALIGN) -> int:
    return -(-nbytes // align) * align


def aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `round_up(nbytes)` bytes whose first byte is ALIGN-aligned."""
    padded = round_up(nbytes)
    raw = torch.empty(padded + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip : skip + padded]


def buffer_of(tensor: torch.Tensor) -> memoryview:
    """A writable, zero-copy memoryview of a contiguous uint8 CPU tensor (keeps the tensor alive)."""
    if tensor.dtype != torch.uint8 or not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("buffer_of() takes a contiguous uint8 CPU tensor")
    return memoryview(tensor.numpy())
