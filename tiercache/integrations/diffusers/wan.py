"""Wan's cross-attention K/V computed once per context.

In WanTransformer3DModel every block's `attn2` projects the text context (and, for I2V, the image context) to K/V
that depend only on the weights and that context: the same at every denoising step, and the image K/V the same in
both guidance branches. A processor on each `attn2` takes them from the cache instead of projecting again. They are
keyed by the model's content fingerprint and a hash of the raw context tensor the transformer is called with (the
prompt embedding, the image embedding): never by a pointer. One entry per context holds every block's K and V, so
another process on the same root, or a later request with the same prompt, skips the projections too."""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import diffusers
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ... import TierCache
from ...errors import EntryValueError, TierCacheError
from ._import import ModelHook, WanAttnProcessor, WanTransformer3DModel
from .fingerprint import TensorMemo, content_hash, fingerprint, quick_stamp
from .hooks import Attached

log = logging.getLogger(__name__)

HOOK_NAME = "tiercache_context_kv"
TEXT_TOKENS = 512  # WanAttnProcessor's hard-coded text length: in I2V the image context is what precedes it

KV = tuple[torch.Tensor, torch.Tensor]


class _Context:
    """One context's K/V for the forward in progress: from the cache (`stored`), or computed block by block."""

    def __init__(self, key: str, stored: dict[str, torch.Tensor] | None) -> None:
        self.key = key
        self.stored = stored
        self.computed: dict[str, torch.Tensor] = {}

    def kv(self, index: int, compute: Callable[[], KV]) -> KV:
        if self.stored is not None and f"{index}.k" in self.stored:
            return self.stored[f"{index}.k"], self.stored[f"{index}.v"]
        key, value = compute()
        self.computed[f"{index}.k"], self.computed[f"{index}.v"] = key, value
        return key, value


class _State(threading.local):
    """What the root hook found for the forward in progress, read by every block's processor: one per thread, so
    that two threads running the transformer never mix their contexts."""

    def __init__(self) -> None:
        self.text: _Context | None = None
        self.image: _Context | None = None


def _text_kv(attn: Any, context: torch.Tensor) -> KV:
    """attn2's text K/V exactly as WanAttnProcessor computes them (diffusers 0.42.1): projected, normed, split."""
    if attn.fused_projections:
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    key = attn.norm_k(key)
    return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))


def _image_kv(attn: Any, context: torch.Tensor) -> KV:
    """attn2's image K/V (I2V) exactly as WanAttnProcessor computes them."""
    if attn.fused_projections:
        key, value = attn.to_added_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.add_k_proj(context), attn.add_v_proj(context)
    key = attn.norm_added_k(key)
    return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))


def _setting(device: torch.device, attention_kwargs: Any, attentions: list[Any]) -> str:
    """What besides the weights and the context decides the K/V's bits: the device type, autocast, TF32, the
    versions of torch and diffusers, the call's LoRA scale, and every LoRA adapter's state on the projections."""
    adapters = []
    for attn in attentions:
        for name in ("to_k", "to_v", "to_kv", "add_k_proj", "add_v_proj", "to_added_kv"):
            layer = getattr(attn, name, None)
            if layer is not None and hasattr(layer, "active_adapters"):
                adapters.append(
                    (
                        name,
                        tuple(layer.active_adapters),
                        repr(getattr(layer, "scaling", None)),
                        getattr(layer, "disable_adapters", None),
                        repr(getattr(layer, "merged_adapters", None)),
                    )
                )
    kind = device.type
    parts = (
        kind,
        torch.is_autocast_enabled(kind) and str(torch.get_autocast_dtype(kind)),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.__version__,
        diffusers.__version__,
        repr(attention_kwargs.get("scale") if isinstance(attention_kwargs, dict) else None),
        tuple(adapters),
    )
    return hashlib.blake2b(repr(parts).encode(), digest_size=6).hexdigest()


class CachedContextProcessor(WanAttnProcessor):  # type: ignore[misc]
    """WanAttnProcessor for `attn2` whose text and image K/V come from the context cache. Everything else is the
    stock processor's computation, in its order, so outputs are bit-identical; self-attention and calls outside
    a hooked forward go to the stock code."""

    def __init__(self, state: _State, index: int, original: Any) -> None:
        super().__init__()
        self.state = state
        self.index = index
        self.original = original
        # set_attention_backend writes these on processor instances: keep what the replaced one had
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        text = self.state.text
        if text is None or encoder_hidden_states is None or rotary_emb is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        image_context = None
        if attn.add_k_proj is not None:
            image_length = encoder_hidden_states.shape[1] - TEXT_TOKENS
            image_context = encoder_hidden_states[:, :image_length]
            encoder_hidden_states = encoder_hidden_states[:, image_length:]
        context = encoder_hidden_states
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key, value = text.kv(self.index, lambda: _text_kv(attn, context))
        hidden_states_img = None
        if image_context is not None:
            image = self.state.image
            key_img, value_img = (
                image.kv(self.index, lambda: _image_kv(attn, image_context))
                if image is not None
                else _image_kv(attn, image_context)
            )
            hidden_states_img = dispatch_attention_fn(
                query,
                key_img,
                value_img,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=None,
            )
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=None,  # the stock processor passes none for cross-attention
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)  # type: ignore[no-any-return]


class _RootHook(ModelHook):  # type: ignore[misc]
    """On the transformer: finds each context's entry before forward, stores what was computed after it. (Not a
    new_forward: diffusers' registry leaves a new_forward hook calling a hook removed beneath it.)"""

    def __init__(self, handle: ContextKV) -> None:
        super().__init__()
        self.handle = handle

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.handle._begin(args, kwargs)  # also clears what a forward that raised left
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.handle._end()
        return output


class ContextKV:
    """The context K/V cache on one Wan transformer (`cache_context_kv`); `remove()` puts the stock processors
    back. `hits` and `misses` count contexts (one per forward and kind) served from the cache or computed."""

    def __init__(self, transformer: torch.nn.Module, cache: TierCache, *, prefix: str, write_through: bool | None):
        self.transformer = transformer
        self.cache = cache
        self.prefix = prefix
        self.write_through = write_through
        self.hits = 0
        self.misses = 0
        self._state = _State()
        self._models = TensorMemo()  # (quick stamp, fingerprint) of the model, by the context tensor it was taken for
        self._signature = inspect.signature(type(transformer).forward)
        self._attentions = [block.attn2 for block in transformer.blocks]  # type: ignore[union-attr]
        self._originals = [attn.processor for attn in self._attentions]
        for original in self._originals:
            if type(original) is not WanAttnProcessor:  # ours already, or a user's own: both would be lost
                raise EntryValueError(
                    f"cache_context_kv: attn2 has a {type(original).__name__}, not diffusers' WanAttnProcessor "
                    "(a context K/V cache on this model already, or a processor of your own): remove() the first, "
                    "or put the stock processor back"
                )
        for index, attn in enumerate(self._attentions):
            attn.set_processor(CachedContextProcessor(self._state, index, attn.processor))
        self._hooks = Attached(HOOK_NAME)
        self._hooks.attach(transformer, _RootHook(self))

    @torch.compiler.disable  # type: ignore[misc]
    @torch.inference_mode(False)  # the cache's copies are ordinary tensors, under the caller's inference_mode too
    def _begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._state.text = self._state.image = None
        bound = self._signature.bind(self.transformer, *args, **kwargs).arguments
        text, image = bound.get("encoder_hidden_states"), bound.get("encoder_hidden_states_image")
        if not isinstance(text, torch.Tensor):  # nothing to key: the stock processors run
            return
        if (
            self._attentions[0].add_k_proj is not None
            and isinstance(image, torch.Tensor)
            and text.shape[1] != TEXT_TOKENS
        ):
            return  # the stock processor splits at 512 text tokens: other lengths mix image into "text"; not cached
        # A fingerprint's stamp samples every weight's bytes: taken once per context tensor (a request's steps pass
        # the same one) while the weights' addresses and version counters stay as they were, not at every step.
        quick = quick_stamp(self.transformer)
        remembered = self._models.lookup(text)
        if remembered is not None and remembered[0] == quick:
            model = remembered[1]
        else:
            model = fingerprint(self.transformer)
            self._models.remember(text, (quick, model))
        setting = _setting(text.device, bound.get("attention_kwargs"), self._attentions)
        self._state.text = self._find(f"{self.prefix}{model}/text/{content_hash(text)}-{setting}", text.device)
        if isinstance(image, torch.Tensor):
            key = f"{self.prefix}{model}/image/{content_hash(image)}-{setting}"
            self._state.image = self._find(key, image.device)

    def _find(self, key: str, device: torch.device) -> _Context:
        try:
            stored = self.cache.get(key, device=device)
        except TierCacheError as exc:  # a damaged or unreadable entry: computed again, never wrong
            log.warning("tiercache: context K/V %r could not be read (%s); computing it", key, exc)
            stored = None
        if stored is None:
            self.misses += 1
        else:
            self.hits += 1
        return _Context(key, stored)

    @torch.compiler.disable  # type: ignore[misc]
    @torch.inference_mode(False)
    def _end(self) -> None:
        for context in (self._state.text, self._state.image):
            # only a context every block computed is whole: a forward that stopped half-way stores nothing
            if context is not None and len(context.computed) == 2 * len(self._attentions):
                try:
                    self.cache.put(context.key, context.computed, copy=False, write_through=self.write_through)
                except TierCacheError as exc:  # no room, a failing disk: the forward's result stands
                    log.warning("tiercache: context K/V %r not kept: %s", context.key, exc)
        self._state.text = self._state.image = None

    def remove(self) -> None:
        """Give every attn2 its processor back and take the hook off; the entries stay in the cache."""
        for attn, original in zip(self._attentions, self._originals, strict=True):
            ours = attn.processor
            if isinstance(ours, CachedContextProcessor):  # a set_attention_backend made meanwhile carries over
                original._attention_backend = ours._attention_backend
            attn.set_processor(original)
        self._hooks.detach()


def cache_context_kv(
    transformer: torch.nn.Module, cache: TierCache, *, prefix: str = "wan-kv/", write_through: bool | None = None
) -> ContextKV:
    """Compute a WanTransformer3DModel's cross-attention K/V (text, and I2V image) once per context and keep them
    in `cache`: every later step, guidance branch, request or process with the same context reuses them.
    Outputs are bit-identical to the model's own; `remove()` undoes it."""
    if not isinstance(transformer, WanTransformer3DModel):
        raise EntryValueError(
            f"cache_context_kv: {type(transformer).__name__} has no blocks with attn2 (a WanTransformer3DModel is "
            "expected; Flux's text K/V change every step and cannot be reused)"
        )
    return ContextKV(transformer, cache, prefix=prefix, write_through=write_through)
