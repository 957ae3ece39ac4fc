"""Cases an independent review found: each broke an output, a model or the cache before its fix."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import tiny_diffusers as tiny
import torch
from helpers import policy

import tiercache
from tiercache.integrations.diffusers import cache_context_kv, offload_blocks, park, restore

POLICY = policy(placement={"flush_on_close": False})


@pytest.fixture
def cache(tmp_path: Path) -> tiercache.TierCache:
    with tiercache.TierCache(root=tmp_path / "root", policy=POLICY, device="cpu") as opened:
        yield opened


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def test_two_threads_never_mix_their_contexts(cache: tiercache.TierCache) -> None:
    """Each thread's forward keys and computes its own context: a later request gets its own prompt's output."""
    model = tiny.wan_transformer(0)
    a, b = tiny.wan_inputs(model, 0, text=1), tiny.wan_inputs(model, 0, text=2)
    want_a, want_b = _run(model, a), _run(model, b)
    cache_context_kv(model, cache)
    start = threading.Barrier(2)
    got: dict[str, torch.Tensor] = {}

    def run(name: str, inputs: dict) -> None:
        start.wait()
        for _ in range(5):
            got[name] = _run(model, inputs)

    threads = [threading.Thread(target=run, args=(n, i)) for n, i in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(got["a"], want_a) and torch.equal(got["b"], want_b)
    assert torch.equal(_run(model, b), want_b) and torch.equal(_run(model, a), want_a)


def test_a_block_offloaded_model_cannot_be_parked_nor_offloaded_twice(cache: tiercache.TierCache) -> None:
    model = tiny.wan_transformer(0)
    offload = offload_blocks(model, cache)
    with pytest.raises(tiercache.EntryValueError, match="remove"):
        park(model, cache, "m")
    with pytest.raises(tiercache.EntryValueError, match="already"):
        offload_blocks(model, cache)
    offload.remove()
    offload.remove()  # a second remove does nothing
    want = _run(model, tiny.wan_inputs(model))
    record = park(model, cache, "m")
    restore(model, cache, record)
    assert torch.equal(_run(model, tiny.wan_inputs(model)), want)


def test_a_parked_models_entry_is_never_evicted(tmp_path: Path) -> None:
    """The parked entry is the only copy of the weights: puts that fill every tier cannot evict it."""
    model = tiny.wan_transformer(0)
    want = _run(model, tiny.wan_inputs(model))
    small = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 200 << 10}, "nvme": {"capacity": 0}})
    with tiercache.TierCache(root=tmp_path / "root", policy=small, device="cpu") as cache:
        record = park(model, cache, "m")
        for i in range(8):
            try:
                cache.put(f"filler{i}", {"x": torch.zeros(16 << 10)})
            except tiercache.CapacityError:
                pass
        assert record.key in cache
        restore(model, cache, record)
    assert torch.equal(_run(model, tiny.wan_inputs(model)), want)


def test_a_second_context_cache_or_a_custom_processor_is_refused(cache: tiercache.TierCache) -> None:
    model = tiny.wan_transformer(0)
    handle = cache_context_kv(model, cache)
    with pytest.raises(tiercache.EntryValueError, match="WanAttnProcessor"):
        cache_context_kv(model, cache)
    handle.remove()
    with pytest.raises(tiercache.EntryValueError, match="WanTransformer3DModel"):
        cache_context_kv(tiny.flux_transformer(0), cache)


def test_i2v_with_other_than_512_text_tokens_runs_the_stock_code(cache: tiercache.TierCache) -> None:
    """The stock processor splits image from text at 512 text tokens; other lengths are not cached (the "text" part
    holds image tokens), and outputs stay the model's own."""
    model = tiny.wan_transformer(0, i2v=True)
    inputs = tiny.wan_inputs(model)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :100]
    want = _run(model, inputs)
    handle = cache_context_kv(model, cache)
    assert torch.equal(_run(model, inputs), want) and torch.equal(_run(model, inputs), want)
    assert (handle.hits, handle.misses) == (0, 0)


def test_autocast_is_part_of_the_context_key(cache: tiercache.TierCache) -> None:
    model = tiny.wan_transformer(0)
    inputs = tiny.wan_inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_bf16 = _run(model, inputs)
    want = _run(model, inputs)
    cache_context_kv(model, cache)
    assert torch.equal(_run(model, inputs), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_run(model, inputs), want_bf16)


def test_inference_mode_works_for_offload_and_context_kv(cache: tiercache.TierCache) -> None:
    model = tiny.wan_transformer(0)
    inputs = tiny.wan_inputs(model)
    want = _run(model, inputs)
    kv = cache_context_kv(model, cache)
    offload = offload_blocks(model, cache)
    with torch.inference_mode():
        assert torch.equal(model(**inputs)[0], want) and torch.equal(model(**inputs)[0], want)
    offload.remove()
    kv.remove()
    assert torch.equal(_run(model, inputs), want)


def test_a_model_cast_while_offloaded_is_refused_with_the_fix(cache: tiercache.TierCache) -> None:
    model = tiny.wan_transformer(0)
    offload = offload_blocks(model, cache)
    model.to(torch.float64)
    with pytest.raises(tiercache.EntryValueError, match="moved or cast"):
        inputs = tiny.wan_inputs(model).items()
        _run(model, {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs})
    model.to(torch.float32)
    offload.remove()


def test_a_tokenizer_changed_in_place_gets_new_embeddings_and_a_second_prompt_cache_is_refused(
    cache: tiercache.TierCache,
) -> None:
    from tiercache.integrations.diffusers import cache_prompts

    pipe, reference = tiny.wan_pipeline(0), tiny.wan_pipeline(0)
    handle = cache_prompts(pipe, cache)
    with pytest.raises(tiercache.EntryValueError, match="cached already"):
        cache_prompts(pipe, cache)
    with torch.no_grad():
        pipe.encode_prompt("a red cat", do_classifier_free_guidance=False, max_sequence_length=16)
        pipe.tokenizer.padding_side = reference.tokenizer.padding_side = "left"
        got = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False, max_sequence_length=16)[0]
        want = reference.encode_prompt("a red cat", do_classifier_free_guidance=False, max_sequence_length=16)[0]
    assert torch.equal(got, want) and handle.misses == 2
    handle.remove()
