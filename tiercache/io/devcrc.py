"""CRC32C of a uint8 tensor computed on the device that holds it, with plain torch ops.

GPUDirect Storage moves zarr chunks between NVMe and GPU memory without touching the host; copying a chunk to the
host only to check its CRC32C would spend the PCIe traffic GDS saves. torch has no CRC op, and we use no custom
kernels, so the CRC is rewritten as table gathers and XORs, which run unchanged (and are tested) on the CPU.

Method. Without its initial value and final xor, CRC32C is linear over GF(2): call it L. Then
    crc32c(data, crc) = ~(L(data) ^ Z_len(data)(~crc))
where Z_n is the 32x32 GF(2) matrix that runs the CRC register over n zero bytes, and leading zero bytes do not
change L. A slab is left-padded with zeros to whole 64-byte groups and reduced in levels: a level reads a byte
stream, looks each byte up in the table of its position in its group (T[p][b] is what byte b at position p
contributes to its group's L) and XORs the 64 lookups of a group by halving (torch has no XOR-reduce). Level 0
reads the data; level k >= 1 reads the little bytes of level k-1's 32-bit results, 16 per group, and its tables
shift each result past the ones after it in its group. Each level divides the count by 16, so a 32 MiB slab takes
six levels of about nine ops each, however many bytes it holds. Slabs bound the temporaries (about 9x a slab);
their results come to the host with one sync and are chained with Z_n there, as Python ints.

32-bit values are held in int32 tensors as bit patterns (uint32 op support in torch is patchy); only XOR, gathers
and views touch them, which are the same on signed values.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

SLAB_BYTES = 32 << 20  # bytes reduced per pass: the device temporaries are about 9x this
GROUP = 64  # bytes a level XORs into one 32-bit value (64 tables of 256 entries, 64 KiB a level)
_POLY = 0x82F63B78  # CRC32C (Castagnoli), bit-reflected
_MASK = 0xFFFFFFFF
_VALUE_BYTES = 4  # each level above 0 reads the int32 results of the one below as bytes


def crc32c_tensor(data: torch.Tensor, crc: int = 0, *, slab_bytes: int = SLAB_BYTES) -> int:
    """CRC32C of the bytes of a contiguous uint8 tensor on any device, continuing from `crc` (0 to start).

    Equals google_crc32c.extend(crc, bytes) and tiercache.io.checksum.crc32c; empty data returns `crc`. The work is
    done in slabs of `slab_bytes` on `data`'s device, with one device-to-host sync at the end.
    """
    _check(data, crc, slab_bytes)
    flat = data.reshape(-1)  # a view: data is contiguous
    n = flat.numel()
    if n == 0:
        return crc
    starts = range(0, n, slab_bytes)
    linear = torch.cat([_linear(flat[start : start + slab_bytes]) for start in starts]).tolist()  # the one sync
    register = crc ^ _MASK
    for start, value in zip(starts, linear, strict=True):
        register = _advance(register, min(slab_bytes, n - start)) ^ (value & _MASK)
    return register ^ _MASK


def _check(data: torch.Tensor, crc: int, slab_bytes: int) -> None:
    """Refuse what would give a wrong CRC rather than silently reading other bytes."""
    if data.dtype != torch.uint8:
        raise ValueError(
            f"crc32c_tensor needs a uint8 tensor, got {data.dtype} of shape {tuple(data.shape)} on {data.device}; "
            "checksum a tensor's bytes with t.contiguous().view(torch.uint8)"
        )
    if not data.is_contiguous():
        raise ValueError(
            f"crc32c_tensor needs a contiguous tensor (its bytes in memory order), got shape {tuple(data.shape)} "
            f"with strides {data.stride()} on {data.device}; pass data.contiguous() (a copy)"
        )
    if not 0 <= crc <= _MASK:
        raise ValueError(f"crc32c_tensor: crc must be a 32-bit unsigned value, got {crc}")
    if slab_bytes < 1:
        raise ValueError(f"crc32c_tensor: slab_bytes must be at least 1, got {slab_bytes}")


def _linear(slab: torch.Tensor) -> torch.Tensor:
    """L(slab) as a 1-element int32 tensor on slab's device, left on the device so slabs queue without syncs."""
    pad = -slab.numel() % GROUP
    stream = F.pad(slab, (pad, 0)) if pad else slab  # leading zeros leave L unchanged
    level = 0
    while True:
        values = _fold(stream, _table(slab.device, level), _offsets(slab.device))
        if values.numel() == 1:
            return values
        level += 1
        pad = -values.numel() % (GROUP // _VALUE_BYTES)
        if pad:
            values = F.pad(values, (pad, 0))  # zero values are L of zero bytes: leading zeros again
        stream = values.view(torch.uint8)


def _fold(stream: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """XOR of table[p][byte] over each GROUP-byte group of a uint8 stream: one int32 value per group."""
    blocks = stream.view(-1, GROUP)
    index = _indices(blocks, offsets, fused=blocks.is_cuda)
    values = table.index_select(0, index.view(-1)).view(torch.int64)  # pairs of int32 XOR lane by lane as int64
    del index  # free it before the halvings allocate
    values = values.view(-1, GROUP // 2)
    width = GROUP // 2
    while width > 1:
        width //= 2
        values = values[:, :width] ^ values[:, width:]
    pairs = values.view(torch.int32)  # (groups, 2): the two lanes of the last int64
    return pairs[:, 0] ^ pairs[:, 1]


def _indices(blocks: torch.Tensor, offsets: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """p * 256 + byte as int32 for a (groups, GROUP) uint8 tensor.

    On CUDA the uint8 + int32 add casts inside the one kernel; torch's CPU kernel for that mixed add is about 2.5x
    slower than converting first and adding in place, so the CPU converts first.
    """
    if fused:
        return torch.add(blocks, offsets)
    return blocks.to(torch.int32).add_(offsets)


@functools.cache
def _offsets(device: torch.device) -> torch.Tensor:
    """p * 256 for each byte position p of a group: where position p's table starts."""
    return (torch.arange(GROUP, dtype=torch.int32) * 256).to(device)


@functools.cache
def _table(device: torch.device, level: int) -> torch.Tensor:
    """The GROUP x 256 lookup table of a level, flattened, as int32 bit patterns on `device`."""
    basis = [[_signed(_basis(level, position, bit)) for bit in range(8)] for position in range(GROUP)]
    bits = torch.tensor(basis, dtype=torch.int32)
    table = torch.zeros(GROUP, 1, dtype=torch.int32)
    for bit in range(8):  # T[p][b] is linear in b: the second half of each doubling has `bit` set
        table = torch.cat([table, table ^ bits[:, bit : bit + 1]], dim=1)
    return table.reshape(-1).to(device)


def _basis(level: int, position: int, bit: int) -> int:
    """What a byte with only `bit` set, at `position` of a group, contributes to the group's L at `level`."""
    if level == 0:
        return _advance(1 << bit, GROUP - position)  # a byte is taken in by running the register 8 bits past it
    per_group = GROUP // _VALUE_BYTES
    value, byte = divmod(position, _VALUE_BYTES)
    if sys.byteorder == "big":
        byte = _VALUE_BYTES - 1 - byte
    span = GROUP * per_group ** (level - 1)  # data bytes behind each value read at this level
    return _advance(1 << (bit + 8 * byte), span * (per_group - 1 - value))


def _advance(register: int, n: int) -> int:
    """Z_n(register): run the linear CRC register over n zero bytes, by the binary digits of n."""
    power = 0
    while n:
        if n & 1:
            register = _apply(_zeros_pow2(power), register)
        n >>= 1
        power += 1
    return register


@functools.cache
def _zeros_pow2(power: int) -> tuple[int, ...]:
    """Z_(2**power) as its 32 columns (column i is the image of bit i), by repeated squaring."""
    if power == 0:
        return tuple(_zero_byte(1 << i) for i in range(32))
    half = _zeros_pow2(power - 1)
    return tuple(_apply(half, column) for column in half)


def _zero_byte(register: int) -> int:
    """One zero byte through the bit-reflected CRC32C register."""
    for _ in range(8):
        register = (register >> 1) ^ (_POLY if register & 1 else 0)
    return register


def _apply(matrix: tuple[int, ...], vector: int) -> int:
    """matrix @ vector over GF(2), with the matrix given by columns."""
    out = 0
    i = 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _signed(value: int) -> int:
    """A 32-bit pattern as the int32 that holds it."""
    return value - (1 << 32) if value >> 31 else value
