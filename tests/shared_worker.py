"""A process on a shared root, for tests/test_shared_root.py: `python shared_worker.py MODE ROOT SEED SECONDS`.

Every tensor it writes is stamped with its key and version (`stamp`), so any reader can check that what it got is
one whole version of that key (`check`) and never a mix, zeros, or another key's data. Modes:
- `chaos`: random puts (some write-through), gets and deletes over a few keys until the time is up;
- `writer`: puts stage1/0, stage1/1, ... into nvme, printing each key once its put returned;
- `reader`: waits for the writer's keys without reopening, reading each one as it appears.
A worker prints `ok <counters>` when it ends normally; any wrong read raises (a non-zero exit).
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import KiB, policy  # noqa: E402

import tiercache  # noqa: E402

KEYS = [f"k{i}" for i in range(8)]
NVME_CAPACITY = 1536 * KiB  # the four chaos workers' shared budget: well below what their puts would hold


def chaos_policy() -> tiercache.Policy:
    return policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 160 * KiB}, "nvme": {"capacity": NVME_CAPACITY}})


def key_id(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")


def stamp(key: str, version: int, n: int) -> dict[str, torch.Tensor]:
    """Two tensors whose every element follows from (key, version): a torn or foreign read cannot pass `check`."""
    base = torch.arange(n, dtype=torch.int64) * 7919 + version
    return {"k": torch.cat([torch.tensor([key_id(key), version]), base]), "v": -(base + key_id(key))}


def check(key: str, tensors: dict[str, torch.Tensor]) -> int:
    """The version of `key` that `tensors` hold; raises if they are not exactly one version of it."""
    k, v = tensors["k"], tensors["v"]
    assert int(k[0]) == key_id(key), f"{key}: another key's data"
    version = int(k[1])
    expected = stamp(key, version, k.numel() - 2)
    assert torch.equal(k, expected["k"]) and torch.equal(v, expected["v"]), f"{key} v{version}: torn or wrong data"
    return version


def chaos(root: Path, seed: int, seconds: float) -> None:
    rng = random.Random(seed)
    counts = dict.fromkeys(["put", "full", "get", "miss", "delete", "gone"], 0)
    deadline = time.monotonic() + seconds
    with tiercache.TierCache(root=root, policy=chaos_policy(), device="cpu") as cache:
        print("ready", flush=True)
        while time.monotonic() < deadline:
            key = rng.choice(KEYS)
            op = rng.random()
            if op < 0.45:
                try:
                    cache.put(
                        key,
                        stamp(key, rng.randrange(1 << 40), rng.choice([4, 8, 16]) * KiB // 8),
                        write_through=rng.random() < 0.5,
                    )
                    counts["put"] += 1
                except tiercache.CapacityError:
                    counts["full"] += 1
            elif op < 0.85:
                got = cache.get(key, device="cpu")
                if got is None:
                    counts["miss"] += 1
                else:
                    check(key, got)
                    counts["get"] += 1
            else:
                try:
                    cache.delete(key)
                    counts["delete"] += 1
                except KeyError:
                    counts["gone"] += 1
    print("ok", " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


def writer(root: Path, count: int) -> None:
    only_nvme = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 256 * 1024 * KiB}})
    with tiercache.TierCache(root=root, policy=only_nvme, device="cpu") as cache:
        for i in range(count):
            key = f"stage1/{i}"
            cache.put(key, stamp(key, i, 64 * KiB))
            print("put", key, flush=True)
            time.sleep(0.02)
    print("ok", flush=True)


def reader(root: Path, count: int, seconds: float) -> None:
    memory = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 256 * 1024 * KiB}})
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    with tiercache.TierCache(root=root, policy=memory, device="cpu", read_only=True) as cache:
        print("ready", flush=True)
        while len(seen) < count and time.monotonic() < deadline:
            for key in cache.keys():  # no reopen: what the writer committed appears here
                if key not in seen:
                    assert check(key, cache[key]) == int(key.split("/")[1])
                    seen.add(key)
            time.sleep(0.005)
    assert len(seen) == count, f"saw {len(seen)} of {count} entries"
    print("ok", len(seen), flush=True)


if __name__ == "__main__":
    mode, root_arg = sys.argv[1], Path(sys.argv[2])
    if mode == "chaos":
        chaos(root_arg, int(sys.argv[3]), float(sys.argv[4]))
    elif mode == "writer":
        writer(root_arg, int(sys.argv[3]))
    elif mode == "reader":
        reader(root_arg, int(sys.argv[3]), float(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def serve(conn: Any) -> None:
    """A cache in another process, driven over a multiprocessing pipe (tests/test_state_machine_shared.py): each
    request is a tuple, each reply the result or ("error", repr)."""
    cache: tiercache.TierCache | None = None
    while True:
        request = conn.recv()
        op, args = request[0], request[1:]
        try:
            if op == "open":
                cache = tiercache.TierCache(root=args[0], policy=args[1], device="cpu")
                reply: Any = None
            elif op == "close":
                if cache is not None:
                    cache.close()
                cache = None
                reply = None
            elif op == "exit":
                conn.send(None)
                return
            else:
                assert cache is not None
                reply = getattr(cache_ops, op)(cache, *args)
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            reply = ("error", repr(exc))
        conn.send(reply)


class cache_ops:  # noqa: N801 - a namespace of the requests `serve` answers
    @staticmethod
    def put(cache: tiercache.TierCache, key: str, version: int) -> None:
        cache.put(key, stamp(key, version, 512))

    @staticmethod
    def get(cache: tiercache.TierCache, key: str) -> int | None:
        got = cache.get(key, device="cpu")
        return None if got is None else check(key, got)

    @staticmethod
    def delete(cache: tiercache.TierCache, key: str) -> bool:
        try:
            cache.delete(key)
        except KeyError:
            return False
        return True

    @staticmethod
    def keys(cache: tiercache.TierCache) -> list[str]:
        return sorted(cache.keys())

    @staticmethod
    def used(cache: tiercache.TierCache) -> int:
        return cache.stats().tiers["nvme"].used
