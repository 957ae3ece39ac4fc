"""CRC32C (Castagnoli), the checksum zarr's crc32c codec stores after each chunk.

google-crc32c computes it with SSE4.2 / ARMv8 instructions but holds the GIL while it does, which stalls the
I/O threads that verification is meant to overlap with. Where its native library is mapped into this process
we call that library through ctypes, which releases the GIL; elsewhere we use google-crc32c's Python API.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import google_crc32c._crc32c  # noqa: F401 - loads the native library, so it shows in /proc/self/maps
import torch


def _native_extend() -> Callable[[int, int, int], int] | None:
    """crc32c_extend(crc, address, length) from the library google-crc32c loaded, if it can be found."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "libcrc32c" in line and line.split()[-1].startswith("/")}
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).crc32c_extend
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_uint32
        fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return fn  # type: ignore[no-any-return]
    return None


_EXTEND = _native_extend()
RELEASES_GIL = _EXTEND is not None


def crc32c(data: torch.Tensor, crc: int = 0) -> int:
    """CRC32C of a contiguous uint8 CPU tensor, continuing from `crc` (0 to start)."""
    if data.numel() == 0:
        return crc
    if _EXTEND is not None:
        return int(_EXTEND(crc, data.data_ptr(), data.numel()))
    return int(google_crc32c.extend(crc, data.numpy()))


def crc32c_address(address: int, nbytes: int) -> int:
    """CRC32C of `nbytes` of host memory at `address` (a buffer the caller keeps alive)."""
    if nbytes == 0:
        return 0
    if _EXTEND is not None:
        return int(_EXTEND(0, address, nbytes))
    return int(google_crc32c.value(ctypes.string_at(address, nbytes)))


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
