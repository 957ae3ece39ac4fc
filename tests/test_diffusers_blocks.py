"""offload_blocks: a transformer's blocks fetch their weights from the cache just before they run. Outputs are bitwise
those of the model without offload (Wan T2V, Wan I2V, Flux; every lookahead; entries in host or on nvme), the blocks
hold placeholders between forwards, and remove() leaves the model exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import tiny_diffusers as td
import torch
from helpers import CountingCache, MiB, policy

from tiercache import EntryValueError
from tiercache.integrations.diffusers import find_blocks, fingerprint, offload_blocks

MODELS: dict[str, Callable[[int], torch.nn.Module]] = {
    "wan-t2v": lambda seed: td.wan_transformer(seed, layers=3),
    "wan-i2v": lambda seed: td.wan_transformer(seed, i2v=True, layers=3),
    "flux": lambda seed: td.flux_transformer(seed, layers=2, single_layers=2),
}

# No write-down at close: these tests do not reopen the root, and close() writing memory down costs ~0.5 s a test.
NO_FLUSH = {"flush_on_close": False}
POLICY = policy(placement=NO_FLUSH)
NVME_ONLY = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}}, placement=NO_FLUSH)
HBM_ONLY = policy(tiers={"hbm": {"capacity": 8 * MiB}}, placement=NO_FLUSH)


def inputs(model: torch.nn.Module, seed: int) -> dict[str, Any]:
    if isinstance(model, td.FluxTransformer2DModel):
        return td.flux_inputs(model, seed)
    return td.wan_inputs(model, seed)


@torch.no_grad()
def forward(model: torch.nn.Module, seed: int) -> torch.Tensor:
    return model(**inputs(model, seed))[0]


@pytest.fixture
def counting_cache(tmp_path: Any) -> Any:
    cache = CountingCache(root=tmp_path / "root", policy=POLICY)
    yield cache
    cache.close()


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """What remove() must give back: the Parameter objects, the state_dict's bytes, every module's __dict__ keys."""
    return {
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dicts": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "fingerprint": fingerprint(model),
    }


def assert_as_it_was(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["params"] == before["params"]
    assert list(after["state"]) == list(before["state"])
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name
    assert after["dicts"] == before["dicts"]
    for name, module in model.named_modules():
        assert "_diffusers_hook" not in module.__dict__, name
        assert "forward" not in module.__dict__, name
    assert after["fingerprint"] == before["fingerprint"]


def block_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for _, block in find_blocks(model) for t in [*block.parameters(), *block.buffers()]]


@pytest.mark.parametrize("lookahead", [0, 1, 2, 9])
@pytest.mark.parametrize("kind", list(MODELS))
def test_outputs_are_bitwise_those_of_the_model_without_offload(make_cache: Any, kind: str, lookahead: int) -> None:
    """Over several forwards (other inputs each), every lookahead (none, 1, 2, more than there are blocks) gives
    torch.equal outputs, and between forwards every block tensor is a 0-element placeholder of the same dtype."""
    model = MODELS[kind](0)
    want = [forward(model, seed) for seed in range(2)]
    dtypes = [t.dtype for t in block_tensors(model)]
    cache = make_cache(POLICY)
    offload = offload_blocks(model, cache, lookahead=lookahead)
    assert len(offload.keys) == len(find_blocks(model)) == (4 if kind == "flux" else 3)
    for _ in range(2):  # a denoising loop runs the model again: the wrapped-around prefetches serve the next pass
        for seed, expected in enumerate(want):
            assert all(t.numel() == 0 for t in block_tensors(model))
            assert [t.dtype for t in block_tensors(model)] == dtypes
            assert torch.equal(forward(model, seed), expected)
    assert all(t.numel() == 0 for t in block_tensors(model))
    offload.remove()
    assert torch.equal(forward(model, 0), want[0])


@pytest.mark.parametrize(
    ("pol", "to"),
    [(NVME_ONLY, "host"), (POLICY, "nvme")],
    ids=["host-tier-without-room", "to-nvme"],
)
@pytest.mark.parametrize("kind", list(MODELS))
def test_blocks_served_from_nvme_give_the_same_outputs(make_cache: Any, kind: str, pol: Any, to: str) -> None:
    """Entries on nvme (a policy whose memory tiers have no room, or to="nvme") serve the blocks bit-exactly."""
    model = MODELS[kind](0)
    want = [forward(model, seed) for seed in range(2)]
    cache = make_cache(pol)
    offload = offload_blocks(model, cache, to=to)
    assert {cache.tier_of(key) for key in offload.keys} == {"nvme"}
    for seed, expected in [*enumerate(want), *enumerate(want)]:
        assert torch.equal(forward(model, seed), expected)
    offload.remove()
    assert torch.equal(forward(model, 1), want[1])


def test_entries_go_to_host_at_once_by_default(make_cache: Any) -> None:
    """With room in hbm, the default to="host" still moves every block's entry off the device when offloading."""
    model = MODELS["wan-t2v"](0)
    cache = make_cache(POLICY)
    offload = offload_blocks(model, cache)
    assert {cache.tier_of(key) for key in offload.keys} == {"host"}
    offload.remove()


@pytest.mark.parametrize("kind", list(MODELS))
def test_remove_leaves_the_model_exactly_as_it_was(make_cache: Any, kind: str) -> None:
    """remove() after some forwards: the same Parameter objects, a bitwise-equal state_dict, the same __dict__ keys
    on every module (no `_diffusers_hook`, no instance `forward`), the same fingerprint; with delete=True the entries
    it stored are deleted from the cache."""
    model = MODELS[kind](0)
    before = snapshot(model)
    want = forward(model, 0)
    cache = make_cache(POLICY)
    cache.put("other", {"x": torch.ones(3)})
    offload = offload_blocks(model, cache, lookahead=1)
    assert sorted(cache.keys()) == sorted([*offload.keys, "other"])
    forward(model, 0)
    forward(model, 1)
    offload.remove(delete=True)
    assert_as_it_was(model, before)
    assert cache.keys() == ["other"]
    assert torch.equal(forward(model, 0), want)


def test_remove_gives_the_model_its_own_memory(make_cache: Any) -> None:
    """After remove(), writing to the model's weights does not change what the cache holds, nor the reverse."""
    model = MODELS["wan-t2v"](0)
    cache = make_cache(HBM_ONLY)  # entries in hbm: a read hands out the cache's own tensors
    offload = offload_blocks(model, cache, to=None)
    forward(model, 0)
    offload.remove()
    name, block = find_blocks(model)[0]
    stored = cache.get(offload.keys[0])
    first = next(iter(block.state_dict()))
    original = stored[first].clone()
    with torch.no_grad():
        block.state_dict()[first].add_(1)
    assert torch.equal(cache.get(offload.keys[0])[first], original), name


def test_remove_keeps_the_entries_and_they_are_reused(counting_cache: CountingCache) -> None:
    """remove() leaves the block entries in the cache (by default); offloading the model again copies nothing
    into the cache (the same keys, no put) and still gives the same outputs."""
    model = MODELS["wan-t2v"](0)
    want = forward(model, 0)
    offload = offload_blocks(model, counting_cache)
    keys = offload.keys
    assert counting_cache.puts == keys
    offload.remove()
    assert sorted(counting_cache.keys()) == sorted(keys)
    again = offload_blocks(model, counting_cache)
    assert again.keys == keys and counting_cache.puts == keys
    assert torch.equal(forward(model, 0), want)
    again.remove()
    assert torch.equal(forward(model, 0), want)


def test_a_second_model_with_the_same_weights_reuses_the_entries(counting_cache: CountingCache) -> None:
    """A second model built with the same weights is keyed by the same fingerprint: it offloads without a single put,
    and both give the same outputs; a model with other weights gets entries of its own."""
    a, b, other = MODELS["wan-t2v"](0), MODELS["wan-t2v"](0), MODELS["wan-t2v"](1)
    want, want_other = forward(a, 0), forward(other, 0)
    first = offload_blocks(a, counting_cache)
    puts = list(counting_cache.puts)
    second = offload_blocks(b, counting_cache)
    assert second.keys == first.keys and counting_cache.puts == puts
    third = offload_blocks(other, counting_cache)
    assert set(third.keys).isdisjoint(first.keys)
    assert torch.equal(forward(a, 0), want) and torch.equal(forward(b, 0), want)
    assert torch.equal(forward(other, 0), want_other)
    for handle in (third, second, first):  # the reverse order: see the test below for the other
        handle.remove(delete=True)
    assert counting_cache.keys() == []


@pytest.mark.parametrize("removed", ["first", "second"])
def test_removing_one_of_two_offloads_of_the_same_weights_leaves_the_other_working(
    make_cache: Any, removed: str
) -> None:
    """Two models with the same weights share their block entries; removing either offload, even with delete=True,
    leaves the other one's forwards bitwise right and its own remove() able to give its weights back; the last
    remove(delete=True) deletes them."""
    a, b = MODELS["wan-t2v"](0), MODELS["wan-t2v"](0)
    want = forward(a, 0)
    before = snapshot(b)
    cache = make_cache(POLICY)
    first, second = offload_blocks(a, cache), offload_blocks(b, cache)
    gone, kept, kept_model = (first, second, b) if removed == "first" else (second, first, a)
    gone.remove(delete=True)
    assert torch.equal(forward(kept_model, 0), want)
    kept.remove(delete=True)
    assert torch.equal(forward(kept_model, 0), want)
    assert_as_it_was(b, before)
    assert cache.keys() == []


def test_named_blocks_only_are_offloaded(make_cache: Any) -> None:
    """blocks=[...] offloads just those modules: the others keep their weights, and outputs stay bitwise equal."""
    model = MODELS["flux"](0)
    want = forward(model, 0)
    cache = make_cache(POLICY)
    offload = offload_blocks(model, cache, blocks=["single_transformer_blocks.1"])
    assert len(offload.keys) == 1
    assert all(p.numel() == 0 for p in model.single_transformer_blocks[1].parameters())
    assert all(p.numel() > 0 for p in model.transformer_blocks.parameters())
    assert torch.equal(forward(model, 0), want)
    offload.remove()


def test_refusals_say_what_is_wrong(make_cache: Any) -> None:
    """A negative or non-integer lookahead, and a model without a ModuleList of blocks, are refused before anything
    is stored, with a message naming the problem."""
    cache = make_cache(POLICY)
    model = MODELS["wan-t2v"](0)
    for bad in (-1, 1.5, True):
        with pytest.raises(EntryValueError, match="lookahead must be an integer >= 0"):
            offload_blocks(model, cache, lookahead=bad)  # type: ignore[arg-type]
    with pytest.raises(EntryValueError, match="Linear has no ModuleList of blocks; name them with blocks="):
        offload_blocks(torch.nn.Linear(2, 2), cache)
    assert cache.keys() == []
    assert all(t.numel() > 0 for t in block_tensors(model))
