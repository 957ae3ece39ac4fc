"""Read buffers reused once no tensor uses them: never lent while any view, export or tier holds them."""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faults import FailingReads
from hypothesis import given, settings
from hypothesis import strategies as st

import tiercache
from tiercache.io.aligned import ALIGN
from tiercache.io.buffers import HostBuffers

MiB = 1 << 20


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def test_a_region_comes_back_only_when_its_last_view_is_gone() -> None:
    buffers = HostBuffers()
    first = buffers.empty(3 * MiB)
    address = first.data_ptr()
    view = first[MiB:].view(torch.int32)
    exported = first.numpy()
    del first
    other = buffers.empty(3 * MiB)
    assert buffers.idle_bytes == 0 and other.data_ptr() != address  # a view keeps it lent
    del view
    gc.collect()
    assert buffers.idle_bytes == 0  # the numpy export still holds it
    del exported
    assert buffers.idle_bytes == 3 * MiB
    again = buffers.empty(3 * MiB - 100)
    assert again.data_ptr() == address and again.numel() == 3 * MiB and buffers.reused == 1


def test_buffers_are_page_aligned_and_large_ones_huge_page_aligned() -> None:
    buffers = HostBuffers()
    for size in (1, ALIGN + 1, 5 * MiB + 3):
        buffer = buffers.empty(size)
        assert buffer.numel() % ALIGN == 0 and buffer.numel() >= size and buffer.data_ptr() % ALIGN == 0
    assert buffers.empty(4 * MiB).data_ptr() % (2 * MiB) == 0


def test_a_read_takes_only_a_region_at_most_a_quarter_larger() -> None:
    """A tier counts a tensor's bytes, not its region's: a much larger region would hold memory nobody counts."""
    buffers = HostBuffers()
    big = buffers.empty(64 * MiB)
    address = big.data_ptr()
    del big
    smaller = buffers.empty(48 * MiB)
    assert smaller.data_ptr() != address
    assert buffers.empty(52 * MiB).data_ptr() == address


class _Once:
    """A hook that runs `call` the first time it is called, and does nothing after."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == 1:
            self.call()


class _Cycle:
    me: object
    buffer: torch.Tensor


def test_a_lease_collected_in_the_middle_of_a_scan_never_lends_a_smaller_region() -> None:
    """The cyclic GC may free a lease at any point, in this very thread, while the pool picks a region (found by
    a review: the pool once lent an 8 KiB buffer over a 4 KiB region that way)."""
    buffers = HostBuffers(max_idle=2)
    garbage = _Cycle()
    garbage.me, garbage.buffer = garbage, buffers.empty(ALIGN)  # a lease only the cyclic GC frees
    a, b = buffers.empty(2 * ALIGN), buffers.empty(ALIGN)
    only_fit = a.data_ptr()
    gc.disable()
    try:
        del garbage, a, b
        assert buffers.idle_bytes == 3 * ALIGN  # idle: 8 KiB, 4 KiB; the garbage's 4 KiB waits for the GC
        hook = buffers.on_scan = _Once(gc.collect)  # the GC runs once the scan has passed the first idle region
        lent = buffers.empty(2 * ALIGN)
        buffers.on_scan = None
    finally:
        gc.enable()
    assert hook.calls >= 1  # it did run mid-scan
    assert lent.data_ptr() == only_fit  # the 8 KiB region, not a 4 KiB one under an 8 KiB tensor
    assert buffers.idle_bytes == 2 * ALIGN  # b's region and the garbage's wait; the 8 KiB one is not left idle
    assert buffers.empty(2 * ALIGN).data_ptr() != only_fit  # to be lent twice


def test_idle_regions_are_capped_oldest_freed_first() -> None:
    buffers = HostBuffers(max_idle=2, max_idle_bytes=5 * MiB)
    held = [buffers.empty(2 * MiB) for _ in range(3)]
    addresses = [t.data_ptr() for t in held]
    while held:
        held.pop(0)  # given back in order: 0, 1, 2
    assert buffers.idle_bytes == 4 * MiB  # three came back, the oldest was freed: at most two wait
    again = [buffers.empty(2 * MiB), buffers.empty(2 * MiB)]
    assert {t.data_ptr() for t in again} == set(addresses[1:])
    del again
    big = buffers.empty(6 * MiB)
    del big
    assert buffers.idle_bytes == 0  # over max_idle_bytes on its own
    buffers.close()
    buffers.empty(MiB)
    assert buffers.idle_bytes == 0  # after close nothing is kept


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6 * MiB), st.booleans(), st.integers(0, 5)), min_size=1, max_size=40))
def test_live_buffers_never_overlap(steps: list[tuple[int, bool, int]]) -> None:
    """Whatever is taken, viewed, dropped and taken again, no two buffers in use share a byte."""
    buffers = HostBuffers(max_idle=3, max_idle_bytes=12 * MiB)
    live: list[torch.Tensor] = []
    for size, keep_view, drop in steps:
        buffer = buffers.empty(size)
        live.append(buffer[size // 2 :] if keep_view else buffer)  # a view alone keeps the region lent
        del buffer
        if drop and live:
            live.pop(drop % len(live))
        spans = sorted(_span(t) for t in live)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_values_read_earlier_survive_later_reads_of_the_same_entry(tmp_path: Path) -> None:
    """Cache-level: gets of one entry hand out distinct memory; a dropped result's memory is reused, refilled."""
    rng = random.Random(3)
    entry = {f"t{i}": torch.randn(rng.randint(1, 3) << 18) for i in range(4)}  # >= 256 KiB: returned as views
    policy = tiercache.Policy.from_dict(
        {"name": "nvme-only", "tiers": {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": "1GiB"}}}
    )
    with tiercache.TierCache(root=tmp_path, policy=policy, device="cpu") as cache:
        cache.put("e", entry)
        first = cache.get("e")
        second = cache.get("e")
        for name, t in first.items():
            assert _span(t) != _span(second[name])
            t.zero_()  # a caller may write into what it got
            assert torch.equal(second[name], entry[name])
        del first, t  # the loop variable holds one of its tensors too
        third = cache.get("e")
        assert all(torch.equal(third[n], t) for n, t in entry.items())
        assert any("host buffers for nvme reads and reloads: 1 reused" in note for note in cache.stats().notes)


def test_a_failed_read_gives_its_buffers_back_at_once(tmp_path: Path) -> None:
    """No reference cycle through the error's traceback holds them until the cyclic GC runs (found by a review)."""
    policy = tiercache.Policy.from_dict(
        {"name": "nvme-only", "tiers": {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": "1GiB"}}}
    )
    disk = FailingReads()
    with tiercache.TierCache(root=tmp_path, policy=policy, device="cpu", files=disk) as cache:
        cache.put("e", {"a": torch.randn(1 << 20), "b": torch.randn(1 << 20)})
        buffers = cache.tiers["nvme"].layout.buffers
        disk.failing.set()
        gc.disable()
        try:
            assert buffers.idle_bytes == 0
            with pytest.raises(tiercache.StorageError, match="injected"):
                cache.get("e")
            assert buffers.idle_bytes >= 8 << 20
            reused = buffers.reused
            handle = cache.prefetch("e")  # lent the region the failed get gave back: nothing else is idle
            assert buffers.reused == reused + 1
            with pytest.raises(tiercache.StorageError, match="injected"):
                handle.wait()
            del handle  # the handle's future keeps the error, whose traceback keeps the frames: no buffers in them
            assert buffers.idle_bytes >= 8 << 20
        finally:
            gc.enable()


def test_host_reloads_reuse_memory_only_once_their_tensors_are_gone(tmp_path: Path) -> None:
    policy = tiercache.Policy.from_dict(
        {
            "name": "host-only",
            "tiers": {"hbm": {"capacity": 0}, "host": {"capacity": "64MiB"}, "nvme": {"capacity": 0}},
            "placement": {"promote_on_hit": False},
        }
    )
    entry = {"k": torch.randn(1 << 20), "v": torch.randn(1 << 20)}
    with tiercache.TierCache(root=tmp_path, policy=policy, device="cpu") as cache:
        cache.put("e", entry)
        first = cache.get("e")
        first["k"].zero_()
        second = cache.get("e")  # first is alive: other memory
        assert torch.equal(second["k"], entry["k"]) and first["k"].data_ptr() != second["k"].data_ptr()
        address = second["k"].data_ptr()
        del second
        third = cache.get("e")
        assert third["k"].data_ptr() == address and all(torch.equal(third[n], t) for n, t in entry.items())
        # the first get took the region the put prepared, the second a fresh one, the third the second's again
        assert any("host buffers for nvme reads and reloads: 2 reused, 1 fresh" in n for n in cache.stats().notes)


def test_nvme_reads_and_host_reloads_share_one_pool(tmp_path: Path) -> None:
    """Memory an nvme read gave back serves the next reload from the host tier: one pool per cache, so at most one
    pool's worth of regions waits idle."""
    policy = tiercache.Policy.from_dict(
        {
            "name": "host-then-nvme",
            "tiers": {"hbm": {"capacity": 0}, "host": {"capacity": "12MiB"}, "nvme": {"capacity": "1GiB"}},
            "placement": {"promote_on_hit": False},
        }
    )
    a = {"k": torch.randn(1 << 20), "v": torch.randn(1 << 20)}
    b = {"k": torch.randn(1 << 20), "v": torch.randn(1 << 20)}
    with tiercache.TierCache(root=tmp_path, policy=policy, device="cpu") as cache:
        cache.put("a", a)
        cache.put("b", b)  # the host tier holds one: "a" goes down to nvme
        assert cache.info("a").tiers == ("nvme",) and cache.info("b").tiers == ("host",)
        from_nvme = cache.get("a")
        assert all(torch.equal(from_nvme[n], t) for n, t in a.items())
        del from_nvme
        from_host = cache.get("b")
        assert all(torch.equal(from_host[n], t) for n, t in b.items())
        assert any("host buffers for nvme reads and reloads: 1 reused, 1 fresh" in n for n in cache.stats().notes)


def test_a_prepared_region_serves_the_first_buffer_of_its_size() -> None:
    """prepare(n) faults a region in on a background thread; the next empty(n) takes it (waiting for it if it is
    still being touched) instead of a fresh allocation; one of another size is not prepared."""
    buffers = HostBuffers()
    buffers.prepare(8 * MiB)
    buffers.prepare(8 * MiB - 100)  # a region of that size is coming already: not a second one
    first = buffers.empty(8 * MiB)
    assert (buffers.prepared, buffers.reused, buffers.fresh) == (1, 1, 0)
    other = buffers.empty(2 * MiB)
    assert (buffers.reused, buffers.fresh) == (1, 1)
    del first, other
    buffers.close()
    buffers.prepare(MiB)  # closed: nothing
    assert buffers.prepared == 1


def test_a_host_tier_entrys_first_reload_lands_in_memory_already_touched() -> None:
    """On a CPU cache, a host-tier put prepares a landing region for the entry's reload, so the first get does not
    fault in fresh memory (stats' note counts 0 fresh)."""
    policy = tiercache.Policy.from_dict(
        {"name": "t", "tiers": {"hbm": {"capacity": 0}, "host": {"capacity": 64 * MiB}, "nvme": {"capacity": 0}}},
        source="test",
    )
    with tiercache.TierCache(policy=policy, device="cpu") as cache:
        cache.put("e", {"a": torch.arange(3 * MiB, dtype=torch.int32), "b": torch.ones(5, dtype=torch.float64)})
        got = cache.get("e")
        assert torch.equal(got["a"], torch.arange(3 * MiB, dtype=torch.int32))
        note = next(n for n in cache.stats().notes if n.startswith("host buffers"))
        assert "1 reused, 0 fresh" in note, note
