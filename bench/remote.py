"""The remote tier (a Mooncake Store) beside raw Mooncake calls and a raw loopback TCP stream, on a master and one
holder this bench starts on free loopback ports and stops after.

For each size, alternated, medians of the repeats:
- put: `cache.put` of a new key into a cache whose only tier is the store, beside a raw `batch_put_from` of the
  same tensors, one hard-pinned object each (what a user writing tensors to Mooncake themselves would do);
- the handoff (the two-node case on one machine): a fresh process opens another root on the same store (read-only)
  and gets the entry, beside a fresh process's raw `batch_get_into` of the same objects into new memory and a
  fresh process receiving the same bytes over a raw loopback TCP stream. Each child times itself from before it
  connects;
- the same handoff of the first size once the store also holds CROWD small entries of other keys, beside the same
  raw gets (Mooncake's key listing is the whole store's, but no other entry's manifest is read for the get).
The holder's memory is faulted in first (filled once and emptied), as a long-running holder's is. Target on the
CI-class VM: >= 0.8x raw get_into.

    python -m bench.remote [SIZE...]          (or through make bench; BENCH_REMOTE_SIZES="16MiB,64MiB")
    python -m bench.remote child MODE ARGS    (what each timed process runs)
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.entry import as_bytes

from .measure import Row, child_seconds, make_entry, row, run_alone, side_by_side
from .object import CROWD, Sender
from .peers import touch

KEY = "remote"


def _settings(where: dict[str, str], prefix: str) -> dict[str, Any]:
    return {**where, "prefix": prefix, "timeout_s": 60.0}


def _policy(where: dict[str, str], prefix: str, size: int) -> tiercache.Policy:
    only = {"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 0}}
    tiers = {**only, "remote": {"capacity": 3 * size + (16 << 20), **_settings(where, prefix)}}
    return tiercache.Policy.from_dict({"name": "remote-bench", "tiers": tiers}, source="bench")


def _client(where: dict[str, str]) -> Any:
    from mooncake.store import MooncakeDistributedStore  # noqa: PLC0415 - the mooncake extra

    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", where["metadata_server"], 0, 16 << 20, "tcp", "", where["master"])
    if rc != 0:
        raise SystemExit(f"bench.remote: Mooncake setup failed with {rc}")
    return store


def _child(mode: str, args: list[str]) -> float:
    """One timed read in this fresh process; returns its seconds."""
    where = json.loads(args[0])
    if mode == "tiercache":
        prefix, size, root = args[1], int(args[2]), args[3]
        start = time.perf_counter()
        with tiercache.TierCache(root=root, policy=_policy(where, prefix, size), read_only=True, device="cpu") as c:
            touch(c[KEY])
        return time.perf_counter() - start
    if mode == "mooncake":
        sizes: dict[str, int] = json.loads(args[1])
        start = time.perf_counter()
        store = _client(where)
        out = {k: torch.empty(n, dtype=torch.uint8) for k, n in sizes.items()}
        codes = store.batch_get_into(list(out), [t.data_ptr() for t in out.values()], list(sizes.values()))
        if codes != list(sizes.values()):
            raise SystemExit(f"bench.remote: raw batch_get_into answered {codes}")
        touch(out)
        seconds = time.perf_counter() - start
        store.close()
        return seconds
    raise SystemExit(f"bench.remote: unknown mode {mode!r}")


class _RawPut:
    """Each call puts the entry's tensors as new hard-pinned objects, removing the previous call's first (untimed
    would be fairer by a few ms; the store must stay small)."""

    def __init__(self, raw: Any, config: Any, entry: dict[str, torch.Tensor], prefix: str) -> None:
        self.raw, self.config, self.entry, self.prefix = raw, config, entry, prefix
        self.calls = itertools.count()

    def __call__(self) -> None:
        self.raw.remove_by_regex(f"^{self.prefix}-")
        batch = f"{self.prefix}-{next(self.calls)}"
        names = list(self.entry)
        codes = self.raw.batch_put_from([f"{batch}/{n}" for n in names], [self.entry[n].data_ptr() for n in names],
                                        [self.entry[n].nbytes for n in names], self.config)  # fmt: skip
        if any(codes):
            raise SystemExit(f"bench.remote: raw batch_put_from answered {codes}")


def _fault_in(raw: Any, config: Any, segment: int) -> None:
    """Fill the holder's segment once and empty it: a long-running holder's memory is faulted in, and a put into
    fresh holder memory pays the kernel's first touch (0.25 GB/s here) whoever puts it."""
    block = torch.zeros(64 << 20, dtype=torch.uint8)
    for i in range(segment // block.numel()):
        if raw.put_from(f"fault-in/{i}", block.data_ptr(), block.numel(), config) != 0:
            break
    raw.remove_by_regex("^fault-in/")


def bench_remote(sizes: list[int], scratch: Path, repeat: int, progress: Callable[[str], None]) -> list[Row]:
    """The rows, or none (said on stderr) where Mooncake is not installed or does not import."""
    from tiercache.testing.servers import MOONCAKE_INSTALL, MooncakeServer, mooncake_binary  # noqa: PLC0415
    from tiercache.tiers.remote.store import install_hint  # noqa: PLC0415

    if not sizes:
        return []
    hint = install_hint()
    if hint is not None or mooncake_binary("mooncake_master") is None:
        print(f"bench.remote: skipped, Mooncake does not run here: {hint or MOONCAKE_INSTALL}", file=sys.stderr)
        return []
    from mooncake.store import ReplicateConfig  # noqa: PLC0415

    server = MooncakeServer(scratch / "mooncake", segment=8 * max(sizes) + (256 << 20))
    progress("remote: starting a Mooncake master and holder on loopback")
    server.start()
    where = {"master": server.address, "metadata_server": server.metadata, "admin": server.admin}
    rows: list[Row] = []
    try:
        raw = _client(where)
        config = ReplicateConfig()
        config.with_hard_pin = True
        _fault_in(raw, config, server.segment)
        for size in sizes:
            label = tiercache.format_size(size)
            entry = make_entry(size)
            prefix = f"bench-{size}"
            progress(f"remote: put {label}")
            with tiercache.TierCache(
                root=scratch / f"writer-{size}", policy=_policy(where, prefix, size), device="cpu"
            ) as cache:
                keys = (f"put-{i}" for i in itertools.count())  # new keys: a put's cost, not a replacement's
                raw_put = _RawPut(raw, config, entry, f"raw-{size}")
                ours, theirs = side_by_side(lambda: cache.put(next(keys), entry), raw_put, repeat)  # noqa: B023
                for key in list(cache.keys()):
                    del cache[key]
                cache.put(KEY, entry)
            rows.append(row(size, None, ours, "raw Mooncake batch_put_from, one object per tensor", theirs,
                            suite="remote", detail="put into the store"))  # fmt: skip
            raw.remove_by_regex(f"^raw-{size}-")
            names = list(entry)
            raw_codes = raw.batch_put_from([f"raw-{size}/{n}" for n in names], [entry[n].data_ptr() for n in names],
                                           [entry[n].nbytes for n in names], config)  # fmt: skip
            assert not any(raw_codes), raw_codes
            progress(f"remote: a fresh process's get of {label}")
            payload = torch.cat([as_bytes(t) for t in entry.values()])
            sender = Sender(payload.numpy().data.cast("B"))
            spots = json.dumps(where)
            sizes_of = json.dumps({f"raw-{size}/{n}": entry[n].nbytes for n in names})
            times: dict[str, list[float]] = {"tiercache": [], "mooncake": [], "tcp": []}
            try:
                for i in range(repeat):
                    reader = str(scratch / f"reader-{size}-{i}")
                    times["tiercache"].append(child_seconds("bench.remote", "tiercache", spots, prefix, str(size),
                                                            reader))  # fmt: skip
                    times["mooncake"].append(child_seconds("bench.remote", "mooncake", spots, sizes_of))
                    times["tcp"].append(child_seconds("bench.object", "tcp", str(sender.port), str(payload.numel())))
            finally:
                sender.close()
            detail = "handoff: a fresh process's open + get"
            rows.append(row(size, None, times["tiercache"], "raw Mooncake batch_get_into in a fresh process",
                            times["mooncake"], 0.8, detail=detail, suite="remote"))  # fmt: skip
            rows.append(row(size, None, times["tiercache"], "a raw loopback TCP stream, fresh process", times["tcp"],
                            detail=detail, suite="remote"))  # fmt: skip
            if size == sizes[0]:
                progress(f"remote: {CROWD} more entries in the store, and a fresh process's get of {label} among them")
                crowd = _policy(where, prefix, size)
                with tiercache.TierCache(root=scratch / "crowd", policy=crowd, device="cpu") as c:
                    for i in range(CROWD):
                        c.put(f"other-{i}", {"prompt": torch.full((1024,), i, dtype=torch.float32)})
                crowded: dict[str, list[float]] = {"tiercache": [], "mooncake": []}
                for i in range(repeat):
                    reader = str(scratch / f"crowded-{i}")
                    crowded["tiercache"].append(child_seconds("bench.remote", "tiercache", spots, prefix, str(size),
                                                              reader))  # fmt: skip
                    crowded["mooncake"].append(child_seconds("bench.remote", "mooncake", spots, sizes_of))
                rows.append(row(size, None, crowded["tiercache"], "raw Mooncake batch_get_into in a fresh process",
                                crowded["mooncake"], 0.8, suite="remote",
                                detail=f"handoff from a store of {CROWD} other entries"))  # fmt: skip
            raw.remove_by_regex(f"^raw-{size}/")
        raw.close()
    finally:
        server.stop()
    return rows


if __name__ == "__main__":
    run_alone(bench_remote, _child)
