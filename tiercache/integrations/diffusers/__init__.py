"""tiercache for diffusers pipelines (the `diffusers` extra).

- `offload_blocks(model, cache)`: a transformer's blocks fetch their weights from the cache just before they run.
- `park(module, cache, name)` / `restore(module, cache)`, and `PipelineStages(pipe, cache)`: whole components in
  and out of device memory between stages, keyed by their weights' content.
- `cache_context_kv(transformer, cache)`: Wan's cross-attention K/V computed once per prompt and image.
- `cache_prompts(pipe, cache)`: text (and image) encoder outputs for inputs seen before.

Each returns a handle whose `remove()` leaves the model or pipeline as it was. What can pass between Flux and Wan is
weights, images and prompts: their K/V, latents and prompt embeddings differ in width, encoder and VAE.
"""

from __future__ import annotations

from .blocks import BlockOffload, find_blocks, offload_blocks
from .fingerprint import content_hash, fingerprint
from .prompts import PromptCache, cache_prompts
from .stages import Parked, PipelineStages, Restoring, park, parked, restore
from .wan import CachedContextProcessor, ContextKV, cache_context_kv

__all__ = [
    "BlockOffload",
    "CachedContextProcessor",
    "ContextKV",
    "Parked",
    "PipelineStages",
    "PromptCache",
    "Restoring",
    "cache_context_kv",
    "cache_prompts",
    "content_hash",
    "find_blocks",
    "fingerprint",
    "offload_blocks",
    "park",
    "parked",
    "restore",
]
