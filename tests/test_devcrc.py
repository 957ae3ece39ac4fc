"""crc32c_tensor against google-crc32c: lengths around every boundary, slabs, continuation, bad input, op counts."""

from __future__ import annotations

from typing import Any

import google_crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from tiercache.io import devcrc
from tiercache.io.checksum import crc32c
from tiercache.io.devcrc import crc32c_tensor

KiB = 1 << 10
MiB = 1 << 20


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def expected(data: torch.Tensor, crc: int = 0) -> int:
    return int(google_crc32c.extend(crc, data.numpy().tobytes()))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 63, 64, 65, 127, 128, 1023, 1024, 1025, 4095, 4096, 4097, MiB + 3])
def test_matches_google_crc32c(n: int) -> None:
    data = random_bytes(n, seed=n)
    assert crc32c_tensor(data) == expected(data) == crc32c(data)


@pytest.mark.parametrize(
    ("n", "slab_bytes"),
    [(300, 1), (1000, 7), (10_007, 64), (100_003, 1000), (3 * 4096 + 5, 4096), (MiB + 3, 256 * KiB), (MiB, MiB)],
)
def test_slabs(n: int, slab_bytes: int) -> None:
    data = random_bytes(n, seed=slab_bytes)
    assert crc32c_tensor(data, 0xDEADBEEF, slab_bytes=slab_bytes) == expected(data, 0xDEADBEEF)


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(max_size=1500),
    crc=st.integers(0, 2**32 - 1),
    slab_bytes=st.sampled_from([5, 64, 100, 4096, devcrc.SLAB_BYTES]),
)
def test_any_bytes_any_crc(payload: bytes, crc: int, slab_bytes: int) -> None:
    data = torch.tensor(list(payload), dtype=torch.uint8)
    assert crc32c_tensor(data, crc, slab_bytes=slab_bytes) == google_crc32c.extend(crc, payload)


@pytest.mark.parametrize(("a", "b"), [(0, 5), (1, 1), (63, 65), (4096, 3), (100_001, 70_000)])
def test_continuation(a: int, b: int) -> None:
    data = random_bytes(a + b, seed=a)
    head, tail = data[:a], data[a:]
    assert crc32c_tensor(tail, crc32c_tensor(head)) == crc32c_tensor(data) == expected(data)


def test_views_at_odd_offsets_and_other_shapes() -> None:
    data = random_bytes(4099)
    assert crc32c_tensor(data[3:]) == expected(data[3:])  # the bytes are never viewed as wider types
    assert crc32c_tensor(data[:4096].view(64, 64)) == expected(data[:4096])  # contiguous: its bytes in order


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.zeros(8, dtype=torch.float32), "needs a uint8 tensor, got torch.float32"),
        (torch.zeros(8, dtype=torch.int8), "needs a uint8 tensor, got torch.int8"),
        (torch.zeros(16, dtype=torch.uint8)[::2], "needs a contiguous tensor.*strides \\(2,\\)"),
        (torch.zeros(4, 4, dtype=torch.uint8).t(), "needs a contiguous tensor"),
    ],
)
def test_bad_tensors_are_refused(data: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        crc32c_tensor(data)


@pytest.mark.parametrize(("crc", "slab_bytes"), [(-1, 64), (2**32, 64), (0, 0)])
def test_bad_arguments_are_refused(crc: int, slab_bytes: int) -> None:
    with pytest.raises(ValueError, match="crc must be|slab_bytes must"):
        crc32c_tensor(random_bytes(10), crc, slab_bytes=slab_bytes)


def test_fused_index_path_matches() -> None:
    """CUDA builds the table indices with one mixed-dtype add; check that path here too."""
    blocks = random_bytes(8 * devcrc.GROUP).view(-1, devcrc.GROUP)
    offsets = devcrc._offsets(blocks.device)
    fused = devcrc._indices(blocks, offsets, fused=True)
    assert fused.dtype == torch.int32
    assert torch.equal(fused, devcrc._indices(blocks, offsets, fused=False))


METADATA_OPS = {"view", "_unsafe_view", "reshape", "slice", "select", "detach", "alias", "as_strided"}


class CountKernels(TorchDispatchMode):
    """Counts the aten ops that compute something (views are metadata only, no kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ not in METADATA_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def kernels(n: int, slab_bytes: int) -> int:
    data = random_bytes(n)
    crc32c_tensor(data, slab_bytes=slab_bytes)  # builds the tables outside the count
    with CountKernels() as counter:
        crc32c_tensor(data, slab_bytes=slab_bytes)
    return counter.count


def test_kernel_count_grows_with_slabs_not_bytes() -> None:
    """The first dispatch mode in a process imports torch._dynamo (about 1.5 s): most of this test's time."""
    one_slab = kernels(MiB, MiB)
    assert one_slab <= 60  # 5 levels of ~9 ops, one pad, one cat
    assert kernels(4 * MiB, 4 * MiB) <= one_slab + 10  # 4x the bytes in one slab: at most one more level
    assert kernels(4 * MiB, MiB) <= 4 * one_slab


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    data = random_bytes(3 * MiB + 5)
    on_gpu = data.cuda()
    assert crc32c_tensor(on_gpu) == crc32c(data)
    assert crc32c_tensor(on_gpu, 0x12345678, slab_bytes=MiB - 1) == crc32c(data, 0x12345678)
    assert crc32c_tensor(on_gpu[:1]) == crc32c(data[:1])
