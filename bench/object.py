"""The object tier (an S3 bucket) beside raw obstore and a raw loopback TCP stream, on a SeaweedFS server this
bench starts on free loopback ports and stops after.

For each size, alternated, medians of the repeats:
- put: `cache.put` of a new key into a cache whose only tier is the bucket, beside raw obstore puts of the same
  tensors, one object each, `concurrency` at a time (what a user writing tensors to S3 themselves would do);
- the handoff: a fresh process opens another root on the same bucket (read-only) and gets the entry, beside a fresh
  process's raw obstore gets of the same objects and a fresh process receiving the same bytes over a raw loopback
  TCP stream (the link's ceiling, no S3 server in between). Each child times itself from before its open;
- the same handoff of the first size once the bucket also holds CROWD small entries of other keys (what a shared
  prompt cache looks like), beside the same raw gets: the open and the get should not grow with the bucket.
Targets on the CI-class VM: >= 0.9x raw obstore, put and get.

    python -m bench.object [SIZE...]          (or through make bench; BENCH_OBJECT_SIZES="16MiB,64MiB")
    python -m bench.object child MODE ARGS    (what each timed process runs)
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.entry import as_bytes

from .measure import Row, child_seconds, make_entry, row, run_alone, side_by_side
from .peers import touch

KEY = "object"
CONCURRENCY = 8
CROWD = 1000  # other entries in the bucket for the crowded handoff row (a shared prompt cache's worth)


def _settings(endpoint: str, prefix: str) -> dict[str, Any]:
    return {"url": f"s3://tiercache/{prefix}", "endpoint": endpoint, "concurrency": CONCURRENCY, "timeout_s": 60.0}


def _policy(endpoint: str, prefix: str, size: int) -> tiercache.Policy:
    only = {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 0}}
    tiers = {**only, "object": {"capacity": 32 * size + (64 << 20), **_settings(endpoint, prefix)}}
    return tiercache.Policy.from_dict({"name": "object-bench", "tiers": tiers}, source="bench")


def _raw_store(endpoint: str) -> Any:
    from obstore.store import S3Store  # noqa: PLC0415 - the s3 extra

    return S3Store(
        "tiercache",
        endpoint=endpoint,
        region="us-east-1",
        client_options={"allow_http": True, "timeout": "60s"},
    )


def _raw_put(store: Any, prefix: str, entry: dict[str, torch.Tensor]) -> None:
    import obstore  # noqa: PLC0415

    def one(item: tuple[str, torch.Tensor]) -> None:
        name, tensor = item
        obstore.put(store, f"{prefix}/{name}", as_bytes(tensor).numpy().data, max_concurrency=CONCURRENCY)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, entry.items()))


def _child(mode: str, args: list[str]) -> float:
    """One timed read in this fresh process; returns its seconds."""
    if mode == "tiercache":
        endpoint, prefix, size, root = args[0], args[1], int(args[2]), args[3]
        start = time.perf_counter()
        with tiercache.TierCache(root=root, policy=_policy(endpoint, prefix, size), read_only=True, device="cpu") as c:
            touch(c[KEY])
        return time.perf_counter() - start
    if mode == "obstore":
        import obstore  # noqa: PLC0415

        endpoint, prefix, names = args[0], args[1], json.loads(args[2])
        start = time.perf_counter()
        store = _raw_store(endpoint)

        def one(name: str) -> torch.Tensor:
            data = obstore.get(store, f"{prefix}/{name}").bytes()
            out = torch.empty(len(data), dtype=torch.uint8)
            out.numpy().data.cast("B")[:] = memoryview(data)
            return out

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            got = dict(zip(names, pool.map(one, names), strict=True))
        touch(got)
        return time.perf_counter() - start
    if mode == "tcp":
        port, size = int(args[0]), int(args[1])
        start = time.perf_counter()
        out = torch.empty(size, dtype=torch.uint8)
        view, at = out.numpy().data.cast("B"), 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            while at < size:
                got = sock.recv_into(view[at:], min(size - at, 1 << 22))
                if not got:
                    raise SystemExit("bench.object: the TCP stream ended early")
                at += got
        touch({"bytes": out})
        return time.perf_counter() - start
    raise SystemExit(f"bench.object: unknown mode {mode!r}")


def _timed(mode: str, *args: str) -> float:
    return child_seconds("bench.object", mode, *args)


class Sender:
    """A loopback listener that sends `payload` whole to each connection (the raw TCP stream's far end)."""

    def __init__(self, payload: memoryview) -> None:
        self.payload = payload
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.payload)

    def close(self) -> None:
        self.listener.close()


def bench_object(sizes: list[int], scratch: Path, repeat: int, progress: Callable[[str], None]) -> list[Row]:
    """The rows, or none (said on stderr) where obstore or the SeaweedFS binary is not installed."""
    from tiercache.testing.servers import ACCESS_KEY, INSTALL, SECRET_KEY, S3Server, weed_binary  # noqa: PLC0415

    try:
        import obstore  # noqa: F401, PLC0415
    except ImportError:
        print(f"bench.object: skipped, no obstore: {INSTALL}", file=sys.stderr)
        return []
    if weed_binary() is None or not sizes:
        if sizes:
            print(f"bench.object: skipped, no SeaweedFS binary: {INSTALL}", file=sys.stderr)
        return []
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
    server = S3Server(scratch / "seaweedfs")
    progress("object: starting a SeaweedFS server on loopback")
    server.start()
    rows: list[Row] = []
    try:
        store = _raw_store(server.endpoint)
        for size in sizes:
            label = tiercache.format_size(size)
            entry = make_entry(size)
            prefix = f"bench-{size}"
            progress(f"object: put {label}")
            with tiercache.TierCache(
                root=scratch / f"writer-{size}", policy=_policy(server.endpoint, prefix, size), device="cpu"
            ) as cache:
                keys = (f"put-{i}" for i in itertools.count())  # new keys: a put's cost, not a replacement's deletes
                ours, raw = side_by_side(
                    lambda: cache.put(next(keys), entry),  # noqa: B023 - called before the loop moves on
                    functools.partial(_raw_put, store, f"raw-{size}", entry),
                    repeat,
                )
                cache.put(KEY, entry)
            target = 0.9
            rows.append(row(size, None, ours, "raw obstore puts, one object per tensor", raw, target, suite="object",
                            detail="put into the bucket"))  # fmt: skip
            progress(f"object: a fresh process's get of {label}")
            names = json.dumps(list(entry))
            payload = torch.cat([as_bytes(t) for t in entry.values()])
            sender = Sender(payload.numpy().data.cast("B"))
            times: dict[str, list[float]] = {"tiercache": [], "obstore": [], "tcp": []}
            try:
                for i in range(repeat):
                    reader = str(scratch / f"reader-{size}-{i}")
                    times["tiercache"].append(_timed("tiercache", server.endpoint, prefix, str(size), reader))
                    times["obstore"].append(_timed("obstore", server.endpoint, f"raw-{size}", names))
                    times["tcp"].append(_timed("tcp", str(sender.port), str(payload.numel())))
            finally:
                sender.close()
            detail = "handoff: a fresh process's open + get"
            rows.append(row(size, None, times["tiercache"], "raw obstore gets in a fresh process", times["obstore"],
                            target, detail=detail, suite="object"))  # fmt: skip
            rows.append(row(size, None, times["tiercache"], "a raw loopback TCP stream, fresh process", times["tcp"],
                            detail=detail, suite="object"))  # fmt: skip
            if size == sizes[0]:
                rows.append(_crowded(server.endpoint, prefix, size, names, scratch, repeat, progress))
    finally:
        server.stop()
    return rows


def _crowded(
    endpoint: str, prefix: str, size: int, names: str, scratch: Path, repeat: int, progress: Callable[[str], None]
) -> Row:
    """The handoff row again, with CROWD other entries beside the one read."""
    progress(f"object: {CROWD} more entries in the bucket")
    with tiercache.TierCache(root=scratch / "crowd", policy=_policy(endpoint, prefix, size), device="cpu") as cache:
        for i in range(CROWD):
            cache.put(f"other-{i}", {"prompt": torch.full((1024,), i, dtype=torch.float32)})
    progress(f"object: a fresh process's get of {tiercache.format_size(size)} among them")
    ours: list[float] = []
    raw: list[float] = []
    for i in range(repeat):
        ours.append(_timed("tiercache", endpoint, prefix, str(size), str(scratch / f"crowded-{i}")))
        raw.append(_timed("obstore", endpoint, f"raw-{size}", names))
    return row(size, None, ours, "raw obstore gets in a fresh process", raw, 0.9, suite="object",
               detail=f"handoff from a bucket of {CROWD} other entries")  # fmt: skip


if __name__ == "__main__":
    run_alone(bench_object, _child)
