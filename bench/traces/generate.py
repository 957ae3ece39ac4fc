"""Write the two shipped traces (deterministic): python -m bench.traces.generate

flux-wan.jsonl: a Flux.1 -> Wan 2.1 pipeline over 14 runs of 10 prompts, 4 of them repeated. Per prompt,
Flux puts its text K/V (359 MB) and reads it back at each of 28 denoising steps (0.24 s a step), then puts
its image K/V per layer (57 layers, 2.87 GB in all). Wan puts its CLIP and text context K/V (211 MB, 94 MB)
and at each of 20 steps (0.46 s a block) reads both contexts and streams the 57 Flux image K/V layers in order.

serving.jsonl: a many-prompt serving mix. 60 prompts with Zipf(1.1) popularity, 600 requests 0.5 s apart.
Each request reads its prompt's text K/V (one of the three context sizes, recomputed and re-put on a miss)
and its frame-0 K/V (1.28 GB, likewise), then puts a per-request 64 MB latent read back once two steps later.
Sizes are the bf16 workloads of bench/workloads.py, unscaled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLUX_TEXT = 359_000_000
FLUX_IMG_LAYER = 2_870_000_000 // 57
WAN_CLIP = 211_000_000
WAN_TEXT = 94_000_000
FRAME0 = 1_280_000_000
LATENT = 64_000_000


def flux_wan(prompts: list[int]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    t = 0.0

    def emit(op: str, key: str, size: int) -> None:
        out.append({"t": round(t, 3), "op": op, "key": key, "size": size})

    for p in prompts:
        emit("get", f"flux/p{p}/text-kv", FLUX_TEXT)  # a repeated prompt finds it cached
        for _ in range(28):
            t += 0.24
            emit("get", f"flux/p{p}/text-kv", FLUX_TEXT)
        for layer in range(57):
            emit("put", f"flux/p{p}/img-kv/{layer}", FLUX_IMG_LAYER)
        emit("put", f"wan/p{p}/clip-kv", WAN_CLIP)
        emit("put", f"wan/p{p}/text-kv", WAN_TEXT)
        for _ in range(20):
            t += 0.46
            emit("get", f"wan/p{p}/clip-kv", WAN_CLIP)
            emit("get", f"wan/p{p}/text-kv", WAN_TEXT)
            for layer in range(57):
                emit("get", f"flux/p{p}/img-kv/{layer}", FLUX_IMG_LAYER)
    return out


def serving(requests: int = 600, prompts: int = 60, seed: int = 7) -> list[dict[str, object]]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(prompts)]
    sizes = [rng.choice([WAN_TEXT, WAN_CLIP, FLUX_TEXT]) for _ in range(prompts)]
    out: list[dict[str, object]] = []
    pending: list[tuple[int, str]] = []
    for r in range(requests):
        t = round(r * 0.5, 3)
        p = rng.choices(range(prompts), weights)[0]
        out.append({"t": t, "op": "get", "key": f"prompt/{p}/text-kv", "size": sizes[p]})
        out.append({"t": t, "op": "get", "key": f"prompt/{p}/frame0-kv", "size": FRAME0})
        out.append({"t": t, "op": "put", "key": f"request/{r}/latent", "size": LATENT})
        pending.append((r + 2, f"request/{r}/latent"))
        for due, key in [x for x in pending if x[0] == r]:
            out.append({"t": t, "op": "get", "key": key, "size": LATENT})
            out.append({"t": t, "op": "delete", "key": key})
            pending.remove((due, key))
    return out


def write(name: str, requests: list[dict[str, object]]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in requests))


if __name__ == "__main__":
    write("flux-wan.jsonl", flux_wan([0, 1, 2, 3, 4, 0, 5, 6, 2, 7, 8, 1, 9, 3]))
    write("serving.jsonl", serving())
