"""Prompt embeddings cached: a pipeline's `encode_prompt` (T5, umT5, CLIP text encoders) and, for image-to-video,
`encode_image` (the CLIP vision encoder) answered from the cache for an input seen before, so the encoders do not
run, and can stay parked.

Keys: the pipeline class, the content fingerprint of every text encoder (or the image encoder), a digest of every
tokenizer's (or the image processor's) whole definition, and every argument but the device: prompts, negative
prompts, sequence length, guidance, count, dtype. Prompts that differ by one token differ in the key. A call given
precomputed embeddings (`prompt_embeds=...`) goes to the pipeline's own method."""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ... import TierCache
from ...errors import EntryValueError, TierCacheError
from .fingerprint import content_hash, fingerprint

log = logging.getLogger(__name__)

COUNT = "outputs"  # the entry's tensor holding how many values the method returned (the others may be None)


def _plain(value: Any) -> Any:
    """A stable, comparable form of an argument for the key (tensors by content, dtypes by name)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", content_hash(value))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, hashlib.blake2b(value.tobytes(), digest_size=8).hexdigest())
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        return ("image", value.mode, value.size, hashlib.blake2b(value.tobytes(), digest_size=8).hexdigest())
    if value is None or isinstance(value, (str, int, float, bool, torch.dtype)):
        return value if not isinstance(value, torch.dtype) else str(value)
    raise EntryValueError(
        f"cache_prompts: cannot key an argument of type {type(value).__name__}; pass tensors, images, strings or "
        "numbers, or call the pipeline's method without the cache"
    )


def _preprocessing_stamp(component: Any) -> tuple[Any, ...]:
    """What changes when a tokenizer is changed in place (tokens added, padding or truncation side, limits)."""
    names = ("model_max_length", "padding_side", "truncation_side", "add_bos_token", "add_eos_token")
    size = len(component) if hasattr(component, "__len__") else None
    return (size, *(getattr(component, name, None) for name in names))


def _preprocessing(component: Any) -> str:
    """A digest of a tokenizer or an image processor: its class, its length limit and its whole definition (a fast
    tokenizer's JSON: vocabulary, normalizer, pre-tokenizer, post-processor; a processor's configuration), or the
    vocabulary where nothing else is exposed."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{type(component).__qualname__}|{getattr(component, 'model_max_length', None)}|".encode())
    backend = getattr(component, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(component, "to_json_string"):
        h.update(component.to_json_string().encode())
    elif hasattr(component, "get_vocab"):
        for token, index in sorted(component.get_vocab().items()):
            h.update(f"{token}\0{index}\0".encode())
    else:
        raise EntryValueError(
            f"cache_prompts: cannot key the pipeline's {type(component).__name__} (no definition to hash): call the "
            "pipeline without the cache"
        )
    for name in ("padding_side", "truncation_side", "add_bos_token", "add_eos_token"):
        h.update(f"|{name}={getattr(component, name, None)}".encode())
    return h.hexdigest()


class _Cached:
    """One pipeline method answered from the cache."""

    def __init__(self, owner: PromptCache, method: str, encoders: list[str], preprocessors: list[str]) -> None:
        self.owner = owner
        self.method = method
        self.encoders = encoders
        self.preprocessors = preprocessors
        pipe = owner.pipe
        self.had_own = method in pipe.__dict__
        self.original: Callable[..., Any] = getattr(pipe, method)
        self.signature = inspect.signature(self.original)
        self._digests: dict[int, tuple[Any, Any, str]] = {}  # id(component) -> (component, stamp, digest)
        setattr(pipe, method, self)

    def _preprocessing_digest(self, component: Any) -> str:
        """The component's digest, taken again whenever its cheap stamp changes (length, limits, sides)."""
        stamp = _preprocessing_stamp(component)
        known = self._digests.get(id(component))
        if known is None or known[0] is not component or known[1] != stamp:
            known = self._digests[id(component)] = (component, stamp, _preprocessing(component))
        return known[2]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        given = [n for n, v in arguments.items() if n.endswith("_embeds") and v is not None]
        if given:  # the caller has the embeddings already: nothing to encode, nothing to key
            return self.original(*args, **kwargs)
        pipe = self.owner.pipe
        device = arguments.pop("device", None) or pipe._execution_device
        parts = [type(pipe).__qualname__, self.method]
        parts += [f"{n}={fingerprint(getattr(pipe, n))}" for n in self.encoders if getattr(pipe, n, None) is not None]
        parts += [
            f"{n}={self._preprocessing_digest(getattr(pipe, n))}"
            for n in self.preprocessors
            if getattr(pipe, n, None) is not None
        ]
        parts.append(repr(sorted((n, _plain(v)) for n, v in arguments.items())))
        key = f"{self.owner.prefix}{hashlib.blake2b('|'.join(parts).encode(), digest_size=12).hexdigest()}"
        cache = self.owner.cache
        try:
            stored = cache.get(key, device=device)
        except TierCacheError as exc:  # a damaged or unreadable entry: encoded again, never wrong
            log.warning("tiercache: prompt embeddings %r could not be read (%s); encoding again", key, exc)
            stored = None
        if stored is not None:
            self.owner.hits += 1
            if cache.tier_of(key) == "hbm":  # the cache's own tensors: the caller gets a copy it may modify
                stored = {name: tensor.clone() for name, tensor in stored.items()}
            count = int(stored[COUNT].item())
            values = [stored.get(f"{i}") for i in range(count)]
            return values[0] if count == 1 and "single" in stored else tuple(values)
        self.owner.misses += 1
        result = self.original(*args, **kwargs)
        values = [result] if isinstance(result, torch.Tensor) else list(result)
        if all(v is None or isinstance(v, torch.Tensor) for v in values):
            entry = {f"{i}": v for i, v in enumerate(values) if v is not None}
            entry[COUNT] = torch.tensor(len(values))
            if isinstance(result, torch.Tensor):
                entry["single"] = torch.tensor(1)
            try:
                cache.put(key, entry, write_through=self.owner.write_through)
            except TierCacheError as exc:  # no room, a failing disk: the encoders' result stands
                log.warning("tiercache: prompt embeddings %r not kept: %s", key, exc)
        return result

    def remove(self) -> None:
        pipe = self.owner.pipe
        if self.had_own:
            setattr(pipe, self.method, self.original)
        else:
            pipe.__dict__.pop(self.method, None)


class PromptCache:
    """The cached encoders of one pipeline (`cache_prompts`); `remove()` restores its methods. `hits` and
    `misses` count calls served from the cache and calls that ran the encoders."""

    def __init__(self, pipe: Any, cache: TierCache, *, prefix: str, write_through: bool | None) -> None:
        self.pipe = pipe
        self.cache = cache
        self.prefix = prefix
        self.write_through = write_through
        self.hits = 0
        self.misses = 0
        names = list(getattr(pipe, "components", {}))
        if isinstance(getattr(pipe, "encode_prompt", None), _Cached) or isinstance(
            getattr(pipe, "encode_image", None), _Cached
        ):
            raise EntryValueError("cache_prompts: this pipeline's encoders are cached already; remove() that first")
        self._methods: list[_Cached] = []
        if callable(getattr(pipe, "encode_prompt", None)):
            encoders = [n for n in names if n.startswith("text_encoder")]
            tokenizers = [n for n in names if n.startswith("tokenizer")]
            self._methods.append(_Cached(self, "encode_prompt", encoders, tokenizers))
        if callable(getattr(pipe, "encode_image", None)) and getattr(pipe, "image_encoder", None) is not None:
            processors = [n for n in names if n in ("image_processor", "feature_extractor")]
            self._methods.append(_Cached(self, "encode_image", ["image_encoder"], processors))
        if not self._methods:
            raise EntryValueError(f"cache_prompts: {type(pipe).__name__} has no encode_prompt or encode_image")

    def remove(self) -> None:
        for method in self._methods:
            method.remove()
        self._methods.clear()


def cache_prompts(
    pipe: Any, cache: TierCache, *, prefix: str = "prompts/", write_through: bool | None = None
) -> PromptCache:
    """Answer `pipe.encode_prompt` (and `pipe.encode_image`, where the pipeline has an image encoder) from `cache`
    for inputs seen before, in this process or another on the same root; `remove()` undoes it."""
    return PromptCache(pipe, cache, prefix=prefix, write_through=write_through)
