"""The same contracts with a CUDA device as hbm. Skipped, with the reason shown, where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CacheFactory
from helpers import KiB, MiB, assert_same, kv, only_tier, policy, transfers
from test_entries import DTYPES, sample

import tiercache
from tiercache.transfer import CudaStream

pytestmark = pytest.mark.gpu


def on_cuda(entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.cuda() for n, t in entry.items()}


def test_the_compute_device_is_cuda(make_cache: CacheFactory) -> None:
    cache = make_cache(policy())
    assert cache.device.type == "cuda" and cache.stats().device.startswith("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tensors_round_trip_through_every_tier(
    make_cache: CacheFactory, tier_name: str, dtype: torch.dtype
) -> None:
    cache = make_cache(only_tier(tier_name))
    entry = {
        "x": sample(dtype, (3, 5, 7)).cuda(),
        "scalar": sample(dtype, ()).cuda(),
        "empty": sample(dtype, (0, 4)).cuda(),
    }
    cache.put("k", entry)
    got = cache.get("k")
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same(got, entry)
    assert_same(cache.get("k", device="cpu"), entry)


def test_demotion_and_promotion_move_between_device_and_host(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 100 * KiB}, "host": {"capacity": 100 * KiB}}))
    for i in range(4):
        cache.put(f"e{i}", on_cuda(kv(i)))
    assert [cache.tier_of(f"e{i}") for i in range(4)] == ["nvme", "nvme", "host", "hbm"]
    for i in range(4):
        assert_same(cache.get(f"e{i}"), kv(i))
    paths = cache.stats().pathways
    assert (
        "hbm->host(pinned)" in paths
        and "host(pinned)->hbm" in paths
        and any(p.startswith("nvme(") and p.endswith("->hbm") for p in paths)
    )
    assert cache.get("e0")["k"].is_cuda


def test_a_hit_returns_the_cached_device_tensors(make_cache: CacheFactory) -> None:
    cache = make_cache(policy())
    cache.put("k", on_cuda(kv(1)))
    first, second = cache.get("k"), cache.get("k")
    assert first["k"].data_ptr() == second["k"].data_ptr()


# ---- the CUDA data path: pinned pool, copy streams, ordering under GPU-side delays ---------------------------------
SPIN = 200_000_000  # GPU clock cycles torch.cuda._sleep spins ahead of each copy: ~0.1 s, far longer than host code


def delay_reloads(cache: tiercache.TierCache) -> None:
    stream = transfers(cache).reload
    assert isinstance(stream, CudaStream)
    stream.before_copy = lambda: torch.cuda._sleep(SPIN)


def test_the_host_tier_is_one_pinned_pool(make_cache: CacheFactory) -> None:
    cache = make_cache(policy(tiers={"hbm": {"capacity": 64 * KiB}}))
    assert (
        cache.stats().tiers["host"].mode == "pinned"
    )  # (is_pinned() looks at the storage's start, which lies before the region)
    cache.put("a", on_cuda(kv(1)))
    cache.put("b", on_cuda(kv(2)))  # demotes a into the pool
    assert_same(cache.get("a"), kv(1))
    stats = cache.stats()
    assert any(note.startswith("host pool:") and "pinned" in note for note in stats.notes)
    assert stats.pathways["hbm->host(pinned)"].bytes >= 64 * KiB and "host(pinned)->hbm" in stats.pathways


def test_a_consumer_stream_waits_for_a_delayed_reload_without_blocking_the_host(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    entry = kv(3, 4 * MiB)
    cache.put("kv", entry)
    delay_reloads(cache)
    consumer = torch.cuda.Stream()
    handle = cache.prefetch("kv")
    tensors = handle.wait(stream=consumer)
    assert not handle.done()  # the host got here while the GPU still spins ahead of the copy
    with torch.cuda.stream(consumer):
        doubled = {n: t * 2 for n, t in tensors.items()}  # ordered after the copy by the event, not by the host
    consumer.synchronize()
    assert_same({n: t / 2 for n, t in doubled.items()}, entry)


def test_a_get_orders_the_current_stream_after_its_copies(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    entry = kv(4, 4 * MiB)
    cache.put("kv", entry)
    delay_reloads(cache)
    got = cache.get("kv")
    # Integer sums of the bits, on the current stream: exact, and they must see the copied values.
    summed = torch.stack([t.view(torch.int32).sum() for t in got.values()])
    want = torch.stack([t.view(torch.int32).sum() for t in entry.values()])
    assert torch.equal(summed.cpu(), want)


def test_pinned_memory_being_read_is_not_reused_before_the_copy_ends(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host", capacity=8 * MiB))
    cache.put("a", kv(1, 4 * MiB))
    delay_reloads(cache)
    handle = cache.prefetch("a")
    cache.delete("a")
    cache.put("b", kv(2, 4 * MiB))
    cache.put("c", kv(3, 4 * MiB))  # needs a's extents: waits for the delayed copy instead of overwriting them
    assert_same(handle.wait(), kv(1, 4 * MiB))
    assert_same(cache.get("c"), kv(3, 4 * MiB))


def test_offload_after_the_producer_and_before_later_writes(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    source = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(SPIN)  # the producer is still busy on the current stream
    source += 7
    cache.put("x", {"x": source})
    source += 1  # queued after put() on the same stream: must not reach the cached copy
    assert bool((cache.get("x", device="cpu")["x"] == 7).all())


def test_layerwise_streaming_on_a_side_stream(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("host"))
    entry = {f"layer{i}": torch.full((1 << 18,), float(i)) for i in range(6)}
    cache.put("m", entry)
    delay_reloads(cache)
    consumer = torch.cuda.Stream()
    sums = []
    for name, tensor in cache.stream("m", lookahead=2, stream=consumer):
        with torch.cuda.stream(consumer):
            sums.append((name, tensor.sum()))
    consumer.synchronize()
    assert [(n, float(s)) for n, s in sums] == [(f"layer{i}", float(i) * (1 << 18)) for i in range(6)]


def test_cupy_arrays_in_and_out() -> None:
    cupy = pytest.importorskip("cupy", reason="cupy is not installed: pip install 'tiercache[cuda]'")
    with tiercache.TierCache(policy=policy()) as cache:
        # Arrays made and compared through DLPack and torch: cupy's own ops compile kernels with NVRTC, which a
        # machine may lack while DLPack exchange (all tiercache uses) works.
        source = torch.arange(1000, dtype=torch.float32, device="cuda")
        array = cupy.from_dlpack(source)
        cache.put("c", {"a": array})
        got = cache.get("c", as_="cupy")["a"]
        assert isinstance(got, cupy.ndarray) and torch.equal(torch.from_dlpack(got), source)


@pytest.mark.parametrize("compat", [False, True], ids=["auto", "compat-forced"])
def test_kvikio_in_both_modes(make_cache: CacheFactory, compat: bool, tmp_path: Path) -> None:
    kvikio = pytest.importorskip("kvikio", reason="kvikio is not installed: pip install 'tiercache[cuda]'")
    previous = kvikio.defaults.get("compat_mode")
    kvikio.defaults.set("compat_mode", kvikio.CompatMode.ON if compat else kvikio.CompatMode.AUTO)
    try:
        nvme = {"capacity": "1GiB", "backend": "kvikio", "threads": 8, "task_size": "4MiB"}
        pol = tiercache.Policy.from_dict({"tiers": {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": nvme}})
        cache = make_cache(pol, root=tmp_path / f"kvikio-{compat}")
        mode = cache.stats().nvme_device_io
        assert mode == "compat" if compat else mode in ("gds", "compat")
        entry = on_cuda(kv(5, 8 * MiB))
        cache.put("e", entry)
        assert_same(cache.get("e"), entry)
        assert f"nvme({mode})->hbm" in cache.stats().pathways
    finally:
        kvikio.defaults.set("compat_mode", previous)


@pytest.mark.parametrize("verify", [False, True], ids=["unchecked", "checked"])
def test_kvikio_reads_of_small_tensors_are_copied_out_before_their_buffer_is_reused(
    make_cache: CacheFactory, verify: bool, tmp_path: Path
) -> None:
    """Tensors under 256 KiB are copied out of kvikio's padded read buffer. With the copy queued on the caller's
    busy stream and the buffer freed at once, kvikio's next read (which no stream orders) landed in it before the
    copy ran (found by a review). Each get here must return its own entry's values. The unchecked case is the one
    that caught it: checking read each stored CRC on the caller's stream, which waited out the delay."""
    pytest.importorskip("kvikio", reason="kvikio is not installed: pip install 'tiercache[cuda]'")
    nvme = {"capacity": "256MiB", "backend": "kvikio", "verify_checksums": verify}
    cache = make_cache(
        tiercache.Policy.from_dict({"tiers": {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": nvme}}),
        root=tmp_path / f"small-{verify}",
    )
    first = {f"t{i}": torch.full((4096,), float(i + 1), device="cuda") for i in range(8)}  # 16 KiB each
    second = {n: -t for n, t in first.items()}
    cache.put("first", first)
    cache.put("second", second)
    for _ in range(5):
        torch.cuda._sleep(200_000_000)  # the current stream is busy for a while (~0.1 s)
        got_first = cache.get("first")
        got_second = cache.get("second")
        torch.cuda.synchronize()
        assert_same(got_first, first)
        assert_same(got_second, second)
