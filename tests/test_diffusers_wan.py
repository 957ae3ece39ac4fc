"""cache_context_kv: Wan's cross-attention K/V computed once per context (prompt, image) and served from the cache at
every later step, guidance branch and request. Outputs are bitwise those of the uncached model; a changed model or
another context never meets an entry made from another; remove() puts the stock processors back."""

from __future__ import annotations

from typing import Any

import pytest
import tiny_diffusers as td
import torch
from helpers import policy

from tiercache import EntryValueError
from tiercache.integrations.diffusers import cache_context_kv, offload_blocks

# No write-down at close: these tests do not reopen the root, and close() writing memory down costs ~0.5 s a test.
POLICY = policy(placement={"flush_on_close": False})


@torch.no_grad()
def forward(model: torch.nn.Module, **kwargs: Any) -> torch.Tensor:
    return model(**kwargs)[0]


def kv_keys(cache: Any, kind: str) -> list[str]:
    """The K/V entries of one kind ("text" or "image"), as docs/diffusers.md lays out their keys."""
    return [k for k in cache.keys("wan-kv/") if f"/{kind}/" in k]


def test_a_wan_pipeline_run_is_bitwise_the_uncached_one_and_reuses_kv_across_steps(make_cache: Any) -> None:
    """A 2-step WanPipeline run with guidance: float32 frames torch.equal to the uncached pipeline's; the first
    forward of each branch computes its text K/V (2 misses: prompt and negative prompt), the second step finds
    them (2 hits); one text entry per context."""
    want = td.run_wan(td.wan_pipeline(0))
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    kv = cache_context_kv(pipe.transformer, cache)
    out = td.run_wan(pipe)
    assert out.dtype == torch.float32 and torch.equal(out, want)
    assert (kv.hits, kv.misses) == (2, 2)
    assert len(kv_keys(cache, "text")) == 2 and kv_keys(cache, "image") == []


def test_a_second_request_with_the_same_prompt_hits_and_another_prompt_misses(make_cache: Any) -> None:
    """The same prompt again: every forward is served (4 hits, no miss), same frames. Another prompt (same negative
    prompt): one miss, for its own text, and frames equal to the uncached run of that prompt."""
    ref = td.wan_pipeline(0)
    want, want_other = td.run_wan(ref), td.run_wan(ref, "a dog running in the snow")
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    kv = cache_context_kv(pipe.transformer, cache)
    td.run_wan(pipe)
    assert (kv.hits, kv.misses) == (2, 2)
    assert torch.equal(td.run_wan(pipe), want)
    assert (kv.hits, kv.misses) == (6, 2)
    assert torch.equal(td.run_wan(pipe, "a dog running in the snow"), want_other)
    assert (kv.hits, kv.misses) == (9, 3)
    assert len(kv_keys(cache, "text")) == 3


def test_an_i2v_run_is_bitwise_the_uncached_one_and_both_branches_share_the_image_kv(make_cache: Any) -> None:
    """A 2-step WanImageToVideoPipeline run with guidance: torch.equal frames. Text: 2 misses then 2 hits, as in
    T2V; image: one context for both branches, so 1 miss then 3 hits, one image entry."""
    want = td.run_wan_i2v(td.wan_i2v_pipeline(0))
    pipe = td.wan_i2v_pipeline(0)
    cache = make_cache(POLICY)
    kv = cache_context_kv(pipe.transformer, cache)
    out = td.run_wan_i2v(pipe)
    assert out.dtype == torch.float32 and torch.equal(out, want)
    assert (kv.hits, kv.misses) == (2 + 3, 2 + 1)
    assert len(kv_keys(cache, "text")) == 2 and len(kv_keys(cache, "image")) == 1
    assert torch.equal(td.run_wan_i2v(pipe), want)
    assert (kv.hits, kv.misses) == (5 + 8, 3)


def test_another_image_with_the_same_prompt_misses_only_its_image(make_cache: Any) -> None:
    """I2V with a second image and the same prompts: the text K/V are found, the new image's are computed, and the
    frames are those of the uncached run on that image."""
    ref = td.wan_i2v_pipeline(0)
    other = td.random_image(7)
    want = td.run_wan_i2v(ref, image=other)
    pipe = td.wan_i2v_pipeline(0)
    cache = make_cache(POLICY)
    kv = cache_context_kv(pipe.transformer, cache)
    td.run_wan_i2v(pipe)
    hits, misses = kv.hits, kv.misses
    assert torch.equal(td.run_wan_i2v(pipe, image=other), want)
    assert (kv.hits - hits, kv.misses - misses) == (4 + 3, 1)
    assert len(kv_keys(cache, "image")) == 2


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_bare_forwards_are_bitwise_and_keyed_by_content(make_cache: Any, i2v: bool) -> None:
    """Direct transformer forwards (grad mode on, as a user's own loop may run them): equal outputs; a clone of the
    context (another tensor, the same bytes) hits; a context differing in one element misses and is right."""
    model = td.wan_transformer(0, i2v=i2v)
    base = td.wan_inputs(model, 0)
    changed = dict(base, encoder_hidden_states=base["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][0, 0, 0] += 1
    want = model(**base)[0]  # in grad mode too: CPU attention may pick another kernel there
    want_changed = forward(model, **changed)
    cache = make_cache(POLICY)
    kv = cache_context_kv(model, cache)
    contexts = 2 if i2v else 1
    assert torch.equal(model(**base)[0], want)
    assert (kv.hits, kv.misses) == (0, contexts)
    cloned = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    assert torch.equal(model(**cloned)[0], want)
    assert (kv.hits, kv.misses) == (contexts, contexts)
    assert torch.equal(forward(model, **changed), want_changed)
    assert (kv.hits, kv.misses) == (contexts + (1 if i2v else 0), contexts + 1)


def test_a_changed_model_never_meets_the_kv_of_its_old_weights(make_cache: Any) -> None:
    """After load_state_dict of other weights, the same context misses (the key carries the weights' fingerprint)
    and the output is the other model's; a second model with other weights never shares an entry either."""
    model, donor = td.wan_transformer(0), td.wan_transformer(1)
    inputs = td.wan_inputs(model, 0)
    want, want_donor = forward(model, **inputs), forward(donor, **inputs)
    cache = make_cache(POLICY)
    kv = cache_context_kv(model, cache)
    assert torch.equal(forward(model, **inputs), want)
    model.load_state_dict(donor.state_dict())
    assert torch.equal(forward(model, **inputs), want_donor)
    assert (kv.hits, kv.misses) == (0, 2)
    model.load_state_dict(td.wan_transformer(0).state_dict())
    assert torch.equal(forward(model, **inputs), want)
    assert (kv.hits, kv.misses) == (1, 2)
    other = td.wan_transformer(1)
    other_kv = cache_context_kv(other, cache)
    assert torch.equal(forward(other, **inputs), want_donor)
    assert other_kv.hits == 1  # the donor's weights were seen (through `model`): the same fingerprint, rightly shared


def test_remove_puts_back_the_same_processors_and_takes_the_hook_off(make_cache: Any) -> None:
    """remove(): every attn2 has its original processor object again, no module keeps a `_diffusers_hook` or an
    instance `forward`, the outputs are unchanged, and the entries stay in the cache (a later handle hits)."""
    model = td.wan_transformer(0, i2v=True)
    inputs = td.wan_inputs(model, 0)
    want = forward(model, **inputs)
    originals = [block.attn2.processor for block in model.blocks]
    self_attention = [block.attn1.processor for block in model.blocks]
    dicts = {n: sorted(m.__dict__) for n, m in model.named_modules()}
    cache = make_cache(POLICY)
    kv = cache_context_kv(model, cache)
    assert all(block.attn2.processor is not p for block, p in zip(model.blocks, originals, strict=True))
    forward(model, **inputs)
    kv.remove()
    assert all(block.attn2.processor is p for block, p in zip(model.blocks, originals, strict=True))
    assert all(block.attn1.processor is p for block, p in zip(model.blocks, self_attention, strict=True))
    assert {n: sorted(m.__dict__) for n, m in model.named_modules()} == dicts
    assert torch.equal(forward(model, **inputs), want)
    assert len(cache.keys("wan-kv/")) == 2
    again = cache_context_kv(model, cache)
    assert torch.equal(forward(model, **inputs), want)
    assert (again.hits, again.misses) == (2, 0)
    again.remove()


def test_with_blocks_offloaded_too_outputs_stay_bitwise(make_cache: Any) -> None:
    """cache_context_kv on a transformer whose blocks are offloaded: a full I2V run is torch.equal to the uncached
    one, and the second run finds every context."""
    want = td.run_wan_i2v(td.wan_i2v_pipeline(0))
    pipe = td.wan_i2v_pipeline(0)
    cache = make_cache(policy(tiers={"host": {"capacity": 8 << 20}}, placement={"flush_on_close": False}))
    blocks = offload_blocks(pipe.transformer, cache, lookahead=1)
    kv = cache_context_kv(pipe.transformer, cache)
    assert torch.equal(td.run_wan_i2v(pipe), want)
    misses = kv.misses
    assert torch.equal(td.run_wan_i2v(pipe), want)
    assert kv.misses == misses
    kv.remove()
    blocks.remove()
    assert torch.equal(td.run_wan_i2v(pipe), want)


def test_a_model_that_is_not_wan_is_refused(make_cache: Any) -> None:
    """Flux (its text K/V change every step) is refused with a message saying a WanTransformer3DModel is expected;
    nothing is attached to it."""
    model = td.flux_transformer(0)
    processors = dict(model.attn_processors)
    cache = make_cache(POLICY)
    with pytest.raises(EntryValueError, match="FluxTransformer2DModel has no blocks with attn2.*WanTransformer3DModel"):
        cache_context_kv(model, cache)
    assert model.attn_processors == processors
    assert "_diffusers_hook" not in model.__dict__
