"""Ordering of the data path under injected delays, on the CPU implementation of the streams (the same scheduling
code drives CUDA streams): a consumer never sees a tensor before its copy completed, a buffer is never reused while
a copy from it is in flight, and a failed copy is reported, not swallowed. Plus the overlap APIs built on them."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import CacheFactory
from helpers import KiB, assert_same, kv, only_tier, policy, transfers

import tiercache
from tiercache.errors import EntryValueError
from tiercache.transfer import Deferred, HostThread, WorkerStream, all_of, copy_in_chunks


class Gate:
    """Holds a copy stream's copies until opened; `reached` tells that a copy is waiting at the gate."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.open = threading.Event()
        self.copies = 0

    def __call__(self) -> None:
        self.copies += 1
        self.reached.set()
        self.open.wait()


@pytest.fixture
def worker() -> Iterator[WorkerStream]:
    stream = WorkerStream("test-consumer")
    yield stream
    stream.close()


def reload_worker(cache: tiercache.TierCache) -> WorkerStream:
    """The cache's reload stream, a worker thread on this machine, to inject delays or failures into."""
    stream = transfers(cache).reload
    assert isinstance(stream, WorkerStream)
    return stream


def gate_reloads(cache: tiercache.TierCache) -> Gate:
    gate = Gate()
    reload_worker(cache).before_copy = gate
    return gate


def fail_copies() -> None:
    """A copy stream's `before_copy` that makes every copy fail."""
    raise RuntimeError("injected copy failure")


def layers(n: int, nbytes: int = 16 * KiB) -> dict[str, torch.Tensor]:
    return {f"layer{i}": torch.full((nbytes // 4,), float(i)) for i in range(n)}


# ---- the streams themselves ------------------------------------------------------------------------------------
def test_a_stream_runs_copies_in_order_and_an_event_marks_them() -> None:
    gate = Gate()
    stream = WorkerStream("test", before_copy=gate)
    try:
        dst, src = torch.zeros(4), torch.arange(4.0)
        stream.copy(dst, src)
        stream.copy(dst, src * 2)  # enqueued later: must land last
        done = stream.record()
        gate.reached.wait()
        assert not done.query() and bool((dst == 0).all())  # held at the gate: nothing visible yet
        gate.open.set()
        done.synchronize()
        assert torch.equal(dst, src * 2) and done.seconds_since(done) == 0.0
    finally:
        gate.open.set()
        stream.close()


def test_a_stream_that_waits_on_another_sees_its_copies(worker: WorkerStream) -> None:
    gate = Gate()
    loader = WorkerStream("loader", before_copy=gate)
    try:
        staged, out = torch.zeros(1024), torch.zeros(1024)
        loader.copy(staged, torch.ones(1024))
        worker.wait(loader.record())  # the consumer's later work is ordered after the load, the host does not block
        worker.copy(out, staged)
        consumed = worker.record()
        gate.reached.wait()
        assert not consumed.query()
        gate.open.set()
        consumed.synchronize()
        assert bool((out == 1).all())
    finally:
        gate.open.set()
        loader.close()


def test_a_failed_copy_raises_at_the_next_event_and_the_stream_goes_on() -> None:
    stream = WorkerStream("test")
    try:
        stream.copy(torch.zeros(2), torch.zeros(3))  # shapes differ: copy_ raises in the worker
        failed = stream.record()
        with pytest.raises(RuntimeError):
            failed.synchronize()
        out = torch.zeros(2)
        stream.copy(out, torch.ones(2))
        stream.record().synchronize()
        assert bool((out == 1).all())
    finally:
        stream.close()


def test_long_copies_are_split_into_chunks() -> None:
    gate = Gate()
    gate.open.set()
    stream = WorkerStream("test", before_copy=gate)
    try:
        dst, src = torch.zeros(10 * KiB, dtype=torch.uint8), torch.ones(10 * KiB, dtype=torch.uint8)
        copy_in_chunks(stream, [(dst, src)], 4 * KiB)
        stream.record().synchronize()
        assert gate.copies == 3 and bool((dst == 1).all())
    finally:
        stream.close()


def test_deferred_releases_run_only_once_their_event_is_done() -> None:
    gate = Gate()
    stream = WorkerStream("test", before_copy=gate)
    try:
        deferred, ran = Deferred(), []
        stream.copy(torch.zeros(1), torch.ones(1))
        deferred.after(stream.record(), lambda: ran.append("late"))
        deferred.after(all_of(()), lambda: ran.append("now"))  # nothing in flight: runs at once
        assert deferred.collect() == 0 and ran == ["now"] and len(deferred) == 1
        gate.open.set()
        deferred.settle_all()
        assert ran == ["now", "late"] and len(deferred) == 0
    finally:
        gate.open.set()
        stream.close()


def test_the_host_thread_is_a_stream_that_runs_at_once() -> None:
    host, dst = HostThread(), torch.zeros(3)
    host.copy(dst, torch.ones(3))
    assert bool((dst == 1).all()) and host.record().query()


# ---- the cache's reloads and offloads under delays ---------------------------------------------------------------
def test_a_prefetched_tensor_is_not_seen_before_its_copy_completes(
    make_cache: CacheFactory, worker: WorkerStream
) -> None:
    cache = make_cache(only_tier("host"))
    cache.put("kv", kv(1))
    gate = gate_reloads(cache)
    handle = cache.prefetch("kv")
    tensors = handle.wait(stream=worker)  # returns without the host waiting for the copy
    out = torch.zeros_like(tensors["k"])
    worker.copy(out, tensors["k"])
    consumed = worker.record()
    gate.reached.wait()
    assert not handle.done() and not consumed.query()
    gate.open.set()
    consumed.synchronize()
    assert torch.equal(out, kv(1)["k"]) and handle.done()
    assert_same(handle.wait(), kv(1))


def test_a_get_waits_for_the_reload_it_started(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    cache.put("kv", kv(2))
    gate = gate_reloads(cache)
    got: list[dict[str, torch.Tensor]] = []
    reader = threading.Thread(target=lambda: got.append(cache.get("kv")))
    reader.start()
    gate.reached.wait()
    assert not got  # the copy is held at the gate: get() has not returned
    gate.open.set()
    reader.join()
    assert_same(got[0], kv(2))


def test_host_memory_being_read_is_not_reused_until_the_copy_is_done(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host", capacity=128 * KiB))  # room for two 64 KiB entries
    cache.put("a", kv(1))
    gate = gate_reloads(cache)
    handle = cache.prefetch("a")
    gate.reached.wait()  # a's reload is in flight, held at the gate
    cache.delete("a")
    cache.put("b", kv(2))  # takes the other half of the pool
    stored: list[str] = []
    writer = threading.Thread(target=lambda: stored.append(cache.put("c", kv(3))))
    writer.start()  # needs a's bytes: must wait for the copy reading them, not overwrite them
    assert not stored
    gate.open.set()
    writer.join()
    assert_same(handle.wait(), kv(1))
    assert stored == ["host"] and cache.stats().tiers["host"].used == 128 * KiB
    assert_same(cache.get("c"), kv(3))


def test_a_put_copies_the_tensors_before_returning(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    changed = threading.Event()
    offload = transfers(cache).offload
    assert isinstance(offload, WorkerStream)
    offload.before_copy = lambda: changed.wait(timeout=0.5)  # a copy that returns early would see the change
    source = kv(4)
    cache.put("kv", {n: t.clone() for n, t in source.items()} | {"live": source["k"]})
    source["k"].add_(1)
    changed.set()
    assert torch.equal(cache.get("kv")["live"], kv(4)["k"])


def test_a_failed_reload_raises_and_the_entry_stays(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    cache.put("kv", kv(5))
    reload = reload_worker(cache)
    reload.before_copy = fail_copies
    with pytest.raises(RuntimeError, match="injected"):
        cache.get("kv")
    reload.before_copy = None
    assert cache.tier_of("kv") == "host"
    assert_same(cache.get("kv"), kv(5))


def test_offloads_and_reloads_are_logged_once_their_copies_are_done(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 64 * KiB}}))
    cache.put("a", kv(1))
    cache.put("b", kv(2))  # demotes a: hbm -> host on the offload stream
    assert_same(cache.get("a"), kv(1))  # host -> hbm on the reload stream; promoting a demotes b
    transfers(cache).deferred.settle_all()  # b's offload may still be running: stats() shows finished copies
    paths = cache.stats().pathways
    assert paths["hbm->host(pageable)"].bytes == 128 * KiB and paths["host(pageable)->hbm"].bytes == 64 * KiB


# ---- layerwise streaming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["hbm", "host", "nvme"])
def test_stream_yields_every_tensor_in_stored_order(make_cache: CacheFactory, tier: str) -> None:
    cache = make_cache(only_tier(tier))
    entry = layers(6)
    cache.put("model", entry)
    got = dict(cache.stream("model", lookahead=2))
    assert_same(got, entry)
    assert cache.tier_of("model") == tier  # streaming does not promote


def test_stream_keeps_lookahead_tensors_in_flight(make_cache: CacheFactory, worker: WorkerStream) -> None:
    cache = make_cache(only_tier("host"))
    cache.put("model", layers(6))
    started: list[list[str]] = []
    host = cache.tiers["host"]
    load = host.load
    host.load = lambda entry, device, names=None: (
        started.append(list(names or []))
        or load(  # type: ignore[method-assign]
            entry, device, names
        )
    )
    gate = gate_reloads(cache)
    gate.open.set()
    it = cache.stream("model", lookahead=2, stream=worker)
    name, _ = next(it)
    assert name == "layer0" and started == [["layer0"], ["layer1"], ["layer2"]]  # layer i and the next two
    next(it)
    assert started[-1] == ["layer3"] and len(started) == 4
    it.close()  # a consumer that stops early releases the entry
    cache.delete("model")
    assert cache.stats().tiers["host"].used == 0


def test_stream_from_nvme_stopped_early_releases_the_entry(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("nvme"))
    cache.put("model", layers(8))
    for name, tensor in cache.stream("model", lookahead=3):
        assert name == "layer0" and bool((tensor == 0).all())
        break
    cache.delete("model")  # would wait forever on a reader that never ended
    assert len(cache) == 0


def test_stream_checks_its_arguments(make_cache: CacheFactory) -> None:
    cache = make_cache()
    cache.put("model", layers(2))
    with pytest.raises(KeyError):
        cache.stream("absent")
    with pytest.raises(EntryValueError, match="lookahead"):
        cache.stream("model", lookahead=-1)


# ---- arrays from and to other libraries ----------------------------------------------------------------------
class DLPackOnly:
    """An array that speaks only DLPack, as a cupy array does."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def __dlpack__(self, **kwargs: object) -> object:
        return self._tensor.__dlpack__(**kwargs)  # type: ignore[arg-type]

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._tensor.__dlpack_device__()  # type: ignore[return-value]


def test_dlpack_arrays_are_accepted_without_a_copy(make_cache: CacheFactory) -> None:
    cache = make_cache()
    source = torch.arange(12, dtype=torch.float32)
    cache.put("x", {"x": DLPackOnly(source)}, copy=False)
    assert torch.equal(cache.get("x")["x"], source)


def test_get_returns_numpy_or_refuses_clearly(make_cache: CacheFactory) -> None:
    cache = make_cache()
    cache.put("x", {"x": torch.arange(5), "b": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(EntryValueError, match="bfloat16"):
        cache.get("x", as_="numpy")
    cache.put("y", {"y": torch.arange(5)})
    assert isinstance(cache.get("y", as_="numpy")["y"], np.ndarray)
    with pytest.raises(EntryValueError, match="as_="):
        cache.get("y", as_="jax")
    with pytest.raises(EntryValueError, match="cupy"):
        cache.get("y", as_="cupy")  # no cupy, or no GPU: either way a clear refusal


# ---- regressions found in review -------------------------------------------------------------------------------
def test_an_entry_demoted_while_its_promoting_copy_is_in_flight_keeps_its_values(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 64 * KiB}, "host": {"capacity": 256 * KiB}}))
    cache.put("a", kv(1))
    cache.put("b", kv(2))  # a goes down to host
    gate = gate_reloads(cache)
    handle = cache.prefetch("a")  # promotes a into hbm while its copy is held at the gate
    cache.put("c", kv(3))  # demotes a again: the offload must wait for the copy that fills a's tensors
    gate.open.set()
    assert_same(handle.wait(), kv(1))
    assert_same(cache.get("a"), kv(1))


def test_a_failed_offload_leaves_nothing_behind(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    offload = transfers(cache).offload
    assert isinstance(offload, WorkerStream)

    offload.before_copy = fail_copies
    with pytest.raises(RuntimeError, match="injected"):
        cache.put("kv", kv(1))
    offload.before_copy = None
    transfers(cache).deferred.settle_all()
    assert "kv" not in cache and cache.stats().tiers["host"].used == 0 and cache.tiers["host"].pool.used == 0


def test_close_ends_a_half_read_stream(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    cache.put("m", layers(4))
    it = cache.stream("m")
    next(it)
    cache.close()  # would wait forever for the stream's read to end
    with pytest.raises(StopIteration):
        next(it)


def test_many_small_tensors_stay_in_the_pool(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host", capacity=1 << 20))
    for i in range(8):
        cache.put(f"e{i}", {f"t{j}": torch.full((16,), float(j)) for j in range(64)})  # 64 x 64 bytes
    assert cache.tiers["host"].pool.fallbacks == 0


def test_done_is_true_for_a_prefetch_that_failed(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    cache.put("kv", kv(1))
    reload_worker(cache).before_copy = fail_copies
    handle = cache.prefetch("kv")
    with pytest.raises(RuntimeError):
        handle.wait()
    assert handle.done()


def test_an_entry_spread_over_a_fragmented_pool_round_trips(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 256 * KiB}}))
    for i in range(4):
        cache.put(f"e{i}", kv(i))  # 4 x 64 KiB fill the pool
    cache.delete("e0")
    cache.delete("e2")  # two 64 KiB holes, not adjacent
    big = kv(9, 128 * KiB)
    assert cache.put("big", big) == "host"
    assert cache.tiers["host"].pool.free_runs == 0  # it took both holes
    assert_same(cache.get("big"), big)
    assert_same(dict(cache.stream("big", lookahead=1)), big)
    host = cache.tiers["host"]
    (uid,) = [u for u in host if host.spec(u).key == "big"]
    assert_same(host.load(uid, None).wait(), big)  # the views a demotion writes to nvme
