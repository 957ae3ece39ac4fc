"""The context K/V and prompt caches are optimisations: a cache that cannot keep or read their entries leaves the
pipeline's results exactly as without it, and says so in the log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tiny_diffusers as tiny
import torch
from helpers import KiB, policy

import tiercache
from tiercache.integrations.diffusers import cache_context_kv, cache_prompts


def _no_room() -> tiercache.Policy:
    return policy(tiers={"hbm": {"capacity": KiB}, "host": {"capacity": 0}, "nvme": {"capacity": 0}})


def test_context_kv_that_no_tier_can_take_leaves_outputs_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny.wan_transformer(i2v=True)
    inputs = tiny.wan_inputs(model)
    with torch.no_grad():
        reference = model(**inputs)[0]
    with tiercache.TierCache(root=tmp_path / "root", policy=_no_room(), device="cpu") as cache:
        handle = cache_context_kv(model, cache)
        with caplog.at_level(logging.WARNING), torch.no_grad():
            first, second = model(**inputs)[0], model(**inputs)[0]
        handle.remove()
        assert torch.equal(first, reference) and torch.equal(second, reference)
        assert (handle.hits, handle.misses) == (0, 4)  # text and image, computed both times
        assert "not kept" in caplog.text and cache.keys() == []


def test_prompt_embeddings_that_no_tier_can_take_leave_outputs_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = tiny.wan_pipeline()
    reference = tiny.run_wan(pipe)
    with tiercache.TierCache(root=tmp_path / "root", policy=_no_room(), device="cpu") as cache:
        handle = cache_prompts(pipe, cache)
        with caplog.at_level(logging.WARNING):
            out = tiny.run_wan(pipe)
        handle.remove()
    assert torch.equal(out, reference)
    assert handle.misses == 1 and "not kept" in caplog.text
