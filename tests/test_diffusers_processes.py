"""Two processes on one root: what one process's Wan I2V run put there with write_through (context K/V, prompt and
image embeddings, offloaded block weights) a second process finds from its first forward, and its frames are
bitwise those of an uncached run. The second process is started once for the module (importing diffusers costs
seconds); each test checks one part of its report."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_diffusers as td
import torch
from helpers import CountingCache, MiB, policy

import tiercache
from tiercache.integrations.diffusers import cache_context_kv, cache_prompts, offload_blocks

POLICY = policy(tiers={"host": {"capacity": 8 * MiB}, "nvme": {"capacity": 64 * MiB}})


def bare_transformer() -> torch.nn.Module:
    return td.wan_transformer(0, layers=3)


@torch.no_grad()
def bare_forward(model: torch.nn.Module) -> torch.Tensor:
    return model(**td.wan_inputs(model, 0))[0]


def second_process(root: str, out: str) -> None:
    """The second process: the same seeded pipeline and transformer on the same root; prints its report as JSON."""
    with CountingCache(root=root, policy=POLICY) as cache:
        pipe = td.wan_i2v_pipeline(0)
        prompts = cache_prompts(pipe, cache)
        kv = cache_context_kv(pipe.transformer, cache)
        first: list[tuple[int, int]] = []
        hook = pipe.transformer.register_forward_hook(lambda *_: first.append((kv.hits, kv.misses)))
        calls = [0, 0]
        encoders = [pipe.text_encoder, pipe.image_encoder]
        hooks = [
            m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, m in enumerate(encoders)
        ]
        frames = td.run_wan_i2v(pipe)
        for handle in [hook, *hooks]:
            handle.remove()
        model = bare_transformer()
        blocks = offload_blocks(model, cache, write_through=True)
        block_puts = [k for k in cache.puts if k in blocks.keys]
        torch.save({"frames": frames, "blocks": bare_forward(model)}, out)
        blocks.remove()
        report = {
            "kv_first_forward": first[0],
            "kv": [kv.hits, kv.misses],
            "prompts": [prompts.hits, prompts.misses],
            "encoder_calls": calls,
            "kv_puts": len([k for k in cache.puts if k.startswith("wan-kv/")]),
            "block_puts": block_puts,
            "block_keys": blocks.keys,
        }
    print(json.dumps(report))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The first process (this one) runs the cached pipeline and keeps its blocks offloaded, its cache open, while
    the second runs; yields both sides' results."""
    tmp = tmp_path_factory.mktemp("two-processes")
    root, out = tmp / "root", tmp / "second.pt"
    want = td.run_wan_i2v(td.wan_i2v_pipeline(0))
    model = bare_transformer()
    want_blocks = bare_forward(model)
    with tiercache.TierCache(root=root, policy=POLICY) as cache:
        pipe = td.wan_i2v_pipeline(0)
        prompts = cache_prompts(pipe, cache, write_through=True)
        kv = cache_context_kv(pipe.transformer, cache, write_through=True)
        first = td.run_wan_i2v(pipe)
        blocks = offload_blocks(model, cache, write_through=True)
        code = f"""
            import sys
            sys.path[:0] = [{str(Path(__file__).parent)!r}]
            import test_diffusers_processes
            test_diffusers_processes.second_process({str(root)!r}, {str(out)!r})
        """
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-4000:]
        blocks.remove()
        first_side = {"frames": first, "kv": (kv.hits, kv.misses), "prompts": (prompts.hits, prompts.misses)}
    yield {
        "want": want,
        "want_blocks": want_blocks,
        "first": first_side,
        "report": json.loads(done.stdout.strip().splitlines()[-1]),
        "second": torch.load(out),
    }


def test_the_first_process_run_is_bitwise_the_uncached_one(two_processes: dict[str, Any]) -> None:
    """The writing side itself: torch.equal frames, every context and prompt computed once (nothing there yet)."""
    first = two_processes["first"]
    assert torch.equal(first["frames"], two_processes["want"])
    assert first["kv"] == (5, 3) and first["prompts"] == (0, 2)


def test_a_second_process_finds_the_context_kv_from_its_first_forward(two_processes: dict[str, Any]) -> None:
    """The second process's first transformer forward already hits (text and image K/V, 2 hits and no miss), it
    never computes a context (no K/V put), and its frames are torch.equal to the uncached run's."""
    report = two_processes["report"]
    assert report["kv_first_forward"] == [2, 0]
    assert report["kv"] == [8, 0] and report["kv_puts"] == 0
    assert torch.equal(two_processes["second"]["frames"], two_processes["want"])


def test_a_second_process_finds_the_prompt_and_image_embeddings(two_processes: dict[str, Any]) -> None:
    """encode_prompt and encode_image are both served from the root: neither the text nor the image encoder runs."""
    report = two_processes["report"]
    assert report["prompts"] == [2, 0] and report["encoder_calls"] == [0, 0]


def test_a_second_process_reuses_the_offloaded_blocks(two_processes: dict[str, Any]) -> None:
    """Offloading a model with the same weights in the second process puts nothing (the first's block entries are
    found), and its forwards are torch.equal to the model's own."""
    report = two_processes["report"]
    assert len(report["block_keys"]) == 3 and report["block_puts"] == []
    assert torch.equal(two_processes["second"]["blocks"], two_processes["want_blocks"])
