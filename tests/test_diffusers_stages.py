"""park / restore and PipelineStages: whole components in and out of the cache, keyed by their weights' content.
Parking frees the module's tensors, restoring brings bit-exact weights back; a changed model never restores stale
weights; a pipeline driven stage by stage, or switched automatically, gives bitwise its own output."""

from __future__ import annotations

from typing import Any

import pytest
import tiny_diffusers as td
import torch
from helpers import CountingCache, MiB, policy

import tiercache
from tiercache import EntryValueError
from tiercache.integrations.diffusers import (
    PipelineStages,
    cache_context_kv,
    cache_prompts,
    fingerprint,
    park,
    parked,
    restore,
)

# No write-down at close: these tests do not reopen the root, and close() writing memory down costs ~0.5 s a test.
NO_FLUSH = {"flush_on_close": False}
POLICY = policy(placement=NO_FLUSH)
HBM_ONLY = policy(tiers={"hbm": {"capacity": 8 * MiB}}, placement=NO_FLUSH)


@pytest.fixture
def cache(tmp_path: Any) -> Any:
    opened = CountingCache(root=tmp_path / "root", policy=POLICY)
    yield opened
    opened.close()


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_weights(module: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def is_parked(module: torch.nn.Module) -> bool:
    """Parked: a record, and every parameter and buffer an empty placeholder."""
    tensors = [*module.parameters(), *module.buffers()]
    empty = all(t.numel() == 0 for t in tensors)
    assert empty == (parked(module) is not None)
    return empty


@torch.no_grad()
def forward(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    return model(**td.wan_inputs(model, seed))[0]


def components(pipe: Any) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def module_dicts(pipe: Any) -> dict[str, list[str]]:
    return {f"{c}.{n}": sorted(m.__dict__) for c, comp in components(pipe).items() for n, m in comp.named_modules()}


def changed_dicts(after: dict[str, list[str]], before: dict[str, list[str]]) -> dict[str, tuple[list[str], list[str]]]:
    """Per module, the __dict__ keys added and removed (only modules where some changed)."""
    out = {}
    for name in sorted(set(after) | set(before)):
        now, then = set(after.get(name, [])), set(before.get(name, []))
        if now != then:
            out[name] = (sorted(now - then), sorted(then - now))
    return out


@pytest.mark.parametrize("to", ["host", "nvme", None])
def test_park_frees_the_tensors_and_restore_brings_back_bit_exact_weights(cache: CountingCache, to: Any) -> None:
    """park() leaves 0-element placeholders of the same dtypes (dtype and device still answer) and one entry in the
    cache, on the tier asked for; restore() gives the same bytes back, the same Parameter objects, the same outputs,
    and the module is no longer parked."""
    model = td.wan_transformer(0)
    want, out = weights(model), forward(model)
    params = [id(p) for p in model.parameters()]
    record = park(model, cache, "transformer", to=to)
    assert is_parked(model) and parked(model) == record
    assert record.key == f"transformer@{record.fingerprint}" and cache.keys() == [record.key]
    assert record.device == torch.device("cpu") and model.dtype == torch.float32
    if to is not None:
        assert cache.tier_of(record.key) == to
    assert park(model, cache, "transformer") == record  # parking a parked module is a no-op
    restored = restore(model, cache)
    assert restored.wait() is model and not is_parked(model)
    assert [id(p) for p in model.parameters()] == params
    assert_weights(model, want)
    assert torch.equal(forward(model), out)


@pytest.mark.parametrize("pol", [POLICY, HBM_ONLY], ids=["host", "hbm"])
def test_restored_weights_are_the_modules_own(tmp_path: Any, pol: Any) -> None:
    """Changing a restored module in place never changes what the cache holds under the old fingerprint: restoring
    that record into another module gives the original weights (also when the entry sits in hbm, where a read hands
    out the cache's own tensors), and other reads meanwhile do not disturb the restored weights."""
    with tiercache.TierCache(root=tmp_path / "root", policy=pol) as cache:
        model = td.wan_transformer(0)
        want = weights(model)
        record = park(model, cache, "transformer", to=None)
        restore(model, cache)
        for i in range(4):  # other reads through the same landing memory
            cache.put(f"other{i}", {"x": torch.full((4096,), float(i))})
            cache.get(f"other{i}")
        assert_weights(model, want)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2)
        other = td.wan_transformer(1)
        park(other, cache, "other")
        restore(other, cache, record)
        assert_weights(other, want)


def test_restore_without_waiting_then_wait(cache: CountingCache) -> None:
    """restore(wait=False) returns at once with a handle; wait() puts the weights in and returns the module; a second
    wait() is harmless."""
    model = td.wan_transformer(0)
    want, out = weights(model), forward(model)
    park(model, cache, "transformer")
    pending = restore(model, cache, wait=False)
    assert pending.wait() is model and pending.wait() is model
    assert not is_parked(model)
    assert_weights(model, want)
    assert torch.equal(forward(model), out)


@pytest.mark.parametrize("change", ["load_state_dict", "in_place"])
def test_a_changed_model_parks_under_a_new_key_and_never_restores_stale_weights(
    cache: CountingCache, change: str
) -> None:
    """After restore, weights changed by load_state_dict of another model's weights (or an in-place update) park
    under another key; restoring gives the new weights and the new outputs, never the old ones."""
    model, donor = td.wan_transformer(0), td.wan_transformer(1)
    first = park(model, cache, "transformer")
    restore(model, cache)
    if change == "load_state_dict":
        model.load_state_dict(donor.state_dict())
        want, out = weights(donor), forward(donor)
    else:
        with torch.no_grad():
            model.blocks[0].ffn.net[2].weight.add_(1)
        want, out = weights(model), forward(model)
    second = park(model, cache, "transformer")
    assert second.key != first.key and second.fingerprint != first.fingerprint
    assert sorted(cache.keys()) == sorted([first.key, second.key])
    restore(model, cache)
    assert_weights(model, want)
    assert torch.equal(forward(model), out)


def test_two_same_class_models_under_one_name_do_not_collide(cache: CountingCache) -> None:
    """Two WanTransformer3DModels with other weights parked under the same name get two keys; each restores its
    own weights."""
    a, b = td.wan_transformer(0), td.wan_transformer(1)
    want_a, want_b = weights(a), weights(b)
    ra, rb = park(a, cache, "transformer"), park(b, cache, "transformer")
    assert ra.key != rb.key and len(cache) == 2
    restore(b, cache)
    restore(a, cache)
    assert_weights(a, want_a)
    assert_weights(b, want_b)


def test_parking_an_unchanged_model_again_copies_nothing(cache: CountingCache) -> None:
    """Park, restore, park again: the same key, no second put, the same number of entries; a second model with the
    same weights parks without a put too."""
    model = td.wan_transformer(0)
    first = park(model, cache, "transformer")
    assert cache.puts == [first.key]
    restore(model, cache)
    again = park(model, cache, "transformer")
    assert again.key == first.key and cache.puts == [first.key] and len(cache) == 1
    twin = td.wan_transformer(0)
    assert park(twin, cache, "transformer").key == first.key and cache.puts == [first.key]
    restore(twin, cache)
    restore(model, cache)
    assert torch.equal(forward(model), forward(twin))


def test_restoring_what_is_not_parked_says_so(cache: CountingCache) -> None:
    """restore() of a module that was never parked (or is restored already) is refused with a message saying so;
    the module keeps its weights."""
    model = td.wan_transformer(0)
    want = weights(model)
    with pytest.raises(EntryValueError, match="restore: this WanTransformer3DModel is not parked"):
        restore(model, cache)
    park(model, cache, "transformer")
    restore(model, cache)
    with pytest.raises(EntryValueError, match="is not parked"):
        restore(model, cache)
    assert_weights(model, want)


def test_restoring_another_models_record_is_refused(cache: CountingCache) -> None:
    """A record parked from a model of another shape is refused by restore(), naming the entry."""
    wan, flux = td.wan_transformer(0), td.flux_transformer(0)
    record = park(flux, cache, "flux")
    park(wan, cache, "wan")
    with pytest.raises(EntryValueError, match=f"entry '{record.key}' holds other tensors than this module"):
        restore(wan, cache, record)


def test_stage_parks_the_other_components_and_restores_the_running_one(cache: CountingCache) -> None:
    """`with stage(pipe.transformer):` leaves only the transformer resident (the VAE and text encoder parked under
    `<pipeline>/<component>`); the next stage swaps them; the transformer's weights are bit-exact."""
    pipe = td.wan_pipeline(0)
    want = {name: weights(module) for name, module in components(pipe).items()}
    stage = PipelineStages(pipe, cache)
    with stage(pipe.transformer):
        assert not is_parked(pipe.transformer)
        assert is_parked(pipe.vae) and is_parked(pipe.text_encoder)
        assert sorted(k.split("@")[0] for k in cache.keys()) == ["WanPipeline/text_encoder", "WanPipeline/vae"]
    with stage(pipe.text_encoder, pipe.vae):
        assert is_parked(pipe.transformer)
        assert not is_parked(pipe.text_encoder) and not is_parked(pipe.vae)
    with stage(pipe.transformer):
        assert_weights(pipe.transformer, want["transformer"])
    stage.remove()
    for name, module in components(pipe).items():
        assert not is_parked(module)
        assert_weights(module, want[name])


def test_a_pipeline_driven_stage_by_stage_gives_bitwise_its_own_output(cache: CountingCache) -> None:
    """Text encoder, then transformer (prefetched meanwhile), then VAE, each alone resident: the frames are
    torch.equal to the pipeline's own run."""
    want = td.run_wan(td.wan_pipeline(0))
    pipe = td.wan_pipeline(0)
    call = {k: v for k, v in td.WAN_CALL.items() if k not in ("max_sequence_length", "output_type")}
    stage = PipelineStages(pipe, cache)
    with stage(pipe.text_encoder), torch.no_grad():  # as inside pipe(...): grad mode picks other CPU kernels
        embeds, negative = pipe.encode_prompt(td.PROMPT, td.NEGATIVE_PROMPT, max_sequence_length=32)
        stage.prefetch(pipe.transformer)
    with stage(pipe.transformer):
        latents = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **call,
        ).frames
    with stage(pipe.vae), torch.no_grad():
        assert is_parked(pipe.transformer) and is_parked(pipe.text_encoder)
        vae = pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape)
        video = vae.decode(latents.to(vae.dtype) / std + mean, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="pt")
    assert frames.dtype == torch.float32 and torch.equal(frames, want)


def test_a_module_that_is_not_a_component_is_refused_before_anything_moves(cache: CountingCache) -> None:
    """A stage or prefetch naming a module of another pipeline raises with a message saying it is not a component,
    and parks nothing."""
    pipe, other = td.wan_pipeline(0), td.wan_pipeline(0)
    stage = PipelineStages(pipe, cache)
    with pytest.raises(EntryValueError, match="this WanTransformer3DModel is not a component of the pipeline"):
        with stage(other.transformer):
            pass
    with pytest.raises(EntryValueError, match="not a component"):
        with stage(pipe.vae, other.text_encoder):
            pass
    with pytest.raises(EntryValueError, match="not a component"):
        stage.prefetch(other.vae)
    assert len(cache) == 0 and not any(is_parked(m) for m in components(pipe).values())


RUNS: dict[str, tuple[Any, Any]] = {
    "wan": (td.wan_pipeline, td.run_wan),
    "wan-i2v": (td.wan_i2v_pipeline, td.run_wan_i2v),
    "flux": (td.flux_pipeline, td.run_flux),
}


def hook_leftovers(pipe: Any) -> list[str]:
    """Modules of the pipeline's components holding a diffusers hook registry or an instance `forward`."""
    return [
        f"{c}.{n}:{key}"
        for c, comp in components(pipe).items()
        for n, m in comp.named_modules()
        for key in ("_diffusers_hook", "forward")
        if key in m.__dict__
    ]


@pytest.mark.parametrize("kind", list(RUNS))
def test_auto_switches_components_in_as_they_run(cache: CountingCache, kind: str) -> None:
    """stage.auto(): a whole pipe(...) call, twice, gives torch.equal output while each component is made resident
    as it runs (after a run only the VAE, which ran last, is resident); remove() restores every component
    bit-exactly, the same Parameter objects, and leaves no hook registry or instance forward on any module."""
    build, run = RUNS[kind]
    want = run(build(0))
    pipe = build(0)
    weights_before = {name: weights(module) for name, module in components(pipe).items()}
    params = [id(p) for m in components(pipe).values() for p in m.parameters()]
    assert hook_leftovers(pipe) == []
    stage = PipelineStages(pipe, cache).auto()
    for _ in range(2):
        assert torch.equal(run(pipe), want)
        assert not is_parked(pipe.vae)
        assert all(is_parked(m) for n, m in components(pipe).items() if n != "vae")
    stage.remove()
    assert not any(is_parked(m) for m in components(pipe).values())
    assert [id(p) for m in components(pipe).values() for p in m.parameters()] == params
    for name, module in components(pipe).items():
        assert_weights(module, weights_before[name])
    assert hook_leftovers(pipe) == []
    assert torch.equal(run(pipe), want)


@pytest.mark.parametrize("how", ["auto", "context_kv"])
def test_remove_after_a_plain_run_leaves_the_transformer_as_it_was(cache: CountingCache, how: str) -> None:
    """A pipeline that has run once without tiercache, then auto() (or cache_context_kv) and a run, then remove():
    every module's __dict__ has the keys it had before attaching (no instance `forward` added)."""
    pipe = td.wan_pipeline(0)
    want = td.run_wan(pipe)
    dicts = module_dicts(pipe)
    handle = PipelineStages(pipe, cache).auto() if how == "auto" else cache_context_kv(pipe.transformer, cache)
    assert torch.equal(td.run_wan(pipe), want)
    handle.remove()
    assert changed_dicts(module_dicts(pipe), dicts) == {}
    assert torch.equal(td.run_wan(pipe), want)


def test_auto_and_context_kv_removed_in_the_order_they_were_made_leave_the_transformer_as_it_was(
    cache: CountingCache,
) -> None:
    """README's stage 2: PipelineStages(...).auto(), then cache_context_kv(pipe.transformer); the output is the
    pipeline's own, and removing both (first the stages, then the K/V cache) leaves the transformer's __dict__ as it
    was, with no `_diffusers_hook` and no instance `forward`."""
    want = td.run_wan(td.wan_pipeline(0))
    pipe = td.wan_pipeline(0)
    before = sorted(pipe.transformer.__dict__)
    stage = PipelineStages(pipe, cache).auto()
    kv = cache_context_kv(pipe.transformer, cache)
    assert torch.equal(td.run_wan(pipe), want)
    stage.remove()
    kv.remove()
    assert sorted(set(pipe.transformer.__dict__) ^ set(before)) == []
    assert torch.equal(td.run_wan(pipe), want)


def test_fingerprint_is_of_content_never_of_identity() -> None:
    """Two models built with the same weights share a fingerprint; other weights, or one changed element, do not;
    load_state_dict, in-place updates and a write through `.data` (which bumps no version counter, as fuse_lora's)
    are seen at once."""
    a, b, c = td.wan_transformer(0), td.wan_transformer(0), td.wan_transformer(1)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    b.load_state_dict(c.state_dict())
    assert fingerprint(b) == fingerprint(c)
    with torch.no_grad():
        b.proj_out.bias[0] += 1
    changed = fingerprint(b)
    assert changed != fingerprint(c)
    b.proj_out.bias.data.copy_(c.proj_out.bias)  # through .data: no version counter sees it, the sampled bytes do
    assert fingerprint(b) == fingerprint(c) != changed
    assert fingerprint(b, fresh=True) == fingerprint(c)


def test_readme_stage_two_auto_with_cached_prompts_and_context_kv(cache: CountingCache) -> None:
    """README's Wan stage: auto(), cache_prompts and cache_context_kv together on an I2V pipeline. Both runs give
    torch.equal frames; on the second the text and image encoders never run (so are never switched in: they stay
    parked) and every K/V is found."""
    want = td.run_wan_i2v(td.wan_i2v_pipeline(0))
    pipe = td.wan_i2v_pipeline(0)
    stage = PipelineStages(pipe, cache).auto()
    prompts = cache_prompts(pipe, cache)
    kv = cache_context_kv(pipe.transformer, cache)
    assert torch.equal(td.run_wan_i2v(pipe), want)
    calls = [0, 0]
    hooks = [
        m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, m in enumerate((pipe.text_encoder, pipe.image_encoder))
    ]
    misses = kv.misses
    assert torch.equal(td.run_wan_i2v(pipe), want)
    assert calls == [0, 0] and prompts.hits == 2 and kv.misses == misses
    assert is_parked(pipe.text_encoder) and is_parked(pipe.image_encoder)
    for hook in hooks:
        hook.remove()
    kv.remove()
    prompts.remove()
    stage.remove()
    assert not any(is_parked(m) for m in components(pipe).values())
    assert hook_leftovers(pipe) == []
