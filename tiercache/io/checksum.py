"""CRC32C (Castagnoli), the checksum zarr's crc32c codec stores after each chunk.

The `crc32c` package computes it with SSE4.2 / ARMv8 instructions and, by its default, releases the GIL for
buffers above 32 KiB, so the I/O threads that read the pieces of a file checksum them in parallel; below that it
keeps the GIL, which costs less than handing it over. Measured on a 2-core VM it matched or beat google-crc32c's
native library called through ctypes at every size from 4 KiB to 64 MiB, and it needs no shared-library lookup.
"""

from __future__ import annotations

import ctypes
import functools

import crc32c as _crc32c
import torch

RELEASES_GIL = True  # for buffers above 32 KiB: any piece worth a thread of its own


def crc32c(data: torch.Tensor, crc: int = 0) -> int:
    """CRC32C of a contiguous uint8 CPU tensor, continuing from `crc` (0 to start)."""
    if data.numel() == 0:
        return crc
    return _crc32c.crc32c(_memory_at(data.data_ptr(), data.numel()), crc)


def crc32c_address(address: int | memoryview | bytes | bytearray, nbytes: int | None = None, crc: int = 0) -> int:
    """CRC32C of `nbytes` of host memory at `address` (a buffer the caller keeps alive), or of a buffer such as a
    memoryview slice (all of it, or its first `nbytes`), continuing from `crc`."""
    if isinstance(address, int):
        if nbytes is None:
            raise TypeError("crc32c_address: an address needs nbytes")
        return _crc32c.crc32c(_memory_at(address, nbytes), crc) if nbytes else crc
    view = memoryview(address).cast("B")
    return _crc32c.crc32c(view if nbytes is None else view[:nbytes], crc)


def _memory_at(address: int, nbytes: int) -> ctypes.Array[ctypes.c_char]:
    """A zero-copy buffer over raw memory (no torch call, which would let another thread take the GIL)."""
    return (ctypes.c_char * nbytes).from_address(address)


# CRC32C combination (zlib's crc32_combine with the Castagnoli polynomial): crc(A + B) from crc(A), crc(B) and
# len(B), so that the threads reading the pieces of one file can each checksum their own piece.
_POLY = 0x82F63B78  # reflected
_X2N = [1 << 30] + [0] * 31  # x^(2^k) mod P, reflected; filled in below


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial, in the reflected bit order."""
    product = 0
    bit = 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


for _k in range(1, 32):
    _X2N[_k] = _multmodp(_X2N[_k - 1], _X2N[_k - 1])


@functools.lru_cache(maxsize=64)
def _shift_by_bytes(length: int) -> int:
    """x^(8 * length) mod P: the factor that moves a CRC past `length` more bytes (pieces share a few lengths)."""
    factor, k = 1 << 31, 3
    while length:
        if length & 1:
            factor = _multmodp(_X2N[k & 31], factor)
        length >>= 1
        k += 1
    return factor


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32C of A followed by B, from CRC32C(A), CRC32C(B) and B's length in bytes."""
    if length_b == 0:
        return crc_a
    if crc_a == 0:  # zero times any shift is zero (the first piece of every file starts here)
        return crc_b
    return _multmodp(_shift_by_bytes(length_b), crc_a) ^ crc_b


def crc32c_anywhere(data: torch.Tensor, crc: int = 0) -> int:
    """CRC32C of a contiguous uint8 tensor computed where it lives: the native library for CPU memory, torch
    ops on the device otherwise (no copy to the host; see devcrc)."""
    if data.device.type == "cpu":
        return crc32c(data, crc)
    from .devcrc import crc32c_tensor  # noqa: PLC0415 - only device data needs it

    return crc32c_tensor(data, crc)
