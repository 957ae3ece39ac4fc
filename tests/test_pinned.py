"""The host pool: extents never overlap, accounting is exact, fragmentation costs no capacity, frees wait for copies."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.tiers.host.pool import GRAIN, Extent, HostPool, pieces
from tiercache.transfer import WorkerStream


def overlaps(a: Extent, b: Extent) -> bool:
    return a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes


def test_a_pool_without_cuda_is_pageable_and_says_why() -> None:
    pool = HostPool(1 << 20, pin=True)
    assert not pool.pinned and "CUDA" in (pool.why_pageable or "")
    assert "pinning is off" in (HostPool(1 << 20, pin=False).why_pageable or "")


def test_a_pool_near_the_free_memory_is_not_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned pages cannot be reclaimed: pinning most of the free RAM would get the process OOM-killed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pool = HostPool(4 << 20, pin=True, available_ram=lambda: 6 << 20)  # cudaHostRegister is never reached here
    assert not pool.pinned
    assert "more than half of the 6291456 bytes" in (pool.why_pageable or "")
    assert "tiers.host.capacity" in (pool.why_pageable or "")


def test_sizes_round_up_to_the_grain_and_one_extent_is_used_when_a_run_fits() -> None:
    pool = HostPool(64 * GRAIN, pin=False)
    extents = pool.allocate(GRAIN + 1)
    assert extents == [Extent(0, 2 * GRAIN)] and pool.used == 2 * GRAIN
    assert pool.allocate(0) == []


def test_a_fragmented_pool_spans_several_runs_instead_of_refusing() -> None:
    pool = HostPool(8 * GRAIN, pin=False)
    blocks = [pool.allocate(GRAIN) for _ in range(8)]
    for block in blocks[::2]:  # free every other grain: 4 grains free, no two adjacent
        assert block is not None
        pool.release(block)
    assert pool.free == 4 * GRAIN and pool.largest_free == GRAIN
    spread = pool.allocate(3 * GRAIN)
    assert spread is not None and len(spread) == 3
    assert [(at, n) for at, _, n in pieces(spread, 3 * GRAIN - 5)] == [
        (0, GRAIN),
        (GRAIN, GRAIN),
        (2 * GRAIN, GRAIN - 5),
    ]
    assert pool.allocate(2 * GRAIN) is None and pool.fallbacks == 1  # only one grain left: the caller goes pageable


def test_releases_merge_neighbours_back_into_one_run() -> None:
    pool = HostPool(16 * GRAIN, pin=False)
    held = [pool.allocate(GRAIN * (i + 1)) for i in range(4)]
    for extents in (held[1], held[3], held[0], held[2]):
        assert extents is not None
        pool.release(extents)
    assert pool.used == 0 and pool.free_runs == 1 and pool.largest_free == 16 * GRAIN


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6 * GRAIN)), max_size=40))
def test_random_allocations_never_overlap_and_account_exactly(ops: list[tuple[bool, int]]) -> None:
    pool = HostPool(24 * GRAIN, pin=False)
    live: list[list[Extent]] = []
    for allocate, nbytes in ops:
        if allocate or not live:
            free_before = pool.free
            extents = pool.allocate(nbytes)
            need = -(-nbytes // GRAIN) * GRAIN
            if extents is None:
                assert need > free_before  # refused only when the space truly is not there
                continue
            assert sum(e.nbytes for e in extents) == need
            live.append(extents)
        else:
            pool.release(live.pop(nbytes % len(live)))
        flat = [e for extents in live for e in extents]
        assert pool.used == sum(e.nbytes for e in flat) <= pool.capacity
        assert all(e.offset % GRAIN == 0 and e.offset + e.nbytes <= pool.capacity for e in flat)
        assert not any(overlaps(a, b) for i, a in enumerate(flat) for b in flat[i + 1 :])
    for extents in live:
        pool.release(extents)
    assert pool.used == 0 and pool.free_runs == 1


def test_extents_freed_while_a_copy_reads_them_return_only_after_the_copy() -> None:
    gate = threading.Event()
    stream = WorkerStream("test", before_copy=gate.wait)
    try:
        pool = HostPool(2 * GRAIN, pin=False)
        extents = pool.allocate(2 * GRAIN)
        assert extents is not None
        pool.view(extents[0]).fill_(7)
        out = torch.zeros(2 * GRAIN, dtype=torch.uint8)
        stream.copy(out, pool.view(extents[0]))
        copied = stream.record()
        pool.release_after(copied, extents)
        assert pool.used == 2 * GRAIN  # the copy is held at the gate: the bytes are not free yet
        got: list[list[Extent] | None] = []
        waiter = threading.Thread(target=lambda: got.append(pool.allocate(GRAIN)))
        waiter.start()  # a full pool waits for the copy in flight rather than handing out its source
        gate.set()
        waiter.join()
        assert bool((out == 7).all()) and got and got[0] is not None
    finally:
        gate.set()
        stream.close()


def test_pieces_of_a_range_cross_extent_boundaries() -> None:
    extents = [Extent(1000, 100), Extent(5000, 50), Extent(200, 100)]
    assert pieces(extents, 120, start=90) == [(0, 1090, 10), (10, 5000, 50), (60, 200, 60)]
    assert pieces(extents, 0, start=10) == []
