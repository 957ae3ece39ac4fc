"""Hot-get latency while a large demotion writes to nvme: the p50 and p99 of a small entry's get from hbm, with a
large entry being moved from host to nvme by another thread, beside the same gets with nothing else running.

The demotion writes outside the cache's lock (plan under it, write without it, commit under it), so the hot gets
should only feel what the write costs the machine's cores, not wait for it. Gets are due at a fixed rate and each
is timed from when it was due (no coordinated omission). Target on CPU: p99 <= 2x idle. Beside it, the machine's
floor: the same gets while another process (no shared lock, no shared GIL) writes as many bytes with one raw
O_DIRECT pwritev loop and fsync.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

import tiercache

from .measure import Row, row

HOT = 64 << 10  # the hot entry: one small K/V block
MIN_SAMPLES = 200
INTERVAL_S = 0.5e-3  # a get is due every half millisecond, as in a denoising loop reading its K/V


def _gets(cache: tiercache.TierCache, until: Callable[[], bool], least: int) -> list[float]:
    """Latencies of get("hot") due every INTERVAL_S until `until()` and at least `least` samples, each measured
    from when it was due, not from when it started: a get stuck behind a lock for 1 s delays the 2,000 due after
    it, and they all count (timing each call from its own start would hide the stall in one sample)."""
    samples: list[float] = []
    first = time.perf_counter()
    while len(samples) < least or not until():
        due = first + len(samples) * INTERVAL_S
        while time.perf_counter() < due:
            pass
        cache.get("hot")
        samples.append(time.perf_counter() - due)
    return samples


# The floor's writer: a process of its own, one thread, O_DIRECT pwritev from one page-aligned 64 MiB buffer, then
# fsync. It says "ready" once its buffer is written and starts on a line from stdin, so the gets time only the write.
RAW_WRITER = """
import mmap, os, sys
size, path, piece = int(sys.argv[1]), sys.argv[2], 64 << 20
buf = mmap.mmap(-1, piece)
buf.write(bytes([1]) * piece)
print("ready", flush=True)
sys.stdin.readline()
fd = os.open(path, os.O_CREAT | os.O_WRONLY | getattr(os, "O_DIRECT", 0), 0o644)
done = 0
while done < size:
    done += os.pwritev(fd, [memoryview(buf)[: min(piece, size - done)]], done)
os.fsync(fd)
os.close(fd)
"""


def _gets_beside_raw_write(cache: tiercache.TierCache, nbytes: int, path: Path) -> list[float]:
    """The hot gets while another process writes `nbytes` to `path` raw: what any disk write costs this machine."""
    writer = subprocess.Popen(
        [sys.executable, "-c", RAW_WRITER, str(nbytes), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        if writer.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the raw writer exited with {writer.wait()} before writing")
        writer.stdin.write("go\n")
        writer.stdin.flush()
        samples = _gets(cache, lambda: writer.poll() is not None, MIN_SAMPLES)
        if writer.wait() != 0:
            raise RuntimeError(f"the raw writer of {path} exited with {writer.returncode}")
        return samples
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        path.unlink(missing_ok=True)


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_latency(demotion: int, root: Path, progress: Callable[[str], None]) -> list[Row]:
    progress(f"hot get during a {tiercache.format_size(demotion)} demotion")
    policy = tiercache.Policy.from_dict(
        {
            "name": "bench-latency",
            "tiers": {
                "hbm": {"capacity": 4 * HOT},
                "host": {"capacity": demotion + (16 << 20)},
                "nvme": {"capacity": 2 * demotion + (64 << 20)},
            },
            "placement": {"promote_on_hit": False, "flush_on_close": False},
        },
        source="bench",
    )
    root = root / "latency"
    with tiercache.TierCache(root=root, policy=policy, device="cpu") as cache:
        cache.put("hot", {"kv": torch.randn(HOT // 4)})
        big = {f"layer{i}": torch.randn(demotion // 16 // 4) for i in range(16)}
        done = threading.Event()
        results: list[Row] = []
        for attempt in range(2):  # the first round warms the page cache, the thread pools and the allocator
            key = f"big{attempt}"
            cache.put(key, big)
            assert cache.tier_of(key) == "host"
            idle = _gets(cache, lambda: True, MIN_SAMPLES * 5)
            done.clear()
            took: list[float] = []

            def demote(key: str = key, took: list[float] = took) -> None:
                start = time.perf_counter()
                try:
                    cache.offload(key, to="nvme")
                finally:
                    took.append(time.perf_counter() - start)
                    done.set()

            writer = threading.Thread(target=demote)
            writer.start()
            busy = _gets(cache, done.is_set, MIN_SAMPLES)
            writer.join()
            assert cache.tier_of(key) == "nvme"
            cache.delete(key)
            if attempt == 0:
                continue
            floor = _gets_beside_raw_write(cache, demotion, root / "raw-write")
            detail = f"while {tiercache.format_size(demotion)} is demoted to nvme ({took[0]:.2f} s, {len(busy)} gets)"
            results = [
                row(
                    HOT,
                    None,
                    [_p(busy, 0.99)],
                    "the same get, idle (p99)",
                    [_p(idle, 0.99)],
                    0.5,
                    detail=f"hot hbm get p99 {detail}",
                    suite="latency",
                ),
                row(
                    HOT,
                    None,
                    [_p(busy, 0.99)],
                    "the same get beside a raw O_DIRECT write of as many bytes by another process (p99)",
                    [_p(floor, 0.99)],
                    detail=f"hot hbm get p99 {detail}, beside the machine's floor",
                    suite="latency",
                ),
                row(
                    HOT,
                    None,
                    [statistics.median(busy)],
                    "the same get, idle (p50)",
                    [statistics.median(idle)],
                    detail=f"hot hbm get p50 {detail}",
                    suite="latency",
                ),
            ]
        return results
