"""cache_prompts: a pipeline's encode_prompt (and, for I2V, encode_image) answered from the cache for inputs seen
before, so the encoders do not run. Outputs are bitwise those of the uncached pipeline; inputs or settings that
differ never share an entry; precomputed embeddings bypass the cache; remove() gives the pipeline its methods back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import tiny_diffusers as td
import torch
from helpers import policy
from tokenizers import normalizers
from transformers import CLIPImageProcessor

from tiercache.integrations.diffusers import cache_prompts, park, parked

# No write-down at close: these tests do not reopen the root, and close() writing memory down costs ~0.5 s a test.
POLICY = policy(placement={"flush_on_close": False})


@contextmanager
def counting(*modules: torch.nn.Module) -> Iterator[list[int]]:
    """How many times each module's forward ran inside the block (a torch forward hook, taken off after)."""
    calls = [0] * len(modules)
    handles = []
    for i, module in enumerate(modules):

        def hook(*_: Any, i: int = i) -> None:
            calls[i] += 1

        handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def encode(pipe: Any, prompt: Any = td.PROMPT, **kwargs: Any) -> tuple[Any, ...]:
    call = {"negative_prompt": td.NEGATIVE_PROMPT, "max_sequence_length": 32, **kwargs}
    return tuple(pipe.encode_prompt(prompt, **call))


def assert_equal_outputs(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.dtype == w.dtype and torch.equal(g, w)


def test_a_repeated_prompt_skips_the_text_encoder(make_cache: Any) -> None:
    """A second WanPipeline run with the same prompts: the text encoder does not run at all (it ran twice, prompt
    and negative prompt, the first time), one hit, and the frames are torch.equal to the uncached pipeline's."""
    want = td.run_wan(td.wan_pipeline(0))
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    with counting(pipe.text_encoder) as calls:
        assert torch.equal(td.run_wan(pipe), want)
        assert calls == [2] and (prompts.hits, prompts.misses) == (0, 1)
        assert torch.equal(td.run_wan(pipe), want)
        assert calls == [2] and (prompts.hits, prompts.misses) == (1, 1)
    assert len(cache.keys("prompts/")) == 1


def test_on_a_hit_the_text_encoder_can_stay_parked(make_cache: Any) -> None:
    """With the text encoder parked (its tensors placeholders), a request seen before still runs, gives the same
    frames, and leaves the encoder parked."""
    want = td.run_wan(td.wan_pipeline(0))
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    td.run_wan(pipe)
    park(pipe.text_encoder, cache, "text_encoder")
    assert torch.equal(td.run_wan(pipe), want)
    assert parked(pipe.text_encoder) is not None and prompts.hits == 1


PROMPT_PAIRS = {
    "one-word": ("a cat sitting on a red sofa", "a cat sitting on a blue sofa"),
    "spelled-out-word": ("a cat named zorb", "a cat named zorc"),
    "one-word-more": ("a cat sitting on a red sofa", "a cat sitting on a red sofa ."),
    "batch-order": (["a red cat", "a blue dog"], ["a blue dog", "a red cat"]),
}


@pytest.mark.parametrize("pair", list(PROMPT_PAIRS))
def test_prompts_that_differ_by_one_token_never_share_an_entry(make_cache: Any, pair: str) -> None:
    """Two prompts a token apart: two entries, two different embeddings, each torch.equal to the uncached
    encode_prompt's, and asking again for each returns its own (hits), never the other's."""
    first, second = PROMPT_PAIRS[pair]
    ref = td.wan_pipeline(0)
    want = [encode(ref, first), encode(ref, second)]
    assert not torch.equal(want[0][0], want[1][0])
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    for prompt, expected in [(first, want[0]), (second, want[1]), (second, want[1]), (first, want[0])]:
        assert_equal_outputs(encode(pipe, prompt), expected)
    assert (prompts.hits, prompts.misses) == (2, 2)
    assert len(cache.keys("prompts/")) == 2


SETTINGS: dict[str, dict[str, Any]] = {
    "max_sequence_length": {"max_sequence_length": 48},
    "no-guidance": {"do_classifier_free_guidance": False},
    "negative_prompt": {"negative_prompt": "dark blurry photo"},
    "no-negative_prompt": {"negative_prompt": None},
    "videos_per_prompt": {"num_videos_per_prompt": 2},
    "dtype": {"dtype": torch.float64},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_other_sequence_length_guidance_or_count_never_share_an_entry(make_cache: Any, setting: str) -> None:
    """The same prompt with another max_sequence_length, guidance, negative prompt, count or dtype is its own entry:
    both calls miss, and each returns exactly what the uncached encode_prompt returns for it (None included)."""
    ref = td.wan_pipeline(0)
    base, changed = encode(ref), encode(ref, **SETTINGS[setting])
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    assert_equal_outputs(encode(pipe), base)
    assert_equal_outputs(encode(pipe, **SETTINGS[setting]), changed)
    assert_equal_outputs(encode(pipe, **SETTINGS[setting]), changed)
    assert_equal_outputs(encode(pipe), base)
    assert (prompts.hits, prompts.misses) == (2, 2)


def test_guidance_off_in_the_pipeline_is_its_own_entry(make_cache: Any) -> None:
    """A run with guidance_scale=1 (no negative branch) after one with guidance: another entry, and the frames of
    both equal the uncached pipeline's."""
    ref = td.wan_pipeline(0)
    want, want_plain = td.run_wan(ref), td.run_wan(ref, guidance_scale=1.0)
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    assert torch.equal(td.run_wan(pipe), want)
    assert torch.equal(td.run_wan(pipe, guidance_scale=1.0), want_plain)
    assert (prompts.hits, prompts.misses) == (0, 2)


def test_i2v_caches_the_image_encoder_too(make_cache: Any) -> None:
    """WanImageToVideoPipeline: the second run with the same image and prompts runs neither the text nor the image
    encoder (two hits); another image runs only the image encoder; all frames equal the uncached pipeline's."""
    ref = td.wan_i2v_pipeline(0)
    other = td.random_image(7)
    want, want_other = td.run_wan_i2v(ref), td.run_wan_i2v(ref, image=other)
    pipe = td.wan_i2v_pipeline(0)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    with counting(pipe.text_encoder, pipe.image_encoder) as calls:
        assert torch.equal(td.run_wan_i2v(pipe), want)
        assert calls == [2, 1] and (prompts.hits, prompts.misses) == (0, 2)
        assert torch.equal(td.run_wan_i2v(pipe), want)
        assert calls == [2, 1] and (prompts.hits, prompts.misses) == (2, 2)
        assert torch.equal(td.run_wan_i2v(pipe, image=other), want_other)
        assert calls == [2, 2] and (prompts.hits, prompts.misses) == (3, 3)


def test_flux_skips_both_text_encoders(make_cache: Any) -> None:
    """FluxPipeline (CLIP and T5, a 3-tensor result: embeddings, pooled, text ids): a repeated prompt runs neither
    encoder and gives the same image; another prompt_2 is another entry."""
    ref = td.flux_pipeline(0)
    want, want_2 = td.run_flux(ref), td.run_flux(ref, prompt_2="a dog")
    pipe = td.flux_pipeline(0)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    with counting(pipe.text_encoder, pipe.text_encoder_2) as calls:
        assert torch.equal(td.run_flux(pipe), want)
        assert calls == [1, 1]
        assert torch.equal(td.run_flux(pipe), want)
        assert calls == [1, 1] and (prompts.hits, prompts.misses) == (1, 1)
        assert torch.equal(td.run_flux(pipe, prompt_2="a dog"), want_2)
        assert (prompts.hits, prompts.misses) == (1, 2)


def test_given_embeddings_bypass_the_cache(make_cache: Any) -> None:
    """encode_prompt(prompt_embeds=..., negative_prompt_embeds=...) goes to the pipeline's own method: no hit, no
    miss, no entry, the given tensors back; a pipeline run given embeddings gives the uncached frames."""
    ref = td.wan_pipeline(0)
    embeds, negative = encode(ref)
    call = {k: v for k, v in td.WAN_CALL.items() if k != "max_sequence_length"}
    want = ref(
        prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0), **call
    )
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    with counting(pipe.text_encoder) as calls:
        got = pipe.encode_prompt(None, prompt_embeds=embeds, negative_prompt_embeds=negative)
        assert got[0] is embeds and got[1] is negative
        out = pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0), **call
        )
        assert calls == [0]
    assert torch.equal(out.frames, want.frames)
    assert (prompts.hits, prompts.misses) == (0, 0) and cache.keys("prompts/") == []


def test_remove_gives_the_pipeline_its_methods_back(make_cache: Any) -> None:
    """remove(): the pipeline's __dict__ has the keys it had, encode_prompt and encode_image are the class's methods
    again (the encoders run on every call), and an instance attribute the pipeline had is the same object again."""
    pipe = td.wan_i2v_pipeline(0)
    td.run_wan_i2v(pipe)  # a run sets the pipeline's own state attributes (_interrupt, ...): in place before
    before = sorted(pipe.__dict__)
    cache = make_cache(POLICY)
    prompts = cache_prompts(pipe, cache)
    td.run_wan_i2v(pipe)
    prompts.remove()
    assert sorted(pipe.__dict__) == before
    assert pipe.encode_prompt.__func__ is td.WanImageToVideoPipeline.encode_prompt
    assert pipe.encode_image.__func__ is td.WanImageToVideoPipeline.encode_image
    with counting(pipe.text_encoder, pipe.image_encoder) as calls:
        td.run_wan_i2v(pipe)
        assert calls == [2, 1]
    assert (prompts.hits, prompts.misses) == (0, 2)

    other = td.wan_pipeline(0)
    own = other.encode_prompt  # a bound method kept on the instance (as a user's wrapper would be)
    other.encode_prompt = own
    handle = cache_prompts(other, cache)
    assert other.encode_prompt is not own
    handle.remove()
    assert other.__dict__["encode_prompt"] is own


def test_a_hit_is_the_callers_to_modify(make_cache: Any) -> None:
    """Embeddings a hit returned may be changed in place by the caller (prompt weighting does) without changing what
    later hits return."""
    ref = td.wan_pipeline(0)
    want = encode(ref)
    pipe = td.wan_pipeline(0)
    cache = make_cache(POLICY)
    cache_prompts(pipe, cache)
    encode(pipe)
    hit = encode(pipe)
    assert_equal_outputs(hit, want)
    hit[0].mul_(2)
    assert_equal_outputs(encode(pipe), want)


def _processor(pipe: Any) -> None:
    pipe.image_processor = CLIPImageProcessor(crop_size=32, size=32, image_mean=[0.1, 0.2, 0.3], image_std=[0.5] * 3)


def _tokenizer(pipe: Any) -> None:
    pipe.tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()  # the same vocabulary, no lowercasing


@pytest.mark.parametrize("change", ["image_processor", "tokenizer_normalizer"])
def test_other_preprocessing_never_shares_an_entry(make_cache: Any, change: str) -> None:
    """Two I2V pipelines with the same encoder weights whose image processor (or tokenizer normalizer) differs
    encode the same input differently; on one cache each still gets its own embeddings."""
    first, second = td.wan_i2v_pipeline(0), td.wan_i2v_pipeline(0)
    (_processor if change == "image_processor" else _tokenizer)(second)
    image, prompt = td.random_image(0), "A Red Cat"
    with torch.no_grad():
        if change == "image_processor":
            want = [first.encode_image(image), second.encode_image(image)]
        else:
            want = [first.encode_prompt(prompt)[0], second.encode_prompt(prompt)[0]]
    assert not torch.equal(want[0], want[1])
    cache = make_cache(POLICY)
    cache_prompts(first, cache)
    cache_prompts(second, cache)
    for pipe, expected in zip((first, second), want, strict=True):
        with torch.no_grad():
            got = pipe.encode_image(image) if change == "image_processor" else pipe.encode_prompt(prompt)[0]
        assert torch.equal(got, expected)
