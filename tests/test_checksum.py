"""tiercache.io.checksum against google-crc32c (the reference zarr itself uses): tensors, addresses, buffers."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import google_crc32c
import pytest
import torch

from tiercache.io.checksum import RELEASES_GIL, crc32c, crc32c_address, crc32c_combine


def _bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [0, 1, 7, 4096, 32 << 10, (32 << 10) + 1, 1 << 20])
def test_every_input_form_gives_the_reference_crc(n: int) -> None:
    data = _bytes(n)
    expected = google_crc32c.value(data.numpy().tobytes())
    assert crc32c(data) == expected
    assert crc32c_address(data.data_ptr(), n) == expected
    view = memoryview(data.numpy())
    assert crc32c_address(view) == expected
    assert crc32c_address(bytes(view)) == expected
    assert crc32c_address(memoryview(data.view(-1).numpy()), n) == expected


def test_continuation_prefixes_and_slices() -> None:
    data = _bytes(10_000)
    raw = data.numpy().tobytes()
    head = crc32c(data[:3000])
    assert crc32c(data[3000:], head) == google_crc32c.value(raw)
    assert crc32c_address(data.data_ptr() + 3000, 7000, head) == google_crc32c.value(raw)
    view = memoryview(data.numpy())
    assert crc32c_address(view[100:], 50) == google_crc32c.value(raw[100:150])  # the first nbytes of a buffer
    assert crc32c_address(view[:0]) == 0 and crc32c_address(data.data_ptr(), 0, 0x1234) == 0x1234
    assert crc32c_combine(google_crc32c.value(raw[:10]), google_crc32c.value(raw[10:]), 9990) == crc32c(data)


def test_an_address_needs_a_length() -> None:
    with pytest.raises(TypeError, match="nbytes"):
        crc32c_address(1234)


def _ticks_during(fn: Callable[[], object]) -> int:
    """How far another Python thread counts while `fn` runs: next to nothing where fn holds the GIL."""
    done, started = threading.Event(), threading.Event()
    ticks = 0

    def count() -> None:
        nonlocal ticks
        started.set()
        while not done.is_set():
            ticks += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # a thread waiting for the GIL gets it within 10 us of a bytecode boundary
    counter = threading.Thread(target=count)
    counter.start()
    started.wait()
    try:
        before = ticks
        fn()
        return ticks - before
    finally:
        done.set()
        counter.join()
        sys.setswitchinterval(interval)


def test_large_buffers_are_checksummed_outside_the_gil() -> None:
    assert RELEASES_GIL
    data = torch.full((256 << 20,), 7, dtype=torch.uint8)  # ~25 ms of checksumming
    assert max(_ticks_during(lambda: crc32c(data)) for _ in range(3)) > 20_000  # ~250k where released, ~1k where held
